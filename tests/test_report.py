"""Report stage: loading results, the page it builds, MLflow logging and the failure paths."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from pipeline import report
from pipeline.params import Variant
from tests.synthetic_results import DEFAULT_VARIANTS, histories, make_history, name_of, write_results, write_variant

D1, D2, REMEDY = (name_of(v) for v in DEFAULT_VARIANTS)
PARAMS = """\
train: {epochs: 5}
grid: {depth: [1, 2]}
remedies:
  relu-ce-he: {depth: 2, activation: relu, loss: cross_entropy, init: he_normal, norm: none}
tracking:
  experiment: report-test
report:
  change_clip_quantile: 0.9
  dpi: 40
"""


def write_params(folder: Path) -> Path:
    path = folder / "params.yaml"
    path.write_text(PARAMS, encoding="utf-8")
    return path


def run_main(root: Path, monkeypatch, results: str = "results", store: str = "mlflow.db") -> int:
    """``report.main`` in ``root`` with the test params and a SQLite store at ``root/store``."""
    monkeypatch.chdir(root)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root}/{store}")
    return report.main(["--params", str(write_params(root)), "--results", results, "--out", "reports"])


# ------------------------------------------------------------------------- loading
def test_load_results_reads_every_variant_in_study_order(tmp_path):
    results = write_results(tmp_path / "results")
    (results / ".d9-tmp").mkdir()  # the train stage's temporary folder
    (results / "incomplete").mkdir()
    (results / "incomplete" / "history.csv").write_text("seed,epoch,accuracy\n0,1,0.5\n")
    write_variant(results, Variant(depth=1, activation="relu"))

    loaded = report.load_results(results)

    assert [r.name for r in loaded] == [D1, D2, name_of(Variant(depth=1, activation="relu")), REMEDY]
    first = loaded[0]
    assert first.classic and not loaded[2].classic
    assert first.seeds == [0, 1]
    assert first.epochs == 5
    assert first.metrics["accuracy"] == pytest.approx(0.85)
    assert first.run_ids == {"0": f"run{D1.replace('-', '')}s0", "1": f"run{D1.replace('-', '')}s1"}
    assert list(first.history.columns[:4]) == ["seed", "epoch", "loss", "accuracy"]


def test_load_results_keeps_only_the_study(tmp_path):
    results = write_results(tmp_path / "results")
    write_variant(results, Variant(depth=3))  # trained once, since removed from params
    loaded = report.load_results(results, list(DEFAULT_VARIANTS))
    assert [r.name for r in loaded] == [D1, D2, REMEDY]
    with pytest.raises(report.ReportError, match="no results for depth=5"):
        report.load_results(results, [*DEFAULT_VARIANTS, Variant(depth=5)])


def test_load_results_errors_name_the_problem(tmp_path):
    with pytest.raises(report.ReportError, match="does not exist"):
        report.load_results(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(report.ReportError, match="no variant results"):
        report.load_results(tmp_path / "empty")

    results = tmp_path / "results"
    folder = write_variant(results, Variant(depth=1))
    (folder / "run.json").write_text(json.dumps({"variant": {"depth": 0}}))
    with pytest.raises(report.ReportError, match=r"run\.json"):
        report.load_results(results)
    (folder / "run.json").write_text("{not json")
    with pytest.raises(report.ReportError, match="JSON"):
        report.load_results(results)


def test_load_results_rejects_duplicate_variants_and_missing_columns(tmp_path):
    results = tmp_path / "results"
    folder = write_variant(results, Variant(depth=1))
    copy = shutil.copytree(folder, results / "copy")
    with pytest.raises(report.ReportError, match="both hold variant depth=1"):
        report.load_results(results)
    (copy / "history.csv").write_text("epoch,loss\n1,0.3\n")
    with pytest.raises(report.ReportError, match="missing column"):
        report.load_variant(copy)


def test_remedy_groups_put_the_classic_variant_first(tmp_path):
    loaded = report.load_results(write_results(tmp_path / "results"))
    groups = report.remedy_groups(loaded)
    assert {depth: [r.name for r in group] for depth, group in groups.items()} == {2: [D2, REMEDY]}


def test_run_links():
    assert report.ui_base("sqlite:////x/mlflow.db") == "http://127.0.0.1:5000/"
    assert report.ui_base("https://mlflow.example.org/root") == "https://mlflow.example.org/root/"
    assert report.ui_base("https://alice:s3cret@mlflow.example.org/") == "https://mlflow.example.org/"
    assert report.ui_base("https://alice:***@mlflow.example.org") == "https://mlflow.example.org/"
    assert report.run_link("http://127.0.0.1:5000/", "3", "abc") == "http://127.0.0.1:5000/#/experiments/3/runs/abc"


# ------------------------------------------------------------------ building pages
def test_report_reads_what_summarize_writes(tmp_path):
    """The metrics.json contract: the summary table takes every value the summarize stage writes
    (not a recomputation from the history), and a null (a diverged seed) shows as n/a."""
    folder = write_variant(tmp_path / "results", Variant(depth=2))
    metrics = json.loads((folder / "metrics.json").read_text())
    metrics.update(accuracy=0.5, accuracy_std=0.01, test_accuracy=None, test_accuracy_std=None)
    (folder / "metrics.json").write_text(json.dumps(metrics))
    (loaded,) = report.load_results(tmp_path / "results")
    row = report.summary_table({loaded.name: loaded.history}, {loaded.name: loaded.variant}, {loaded.name: metrics})
    row = row.iloc[0]
    assert (row["accuracy_mean"], row["accuracy_std"]) == (0.5, 0.01)
    assert np.isnan(row["test_accuracy_mean"])
    assert row["vanishing_index_mean"] == pytest.approx(metrics["vanishing_index"])
    assert report.format_mean_std(row["test_accuracy_mean"], row["test_accuracy_std"]) == "n/a"


# ---------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    """One full run of ``main`` on a synthetic results folder with a SQLite MLflow store."""
    root = tmp_path_factory.mktemp("e2e")
    write_results(root / "results")
    with pytest.MonkeyPatch.context() as mp:
        code = run_main(root, mp)
    return {"code": code, "root": root, "uri": f"sqlite:///{root}/mlflow.db", "out": root / "reports"}


def test_main_writes_the_report(e2e):
    assert e2e["code"] == 0
    out = e2e["out"]
    files = {p.name for p in out.iterdir()}
    assert {"index.html", "summary.md", "accuracy_by_depth.png", "first_layer_change.png", "sigmoid.png"} <= files
    assert {f"classic-{D1}.png", f"classic-{D2}.png", f"gradients-{D2}.png", "remedies-depth-2.png"} <= files
    assert {f"bands-{label}.png" for label in (D1, D2, REMEDY)} <= files
    assert f"classic-{REMEDY}.png" not in files  # the per-depth classic figures are for classic variants
    assert [p.name for p in e2e["root"].iterdir() if p.name.startswith(".reports")] == []  # no temp folder left


def test_index_html_is_self_contained_and_shows_computed_numbers(e2e):
    page = (e2e["out"] / "index.html").read_text(encoding="utf-8")
    assert page.count("data:image/png;base64,") >= 10
    for label in (D1, D2, REMEDY):
        assert label in page
    # Final accuracy of depth-1: seeds end at 0.80 and 0.90.
    assert "0.8500 ± 0.0500" in page
    assert "0.8200 ± 0.0400" in page  # its test accuracy
    # Only the MLflow run links point outside the page.
    external = re.findall(r'(?:src|href)\s*=\s*["\']?(https?://[^"\' >]+)', page)
    assert external and all(re.match(r"http://127\.0\.0\.1:5000/#/experiments/7/runs/\w+$", u) for u in external)
    assert f"http://127.0.0.1:5000/#/experiments/7/runs/run{D1.replace('-', '')}s0" in page
    assert "make ui" in page
    assert not re.search(r"<(script|link|iframe)\b", page)
    order = [page.index(heading) for heading in ("Setup", "classic picture", "replicates", "Gradients", "Remedies")]
    assert order == sorted(order)
    assert page.index("Remedies") < page.index("Results") < page.index("Runs")


def test_summary_markdown(e2e):
    text = (e2e["out"] / "summary.md").read_text(encoding="utf-8")
    assert "| variant | final accuracy | test accuracy | vanishing index | escape epoch |" in text
    assert f"| {D2} | 0.8400 ± 0.0500 | 0.8100 ± 0.0400 | 0.2 ± 0 | 2 ± 0 |" in text


def test_escape_cell_says_how_many_seeds_escaped():
    assert report.escape_cell(142.4, 11.2, 1.0) == "142 ± 11"
    assert report.escape_cell(131.0, 4.0, 0.6) == "131 ± 4 (60% of seeds)"
    assert report.escape_cell(np.nan, np.nan, 0.0) == "none escaped"
    assert report.escape_cell(np.nan, np.nan, np.nan) == "n/a"  # results without an escape epoch


def test_main_logs_a_finished_report_run(e2e):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=e2e["uri"])
    experiment = client.get_experiment_by_name("report-test")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "report"
    assert run.info.status == "FINISHED"
    assert run.data.tags["dvc.stage"] == "report"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"index.html", "summary.md", "sigmoid.png", f"classic-{D1}.png"} <= artifacts
    assert artifacts == {p.name for p in e2e["out"].iterdir()}


# ------------------------------------------------------------------ failure paths
def test_empty_results_exit_1_and_write_nothing(tmp_path, monkeypatch, caplog):
    (tmp_path / "results").mkdir()
    assert run_main(tmp_path, monkeypatch) == 1
    assert not (tmp_path / "reports").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml", "results"]  # no store, no temp folder
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "no variant results" in errors[0].getMessage()


def test_failure_leaves_an_existing_report_untouched(tmp_path, monkeypatch):
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "index.html").write_text("previous")
    assert run_main(tmp_path, monkeypatch, results="nowhere") == 1
    assert (tmp_path / "reports" / "index.html").read_text() == "previous"


def test_preflight_runs_before_reading_results(tmp_path, monkeypatch, caplog):
    write_results(tmp_path / "results")
    assert run_main(tmp_path, monkeypatch, store="no/such/folder/mlflow.db") == 1
    assert not (tmp_path / "reports").exists()
    assert "not writable" in caplog.text


def test_bad_params_exit_1(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    params = tmp_path / "params.yaml"
    params.write_text("tracking: {experiment: x}\nreport: {dpi: 5}\ngrid: {depth: [1]}\nremedies: {}\n")
    assert report.main(["--params", str(params), "--results", "results", "--out", "reports"]) == 1
    assert "report.dpi" in caplog.text
    assert not (tmp_path / "reports").exists()


# -------------------------------------------------------------------------- table
def test_summary_table_from_histories_hand_computed():
    variants = {name_of(v): v for v in DEFAULT_VARIANTS}
    table = report.summary_table(histories(), variants).set_index("variant")
    assert list(table.index) == [D1, D2, REMEDY]
    row = table.loc[D1]
    # seed 0 ends at 0.80, seed 1 at 0.90: mean 0.85, population std 0.05
    assert row["accuracy_mean"] == pytest.approx(0.85)
    assert row["accuracy_std"] == pytest.approx(0.05)
    assert row["test_accuracy_mean"] == pytest.approx((0.78 + 0.86) / 2)
    assert row["test_accuracy_std"] == pytest.approx(0.04)
    assert np.isnan(row["vanishing_index_mean"])
    assert (row["seeds"], row["epochs"], row["depth"]) == (2, 5, 1)
    remedy = table.loc[REMEDY]
    assert tuple(remedy[["activation", "loss", "init", "norm"]]) == ("relu", "cross_entropy", "he_normal", "none")


def test_summary_table_prefers_metrics_json():
    variants = {D2: Variant(depth=2)}
    metrics = {D2: {"accuracy": 0.5, "accuracy_std": 0.01, "vanishing_index": 0.03, "vanishing_index_std": 0.002}}
    row = report.summary_table({D2: make_history(2)}, variants, metrics).iloc[0]
    assert (row["accuracy_mean"], row["accuracy_std"]) == (0.5, 0.01)
    assert (row["vanishing_index_mean"], row["vanishing_index_std"]) == (0.03, 0.002)
    assert row["test_accuracy_mean"] == pytest.approx(0.81)  # not in metrics: from the history


def test_format_mean_std():
    assert report.format_mean_std(0.85, 0.05) == "0.8500 ± 0.0500"
    assert report.format_mean_std(0.03, float("nan"), ".3g") == "0.03"
    assert report.format_mean_std(float("nan"), 0.1) == "n/a"


# ------------------------------------------------------------ why the deepest net stalls (issue 12)
def test_stall_section_comes_before_the_remedies_with_captions_from_the_data(e2e):
    page = (e2e["out"] / "index.html").read_text(encoding="utf-8")
    files = {p.name for p in e2e["out"].iterdir()}
    assert {f"activations-{D2}.png", f"saturation-{D2}.png", f"jacobians-{D2}.png", "escape_epochs.png"} <= files
    assert "remedies-saturation-depth-2.png" in files
    # Depth 2 is the deepest classic depth of the synthetic study.
    assert page.index("Gradients") < page.index("5. Why depth 2 stalls") < page.index("6. Remedies")
    assert page.index("6. Remedies") < page.index("7. Results") < page.index("8. Runs")
    # Every synthetic seed leaves epoch 1's accuracy at epoch 2.
    assert "2 of 2 seed(s) escaped, at epoch 2 ± 0 (seed 0: 2, seed 1: 2)" in page
    # hidden_2's saturation is 0.2·(1 - epoch/5): 0.16 in epoch 1, then 0.12, 0.08, 0.04, 0 (mean 0.06).
    assert "averages 0.160 over the 10 epochs before each seed&#39;s escape and 0.060 over the 10 epochs" in page
    assert "(-0.100; 2 of 2 seed(s), median escape epoch 2)" in page
    # Jacobians: 0.2 per layer; prediction 0.2 against the measured first / last ratio 0.2.
    assert "predicts 0.2 for the first / last ratio of ‖∂C/∂b‖ at epoch 1, measured 0.2" in page
    assert f"{REMEDY}: hidden_2 0.160 at epoch 1, 0.000 at epoch 5" in page


def test_metrics_json_carries_the_escape_epoch(tmp_path):
    folder = write_variant(tmp_path / "results", Variant(depth=2))
    metrics = json.loads((folder / "metrics.json").read_text())
    assert (metrics["escape_epoch"], metrics["escape_epoch_std"], metrics["escaped_fraction"]) == (2.0, 0.0, 1.0)
    assert metrics["escape_margin"] == 0.05


def test_stall_section_of_results_without_probe_columns_shows_only_escape_epochs(tmp_path):
    """Results trained before the probe existed: no activation figures, the escape epochs still (from accuracy)."""
    results = write_results(tmp_path / "results")
    for folder in results.iterdir():
        table = make_history(2 if folder.name != D1 else 1)
        table = table[[c for c in table.columns if not c.startswith(("act_", "saturation", "jac_"))]]
        table.to_csv(folder / "history.csv", index=False)
    loaded = report.load_results(results)
    rp = report.ReportParams()
    plots = report.stall_plots(loaded, report.escapes_of(loaded), rp, tmp_path)
    assert [p.file for p in plots] == ["escape_epochs.png"]
    assert report.remedy_saturation_plots(loaded, report.escapes_of(loaded), rp, tmp_path) == []


def test_stall_captions_when_no_seed_escapes(tmp_path):
    folder = write_variant(tmp_path / "results", Variant(depth=2))
    metrics = json.loads((folder / "metrics.json").read_text())
    metrics["escape_margin"] = 0.9  # the summarize stage's margin: no seed gains that much
    (folder / "metrics.json").write_text(json.dumps(metrics))
    (loaded,) = report.load_results(tmp_path / "results")
    escapes = report.escapes_of([loaded])
    text = report.escape_text(escapes[loaded.name])
    assert text == "0 of 2 seed(s) escaped (seed 0: censored at 5, seed 1: censored at 5)"
    caption = report.saturation_caption(loaded, escapes[loaded.name])
    assert "No seed escaped within 5 epochs: hidden_2's saturation goes from 0.160 at epoch 1 to 0.000" in caption
    assert "most saturated hidden layer is hidden_2 (0.160)" in caption
