"""What one Ray task does: one DVC experiment in a fresh clone, pushed back all or nothing.

The driver ships this module and :mod:`.supervise` to the workers by value (cloudpickle's
``register_pickle_by_value``): a worker needs Ray and the project's requirements, not the
project's code, which it clones. So both import only the standard library, and this one
imports from :mod:`.supervise` (a worker cannot import it by name, but it travels along).

The last step, ``dvc exp push --no-cache --force``, updates the experiment's ref in one git
push: an attempt stopped before it leaves no experiment, and a retry starts from a fresh clone.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline.sweep.supervise import alive, remove_attempt

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
        ("dvc exp push", [*dvc, "exp", "push", "--no-cache", "--force", job["git_url"], job["name"]]),
    ]
    return out


def task_env(job: Mapping[str, Any], base: Mapping[str, str]) -> dict[str, str]:
    """The commands' environment: the worker's, less other stores and experiments, plus the sweep's."""
    env = {k: v for k, v in base.items() if not k.startswith(("MLFLOW_TRACKING_URI", "DVC_", "PIPELINE_SWEEP"))}
    path = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return {**env, "PATH": path, "GIT_TERMINAL_PROMPT": "0", "DVC_NO_ANALYTICS": "1", **job["env"]}


def _attempt_dir(job: Mapping[str, Any]) -> Path:
    """A fresh folder for this attempt; earlier attempts' folders of the same experiment on this
    machine whose process is gone (a killed worker) are removed first."""
    root = Path(job.get("work_root") or tempfile.gettempdir()) / f"sweep-{job['sweep']}"
    root.mkdir(parents=True, exist_ok=True)
    for old in root.glob(f"{job['name']}.*"):
        pid = old.name.rsplit(".", 1)[-1]
        if pid.isdigit() and not alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    path = root / f"{job['name']}.{os.getpid()}"
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir()
    return path


def run_experiment(job: Mapping[str, Any]) -> dict[str, Any]:
    """Run one experiment; a dict with ``name``, ``ok``, ``seconds``, ``metrics`` (``dvc metrics show
    --json``), ``step`` and ``status`` of a failed step, the log's ``tail``, ``host`` and ``pid``."""
    start = time.monotonic()
    attempt = _attempt_dir(job)
    clone = attempt / "repo"
    log_path = attempt / "log.txt"
    env = task_env(job, os.environ)

    def supervised(argv: list[str], out: Any, err: Any = None) -> int:
        """Run ``argv`` under the supervisor (its source travels in the job); stdout to ``out``, stderr to
        ``err`` (default: ``out``)."""
        command = [sys.executable, "-c", job["supervisor"], str(os.getpid()), str(attempt), *argv]
        cwd = clone if clone.exists() else attempt  # the clone step runs before there is one
        return subprocess.run(
            command, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err or out
        ).returncode

    result: dict[str, Any] = {"name": job["name"], "ok": False, "host": socket.gethostname(), "pid": os.getpid()}
    try:
        with log_path.open("w", encoding="utf-8") as log:
            for label, argv in steps(job, str(clone)):
                log.write(f"$ {' '.join(argv)}\n")
                log.flush()
                tries = PUSH_ATTEMPTS if label == "dvc exp push" else 1  # concurrent pushes may race on a lock
                for _ in range(tries):
                    status = supervised(argv, log)
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
                    # Warnings go to the log: on stdout they would break the JSON.
                    if supervised(shown, out, log) == 0:
                        result["metrics"] = json.loads(metrics_file.read_text(encoding="utf-8") or "{}")
                result["ok"] = True
        text = log_path.read_text(encoding="utf-8", errors="replace")
        result["tail"] = "\n".join(text.splitlines()[-LOG_TAIL_LINES:])
    finally:
        result["seconds"] = time.monotonic() - start
        remove_attempt(attempt)
    return result


def probe(git_url: str, ref: str, tracking_uri: str, timeout_s: float = 20.0) -> dict[str, str]:
    """From a worker: can it fetch the sweep's ref and reach the tracking server? ``{"error": ...}`` if not."""
    env, host = {**os.environ, "GIT_TERMINAL_PROMPT": "0"}, socket.gethostname()
    try:
        listed = subprocess.run(
            ["git", "ls-remote", git_url, ref], capture_output=True, text=True, timeout=timeout_s, env=env, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"error": f"git ls-remote {git_url} failed on {host}: {exc}"}
    if listed.returncode != 0 or not listed.stdout.strip():
        why = listed.stderr.strip() or f"no {ref} there"
        return {"error": f"workers cannot fetch the code from {git_url} ({host}): {why}"}
    if tracking_uri.startswith(("http://", "https://")):
        try:
            urllib.request.urlopen(f"{tracking_uri.rstrip('/')}/health", timeout=timeout_s).close()  # noqa: S310
        except OSError as exc:
            return {"error": f"workers cannot reach the tracking server {tracking_uri} ({host}): {exc}"}
    return {"sha": listed.stdout.split()[0], "host": host, "python": sys.executable}
