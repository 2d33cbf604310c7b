"""One variant's ``history.csv`` (a row per seed and epoch, :mod:`pipeline.columns`) and its statistics.

Histories written before the probe columns existed lack them (empty or NaN here). Spread over seeds is the
population std (``ddof=0``): the seeds are every replicate trained, not a sample, and one seed gives 0.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.columns import SCALARS, SIGNAL, SPEED, WEIGHT_CHANGE, layer_column, output_column, parse_layer_column
from pipeline.params import SummaryParams

REQUIRED_COLUMNS = ("seed", "epoch", *SCALARS)
FORECAST_MIN_R2 = 0.9  # the least share of the variance of 1 / signal/output the forecast's line must explain


class HistoryError(ValueError):
    """A ``history.csv`` that cannot be read or lacks what every statistic needs; the message says what to do."""


def read_history(path: Path) -> pd.DataFrame:
    """``history.csv`` with the columns every statistic needs, at least one hidden layer and one row."""
    try:
        frame = pd.read_csv(path)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise HistoryError(f"{path}: cannot be read ({exc}); rerun its train stage (dvc repro)") from exc
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing or frame.empty or depth_of(frame) == 0:
        raise HistoryError(f"{path}: missing column(s) {missing or 'per layer'} or no rows; rerun its train stage")
    return frame


def layer_columns(history: pd.DataFrame, kind: str) -> list[str]:
    """Columns ``<kind>/hidden_<i>`` of ``history`` in layer order."""
    found = [(p[1], c) for c in history.columns if (p := parse_layer_column(c)) and p[0] == kind]
    return [c for _, c in sorted(found)]


def layer_name(column: str) -> str:
    """``grad/hidden_2`` -> ``hidden_2``."""
    return column.split("/", 1)[-1]


def depth_of(history: pd.DataFrame) -> int:
    """Number of hidden layers a history describes."""
    return len(layer_columns(history, WEIGHT_CHANGE))


def seed_stats(history: pd.DataFrame, column: str) -> pd.DataFrame:
    """Per epoch (index): ``mean``, ``std`` (ddof=0), ``min``, ``max`` and ``count`` of ``column`` over seeds."""
    grouped = history.groupby("epoch")[column]
    stats = grouped.agg(["mean", "min", "max", "count"])
    stats["std"] = grouped.std(ddof=0).fillna(0.0)
    return stats.sort_index()


def mean_curves(history: pd.DataFrame) -> pd.DataFrame:
    """Per-epoch mean over seeds of every measured column: one row per epoch, ``epoch`` first."""
    values = [c for c in history.columns if c not in ("seed", "epoch")]
    means = history.groupby("epoch", sort=True)[values].mean().reset_index()
    means["epoch"] = means["epoch"].astype(int)
    return means


def ratio_stats(history: pd.DataFrame, numerator: str, denominator: str) -> pd.DataFrame:
    """Seed stats of numerator / denominator, taken per row (per seed and epoch; a zero denominator gives NaN)."""
    ratio = history[numerator] / history[denominator].where(history[denominator] != 0)
    return seed_stats(history.assign(ratio=ratio), "ratio")


def layer_ratios(history: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Seed stats of each adjacent pair's speed ratio (earlier / next), keyed ``hidden_1 / hidden_2``."""
    pairs = itertools.pairwise(layer_columns(history, SPEED))
    return {f"{layer_name(a)} / {layer_name(b)}": ratio_stats(history, a, b) for a, b in pairs}


def first_to_last(history: pd.DataFrame) -> pd.DataFrame:
    """Seed stats of the first / last hidden layer's speed ratio (all 1 for one layer)."""
    columns = layer_columns(history, SPEED)
    return ratio_stats(history, columns[0], columns[-1])


def final_rows(history: pd.DataFrame) -> pd.DataFrame:
    """Each seed's last-epoch row."""
    return history.sort_values("epoch").groupby("seed").tail(1)


def vanishing_index(first_speed: Sequence[float], last_speed: Sequence[float], window: int) -> tuple[float, int]:
    """Mean over the first ``window`` epochs of first / last hidden layer's speed (0.01: the first learns 100×
    slower), and how many epochs were skipped because the last one's speed was 0 (NaN if all were)."""
    first = np.asarray(first_speed, np.float64)[:window]
    last = np.asarray(last_speed, np.float64)[:window]
    ok = last != 0
    skipped = int((~ok).sum())
    return (float(np.mean(first[ok] / last[ok])) if ok.any() else math.nan), skipped


def plateau_accuracy(labels: np.ndarray) -> float:
    """The constant predictor's accuracy (the most common label's frequency) on one-hot (N, K) or index labels."""
    labels = np.asarray(labels)
    classes = labels.argmax(axis=1) if labels.ndim == 2 else labels
    if classes.size == 0:
        raise ValueError("no labels: the plateau accuracy needs the training labels")
    return float(np.bincount(classes).max() / classes.size)


def prior_mse(labels: np.ndarray) -> float:
    """The quadratic cost of the class-prior predictor (every output = its class's frequency p_k), as
    Keras' mean squared error over one-hot labels (N, K) computes it: mean over k of p_k (1 − p_k)."""
    freq = np.asarray(labels, np.float64).mean(axis=0)
    return float((freq * (1.0 - freq)).mean())


def escape_epoch(epochs: Sequence[int], accuracy: Sequence[float], plateau: float, margin: float) -> int | None:
    """The first epoch whose training accuracy exceeds the plateau by more than ``margin``; None if none does
    (censored). One threshold for every seed: a seed that starts a little above the plateau is not held back."""
    order = np.argsort(np.asarray(epochs))
    above = np.flatnonzero(np.asarray(accuracy, np.float64)[order] > plateau + margin)  # NaN never escapes
    return int(np.asarray(epochs)[order][above[0]]) if above.size else None


def escape_epochs(history: pd.DataFrame, plateau: float, margin: float) -> pd.DataFrame:
    """Per seed (sorted): ``seed``, ``escape_epoch`` (NaN when censored), ``censored`` and ``last_epoch``
    (the epoch a censored seed is censored at)."""
    rows = []
    for seed, group in history.groupby("seed", sort=True):
        epoch = escape_epoch(group["epoch"], group["accuracy"], plateau, margin)
        rows.append((int(seed), np.nan if epoch is None else float(epoch), epoch is None, int(group["epoch"].max())))
    return pd.DataFrame(rows, columns=["seed", "escape_epoch", "censored", "last_epoch"])


def escape_forecasts(history: pd.DataFrame, epochs: int, plateau: float, margin: float) -> pd.DataFrame:
    """Per seed (sorted): ``seed`` and ``forecast``, the escape epoch predicted from its first ``epochs`` epochs.

    The law (a finite-time blow-up): on the plateau r(t) = 1 / ``signal/output`` falls linearly with the
    epoch t, and the escape comes where r would reach 0: the zero crossing of the least-squares line through
    r over epochs ⌈epochs/2⌉ … ``epochs`` (the first half holds the start's transient). NaN where the seed
    escaped within the window, the line does not fall or explains less than ``FORECAST_MIN_R2`` of r's
    variance, the seed has fewer than ``epochs`` epochs, or there is no ``signal/output`` column."""
    column = output_column(SIGNAL)
    rows = []
    for seed, group in history.groupby("seed", sort=True):
        forecast = math.nan
        window = group[(group["epoch"] >= math.ceil(epochs / 2)) & (group["epoch"] <= epochs)]
        escaped = escape_epoch(group["epoch"], group["accuracy"], plateau, margin)
        on_plateau = escaped is None or escaped > epochs
        if column in group and group["epoch"].max() >= epochs and len(window) >= 2 and on_plateau:
            t = window["epoch"].to_numpy(np.float64)
            with np.errstate(divide="ignore"):
                r = 1.0 / window[column].to_numpy(np.float64)
            t_c, r_c = t - t.mean(), r - r.mean()
            if np.isfinite(r).all() and r_c @ r_c > 0:
                slope = (t_c @ r_c) / (t_c @ t_c)
                if slope < 0 and slope * (t_c @ r_c) / (r_c @ r_c) >= FORECAST_MIN_R2:
                    forecast = t.mean() - r.mean() / slope
        rows.append((int(seed), float(forecast)))
    return pd.DataFrame(rows, columns=["seed", "forecast"])


def around_escape(history: pd.DataFrame, column: str, escapes: pd.DataFrame, window: int) -> tuple[float, float, int]:
    """Mean of ``column`` over the ``window`` epochs before, and from, each escaped seed's escape (averaged over
    those seeds), and how many seeds that is; NaN, NaN, 0 when no seed escaped or the column is missing."""
    before, after = [], []
    if column in history.columns:
        for row in escapes[~escapes["censored"]].itertuples(index=False):
            rows = history[history["seed"] == row.seed]
            e = rows["epoch"]
            ahead = rows.loc[(e >= row.escape_epoch - window) & (e < row.escape_epoch), column]
            behind = rows.loc[(e >= row.escape_epoch) & (e < row.escape_epoch + window), column]
            if len(ahead) and len(behind):
                before.append(ahead.mean())
                after.append(behind.mean())
    if not before:
        return math.nan, math.nan, 0
    return float(np.mean(before)), float(np.mean(after)), len(before)


def escape_summary(escapes: pd.DataFrame, forecasts: pd.DataFrame) -> dict[str, float | None]:
    """Mean, std and share of the seeds that escaped, and of those with a forecast; over the seeds with both,
    the mean of forecast - actual (epochs) and of |forecast - actual| / actual. Censored seeds count in no mean."""
    both = escapes.merge(forecasts, on="seed").dropna(subset=["escape_epoch", "forecast"])
    error = (both["forecast"] - both["escape_epoch"]).to_numpy(np.float64)
    out: dict[str, float | None] = {}
    for key, values, fraction in (
        ("escape_epoch", escapes["escape_epoch"], "escaped_fraction"),
        ("escape_forecast", forecasts["forecast"], "forecast_fraction"),
    ):
        found = values.dropna().to_numpy(np.float64)
        out[key] = _finite(found.mean()) if found.size else None
        out[f"{key}_std"] = _finite(found.std()) if found.size else None
        out[fraction] = float(found.size / len(values)) if len(values) else None
    out["escape_forecast_error"] = _finite(error.mean()) if error.size else None
    out["escape_forecast_rel_error"] = _finite(np.mean(np.abs(error) / both["escape_epoch"])) if error.size else None
    return out


def summarize(history: pd.DataFrame, p: SummaryParams, plateau: float) -> dict[str, float | int | None]:
    """``metrics.json`` of one variant: final-epoch values, the vanishing index, the escape epoch and its
    forecast, mean and std over seeds; a non-finite value is ``null`` (JSON has no NaN), never dropped."""
    last = final_rows(history)
    out: dict[str, float | int | None] = {}
    for key in SCALARS:
        # skipna=False: a seed that diverged (NaN) makes the mean NaN, it is not left out.
        out[key] = _finite(last[key].mean(skipna=False))
        out[f"{key}_std"] = _finite(last[key].std(ddof=0, skipna=False))
    first, final = layer_column(SPEED, 1), layer_column(SPEED, depth_of(history))
    seeds = history.sort_values("epoch").groupby("seed")
    per_seed = [vanishing_index(rows[first], rows[final], p.index_window) for _, rows in seeds]
    indices = [index for index, _ in per_seed]
    out["vanishing_index"] = _finite(np.mean(indices))
    out["vanishing_index_std"] = _finite(np.std(indices))
    # Epochs (summed over seeds) left out of the index because the last layer's speed was 0.
    out["vanishing_index_skipped_epochs"] = sum(skipped for _, skipped in per_seed)
    escapes = escape_epochs(history, plateau, p.escape_margin)
    out.update(escape_summary(escapes, escape_forecasts(history, p.forecast_epochs, plateau, p.escape_margin)))
    # The definitions' settings, so that what reads the histories uses the same.
    out.update(plateau=plateau, escape_margin=p.escape_margin, forecast_epochs=p.forecast_epochs)
    out["epochs"] = int(history["epoch"].max())
    out["replicates"] = int(history["seed"].nunique())
    return out


def _finite(value: float) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None
