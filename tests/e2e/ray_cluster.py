"""A real multi-node Ray cluster on 127.0.0.1 for the sweep tests, with token authentication on.

``python -m tests.e2e.ray_cluster --port P --workers 2`` starts Ray's own multi-node test
cluster (``ray.cluster_utils.Cluster``: a head without CPUs for tasks and ``--workers``
nodes of one CPU each, every raylet and the GCS bound to 127.0.0.1), prints ``READY
<address>`` and runs until stdin closes or it gets SIGTERM, then shuts the cluster down.

Ray's ``ray start`` cannot do this here: it maps 127.0.0.1 to the machine's outward address
(see shared/RAY_NOTES.md), so its GCS listens on every interface. ``Cluster`` passes the
node address to the nodes as given. :func:`ray_cluster` runs the script in the background
with the token and temp folder set explicitly, so nothing depends on ``~/.ray``.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from tests.conftest import ROOT

LOOPBACK = "127.0.0.1"


@dataclass
class RayCluster:
    """A running loopback cluster: its address, the driver environment that reaches it, its process."""

    address: str
    env: dict[str, str]
    process: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)

    def processes(self) -> list[psutil.Process]:
        """Every process of the cluster (raylets, GCS, workers and what they started)."""
        try:
            return psutil.Process(self.process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []


@contextmanager
def ray_env(base: Path) -> Iterator[dict[str, str]]:
    """Token authentication with a token file of the test's own, and a short Ray temp folder
    (Ray's Unix socket paths must stay under about 100 characters), removed afterwards."""
    token = base / f"ray-token-{secrets.token_hex(4)}"
    token.write_text(secrets.token_hex(32), encoding="utf-8")
    token.chmod(0o600)
    tmp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    try:
        yield {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token), "RAY_TMPDIR": str(tmp)}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def ray_cluster(base: Path, port: int, workers: int = 2, timeout_s: float = 120) -> Iterator[RayCluster]:
    """Start the cluster in the background; stop it (and every process it started) afterwards."""
    with ray_env(base) as own:
        yield from _run_cluster(own, port, workers, timeout_s)


def _run_cluster(own: dict[str, str], port: int, workers: int, timeout_s: float) -> Iterator[RayCluster]:
    env = {**os.environ, **own}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    command = [sys.executable, "-m", "tests.e2e.ray_cluster", "--port", str(port), "--workers", str(workers)]
    process = subprocess.Popen(
        command,
        cwd=ROOT,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    cluster = RayCluster(f"{LOOPBACK}:{port}", own, process)
    ready = threading.Event()

    def read() -> None:
        for line in process.stdout or []:
            cluster.lines.append(line)
            if line.startswith("READY"):
                ready.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + timeout_s
        while not ready.wait(0.5):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the Ray test cluster did not start:\n" + "".join(cluster.lines))
        yield cluster
    finally:
        started = cluster.processes()
        if process.poll() is None and process.stdin:
            process.stdin.close()  # the script shuts the cluster down
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
        for leftover in psutil.wait_procs(started, timeout=10)[1]:
            leftover.kill()
        reader.join(timeout=5)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "node_ip_address": LOOPBACK,
            "gcs_server_port": args.port,
            "num_cpus": 0,  # experiments run on the worker nodes only
            "include_dashboard": False,
        },
    )
    for _ in range(args.workers):
        cluster.add_node(node_ip_address=LOOPBACK, num_cpus=1)
    print(f"READY {cluster.address}", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    while not stop.wait(0.5):
        pass
    cluster.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
