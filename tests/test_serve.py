"""``python -m pipeline.serve``: commands, loopback defaults, refusing busy ports, stopping the process group."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline import serve


def test_server_command_proxies_artifacts() -> None:
    command = serve.mlflow_command("server", "postgresql:///mlflow", "127.0.0.1", 5001, 2, "s3://bucket/mlflow")
    assert command[:4] == [sys.executable, "-m", "mlflow", "server"]
    assert command[command.index("--host") + 1] == "127.0.0.1"
    assert command[command.index("--port") + 1] == "5001"
    assert command[command.index("--backend-store-uri") + 1] == "postgresql:///mlflow"
    assert command[command.index("--artifacts-destination") + 1] == "s3://bucket/mlflow"
    assert "--serve-artifacts" in command
    assert command[command.index("--workers") + 1] == "2"


def test_ui_command_binds_what_it_is_given_with_one_worker() -> None:
    command = serve.mlflow_command("ui", "sqlite:////x/mlflow.db", "127.0.0.1", 5000, serve.UI_WORKERS)
    assert command[:4] == [sys.executable, "-m", "mlflow", "ui"]
    assert command[command.index("--host") + 1] == "127.0.0.1"
    assert command[command.index("--backend-store-uri") + 1] == "sqlite:////x/mlflow.db"
    assert command[command.index("--workers") + 1] == "1"  # one person's browser; starts twice as fast
    assert "--artifacts-destination" not in command


def test_child_env_turns_the_genai_job_runner_off_unless_asked() -> None:
    assert serve.child_env({})["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    env = serve.child_env({"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "true"})
    assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "true"


def test_both_modes_default_to_loopback() -> None:
    for mode in ("ui", "server"):
        args = serve.parser().parse_args([mode])
        assert args.host == "127.0.0.1" and args.port == 5000


def test_runs_link() -> None:
    assert serve.runs_link("http://127.0.0.1:5000/", "3") == (
        "http://127.0.0.1:5000/#/experiments/3/runs?workflowType=machine_learning"
    )
    assert serve.runs_link("http://127.0.0.1:5000", None) == "http://127.0.0.1:5000/"


def test_runs_link_to_a_study_opens_its_shared_view_in_chart_mode() -> None:
    link = serve.runs_link("http://127.0.0.1:5000", "3", "study-abc")
    assert link == (
        "http://127.0.0.1:5000/#/experiments/3/runs?workflowType=machine_learning"
        "&viewStateShareKey=study-abc&compareRunsMode=CHART"
    )
    # The UI ignores a shared view when the URL also has search parameters.
    assert "searchFilter" not in link and "orderBy" not in link


def test_ui_path_is_relative_and_keeps_model_training_mode() -> None:
    assert serve.ui_path("3", "runs/r1") == "#/experiments/3/runs/r1?workflowType=machine_learning"
    assert serve.ui_path("3", "models", a="b c") == "#/experiments/3/models?workflowType=machine_learning&a=b+c"


def test_study_view_charts_the_given_runs_accuracy_first_then_each_layer() -> None:
    view = serve.study_view(["p1", "c1", "c2"], depth=2)
    assert view["searchFilter"] == "attributes.run_id IN ('p1', 'c1', 'c2')"
    assert (view["orderByKey"], view["orderByAsc"], view["isAccordionReordered"]) == (
        "attributes.start_time",
        False,
        True,
    )
    assert view["runsHiddenMode"] == "SHOW_ALL"  # the UI's default charts the first 10 rows only
    sections = {s["uuid"]: s["name"].split(" · ")[0] for s in view["compareRunSections"]}
    assert list(sections.values()) == ["Model metrics", "grad_bias", "grad", "weight_change"]
    # A card's legend shows two or three runs: each section's name says where all of them are.
    assert all(s["name"].endswith(serve.LEGEND_HINT) for s in view["compareRunSections"])
    assert {s["columns"] for s in view["compareRunSections"]} == {2}
    charts = [(sections[c["metricSectionId"]], c["metricKey"]) for c in view["compareRunCharts"]]
    assert charts[:2] == [("Model metrics", "accuracy"), ("Model metrics", "test_accuracy")]
    assert charts[4:6] == [("grad_bias", "grad_bias/hidden_1"), ("grad_bias", "grad_bias/hidden_2")]
    assert {c["type"] for c in view["compareRunCharts"]} == {"LINE"}
    assert len({c["uuid"] for c in view["compareRunCharts"]}) == len(charts)


@pytest.mark.slow
def test_find_study_names_the_experiment_its_latest_report_and_view(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert serve.find_study(uri, "vanishing-gradient") == (None, None, None)
    client = MlflowClient(uri)
    exp = client.create_experiment("vanishing-gradient", artifact_location=(tmp_path / "a").as_uri())
    client.create_run(exp, start_time=1_000, run_name="report")
    assert serve.find_study(uri, "vanishing-gradient")[2] is None  # a report without a view: the plain table
    report = client.create_run(exp, start_time=2_000, run_name="report").info.run_id
    client.set_experiment_tag(exp, serve.SHARED_VIEW_TAG + serve.view_key(report), "{}")
    assert serve.find_study(uri, "vanishing-gradient") == (exp, report, serve.view_key(report))


def test_port_free() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        port = sock.getsockname()[1]
        assert not serve.port_free("127.0.0.1", port)
    assert serve.port_free("127.0.0.1", port)


def write_params(folder: Path) -> Path:
    params = folder / "params.yaml"
    params.write_text("tracking:\n  experiment: vanishing-gradient\n", encoding="utf-8")
    return params


def test_server_refuses_a_busy_port_without_starting_mlflow(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    started: list[object] = []
    monkeypatch.setattr(serve.subprocess, "Popen", lambda *a, **k: started.append(a))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        port = sock.getsockname()[1]
        rc = serve.main(["server", "--params", str(write_params(tmp_path)), "--port", str(port)])
    assert rc == 1 and not started
    assert "already in use" in caplog.text and "PORT=" in caplog.text


def test_ui_over_a_server_uri_points_at_the_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    monkeypatch.chdir(tmp_path)
    assert serve.main(["ui", "--params", str(write_params(tmp_path))]) == 1
    assert "http://127.0.0.1:5999" in caplog.text


def test_ui_without_a_store_says_to_run_the_pipeline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.chdir(tmp_path)
    caplog.set_level(logging.ERROR)
    assert serve.main(["ui", "--params", str(write_params(tmp_path))]) == 1
    assert "make repro" in caplog.text


def test_stop_group_stops_every_process_of_the_group() -> None:
    # A parent with a child that ignores nothing and a grandchild: like mlflow -> uvicorn -> workers.
    process = subprocess.Popen(["sh", "-c", "sleep 300 & sleep 300 & wait"], start_new_session=True)
    time.sleep(0.3)
    serve.stop_group(process, grace_s=5)
    assert process.poll() is not None
    with pytest.raises(ProcessLookupError):
        os.killpg(process.pid, 0)


def test_stop_group_after_the_parent_died_still_stops_its_workers() -> None:
    process = subprocess.Popen(["sh", "-c", "sleep 300 & exit 3"], start_new_session=True)
    process.wait(timeout=5)
    os.killpg(process.pid, 0)  # the orphaned worker is still in the group
    serve.stop_group(process, grace_s=5)
    with pytest.raises(ProcessLookupError):
        os.killpg(process.pid, 0)
