"""Report stage: every variant's results in, one self-contained study page out. Needs no tracking store.

Reads ``results/<name>/`` and writes ``<out>/index.html`` (``templates/report.html.j2``, images embedded),
the PNGs, ``summary.md`` and ``plots/`` for ``dvc plots``: all or, on a failure, none.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import logging
import math
import urllib.parse
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from PIL import Image

from pipeline import cli, columns, curves, figures, history, serve
from pipeline.columns import COUPLING_SHARE, GAIN, JAC_MEAN, JAC_PRODUCT, SATURATION, SIGNAL, WEIGHT_CHANGE
from pipeline.measures import SATURATED
from pipeline.outputs import staged_dir
from pipeline.params import GridParams, ReportParams, Variant, load_section, study_variants

log = logging.getLogger(__name__)

REQUIRED_FILES = ("history.csv", "metrics.json")
SETTINGS = ("depth", "activation", "loss", "init", "norm")  # a variant's fields, in the tables' order
VARIANT_FIGURES = ("bands", "gradients", "signal", "saturation", "jacobians")  # <kind>-<name>.png
ESCAPE_WINDOW = 10  # epochs before, and from, each seed's escape that the captions average
SATURATED_MEANS = f"f' below {SATURATED:g} of its maximum; for ReLU (f' = 0 where u ≤ 0) an inactive unit"


class ReportError(RuntimeError):
    """The results cannot be reported; the message names the file and what to do."""


# --------------------------------------------------------------------------- loading
@dataclass(frozen=True)
class VariantResult:
    """One trained variant: its folder (named as its DVC stage item), settings, history, metrics and runs."""

    folder: Path
    variant: Variant
    history: pd.DataFrame
    metrics: dict[str, Any]
    run: dict[str, Any]  # run.json; empty where the folder has none (results without their DVC outputs)

    @property
    def name(self) -> str:
        return self.folder.name

    @property
    def classic(self) -> bool:
        return figures.is_classic(self.variant)

    @property
    def seeds(self) -> list[int]:
        return sorted(int(s) for s in self.history["seed"].unique())

    @property
    def epochs(self) -> int:
        return int(self.history["epoch"].max())


def study_names(grid: GridParams, remedies: Mapping[str, Variant]) -> dict[str, Variant]:
    """The study's variants by their DVC stage item's (and folder's) name: ``4-sigmoid-mse-glorot_uniform-none``."""
    study_variants(grid, remedies)  # a remedy that repeats a grid variant is an error
    return {"-".join(str(getattr(v, k)) for k in SETTINGS): v for v in grid.expand()} | dict(remedies)


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ReportError(f"{path}: cannot be read as JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ReportError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def load_variant(folder: Path, variant: Variant) -> VariantResult:
    """Read one results folder; ReportError names the file that is missing, malformed or of another variant."""
    try:
        table = history.read_history(folder / "history.csv")
    except history.HistoryError as exc:
        raise ReportError(str(exc)) from exc
    run = read_json(folder / "run.json") if (folder / "run.json").is_file() else {}
    if run.get("variant", variant.model_dump()) != variant.model_dump() or history.depth_of(table) != variant.depth:
        raise ReportError(f"{folder}: trained as another variant than params.yaml's {variant}; rerun it (dvc repro)")
    if "plateau" not in (metrics := read_json(folder / "metrics.json")):  # the escape's definition: from summarize
        raise ReportError(f"{folder / 'metrics.json'} has no plateau; rerun its summary stage (dvc repro)")
    return VariantResult(folder, variant, table, metrics, run)


def load_results(results: Path, study: Mapping[str, Variant]) -> list[VariantResult]:
    """The study's variants from ``results/<name>/``: the classic ones by depth, then the others by depth and name."""
    if not results.is_dir():
        raise ReportError(f"results folder {results} does not exist; run the train stage first (dvc repro)")
    missing = [name for name in study if not all((results / name / f).is_file() for f in REQUIRED_FILES)]
    if missing:
        raise ReportError(
            f"no results for {', '.join(missing)} in {results} (expected <variant>/{{{','.join(REQUIRED_FILES)}}}); "
            "run their stages (dvc repro)"
        )
    loaded = [load_variant(results / name, variant) for name, variant in study.items()]
    return sorted(loaded, key=lambda r: (not r.classic, r.variant.depth, r.name))


def remedy_groups(results: Sequence[VariantResult]) -> dict[int, list[VariantResult]]:
    """Per depth that has a remedy: the classic variant of that depth (if trained), then the remedies."""
    depths = sorted({r.variant.depth for r in results if not r.classic})
    return {d: sorted((r for r in results if r.variant.depth == d), key=lambda r: not r.classic) for d in depths}


def histories(results: Iterable[VariantResult]) -> dict[str, pd.DataFrame]:
    return {r.name: r.history for r in results}


# ------------------------------------------------------------------------ tables
MEASURES = ("accuracy", "test_accuracy", "vanishing_index", "escape_epoch")  # mean and std of each


def summary_table(results: Sequence[VariantResult]) -> pd.DataFrame:
    """One row per variant: its settings and final values, mean and std over seeds, as the summarize stage
    wrote them (metrics.json writes a non-finite value as null: NaN here, n/a on the page)."""
    rows = []
    for r in results:
        values = [r.metrics.get(k) for k in MEASURES for k in (k, f"{k}_std")] + [r.metrics.get("escaped_fraction")]
        settings = [getattr(r.variant, k) for k in SETTINGS]
        rows.append([r.name, *settings, len(r.seeds), r.epochs, *(np.nan if v is None else float(v) for v in values)])
    names = [f"{k}_{s}" for k in MEASURES for s in ("mean", "std")]
    return pd.DataFrame(rows, columns=["variant", *SETTINGS, "seeds", "epochs", *names, "escaped_fraction"])


def _num(value: float | None, fmt: str = ".4f") -> str:
    return format(value, fmt) if value is not None and np.isfinite(value) else "n/a"


def format_mean_std(mean: float, std: float, fmt: str = ".4f") -> str:
    """``0.9123 ± 0.0012``; ``n/a`` for a missing mean; the std is left out when missing."""
    if mean is None or not np.isfinite(mean):
        return "n/a"
    return format(mean, fmt) if std is None or not np.isfinite(std) else f"{mean:{fmt}} ± {std:{fmt}}"


def escape_cell(mean: float, std: float, fraction: float) -> str:
    """``142 ± 11``: the escape epoch over the seeds that escaped, with their share when not all did."""
    if fraction == 0:
        return "none escaped"
    if not np.isfinite(fraction) or fraction == 1:
        return format_mean_std(mean, std, ".0f")
    return f"{format_mean_std(mean, std, '.0f')} ({fraction:.0%} of seeds)"


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


def summary_markdown(summary: pd.DataFrame) -> str:
    """A short Markdown table of the final values."""
    head = (
        "# Vanishing-gradient study: results\n\nFinal-epoch values, mean ± std over replicate seeds; the escape epoch "
        "over the seeds that escaped.\n\n"
        "| variant | final accuracy | test accuracy | vanishing index | escape epoch |\n|---|---|---|---|---|\n"
    )
    return head + "".join(f"| {name} | {a} | {t} | {v} | {e} |\n" for name, _, _, a, t, v, e in result_rows(summary))


def run_rows(results: Sequence[VariantResult], ui_url: str | None) -> list[dict[str, str | None]]:
    """Every training run with its link: into the tracking server its runs went to, else into ``ui_url``
    (the MLflow UI over the local store, ``report.ui_url``); no link without either."""
    rows = []
    for r in results:
        uri, experiment = str(r.run.get("tracking_uri", "")), str(r.run.get("experiment_id", ""))
        if uri.startswith(("http://", "https://")):  # the server is its own UI; a browser asks for the password
            parts = urllib.parse.urlsplit(uri)
            base: str | None = urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[-1]))
        else:
            base = ui_url
        for seed, run_id in (r.run.get("runs") or {}).items():
            link = f"{base.rstrip('/')}/{serve.ui_path(experiment, f'runs/{run_id}')}" if base else None
            rows.append({"variant": r.name, "seed": str(seed), "run_id": str(run_id), "link": link})
    return rows


# --------------------------------------------------------------------------- the page
@dataclass(frozen=True)
class Plot:
    """A saved figure: file name in the report folder, caption, PNG bytes and its width on the page."""

    file: str
    caption: str
    png: bytes
    width: int  # CSS pixels: figures.PX_PER_INCH per inch of figure, whatever the PNG's dpi


@dataclass(frozen=True)
class Section:
    """A section of the page: its conclusion in one sentence first, then what it shows."""

    anchor: str
    title: str
    conclusion: str
    text: str = ""
    plots: Sequence[Plot] = ()


class Study:
    """What every section draws on: the results in study order, their summary and colours, and each seed's escape
    and forecast as the summarize stage defined them (metrics.json's settings)."""

    def __init__(self, results: list[VariantResult], rp: ReportParams, window: int, folder: Path) -> None:
        self.results, self.rp, self.folder = results, rp, folder
        self.window = window  # summary.index_window: the epochs the vanishing index averages
        self.classic = [r for r in results if r.classic]
        self.deep = [r for r in self.classic if r.variant.depth >= 2]  # those with a vanishing index
        self.summary = summary_table(results).set_index("variant")
        self.colors = figures.variant_colors({r.name: r.variant for r in results})
        self.escapes = {
            r.name: history.escape_epochs(r.history, r.metrics["plateau"], r.metrics["escape_margin"]) for r in results
        }
        self.forecasts = {
            r.name: history.escape_forecasts(r.history, m["forecast_epochs"], m["plateau"], m["escape_margin"])
            for r in results
            if "forecast_epochs" in (m := r.metrics)
        }

    def render_all(self, *figs: tuple[Figure, str, str]) -> list[Plot]:
        """Save each (figure, file, caption) as a palette PNG (a third of the bytes, the same look) and release it."""
        plots = []
        for fig, file, caption in figs:
            buffer, out = io.BytesIO(), io.BytesIO()
            fig.savefig(buffer, format="png", dpi=self.rp.dpi)
            width = round(fig.get_figwidth() * figures.PX_PER_INCH)
            fig.clear()  # Figures made without pyplot are not registered anywhere: clearing releases them.
            Image.open(buffer).convert("RGB").quantize(256).save(out, format="PNG", optimize=True)
            (self.folder / file).write_bytes(out.getvalue())
            plots.append(Plot(file, caption, out.getvalue(), width))
        return plots

    def value(self, name: str, key: str, fmt: str = ".4f") -> str:
        return _num(self.summary.loc[name, f"{key}_mean"], fmt)

    def by_depth(self, key: str, fmt: str = ".3g", deep: bool = False) -> str:
        """``0.929 (depth 1), 0.352 (depth 4)``: a summary value of each classic (``deep``) variant."""
        variants = self.deep if deep else self.classic
        return ", ".join(f"{self.value(r.name, key, fmt)} (depth {r.variant.depth})" for r in variants)


def _at(table: pd.DataFrame, column: str, *epochs: int, fmt: str = ".3f") -> str:
    """``0.25 → 0.1``: the mean over seeds of ``column`` at each of ``epochs``; n/a when the column is missing."""
    means = (table.loc[table["epoch"] == e, column].mean() if column in table else math.nan for e in epochs)
    return " → ".join(_num(mean, fmt) for mean in means)


def _layers(table: pd.DataFrame, layers: Iterable[str], *epochs: int, fmt: str = ".3f") -> str:
    """``hidden_1 0.25 → 0.1, output 0.3 → 0.2``: :func:`_at` of each layer."""
    return ", ".join(f"{history.layer_name(c)} {_at(table, c, *epochs, fmt=fmt)}" for c in layers)


def escape_phrase(escapes: pd.DataFrame) -> str:
    """``at epoch 142 ± 11 (5 of 5 seeds)``, or ``in none of 5 seeds within 200 epochs``."""
    escaped, n = escapes["escape_epoch"].dropna(), len(escapes)
    if escaped.empty:
        return f"in none of {n} seeds within {escapes['last_epoch'].max()} epochs"
    return f"at epoch {format_mean_std(escaped.mean(), escaped.std(ddof=0), '.0f')} ({len(escaped)} of {n} seeds)"


def setup_conclusion(s: Study) -> str:
    seeds, epochs = ({str(len(r.seeds)) for r in s.results}, {str(r.epochs) for r in s.results})
    depths = ", ".join(str(r.variant.depth) for r in s.classic) or "none"
    others = len(s.results) - len(s.classic)
    return (
        f"{len(s.results)} variants (classic depths {depths}; {others} others), each {'/'.join(sorted(seeds))} "
        f"seeds × {'/'.join(sorted(epochs))} epochs."
    )


def results_conclusion(s: Study) -> str:
    test, gap = s.summary["test_accuracy_mean"], s.summary["accuracy_mean"] - s.summary["test_accuracy_mean"]
    if test.isna().all():
        return "No variant logged test accuracy."
    return (
        f"{test.idxmax()} reaches the highest test accuracy ({_num(test.max())}); the largest gap between "
        f"training and test accuracy is {gap.idxmax()}'s ({_num(gap.max(), '+.4f')})."
    )


def page_summary(s: Study) -> list[str]:
    """The page's opening three sentences, from the data."""
    if not s.classic:
        return [setup_conclusion(s), results_conclusion(s)]
    deepest, depth = s.classic[-1], s.classic[-1].variant.depth
    first = f"The classic sigmoid nets end at a training accuracy of {s.by_depth('accuracy', '.3f')}."
    second = f"{deepest.name} escapes its plateau {escape_phrase(s.escapes[deepest.name])}."
    if s.deep:
        index = s.by_depth("vanishing_index", deep=True)
        gradient = f"In the first {s.window} epochs the first hidden layer's gradient is {index} times the last one's"
        second = f"{gradient}; {second}"
    remedies = [r for r in remedy_groups(s.results).get(depth, []) if not r.classic]
    if not remedies:
        return [first, second, results_conclusion(s)]
    best = max(remedies, key=lambda r: s.summary.loc[r.name, "accuracy_mean"])
    ends = [s.value(r.name, "accuracy", ".3f") for r in (best, deepest)]
    third = f"At depth {depth} the best remedy, {best.name}, ends at {ends[0]} against the classic net's {ends[1]}."
    return [first, second, third]


def classic_section(s: Study) -> Section:
    """Nielsen's picture across depths: accuracy, the first layer's weight change, σ'."""
    if not s.classic:
        return Section("classic", "The classic picture", "No classic (sigmoid, quadratic cost, Glorot) variant.")
    column = columns.layer_column(WEIGHT_CHANGE, 1)
    change = [float(r.history.loc[r.history["epoch"] >= 2, column].mean()) for r in s.classic]
    first, last = s.classic[0].variant.depth, s.classic[-1].variant.depth
    conclusion = f"Final training accuracy by depth: {s.by_depth('accuracy', '.4f')}"
    if last != first:
        conclusion += (
            f"; the first hidden layer's weights change {change[-1] / change[0]:.2g}× as much per epoch at depth "
            f"{last} as at depth {first} (mean over epochs ≥ 2 and seeds)"
        )
    hs = histories(s.classic)
    listed = ", ".join(f"{_num(c, '.3g')} (depth {r.variant.depth})" for r, c in zip(s.classic, change, strict=True))
    sigmoid = f"σ' ≤ σ'(0) = {figures.QUARTER}: each sigmoid layer scales the error it passes back by at most that."
    accuracy = figures.by_variant(hs, s.colors, "accuracy", f"Training accuracy ({figures.BAND_NOTE})")
    first_layer = figures.by_variant(hs, s.colors, column, "The first hidden layer's weight change per epoch", log=True)
    plots = s.render_all(
        (accuracy, "accuracy_by_depth.png", "Training accuracy by depth."),
        (first_layer, "first_layer_change.png", f"Mean over epochs ≥ 2: {listed}."),
        (figures.sigmoid_figure(), "sigmoid.png", sigmoid),
    )
    return Section("classic", "The classic picture", conclusion + ".", "Nielsen's figures, over every seed.", plots)


def replicates_section(s: Study) -> Section:
    """Every variant's accuracy and per-layer weight change over its seeds."""
    spread = s.summary["accuracy_std"].sort_values(ascending=False)
    conclusion = (
        f"The seeds' final training accuracies spread most for {spread.index[0]} (std {_num(spread.iloc[0])}); "
        f"for every other variant the std is at most {_num(spread.iloc[1] if len(spread) > 1 else math.nan)}."
    )
    figs = [figures.bands_figure(r.history, r.name, s.colors[r.name], s.rp.change_clip_quantile) for r in s.results]
    seeds = [f"{r.name}: seeds {', '.join(map(str, r.seeds))}." for r in s.results]
    plots = s.render_all(*zip(figs, [f"bands-{r.name}.png" for r in s.results], seeds, strict=True))
    return Section("replicates", "Across replicates", conclusion, "What is signal and what is seed noise.", plots)


def gradients_section(s: Study) -> Section:
    """Per-layer gradients, the layer-to-layer ratios, and why their medians differ from the vanishing index."""
    conclusion, text = "No classic variant has two hidden layers or more: nothing to compare across layers.", ""
    if s.deep:
        bound = ", ".join(f"{figures.SIGMOID_BOUND ** (r.variant.depth - 1):.3g}" for r in s.deep)
        index = s.by_depth("vanishing_index", deep=True)
        conclusion = (
            f"In the first {s.window} epochs the first hidden layer's ‖∂C/∂b‖ is {index} times the last one's "
            f"(the vanishing index), against ({figures.QUARTER})^(L−1) = {bound} from σ' alone."
        )
        r, ratios = s.deep[-1], history.layer_ratios(s.deep[-1].history).values()
        medians = [[stats.loc[:w, "mean"].median() for stats in ratios] for w in (s.window, s.deep[-1].epochs)]
        early, whole = (", ".join(_num(v, ".3g") for v in m) for m in medians)
        early_product, whole_product = (_num(np.prod(m), ".3g") for m in medians)
        text = (
            f"The captions give each adjacent ratio's median over all epochs, the index the first / last ratio "
            f"(the product of the {r.variant.depth - 1} adjacent ratios) averaged over the first {s.window} epochs "
            f"only, which is why they differ. For {r.name} the adjacent medians are {early} over the first "
            f"{s.window} epochs (product {early_product}; index {s.value(r.name, 'vanishing_index', '.3g')}) "
            f"and {whole} over all {r.epochs} (product {whole_product})."
        )
    plots = []
    for r in s.results:
        ratios = history.layer_ratios(r.history)
        listed = ", ".join(f"{name} {_num(st['mean'].median(), '.3g')}" for name, st in ratios.items())
        caption = f"{r.name}: median over all epochs, {listed}." if ratios else f"{r.name}: one hidden layer, no ratio."
        plots += s.render_all((figures.gradient_figure(r.history, r.name), f"gradients-{r.name}.png", caption))
    return Section("gradients", f"Gradients against the {figures.QUARTER} bound", conclusion, text, plots)


# ----------------------------------------------------------- why the deepest classic net stalls
def output_gain(r: VariantResult, epoch: int = 1) -> float:
    """The output's signal over the input's at ``epoch``: the product of every layer's gain, mean over seeds."""
    gains = figures.probe_layers(r.history, GAIN)
    return float(r.history.loc[r.history["epoch"] == epoch, gains].prod(axis=1).mean()) if gains else math.nan


def forecast_phrase(m: Mapping[str, Any]) -> str:
    """``at epoch 131 ± 9 (mean |forecast − actual| / actual: 7%)`` from a variant's metrics.json."""
    forecast = format_mean_std(m.get("escape_forecast"), m.get("escape_forecast_std"), ".0f")
    return f"at epoch {forecast} (mean |forecast − actual| / actual: {_num(m.get('escape_forecast_rel_error'), '.0%')})"


def stall_section(s: Study) -> Section:
    """Why the deepest classic net sits on its plateau: the signal that reaches its output, the forecast of its
    escape against the actual one, and what does not explain it (saturation); every seed's escape epoch."""
    listed = "; ".join(f"{name} {escape_phrase(e)}" for name, e in s.escapes.items())
    plots = s.render_all((figures.escape_figure(s.escapes, s.colors), "escape_epochs.png", f"Escape: {listed}."))
    if forecasts := {n: f for n, f in s.forecasts.items() if f["forecast"].notna().any()}:
        each = "; ".join(f"{r.name} {forecast_phrase(r.metrics)}" for r in s.results if r.name in forecasts)
        fig = figures.forecast_figure(s.escapes, forecasts, s.colors)
        plots += s.render_all((fig, "escape_forecast.png", f"Forecast: {each}."))
    if not s.classic:
        return Section("stall", "Why deep sigmoid nets stall", "No classic variant in these results.", plots=plots)
    r = s.classic[-1]
    table, depth, escapes, m, last = r.history, r.variant.depth, s.escapes[r.name], r.metrics, r.epochs
    before = table.merge(escapes, on="seed").query("not (epoch >= escape_epoch)")  # each seed's epochs on the plateau
    conclusion = (
        f"{r.name} escapes its plateau {escape_phrase(escapes)}; until then its training accuracy is on average "
        f"{_num((before['accuracy'] - m['plateau']).abs().mean(), '.3f')} from it (the constant predictor's "
        f"accuracy, {m['plateau']:.4f})"
    )
    if r.variant.loss == "mse" and m.get("plateau_mse") is not None:
        conclusion += (
            f" and its training loss {_num(before['loss'].mean(), '.5f')}, the quadratic cost of predicting every "
            f"image's class frequencies ({_num(m['plateau_mse'], '.5f')})"
        )
    if gains := figures.probe_layers(table, GAIN):
        passed, factor = _layers(table, gains, 1, fmt=".2f"), 1 / output_gain(r)
        times = f"{factor:,.0f}" if factor >= 10 else _num(factor, ".2g")  # 1,316 or 4.2: as a reader takes it in
        conclusion += (
            f": at epoch 1 its layers pass on {passed} of the signal they receive, so its output varies "
            f"{times} times less from image to image than its input"
        )
    each = [f"censored at {e.last_epoch}" if e.censored else f"{e.escape_epoch:.0f}" for e in escapes.itertuples()]
    text = f"Escape of each seed: {', '.join(f'seed {n}: {e}' for n, e in zip(escapes['seed'], each, strict=True))}. "
    if r.name in forecasts:
        text += f"From its first {m['forecast_epochs']} epochs the escape is forecast {forecast_phrase(m)}. "
    if gains:
        group = [g for g in remedy_groups(s.results).get(depth, [r]) if np.isfinite(output_gain(g))]
        ratios = ", ".join(f"{g.name} {output_gain(g):.2g}" for g in group)
        text += f"The output's signal over the input's at epoch 1: {ratios}. "
    share = history.around_escape(table, COUPLING_SHARE, escapes, ESCAPE_WINDOW)
    if share[2]:
        first, final = _at(table, COUPLING_SHARE, 1, fmt=".2f"), _at(table, COUPLING_SHARE, last, fmt=".2f")
        text += (
            f"The output–label covariance's first mode holds {first} of it at epoch 1, {_num(share[0], '.3f')} over "
            f"the {ESCAPE_WINDOW} epochs before each escape, {_num(share[1], '.3f')} over the {ESCAPE_WINDOW} from "
            f"it and {final} at epoch {last}"
        )
        one_mode = min(share[:2]) > 0.9 and table.loc[table["epoch"] == last, COUPLING_SHARE].mean() < share[1]
        text += ": the net learns one mode of the labels first, then the others. " if one_mode else ". "
    before, after, seeds = history.around_escape(table, columns.layer_column(SATURATION, depth), escapes, ESCAPE_WINDOW)
    if seeds:
        text += (
            f"Its top hidden layer's saturated fraction averages {_num(before, '.3f')} over the {ESCAPE_WINDOW} epochs "
            f"before each escape and {_num(after, '.3f')} over the {ESCAPE_WINDOW} from it. "
        )
    figs, tail = [], []
    if gains:
        signals = _layers(table, figures.probe_layers(table, SIGNAL), 1, last, fmt=".3g")
        caption = f"Signal of each layer at epoch 1 and {last}: {signals}"
        figs.append((figures.signal_figure(table, r.name, escapes), f"signal-{r.name}.png", caption))
    if history.layer_columns(table, SATURATION):  # results trained before the probe have none of these
        at_last = _layers(table, figures.probe_layers(table, SATURATION), last)
        saturation = f"Saturated: {SATURATED_MEANS}. At epoch {last}: {at_last}."
        tail.append((figures.saturation_figure(table, r.name, escapes), f"saturation-{r.name}.png", saturation))
        tail.append((figures.jacobian_figure(table, r.name), f"jacobians-{r.name}.png", jacobian_caption(r)))
    text += "Measured every epoch on a fixed probe batch."
    plots = s.render_all(*figs) + plots + s.render_all(*tail)  # the signal, the escapes, then what does not explain
    return Section("stall", f"Why depth {depth} stalls", conclusion + ".", text, plots)


def jacobian_caption(r: VariantResult) -> str:
    """Per-layer mean singular values at epoch 1, and the predicted against the measured first / last ratio."""
    table, depth = r.history, r.variant.depth
    means = _layers(table, history.layer_columns(table, JAC_MEAN), 1, fmt=".3g")
    layers = f"Mean singular value at epoch 1: {means}."
    if depth < 2:
        return layers
    measured, predicted = history.first_to_last(table)["mean"], history.seed_stats(table, JAC_PRODUCT)["mean"]
    return (
        f"{layers} First / last ‖∂C/∂b‖ at epoch 1: predicted "
        f"{_num(predicted.iloc[0], '.3g')}, measured {_num(measured.iloc[0], '.3g')}; medians over epochs "
        f"{_num(predicted.median(), '.3g')} and {_num(measured.median(), '.3g')}."
    )


# ------------------------------------------------------------------------- remedies, results
def remedies_section(s: Study) -> Section:
    """Each remedy beside the classic net of its depth: accuracy, gradient flow, saturation."""
    conclusions, plots = [], []
    for depth, group in remedy_groups(s.results).items():
        remedies = [r for r in group if not r.classic]
        listed = ", ".join(f"{r.name} {s.value(r.name, 'accuracy', '.3f')}" for r in remedies)
        index = ", ".join(s.value(r.name, "vanishing_index", ".3g") for r in remedies)
        conclusions.append(f"At depth {depth}: final training accuracy {listed}; vanishing index {index}.")
        if group[0].classic:
            classic = s.summary.loc[group[0].name]
            above = sum(s.summary.loc[r.name, "accuracy_mean"] > classic["accuracy_mean"] for r in remedies)
            conclusions[-1] = (
                f"At depth {depth}, {above} of {len(remedies)} remedies end above the classic net's final training "
                f"accuracy of {_num(classic['accuracy_mean'], '.3f')} ({listed}), with a vanishing index of {index} "
                f"against its {_num(classic['vanishing_index_mean'], '.3g')}."
            )
        caption = f"Depth {depth}: training accuracy, and the first / last ratio of ‖∂C/∂b‖."
        figs = [(figures.remedies_figure(histories(group), s.colors), f"remedies-depth-{depth}.png", caption)]
        if probed := [r for r in group if history.layer_columns(r.history, SATURATION)]:
            top = columns.layer_column(SATURATION, depth)
            facts = "; ".join(f"{r.name} {_at(r.history, top, 1, r.epochs)}" for r in probed)
            caption = f"Saturated: {SATURATED_MEANS}. hidden_{depth}, first → last epoch: {facts}."
            fig = figures.saturation_by_variant(histories(probed), s.escapes, s.colors)
            figs.append((fig, f"remedies-saturation-depth-{depth}.png", caption))
        plots += s.render_all(*figs)
    conclusion = " ".join(conclusions) or "No remedy in these results."
    return Section("remedies", "Remedies", conclusion, "Each remedy beside the classic net of its depth.", plots)


def results_section(s: Study) -> Section:
    """Held-out beside training accuracy; the results table follows in the template."""
    fig = figures.test_vs_train_figure(histories(s.results), s.colors)
    return Section("results", "Results", results_conclusion(s), plots=s.render_all((fig, "test_vs_train.png", "")))


SECTIONS = (classic_section, replicates_section, gradients_section, stall_section, remedies_section, results_section)


def build_report(results: Sequence[VariantResult], rp: ReportParams, window: int, folder: Path) -> None:
    """Write the PNGs, ``index.html``, ``summary.md`` and ``plots/`` into ``folder``."""
    s = Study(list(results), rp, window, folder)
    env = jinja2.Environment(  # autoescaped: every value is text
        loader=jinja2.PackageLoader("pipeline", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,  # a missing value is an error, not an empty cell
        keep_trailing_newline=True,
    )
    env.filters["b64"] = lambda data: base64.b64encode(data).decode("ascii")
    context = {
        "summary": page_summary(s),
        "setup": setup_conclusion(s),
        "variants": [
            (r.name, *(getattr(r.variant, k) for k in SETTINGS), ", ".join(map(str, r.seeds)), r.epochs)
            for r in s.results
        ],
        "settings": [(f"report.{k}", v) for k, v in rp.model_dump().items()] + [("summary.index_window", window)],
        "sections": [make(s) for make in SECTIONS],
        "results": result_rows(s.summary.reset_index()),
        "runs": (runs := run_rows(s.results, rp.ui_url)),
        "runs_conclusion": f"{len(runs)} training runs, {sum(bool(r['link']) for r in runs)} of them with a link.",
        "ui_url": rp.ui_url,
        "window": window,
    }
    (folder / "index.html").write_text(env.get_template("report.html.j2").render(context), encoding="utf-8")
    (folder / "summary.md").write_text(summary_markdown(s.summary.reset_index()), encoding="utf-8")
    curves.write_plot_data(histories(s.results), s.colors, folder / "plots")  # seed means for `dvc plots show`


def _stage(args: argparse.Namespace, rp: ReportParams) -> None:
    study = study_names(load_section("grid", args.params), load_section("remedies", args.params))
    window = load_section("summary", args.params).index_window
    results = load_results(args.results, study)
    with staged_dir(args.out) as tmp:
        build_report(results, rp, window, tmp)
    log.info("report: %d variant(s) -> %s", len(results), args.out / "index.html")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the stage; 0 on success, 1 on a known failure (nothing written)."""
    parser = argparse.ArgumentParser(prog="python -m pipeline.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=Path("results"), help="folder of variant results")
    parser.add_argument("--out", type=Path, default=Path("reports"), help="report folder (replaced)")
    return cli.run_stage(parser, "report", _stage, (ReportError, OSError), argv)


if __name__ == "__main__":
    raise SystemExit(main())
