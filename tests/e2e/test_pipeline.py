"""The whole pipeline through ``dvc repro`` on a small profile, in a temporary copy of the repo."""

from __future__ import annotations

import json
import sqlite3
from collections import Counter
from pathlib import Path

import pytest

from tests.e2e.conftest import run

pytestmark = pytest.mark.slow

# DVC's names for the stage items, and so the variants' folders and MLflow run names.
VARIANTS = ["1-sigmoid-mse-glorot_uniform-none", "2-sigmoid-mse-glorot_uniform-none", "relu-ce-he"]


def finished_runs(store: Path) -> list[tuple[str, str]]:
    with sqlite3.connect(store) as db:
        return sorted(db.execute("SELECT name, status FROM runs").fetchall())


def test_dvc_repro_end_to_end(make_project) -> None:
    project = make_project()
    first = run(["dvc", "repro"], project)
    assert "Running stage 'report'" in first.stdout

    assert (project / "data/raw/mnist.npz").is_file()
    assert (project / "data/processed/train.npz").is_file()
    for variant in VARIANTS:
        folder = project / "results" / variant
        for name in ("history.csv", "metrics.json", "run.json", "models/seed-0.keras", "models/seed-1.keras"):
            assert (folder / name).is_file(), f"{folder / name} missing"
        metrics = json.loads((folder / "metrics.json").read_text())
        assert metrics["epochs"] == 3 and metrics["replicates"] == 2
        assert 0 <= metrics["accuracy"] <= 1
    assert (project / "reports/index.html").is_file()
    assert (project / "reports/summary.md").is_file()
    page = (project / "reports/index.html").read_text()
    for name in VARIANTS:
        assert name in page
    pngs = {p.name for p in (project / "reports").glob("*.png")}
    assert {"remedies-depth-2.png", f"gradients-{VARIANTS[1]}.png", f"bands-{VARIANTS[0]}.png", "sigmoid.png"} <= pngs

    # One FINISHED run per variant and seed, plus the report's run.
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("vanishing-gradient")
    runs = client.search_runs([experiment.experiment_id])
    names = sorted(r.info.run_name for r in runs)
    assert names == sorted([f"{name}-seed-{seed}" for name in VARIANTS for seed in (0, 1)] + VARIANTS + ["report"])
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert len({r.data.tags["pipeline.group"] for r in runs}) == 1
    assert len({r.data.tags["pipeline.execution"] for r in runs}) == 1
    by_id = {r.info.run_id: r for r in runs}
    for r in runs:
        if r.info.run_name == "report":
            assert "index.html" in r.data.tags["mlflow.note.content"]
            continue
        if r.info.run_name in VARIANTS:  # the variant's parent run: checked below
            continue
        parent = by_id[r.data.tags["mlflow.parentRunId"]]
        assert r.info.run_name.startswith(f"{parent.info.run_name}-seed-")
        depth = int(r.data.params["depth"])
        keys = ["accuracy", "loss"] + [f"weight_change/hidden_{i}" for i in range(1, depth + 1)]
        for key in keys:
            history = client.get_metric_history(r.info.run_id, key)
            assert [m.step for m in history] == [1, 2, 3], key
        assert r.data.tags["dvc.stage"].startswith(("train@", "remedy@"))
        assert len(r.data.tags["data.digest"]) == 64
        assert r.data.params["learning_rate"] == "0.2"
        artifacts = {a.path for a in client.list_artifacts(r.info.run_id)}
        assert "history.csv" in artifacts
        assert r.inputs.dataset_inputs[0].dataset.name == "mnist-train"
        assert json.loads(r.inputs.dataset_inputs[0].dataset.source)["uri"] == "data/processed/train.npz"

    # The variant's parent run: per-epoch means over its seeds, summary values, figures, a description.
    import mlflow.pyfunc
    import numpy as np
    import pandas as pd

    for name in VARIANTS:
        info = json.loads((project / "results" / name / "run.json").read_text())
        parent = by_id[info["parent_run"]]
        assert parent.info.run_name == name and parent.info.status == "FINISHED"
        assert "mlflow.parentRunId" not in parent.data.tags
        assert {by_id[c].data.tags["mlflow.parentRunId"] for c in info["runs"].values()} == {parent.info.run_id}
        table = pd.read_csv(project / "results" / name / "history.csv")
        means = table.groupby("epoch").mean(numeric_only=True)
        for key in ("accuracy", "test_loss", "grad_bias/hidden_1"):
            logged = [m.value for m in sorted(client.get_metric_history(parent.info.run_id, key), key=lambda m: m.step)]
            np.testing.assert_allclose(logged, means[key].to_numpy(), rtol=1e-6, err_msg=key)
        assert len(client.get_metric_history(parent.info.run_id, "std/accuracy")) == 3
        metrics = json.loads((project / "results" / name / "metrics.json").read_text())
        assert parent.data.metrics["summary/vanishing_index"] == pytest.approx(metrics["vanishing_index"])
        assert name in parent.data.tags["mlflow.note.content"] and "report" in parent.data.tags["mlflow.note.content"]
        assert parent.data.tags["mlflow.source.name"].endswith(f"@{name}")
        assert {a.path for a in client.list_artifacts(parent.info.run_id, "figures")} >= {f"figures/bands-{name}.png"}

    # Each replicate is an MLflow model of its run, linked to its final metrics, and predicts as the .keras file.
    import keras

    models = client.search_logged_models([experiment.experiment_id])
    assert len(models) == 2 * len(VARIANTS)
    model = next(m for m in models if by_id[m.source_run_id].info.run_name == f"{VARIANTS[1]}-seed-1")
    assert {m.key for m in model.metrics} >= {"final/accuracy", "final/test_accuracy"}
    x = np.random.default_rng(0).random((4, 784), dtype=np.float32)
    expected = keras.saving.load_model(project / "results" / VARIANTS[1] / "models" / "seed-1.keras").predict(
        x, verbose=0
    )
    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    np.testing.assert_allclose(mlflow.pyfunc.load_model(f"models:/{model.model_id}").predict(x), expected, rtol=1e-6)

    # Nothing changed: nothing runs, and no MLflow run is created.
    second = run(["dvc", "repro"], project)
    assert "Running stage" not in second.stdout
    assert len(client.search_runs([experiment.experiment_id])) == len(runs)
    assert run(["dvc", "status"], project).stdout.strip().endswith("Data and pipelines are up to date.")


def test_new_depth_trains_only_the_new_variant(make_project) -> None:
    project = make_project(lambda p: p.update(grid=p["grid"] | {"depth": [1]}, remedies={}))
    run(["dvc", "repro"], project)
    params = (project / "params.yaml").read_text().replace("depth:\n  - 1\n", "depth:\n  - 1\n  - 2\n")
    (project / "params.yaml").write_text(params)
    second = run(["dvc", "repro"], project)
    started = [line for line in second.stdout.splitlines() if line.startswith("Running stage")]
    assert started == [
        "Running stage 'train@2-sigmoid-mse-glorot_uniform-none':",
        "Running stage 'summary@2-sigmoid-mse-glorot_uniform-none':",
        "Running stage 'report':",
        "Running stage 'publish':",
    ]


def test_figures_and_summaries_change_without_retraining(make_project) -> None:
    """Editing a figure function, a summary setting, the MLflow logging, a run description or the
    progress line reruns only what depends on it: no train stage runs again, and no new training
    run appears in MLflow."""
    project = make_project(lambda p: p.update(remedies={}))
    run(["dvc", "repro"], project)
    runs_before = finished_runs(project / "mlflow.db")
    before = json.loads((project / "results" / VARIANTS[1] / "metrics.json").read_text())

    figures = project / "pipeline" / "figures.py"
    figures.write_text(figures.read_text().replace("STD_BAND_ALPHA = 0.25", "STD_BAND_ALPHA = 0.3"))
    for module, old, new in (
        ("trainlog.py", "(one nested run each)", "(one nested run per seed)"),  # a run description
        ("trainlog.py", "remaining ~", "left ~"),  # the progress line
        ("trainlog.py", "flush_s: float = 5.0", "flush_s: float = 2.0"),  # the MLflow logging
        ("tracking.py", "attempts: int = 4", "attempts: int = 5"),  # the store's get-or-create retries
    ):
        path = project / "pipeline" / module
        assert old in path.read_text(), (module, old)
        path.write_text(path.read_text().replace(old, new))
    params = (project / "params.yaml").read_text().replace("index_window: 2", "index_window: 1")
    (project / "params.yaml").write_text(params)
    status = run(["dvc", "status"], project).stdout
    assert "train@" not in status and "summary@" in status and "report" in status

    second = run(["dvc", "repro"], project)
    started = [line for line in second.stdout.splitlines() if line.startswith("Running stage")]
    assert not [line for line in started if "train@" in line]
    assert {line.split("'")[1].split("@")[0] for line in started} == {"summary", "report", "publish"}
    after = json.loads((project / "results" / VARIANTS[1] / "metrics.json").read_text())
    assert after["accuracy"] == before["accuracy"] and after["vanishing_index"] != before["vanishing_index"]
    new_runs = Counter(finished_runs(project / "mlflow.db")) - Counter(runs_before)
    assert list(new_runs.elements()) == [("report", "FINISHED")]  # the report's new run, no training run


def _commit(project: Path, message: str) -> None:
    run(["git", "add", "-A"], project)
    run(["git", "-c", "user.name=test", "-c", "user.email=test@example.invalid", "commit", "-qm", message], project)


def _tags(project: Path) -> dict[str, tuple[str, str, str]]:
    """Run id -> (name, pipeline.group, pipeline.execution)."""
    with sqlite3.connect(project / "mlflow.db") as db:
        rows = db.execute(
            "SELECT r.run_uuid, r.name, g.value, e.value FROM runs r "
            "JOIN tags g ON g.run_uuid = r.run_uuid AND g.key = 'pipeline.group' "
            "JOIN tags e ON e.run_uuid = r.run_uuid AND e.key = 'pipeline.execution'"
        ).fetchall()
    return {run_id: (name, group, execution) for run_id, name, group, execution in rows}


def test_one_group_per_study_although_the_stages_rewrite_committed_files(make_project) -> None:
    """The stages rewrite files git tracks (history.csv, metrics.json, dvc.lock), so git's dirty flag
    changes in the middle of a `dvc repro`: the group must not. Each `dvc repro` is one execution."""
    project = make_project(lambda p: p.update(grid=p["grid"] | {"depth": [1, 2]}, remedies={}))
    run(["dvc", "repro"], project)
    _commit(project, "first study, results committed")
    first = _tags(project)
    params = (project / "params.yaml").read_text().replace("epochs: 3", "epochs: 2")
    (project / "params.yaml").write_text(params)
    _commit(project, "two epochs")  # a clean tree: the first train stage makes it dirty for the next ones
    run(["dvc", "repro"], project)
    assert run(["git", "status", "--porcelain"], project).stdout.strip(), "the study changed committed files"
    second = {k: v for k, v in _tags(project).items() if k not in first}
    assert len(second) == 7  # 2 variants and their 2 seeds each, the report
    assert len({group for _, group, _ in second.values()}) == 1
    assert len({execution for _, _, execution in second.values()}) == 1
    assert {g for _, g, _ in second.values()} != {g for _, g, _ in first.values()}  # other params: other study
    assert {e for *_, e in second.values()} != {e for *_, e in first.values()}

    run(["dvc", "repro", "-f", "-s", "publish"], project)  # the same study again: same group, a new execution
    third = {k: v for k, v in _tags(project).items() if k not in first and k not in second}
    ((name, group, execution),) = third.values()
    assert name == "report" and group == next(iter(second.values()))[1]
    assert execution != next(iter(second.values()))[2]
