"""Run one command in a process group of its own, and take the whole group down with its parent.

Usage: ``python supervise.py PARENT_PID CLEANUP_DIR COMMAND...`` (a sweep's worker runs this
file's source with ``python -c``, so it needs nothing but the standard library).

A Ray worker can die at any point: cancelled with force (Ctrl-C on the driver), killed by
the out-of-memory killer, or with its node. The kernel then sends this process SIGTERM
(``PR_SET_PDEATHSIG``), and it passes SIGTERM to the command's process group: ``dvc exp
run`` and the training stage under it, which ends its MLflow runs KILLED at the end of
the epoch. It waits until the group is gone (SIGKILL after a grace period), removes
``CLEANUP_DIR`` (the attempt's clone) when it was stopped that way, and exits with the
command's status (128 + signal number for a signal).
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

PR_SET_PDEATHSIG = 1
GRACE_S = 120.0


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def main(argv: list[str]) -> int:
    parent, cleanup, command = int(argv[0]), argv[1], argv[2:]
    with contextlib.suppress(OSError, AttributeError):  # not Linux: no parent-death signal
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the parent died before prctl took effect
        return 128 + signal.SIGTERM
    child = subprocess.Popen(command, start_new_session=True)
    stopped: list[int] = []

    def forward(signum: int, frame: object) -> None:
        stopped.append(signum)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGTERM)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    status = child.wait()
    if not stopped:
        return status if status >= 0 else 128 - status
    deadline = time.monotonic() + GRACE_S
    while _group_alive(child.pid):  # dvc exits at once; training ends its runs at the end of the epoch
        if time.monotonic() > deadline:
            os.killpg(child.pid, signal.SIGKILL)
            break
        time.sleep(0.2)
    shutil.rmtree(cleanup, ignore_errors=True)
    return 128 + stopped[0]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
