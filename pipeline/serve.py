"""Start the MLflow UI over the project's store (``ui``) or a tracking server (``server``).

Both bind 127.0.0.1 unless told otherwise, print the direct link to the experiment's
training runs (MLflow 3's start page is a GenAI overview that hides them), and run
MLflow in its own process group so that Ctrl-C or SIGTERM stops MLflow and all of its
worker processes, not just the parent.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from pipeline import tracking
from pipeline.params import ParamsError, TrackingParams, load_section

log = logging.getLogger("pipeline.serve")

SERVER_DIR = "mlserver"


def runs_link(base_url: str, experiment_id: str | None) -> str:
    """Direct link to an experiment's training-runs table (or the UI root)."""
    base = base_url.rstrip("/")
    return f"{base}/#/experiments/{experiment_id}/runs" if experiment_id else f"{base}/"


def ui_command(store_uri: str, host: str, port: int) -> list[str]:
    """``mlflow ui`` over an existing store."""
    return [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", store_uri, "--host", host, "--port", str(port)]


def server_command(root: Path, host: str, port: int, backend_uri: str | None, artifacts: str | None) -> list[str]:
    """``mlflow server`` with a SQL backend and proxied artifacts (clients never touch the artifact store)."""
    backend_uri = backend_uri or f"sqlite:///{root / SERVER_DIR / 'mlflow.db'}"
    artifacts = artifacts or str(root / SERVER_DIR / "artifacts")
    return [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", backend_uri,
        "--artifacts-destination", artifacts,
        "--serve-artifacts",
        "--host", host,
        "--port", str(port),
    ]  # fmt: skip


def experiment_id(store_uri: str, name: str) -> str | None:
    """Id of experiment ``name`` in the store, or None when it does not exist yet."""
    try:
        experiment = tracking.make_client(store_uri).get_experiment_by_name(name)
    except Exception:  # noqa: BLE001 - an empty or new store is not an error for a viewer
        return None
    return None if experiment is None else str(experiment.experiment_id)


def wait_until_up(url: str, process: subprocess.Popen[bytes], timeout_s: float = 60.0) -> bool:
    """Poll ``url``/health until it answers 200, the process dies, or ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=2) as resp:  # noqa: S310 (loopback URL we built)
                if resp.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.3)
    return False


def stop_group(process: subprocess.Popen[bytes], grace_s: float = 10.0) -> None:
    """Terminate MLflow and every worker it started (they share its process group)."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    except ProcessLookupError:
        pass


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mode", choices=["ui", "server"])
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--backend-store-uri", default=None, help="server: SQL backend (default: mlserver/mlflow.db)")
    p.add_argument("--artifacts-destination", default=None, help="server: artifact store (default: mlserver/artifacts)")
    args = p.parse_args(argv)
    try:
        track: TrackingParams = load_section("tracking", args.params)
    except ParamsError as exc:
        log.error("%s", exc)
        return 1
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("binding %s exposes the store to the network; MLflow has no authentication here", args.host)
    root = tracking.project_root()
    base = f"http://{args.host}:{args.port}"
    if args.mode == "ui":
        store = tracking.tracking_uri(root)
        if store.startswith("sqlite:///") and not Path(store.removeprefix("sqlite:///")).exists():
            log.error("no MLflow store at %s yet: run `make repro` first", store)
            return 1
        command = ui_command(store, args.host, args.port)
        exp_id = experiment_id(store, track.experiment)
    else:
        (root / SERVER_DIR).mkdir(exist_ok=True)
        command = server_command(root, args.host, args.port, args.backend_store_uri, args.artifacts_destination)
        exp_id = None
    process = subprocess.Popen(command, start_new_session=True)
    try:
        if not wait_until_up(base, process):
            log.error("MLflow did not start on %s (is the port in use? try PORT=5001)", base)
            return 1
        if args.mode == "server":
            log.info("Tracking server: %s\nLog the pipeline to it with:  MLFLOW_TRACKING_URI=%s make repro", base, base)
        log.info("Training runs: %s\n(Ctrl-C to stop)", runs_link(base, exp_id))
        return process.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        stop_group(process)


if __name__ == "__main__":
    raise SystemExit(main())
