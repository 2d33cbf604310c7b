"""The sweep report: tables and figure from tiny histories, and the CLI on a real git repository of
DVC experiment refs, published to a real SQLite MLflow store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from pipeline.sweep import report
from pipeline.sweep.spec import SweepError
from tests.conftest import ROOT

PLATEAU, MARGIN, WINDOW, EPOCHS = 0.1124, 0.05, 4, 8
# Seed 0 escapes at epoch 6, its 1/signal falls as 10 - t (forecast 10); seed 1 stays (censored at 8).
ESCAPES = {0: 6, 1: None}


def make_history(escapes: dict[int, int | None] = ESCAPES, epochs: int = EPOCHS, shift: float = 0.0) -> pd.DataFrame:
    """Seeds on the plateau (accuracy 0.11) until their escape epoch (then 0.9); seed 0's output signal
    is 1 / (10 + shift - t), the others' constant."""
    rows = []
    for seed, escape in escapes.items():
        for t in range(1, epochs + 1):
            accuracy = 0.9 if escape is not None and t >= escape else 0.11
            signal = 1.0 / (10.0 + shift - t) if seed == 0 else 0.2
            row = {"seed": seed, "epoch": t, "accuracy": accuracy, "loss": 0.1, "test_accuracy": accuracy - 0.01}
            rows.append({**row, "test_loss": 0.1, "weight_change/hidden_1": 0.1, "signal/output": signal})
    return pd.DataFrame(rows)


def test_seed_table_per_seed_escape_censoring_and_forecast() -> None:
    seeds = report.seed_table(make_history(), PLATEAU, MARGIN, WINDOW)
    assert list(seeds.columns) == report.SEED_COLUMNS
    assert seeds["escape_epoch"].iloc[0] == 6 and np.isnan(seeds["escape_epoch"].iloc[1])
    assert seeds["censored"].tolist() == [False, True]
    assert seeds["epochs"].tolist() == [EPOCHS, EPOCHS]
    assert seeds["forecast"].iloc[0] == pytest.approx(10.0) and np.isnan(seeds["forecast"].iloc[1])
    assert seeds["accuracy"].tolist() == [0.9, 0.11]
    assert seeds["test_accuracy"].tolist() == pytest.approx([0.89, 0.10])


def loaded(rates: tuple[float, ...] = (0.1, 0.4), scales: tuple[float, ...] = (1.0,)) -> dict:
    """Experiments that differ in the learning rate (and init scale) only: seeds as the sweep reads them."""
    out = {}
    for k, (rate, scale) in enumerate(((r, s) for r in rates for s in scales), 1):
        values = {"train": {"learning_rate": rate, "init_scale": scale, "seeds": [0, 1]}, "grid": {"depth": [2]}}
        seeds = report.seed_table(make_history(shift=k), PLATEAU, MARGIN, WINDOW)
        out[f"sw-{k}"] = (values, {"2-sigmoid": seeds, "relu": seeds.assign(escape_epoch=1.0, censored=False)})
    return out


def test_sweep_table_has_one_row_per_experiment_variant_and_seed_and_the_swept_params() -> None:
    table, swept = report.sweep_table(loaded())
    assert swept == ["train.learning_rate"]  # the seeds list and the grid are the same everywhere
    assert list(table.columns) == ["experiment", "train.learning_rate", "variant", *report.SEED_COLUMNS]
    assert len(table) == 2 * 2 * 2
    first = table[(table["experiment"] == "sw-2") & (table["variant"] == "2-sigmoid") & (table["seed"] == 0)]
    assert first["train.learning_rate"].item() == 0.4 and first["forecast"].item() == pytest.approx(12.0)


def test_summary_table_averages_escaped_seeds_only() -> None:
    table, swept = report.sweep_table(loaded())
    summary = report.summary_table(table, swept).set_index(["experiment", "variant"])
    row = summary.loc[("sw-1", "2-sigmoid")]
    assert (row["seeds"], row["escaped"]) == (2, 1)
    assert row["escape_epoch"] == 6 and row["escape_std"] == 0  # the censored seed is not averaged in
    assert row["forecast"] == pytest.approx(11.0) and row["forecast_abs_error"] == pytest.approx(5.0)
    assert summary.loc[("sw-1", "relu"), "escaped"] == 2


def test_escape_figure_has_a_panel_per_swept_param_and_marks_censored_seeds_at_their_last_epoch() -> None:
    table, swept = report.sweep_table(loaded(scales=(0.5, 2.0)))
    assert swept == ["train.learning_rate", "train.init_scale"]
    fig = report.escape_figure(table, swept, "2-sigmoid")
    axes = fig.axes
    assert [ax.get_xlabel() for ax in axes] == swept
    for ax in axes:
        assert len(ax.get_legend().get_texts()) == 2  # one colour per value of the other param
        assert [t.get_text() for t in ax.get_xticklabels()] == (["0.1", "0.4"] if ax is axes[0] else ["0.5", "2.0"])
        escaped, censored, forecast = ([], [], [])
        for i, collection in enumerate(ax.collections):
            y = collection.get_offsets()[:, 1].tolist()
            [escaped, censored, forecast][i % 3].extend(v for v in y if v is not None)  # None: NaN, not drawn
        assert sorted(escaped) == [6.0] * 4 and censored == [float(EPOCHS)] * 4
        assert sorted(forecast) == pytest.approx([11.0, 12.0, 13.0, 14.0])
    assert ax.get_yscale() == "log"


def git(cwd: Path, *args: str) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t"}
    env["GIT_COMMITTER_EMAIL"] = "t@t"
    return subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True, text=True).stdout.strip()


def write_variant(repo: Path, name: str, history: pd.DataFrame) -> None:
    folder = repo / "results" / name
    folder.mkdir(parents=True, exist_ok=True)
    history.to_csv(folder / "history.csv", index=False)
    metrics = {"plateau": PLATEAU, "escape_margin": MARGIN, "forecast_epochs": WINDOW}  # and others, unused here
    (folder / "metrics.json").write_text(json.dumps(metrics), encoding="utf-8")


def experiment_repo(repo: Path, sweep_id: str, rates: tuple[float, ...]) -> list[str]:
    """A git repository whose baseline holds a variant no experiment trains, and one DVC experiment
    commit per learning rate (ref ``refs/exps/<sha[:2]>/<sha[2:]>/<sweep_id>-<k>``) with its results."""
    repo.mkdir()
    (repo / ".dvc").mkdir()
    git(repo, "init", "-q")
    write_variant(repo, "9-sigmoid-mse-glorot_uniform-none", make_history())
    (repo / "params.yaml").write_text("train: {learning_rate: 0.2}\ngrid: {depth: [1]}\n", encoding="utf-8")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "baseline")
    base = git(repo, "rev-parse", "HEAD")
    names = []
    for k, rate in enumerate(rates, 1):
        values = {
            "train": {"learning_rate": rate, "seeds": [0, 1]},
            "grid": {"depth": [1]},
            "remedies": {"relu-mse": {"depth": 1, "activation": "relu", "loss": "mse", "init": "he_normal"}},
            "tracking": {"experiment": "sweep-test"},
        }
        (repo / "params.yaml").write_text(yaml.safe_dump(values), encoding="utf-8")
        write_variant(repo, "1-sigmoid-mse-glorot_uniform-none", make_history(shift=k))
        write_variant(repo, "relu-mse", make_history({0: 1, 1: 2}))
        git(repo, "add", "-A")
        git(repo, "commit", "-qm", f"experiment {k}")
        names.append(f"{sweep_id}-{k}")
        git(repo, "update-ref", f"refs/exps/{base[:2]}/{base[2:]}/{names[-1]}", "HEAD")
        git(repo, "reset", "-q", "--hard", base)
    return names


def test_experiment_refs_finds_the_sweeps_experiments_only(tmp_path: Path) -> None:
    names = experiment_repo(tmp_path / "repo", "sw1", (0.1, 0.2))
    base = git(tmp_path / "repo", "rev-parse", "HEAD")
    git(tmp_path / "repo", "update-ref", f"refs/exps/{base[:2]}/{base[2:]}/sw1-2-1", "HEAD")  # sweep sw1-2's
    assert list(report.experiment_refs(tmp_path / "repo", "sw1")) == names
    assert list(report.experiment_refs(tmp_path / "repo", "sw1", ["sw1-2"])) == ["sw1-2"]
    with pytest.raises(SweepError, match=r"No DVC experiment sw1-3 .*pipeline.sweep.workspace --git-remote origin"):
        report.experiment_refs(tmp_path / "repo", "sw1", ["sw1-3"])
    with pytest.raises(SweepError, match="No DVC experiment sw2-<k>"):
        report.experiment_refs(tmp_path / "repo", "sw2")


def report_cli(repo: Path, sweep_id: str, uri: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "pipeline.sweep.report", sweep_id]
    return subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_cli_writes_the_folder_and_one_mlflow_run_and_keeps_the_page_when_mlflow_fails(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    repo = tmp_path / "repo"
    experiment_repo(repo, "sw9", (0.1, 0.4))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    for _ in range(2):  # a second report of the same sweep replaces the first run
        done = report_cli(repo, "sw9", uri)
        assert done.returncode == 0, done.stderr
    folder = repo / "sweeps" / "sw9"
    files = {"index.html", "seeds.csv", "escape-1-sigmoid-mse-glorot_uniform-none.png", "escape-relu-mse.png"}
    assert {p.name for p in folder.iterdir()} == files
    seeds = pd.read_csv(folder / "seeds.csv")
    assert list(seeds.columns) == ["experiment", "train.learning_rate", "variant", *report.SEED_COLUMNS]
    assert len(seeds) == 2 * 2 * 2 and set(seeds["variant"]) == {"1-sigmoid-mse-glorot_uniform-none", "relu-mse"}
    page = (folder / "index.html").read_text(encoding="utf-8")
    assert page.count("data:image/png;base64,") == 2 and "train.learning_rate" in page

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("sweep-test")
    (run,) = client.search_runs([experiment.experiment_id], "tags.`pipeline.sweep` = 'sw9'")
    assert run.info.status == "FINISHED"
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == files

    (folder / "seeds.csv").unlink()  # so that the rerun below is seen to rewrite the folder
    done = report_cli(repo, "sw9", "http://127.0.0.1:9")  # nothing listens on the discard port
    assert done.returncode == 1
    assert "Publishing the sweep report to MLflow at http://127.0.0.1:9 failed" in done.stderr
    assert "the page is kept" in done.stderr and (folder / "seeds.csv").is_file()


def test_cli_refuses_missing_or_unreadable_experiments_and_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    repo = tmp_path / "repo"
    experiment_repo(repo, "sw9", (0.1,))
    monkeypatch.chdir(repo)
    assert report.main(["sw8"]) == 1
    assert "No DVC experiment sw8-<k>" in caplog.text
    (ref,) = git(repo, "for-each-ref", "--format=%(refname)", "refs/exps/").split()
    git(repo, "update-ref", ref, git(repo, "rev-parse", "HEAD"))  # the baseline: no results of its study
    assert report.main(["sw9"]) == 1
    assert "sw9-1" in caplog.text and "results/1-sigmoid-mse-glorot_uniform-none/history.csv" in caplog.text
    assert not (repo / "sweeps").exists()
