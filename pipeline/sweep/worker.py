"""What one Ray task does: one DVC experiment in a fresh clone, pushed back all or nothing.

The driver ships this module to the workers by value (``cloudpickle.register_pickle_by_value``):
a worker needs Ray and the project's requirements installed, not the project's code, which
it clones. So this module imports only the standard library.

Steps (:func:`steps`): clone the sweep's git source; check out the baseline commit and lay
the snapshot's tree on it (the workspace's uncommitted changes); point the clone's DVC
remote at the workspace's (absolute) remote and, when the worker shares the workspace's
machine, its cache; ``dvc exp run --pull -S ... --name ...``; push the outputs and run cache
to the DVC remote; and last, ``dvc exp push --no-cache --force``, whose git push updates the
experiment's ref in one step. An attempt stopped anywhere before that last step leaves no
experiment; a retried attempt starts again from a fresh clone and overwrites nothing but
its own name's ref.

Every command runs under :mod:`pipeline.sweep.supervise`, so that a dying worker takes its
``dvc`` and training processes down with it instead of leaving them running.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

LOG_TAIL_LINES = 60
PUSH_ATTEMPTS = 3
Step = tuple[str, list[str]]  # (label, argv), run in the clone


def steps(job: Mapping[str, Any], clone: str) -> list[Step]:
    """The commands of one attempt, in order (the first runs in the attempt folder, the rest in ``clone``)."""
    dvc = [sys.executable, "-m", "dvc"]
    out: list[Step] = [
        ("clone", ["git", "clone", "--quiet", "--no-checkout", job["git_url"], clone]),
        ("fetch", ["git", "fetch", "--quiet", job["git_url"], f"+{job['ref']}:{job['ref']}"]),
        ("checkout", ["git", "-c", "advice.detachedHead=false", "checkout", "--quiet", "--detach", job["base"]]),
    ]
    if job["commit"] != job["base"]:  # the workspace's uncommitted changes, on top of the baseline
        out.append(("changes", ["git", "read-tree", "-u", "--reset", job["commit"]]))
    out.append(("dvc remote", [*dvc, "remote", "modify", "--local", job["dvc_remote"], "url", job["dvc_url"]]))
    if job.get("cache_dir"):
        out.append(("dvc cache", [*dvc, "cache", "dir", "--local", job["cache_dir"]]))
    set_params = [arg for p in job["set_params"] for arg in ("-S", p)]
    out += [
        ("dvc exp run", [*dvc, "exp", "run", "--pull", "--name", job["name"], *set_params]),
        ("dvc push", [*dvc, "push", "--run-cache", "--remote", job["dvc_remote"]]),
        ("dvc exp push", [*dvc, "exp", "push", "--no-cache", "--force", job["push_url"], job["name"]]),
    ]
    return out


def task_env(job: Mapping[str, Any], base: Mapping[str, str]) -> dict[str, str]:
    """The commands' environment: the worker's, less other stores and experiments, plus the sweep's."""
    env = {k: v for k, v in base.items() if not k.startswith(("MLFLOW_TRACKING_URI", "DVC_", "PIPELINE_SWEEP"))}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["GIT_TERMINAL_PROMPT"] = "0"
    env["DVC_NO_ANALYTICS"] = "1"
    env.update(job["env"])
    return env


def _attempt_dir(job: Mapping[str, Any]) -> Path:
    """A fresh folder for this attempt; earlier attempts' folders of the same experiment on this
    machine whose process is gone (a killed worker) are removed first."""
    root = Path(job.get("work_root") or tempfile.gettempdir()) / f"sweep-{job['sweep']}"
    root.mkdir(parents=True, exist_ok=True)
    for old in root.glob(f"{job['name']}.*"):
        pid = old.name.rsplit(".", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    path = root / f"{job['name']}.{os.getpid()}"
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir()
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _supervised(
    job: Mapping[str, Any], argv: list[str], cwd: Path, env: dict[str, str], out: Any, cleanup: Path
) -> int:
    """Run ``argv`` under the supervisor (its source travels in the job), output to ``out``."""
    command = [sys.executable, "-c", job["supervisor"], str(os.getpid()), str(cleanup), *argv]
    return subprocess.run(command, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out).returncode


def _tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def run_experiment(job: Mapping[str, Any]) -> dict[str, Any]:
    """Run one experiment; a dict with ``name``, ``ok``, ``seconds``, ``metrics`` (``dvc metrics show
    --json``), ``step`` and ``status`` of a failed step, the log's ``tail``, ``host`` and ``pid``."""
    start = time.monotonic()
    attempt = _attempt_dir(job)
    clone = attempt / "repo"
    log_path = attempt / "log.txt"
    env = task_env(job, os.environ)
    result: dict[str, Any] = {"name": job["name"], "ok": False, "host": socket.gethostname(), "pid": os.getpid()}
    try:
        with log_path.open("w", encoding="utf-8") as log:
            for label, argv in steps(job, str(clone)):
                log.write(f"$ {' '.join(argv)}\n")
                log.flush()
                tries = PUSH_ATTEMPTS if label == "dvc exp push" else 1  # concurrent pushes may race on a lock
                for _ in range(tries):
                    status = _supervised(job, argv, clone if clone.exists() else attempt, env, log, attempt)
                    if status == 0:
                        break
                    time.sleep(1.0)
                if status != 0:
                    result.update(step=label, status=status)
                    break
            else:
                metrics_file = attempt / "metrics.json"
                with metrics_file.open("w", encoding="utf-8") as out:
                    shown = [sys.executable, "-m", "dvc", "metrics", "show", "--json"]
                    if _supervised(job, shown, clone, env, out, attempt) == 0:
                        result["metrics"] = json.loads(metrics_file.read_text(encoding="utf-8") or "{}")
                result["ok"] = True
        result["tail"] = _tail(log_path)
    finally:
        result["seconds"] = time.monotonic() - start
        shutil.rmtree(attempt, ignore_errors=True)
        with contextlib.suppress(OSError):  # the sweep's folder, once its last attempt here is done
            attempt.parent.rmdir()
    return result


def probe(git_url: str, ref: str, tracking_uri: str, timeout_s: float = 20.0) -> dict[str, str]:
    """From a worker: can it fetch the sweep's ref and reach the tracking server? ``{"error": ...}`` if not."""
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0"}
    try:
        listed = subprocess.run(
            ["git", "ls-remote", git_url, ref], capture_output=True, text=True, timeout=timeout_s, env=env, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"error": f"git ls-remote {git_url} failed on {socket.gethostname()}: {exc}"}
    if listed.returncode != 0 or not listed.stdout.strip():
        why = listed.stderr.strip() or f"no {ref} there"
        return {"error": f"workers cannot fetch the code from {git_url} ({socket.gethostname()}): {why}"}
    if tracking_uri.startswith(("http://", "https://")):
        import urllib.request

        try:
            with urllib.request.urlopen(f"{tracking_uri.rstrip('/')}/health", timeout=timeout_s):  # noqa: S310
                pass
        except OSError as exc:
            return {"error": f"workers cannot reach the tracking server {tracking_uri} ({socket.gethostname()}): {exc}"}
    return {"sha": listed.stdout.split()[0], "host": socket.gethostname(), "python": sys.executable}
