"""Figures and tables of the study: pandas DataFrames in, matplotlib Figures out.

Pure functions: nothing here reads or writes files, and no figure touches pyplot's
global state (every figure is a :class:`matplotlib.figure.Figure` made directly), so
they are safe on any backend and in any thread. The report stage saves them.

A history is the train stage's ``history.csv``: one row per (seed, epoch) with
``accuracy``, ``loss``, optional ``test_accuracy``/``test_loss``, and per hidden
layer i ``weight_change/hidden_i``, optional ``grad/hidden_i`` (mean |∂C/∂W|) and
``grad_bias/hidden_i`` (‖∂C/∂b‖, Nielsen's speed of learning). Statistics over
replicate seeds use the population std (``ddof=0``), as ``metrics.json`` does.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from pipeline.params import Variant

WEIGHT_CHANGE = "weight_change"
GRAD = "grad"
GRAD_BIAS = "grad_bias"
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


def layer_columns(history: pd.DataFrame, kind: str) -> list[str]:
    """Columns ``<kind>/hidden_<i>`` of ``history``, in layer order (``kind``: weight_change, grad, grad_bias)."""
    pattern = re.compile(rf"^{re.escape(kind)}/hidden_(\d+)$")
    found = [(int(m.group(1)), col) for col in history.columns if (m := pattern.match(str(col)))]
    return [col for _, col in sorted(found)]


def layer_name(column: str) -> str:
    """``grad/hidden_2`` -> ``hidden_2``."""
    return column.split("/", 1)[-1]


def depth_of(history: pd.DataFrame) -> int:
    """Number of hidden layers a history describes (its weight-change columns)."""
    return len(layer_columns(history, WEIGHT_CHANGE))


def has_gradients(history: pd.DataFrame) -> bool:
    """Whether the history carries per-layer gradient columns (older runs do not)."""
    return bool(layer_columns(history, GRAD) or layer_columns(history, GRAD_BIAS))


def has_test(history: pd.DataFrame) -> bool:
    """Whether the history carries held-out accuracy."""
    return "test_accuracy" in history.columns


def speed_kind(history: pd.DataFrame) -> str:
    """The gradient measure used for layer ratios: ``grad_bias`` (Nielsen's speed) when present, else ``grad``."""
    return GRAD_BIAS if layer_columns(history, GRAD_BIAS) else GRAD


def seed_stats(history: pd.DataFrame, column: str) -> pd.DataFrame:
    """Per epoch (index), ``mean``, ``std`` (ddof=0), ``min``, ``max`` and ``count`` of ``column`` over seeds."""
    grouped = history.groupby("epoch")[column]
    stats = grouped.agg(["mean", "min", "max", "count"])
    stats["std"] = grouped.std(ddof=0).fillna(0.0)
    return stats.sort_index()


def with_ratio(history: pd.DataFrame, numerator: str, denominator: str, name: str) -> pd.DataFrame:
    """``history`` plus column ``name`` = numerator / denominator per row (per seed and epoch; 0 -> NaN)."""
    denom = history[denominator].where(history[denominator] != 0)
    return history.assign(**{name: history[numerator] / denom})


def final_rows(history: pd.DataFrame) -> pd.DataFrame:
    """Each seed's last-epoch row."""
    by = "seed" if "seed" in history.columns else None
    ordered = history.sort_values("epoch")
    return ordered.groupby(by).tail(1) if by else ordered.tail(1)


def final_values(histories: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """Long table of per-seed final-epoch values: label, depth, seed, accuracy and test_accuracy (NaN if absent)."""
    frames = []
    for label, history in histories.items():
        last = final_rows(history)
        frames.append(
            pd.DataFrame(
                {
                    "label": label,
                    "depth": depth_of(history),
                    "seed": last["seed"].to_numpy() if "seed" in last else 0,
                    "accuracy": last["accuracy"].to_numpy(),
                    "test_accuracy": last["test_accuracy"].to_numpy() if has_test(last) else np.nan,
                }
            )
        )
    columns = ["label", "depth", "seed", "accuracy", "test_accuracy"]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)


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


def clip_top(ax: Axes, history: pd.DataFrame, columns: list[str], quantile: float) -> None:
    """Set the y-axis to [0, q] with q the ``quantile`` of ``columns`` over epochs >= 2 (when there are any)."""
    later = history.loc[history["epoch"] >= 2, columns].to_numpy(dtype=np.float64).ravel()
    later = later[np.isfinite(later)]
    if later.size == 0:
        return
    top = float(np.quantile(later, quantile))
    if top > 0:
        ax.set_ylim(0, top * 1.05)


def one_seed(history: pd.DataFrame) -> pd.DataFrame:
    """The rows of the lowest seed (all rows when there is no seed column), ordered by epoch."""
    if "seed" in history.columns and history["seed"].nunique() > 1:
        history = history[history["seed"] == history["seed"].min()]
    return history.sort_values("epoch")


def _figure(rows: int, cols: int = 1, width: float = 7.0, row_height: float = 3.2, **kw: object) -> tuple[Figure, list]:
    fig = Figure(figsize=(width, row_height * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False, **kw)
    return fig, list(axes.ravel())


def _label(ax: Axes, title: str, ylabel: str, xlabel: str = "epoch") -> None:
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)


def _no_data(ax: Axes, title: str, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes)
    _label(ax, title, "")


# ----------------------------------------------------------------- classic figures
def classic_figure(history_one_seed: pd.DataFrame, title: str, clip_quantile: float = 0.99) -> Figure:
    """Nielsen's two panels: training accuracy, then weight change per hidden layer (y clipped at a quantile).

    Given several seeds, the lowest seed is drawn.
    """
    history = one_seed(history_one_seed)
    fig, (acc_ax, change_ax) = _figure(2, sharex=True)
    acc_ax.plot(history["epoch"], history["accuracy"], color="C0", label=ACCURACY_LABEL)
    _label(acc_ax, "Training accuracy", "accuracy")
    columns = layer_columns(history, WEIGHT_CHANGE)
    for i, column in enumerate(columns):
        change_ax.plot(history["epoch"], history[column], color=f"C{i}", label=layer_name(column))
    _label(change_ax, "Weight change per hidden layer", "mean |ΔW| per epoch")
    change_ax.legend(loc="upper right")
    clip_top(change_ax, history, columns, clip_quantile)
    fig.suptitle(title)
    return fig


def accuracy_by_depth(histories: Mapping[str, pd.DataFrame]) -> Figure:
    """Training accuracy of every variant on one axis (mean over seeds, std and min–max bands)."""
    fig, (ax,) = _figure(1, row_height=4.5)
    for i, (label, history) in enumerate(histories.items()):
        plot_stats(ax, seed_stats(history, "accuracy"), label, f"C{i}")
    _label(ax, f"Training accuracy by depth\n({BAND_NOTE})", "accuracy")
    ax.legend(loc="lower right")
    return fig


def first_layer_change(histories: Mapping[str, pd.DataFrame]) -> Figure:
    """Weight change of the first hidden layer for every variant, log scale (mean and bands over seeds)."""
    fig, (ax,) = _figure(1, row_height=4.5)
    column = f"{WEIGHT_CHANGE}/hidden_1"
    for i, (label, history) in enumerate(histories.items()):
        if column in history.columns:
            plot_stats(ax, seed_stats(history, column), label, f"C{i}", log=True)
    ax.set_yscale("log")
    _label(ax, "First hidden layer's weight change by depth", "mean |ΔW| of hidden_1 per epoch (log)")
    ax.legend(loc="upper right")
    return fig


def final_accuracy_vs_depth(summary: pd.DataFrame) -> Figure:
    """Final training accuracy against depth: mean ± std error bars and each seed's value as a strip.

    ``summary`` has one row per (variant, seed) with columns ``depth`` and ``accuracy``
    (as :func:`final_values` returns).
    """
    fig, (ax,) = _figure(1, row_height=4.0)
    by_depth = summary.groupby("depth")["accuracy"]
    means, stds = by_depth.mean(), by_depth.std(ddof=0).fillna(0.0)
    for depth, values in by_depth:
        offsets = np.linspace(-0.05, 0.05, len(values)) if len(values) > 1 else np.zeros(1)
        ax.scatter(depth + 0.15 + offsets, values, s=14, color="C7", alpha=0.8, zorder=2)
    ax.scatter([], [], s=14, color="C7", label="each seed")
    ax.errorbar(means.index, means, yerr=stds, fmt="o-", color="C0", capsize=4, label="mean ± std", zorder=3)
    ax.set_xticks(list(means.index))
    _label(ax, "Final training accuracy against depth", "final training accuracy", xlabel="hidden layers")
    ax.legend(loc="best")
    return fig


def sigmoid_figure() -> Figure:
    """σ(x) and σ'(x) on one axis, with the maximum σ'(0) marked."""
    fig, (ax,) = _figure(1, row_height=3.8)
    x = np.linspace(-6.0, 6.0, 601)
    ax.plot(x, sigmoid(x), color="C0", label="σ(x)")
    ax.plot(x, sigmoid_prime(x), color="C3", label="σ'(x) = σ(x)(1 − σ(x))")
    ax.axhline(SIGMOID_BOUND, color="0.4", linestyle=":", linewidth=1)
    ax.plot([0.0], [SIGMOID_BOUND], "o", color="C3")
    ax.annotate(
        f"σ'(0) = 1/{1 / SIGMOID_BOUND:.0f}: the largest slope",
        xy=(0.0, SIGMOID_BOUND),
        xytext=(1.2, SIGMOID_BOUND + 0.2),
        arrowprops={"arrowstyle": "->"},
    )
    _label(ax, "The sigmoid and its derivative", "value", xlabel="x")
    ax.legend(loc="upper left")
    return fig


# -------------------------------------------------------------------- replicates
def bands_figure(history: pd.DataFrame, title: str, clip_quantile: float = 0.99) -> Figure:
    """Accuracy and each hidden layer's weight change across seeds: mean, ±std band, min–max band."""
    columns = layer_columns(history, WEIGHT_CHANGE)
    fig, axes = _figure(1 + len(columns), row_height=2.6, sharex=True)
    plot_stats(axes[0], seed_stats(history, "accuracy"), ACCURACY_LABEL, "C0")
    _label(axes[0], f"Training accuracy\n({BAND_NOTE})", "accuracy")
    for i, (ax, column) in enumerate(zip(axes[1:], columns, strict=True)):
        plot_stats(ax, seed_stats(history, column), layer_name(column), f"C{i + 1}")
        clip_top(ax, history, [column], clip_quantile)
        _label(ax, f"Weight change of {layer_name(column)}", "mean |ΔW|")
    fig.suptitle(f"{title}: {history['seed'].nunique() if 'seed' in history else 1} seed(s)")
    return fig


# --------------------------------------------------------------------- gradients
def gradient_figure(history: pd.DataFrame, title: str) -> Figure:
    """Per-layer gradients (log) and the layer-to-layer ratio against the σ' bound of 1/4.

    Panels: mean |∂C/∂W| per layer (if logged), ‖∂C/∂b‖ per layer (if logged), and for two
    or more layers the ratio of each layer's speed to the next layer's (‖∂C/∂b‖ when logged,
    else mean |∂C/∂W|), with the reference line at σ'(0). Raises ValueError without gradients.
    """
    if not has_gradients(history):
        raise ValueError("history has no grad/ or grad_bias/ columns")
    kinds = [
        (kind, ylabel)
        for kind, ylabel in ((GRAD, "mean |∂C/∂W| (log)"), (GRAD_BIAS, "‖∂C/∂b‖ (log)"))
        if layer_columns(history, kind)
    ]
    speed = layer_columns(history, speed_kind(history))
    fig, axes = _figure(len(kinds) + (len(speed) >= 2), row_height=3.0, sharex=True)
    for ax, (kind, ylabel) in zip(axes, kinds, strict=False):
        for i, column in enumerate(layer_columns(history, kind)):
            plot_stats(ax, seed_stats(history, column), layer_name(column), f"C{i}", log=True)
        ax.set_yscale("log")
        what = "Kernel gradient" if kind == GRAD else "Bias gradient (Nielsen's speed of learning)"
        _label(ax, f"{what} per hidden layer", ylabel)
        ax.legend(loc="best", fontsize="small")
    if len(speed) >= 2:
        _ratio_panel(axes[-1], history, speed)
    fig.suptitle(title)
    return fig


def _ratio_panel(ax: Axes, history: pd.DataFrame, speed: list[str]) -> None:
    for i, (earlier, later) in enumerate(itertools.pairwise(speed)):
        name = f"{layer_name(earlier)} / {layer_name(later)}"
        plot_stats(ax, seed_stats(with_ratio(history, earlier, later, name), name), name, f"C{i}", log=True)
    ax.axhline(SIGMOID_BOUND, color="k", linestyle="--", linewidth=1, label=BOUND_LABEL)
    ax.set_yscale("log")
    measure = "‖∂C/∂b‖" if speed[0].startswith(f"{GRAD_BIAS}/") else "mean |∂C/∂W|"
    _label(ax, "Layer-to-layer gradient ratio (earlier / next layer)", f"{measure} ratio (log)")
    ax.legend(loc="best", fontsize="small")


def first_to_last(history: pd.DataFrame, kind: str) -> pd.DataFrame | None:
    """Seed stats of the first / last hidden layer ratio of ``kind`` (None when the columns are missing)."""
    columns = layer_columns(history, kind)
    if not columns:
        return None
    name = "first/last"
    return seed_stats(with_ratio(history, columns[0], columns[-1], name), name)


# ---------------------------------------------------------------------- remedies
def remedies_figure(histories: Mapping[str, pd.DataFrame]) -> Figure:
    """At one depth: training accuracy per variant, and the first / last hidden layer gradient ratio (log).

    The ratio panel is left out when no variant logged gradients; the bound (1/4)^(depth-1)
    is drawn when every variant has the same depth of two or more.
    """
    with_grads = {label: h for label, h in histories.items() if has_gradients(h)}
    fig, axes = _figure(1, 2 if with_grads else 1, width=12.0 if with_grads else 7.0, row_height=4.5)
    for i, (label, history) in enumerate(histories.items()):
        plot_stats(axes[0], seed_stats(history, "accuracy"), label, f"C{i}")
    _label(axes[0], f"Training accuracy\n({BAND_NOTE})", "accuracy")
    axes[0].legend(loc="lower right", fontsize="small")
    if with_grads:
        kind = GRAD_BIAS if all(layer_columns(h, GRAD_BIAS) for h in with_grads.values()) else GRAD
        _first_to_last_panel(axes[1], histories, kind)
    depths = sorted({depth_of(h) for h in histories.values()})
    fig.suptitle(f"Remedies at depth {', '.join(map(str, depths))}")
    return fig


def _first_to_last_panel(ax: Axes, histories: Mapping[str, pd.DataFrame], kind: str) -> None:
    for i, (label, history) in enumerate(histories.items()):
        stats = first_to_last(history, kind)
        if stats is not None:
            plot_stats(ax, stats, label, f"C{i}", log=True)
    depths = {depth_of(h) for h in histories.values()}
    if len(depths) == 1 and (depth := depths.pop()) >= 2:
        bound = SIGMOID_BOUND ** (depth - 1)
        label = f"{BOUND_LABEL}: (1/{1 / SIGMOID_BOUND:.0f})^{depth - 1}"
        ax.axhline(bound, color="k", linestyle="--", linewidth=1, label=label)
    ax.set_yscale("log")
    measure = "‖∂C/∂b‖" if kind == GRAD_BIAS else "mean |∂C/∂W|"
    _label(ax, "Gradient flow: first / last hidden layer", f"{measure} ratio (log)")
    ax.legend(loc="best", fontsize="small")


def test_vs_train_figure(histories: Mapping[str, pd.DataFrame]) -> Figure:
    """Training accuracy (left) beside held-out accuracy (right) for variants that logged test accuracy."""
    tested = {label: h for label, h in histories.items() if has_test(h)}
    if not tested:
        raise ValueError("no history has a test_accuracy column")
    fig, (train_ax, test_ax) = _figure(1, 2, width=12.0, row_height=4.5, sharey=True)
    for i, (label, history) in enumerate(tested.items()):
        plot_stats(train_ax, seed_stats(history, "accuracy"), label, f"C{i}")
        plot_stats(test_ax, seed_stats(history, "test_accuracy"), label, f"C{i}")
    _label(train_ax, "Training accuracy", "accuracy")
    _label(test_ax, "Held-out (test) accuracy", "accuracy")
    test_ax.legend(loc="lower right", fontsize="small")
    fig.suptitle(f"Held-out beside training accuracy\n({BAND_NOTE})")
    return fig


# ------------------------------------------------------------------------- table
SUMMARY_COLUMNS = [
    "variant",
    "depth",
    "activation",
    "loss",
    "init",
    "norm",
    "seeds",
    "epochs",
    "accuracy_mean",
    "accuracy_std",
    "test_accuracy_mean",
    "test_accuracy_std",
    "vanishing_index_mean",
    "vanishing_index_std",
]


def summary_table(
    histories: Mapping[str, pd.DataFrame],
    variants: Mapping[str, Variant],
    metrics: Mapping[str, Mapping[str, float]] | None = None,
) -> pd.DataFrame:
    """One row per variant (keys of ``histories``): its settings and final values, mean and std over seeds.

    Accuracy and test accuracy are taken from ``metrics`` (the train stage's ``metrics.json``)
    when present there, else computed from each seed's last epoch (std with ddof=0); the
    vanishing index comes from ``metrics`` only (NaN without it).
    """
    rows = []
    for label, history in histories.items():
        variant, given, last = variants[label], (metrics or {}).get(label, {}), final_rows(history)
        seeds = int(history["seed"].nunique()) if "seed" in history else 1
        rows.append(
            [
                *(label, variant.depth, variant.activation, variant.loss, variant.init, variant.norm),
                *(seeds, int(history["epoch"].max())),
                *_mean_std(given, last, "accuracy"),
                *_mean_std(given, last, "test_accuracy"),
                *_mean_std(given, None, "vanishing_index"),
            ]
        )
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


def _mean_std(given: Mapping[str, float], last: pd.DataFrame | None, key: str) -> tuple[float, float]:
    """``key`` and ``key_std`` from ``given`` (metrics.json), else mean and std (ddof=0) of ``last[key]``."""
    if key in given:
        return float(given[key]), float(given.get(f"{key}_std", np.nan))
    if last is None or key not in last.columns:
        return np.nan, np.nan
    return float(last[key].mean()), float(last[key].std(ddof=0))


def format_mean_std(mean: float, std: float, fmt: str = ".4f") -> str:
    """``0.9123 ± 0.0012``; ``n/a`` for a missing mean; the std is left out when missing."""
    if mean is None or not np.isfinite(mean):
        return "n/a"
    if std is None or not np.isfinite(std):
        return format(mean, fmt)
    return f"{format(mean, fmt)} ± {format(std, fmt)}"
