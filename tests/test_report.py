"""Report stage: loading results, the page it builds (with no tracking store), and the failure paths."""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline import figures, report
from pipeline.params import GridParams, ParamsError, ReportParams, SummaryParams, Variant
from tests.synthetic_results import DEFAULT_STUDY, PARAMS, PLATEAU, write_results, write_variant

D1, D2, REMEDY = DEFAULT_STUDY


def run_main(root: Path, monkeypatch, results: str = "results", params: str = PARAMS) -> int:
    """``report.main`` in ``root`` with the test params; MLFLOW_TRACKING_URI names a server nobody runs."""
    monkeypatch.chdir(root)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    (root / "params.yaml").write_text(params, encoding="utf-8")
    return report.main(["--params", "params.yaml", "--results", results, "--out", "reports"])


# ------------------------------------------------------------------------- loading
def test_study_names_are_the_dvc_stage_items():
    relu = Variant(depth=2, activation="relu")
    names = report.study_names(GridParams(depth=(1, 3)), {"relu": relu})
    assert names == {
        "1-sigmoid-mse-glorot_uniform-none": Variant(depth=1),
        "3-sigmoid-mse-glorot_uniform-none": Variant(depth=3),
        "relu": relu,
    }
    with pytest.raises(ParamsError, match="already in the grid"):
        report.study_names(GridParams(depth=(1,)), {"again": Variant(depth=1)})


def test_load_results_reads_the_study_in_order_and_run_json_is_optional(tmp_path):
    results = write_results(tmp_path / "results")
    write_variant(results, Variant(depth=3))  # trained once, since removed from params: not read
    (results / D2 / "run.json").unlink()  # results without their DVC outputs still make a page
    loaded = report.load_results(results, DEFAULT_STUDY)
    assert [r.name for r in loaded] == [D1, D2, REMEDY]
    first = loaded[0]
    assert first.classic and not loaded[2].classic
    assert (first.seeds, first.epochs) == ([0, 1], 5)
    assert first.metrics["accuracy"] == pytest.approx(0.85)
    assert first.run["runs"] == {"0": f"run{D1.replace('-', '')}s0", "1": f"run{D1.replace('-', '')}s1"}
    assert loaded[1].run == {}


def test_load_results_errors_name_the_problem(tmp_path):
    with pytest.raises(report.ReportError, match="does not exist"):
        report.load_results(tmp_path / "missing", DEFAULT_STUDY)
    results = write_results(tmp_path / "results")
    with pytest.raises(report.ReportError, match="no results for 3-sigmoid"):
        report.load_results(results, {**DEFAULT_STUDY, "3-sigmoid-mse-glorot_uniform-none": Variant(depth=3)})
    run = results / D2 / "run.json"
    run.write_text(json.dumps({"variant": Variant(depth=2, loss="cross_entropy").model_dump()}))
    with pytest.raises(report.ReportError, match=f"{D2}: trained as another variant"):
        report.load_results(results, DEFAULT_STUDY)
    run.write_text("{not json")
    with pytest.raises(report.ReportError, match=r"run\.json: cannot be read as JSON"):
        report.load_results(results, DEFAULT_STUDY)
    run.unlink()
    (results / D2 / "history.csv").write_text("epoch,loss\n1,0.3\n")
    with pytest.raises(report.ReportError, match="missing column"):
        report.load_results(results, DEFAULT_STUDY)


def test_remedy_groups_put_the_classic_variant_first(tmp_path):
    loaded = report.load_results(write_results(tmp_path / "results"), DEFAULT_STUDY)
    assert {depth: [r.name for r in group] for depth, group in report.remedy_groups(loaded).items()} == {
        2: [D2, REMEDY]
    }


# -------------------------------------------------------------------------- tables
def test_summary_table_takes_metrics_json_as_written(tmp_path):
    """The metrics.json contract: every value is taken as the summarize stage wrote it; a null (a diverged
    seed) or a missing key shows as n/a."""
    folder = write_variant(tmp_path / "results", Variant(depth=2))
    metrics = json.loads((folder / "metrics.json").read_text())
    metrics.update(accuracy=0.5, accuracy_std=0.01, test_accuracy=None, test_accuracy_std=None)
    del metrics["vanishing_index"]
    (folder / "metrics.json").write_text(json.dumps(metrics))
    row = report.summary_table(report.load_results(tmp_path / "results", {D2: Variant(depth=2)})).iloc[0]
    assert (row["accuracy_mean"], row["accuracy_std"]) == (0.5, 0.01)
    assert np.isnan(row["test_accuracy_mean"]) and np.isnan(row["vanishing_index_mean"])
    assert (row["escape_epoch_mean"], row["escaped_fraction"], row["seeds"], row["epochs"]) == (3, 1, 2, 5)
    assert report.format_mean_std(row["test_accuracy_mean"], row["test_accuracy_std"]) == "n/a"


def test_formatting():
    assert report.format_mean_std(0.85, 0.05) == "0.8500 ± 0.0500"
    assert report.format_mean_std(0.03, float("nan"), ".3g") == "0.03"
    assert report.format_mean_std(float("nan"), 0.1) == "n/a"
    assert report.escape_cell(142.4, 11.2, 1.0) == "142 ± 11"
    assert report.escape_cell(131.0, 4.0, 0.6) == "131 ± 4 (60% of seeds)"
    assert report.escape_cell(np.nan, np.nan, 0.0) == "none escaped"
    assert report.escape_cell(np.nan, np.nan, np.nan) == "n/a"  # results without an escape epoch


def test_run_links_follow_the_tracking_server_or_the_ui_url(tmp_path):
    results = write_results(tmp_path / "results")
    server = json.loads((results / D2 / "run.json").read_text()) | {"tracking_uri": "https://alice:***@ml.example.org/"}
    (results / D2 / "run.json").write_text(json.dumps(server))
    loaded = report.load_results(results, DEFAULT_STUDY)
    links = {row["variant"]: row["link"] for row in report.run_rows(loaded, "http://127.0.0.1:5077")}
    mode = "?workflowType=machine_learning"  # the UI opens the run in Model training mode
    assert links[D1] == f"http://127.0.0.1:5077/#/experiments/7/runs/run{D1.replace('-', '')}s1{mode}"
    assert links[D2] == f"https://ml.example.org/#/experiments/7/runs/run{D2.replace('-', '')}s1{mode}"  # no password
    assert {row["link"] for row in report.run_rows(loaded[:1], None)} == {None}


# ---------------------------------------------------------------------- the page
@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One full run of ``main`` on a synthetic results folder, with no tracking store anywhere."""
    root = tmp_path_factory.mktemp("report")
    write_results(root / "results")
    with pytest.MonkeyPatch.context() as mp:
        code = run_main(root, mp)
    page = (root / "reports" / "index.html").read_text(encoding="utf-8") if code == 0 else ""
    return {"code": code, "root": root, "out": root / "reports", "page": page}


def test_main_writes_the_report_and_needs_no_store(built):
    assert built["code"] == 0
    files = {p.name for p in built["out"].iterdir()}
    assert {
        "index.html",
        "summary.md",
        "plots",
        "accuracy_by_depth.png",
        "first_layer_change.png",
        "sigmoid.png",
    } <= files
    assert {f"gradients-{D2}.png", "remedies-depth-2.png", "remedies-saturation-depth-2.png"} <= files
    assert {f"bands-{name}.png" for name in DEFAULT_STUDY} <= files
    assert {f"{kind}-{D2}.png" for kind in ("signal", "saturation", "jacobians")} | {"escape_epochs.png"} <= files
    assert "escape_forecast.png" not in files  # every synthetic seed escapes within the forecast window
    assert sorted(p.name for p in built["root"].iterdir()) == ["params.yaml", "reports", "results"]  # no store, no temp


def test_page_is_self_contained_with_every_figure_at_its_natural_width(built):
    page = built["page"]
    assert not re.search(r"<(script|link|iframe)\b", page)
    images = re.findall(r'<img src="data:image/png;base64,([^"]+)" style="width:(\d+)px"', page)
    assert len(images) == len(list(built["out"].glob("*.png")))
    for png, width in images:
        import base64

        data = base64.b64decode(png)
        assert int(width) == round(figures.WIDTH * figures.PX_PER_INCH)  # the page's column, whatever the dpi
        assert struct.unpack(">I", data[16:20])[0] == round(figures.WIDTH * 40)  # the PNG at report.dpi
        assert data[25] == 3  # colour type 3: a palette PNG
    external = re.findall(r'href="(https?://[^"]+)"', page)
    assert external and all(u.startswith("http://127.0.0.1:5077/#/experiments/7/runs/") for u in external)
    assert "report.ui_url" in page and "make ui" in page


def test_page_opens_with_a_summary_and_a_table_of_contents(built):
    page = built["page"]
    summary = re.search(r"<h1>.*?</h1>\s*<p class=summary>(.*?)</p>", page, re.S)[1]
    assert len(re.findall(r"[.!?](\s|$)", summary)) == 3
    assert "end at a training accuracy of 0.850 (depth 1), 0.840 (depth 2)" in summary
    assert "the first hidden layer&#39;s gradient is 0.2 (depth 2) times the last one&#39;s" in summary
    assert "escapes its plateau at epoch 3 ± 0 (2 of 2 seeds)" in summary
    assert f"the best remedy, {REMEDY}, ends at 0.840 against the classic net&#39;s 0.840" in summary
    anchors = re.findall(r'<li><a href="#([a-z]+)">', page)
    assert anchors == ["setup", "classic", "replicates", "gradients", "stall", "remedies", "results", "runs"]
    for anchor in anchors:  # every section opens with its conclusion
        assert re.search(rf'<h2 id="?{anchor}"?>[^<]*</h2>\s*<p class=conclusion>\S', page), anchor


def test_section_conclusions_come_from_the_numbers(built):
    page = built["page"]
    assert "Final training accuracy by depth: 0.8500 (depth 1), 0.8400 (depth 2); the first hidden layer" in page
    # Weight change of hidden_1 at depth 2 is 0.2× depth 1's (synthetic: a factor 0.2 per layer below the last).
    assert "change 0.2× as much per epoch at depth 2 as at depth 1" in page
    assert f"spread most for {D1} (std 0.0500)" in page
    assert "1 of 1 remedies end above" not in page and "0 of 1 remedies end above the classic net" in page
    assert f"{REMEDY} reaches the highest test accuracy" not in page  # D1: 0.82 is the highest
    assert f"{D1} reaches the highest test accuracy (0.8200)" in page


def test_gradients_section_says_why_the_index_and_the_medians_differ(built):
    page = built["page"]
    assert "times the last one&#39;s (the vanishing index), against (1/4)^(L−1) = 0.25 from σ&#39; alone" in page
    # Every synthetic layer's speed is 0.2 of the next one's: the medians, their product and the index agree.
    assert "averaged over the first 3 epochs only, which is why they differ" in page
    assert f"For {D2} the adjacent medians are 0.2 over the first 3 epochs (product 0.2; index 0.2)" in page


def test_stall_section_and_saturation_captions(built):
    page = built["page"]
    # Depth 2 is the deepest classic depth; every seed escapes at epoch 3 (past the plateau 0.4 + 0.05).
    assert page.index("4. Gradients") < page.index("5. Why depth 2 stalls") < page.index("6. Remedies")
    # Epochs 1-2 come before the escape: accuracy 0.1 + (0.79 or 0.89 - 0.1)·epoch/5, on average 0.086 from 0.4.
    assert f"{D2} escapes its plateau at epoch 3 ± 0 (2 of 2 seeds); until then its training accuracy is on " in page
    assert (
        "average 0.086 from it (the constant predictor&#39;s accuracy, 0.4000): at epoch 1 its layers pass on " in page
    )
    assert "output 0.20 of the signal they receive, so its output varies 40 times less from image to image" in page
    ratios = f"The output&#39;s signal over the input&#39;s at epoch 1: {D2} 0.025, {REMEDY} 0.025."
    assert f"Escape of each seed: seed 0: 3, seed 1: 3. {ratios}" in page
    # hidden_2's saturation is 0.2·(1 - epoch/5): epochs 1–2 average 0.140, epochs 3–5 0.040.
    assert (
        "saturated fraction averages 0.140 over the 10 epochs before each escape and 0.040 over the 10 from it" in page
    )
    relu = re.findall(r"<figcaption>Saturated: [^<]*for ReLU \(f&#39; = 0 where u ≤ 0\) an inactive unit", page)
    assert len(relu) == 2  # both saturation captions say what saturated means for ReLU
    assert f"{REMEDY} 0.160 → 0.000" in page
    assert (
        "Signal of each layer at epoch 1 and 5: hidden_1 0.1 → 0.1, hidden_2 0.025 → 0.025, output 0.005 → 0.005"
        in page
    )
    assert "First / last ‖∂C/∂b‖ at epoch 1: predicted 0.2, measured 0.2" in page


def test_summary_markdown_and_plot_data(built):
    text = (built["out"] / "summary.md").read_text(encoding="utf-8")
    assert "| variant | final accuracy | test accuracy | vanishing index | escape epoch |" in text
    assert f"| {D2} | 0.8400 ± 0.0500 | 0.8100 ± 0.0400 | 0.2 ± 0 | 3 ± 0 |" in text
    curves = (built["out"] / "plots" / "curves.csv").read_text().splitlines()
    colors = figures.variant_colors(DEFAULT_STUDY)
    assert curves[0].startswith("variant,color,depth,epoch") and f"{REMEDY},{colors[REMEDY]},2,1," in curves[-5]


# ------------------------------------------------------------------ failure paths
def test_empty_results_exit_1_and_write_nothing(tmp_path, monkeypatch, caplog):
    (tmp_path / "results").mkdir()
    assert run_main(tmp_path, monkeypatch) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml", "results"]  # no report, no temp folder
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "no results for" in errors[0].getMessage()


def test_failure_leaves_an_existing_report_untouched(tmp_path, monkeypatch):
    write_results(tmp_path / "results")
    metrics = tmp_path / "results" / D2 / "metrics.json"
    metrics.write_text(json.dumps({k: v for k, v in json.loads(metrics.read_text()).items() if k != "plateau"}))
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "index.html").write_text("previous")
    assert run_main(tmp_path, monkeypatch) == 1
    assert (tmp_path / "reports" / "index.html").read_text() == "previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml", "reports", "results"]


def test_bad_params_exit_1(tmp_path, monkeypatch, caplog):
    assert run_main(tmp_path, monkeypatch, params=PARAMS.replace("dpi: 40", "dpi: 5")) == 1
    assert "report.dpi" in caplog.text
    assert run_main(tmp_path, monkeypatch, params=PARAMS.replace("http://127", "127")) == 1
    assert "report.ui_url" in caplog.text
    assert not (tmp_path / "reports").exists()


def test_report_params_default_to_no_links():
    assert ReportParams().ui_url is None


def test_stall_section_forecasts_the_escape_of_seeds_still_on_the_plateau(tmp_path):
    """Past a 2-epoch window every seed is still on the plateau (it escapes at epoch 3), and 1 / signal/output
    falls linearly, reaching 0 at epoch 1 / 0.15: the forecast is 6.67 for every seed, 122 % late."""
    from pipeline.history import summarize

    results = write_results(tmp_path / "results")
    for name in (D2, REMEDY):
        table = pd.read_csv(results / name / "history.csv")
        table["signal/output"] = 0.005 / (1 - 0.15 * table["epoch"])
        table.to_csv(results / name / "history.csv", index=False)
        metrics = summarize(table, SummaryParams(index_window=3, forecast_epochs=2), plateau=PLATEAU)
        (results / name / "metrics.json").write_text(json.dumps(metrics))
    (tmp_path / "out").mkdir()
    report.build_report(report.load_results(results, DEFAULT_STUDY), ReportParams(dpi=30), 3, tmp_path / "out")
    page = (tmp_path / "out" / "index.html").read_text(encoding="utf-8")
    assert (tmp_path / "out" / "escape_forecast.png").is_file()
    assert (
        "From its first 2 epochs the escape is forecast at epoch 7 ± 0 (mean |forecast − actual| / actual: 122%)"
        in page
    )
    assert f"Forecast: {D2} at epoch 7 ± 0 (mean |forecast − actual| / actual: 122%); {REMEDY} at epoch 7" in page


def test_a_study_whose_window_is_every_epoch_and_no_seed_escapes(tmp_path):
    """The index window as long as the run (the e2e profile: 2 epochs), and no seed past the plateau."""
    results = write_results(tmp_path / "results")
    for name in DEFAULT_STUDY:
        metrics = json.loads((results / name / "metrics.json").read_text()) | {"escape_margin": 0.9}
        (results / name / "metrics.json").write_text(json.dumps(metrics))
    (tmp_path / "out").mkdir()
    report.build_report(report.load_results(results, DEFAULT_STUDY), ReportParams(dpi=30), 5, tmp_path / "out")
    page = (tmp_path / "out" / "index.html").read_text(encoding="utf-8")
    assert f"{D2} escapes its plateau in none of 2 seeds within 5 epochs; until then its training accuracy" in page
    assert "the adjacent medians are 0.2 over the first 5 epochs (product 0.2; index 0.2) and 0.2 over all 5" in page
