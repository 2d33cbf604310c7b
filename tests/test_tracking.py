"""The tracking module: store location, the preflight check, run states, concurrent SQLite writers."""

from __future__ import annotations

import http.server
import os
import re
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from pipeline import tracking
from tests.conftest import ROOT
from tests.helpers_data import serving, stalling_server, stopwatch

SEARCH = "/api/2.0/mlflow/experiments/search"


@pytest.fixture(autouse=True)
def _no_proxy_for_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
        monkeypatch.delenv(name, raising=False)


@contextmanager
def answering(status: int, body: bytes, content_type: str = "application/json") -> Iterator[tuple[str, list[str]]]:
    """A loopback HTTP server that answers every GET with ``status`` and ``body``; yields (URL, paths)."""
    hits: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            hits.append(self.path)
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    with serving(http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)) as port:
        yield f"http://127.0.0.1:{port}", hits


def closed_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ------------------------------------------------------------------------ location
def test_default_uri_is_sqlite_at_the_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.tracking_uri(tmp_path) == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking.tracking_uri(tmp_path) == "http://127.0.0.1:5000"


def test_queued_experiment_copies_log_to_the_workspace(tmp_path: Path) -> None:
    copy = tmp_path / ".dvc" / "tmp" / "exps" / "run" / "abc123"
    copy.mkdir(parents=True)
    assert tracking.project_root(copy) == tmp_path.resolve()


# ------------------------------------------------------------------------ preflight
def test_preflight_accepts_a_tracking_api(monkeypatch: pytest.MonkeyPatch) -> None:
    with answering(200, b'{"experiments": []}') as (url, hits):
        tracking.preflight(url, timeout_s=2, attempts=1)
    assert hits == [f"{SEARCH}?max_results=1"]


def test_preflight_refused_port_fails_fast_and_says_what_to_do() -> None:
    uri = f"http://127.0.0.1:{closed_port()}"
    with stopwatch() as elapsed, pytest.raises(tracking.TrackingError) as err:
        tracking.preflight(uri, timeout_s=2, attempts=3)
    assert elapsed() < 10, "bounded retries, not MLflow's minutes of back-off"
    message = str(err.value)
    assert uri in message and "connection refused" in message
    assert "make server" in message and "MLFLOW_TRACKING_URI" in message


def test_preflight_stalling_server_is_bounded_by_the_timeout() -> None:
    with stalling_server() as uri, stopwatch() as elapsed, pytest.raises(tracking.TrackingError) as err:
        tracking.preflight(uri, timeout_s=0.5, attempts=2)
    # 2 attempts x 0.5 s + 0.5 s back-off; generous bound for slow machines.
    assert elapsed() < 10
    assert "no answer within 0.5 s" in str(err.value) and uri in str(err.value)


@pytest.mark.parametrize(
    ("status", "body", "content_type", "expected"),
    [
        (404, b"<html>not found</html>", "text/html", "does not look like an MLflow tracking server"),
        (200, b"<html>some other app</html>", "text/html", "does not look like an MLflow tracking server"),
        (401, b"", "text/plain", "MLFLOW_TRACKING_USERNAME"),
        (403, b"", "text/plain", "MLFLOW_TRACKING_TOKEN"),
        (500, b'{"error_code": "INTERNAL_ERROR"}', "application/json", "backend store"),
    ],
)
def test_preflight_misconfigured_server(status: int, body: bytes, content_type: str, expected: str) -> None:
    with answering(status, body, content_type) as (url, _), stopwatch() as elapsed:
        with pytest.raises(tracking.TrackingError) as err:
            tracking.preflight(url, timeout_s=2, attempts=2)
        assert elapsed() < 15
    assert expected in str(err.value) and url in str(err.value)


def test_preflight_file_store_is_refused(tmp_path: Path) -> None:
    for uri in (str(tmp_path / "mlruns"), f"file://{tmp_path / 'mlruns'}"):
        with pytest.raises(tracking.TrackingError, match="filesystem tracking backend"):  # MLflow's own refusal
            tracking.preflight(uri)


def test_preflight_sqlite_folder_missing(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'nope' / 'mlflow.db'}"
    with pytest.raises(tracking.TrackingError, match="missing or not writable"):
        tracking.preflight(uri)


def test_preflight_leaves_a_new_sqlite_store_to_open_store(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking.preflight(uri)
    assert list(tmp_path.iterdir()) == [], "a stage that fails after preflight must leave no store"
    tracking.open_store(uri)
    with sqlite3.connect(tmp_path / "mlflow.db") as db:
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"experiments", "runs", "metrics"} <= tables


def test_preflight_corrupt_sqlite_store(tmp_path: Path) -> None:
    (tmp_path / "mlflow.db").write_bytes(b"this is not a database" * 100)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.raises(tracking.TrackingError) as err:
        tracking.preflight(uri)
    assert uri in str(err.value) and "cannot be opened" in str(err.value)


def test_preflight_unknown_scheme() -> None:
    with pytest.raises(tracking.TrackingError, match=re.escape("htpp://127.0.0.1:5000")):
        tracking.preflight("htpp://127.0.0.1:5000", timeout_s=2, attempts=1)


def test_store_lock_held_elsewhere_times_out_clearly(tmp_path: Path) -> None:
    import fcntl

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with (tmp_path / "mlflow.db-lock").open("a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with stopwatch() as elapsed, pytest.raises(tracking.TrackingError, match="another process"):
            tracking.open_store(uri, lock_timeout_s=0.3)
        assert elapsed() < 5
    tracking.open_store(uri, lock_timeout_s=0.3)  # released: opens


# ------------------------------------------------------------------------ run states
class FakeClient:
    def __init__(self) -> None:
        self.created: list[str] = []
        self.ended: dict[str, str] = {}

    def create_run(self, experiment_id: str, tags: dict[str, str], run_name: str) -> Any:
        self.created.append(run_name)
        info = type("Info", (), {"run_id": f"id-{run_name}"})
        return type("Run", (), {"info": info})

    def set_terminated(self, run_id: str, status: str) -> None:
        self.ended[run_id] = status


def test_run_set_finished() -> None:
    client = FakeClient()
    with tracking.run_set(client, "1", ["a", "b"], {}) as runs:
        assert runs.run_ids == ["id-a", "id-b"]
    assert client.ended == {"id-a": "FINISHED", "id-b": "FINISHED"}


def test_run_set_failed_on_exception() -> None:
    client = FakeClient()
    with pytest.raises(ValueError, match="boom"), tracking.run_set(client, "1", ["a", "b"], {}):
        raise ValueError("boom")
    assert client.ended == {"id-a": "FAILED", "id-b": "FAILED"}


def test_run_set_killed_on_ctrl_c() -> None:
    client = FakeClient()
    with pytest.raises(KeyboardInterrupt), tracking.run_set(client, "1", ["a"], {}):
        raise KeyboardInterrupt
    assert client.ended == {"id-a": "KILLED"}


def _handlers() -> dict[int, Any]:
    return {sig: signal.getsignal(sig) for sig in tracking.StopSignals.SIGNALS}


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_run_set_defers_a_signal_to_the_next_check_then_ends_the_runs_killed(signum: int) -> None:
    client = FakeClient()
    before = _handlers()
    with pytest.raises(tracking.RunInterrupted) as info, tracking.run_set(client, "1", ["a", "b"], {}) as runs:
        os.kill(os.getpid(), signum)
        time.sleep(0.05)  # Python runs the handler at the next bytecode: it only records
        assert runs.stop.signum == signum
        assert client.ended == {}
        runs.stop.check()
        pytest.fail("check() did not raise")
    assert info.value.exit_status == 128 + signum and not info.value.finished
    assert client.ended == {"id-a": "KILLED", "id-b": "KILLED"}
    assert _handlers() == before


def test_run_set_second_signal_raises_at_once() -> None:
    client = FakeClient()
    with pytest.raises(tracking.RunInterrupted), tracking.run_set(client, "1", ["a"], {}):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)
        pytest.fail("the second signal did not raise")
    assert client.ended == {"id-a": "KILLED"}


def test_run_set_signal_after_the_last_check_finishes_the_runs_then_stops() -> None:
    """The runs are complete, so FINISHED; the process still stops, so DVC goes no further."""
    client = FakeClient()
    with pytest.raises(tracking.RunInterrupted) as info, tracking.run_set(client, "1", ["a"], {}):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
    assert info.value.finished and info.value.exit_status == 130
    assert client.ended == {"id-a": "FINISHED"}


# ------------------------------------------------------------------ concurrent writers
WRITER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from pipeline import tracking
    from mlflow.entities import Metric

    uri, go, name = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    Path(str(go) + "." + name).touch()  # ready: imports done
    while not go.exists():
        time.sleep(0.005)
    tracking.preflight(uri)
    client = tracking.open_store(uri)
    experiment = tracking.ensure_experiment(client, "stress", Path(sys.argv[4]))
    with tracking.run_set(client, experiment, [f"{name}-0", f"{name}-1"], {"writer": name}) as runs:
        for epoch in range(1, 16):  # what callbacks.MlflowLogger sends: one batch per run and flush
            now = int(time.time() * 1000)
            for run_id in runs.run_ids:
                metrics = [Metric(f"m{k}", float(epoch), now, epoch) for k in range(20)]
                client.log_batch(run_id, metrics=metrics, synchronous=True)
    print("done", name)
    """
)


@pytest.mark.slow
def test_concurrent_writers_share_a_new_sqlite_store(tmp_path: Path) -> None:
    """Several stages opening one new SQLite store at once (``dvc queue start -j N``): MLflow
    creates the schema unguarded, so without the lock in ``open_store`` most of them fail with
    "table ... already exists" or "database is locked"."""
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    go = tmp_path / "go"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["PYTHONPATH"] = str(ROOT)
    names = [f"w{i}" for i in range(4)]
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), uri, str(go), name, str(tmp_path)],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for name in names
    ]
    try:
        deadline = time.monotonic() + 120
        while not all(Path(f"{go}.{n}").exists() for n in names):
            assert time.monotonic() < deadline, "writers did not start"
            assert all(p.poll() is None for p in procs), [p.communicate()[0] for p in procs]
            time.sleep(0.05)
        go.touch()  # all at once
        outputs = [p.communicate(timeout=180)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out
        assert "database is locked" not in out
    with sqlite3.connect(tmp_path / "mlflow.db") as db:
        runs = db.execute("SELECT status, COUNT(*) FROM runs GROUP BY status").fetchall()
        metrics = db.execute("SELECT COUNT(*) FROM metrics").fetchone()[0]
        experiments = db.execute("SELECT COUNT(*) FROM experiments WHERE name = 'stress'").fetchone()[0]
    assert runs == [("FINISHED", 8)]
    assert metrics == 8 * 15 * 20
    assert experiments == 1


def test_run_set_that_cannot_mark_its_runs_fails_loudly() -> None:
    class Unreachable(FakeClient):
        def set_terminated(self, run_id: str, status: str) -> None:
            if run_id == "id-a":
                raise ConnectionError("store went away")
            super().set_terminated(run_id, status)

    client = Unreachable()
    with (
        pytest.raises(tracking.TrackingError, match=r"id-a as FINISHED; they stay RUNNING"),
        tracking.run_set(client, "1", ["a", "b"], {}),
    ):
        pass
    assert client.ended == {"id-b": "FINISHED"}  # the others were still marked


# ------------------------------------------------------------------------- lineage
def _project(tmp_path: Path, params: str) -> tuple[Path, Path]:
    code = tmp_path / "pipeline"
    code.mkdir(exist_ok=True)
    (code / "train.py").write_text("EPOCHS = 1\n")
    (tmp_path / "params.yaml").write_text(params)
    return code, tmp_path / "params.yaml"


def test_study_digest_is_code_and_parsed_params(tmp_path: Path) -> None:
    code, params = _project(tmp_path, "train: {epochs: 3}\n")
    base = tracking.study_digest(code, params)
    params.write_text("# a comment\ntrain:\n  epochs: 3   # same study\n")
    assert tracking.study_digest(code, params) == base  # layout and comments are not the study
    (tmp_path / "results.csv").write_text("rewritten by a stage")  # outputs are not the study either
    assert tracking.study_digest(code, params) == base
    params.write_text("train: {epochs: 4}\n")
    assert tracking.study_digest(code, params) != base
    params.write_text("train: {epochs: 3}\n")
    (code / "train.py").write_text("EPOCHS = 2\n")
    assert tracking.study_digest(code, params) != base


def test_execution_id_is_shared_by_the_children_of_one_parent() -> None:
    child = [sys.executable, "-c", "from pipeline import tracking; print(tracking.execution_id())"]
    env = {k: v for k, v in os.environ.items() if k != tracking.EXECUTION_ENV}
    twice = "import subprocess, sys; [subprocess.run(sys.argv[1:], check=True) for _ in range(2)]"
    first = subprocess.run([sys.executable, "-c", twice, *child], capture_output=True, text=True, env=env, cwd=ROOT)
    second = subprocess.run([sys.executable, "-c", twice, *child], capture_output=True, text=True, env=env, cwd=ROOT)
    a, b = first.stdout.split(), second.stdout.split()
    assert len(a) == 2 and a[0] == a[1]  # two stages of one `dvc repro`
    assert b[0] == b[1] and b[0] != a[0]  # another `dvc repro`: another execution
    assert tracking.execution_id() != a[0]
    pinned = subprocess.run(child, capture_output=True, text=True, env=env | {"PIPELINE_EXECUTION": "x1"}, cwd=ROOT)
    assert pinned.stdout.strip() == "x1"


@pytest.mark.parametrize(
    ("uri", "shown"),
    [
        ("http://alice:s3cret@mlflow.example.org:5000/", "http://alice:***@mlflow.example.org:5000/"),
        ("postgresql+psycopg2://bob:pw@db/mlflow", "postgresql+psycopg2://bob:***@db/mlflow"),
        ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
        ("sqlite:////work/mlflow.db", "sqlite:////work/mlflow.db"),
    ],
)
def test_redact_hides_passwords(uri: str, shown: str) -> None:
    assert tracking.redact(uri) == shown
