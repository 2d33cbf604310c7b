"""Report stage: turn every variant's training results into one self-contained study page.

``python -m pipeline.report --params params.yaml --results results --out reports``

Reads every ``results/<name>/`` folder holding ``history.csv``, ``metrics.json`` and
``run.json`` (written by the train stage), draws the figures of :mod:`pipeline.figures`
and writes ``<out>/index.html`` (images embedded, no external resources), the same
figures as PNG files, ``<out>/summary.md`` and, for ``dvc plots``, the seed-mean curves
in ``<out>/plots/``. Everything is built in a temporary
folder beside ``--out``, logged to MLflow as the artifacts of one run named ``report``,
and only then moved into place, so a failure leaves no half-written report.

Depends on the ``report`` and ``tracking`` sections of params.yaml, and on ``grid`` and
``remedies`` only to know which variants belong to the study (folders of variants since
removed are skipped); how they were trained (seeds, epochs) is read from the results.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import itertools
import json
import logging
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from pipeline import curves, figures, tracking
from pipeline.outputs import staged_dir
from pipeline.params import ParamsError, ReportParams, TrackingParams, Variant, check_file, load_section, study_variants

log = logging.getLogger(__name__)

REQUIRED_FILES = ("history.csv", "metrics.json", "run.json")
REQUIRED_COLUMNS = ("seed", "epoch", "accuracy")
LOCAL_UI = "http://127.0.0.1:5000/"
STAGE = "report"
CLASSIC = ("sigmoid", "mse", "glorot_uniform", "none")  # activation, loss, init, norm


class ReportError(RuntimeError):
    """The results cannot be reported; the message names the file and what to do."""


# --------------------------------------------------------------------------- loading
@dataclass(frozen=True)
class VariantResult:
    """One trained variant: its folder, settings, per-epoch history, final metrics and run info."""

    folder: Path
    variant: Variant
    history: pd.DataFrame
    metrics: dict[str, float]
    run: dict[str, Any]

    @property
    def label(self) -> str:
        return self.variant.label

    @property
    def classic(self) -> bool:
        return is_classic(self.variant)

    @property
    def seeds(self) -> list[int]:
        return [int(s) for s in self.run.get("seeds") or sorted(self.history["seed"].unique())]

    @property
    def epochs(self) -> int:
        return int(self.history["epoch"].max())

    @property
    def run_ids(self) -> dict[str, str]:
        return {str(seed): str(run_id) for seed, run_id in (self.run.get("runs") or {}).items()}


def is_classic(variant: Variant) -> bool:
    """Nielsen's setup: sigmoid, quadratic cost, Glorot initialisation, no normalisation."""
    return (variant.activation, variant.loss, variant.init, variant.norm) == CLASSIC


def load_variant(folder: Path) -> VariantResult:
    """Read one results folder; ReportError names the file that is missing or malformed."""
    try:
        history = pd.read_csv(folder / "history.csv")
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise ReportError(f"{folder / 'history.csv'}: cannot be read ({exc})") from exc
    missing = [c for c in REQUIRED_COLUMNS if c not in history.columns]
    if missing or history.empty:
        raise ReportError(f"{folder / 'history.csv'}: missing column(s) {missing} or no rows; rerun the train stage")
    metrics, run = _read_json(folder / "metrics.json"), _read_json(folder / "run.json")
    try:
        variant = Variant(**run["variant"])
    except (KeyError, TypeError, ParamsError) as exc:
        raise ReportError(f"{folder / 'run.json'}: no valid 'variant' ({exc})") from exc
    if figures.depth_of(history) not in (0, variant.depth):
        raise ReportError(f"{folder / 'history.csv'}: has {figures.depth_of(history)} layers, run.json says {variant}")
    return VariantResult(folder, variant, history, metrics, run)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ReportError(f"{path}: cannot be read as JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ReportError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def load_results(results: Path, study: Sequence[Variant] | None = None) -> list[VariantResult]:
    """Every variant folder under ``results`` (hidden folders skipped), in study order.

    With ``study``, only those variants are kept (folders left by variants since removed
    from params are skipped), and each of them must have results.
    """
    if not results.is_dir():
        raise ReportError(f"results folder {results} does not exist; run the train stage first (dvc repro)")
    folders = sorted(
        p
        for p in results.iterdir()
        if p.is_dir() and not p.name.startswith(".") and all((p / name).is_file() for name in REQUIRED_FILES)
    )
    if not folders:
        raise ReportError(
            f"no variant results in {results}: expected {results}/<variant>/{{{','.join(REQUIRED_FILES)}}}; "
            "run the train stage first (dvc repro)"
        )
    loaded = [load_variant(folder) for folder in folders]
    seen: dict[str, Path] = {}
    for result in loaded:
        if result.label in seen:
            raise ReportError(f"{seen[result.label]} and {result.folder} both hold variant {result.label}")
        seen[result.label] = result.folder
    if study is not None:
        wanted = set(study)
        for result in loaded:
            if result.variant not in wanted:
                log.info("skipping %s: %s is not in the study's params (grid, remedies)", result.folder, result.label)
        loaded = [result for result in loaded if result.variant in wanted]
        missing = sorted(v.label for v in wanted - {result.variant for result in loaded})
        if missing:
            raise ReportError(f"no results for {', '.join(missing)} in {results}; run their train stages (dvc repro)")
    return sorted(loaded, key=study_order)


def study_order(result: VariantResult) -> tuple[bool, int, str]:
    """Classic variants by depth first, then remedies by depth and name."""
    return (not result.classic, result.variant.depth, result.label)


def remedy_groups(results: Sequence[VariantResult]) -> dict[int, list[VariantResult]]:
    """Per depth that has a remedy: the classic variant of that depth (if trained), then the remedies."""
    groups: dict[int, list[VariantResult]] = {}
    for depth in sorted({r.variant.depth for r in results if not r.classic}):
        at_depth = [r for r in results if r.variant.depth == depth]
        groups[depth] = [r for r in at_depth if r.classic] + [r for r in at_depth if not r.classic]
    return groups


def ui_base(uri: str) -> str:
    """The MLflow UI for runs logged at ``uri``: the server itself, else the local ``make ui`` address."""
    return uri.rstrip("/") + "/" if uri.startswith(("http://", "https://")) else LOCAL_UI


def run_link(base: str, experiment_id: str, run_id: str) -> str:
    """Link to one run in the MLflow UI."""
    return f"{base}#/experiments/{experiment_id}/runs/{run_id}"


# ------------------------------------------------------------------- computed text
def histories(results: Iterable[VariantResult]) -> dict[str, pd.DataFrame]:
    """Label -> history."""
    return {r.label: r.history for r in results}


def mean_later_change(history: pd.DataFrame, column: str = "weight_change/hidden_1") -> float:
    """Mean of ``column`` over epochs >= 2 and seeds (the first epoch's large change left out)."""
    later = history.loc[history["epoch"] >= 2, column] if column in history else pd.Series(dtype=float)
    return float(later.mean()) if len(later) else float("nan")


def median_layer_ratios(history: pd.DataFrame) -> dict[str, float]:
    """Per adjacent layer pair, the median over epochs of the seed-mean speed ratio (earlier / next)."""
    columns = figures.layer_columns(history, figures.speed_kind(history))
    out = {}
    for earlier, later in itertools.pairwise(columns):
        name = f"{figures.layer_name(earlier)}/{figures.layer_name(later)}"
        stats = figures.seed_stats(figures.with_ratio(history, earlier, later, name), name)
        out[name] = float(stats["mean"].median())
    return out


def _num(value: float, fmt: str = ".4f") -> str:
    return format(value, fmt) if np.isfinite(value) else "n/a"


def _quarter() -> str:
    return f"1/{1 / figures.SIGMOID_BOUND:.0f}"


# --------------------------------------------------------------------------- figures
@dataclass(frozen=True)
class Plot:
    """A saved figure: file name in the report folder, caption and PNG bytes."""

    file: str
    caption: str
    png: bytes


def render(fig: Figure, folder: Path, file: str, dpi: int, caption: str) -> Plot:
    """Save ``fig`` as ``folder/file`` and release it; returns the bytes for embedding."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    fig.clear()  # Figures made without pyplot are not registered anywhere: clearing releases them.
    png = buffer.getvalue()
    (folder / file).write_bytes(png)
    return Plot(file, caption, png)


def classic_plots(
    results: Sequence[VariantResult], summary: pd.DataFrame, rp: ReportParams, folder: Path
) -> list[Plot]:
    """Nielsen's figures for the classic variants: per depth, then across depths, then σ and σ'."""
    classic = [r for r in results if r.classic]
    plots = []
    for r in classic:
        seed = int(r.history["seed"].min())
        fig = figures.classic_figure(figures.one_seed(r.history), f"{r.label} (seed {seed})", rp.change_clip_quantile)
        seeds = int(summary.set_index("variant").loc[r.label, "seeds"])
        caption = (
            f"{r.label}, seed {seed}: training accuracy and weight change per hidden layer. "
            f"Final training accuracy over {seeds} seed(s): {final_accuracy(summary, r.label)}."
        )
        plots.append(render(fig, folder, f"classic-{r.label}.png", rp.dpi, caption))
    if not classic:
        return plots
    hs = histories(classic)
    changes = {r.label: mean_later_change(r.history) for r in classic}
    base_label, base = next(iter(changes.items()))
    relative = ", ".join(
        f"{label} {_num(change, '.3g')} ({_num(change / base, '.3g')}× {base_label})"
        for label, change in changes.items()
    )
    plots += [
        render(
            figures.accuracy_by_depth(hs), folder, "accuracy_by_depth.png", rp.dpi, _accuracy_caption(classic, summary)
        ),
        render(
            figures.first_layer_change(hs),
            folder,
            "first_layer_change.png",
            rp.dpi,
            f"Weight change of the first hidden layer (log scale). Mean over epochs ≥ 2 and seeds: {relative}.",
        ),
        render(
            figures.final_accuracy_vs_depth(figures.final_values(hs)),
            folder,
            "final_accuracy_vs_depth.png",
            rp.dpi,
            "Final training accuracy against depth: mean ± std over seeds, and each seed's value.",
        ),
        render(
            figures.sigmoid_figure(),
            folder,
            "sigmoid.png",
            rp.dpi,
            f"σ and σ'. σ' never exceeds σ'(0) = {_quarter()} = {figures.SIGMOID_BOUND:g}, so back-propagating "
            f"through each sigmoid layer scales the error by at most {figures.SIGMOID_BOUND:g} (times the weights).",
        ),
    ]
    return plots


def final_accuracy(summary: pd.DataFrame, label: str) -> str:
    """Final training accuracy of variant ``label``: mean ± std over its seeds."""
    row = summary.set_index("variant").loc[label]
    return figures.format_mean_std(row["accuracy_mean"], row["accuracy_std"])


def _accuracy_caption(classic: Sequence[VariantResult], summary: pd.DataFrame) -> str:
    finals = ", ".join(f"{r.label} {final_accuracy(summary, r.label)}" for r in classic)
    return f"Training accuracy of the classic networks by depth. Final accuracy (mean ± std over seeds): {finals}."


def band_plots(results: Sequence[VariantResult], rp: ReportParams, folder: Path) -> list[Plot]:
    """Replicate spread of every variant."""
    return [
        render(
            figures.bands_figure(r.history, r.label, rp.change_clip_quantile),
            folder,
            f"bands-{r.label}.png",
            rp.dpi,
            f"{r.label}: seeds {', '.join(map(str, sorted(r.history['seed'].unique())))}; {figures.BAND_NOTE}.",
        )
        for r in results
    ]


def gradient_plots(results: Sequence[VariantResult], rp: ReportParams, folder: Path) -> list[Plot]:
    """Per-layer gradients and layer ratios of every variant that logged gradients."""
    plots = []
    for r in results:
        if not figures.has_gradients(r.history):
            log.info("%s: no gradient columns in %s; gradient figure skipped", r.label, r.folder / "history.csv")
            continue
        ratios = median_layer_ratios(r.history)
        if ratios:
            listed = ", ".join(f"{name} {_num(value, '.3g')}" for name, value in ratios.items())
            text = f"Median layer-to-layer ratio over epochs: {listed}; the σ' bound is {figures.SIGMOID_BOUND:g}."
        else:
            text = "One hidden layer: no layer-to-layer ratio."
        plots.append(
            render(figures.gradient_figure(r.history, r.label), folder, f"gradients-{r.label}.png", rp.dpi, text)
        )
    return plots


def remedy_plots(results: Sequence[VariantResult], summary: pd.DataFrame, rp: ReportParams, folder: Path) -> list[Plot]:
    """One figure per depth that has remedies, with the classic variant of that depth alongside."""
    table = summary.set_index("variant")
    plots = []
    for depth, group in remedy_groups(results).items():
        facts = "; ".join(
            f"{r.label}: final accuracy {final_accuracy(summary, r.label)}, "
            f"vanishing index "
            f"{figures.format_mean_std(table.loc[r.label, 'vanishing_index_mean'], np.nan, '.3g')}"
            for r in group
        )
        fig = figures.remedies_figure(histories(group))
        plots.append(render(fig, folder, f"remedies-depth-{depth}.png", rp.dpi, f"Depth {depth}. {facts}."))
    return plots


def held_out_plots(results: Sequence[VariantResult], rp: ReportParams, folder: Path) -> list[Plot]:
    """Test beside training accuracy, when any variant logged test accuracy."""
    hs = {label: h for label, h in histories(results).items() if figures.has_test(h)}
    if not hs:
        return []
    caption = "Held-out (test) accuracy beside training accuracy for every variant."
    return [render(figures.test_vs_train_figure(hs), folder, "test_vs_train.png", rp.dpi, caption)]


# ------------------------------------------------------------------------------ html
CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1000px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.5}
h1{font-size:1.7em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:1em 0;font-size:.92em}
th,td{border:1px solid #ccc;padding:.3em .6em;text-align:left}th{background:#f3f3f3}
td.num{text-align:right;font-variant-numeric:tabular-nums}
figure{margin:1.5em 0}figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{font-size:.9em;color:#555}.note{background:#f8f8e8;padding:.5em 1em;border-left:3px solid #cc9}
code{background:#f3f3f3;padding:0 .2em}
"""


def esc(value: Any) -> str:
    """HTML-escaped text."""
    return html.escape(str(value), quote=True)


def html_table(header: Sequence[str], rows: Iterable[Sequence[Any]], numeric: Iterable[int] = ()) -> str:
    """A table; cells are escaped unless wrapped in :class:`Raw`; ``numeric`` columns are right-aligned."""
    numeric = set(numeric)
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join(
        "<tr>"
        + "".join(
            f"<td{' class=num' if i in numeric else ''}>{cell if isinstance(cell, Raw) else esc(cell)}</td>"
            for i, cell in enumerate(row)
        )
        + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


class Raw(str):
    """HTML that must not be escaped again."""

    __slots__ = ()


def figure_html(plot: Plot) -> str:
    """An embedded image with its caption."""
    data = base64.b64encode(plot.png).decode("ascii")
    return (
        f'<figure><img src="data:image/png;base64,{data}" alt="{esc(plot.caption)}">'
        f"<figcaption>{esc(plot.caption)} <code>{esc(plot.file)}</code></figcaption></figure>"
    )


def setup_section(results: Sequence[VariantResult], rp: ReportParams, tp: TrackingParams, uri: str) -> str:
    """What was trained (from the results) and how this report was made (its params)."""
    rows = [
        (
            r.label,
            r.variant.depth,
            r.variant.activation,
            r.variant.loss,
            r.variant.init,
            r.variant.norm,
            ", ".join(map(str, r.seeds)),
            r.epochs,
            "classic" if r.classic else "remedy",
            r.folder.name,
        )
        for r in results
    ]
    variants = html_table(
        ["variant", "depth", "activation", "loss", "init", "norm", "seeds", "epochs", "kind", "folder"], rows, [1, 7]
    )
    settings = html_table(
        ["setting", "value"],
        [
            ("report.change_clip_quantile", rp.change_clip_quantile),
            ("report.dpi", rp.dpi),
            ("tracking.experiment", tp.experiment),
            ("tracking URI", uri),
        ],
    )
    return f"<h2>1. Setup</h2><p>The variants trained, as recorded in their results:</p>{variants}{settings}"


def intro(results: Sequence[VariantResult]) -> str:
    """Opening paragraph, every number taken from the results."""
    classic = [r for r in results if r.classic]
    seeds = sorted({len(r.seeds) for r in results})
    epochs = sorted({r.epochs for r in results})
    return (
        "<p>Each network is a multilayer perceptron trained on MNIST with plain SGD. Back-propagation multiplies "
        "the error reaching a hidden layer by the derivative of that layer's activation; for the sigmoid that "
        f"derivative never exceeds σ'(0) = {esc(_quarter())}, so in the classic setup the error shrinks on its way "
        "back and the first layers may learn slowest; the figures below measure whether they do. "
        f"This report covers {len(results)} variant(s): {len(classic)} classic network(s) with "
        f"{esc(', '.join(str(r.variant.depth) for r in classic) or 'no')} hidden layer(s), and "
        f"{len(results) - len(classic)} remedy variant(s); each trained for {esc(' / '.join(map(str, epochs)))} "
        f"epochs with {esc(' / '.join(map(str, seeds)))} replicate seed(s).</p>"
    )


def results_section(summary: pd.DataFrame, held_out: Sequence[Plot]) -> str:
    """Held-out accuracy and the table of final values."""
    rows = [
        (
            row.variant,
            row.depth,
            row.seeds,
            figures.format_mean_std(row.accuracy_mean, row.accuracy_std),
            figures.format_mean_std(row.test_accuracy_mean, row.test_accuracy_std),
            figures.format_mean_std(row.vanishing_index_mean, row.vanishing_index_std, ".3g"),
        )
        for row in summary.itertuples(index=False)
    ]
    table = html_table(
        ["variant", "depth", "seeds", "final training accuracy", "test accuracy", "vanishing index"],
        rows,
        [1, 2, 3, 4, 5],
    )
    return (
        "<h2>6. Results</h2>"
        + "".join(figure_html(p) for p in held_out)
        + "<p>Final-epoch values, mean ± std over replicate seeds. The vanishing index is the first hidden layer's "
        "speed of learning (‖∂C/∂b‖) divided by the last hidden layer's, averaged over the early epochs: below 1 "
        "the first layer learns slower.</p>" + table
    )


def runs_section(results: Sequence[VariantResult], uri: str) -> str:
    """Every training run, linked to the MLflow UI."""
    rows, local = [], False
    for r in results:
        base = ui_base(str(r.run.get("tracking_uri") or uri))
        local = local or base == LOCAL_UI
        experiment = str(r.run.get("experiment_id", ""))
        for seed, run_id in r.run_ids.items():
            link = run_link(base, experiment, run_id)
            rows.append((r.label, seed, experiment, Raw(f'<a href="{esc(link)}">{esc(run_id)}</a>')))
    note = (
        f'<p class="note">The links open the local MLflow UI at {esc(LOCAL_UI)}: '
        "start it with <code>make ui</code>.</p>"
        if local
        else ""
    )
    return "<h2>7. Runs</h2>" + note + html_table(["variant", "seed", "experiment", "MLflow run"], rows, [1, 2])


def section(title: str, text: str, plots: Sequence[Plot]) -> str:
    """A heading, a paragraph and its figures (nothing when there are no figures)."""
    if not plots:
        return f"<h2>{esc(title)}</h2><p>No data for this section in these results.</p>"
    return f"<h2>{esc(title)}</h2><p>{esc(text)}</p>" + "".join(figure_html(p) for p in plots)


def build_report(
    results: Sequence[VariantResult], rp: ReportParams, tp: TrackingParams, uri: str, folder: Path
) -> pd.DataFrame:
    """Write the PNGs, ``index.html`` and ``summary.md`` into ``folder``; returns the summary table."""
    summary = figures.summary_table(
        histories(results), {r.label: r.variant for r in results}, {r.label: r.metrics for r in results}
    )
    classic = classic_plots(results, summary, rp, folder)
    bands = band_plots(results, rp, folder)
    gradients = gradient_plots(results, rp, folder)
    remedies = remedy_plots(results, summary, rp, folder)
    held_out = held_out_plots(results, rp, folder)
    q = _quarter()
    body = [
        "<h1>The vanishing-gradient problem on MNIST</h1>",
        intro(results),
        setup_section(results, rp, tp, uri),
        section(
            "2. The classic picture",
            "Nielsen's figures: for each depth, training accuracy and how much each hidden layer's weights change "
            "per epoch; then all depths together.",
            classic,
        ),
        section(
            "3. Across replicates",
            "The same quantities over every replicate seed: the spread shows what is signal and what is seed noise.",
            bands,
        ),
        section(
            f"4. Gradients against the {q} bound",
            "Per-layer gradients on a fixed probe batch at the end of each epoch, and the ratio of each layer's "
            f"gradient to the next layer's; a sigmoid layer can pass back at most {q} of the error it receives "
            "(times its weights).",
            gradients,
        ),
        section(
            "5. Remedies",
            "Each remedy at its depth beside the classic network of the same depth: training accuracy and the ratio "
            "of the first to the last hidden layer's gradient.",
            remedies,
        ),
        results_section(summary, held_out),
        runs_section(results, uri),
    ]
    page = (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        "<title>Vanishing-gradient study</title>"
        f"<style>{CSS}</style></head><body>{''.join(body)}</body></html>\n"
    )
    (folder / "index.html").write_text(page, encoding="utf-8")
    (folder / "summary.md").write_text(summary_markdown(summary), encoding="utf-8")
    curves.write_plot_data(histories(results), folder / "plots")  # seed means for `dvc plots show`
    return summary


def summary_markdown(summary: pd.DataFrame) -> str:
    """A short Markdown table of the final values."""
    lines = [
        "# Vanishing-gradient study: results",
        "",
        "Final-epoch values, mean ± std over replicate seeds.",
        "",
        "| variant | final accuracy | test accuracy | vanishing index |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {row.variant} | {figures.format_mean_std(row.accuracy_mean, row.accuracy_std)} "
        f"| {figures.format_mean_std(row.test_accuracy_mean, row.test_accuracy_std)} "
        f"| {figures.format_mean_std(row.vanishing_index_mean, row.vanishing_index_std, '.3g')} |"
        for row in summary.itertuples(index=False)
    ]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------- output
def log_report(uri: str, experiment: str, folder: Path, params_file: Path) -> str:
    """Log every file in ``folder`` as artifacts of one run named ``report``; returns its run id."""
    root = tracking.project_root()
    client = tracking.open_store(uri)
    experiment_id = tracking.ensure_experiment(client, experiment, root)
    tags = tracking.lineage_tags(root, STAGE, params_file)
    try:
        with tracking.run_set(client, experiment_id, [STAGE], tags) as runs:
            client.log_artifacts(runs.run_ids[0], str(folder))
            runs.stop.check()  # a signal during the upload: the run ends KILLED, no report is written
    except Exception as exc:  # the run is already marked FAILED; report one clear line
        raise tracking.TrackingError(f"logging the report to MLflow at {uri} failed: {exc}") from exc
    return runs.run_ids[0]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pipeline.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file (report, tracking)")
    parser.add_argument("--results", type=Path, default=Path("results"), help="folder of variant results")
    parser.add_argument("--out", type=Path, default=Path("reports"), help="report folder (replaced)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the stage; 0 on success, 1 with one error line on a known failure (nothing written)."""
    args = parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        check_file(args.params)
        rp: ReportParams = load_section("report", args.params)
        tp: TrackingParams = load_section("tracking", args.params)
        uri = tracking.tracking_uri()
        tracking.preflight(uri)
        study = study_variants(load_section("grid", args.params), load_section("remedies", args.params))
        results = load_results(args.results, study)
    except (ParamsError, tracking.TrackingError, ReportError) as exc:
        print(f"report: error: {exc}", file=sys.stderr)
        return 1
    out: Path = args.out
    try:
        with staged_dir(out) as tmp:
            summary = build_report(results, rp, tp, uri, tmp)
            run_id = log_report(uri, tp.experiment, tmp, args.params)
    except (tracking.TrackingError, ReportError, OSError) as exc:
        print(f"report: error: {exc}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, tracking.RunInterrupted) as exc:
        print(f"report: interrupted: {out} was not written", file=sys.stderr)
        return exc.exit_status if isinstance(exc, tracking.RunInterrupted) else 130
    log.info("report: %d variant(s) -> %s (MLflow run %s)", len(summary), out / "index.html", run_id)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
