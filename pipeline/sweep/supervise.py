"""Run one command of a sweep's task so that it outlives neither the task nor its time limit.

``python supervise.py WORKER_PID CLEANUP_DIR TIMEOUT_S COMMAND...`` (standard library, Linux). Ray
SIGKILLs a dead worker's direct children, not theirs: ``dvc exp run`` and training would go on. So
this *launcher*, killed with the worker (``PR_SET_PDEATHSIG``), forks a *guard* in a session of its
own, out of Ray's reach, killed with the launcher in turn. The guard runs the command in a new
session and stops that group on SIGTERM/SIGINT/SIGHUP (then removes ``CLEANUP_DIR``, the attempt's
clone, and exits 128 + the signal) or past ``TIMEOUT_S`` (exit 124; the worker cleans up).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

PR_SET_PDEATHSIG = 1
GRACE_S = 120.0  # dvc exits at once; training ends its MLflow runs KILLED at the end of the epoch
TIMED_OUT = 124  # as coreutils' timeout


def die_with_parent(parent: int, signum: int) -> bool:
    """Have the kernel send ``signum`` when the parent dies; False if ``parent`` is gone already."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signum)
    return os.getppid() == parent


def remove_attempt(folder: str | Path) -> None:
    """Remove an attempt's folder, and the sweep's folder above it when that was its last attempt here."""
    shutil.rmtree(folder, ignore_errors=True)
    with contextlib.suppress(OSError):
        Path(folder).parent.rmdir()


def guard(cleanup: str, timeout_s: float, command: list[str]) -> int:
    """Run ``command`` in a new session; stop its whole group on a signal or past ``timeout_s``."""
    stopped: list[int] = []
    child: subprocess.Popen[bytes] | None = None

    def stop(signum: int, frame: object = None) -> None:
        stopped.append(signum)
        if child is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGTERM)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, stop)
    if stopped:  # before the command started
        return 128 + stopped[0]
    child = subprocess.Popen(command, start_new_session=True)
    if stopped:  # while it started
        stop(stopped[0])
    deadline = time.monotonic() + timeout_s
    while child.poll() is None and not stopped:
        if time.monotonic() > deadline:
            print(f"timed out after {timeout_s:g} s: stopping {' '.join(command)}", file=sys.stderr, flush=True)
            stop(0)  # 0: the time limit, not a signal
        time.sleep(0.2)
    if not stopped:
        return child.returncode if child.returncode >= 0 else 128 - child.returncode
    grace = time.monotonic() + GRACE_S
    while True:  # until the whole group is gone, SIGKILLed past the grace period
        child.poll()  # a zombie would count in its group
        try:
            os.killpg(child.pid, signal.SIGKILL if time.monotonic() > grace else 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    if stopped[0] == 0:
        return TIMED_OUT
    remove_attempt(cleanup)
    return 128 + stopped[0]


def main(argv: list[str]) -> int:
    worker, cleanup, timeout_s, command = int(argv[0]), argv[1], float(argv[2]), argv[3:]
    if not die_with_parent(worker, signal.SIGKILL):
        return 128 + signal.SIGKILL
    launcher = os.getpid()
    pid = os.fork()
    if pid == 0:  # the guard
        code = 1
        try:
            os.setsid()
            code = guard(cleanup, timeout_s, command) if die_with_parent(launcher, signal.SIGTERM) else 143
        finally:
            os._exit(code)
    # The launcher installs no signal handlers, so waitpid is retried on EINTR (PEP 475).
    code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
