"""DVC beyond `dvc repro`, on the small profile: plots, metrics, experiments, remote storage.

* ``dvc plots show`` draws the study-wide charts (one line per variant, a panel per
  variant with one line per hidden layer) and one chart per variant; ``dvc plots diff``
  and ``dvc metrics diff`` compare with the last commit.
* ``make sweep`` queues experiments and runs them from the queue; their MLflow runs land
  in the workspace's store, tagged ``dvc.exp_name``.
* ``dvc push`` to the default remote, then a fresh clone pulls everything and is up to date.
"""

from __future__ import annotations

import filecmp
import json
import sqlite3
from pathlib import Path

import pytest

from tests.e2e.conftest import BIN, prepare_project, run

pytestmark = pytest.mark.slow

GIT = ["git", "-c", "user.name=test", "-c", "user.email=test@example.invalid"]
STUDY_PLOTS = {"accuracy", "test_accuracy", "weight_change", "gradient"}
UP_TO_DATE = "Data and pipelines are up to date."


def commit(project: Path, message: str) -> None:
    run(["git", "add", "-A"], project)
    run([*GIT, "commit", "-qm", message], project)


def variants(project: Path) -> dict[str, int]:
    """Variant name (its results folder) -> depth, from what the train stages wrote."""
    runs = {p.parent.name: json.loads(p.read_text()) for p in sorted((project / "results").glob("*/run.json"))}
    assert all(run["name"] == folder for folder, run in runs.items())  # one name: folder and runs
    return {folder: run["variant"]["depth"] for folder, run in runs.items()}


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The small profile after `dvc repro`, committed (so that HEAD has results to compare with)."""
    project = prepare_project(tmp_path_factory.mktemp("study"))
    run(["dvc", "repro"], project)
    commit(project, "small study")
    return project


def test_plots_show_one_line_per_variant(study: Path, tmp_path: Path) -> None:
    names = variants(study)
    assert len(names) >= 3, names

    shown = run(["dvc", "plots", "show", "--json"], study)
    plots = json.loads(shown.stdout)
    assert not plots.get("errors"), plots["errors"]
    data = plots["data"]
    # The study-wide charts: every variant, every epoch, one value per (variant, epoch[, layer]).
    assert set(data) >= STUDY_PLOTS
    for plot_id in STUDY_PLOTS:
        (chart,) = data[plot_id]
        spec = chart["content"]
        rows = spec["data"]["values"]
        assert {row["variant"] for row in rows} == set(names), plot_id
        assert {int(row["epoch"]) for row in rows} == {1, 2, 3}
        key = ("variant", "epoch", "layer") if plot_id in ("weight_change", "gradient") else ("variant", "epoch")
        assert len({tuple(row[k] for k in key) for row in rows}) == len(rows), f"{plot_id}: a line per variant"
        assert spec["title"] and "<DVC_METRIC" not in json.dumps(spec), plot_id
    accuracy = data["accuracy"][0]["content"]
    assert accuracy["encoding"]["color"]["field"] == "variant"
    assert accuracy["encoding"]["x"]["title"] == "epoch"
    assert accuracy["encoding"]["y"]["title"] == "training accuracy"
    layers = data["weight_change"][0]["content"]
    assert layers["facet"]["field"] == "variant" and layers["spec"]["encoding"]["color"]["field"] == "hidden layer"
    # Every depth's layers are there: depth d contributes layers 1..d.
    depth_of = {row["variant"]: int(row["layer"]) for row in layers["data"]["values"]}
    assert depth_of == names
    # One chart per variant from its history.csv (seed rows averaged by the template, no zig-zag).
    for folder in names:
        (chart,) = data[f"results/{folder}/history.csv"]
        spec = chart["content"]
        assert spec["title"].startswith(folder)
        assert spec["transform"][-1]["aggregate"][0]["op"] == "mean"

    # The HTML page names every variant and every chart.
    run(["dvc", "plots", "show", "-o", str(tmp_path / "plots")], study)
    page = (tmp_path / "plots" / "index.html").read_text()
    for folder in names:
        assert f"results/{folder}/history.csv" in page
    for title in ("Training accuracy by variant", "How fast each hidden layer learns", "Test accuracy by variant"):
        assert title in page


def test_metrics_show_and_diff_against_the_last_commit(study: Path) -> None:
    names = variants(study)
    shown = run(["dvc", "metrics", "show"], study).stdout
    for folder in names:
        assert f"results/{folder}/metrics.json" in shown
    for column in ("accuracy", "test_accuracy", "vanishing_index"):
        assert column in shown.splitlines()[0]
    metrics = json.loads(run(["dvc", "metrics", "show", "--json"], study).stdout)
    (workspace,) = metrics.values()  # keyed "" (the workspace)
    values = workspace["data"]
    for folder in names:
        assert values[f"results/{folder}/metrics.json"]["data"]["epochs"] == 3

    # Nothing changed since the commit: every metric is listed with the same old and new value.
    diff = json.loads(run(["dvc", "metrics", "diff", "HEAD", "--all", "--json"], study).stdout)
    for folder in names:
        accuracy = diff[f"results/{folder}/metrics.json"]["accuracy"]
        assert accuracy["old"] == accuracy["new"]
    plots = json.loads(run(["dvc", "plots", "diff", "HEAD", "--json"], study).stdout)
    assert not plots.get("errors"), plots["errors"]
    assert set(plots["data"]["accuracy"][0]["revisions"]) == {"workspace", "HEAD"}


def test_push_then_pull_into_a_fresh_clone(study: Path) -> None:
    """`make push` / `make pull` are `dvc push` / `dvc pull` to the default remote."""
    run(["make", "-o", ".venv/.installed", "push", f"BIN={BIN}"], study)
    storage = study.parent / "vanishing-gradient-dvc-storage"  # the default remote, beside the repo
    assert (storage / "files" / "md5").is_dir()

    clone = study.parent / "clone"
    run(["git", "clone", "-q", str(study), str(clone)], study.parent)
    assert not (clone / "data/processed").exists() and not (clone / "reports").exists()
    pulled = run(["make", "-o", ".venv/.installed", "pull", f"BIN={BIN}"], clone)
    assert UP_TO_DATE in pulled.stdout

    outputs = ["data/raw/mnist.npz", "data/processed", "reports", *[f"results/{v}/models" for v in variants(study)]]
    for out in outputs:
        original, copy = study / out, clone / out
        if original.is_dir():
            files = sorted(p.relative_to(original) for p in original.rglob("*") if p.is_file())
            assert files and files == sorted(p.relative_to(copy) for p in copy.rglob("*") if p.is_file()), out
            _, mismatch, errors = filecmp.cmpfiles(original, copy, [str(f) for f in files], shallow=False)
            assert not mismatch and not errors, (out, mismatch, errors)
        else:
            assert filecmp.cmp(original, copy, shallow=False), out
    assert run(["dvc", "status"], clone).stdout.strip().endswith(UP_TO_DATE)


def test_queued_experiments_log_into_the_workspace_store(make_project) -> None:
    """`dvc exp run --queue` runs each experiment in a copy under .dvc/tmp/exps: its runs still
    land in the workspace's store (tracking.project_root), tagged with the experiment's name."""
    project = make_project(lambda p: p.update(grid=p["grid"] | {"depth": [1]}, remedies={}))
    commit(project, "small profile, depth 1")
    queued = run(["dvc", "exp", "run", "--queue", "-S", "train.learning_rate=0.1,0.5"], project)
    assert "Queued experiment" in queued.stdout
    run(["dvc", "exp", "run", "--run-all", "--jobs", "1"], project)

    shown = json.loads(run(["dvc", "exp", "show", "--json"], project).stdout)
    experiments = {}
    for baseline in shown:
        for exp in baseline.get("experiments") or []:
            assert exp["executor"]["state"] == "success", exp
            (rev,) = exp["revs"]
            experiments[rev["name"]] = rev
    assert len(experiments) == 2, list(experiments)
    learning_rates = set()
    for rev in experiments.values():
        data = rev["data"]
        learning_rates.add(data["params"]["params.yaml"]["data"]["train"]["learning_rate"])
        metrics = data["metrics"]["results/1-sigmoid-mse-glorot_uniform-none/metrics.json"]["data"]
        assert 0 <= metrics["accuracy"] <= 1 and metrics["epochs"] == 3
    assert learning_rates == {0.1, 0.5}

    # The queued copies ran under .dvc/tmp/exps, yet logged to the workspace's store.
    with sqlite3.connect(project / "mlflow.db") as db:
        rows = db.execute(
            "SELECT r.name, r.status, t.value, r.artifact_uri FROM runs r "
            "JOIN tags t ON t.run_uuid = r.run_uuid AND t.key = 'dvc.exp_name'"
        ).fetchall()
    by_exp: dict[str, set[str]] = {}
    for name, status, exp_name, artifact_uri in rows:
        assert status == "FINISHED"
        assert artifact_uri.startswith((project / "mlartifacts").as_uri()), artifact_uri
        by_exp.setdefault(exp_name, set()).add(name)
    variant = "1-sigmoid-mse-glorot_uniform-none"
    runs = {variant, f"{variant}-seed-0", f"{variant}-seed-1", "report"}
    assert by_exp == {name: runs for name in experiments}
    assert not list(project.glob(".dvc/tmp/exps/**/mlflow.db"))
