"""``dvc repro`` logging to a real MLflow tracking server (``python -m pipeline.serve server``).

One server with a SQLite backend, one with PostgreSQL. The PostgreSQL test uses
``TEST_POSTGRES_URI`` (default ``postgresql+psycopg2:///mlflow_test?host=/var/run/postgresql``:
the current user over the Unix socket, which ``.ci/run`` sets up); it starts a local cluster
when it is down and skips, saying why, only where PostgreSQL cannot be started. SQLAlchemy 2.1
maps a bare ``postgresql://`` to psycopg 3, which is not installed: the driver is named.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.e2e.conftest import BIN, clean_env, run, start_background
from tests.test_trainlog import race_twins

pytestmark = pytest.mark.slow

DEFAULT_POSTGRES_URI = "postgresql+psycopg2:///mlflow_test?host=/var/run/postgresql"
EXPERIMENT = "vanishing-gradient"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@contextmanager
def mlflow_server(project: Path, args: list[str] | None = None) -> Iterator[str]:
    """An MLflow tracking server on a free loopback port, stopped with SIGTERM, which must take
    MLflow's whole process group down (the port is free afterwards).

    ``args`` None: ``make server`` (the project's defaults: SQLite and artifacts under mlserver/),
    stopped by a SIGTERM to ``make`` alone, which does not pass it on: serve must notice that its
    parent died. Otherwise ``python -m pipeline.serve server <args>``, stopped by a SIGTERM to it.
    """
    port = free_port()
    if args is None:
        command = ["make", "--no-print-directory", "-o", ".venv/.installed", "server", f"PORT={port}", f"BIN={BIN}"]
    else:
        command = [sys.executable, "-m", "pipeline.serve", "server", "--port", str(port), "--workers", "1", *args]
    process, lines, reader = start_background(command, project)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert process.poll() is None, "server exited:\n" + "".join(lines)
            assert time.monotonic() < deadline, "server did not come up:\n" + "".join(lines)
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            time.sleep(0.5)
        yield url
    finally:
        # MLflow runs in a process group of its own: remember every process to clean up after a failure.
        started = psutil.Process(process.pid).children(recursive=True) if process.poll() is None else []
        process.terminate()  # SIGTERM to make, or to serve
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            raise
        deadline = time.monotonic() + 30
        while port_open(port):
            if time.monotonic() > deadline:
                for leftover in psutil.wait_procs(started, timeout=0)[1]:
                    leftover.kill()
                pytest.fail(f"MLflow still listens on {port} after its launcher stopped\n" + "".join(lines))
            time.sleep(0.2)
        reader.join(timeout=10)


def assert_pipeline_logged(project: Path, url: str) -> list[Any]:
    """Every training run of results/*/run.json is on the server, FINISHED, with per-epoch metrics
    and artifacts that download through the server; the report's run too. Returns the runs."""
    from mlflow import MlflowClient

    assert not (project / "mlflow.db").exists(), "logged to the local store instead of the server"
    assert not (project / "mlartifacts").exists(), "artifacts written locally instead of through the server"
    client = MlflowClient(url)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    assert experiment is not None
    assert experiment.artifact_location.startswith("mlflow-artifacts:"), "artifacts are proxied by the server"
    runs = {r.info.run_id: r for r in client.search_runs([experiment.experiment_id])}
    assert {r.info.status for r in runs.values()} == {"FINISHED"}

    run_files = sorted((project / "results").glob("*/run.json"))
    assert run_files
    training_ids = set()
    for run_file in run_files:
        info = json.loads(run_file.read_text())
        assert info["tracking_uri"] == url
        training_ids.add(info["parent_run"])  # the variant's run, its seeds nested under it
        epochs = json.loads((run_file.parent / "metrics.json").read_text())["epochs"]
        for run_id in info["runs"].values():
            training_ids.add(run_id)
            r = runs[run_id]
            history = client.get_metric_history(run_id, "accuracy")
            assert [m.step for m in history] == list(range(1, epochs + 1))
            gradients = client.get_metric_history(run_id, "grad_bias/hidden_1")
            assert [m.step for m in gradients] == list(range(1, epochs + 1))
            artifacts = {a.path for a in client.list_artifacts(run_id)}
            assert "history.csv" in artifacts
            assert r.data.tags["dvc.stage"].split("@")[0] in ("train", "remedy")
        # An artifact downloaded through the server is the file the stage wrote.
        scratch = project.parent / f"download-{uuid.uuid4().hex[:6]}"
        scratch.mkdir()
        seed, run_id = next(iter(info["runs"].items()))
        got = client.download_artifacts(run_id, "history.csv", str(scratch))
        rows = [line for line in (run_file.parent / "history.csv").read_text().splitlines()[1:]]
        assert Path(got).read_text().splitlines()[1:] == [r for r in rows if r.split(",")[0] == seed]
        shutil.rmtree(scratch)
    reports = [r for r in runs.values() if r.info.run_name == "report"]
    assert len(reports) == 1
    assert "index.html" in {a.path for a in client.list_artifacts(reports[0].info.run_id)}
    assert set(runs) == training_ids | {reports[0].info.run_id}
    return list(runs.values())


def one_variant(params: dict[str, Any]) -> None:
    """The small profile cut to one variant: the server and its backend are what is tested here."""
    params["grid"]["depth"] = [1]
    params["remedies"] = {}


def test_repro_logs_to_a_sqlite_backed_server(make_project) -> None:
    """``make server`` (SQLite and artifacts under mlserver/), then
    ``MLFLOW_TRACKING_URI=<server> dvc repro`` of the small profile, cut to one variant."""
    project = make_project(one_variant)
    with mlflow_server(project) as url:
        result = run(["dvc", "repro"], project, env=clean_env(MLFLOW_TRACKING_URI=url))
        assert "Running stage 'report'" in result.stdout
        runs = assert_pipeline_logged(project, url)
        # Nothing changed: nothing runs and the server gets no new run.
        again = run(["dvc", "repro"], project, env=clean_env(MLFLOW_TRACKING_URI=url))
        assert "Running stage" not in again.stdout
        from mlflow import MlflowClient

        client = MlflowClient(url)
        experiment = client.get_experiment_by_name(EXPERIMENT)
        assert len(client.search_runs([experiment.experiment_id])) == len(runs)
        # Experiments side by side log one dataset at once: none fails on its twin's write.
        assert race_twins(url) == []
    # The server's own store and artifact folder, as `make server` sets them up.
    assert (project / "mlserver" / "mlflow.db").is_file()
    assert list((project / "mlserver" / "artifacts").rglob("history.csv"))


# ---------------------------------------------------------------------------- PostgreSQL
def _connect_error(uri: str) -> str | None:
    """None when ``uri`` accepts a connection, else why not."""
    import sqlalchemy

    engine = sqlalchemy.create_engine(uri, connect_args={"connect_timeout": 5})
    try:
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text("SELECT 1"))
    except Exception as exc:  # noqa: BLE001 - any failure is reported as the reason
        return str(exc).strip().splitlines()[0]
    finally:
        engine.dispose()
    return None


SETUP_SQL = """
SELECT format('CREATE ROLE %I LOGIN CREATEDB', :'role')
WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'role')\\gexec
SELECT format('CREATE DATABASE mlflow_test OWNER %I', :'role')
WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'mlflow_test')\\gexec
"""


def with_psycopg2(uri: str) -> str:
    """``postgresql://`` or ``postgres://`` -> ``postgresql+psycopg2://`` (the pinned driver)."""
    for bare in ("postgresql://", "postgres://"):
        if uri.startswith(bare):
            return "postgresql+psycopg2://" + uri.removeprefix(bare)
    return uri


def _start_local_postgres() -> str | None:
    """Start Debian's PostgreSQL clusters and create the default role and database, as .ci/run
    does. None on success, else why it cannot be started."""
    if shutil.which("pg_lsclusters") is None:
        return "PostgreSQL is not installed (apt-get install postgresql, or run .ci/run)"
    if os.geteuid() != 0:
        return "PostgreSQL is down and starting it needs root (run .ci/run)"
    clusters = subprocess.run(["pg_lsclusters", "-h"], capture_output=True, text=True, check=False).stdout
    for line in clusters.splitlines():
        version, name, _, status, *_ = line.split()
        if not status.startswith("online"):
            started = subprocess.run(
                ["pg_ctlcluster", version, name, "start"], capture_output=True, text=True, check=False
            )
            if started.returncode != 0:
                return f"pg_ctlcluster {version} {name} start failed: {started.stderr.strip()}"
    if not clusters.strip():
        return "PostgreSQL has no cluster (pg_createcluster, or run .ci/run)"
    role = subprocess.run(["id", "-un"], capture_output=True, text=True, check=True).stdout.strip()
    setup = subprocess.run(
        ["runuser", "-u", "postgres", "--", "psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-v", f"role={role}"],
        input=SETUP_SQL,
        capture_output=True,
        text=True,
        check=False,
    )
    if setup.returncode != 0:
        return f"creating the test role and database failed: {setup.stderr.strip()}"
    return None


@pytest.fixture
def postgres_database() -> Iterator[str]:
    """A new, empty database on the test server (dropped afterwards); yields its URI."""
    import sqlalchemy

    explicit = os.environ.get("TEST_POSTGRES_URI")
    uri = with_psycopg2(explicit or DEFAULT_POSTGRES_URI)
    error = _connect_error(uri)
    if error and not explicit:
        why_not = _start_local_postgres()
        error = _connect_error(uri) if why_not is None else f"{error}; {why_not}"
    if error:
        if explicit:
            pytest.fail(f"TEST_POSTGRES_URI is set but PostgreSQL does not accept it: {error}")
        message = f"PostgreSQL cannot be started or reached at {uri}: {error}"
        print(f"SKIP: {message}")
        pytest.skip(message)
    name = f"mlflow_e2e_{uuid.uuid4().hex[:10]}"
    admin = sqlalchemy.create_engine(uri, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
        yield sqlalchemy.make_url(uri).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def test_repro_logs_to_a_postgres_backed_server(make_project, postgres_database: str, tmp_path: Path) -> None:
    import sqlalchemy

    project = make_project(one_variant)
    args = ["--backend-store-uri", postgres_database, "--artifacts-destination", str(tmp_path / "artifacts")]
    with mlflow_server(project, args) as url:
        run(["dvc", "repro"], project, env=clean_env(MLFLOW_TRACKING_URI=url))
        runs = assert_pipeline_logged(project, url)
        race = race_twins(url)
    assert race == []
    # The runs are rows in PostgreSQL, not in some SQLite file.
    engine = sqlalchemy.create_engine(postgres_database)
    try:
        with engine.connect() as conn:
            pipeline_runs = (
                "SELECT run_uuid, status FROM runs WHERE experiment_id IN "
                "(SELECT experiment_id FROM experiments WHERE name = :name)"
            )
            rows = conn.execute(sqlalchemy.text(pipeline_runs), {"name": EXPERIMENT}).fetchall()
    finally:
        engine.dispose()
    assert sorted(rows) == sorted((r.info.run_id, "FINISHED") for r in runs)
