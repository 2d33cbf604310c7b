"""Publish stage: the report and the study's numbers into a real (SQLite) MLflow store, and its failures."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from pipeline import figures, publish, report, serve, tracking
from tests.synthetic_results import DEFAULT_STUDY, PARAMS, write_results

D1, D2, REMEDY = DEFAULT_STUDY
EXPERIMENT = "report-test"


def train_runs(client, experiment_id: str, results: Path, uri: str, names=(D1, D2)) -> None:
    """What the train stage leaves: per variant a parent run with a description and a run per seed,
    named in its ``run.json``. The other variants' run.json stay as written: runs of another store."""
    for name in names:
        info = json.loads((results / name / "run.json").read_text())
        parent = client.create_run(experiment_id, run_name=name, tags={tracking.NOTE_TAG: f"{name}: what it is."})
        seeds = {s: client.create_run(experiment_id, run_name=f"{name}-seed-{s}").info.run_id for s in info["runs"]}
        info.update(parent_run=parent.info.run_id, runs=seeds, experiment_id=experiment_id, tracking_uri=uri)
        (results / name / "run.json").write_text(json.dumps(info))
        for run_id in (parent.info.run_id, *seeds.values()):
            client.set_terminated(run_id)


def digest(folder: Path) -> str:
    return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file())).hexdigest()


def run_publish(root: Path) -> int:
    return publish.main(["--params", str(root / "params.yaml"), "--results", str(root / "results"),
                         "--report", str(root / "reports"), "--out", str(root / "published.json")])  # fmt: skip


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A trained study in a SQLite store, its report built, then published twice (a report rerun)."""
    root = tmp_path_factory.mktemp("publish")
    uri = f"sqlite:///{root}/mlflow.db"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        (root / "params.yaml").write_text(PARAMS, encoding="utf-8")
        client = tracking.open_store(uri)
        experiment_id = tracking.ensure_experiment(client, EXPERIMENT, root)
        train_runs(client, experiment_id, write_results(root / "results"), uri)
        assert report.main(["--params", "params.yaml", "--results", "results", "--out", "reports"]) == 0
        codes = [run_publish(root), run_publish(root)]
    return {"root": root, "client": client, "experiment_id": experiment_id, "codes": codes}


def test_publish_logs_the_report_run_with_relative_links(study):
    assert study["codes"] == [0, 0]
    client, root = study["client"], study["root"]
    record = json.loads((root / "published.json").read_text())
    run = client.get_run(record["report_run"])
    assert (run.info.run_name, run.info.status, run.data.tags["dvc.stage"]) == ("report", "FINISHED", "publish")
    assert record["experiment_id"] == study["experiment_id"] == run.info.experiment_id
    note = run.data.tags[tracking.NOTE_TAG]
    link = f"#/experiments/{study['experiment_id']}/runs/{run.info.run_id}/artifacts?workflowType=machine_learning"
    assert f"[index.html]({link})" in note
    assert "http" not in note  # relative: it works on whatever host and port the UI runs
    assert f"| {D2} | 0.8400 ± 0.0500 |" in note  # the results table
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert artifacts == {p.name for p in (root / "reports").iterdir()}
    view = client.get_experiment(study["experiment_id"]).tags[serve.SHARED_VIEW_TAG + serve.view_key(run.info.run_id)]
    listed = json.loads(view)["searchFilter"]  # the variant runs, charted; not the report's, which has no metrics
    parents = [json.loads((root / "results" / n / "run.json").read_text())["parent_run"] for n in (D1, D2)]
    assert run.info.run_id not in listed and all(parent in listed for parent in parents)


def test_publish_gives_each_variant_run_its_summary_figures_colour_and_the_latest_report(study):
    client, root = study["client"], study["root"]
    record = json.loads((root / "published.json").read_text())
    colors = figures.variant_colors(DEFAULT_STUDY)
    for name in (D1, D2):
        info = json.loads((root / "results" / name / "run.json").read_text())
        parent = client.get_run(info["parent_run"])
        metrics = json.loads((root / "results" / name / "metrics.json").read_text())
        assert parent.data.metrics["summary/vanishing_index"] == pytest.approx(metrics["vanishing_index"])
        assert parent.data.metrics["summary/escape_epoch"] == 3
        figures_logged = {a.path for a in client.list_artifacts(parent.info.run_id, "figures")}
        assert {f"figures/bands-{name}.png", f"figures/gradients-{name}.png"} <= figures_logged
        note = parent.data.tags[tracking.NOTE_TAG]
        assert note.startswith(f"{name}: what it is.") and note.count(publish.REPORT_LINE) == 1  # replaced, not added
        link = serve.ui_path(study["experiment_id"], f"runs/{record['report_run']}/artifacts")
        assert note.endswith(f"{publish.REPORT_LINE} [index.html]({link}).")
        for run_id in (parent.info.run_id, *info["runs"].values()):
            assert client.get_run(run_id).data.tags[publish.COLOR_TAG] == colors[name]
    # REMEDY's runs are in another store (its run.json says so): publishing leaves them alone.
    assert (
        json.loads((root / "results" / REMEDY / "run.json").read_text())["tracking_uri"]
        != f"sqlite:///{root}/mlflow.db"
    )


def test_a_failure_to_publish_keeps_the_page_and_says_so(study, monkeypatch, caplog):
    root, client = study["root"], study["client"]
    monkeypatch.chdir(root)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root}/mlflow.db")
    record, pages = (root / "published.json").read_text(), digest(root / "reports")
    info = json.loads((root / "results" / D1 / "run.json").read_text())
    (root / "results" / D1 / "run.json").write_text(json.dumps(info | {"parent_run": "0" * 32}))  # a run not there
    try:
        assert run_publish(root) == 1
    finally:
        (root / "results" / D1 / "run.json").write_text(json.dumps(info))
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "publishing" in errors[0] and "not found. The report in" in errors[0], errors
    assert "is intact; once the store works, rerun `dvc repro publish`" in errors[0]
    assert digest(root / "reports") == pages and (root / "published.json").read_text() == record
    runs = client.search_runs([study["experiment_id"]], "attributes.run_name = 'report'")
    assert sorted(r.info.status for r in runs) == ["FAILED", "FINISHED", "FINISHED"]


def test_an_unreachable_store_fails_fast_and_writes_nothing(tmp_path, monkeypatch, caplog):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", closed)
    (tmp_path / "params.yaml").write_text(PARAMS, encoding="utf-8")
    write_results(tmp_path / "results")
    (tmp_path / "reports").mkdir()
    assert run_publish(tmp_path) == 1
    assert closed in caplog.text and not (tmp_path / "published.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml", "reports", "results"]
