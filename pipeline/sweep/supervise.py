"""Run one command of a sweep's task so that it outlives neither the task nor its time limit.

``python supervise.py WORKER_PID CLEANUP_DIR TIMEOUT_S COMMAND...`` (standard library only). Ray
SIGKILLs a dead worker's direct children, not theirs: ``dvc exp run`` and training would go on. So
this *launcher* forks a *guard* in a session of its own, out of Ray's reach, and relays its status.
The guard runs the command in a new session and SIGTERMs that group (SIGKILL after a grace period;
training ends its MLflow runs KILLED at the end of the epoch) when the launcher dies
(``PR_SET_PDEATHSIG``), the worker is gone (polled) or on SIGTERM/SIGINT/SIGHUP: then it removes
``CLEANUP_DIR`` (the attempt's clone) and exits 128 + the signal; past ``TIMEOUT_S``: it says so on
stderr and exits 124, the worker cleaning up. Else it exits with the command's status.
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
POLL_S = 0.5
GRACE_S = 120.0
TIMED_OUT = 124  # as coreutils' timeout


def alive(pid: int) -> bool:
    """Whether process ``pid`` exists (a zombie counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text(encoding="ascii").rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):  # no /proc: not Linux
        try:
            with contextlib.suppress(PermissionError):  # another user's process
                os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True


def remove_attempt(folder: str | Path) -> None:
    """Remove an attempt's folder, and the sweep's folder above it when that was its last attempt here."""
    shutil.rmtree(folder, ignore_errors=True)
    with contextlib.suppress(OSError):
        Path(folder).parent.rmdir()


def guard(worker: int, launcher: int, cleanup: str, timeout_s: float, command: list[str]) -> int:
    """Run ``command`` in a new session; stop its group when the launcher or worker is gone, or past ``timeout_s``."""
    with contextlib.suppress(OSError, AttributeError):  # not Linux: polling only
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    stopped: list[int] = []
    child: subprocess.Popen[bytes] | None = None

    def stop(signum: int, frame: object = None) -> None:
        if not stopped:
            stopped.append(signum)
        if child is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGTERM)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, stop)
    if os.getppid() != launcher or not alive(worker):  # gone before the guard was in place
        return 128 + signal.SIGTERM
    child = subprocess.Popen(command, start_new_session=True)
    deadline = time.monotonic() + timeout_s
    while child.poll() is None:
        if not stopped and not alive(worker):
            stop(signal.SIGTERM)
        elif not stopped and time.monotonic() > deadline:
            print(f"timed out after {timeout_s:g} s: stopping {' '.join(command)}", file=sys.stderr, flush=True)
            stop(0)  # 0: the time limit, not a signal
        time.sleep(POLL_S)
    if not stopped:
        return child.returncode if child.returncode >= 0 else 128 - child.returncode
    deadline = time.monotonic() + GRACE_S
    while time.monotonic() < deadline:  # dvc exits at once; training ends its runs at the end of the epoch
        try:
            os.killpg(child.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:  # the grace period is over
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)
    if stopped[0] == 0:
        return TIMED_OUT
    remove_attempt(cleanup)
    return 128 + stopped[0]


def main(argv: list[str]) -> int:
    worker, cleanup, timeout_s, command = int(argv[0]), argv[1], float(argv[2]), argv[3:]
    launcher = os.getpid()
    pid = os.fork()
    if pid == 0:  # the guard
        os.setsid()
        code = 1
        try:
            code = guard(worker, launcher, cleanup, timeout_s, command)
        finally:
            os._exit(code)
    # The launcher installs no signal handlers, so waitpid is retried on EINTR (PEP 475).
    code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
