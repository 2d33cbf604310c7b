"""Report stage: turn every variant's training results into one self-contained study page.

``python -m pipeline.report --params params.yaml --results results --out reports``

Reads ``results/<name>/{history.csv,run.json}`` (train stage) and ``metrics.json`` (summarize
stage); writes ``<out>/index.html`` (``templates/report.html.j2``, images embedded, no external
resources), the figures of :mod:`pipeline.figures` as PNG files, ``summary.md`` and the seed-mean
curves for ``dvc plots`` in ``plots/``. Built in a temporary folder beside ``--out``, logged to
MLflow as the artifacts of a run named ``report``, and only then moved into place: a failure
leaves no half-written report. Of params.yaml it reads ``report``, ``tracking``, and ``grid`` and
``remedies`` only to know which variants belong to the study; how they were trained is in the results.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import logging
import math
import time
import urllib.parse
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from pipeline import cli, columns, curves, figures, history, serve, tracking
from pipeline.columns import ACT_MEAN, ACT_P02, ACT_P98, JAC_MAX, JAC_MEAN, JAC_PRODUCT, SATURATION
from pipeline.measures import SATURATED
from pipeline.outputs import staged_dir
from pipeline.params import (
    ParamsError,
    ReportParams,
    TrackingParams,
    Variant,
    check_file,
    load_section,
    parse,
    study_variants,
)

log = logging.getLogger(__name__)

REQUIRED_FILES = ("history.csv", "metrics.json", "run.json")
LOCAL_UI = "http://127.0.0.1:5000/"
STAGE = "report"
VARIANT_FIGURES = ("classic", "bands", "gradients")  # <kind>-<name>.png: one variant's own figures
REPORT_LINE = "The study's report:"  # the line of a variant run's description that links the latest report
SETTINGS = ("depth", "activation", "loss", "init", "norm")  # a variant's fields, in the tables' order
CLASSIC = ("sigmoid", "mse", "glorot_uniform", "none")  # activation, loss, init, norm
ESCAPE_WINDOW = 10  # epochs before, and from, each seed's escape that the captions average


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
    def name(self) -> str:
        """The variant's one name: its folder, its DVC stage item and its MLflow runs."""
        return str(self.run.get("name") or self.folder.name)

    @property
    def classic(self) -> bool:
        """Nielsen's setup: sigmoid, quadratic cost, Glorot initialisation, no normalisation."""
        return (self.variant.activation, self.variant.loss, self.variant.init, self.variant.norm) == CLASSIC

    @property
    def seeds(self) -> list[int]:
        return [int(s) for s in self.run.get("seeds") or sorted(self.history["seed"].unique())]

    @property
    def epochs(self) -> int:
        return int(self.history["epoch"].max())

    @property
    def run_ids(self) -> dict[str, str]:
        return {str(seed): str(run_id) for seed, run_id in (self.run.get("runs") or {}).items()}

    def parent_in(self, uri: str) -> str | None:
        """The variant's parent run, when its runs were logged to the store at ``uri`` (else None)."""
        parent = self.run.get("parent_run")
        return parent if parent and self.run.get("tracking_uri") == tracking.redact(uri) else None


def load_variant(folder: Path) -> VariantResult:
    """Read one results folder; ReportError names the file that is missing or malformed."""
    try:
        table = history.read_history(folder / "history.csv")
    except history.HistoryError as exc:
        raise ReportError(str(exc)) from exc
    metrics, run = _read_json(folder / "metrics.json"), _read_json(folder / "run.json")
    try:
        variant = parse(Variant, run["variant"], f"{folder / 'run.json'} variant")
    except (KeyError, TypeError, ParamsError) as exc:
        raise ReportError(f"{folder / 'run.json'}: no valid 'variant' ({exc})") from exc
    if history.depth_of(table) != variant.depth:
        raise ReportError(f"{folder / 'history.csv'}: has {history.depth_of(table)} layers, run.json says {variant}")
    return VariantResult(folder, variant, table, metrics, run)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ReportError(f"{path}: cannot be read as JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ReportError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def load_results(results: Path, study: Sequence[Variant] | None = None) -> list[VariantResult]:
    """Every variant folder under ``results`` (hidden folders skipped), in study order. With ``study``, only
    those variants (folders of variants since removed from params are skipped), and each must have results."""
    if not results.is_dir():
        raise ReportError(f"results folder {results} does not exist; run the train stage first (dvc repro)")
    complete = [p for p in results.iterdir() if all((p / name).is_file() for name in REQUIRED_FILES)]
    folders = sorted(p for p in complete if not p.name.startswith("."))
    if not folders:
        raise ReportError(
            f"no variant results in {results}: expected {results}/<variant>/{{{','.join(REQUIRED_FILES)}}}; "
            "run the train stage first (dvc repro)"
        )
    loaded = [load_variant(folder) for folder in folders]
    seen: dict[Variant, Path] = {}
    for result in loaded:
        if result.variant in seen:
            raise ReportError(f"{seen[result.variant]} and {result.folder} both hold variant {result.variant}")
        seen[result.variant] = result.folder
    if study is not None:
        for result in [r for r in loaded if r.variant not in study]:
            log.info("skipping %s: it is not in the study's params (grid, remedies)", result.folder)
        loaded = [result for result in loaded if result.variant in study]
        missing = sorted(str(v) for v in set(study) - set(seen))
        if missing:
            raise ReportError(f"no results for {', '.join(missing)} in {results}; run their train stages (dvc repro)")
    return sorted(loaded, key=lambda r: (not r.classic, r.variant.depth, r.name))  # classic first; by depth, then name


def remedy_groups(results: Sequence[VariantResult]) -> dict[int, list[VariantResult]]:
    """Per depth that has a remedy: the classic variant of that depth (if trained), then the remedies."""
    depths = sorted({r.variant.depth for r in results if not r.classic})
    return {d: sorted((r for r in results if r.variant.depth == d), key=lambda r: not r.classic) for d in depths}


def ui_base(uri: str) -> str:
    """The MLflow UI for runs logged at ``uri``: the server itself (without any user name or password:
    a link is for a browser, which asks for them), else the local ``make ui`` address."""
    if not uri.startswith(("http://", "https://")):
        return LOCAL_UI
    parts = urllib.parse.urlsplit(uri)
    return urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[-1])).rstrip("/") + "/"


def run_link(base: str, experiment_id: str, run_id: str) -> str:
    return f"{base}#/experiments/{experiment_id}/runs/{run_id}"


# ------------------------------------------------------------------- computed text
def histories(results: Iterable[VariantResult]) -> dict[str, pd.DataFrame]:
    return {r.name: r.history for r in results}


def _num(value: float, fmt: str = ".4f") -> str:
    return format(value, fmt) if np.isfinite(value) else "n/a"


def _seed_mean(table: pd.DataFrame, column: str, epoch: int) -> float:
    """Mean over seeds of ``column`` at ``epoch`` (NaN when the column or the epoch is missing)."""
    return float(table.loc[table["epoch"] == epoch, column].mean()) if column in table.columns else math.nan


def _at(table: pd.DataFrame, column: str, epoch: int, fmt: str = ".3f") -> str:
    return _num(_seed_mean(table, column, epoch), fmt)


def final_accuracy(summary: pd.DataFrame, label: str) -> str:
    """Final training accuracy of variant ``label``: mean ± std over its seeds."""
    row = summary.set_index("variant").loc[label]
    return format_mean_std(row["accuracy_mean"], row["accuracy_std"])


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
    finals = {r.name: final_accuracy(summary, r.name) for r in classic}
    plots = []
    for r in classic:
        seed = int(r.history["seed"].min())
        fig = figures.classic_figure(r.history, f"{r.name} (seed {seed})", rp.change_clip_quantile)
        caption = (
            f"{r.name}, seed {seed}: training accuracy and weight change per hidden layer. "
            f"Final training accuracy over {r.history['seed'].nunique()} seed(s): {finals[r.name]}."
        )
        plots.append(render(fig, folder, f"classic-{r.name}.png", rp.dpi, caption))
    if not classic:
        return plots
    hs = histories(classic)
    # Mean over epochs >= 2 and seeds: the first epoch's large change left out.
    changes = {r.name: float(r.history.loc[r.history["epoch"] >= 2, "weight_change/hidden_1"].mean()) for r in classic}
    base_label, base = next(iter(changes.items()))
    relative = ", ".join(f"{k} {_num(c, '.3g')} ({_num(c / base, '.3g')}× {base_label})" for k, c in changes.items())
    listed = ", ".join(f"{name} {final}" for name, final in finals.items())
    accuracy = f"Training accuracy of the classic networks by depth. Final accuracy (mean ± std over seeds): {listed}."
    change = f"Weight change of the first hidden layer (log scale). Mean over epochs ≥ 2 and seeds: {relative}."
    final = "Final training accuracy against depth: mean ± std over seeds, and each seed's value."
    sigmoid = (
        f"σ and σ'. σ' never exceeds σ'(0) = {figures.QUARTER} = {figures.SIGMOID_BOUND:g}, so back-propagating "
        f"through each sigmoid layer scales the error by at most {figures.SIGMOID_BOUND:g} (times the weights)."
    )
    across = [
        (figures.accuracy_by_depth(hs), "accuracy_by_depth.png", accuracy),
        (figures.first_layer_change(hs), "first_layer_change.png", change),
        (figures.final_accuracy_vs_depth(history.final_values(hs)), "final_accuracy_vs_depth.png", final),
        (figures.sigmoid_figure(), "sigmoid.png", sigmoid),
    ]
    return plots + [render(fig, folder, file, rp.dpi, caption) for fig, file, caption in across]


def band_plots(results: Sequence[VariantResult], rp: ReportParams, folder: Path) -> list[Plot]:
    """Replicate spread of every variant."""
    plots = []
    for r in results:
        caption = f"{r.name}: seeds {', '.join(map(str, sorted(r.history['seed'].unique())))}; {figures.BAND_NOTE}."
        fig = figures.bands_figure(r.history, r.name, rp.change_clip_quantile)
        plots.append(render(fig, folder, f"bands-{r.name}.png", rp.dpi, caption))
    return plots


def gradient_plots(results: Sequence[VariantResult], rp: ReportParams, folder: Path) -> list[Plot]:
    """Per-layer gradients and layer ratios of every variant, with the median of each ratio over epochs."""
    plots = []
    for r in results:
        ratios = history.layer_ratios(r.history)
        listed = ", ".join(f"{name} {_num(float(stats['mean'].median()), '.3g')}" for name, stats in ratios.items())
        text = f"Median layer-to-layer ratio over epochs: {listed}; the σ' bound is {figures.SIGMOID_BOUND:g}."
        if not ratios:
            text = "One hidden layer: no layer-to-layer ratio."
        fig = figures.gradient_figure(r.history, r.name)
        plots.append(render(fig, folder, f"gradients-{r.name}.png", rp.dpi, text))
    return plots


def remedy_plots(results: Sequence[VariantResult], summary: pd.DataFrame, rp: ReportParams, folder: Path) -> list[Plot]:
    """One figure per depth that has remedies, with the classic variant of that depth alongside."""
    index = summary.set_index("variant")["vanishing_index_mean"]
    plots = []
    for depth, group in remedy_groups(results).items():
        facts = "; ".join(
            f"{r.name}: final accuracy {final_accuracy(summary, r.name)}, vanishing index {_num(index[r.name], '.3g')}"
            for r in group
        )
        fig = figures.remedies_figure(histories(group))
        plots.append(render(fig, folder, f"remedies-depth-{depth}.png", rp.dpi, f"Depth {depth}. {facts}."))
    return plots


# ----------------------------------------------------- why the deepest classic net stalls (issue 12)
def escape_margin(result: VariantResult) -> float:
    """The margin the summarize stage computed the escape epoch with (in metrics.json), else the default."""
    value = result.metrics.get("escape_margin")
    return float(value) if isinstance(value, int | float) else history.ESCAPE_MARGIN


def escapes_of(results: Iterable[VariantResult]) -> dict[str, pd.DataFrame]:
    """Name -> each seed's escape epoch (:func:`pipeline.history.escape_epochs`)."""
    return {r.name: history.escape_epochs(r.history, escape_margin(r)) for r in results}


def has_probe(result: VariantResult) -> bool:
    """Whether the history holds the probe's activation, saturation and Jacobian columns."""
    return bool(history.layer_columns(result.history, SATURATION))


def stalling_variant(results: Sequence[VariantResult]) -> VariantResult | None:
    """The deepest classic variant: the one whose plateau the section explains."""
    return max((r for r in results if r.classic), key=lambda r: r.variant.depth, default=None)


def escape_text(escapes: pd.DataFrame) -> str:
    """``3 of 5 seeds escaped, at epoch 131 ± 4 (seed 0: 127, seed 1: censored at 200, …)``."""
    escaped = escapes.loc[escapes["escaped"], "escape_epoch"]
    head = f"{len(escaped)} of {len(escapes)} seed(s) escaped"
    if len(escaped):
        head += f", at epoch {format_mean_std(escaped.mean(), escaped.std(ddof=0), '.0f')}"
    each = ", ".join(
        f"seed {row.seed}: {row.escape_epoch:.0f}" if row.escaped else f"seed {row.seed}: censored at {row.last_epoch}"
        for row in escapes.itertuples(index=False)
    )
    return f"{head} ({each})"


def stall_text(result: VariantResult | None, escapes: Mapping[str, pd.DataFrame]) -> str:
    """The section's opening sentences, from the deepest classic variant's data."""
    if result is None:
        return "No classic variant in these results."
    return (
        f"{result.name} starts at a training accuracy of {_at(result.history, 'accuracy', 1, '.4f')} (epoch 1, mean "
        f"over seeds) and stays there until its escape epoch, the first epoch whose accuracy exceeds epoch 1's by more "
        f"than {escape_margin(result):g}: {escape_text(escapes[result.name])}. Measured every epoch on the fixed probe "
        "batch, as Glorot & Bengio (2010) did: each layer's activations, the fraction of its units in the flat "
        f"part of the activation (saturated: f' below {SATURATED:g} of its maximum), and the singular values "
        "of each layer's back-propagation Jacobian against the σ' bound."
    )


def stall_plots(
    results: Sequence[VariantResult], escapes: Mapping[str, pd.DataFrame], rp: ReportParams, folder: Path
) -> list[Plot]:
    """Activations, saturation and Jacobians of the deepest classic variant; every seed's escape epoch."""
    r = stalling_variant(results)
    plots = []
    if r is not None and has_probe(r):
        mine = escapes[r.name]
        for kind, fig, caption in (
            ("activations", figures.activation_figure(r.history, r.name, mine), activation_caption(r)),
            ("saturation", figures.saturation_figure(r.history, r.name, mine), saturation_caption(r, mine)),
            ("jacobians", figures.jacobian_figure(r.history, r.name), jacobian_caption(r, mine)),
        ):
            plots.append(render(fig, folder, f"{kind}-{r.name}.png", rp.dpi, caption))
    if results:
        caption = "Escape epoch of every seed. " + "; ".join(f"{name}: {escape_text(e)}" for name, e in escapes.items())
        margins = sorted({escape_margin(r) for r in results})
        fig = figures.escape_figure(escapes, margins[0] if len(margins) == 1 else None)
        plots.append(render(fig, folder, "escape_epochs.png", rp.dpi, caption + "."))
    return plots


def activation_caption(result: VariantResult) -> str:
    """The top hidden layer's activations (mean, 2–98 % band) and the output layer's at the first and last epoch."""
    table, depth, last = result.history, result.variant.depth, result.epochs
    act, lo, hi = (columns.layer_column(kind, depth) for kind in (ACT_MEAN, ACT_P02, ACT_P98))
    out = columns.output_column(ACT_MEAN)
    return (
        f"{result.name}: activations on the probe batch (Glorot & Bengio 2010, Fig. 2). The top hidden layer "
        f"(hidden_{depth}) averages {_at(table, act, 1)} at epoch 1 (2–98 %: {_at(table, lo, 1)}–{_at(table, hi, 1)}) "
        f"and {_at(table, act, last)} at epoch {last} ({_at(table, lo, last)}–{_at(table, hi, last)}); the output "
        f"layer {_at(table, out, 1)} and {_at(table, out, last)}."
    )


def saturation_caption(result: VariantResult, escapes: pd.DataFrame) -> str:
    """How the top hidden layer's saturation changes around each seed's escape, from the data."""
    table, depth, last = result.history, result.variant.depth, result.epochs
    column, top = columns.layer_column(SATURATION, depth), f"hidden_{depth}"
    first = {c: _seed_mean(table, c, 1) for c in history.layer_columns(table, SATURATION)}
    most = max(first, key=first.get) if first else column
    text = f"{result.name}: fraction of probe (example, unit) pairs with f' below {SATURATED:g} of its maximum. "
    if first.get(most, 0) > 0:
        text += (
            f"At epoch 1 the most saturated hidden layer is {history.layer_name(most)} ({_num(first[most], '.3f')}). "
        )
    else:
        text += "At epoch 1 no hidden unit is saturated on any probe example. "
    at_last = ", ".join(
        f"{history.layer_name(c)} {_at(table, c, last)}" for c in figures.probe_layers(table, SATURATION)
    )
    text += f"At epoch {last}: {at_last}. "
    before, after, seeds = history.around_escape(table, column, escapes, ESCAPE_WINDOW)
    if seeds:
        median = escapes.loc[escapes["escaped"], "escape_epoch"].median()
        return text + (
            f"{top}'s saturation averages {_num(before, '.3f')} over the {ESCAPE_WINDOW} epochs before each seed's "
            f"escape and {_num(after, '.3f')} over the {ESCAPE_WINDOW} epochs from it ({_num(after - before, '+.3f')}; "
            f"{seeds} of {len(escapes)} seed(s), median escape epoch {median:.0f})."
        )
    return text + (
        f"No seed escaped within {last} epochs: {top}'s saturation goes from {_at(table, column, 1)} at epoch 1 to "
        f"{_at(table, column, last)} at epoch {last}."
    )


def jacobian_caption(result: VariantResult, escapes: pd.DataFrame) -> str:
    """Per-layer mean singular values, the predicted against the measured first / last ratio, and how
    the top hidden layer's largest singular value changes around the escape, from the data."""
    table, depth = result.history, result.variant.depth
    layers = ", ".join(
        f"{history.layer_name(c)} {_at(table, c, 1, '.3g')}" for c in history.layer_columns(table, JAC_MEAN)
    )
    text = (
        f"{result.name}: mean singular value of each hidden layer's Jacobian at epoch 1 (mean over seeds): {layers}; "
        f"the σ' bound is {figures.SIGMOID_BOUND:g} per sigmoid layer (times the weights)."
    )
    before, after, seeds = history.around_escape(table, columns.layer_column(JAC_MAX, depth), escapes, ESCAPE_WINDOW)
    if seeds:
        text += (
            f" hidden_{depth}'s largest singular value averages {_num(before, '.3g')} over the {ESCAPE_WINDOW} epochs "
            f"before each seed's escape and {_num(after, '.3g')} over the {ESCAPE_WINDOW} epochs from it."
        )
    if depth < 2:
        return text
    measured = history.first_to_last(table)["mean"]
    predicted = history.seed_stats(table, JAC_PRODUCT)["mean"]
    return text + (
        f" Their product over hidden_1 … hidden_{depth - 1} predicts {_num(predicted.iloc[0], '.3g')} for the first / "
        f"last ratio of ‖∂C/∂b‖ at epoch 1, measured {_num(measured.iloc[0], '.3g')}; "
        f"({figures.QUARTER})^{depth - 1} = {figures.SIGMOID_BOUND ** (depth - 1):.3g}. Medians over epochs: predicted "
        f"{_num(predicted.median(), '.3g')}, measured {_num(measured.median(), '.3g')}."
    )


def remedy_saturation_plots(
    results: Sequence[VariantResult], escapes: Mapping[str, pd.DataFrame], rp: ReportParams, folder: Path
) -> list[Plot]:
    """Per depth with remedies: each variant's saturation per layer, the classic one first."""
    plots = []
    for depth, group in remedy_groups(results).items():
        group = [r for r in group if has_probe(r)]
        if not group:
            continue
        column = columns.layer_column(SATURATION, depth)
        facts = "; ".join(
            f"{r.name}: hidden_{depth} {_at(r.history, column, 1)} at epoch 1, "
            f"{_at(r.history, column, r.epochs)} at epoch {r.epochs}"
            for r in group
        )
        fig = figures.saturation_by_variant(histories(group), {r.name: escapes[r.name] for r in group})
        caption = f"Depth {depth}: saturation per layer (mean over seeds) with each remedy. Top hidden layer: {facts}."
        plots.append(render(fig, folder, f"remedies-saturation-depth-{depth}.png", rp.dpi, caption))
    return plots


def held_out_plots(results: Sequence[VariantResult], rp: ReportParams, folder: Path) -> list[Plot]:
    """Test beside training accuracy, when any variant logged test accuracy."""
    fig = figures.test_vs_train_figure(histories(results))
    caption = "Held-out (test) accuracy beside training accuracy for every variant."
    return [render(fig, folder, "test_vs_train.png", rp.dpi, caption)]


# ------------------------------------------------------------------------------ html
def page_html(context: Mapping[str, Any]) -> str:
    """``index.html`` from the Jinja2 template (autoescaped: every value is text unless marked safe)."""
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("pipeline", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,  # a missing value is an error, not an empty cell
        keep_trailing_newline=True,
    )
    env.filters["b64"] = lambda data: base64.b64encode(data).decode("ascii")
    return env.get_template("report.html.j2").render(context)


def variant_rows(results: Sequence[VariantResult]) -> list[tuple[Any, ...]]:
    """The setup table: what was trained, as recorded in the results."""
    rows = []
    for r in results:
        settings = [getattr(r.variant, k) for k in SETTINGS]
        rows.append((r.name, *settings, ", ".join(map(str, r.seeds)), r.epochs, "classic" if r.classic else "remedy"))
    return rows


def result_rows(summary: pd.DataFrame) -> list[tuple[Any, ...]]:
    """The results table: final values, mean ± std over seeds."""
    return [
        (
            row.variant,
            row.depth,
            row.seeds,
            format_mean_std(row.accuracy_mean, row.accuracy_std),
            format_mean_std(row.test_accuracy_mean, row.test_accuracy_std),
            format_mean_std(row.vanishing_index_mean, row.vanishing_index_std, ".3g"),
            escape_cell(row.escape_epoch_mean, row.escape_epoch_std, row.escaped_fraction),
        )
        for row in summary.itertuples(index=False)
    ]


def escape_cell(mean: float, std: float, fraction: float) -> str:
    """``142 ± 11``: the escape epoch over the seeds that escaped, with their share when not all did."""
    if fraction == 0:
        return "none escaped"
    if not np.isfinite(fraction) or fraction == 1:
        return format_mean_std(mean, std, ".0f")
    return f"{format_mean_std(mean, std, '.0f')} ({fraction:.0%} of seeds)"


def run_rows(results: Sequence[VariantResult], uri: str) -> tuple[list[dict[str, str]], bool]:
    """Every training run with its MLflow UI link; and whether any link points at the local UI."""
    rows, local = [], False
    for r in results:
        base = ui_base(str(r.run.get("tracking_uri") or uri))
        local = local or base == LOCAL_UI
        experiment = str(r.run.get("experiment_id", ""))
        for seed, run_id in r.run_ids.items():
            link = run_link(base, experiment, run_id)
            rows.append({"variant": r.name, "seed": seed, "experiment": experiment, "run_id": run_id, "link": link})
    return rows, local


def intro_facts(results: Sequence[VariantResult]) -> dict[str, Any]:
    """The opening paragraph's numbers, taken from the results."""
    classic = [r for r in results if r.classic]
    return {
        "variants": len(results),
        "classic": len(classic),
        "classic_depths": ", ".join(str(r.variant.depth) for r in classic) or "no",
        "remedies": len(results) - len(classic),
        "epochs": " / ".join(map(str, sorted({r.epochs for r in results}))),
        "seeds": " / ".join(map(str, sorted({len(r.seeds) for r in results}))),
    }


def build_report(
    results: Sequence[VariantResult], rp: ReportParams, tp: TrackingParams, uri: str, folder: Path
) -> pd.DataFrame:
    """Write the PNGs, ``index.html`` and ``summary.md`` into ``folder``; returns the summary table."""
    summary = summary_table(
        histories(results), {r.name: r.variant for r in results}, {r.name: r.metrics for r in results}
    )
    runs, local = run_rows(results, uri)
    stalling, escapes = stalling_variant(results), escapes_of(results)
    context = {
        "quarter": figures.QUARTER,
        "intro": intro_facts(results),
        "variants": variant_rows(results),
        "settings": [
            ("report.change_clip_quantile", rp.change_clip_quantile),
            ("report.dpi", rp.dpi),
            ("tracking.experiment", tp.experiment),
            ("tracking URI", tracking.redact(uri)),
        ],
        "classic": classic_plots(results, summary, rp, folder),
        "bands": band_plots(results, rp, folder),
        "gradients": gradient_plots(results, rp, folder),
        "stalling": stalling,
        "stall_text": stall_text(stalling, escapes),
        "stall": stall_plots(results, escapes, rp, folder),
        "remedies": remedy_plots(results, summary, rp, folder) + remedy_saturation_plots(results, escapes, rp, folder),
        "held_out": held_out_plots(results, rp, folder),
        "results": result_rows(summary),
        "runs": runs,
        "local_ui": LOCAL_UI if local else None,
    }
    (folder / "index.html").write_text(page_html(context), encoding="utf-8")
    (folder / "summary.md").write_text(summary_markdown(summary), encoding="utf-8")
    curves.write_plot_data(histories(results), folder / "plots")  # seed means for `dvc plots show`
    return summary


# ------------------------------------------------------------------------ tables
# Mean and std of each in the summary table; the escape epoch's are over the seeds that escaped.
MEASURES = ("accuracy", "test_accuracy", "vanishing_index", "escape_epoch")
SUMMARY_COLUMNS = [
    "variant",
    *SETTINGS,
    "seeds",
    "epochs",
    *(f"{k}_{s}" for k in MEASURES for s in ("mean", "std")),
    "escaped_fraction",
]


def summary_table(
    histories: Mapping[str, pd.DataFrame],
    variants: Mapping[str, Variant],
    metrics: Mapping[str, Mapping[str, float]] | None = None,
) -> pd.DataFrame:
    """One row per variant (keys of ``histories``): its settings and final values, mean and std over seeds.

    Each value comes from ``metrics`` (the summarize stage's ``metrics.json``) when there, else from each
    seed's last epoch (std with ddof=0); the vanishing index and the escape epoch, no columns of a history,
    from ``metrics`` only.
    """
    rows = []
    for label, table in histories.items():
        given, last = (metrics or {}).get(label, {}), history.final_rows(table)
        settings = [getattr(variants[label], k) for k in SETTINGS]
        values = [value for key in MEASURES for value in _mean_std(given, last, key)]
        escaped = np.nan if given.get("escaped_fraction") is None else float(given["escaped_fraction"])
        rows.append([label, *settings, int(table["seed"].nunique()), int(table["epoch"].max()), *values, escaped])
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


def _mean_std(given: Mapping[str, float], last: pd.DataFrame, key: str) -> tuple[float, float]:
    """``key`` and ``key_std`` from ``given`` (metrics.json), else mean and std (ddof=0) of ``last[key]``."""
    if key in given:  # metrics.json writes a non-finite value as null
        return tuple(np.nan if v is None else float(v) for v in (given[key], given.get(f"{key}_std")))
    if key not in last.columns:
        return np.nan, np.nan
    return float(last[key].mean()), float(last[key].std(ddof=0))


def format_mean_std(mean: float, std: float, fmt: str = ".4f") -> str:
    """``0.9123 ± 0.0012``; ``n/a`` for a missing mean; the std is left out when missing."""
    if mean is None or not np.isfinite(mean):
        return "n/a"
    if std is None or not np.isfinite(std):
        return format(mean, fmt)
    return f"{format(mean, fmt)} ± {format(std, fmt)}"


def summary_markdown(summary: pd.DataFrame) -> str:
    """A short Markdown table of the final values."""
    head = (
        "# Vanishing-gradient study: results\n\nFinal-epoch values, mean ± std over replicate seeds; the escape epoch "
        "over the seeds that escaped.\n\n"
        "| variant | final accuracy | test accuracy | vanishing index | escape epoch |\n|---|---|---|---|---|\n"
    )
    return head + "".join(f"| {name} | {a} | {t} | {v} | {e} |\n" for name, _, _, a, t, v, e in result_rows(summary))


# ------------------------------------------------------------------------- output
def log_report(
    uri: str, experiment: str, folder: Path, params_file: Path, results: Sequence[VariantResult], summary: pd.DataFrame
) -> str:
    """Log every file in ``folder`` as artifacts of one run named ``report``, described by the results
    table; give each variant's parent run its figures, its summary metrics and a link to the report.
    Returns the report run's id."""
    root = tracking.project_root()
    client = tracking.open_store(uri)
    experiment_id = tracking.ensure_experiment(client, experiment, root)
    tags = tracking.lineage_tags(root, STAGE, params_file)
    try:
        with tracking.run_set(client, experiment_id, [STAGE], tags) as runs:
            report_id = runs.run_ids[0]
            link = run_link(ui_base(uri), experiment_id, report_id) + "/artifacts"
            note = f"The study's front page: **[index.html]({link})** in this run's artifacts.\n\n"
            client.set_tag(report_id, tracking.NOTE_TAG, note + summary_markdown(summary).split("\n", 2)[2])
            client.log_artifacts(report_id, str(folder))
            for r in results:
                _update_variant_run(client, r, uri, folder, link)
            _save_study_view(client, experiment_id, report_id, results, uri)
            runs.stop.check()  # a signal during the upload: the run ends KILLED, no report is written
    except Exception as exc:  # the run is already marked FAILED; report one clear line
        raise tracking.TrackingError(f"logging the report to MLflow at {uri} failed: {exc}") from exc
    return report_id


def _save_study_view(
    client: Any, experiment_id: str, report_id: str, results: Sequence[VariantResult], uri: str
) -> None:
    """The MLflow UI's shared view of this study (``make ui`` prints its link; see :mod:`pipeline.serve`)."""
    ids = [run_id for r in results if r.parent_in(uri) for run_id in (r.parent_in(uri), *r.run_ids.values())]
    ids.append(report_id)
    view = json.dumps(serve.study_view(ids, max((r.variant.depth for r in results), default=1)))
    if len(view) > serve.MAX_VIEW_CHARS:
        log.warning(
            "the study has too many runs for one MLflow view (%d characters); make ui opens the plain table", len(view)
        )
        return
    client.set_experiment_tag(experiment_id, serve.SHARED_VIEW_TAG + serve.view_key(report_id), view)


def _update_variant_run(client: Any, result: VariantResult, uri: str, folder: Path, report_link: str) -> None:
    """The variant's parent run gets its figures, ``summary/<key>`` metrics (metrics.json, NaN for null)
    and the report's link in its description. Runs logged to another store are left alone."""
    from mlflow.entities import Metric

    parent = result.parent_in(uri)
    if parent is None:
        log.info("%s: its runs are not in %s; their figures and summary are not logged there", result.name, uri)
        return
    for png in (folder / f"{kind}-{result.name}.png" for kind in VARIANT_FIGURES):
        if png.is_file():
            client.log_artifact(parent, str(png), "figures")
    now = int(time.time() * 1000)
    values = {k: np.nan if v is None else float(v) for k, v in result.metrics.items()}
    client.log_batch(parent, metrics=[Metric(f"summary/{k}", v, now, 0) for k, v in values.items()], synchronous=True)
    note = client.get_run(parent).data.tags.get(tracking.NOTE_TAG, "").split(REPORT_LINE)[0].rstrip()
    client.set_tag(parent, tracking.NOTE_TAG, f"{note}\n\n{REPORT_LINE} [index.html]({report_link}).")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the stage; 0 on success, 1 on a known failure (nothing written), with its traceback in the log."""
    parser = argparse.ArgumentParser(prog="python -m pipeline.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file (report, tracking)")
    parser.add_argument("--results", type=Path, default=Path("results"), help="folder of variant results")
    parser.add_argument("--out", type=Path, default=Path("reports"), help="report folder (replaced)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=cli.LOG_FORMAT)
    try:
        check_file(args.params)
        rp: ReportParams = load_section("report", args.params)
        tp: TrackingParams = load_section("tracking", args.params)
        uri = tracking.tracking_uri()
        tracking.preflight(uri)
        study = study_variants(load_section("grid", args.params), load_section("remedies", args.params))
        results = load_results(args.results, study)
    except (ParamsError, tracking.TrackingError, ReportError) as exc:
        log.error("report: %s", exc)  # bad input: the message says all, a traceback would bury it
        return 1
    try:
        with staged_dir(args.out) as tmp:
            summary = build_report(results, rp, tp, uri, tmp)
            run_id = log_report(uri, tp.experiment, tmp, args.params, results, summary)
    except (tracking.TrackingError, ReportError, OSError) as exc:
        log.error("report: %s; %s was not written", exc, args.out, exc_info=True)
        return 1
    except (KeyboardInterrupt, tracking.RunInterrupted) as exc:
        log.error("report: interrupted: %s was not written", args.out)
        return exc.exit_status if isinstance(exc, tracking.RunInterrupted) else 130
    log.info("report: %d variant(s) -> %s (MLflow run %s)", len(summary), args.out / "index.html", run_id)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
