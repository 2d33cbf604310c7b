"""Figures of the study: histories (:mod:`pipeline.history`) in, matplotlib Figures out.

Nothing here reads or writes files or touches pyplot's global state (every figure is a
:class:`matplotlib.figure.Figure` made directly): safe on any backend and in any thread.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from pipeline import columns
from pipeline.history import depth_of, first_to_last, layer_columns, layer_name, layer_ratios, seed_stats
from pipeline.measures import SATURATED

BOUND_LABEL = "σ'(x) ≤ 1/4 per sigmoid layer"
BAND_NOTE = "line: mean over seeds; bands: ±1 std and min–max"
ACCURACY_LABEL = "training accuracy"
STD_BAND_ALPHA = 0.25
RANGE_BAND_ALPHA = 0.1


# ----------------------------------------------------------------------- helpers
def sigmoid(x: np.ndarray | float) -> np.ndarray | float:
    """The logistic function σ(x) = 1 / (1 + e^-x)."""
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))


def sigmoid_prime(x: np.ndarray | float) -> np.ndarray | float:
    """σ'(x) = σ(x)(1 - σ(x)), largest at x = 0."""
    s = sigmoid(x)
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


def clip_top(ax: Axes, history: pd.DataFrame, layers: list[str], quantile: float) -> None:
    """Set the y-axis to [0, q] with q the ``quantile`` of columns ``layers`` over epochs >= 2 (when there are any)."""
    later = history.loc[history["epoch"] >= 2, layers].to_numpy(dtype=np.float64).ravel()
    later = later[np.isfinite(later)]
    top = float(np.quantile(later, quantile)) if later.size else 0.0
    if top > 0:
        ax.set_ylim(0, top * 1.05)


def _figure(rows: int, cols: int = 1, width: float = 7.0, row_height: float = 3.2, **kw: object) -> tuple[Figure, list]:
    fig = Figure(figsize=(width, row_height * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False, **kw)
    return fig, list(axes.ravel())


def _label(ax: Axes, title: str, ylabel: str, xlabel: str = "epoch", log: bool = False, **legend: object) -> None:
    """Title and axis labels; with ``log`` a log y-axis; with keyword arguments (``loc=``…) a legend."""
    if log:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if legend:
        ax.legend(**legend)


def _depth_bound(ax: Axes, depth: int) -> None:
    """A dashed line at (1/4)^(depth-1): the σ' bound over the layers from the first hidden layer to the last."""
    label = f"{BOUND_LABEL}: ({QUARTER})^{depth - 1}"
    ax.axhline(SIGMOID_BOUND ** (depth - 1), color="k", linestyle="--", linewidth=1, label=label)


# ----------------------------------------------------------------- classic figures
def classic_figure(history: pd.DataFrame, title: str, clip_quantile: float = 0.99) -> Figure:
    """Nielsen's two panels for the lowest seed: training accuracy, then weight change per hidden layer
    (y clipped at a quantile)."""
    history = history[history["seed"] == history["seed"].min()].sort_values("epoch")
    fig, (acc_ax, change_ax) = _figure(2, sharex=True)
    acc_ax.plot(history["epoch"], history["accuracy"], color="C0", label=ACCURACY_LABEL)
    _label(acc_ax, "Training accuracy", "accuracy")
    layers = layer_columns(history, columns.WEIGHT_CHANGE)
    for i, column in enumerate(layers):
        change_ax.plot(history["epoch"], history[column], color=f"C{i}", label=layer_name(column))
    _label(change_ax, "Weight change per hidden layer", "mean |ΔW| per epoch", loc="upper right")
    clip_top(change_ax, history, layers, clip_quantile)
    fig.suptitle(title)
    return fig


def accuracy_by_depth(histories: Mapping[str, pd.DataFrame]) -> Figure:
    """Training accuracy of every variant on one axis (mean over seeds, std and min–max bands)."""
    fig, (ax,) = _figure(1, row_height=4.5)
    for i, (label, history) in enumerate(histories.items()):
        plot_stats(ax, seed_stats(history, "accuracy"), label, f"C{i}")
    _label(ax, f"Training accuracy by depth\n({BAND_NOTE})", "accuracy", loc="lower right")
    return fig


def first_layer_change(histories: Mapping[str, pd.DataFrame]) -> Figure:
    """Weight change of the first hidden layer for every variant, log scale (mean and bands over seeds)."""
    fig, (ax,) = _figure(1, row_height=4.5)
    column = columns.layer_column(columns.WEIGHT_CHANGE, 1)
    for i, (label, history) in enumerate(histories.items()):
        if column in history.columns:
            plot_stats(ax, seed_stats(history, column), label, f"C{i}", log=True)
    ylabel = "mean |ΔW| of hidden_1 per epoch (log)"
    _label(ax, "First hidden layer's weight change by depth", ylabel, log=True, loc="upper right")
    return fig


def final_accuracy_vs_depth(summary: pd.DataFrame) -> Figure:
    """Final training accuracy against depth: mean ± std error bars and each seed's value as a strip
    (``summary``: one row per variant and seed, as :func:`pipeline.history.final_values` returns)."""
    fig, (ax,) = _figure(1, row_height=4.0)
    by_depth = summary.groupby("depth")["accuracy"]
    means, stds = by_depth.mean(), by_depth.std(ddof=0).fillna(0.0)
    for depth, values in by_depth:
        offsets = np.linspace(-0.05, 0.05, len(values)) if len(values) > 1 else np.zeros(1)
        ax.scatter(depth + 0.15 + offsets, values, s=14, color="C7", alpha=0.8, zorder=2)
    ax.scatter([], [], s=14, color="C7", label="each seed")
    ax.errorbar(means.index, means, yerr=stds, fmt="o-", color="C0", capsize=4, label="mean ± std", zorder=3)
    ax.set_xticks(list(means.index))
    _label(ax, "Final training accuracy against depth", "final training accuracy", "hidden layers", loc="best")
    return fig


def sigmoid_figure() -> Figure:
    """σ(x) and σ'(x) on one axis, with the maximum σ'(0) marked."""
    fig, (ax,) = _figure(1, row_height=3.8)
    x = np.linspace(-6.0, 6.0, 601)
    ax.plot(x, sigmoid(x), color="C0", label="σ(x)")
    ax.plot(x, sigmoid_prime(x), color="C3", label="σ'(x) = σ(x)(1 − σ(x))")
    ax.axhline(SIGMOID_BOUND, color="0.4", linestyle=":", linewidth=1)
    ax.plot([0.0], [SIGMOID_BOUND], "o", color="C3")
    note = f"σ'(0) = {QUARTER}: the largest slope"
    ax.annotate(note, xy=(0.0, SIGMOID_BOUND), xytext=(1.2, SIGMOID_BOUND + 0.2), arrowprops={"arrowstyle": "->"})
    _label(ax, "The sigmoid and its derivative", "value", xlabel="x", loc="upper left")
    return fig


# -------------------------------------------------------------------- replicates
def bands_figure(history: pd.DataFrame, title: str, clip_quantile: float = 0.99) -> Figure:
    """Accuracy and each hidden layer's weight change across seeds: mean, ±std band, min–max band."""
    layers = layer_columns(history, columns.WEIGHT_CHANGE)
    fig, axes = _figure(1 + len(layers), row_height=2.6, sharex=True)
    plot_stats(axes[0], seed_stats(history, "accuracy"), ACCURACY_LABEL, "C0")
    _label(axes[0], f"Training accuracy\n({BAND_NOTE})", "accuracy")
    for i, (ax, column) in enumerate(zip(axes[1:], layers, strict=True)):
        plot_stats(ax, seed_stats(history, column), layer_name(column), f"C{i + 1}")
        clip_top(ax, history, [column], clip_quantile)
        _label(ax, f"Weight change of {layer_name(column)}", "mean |ΔW|")
    fig.suptitle(f"{title}: {history['seed'].nunique() if 'seed' in history else 1} seed(s)")
    return fig


# --------------------------------------------------------------------- gradients
def gradient_figure(history: pd.DataFrame, title: str) -> Figure:
    """Panels: mean |∂C/∂W| and ‖∂C/∂b‖ per layer (log), and for two or more layers the ratio of each
    layer's speed (‖∂C/∂b‖) to the next layer's against the σ' bound of 1/4."""
    ratios = layer_ratios(history)
    fig, axes = _figure(2 + bool(ratios), row_height=3.0, sharex=True)
    for ax, kind, what, ylabel in (
        (axes[0], columns.GRAD, "Kernel gradient", "mean |∂C/∂W| (log)"),
        (axes[1], columns.GRAD_BIAS, "Bias gradient (Nielsen's speed of learning)", "‖∂C/∂b‖ (log)"),
    ):
        for i, column in enumerate(layer_columns(history, kind)):
            plot_stats(ax, seed_stats(history, column), layer_name(column), f"C{i}", log=True)
        _label(ax, f"{what} per hidden layer", ylabel, log=True, loc="best", fontsize="small")
    if ratios:
        ax = axes[2]
        for i, (name, stats) in enumerate(ratios.items()):
            plot_stats(ax, stats, name, f"C{i}", log=True)
        ax.axhline(SIGMOID_BOUND, color="k", linestyle="--", linewidth=1, label=BOUND_LABEL)
        what = "Layer-to-layer gradient ratio (earlier / next layer)"
        _label(ax, what, "‖∂C/∂b‖ ratio (log)", log=True, loc="best", fontsize="small")
    fig.suptitle(title)
    return fig


# ---------------------------------------------------------------------- remedies
def remedies_figure(histories: Mapping[str, pd.DataFrame]) -> Figure:
    """At one depth: training accuracy per variant, and the first / last hidden layer's speed ratio (log),
    with the bound (1/4)^(depth-1) when every variant has the same depth of two or more."""
    fig, axes = _figure(1, 2, width=12.0, row_height=4.5)
    for i, (label, history) in enumerate(histories.items()):
        plot_stats(axes[0], seed_stats(history, "accuracy"), label, f"C{i}")
        plot_stats(axes[1], first_to_last(history), label, f"C{i}", log=True)
    _label(axes[0], f"Training accuracy\n({BAND_NOTE})", "accuracy", loc="lower right", fontsize="small")
    depths = sorted({depth_of(h) for h in histories.values()})
    if len(depths) == 1 and depths[0] >= 2:
        _depth_bound(axes[1], depths[0])
    title = "Gradient flow: first / last hidden layer"
    _label(axes[1], title, "‖∂C/∂b‖ ratio (log)", log=True, loc="best", fontsize="small")
    fig.suptitle(f"Remedies at depth {', '.join(map(str, depths))}")
    return fig


def test_vs_train_figure(histories: Mapping[str, pd.DataFrame]) -> Figure:
    """Training accuracy (left) beside held-out accuracy (right) for variants that logged test accuracy."""
    fig, (train_ax, test_ax) = _figure(1, 2, width=12.0, row_height=4.5, sharey=True)
    for i, (label, history) in enumerate(histories.items()):
        plot_stats(train_ax, seed_stats(history, "accuracy"), label, f"C{i}")
        plot_stats(test_ax, seed_stats(history, "test_accuracy"), label, f"C{i}")
    _label(train_ax, "Training accuracy", "accuracy")
    _label(test_ax, "Held-out (test) accuracy", "accuracy", loc="lower right", fontsize="small")
    fig.suptitle(f"Held-out beside training accuracy\n({BAND_NOTE})")
    return fig


# ------------------------------------------------------- why deep sigmoid nets stall (issue 12)
SPREAD_NOTE = "line: mean over seeds; band: 2nd–98th percentile over probe examples and units"
ESCAPE_LABEL = "median escape epoch"


def probe_layers(history: pd.DataFrame, kind: str) -> list[str]:
    """``<kind>/hidden_1`` … ``<kind>/hidden_L`` then ``<kind>/output``, those present in ``history``."""
    output = columns.output_column(kind)
    return layer_columns(history, kind) + ([output] if output in history.columns else [])


def _mark_escape(ax: Axes, escapes: pd.DataFrame | None) -> None:
    """A dotted vertical line at the median escape epoch of the seeds that escaped (none if no seed did)."""
    if escapes is not None and escapes["escaped"].any():
        median = float(escapes.loc[escapes["escaped"], "escape_epoch"].median())
        ax.axvline(median, color="0.3", linestyle=":", linewidth=1.2, label=ESCAPE_LABEL)


def activation_figure(history: pd.DataFrame, title: str, escapes: pd.DataFrame | None = None) -> Figure:
    """Each layer's activation over epochs (Glorot & Bengio 2010, Fig. 2): the mean with the
    2–98 % band over probe examples and units, one panel per layer (hidden layers, then the output)."""
    layers = probe_layers(history, columns.ACT_MEAN)
    fig, axes = _figure(max(len(layers), 1), row_height=1.9, sharex=True, sharey=True)
    for i, (ax, column) in enumerate(zip(axes, layers, strict=False)):
        spread = [column, *(column.replace(columns.ACT_MEAN, k) for k in (columns.ACT_P02, columns.ACT_P98))]
        curve = history.groupby("epoch")[spread].mean().sort_index()
        x = curve.index.to_numpy()
        ax.plot(x, curve[spread[0]], color=f"C{i}", label="mean")
        ax.fill_between(x, curve[spread[1]], curve[spread[2]], color=f"C{i}", alpha=0.25, linewidth=0, label="2–98 %")
        _mark_escape(ax, escapes)
        xlabel = "epoch" if i == len(layers) - 1 else ""
        _label(ax, layer_name(column), "activation", xlabel, loc="upper left", fontsize="x-small", ncol=3)
    fig.suptitle(f"{title}\nactivation values per layer on the probe batch\n({SPREAD_NOTE})")
    return fig


def saturation_figure(history: pd.DataFrame, title: str, escapes: pd.DataFrame | None = None) -> Figure:
    """Each layer's saturated fraction over epochs (mean over seeds, std and min–max bands)."""
    fig, (ax,) = _figure(1, row_height=4.2)
    _saturation_axis(ax, history, escapes)
    fig.suptitle(title)
    return fig


def _saturation_axis(ax: Axes, history: pd.DataFrame, escapes: pd.DataFrame | None, title: str = "") -> None:
    for i, column in enumerate(probe_layers(history, columns.SATURATION)):
        plot_stats(ax, seed_stats(history, column), layer_name(column), f"C{i}")
    _mark_escape(ax, escapes)
    ax.set_ylim(-0.02, 1.02)
    title = title or f"Saturation per layer\n({BAND_NOTE})"
    _label(ax, title, f"fraction with f' < {SATURATED:g} · max f'", loc="best", fontsize="small")


def saturation_by_variant(histories: Mapping[str, pd.DataFrame], escapes: Mapping[str, pd.DataFrame]) -> Figure:
    """One saturation panel per variant (shared y), for comparing remedies with the classic net."""
    fig, axes = _figure(1, len(histories), width=4.2 * len(histories), row_height=4.2, sharey=True)
    for ax, (label, history) in zip(axes, histories.items(), strict=True):
        _saturation_axis(ax, history, escapes.get(label), title=label)
    fig.suptitle(f"Saturation per layer ({BAND_NOTE})")
    return fig


def escape_figure(escapes: Mapping[str, pd.DataFrame], margin: float | None) -> Figure:
    """Every seed's escape epoch, one row per variant: a dot where it escaped, a triangle at the
    last epoch when it did not (censored), and a bar at the mean over the seeds that escaped."""
    fig, (ax,) = _figure(1, row_height=0.45 * len(escapes) + 2.2, width=8.0)
    dot, triangle = {"s": 22, "color": "C0"}, {"s": 40, "marker": ">", "facecolors": "none", "edgecolors": "C3"}
    for row, table in enumerate(escapes.values()):
        escaped, censored = table[table["escaped"]], table[~table["escaped"]]
        jitter = np.linspace(-0.15, 0.15, len(table)) if len(table) > 1 else np.zeros(1)
        y = row + pd.Series(jitter, index=table.index)
        ax.scatter(escaped["escape_epoch"], y[escaped.index], **dot, zorder=3)
        ax.scatter(censored["last_epoch"], y[censored.index], **triangle, zorder=3)
        if len(escaped):
            ax.plot([escaped["escape_epoch"].mean()] * 2, [row - 0.3, row + 0.3], color="k", linewidth=1.5)
    ax.scatter([], [], **dot, label="seed escaped")
    ax.scatter([], [], **triangle, label="censored: not by its last epoch")
    ax.plot([], [], color="k", linewidth=1.5, label="mean over the seeds that escaped")
    ax.set_yticks(range(len(escapes)), list(escapes))
    ax.set_ylim(len(escapes) - 0.5, -0.5)
    ax.set_xscale("log")
    last = max([1, *(int(table["last_epoch"].max()) for table in escapes.values() if len(table))])
    ax.set_xlim(0.9, last * 1.4)
    plus = "its margin" if margin is None else format(margin, "g")
    title = f"Escape epoch of every seed\n(first epoch with training accuracy > epoch 1's + {plus})"
    _label(ax, title, "variant", xlabel="epoch (log)")
    fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncol=3, fontsize="small", frameon=False)
    return fig


def jacobian_figure(history: pd.DataFrame, title: str) -> Figure:
    """The layer Jacobians against the σ' bound: each hidden layer's mean (solid) and largest
    (dashed) singular value over epochs; and, from two layers, their product over layers 1 … L-1
    (the prediction) beside the measured first / last ratio of ‖∂C/∂b‖ and (1/4)^(L-1)."""
    depth = depth_of(history)
    fig, axes = _figure(1 + (depth >= 2), row_height=3.4, sharex=True)
    ax = axes[0]
    for i, column in enumerate(layer_columns(history, columns.JAC_MEAN)):
        plot_stats(ax, seed_stats(history, column), f"{layer_name(column)} mean", f"C{i}", log=True)
        largest = seed_stats(history, column.replace(columns.JAC_MEAN, columns.JAC_MAX))
        ax.plot(largest.index, largest["mean"], color=f"C{i}", linestyle="--", label=f"{layer_name(column)} largest")
    ax.axhline(SIGMOID_BOUND, color="k", linestyle=":", linewidth=1, label=BOUND_LABEL)
    what = "Singular values of each hidden layer's Jacobian diag(f'(z)) W_next"
    _label(ax, what, "singular value (log)", log=True, loc="best", fontsize="x-small", ncol=2)
    if depth >= 2:
        ax = axes[1]
        predicted = seed_stats(history, columns.JAC_PRODUCT)
        plot_stats(ax, predicted, "predicted: product of mean singular values", "C0", log=True)
        plot_stats(ax, first_to_last(history), "measured: first / last ‖∂C/∂b‖", "C3", log=True)
        _depth_bound(ax, depth)
        what = f"Prediction against measurement, hidden_1 … hidden_{depth - 1}"
        _label(ax, what, "ratio (log)", log=True, loc="best", fontsize="small")
    fig.suptitle(title)
    return fig
