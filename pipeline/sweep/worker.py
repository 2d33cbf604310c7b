"""What one Ray task does: one DVC experiment in a fresh clone, pushed back all or nothing, once.

Every command runs under :mod:`.supervise`, with a time limit. An attempt first asks the git remote
whether the experiment's ref is there (an earlier attempt pushed it, then its worker died): if so it
runs nothing. Else its last step, ``git push`` of that one ref after the outputs are in the DVC
remote, lands the experiment in one ref update: an attempt stopped before it leaves no experiment.
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
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

from pipeline.sweep import supervise

Step = tuple[str, list[str]]  # (label, argv), run in the clone


def exp_ref(job: Mapping[str, Any]) -> str:
    """The experiment's git ref, named as DVC names it: ``refs/exps/<baseline[:2]>/<baseline[2:]>/<name>``."""
    return f"refs/exps/{job['base'][:2]}/{job['base'][2:]}/{job['name']}"


def steps(job: Mapping[str, Any], clone: str) -> list[Step]:
    """The commands of one attempt, in order (the first runs in the attempt folder, the rest in ``clone``)."""
    dvc, ref = [sys.executable, "-m", "dvc"], exp_ref(job)
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
    return [
        *out,
        ("dvc exp run", [*dvc, "exp", "run", "--pull", "--name", job["name"], *set_params]),
        ("metrics", [*dvc, "metrics", "show", "--json"]),
        ("dvc push", [*dvc, "push", "--run-cache", "--remote", job["dvc_remote"]]),
        ("git push", ["git", "push", "--quiet", job["git_url"], f"{ref}:{ref}"]),
    ]


def task_env(job: Mapping[str, Any], base: Mapping[str, str]) -> dict[str, str]:
    """The commands' environment: the worker's, less other stores and experiments, plus the sweep's."""
    env = {k: v for k, v in base.items() if not k.startswith(("MLFLOW_TRACKING_URI", "DVC_", "PIPELINE_SWEEP"))}
    path = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return {**env, "PATH": path, "GIT_TERMINAL_PROMPT": "0", "DVC_NO_ANALYTICS": "1", **job["env"]}


def run_experiment(job: Mapping[str, Any]) -> dict[str, Any]:
    """Run one experiment unless it landed already: ``name``, ``ok``, ``earlier`` (landed by an earlier attempt),
    ``metrics``, a failed step's ``step``, ``status`` and ``timed_out``, ``error``, ``log``, ``seconds``, ..."""
    start = time.monotonic()
    attempt = (
        Path(job.get("work_root") or tempfile.gettempdir()) / f"sweep-{job['sweep']}" / f"{job['name']}.{os.getpid()}"
    )
    shutil.rmtree(attempt, ignore_errors=True)
    attempt.mkdir(parents=True)
    clone, log_path, out_path = attempt / "repo", attempt / "log.txt", attempt / "stdout.txt"
    env = task_env(job, os.environ)
    result: dict[str, Any] = {"name": job["name"], "ok": False, "host": socket.gethostname(), "pid": os.getpid()}

    def supervised(label: str, argv: list[str], log: IO[str]) -> tuple[int, float | None]:
        """``argv`` under the supervisor; the check's and the metrics' stdout to ``out_path``, else to the log."""
        limit = job["run_timeout"] if label == "dvc exp run" else job["step_timeout"]
        log.write(f"$ {' '.join(argv)}\n")
        log.flush()
        command = [sys.executable, supervise.__file__, str(os.getpid()), str(attempt), str(limit), *argv]
        began = time.monotonic()
        with out_path.open("w", encoding="utf-8") as out:
            status = subprocess.run(
                command, cwd=clone if clone.exists() else attempt, env=env, stdin=subprocess.DEVNULL,
                stdout=out if label in ("check", "metrics") else log, stderr=log, check=False,
            ).returncode  # fmt: skip
        return status, limit if status == supervise.TIMED_OUT and time.monotonic() - began >= limit else None

    try:
        with log_path.open("w", encoding="utf-8") as log:
            for label, argv in [("check", ["git", "ls-remote", job["git_url"], exp_ref(job)]), *steps(job, str(clone))]:
                status, timed_out = supervised(label, argv, log)
                printed = out_path.read_text(encoding="utf-8")
                if label == "check" and not status and printed.strip():
                    log.write(f"{exp_ref(job)} is on {job['git_url']} already: an earlier attempt landed it.\n")
                    result.update(ok=True, earlier=True)
                    break
                if label == "metrics":  # for the progress line only: its failure fails nothing
                    with contextlib.suppress(ValueError):
                        result["metrics"] = json.loads(printed) if not status else {}
                elif status:
                    result.update(step=label, status=status, timed_out=timed_out)
                    break
            else:
                result["ok"] = True
    except Exception as exc:  # noqa: BLE001 - reported as what it is, also after a successful push
        result["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        result["seconds"] = time.monotonic() - start
        with contextlib.suppress(OSError):
            result["log"] = log_path.read_text(encoding="utf-8", errors="replace")
        supervise.remove_attempt(attempt)
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
