"""Figures of the study: histories in, matplotlib Figures out, made without pyplot (safe in any thread).

Every figure is ``WIDTH`` inches wide and shown at ``PX_PER_INCH`` whatever its PNG's dpi, so its smallest
text (8.3 pt) is 12 px on screen; legends sit outside the axes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.colors import to_hex
from matplotlib.figure import Figure

from pipeline import columns
from pipeline.history import depth_of, first_to_last, layer_columns, layer_name, layer_ratios, seed_stats
from pipeline.measures import SATURATED
from pipeline.params import Variant

WIDTH = 8.5  # inches: the page's text column
PX_PER_INCH = 110  # CSS pixels per inch of figure on the page
BOUND_LABEL = "σ'(x) ≤ 1/4 per sigmoid layer"
BAND_NOTE = "line: mean over seeds; bands: ±1 std and min–max"
ESCAPE_LABEL = "median escape epoch"
STD_BAND_ALPHA = 0.25
RANGE_BAND_ALPHA = 0.1

# One colour per variant in every figure, in `dvc plots` and in the MLflow UI (pipeline.publish): the
# classic nets by depth on one ordered ramp (viridis without its pale end), every other variant in one
# of Okabe & Ito's colour-blind-safe hues. Hidden layers, which are not variants, take cividis.
CLASSIC = ("sigmoid", "mse", "glorot_uniform", "none")  # activation, loss, init, norm
HUES = ("#d55e00", "#e69f00", "#cc79a7", "#56b4e9", "#000000", "#009e73")


def is_classic(variant: Variant) -> bool:
    """Nielsen's setup: sigmoid, quadratic cost, Glorot initialisation, no normalisation."""
    return (variant.activation, variant.loss, variant.init, variant.norm) == CLASSIC


def variant_colors(variants: Mapping[str, Variant]) -> dict[str, str]:
    """Name -> hex colour: classic variants by depth on the ramp, the others by depth and name through the hues."""
    depths = sorted({v.depth for v in variants.values() if is_classic(v)})
    ramp = {d: to_hex(colormaps["viridis"](0.85 * i / max(len(depths) - 1, 1))) for i, d in enumerate(depths)}
    others = sorted((n for n, v in variants.items() if not is_classic(v)), key=lambda n: (variants[n].depth, n))
    return {n: ramp[v.depth] if is_classic(v) else HUES[others.index(n) % len(HUES)] for n, v in variants.items()}


def _layer_colors(count: int) -> list[str]:
    return [to_hex(colormaps["cividis"](0.85 * i / max(count - 1, 1))) for i in range(count)]


# ----------------------------------------------------------------------- helpers
def sigmoid_prime(x: np.ndarray | float) -> np.ndarray | float:
    """σ'(x) = σ(x)(1 - σ(x)) with σ(x) = 1 / (1 + e^-x), largest at x = 0."""
    s = 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))
    return s * (1.0 - s)


# The bound every sigmoid layer puts on back-propagated error, computed rather than typed.
SIGMOID_BOUND = float(sigmoid_prime(0.0))
QUARTER = f"1/{1 / SIGMOID_BOUND:.0f}"


def plot_stats(ax: Axes, stats: pd.DataFrame, label: str, color: str, log: bool = False) -> None:
    """Mean line, ±std band and lighter min–max band (bands only when there is more than one seed)."""
    x = stats.index.to_numpy()
    ax.plot(x, stats["mean"], color=color, label=label)
    if stats["count"].max() <= 1:
        return
    lower = stats["mean"] - stats["std"]
    if log:  # a log axis cannot show values <= 0: fall back to the smallest seed's value
        lower = lower.where(lower > 0, stats["min"])
    ax.fill_between(x, lower, stats["mean"] + stats["std"], color=color, alpha=STD_BAND_ALPHA, linewidth=0)
    ax.fill_between(x, stats["min"], stats["max"], color=color, alpha=RANGE_BAND_ALPHA, linewidth=0)


def _figure(rows: int, cols: int = 1, row_height: float = 3.0, **kw: object) -> tuple[Figure, list[Axes]]:
    fig = Figure(figsize=(WIDTH, row_height * rows + 0.6), layout="constrained")
    return fig, list(fig.subplots(rows, cols, squeeze=False, **kw).ravel())


def _label(ax: Axes, title: str, ylabel: str, xlabel: str = "epoch", log: bool = False) -> None:
    if log:
        ax.set_yscale("log")
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)


def _legend(ax: Axes) -> None:
    """The axis' legend to its right, outside the data."""
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1), fontsize="small", frameon=False)


def _legend_below(fig: Figure, ax: Axes, ncol: int = 2) -> None:
    """One legend for the figure, below its axes, from ``ax``'s labelled artists."""
    fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncol=ncol, fontsize="small", frameon=False)


def _depth_bound(ax: Axes, depth: int) -> None:
    """A dashed line at (1/4)^(depth-1): the σ' bound over the layers from the first hidden layer to the last."""
    label = f"{BOUND_LABEL}: ({QUARTER})^{depth - 1}"
    ax.axhline(SIGMOID_BOUND ** (depth - 1), color="k", linestyle="--", linewidth=1, label=label)


def _per_layer(ax: Axes, history: pd.DataFrame, layers: list[str], log: bool = False) -> None:
    for column, color in zip(layers, _layer_colors(len(layers)), strict=True):
        plot_stats(ax, seed_stats(history, column), layer_name(column), color, log=log)


# ----------------------------------------------------------------- across variants
def by_variant(
    histories: Mapping[str, pd.DataFrame], colors: Mapping[str, str], column: str, title: str, log: bool = False
) -> Figure:
    """``column`` of every variant on one axis, in its colour: the mean over seeds, std and min–max bands."""
    fig, (ax,) = _figure(1, row_height=3.8)
    for label, history in histories.items():
        plot_stats(ax, seed_stats(history, column), label, colors[label], log=log)
    _label(ax, title, column, log=log)
    _legend_below(fig, ax)
    return fig


def sigmoid_figure() -> Figure:
    """σ(x) and σ'(x) on one axis, with the maximum σ'(0) marked."""
    fig, (ax,) = _figure(1, row_height=2.8)
    x = np.linspace(-6.0, 6.0, 601)
    ax.plot(x, 1.0 / (1.0 + np.exp(-x)), color="k", label="σ(x)")
    ax.plot(x, sigmoid_prime(x), color="0.5", label="σ'(x) = σ(x)(1 − σ(x))")
    ax.axhline(SIGMOID_BOUND, color="0.4", linestyle=":", linewidth=1)
    ax.plot([0.0], [SIGMOID_BOUND], "o", color="0.5")
    note = f"σ'(0) = {QUARTER}: the largest slope"
    ax.annotate(note, xy=(0.0, SIGMOID_BOUND), xytext=(1.2, SIGMOID_BOUND + 0.2), arrowprops={"arrowstyle": "->"})
    _label(ax, "The sigmoid and its derivative", "value", xlabel="x")
    _legend(ax)
    return fig


def remedies_figure(histories: Mapping[str, pd.DataFrame], colors: Mapping[str, str]) -> Figure:
    """At one depth: each variant's training accuracy, and first / last ‖∂C/∂b‖ (log) with (1/4)^(depth-1)."""
    fig, axes = _figure(1, 2, row_height=3.6)
    for label, history in histories.items():
        plot_stats(axes[0], seed_stats(history, "accuracy"), label, colors[label])
        plot_stats(axes[1], first_to_last(history), label, colors[label], log=True)
    depths = sorted({depth_of(h) for h in histories.values()})
    if len(depths) == 1 and depths[0] >= 2:
        _depth_bound(axes[1], depths[0])
    _label(axes[0], "Training accuracy", "training accuracy")
    _label(axes[1], "First / last hidden layer", "‖∂C/∂b‖ ratio", log=True)
    fig.suptitle(f"Remedies at depth {', '.join(map(str, depths))} ({BAND_NOTE})")
    _legend_below(fig, axes[1])
    return fig


def test_vs_train_figure(histories: Mapping[str, pd.DataFrame], colors: Mapping[str, str]) -> Figure:
    """Training accuracy (left) beside held-out accuracy (right), legend below both."""
    fig, axes = _figure(1, 2, row_height=3.6, sharey=True)
    for label, history in histories.items():
        plot_stats(axes[0], seed_stats(history, "accuracy"), label, colors[label])
        plot_stats(axes[1], seed_stats(history, "test_accuracy"), label, colors[label])
    _label(axes[0], "Training accuracy", "accuracy")
    _label(axes[1], "Held-out (test) accuracy", "accuracy")
    fig.suptitle(f"Held-out beside training accuracy ({BAND_NOTE})")
    _legend_below(fig, axes[0])
    return fig


def escape_figure(escapes: Mapping[str, pd.DataFrame], colors: Mapping[str, str]) -> Figure:
    """Every seed's escape epoch (:func:`_seed_marks`), a row per variant, a bar at the mean of those that escaped."""
    fig, (ax,) = _figure(1, row_height=0.4 * len(escapes) + 1.2)
    for row, (label, table) in enumerate(escapes.items()):
        y = row + pd.Series(np.linspace(-0.15, 0.15, len(table)) if len(table) > 1 else [0.0], index=table.index)
        x = table["escape_epoch"].where(~table["censored"], table["last_epoch"])
        _seed_marks(ax, x, y, table["censored"], colors[label], None)
        if not table["censored"].all():
            ax.plot([table["escape_epoch"].mean()] * 2, [row - 0.3, row + 0.3], color="k", linewidth=1.5)
    ax.scatter([], [], s=22, color="0.4", label="seed escaped")
    ax.scatter([], [], s=40, marker=">", facecolors="none", edgecolors="0.4", label="censored: not by its last epoch")
    ax.plot([], [], color="k", linewidth=1.5, label="mean over the seeds that escaped")
    ax.set_yticks(range(len(escapes)), list(escapes))
    ax.set_ylim(len(escapes) - 0.5, -0.5)
    ax.set_xscale("log")
    ax.set_xlim(0.9, max([1, *(int(t["last_epoch"].max()) for t in escapes.values() if len(t))]) * 1.4)
    _label(ax, "Escape epoch of every seed", "", "epoch (log)")
    _legend_below(fig, ax, ncol=3)
    return fig


def saturation_by_variant(
    histories: Mapping[str, pd.DataFrame], escapes: Mapping[str, pd.DataFrame], colors: Mapping[str, str]
) -> Figure:
    """One saturation panel per variant (two a row, shared y), its title in the variant's colour."""
    rows = math.ceil(len(histories) / 2)
    fig, axes = _figure(rows, 2, row_height=2.6, sharey=True, sharex=True)
    for ax, (label, history) in zip(axes, histories.items(), strict=False):
        _saturation_axis(ax, history, escapes.get(label), label)
        ax.title.set_color(colors[label])
    for ax in axes:
        ax.label_outer()
        ax.set_visible(ax in axes[: len(histories)])
    fig.suptitle(f"Saturated fraction per layer ({BAND_NOTE})")
    _legend_below(fig, max(axes[: len(histories)], key=lambda a: len(a.get_lines())), ncol=6)
    return fig


# ------------------------------------------------------------------- one variant
def bands_figure(history: pd.DataFrame, title: str, color: str, clip_quantile: float = 0.99) -> Figure:
    """Accuracy and each hidden layer's weight change across seeds, in the variant's colour; a weight change's
    axis ends at its ``clip_quantile`` over epochs >= 2."""
    layers = layer_columns(history, columns.WEIGHT_CHANGE)
    fig, axes = _figure(1 + len(layers), row_height=2.0, sharex=True)
    plot_stats(axes[0], seed_stats(history, "accuracy"), "training accuracy", color)
    _label(axes[0], "Training accuracy", "accuracy", "")
    for ax, column in zip(axes[1:], layers, strict=True):
        plot_stats(ax, seed_stats(history, column), layer_name(column), color)
        later = history.loc[history["epoch"] >= 2, column].to_numpy(dtype=np.float64)
        later = later[np.isfinite(later)]
        if later.size and (top := float(np.quantile(later, clip_quantile))) > 0:
            ax.set_ylim(0, top * 1.05)
        _label(ax, f"Weight change of {layer_name(column)}", "mean |ΔW|", "epoch" if ax is axes[-1] else "")
    fig.suptitle(f"{title}: {history['seed'].nunique()} seed(s); {BAND_NOTE}")
    return fig


def gradient_figure(history: pd.DataFrame, title: str) -> Figure:
    """Mean |∂C/∂W| and ‖∂C/∂b‖ per hidden layer (log) and, from two layers, each one's ‖∂C/∂b‖ over the next's."""
    ratios = layer_ratios(history)
    fig, axes = _figure(2 + bool(ratios), row_height=2.4, sharex=True)
    for ax, kind, what in ((axes[0], columns.GRAD, "mean |∂C/∂W|"), (axes[1], columns.GRAD_BIAS, "‖∂C/∂b‖")):
        _per_layer(ax, history, layer_columns(history, kind), log=True)
        _label(ax, f"{what} per hidden layer", what, "", log=True)
        _legend(ax)
    if ratios:
        for (name, stats), color in zip(ratios.items(), _layer_colors(len(ratios)), strict=True):
            plot_stats(axes[2], stats, name, color, log=True)
        axes[2].axhline(SIGMOID_BOUND, color="k", linestyle="--", linewidth=1, label=BOUND_LABEL)
        _label(axes[2], "Layer-to-layer ratio (earlier / next layer)", "‖∂C/∂b‖ ratio", log=True)
        _legend(axes[2])
    axes[-1].set_xlabel("epoch")
    fig.suptitle(title)
    return fig


def probe_layers(history: pd.DataFrame, kind: str) -> list[str]:
    """``<kind>/hidden_1`` … ``<kind>/hidden_L`` then ``<kind>/output``, those present in ``history``."""
    output = columns.output_column(kind)
    return layer_columns(history, kind) + ([output] if output in history.columns else [])


def _seed_marks(ax: Axes, x: pd.Series, y: pd.Series, censored: pd.Series, color: str, label: str | None) -> None:
    """A dot per seed that escaped; a hollow triangle per censored one (``x``: its last epoch)."""
    ax.scatter(x[~censored], y[~censored], s=22, color=color, label=label, zorder=3)
    ax.scatter(x[censored], y[censored], s=40, marker=">", facecolors="none", edgecolors=color, zorder=3)


def _mark_escape(ax: Axes, escapes: pd.DataFrame | None) -> None:
    """A dotted vertical line at the median escape epoch of the seeds that escaped (none if no seed did)."""
    if escapes is not None and not escapes["censored"].all():
        median = float(escapes["escape_epoch"].median())  # NaN for the censored seeds: left out
        ax.axvline(median, color="0.3", linestyle=":", linewidth=1.2, label=ESCAPE_LABEL)


def signal_figure(history: pd.DataFrame, title: str, escapes: pd.DataFrame | None = None) -> Figure:
    """Each layer's signal (its spread across the probe batch's images, log), with the input's dashed."""
    fig, (ax,) = _figure(1, row_height=3.4)
    _per_layer(ax, history, probe_layers(history, columns.SIGNAL), log=True)
    first = (columns.layer_column(columns.SIGNAL, 1), columns.layer_column(columns.GAIN, 1))
    ax.axhline((history[first[0]] / history[first[1]]).mean(), color="k", linestyle="--", linewidth=1, label="input")
    _mark_escape(ax, escapes)
    _label(ax, f"{title}: signal per layer", "mean over units of the std over examples", log=True)
    _legend(ax)
    return fig


def forecast_figure(
    escapes: Mapping[str, pd.DataFrame], forecasts: Mapping[str, pd.DataFrame], colors: Mapping[str, str]
) -> Figure:
    """Each seed's forecast escape epoch against its actual one (:func:`_seed_marks`); exact on the diagonal."""
    fig, (ax,) = _figure(1, row_height=3.6)
    for label, table in forecasts.items():
        seeds = escapes[label].merge(table, on="seed").dropna(subset=["forecast"])
        x = seeds["escape_epoch"].where(~seeds["censored"], seeds["last_epoch"])
        _seed_marks(ax, x, seeds["forecast"], seeds["censored"], colors[label], label)
    top = max(ax.get_xlim()[1], ax.get_ylim()[1])
    ax.plot([0, top], [0, top], color="0.4", linestyle=":", label="forecast = actual")
    ax.set(xlim=(0, top), ylim=(0, top))
    _label(ax, "Escape forecast from the early epochs against the actual escape", "forecast", "actual escape epoch")
    _legend_below(fig, ax, ncol=3)
    return fig


def _saturation_axis(ax: Axes, history: pd.DataFrame, escapes: pd.DataFrame | None, title: str) -> None:
    _per_layer(ax, history, probe_layers(history, columns.SATURATION))
    _mark_escape(ax, escapes)
    ax.set_ylim(-0.02, 1.02)
    _label(ax, title, f"fraction f' < {SATURATED:g}·max f'")


def saturation_figure(history: pd.DataFrame, title: str, escapes: pd.DataFrame | None = None) -> Figure:
    """Each layer's saturated fraction over epochs (mean over seeds, std and min–max bands)."""
    fig, (ax,) = _figure(1, row_height=3.4)
    _saturation_axis(ax, history, escapes, f"{title}: saturated fraction per layer")
    _legend(ax)
    return fig


def jacobian_figure(history: pd.DataFrame, title: str) -> Figure:
    """Each hidden layer's Jacobian's mean and largest singular value against the σ' bound and, from two layers,
    the product of the means over layers 1 … L-1 (the prediction) against the measured first / last ‖∂C/∂b‖."""
    depth = depth_of(history)
    fig, axes = _figure(1 + (depth >= 2), row_height=3.0, sharex=True)
    layers = layer_columns(history, columns.JAC_MEAN)
    for column, color in zip(layers, _layer_colors(len(layers)), strict=True):
        plot_stats(axes[0], seed_stats(history, column), f"{layer_name(column)} mean", color, log=True)
        largest = seed_stats(history, column.replace(columns.JAC_MEAN, columns.JAC_MAX))
        axes[0].plot(largest.index, largest["mean"], color=color, linestyle="--", label=f"{layer_name(column)} largest")
    axes[0].axhline(SIGMOID_BOUND, color="k", linestyle=":", linewidth=1, label=BOUND_LABEL)
    _label(
        axes[0], "Singular values of each hidden layer's Jacobian diag(f'(z)) W_next", "singular value", "", log=True
    )
    _legend(axes[0])
    if depth >= 2:
        predicted = seed_stats(history, columns.JAC_PRODUCT)
        plot_stats(axes[1], predicted, "predicted: product of mean singular values", "0.55", log=True)
        plot_stats(axes[1], first_to_last(history), "measured: first / last ‖∂C/∂b‖", "k", log=True)
        _depth_bound(axes[1], depth)
        _label(axes[1], f"Prediction against measurement, hidden_1 … hidden_{depth - 1}", "ratio", log=True)
        _legend(axes[1])
    axes[-1].set_xlabel("epoch")
    fig.suptitle(title)
    return fig
