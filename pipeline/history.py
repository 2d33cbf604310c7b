"""The per-epoch history of one variant (the train stage's ``history.csv``) and the statistics drawn from it.

One row per (seed, epoch), with the columns of :mod:`pipeline.columns`; histories written before the
probe columns existed lack those, and what reads them says so (empty or NaN). Apart from
:func:`read_history`, pure pandas/NumPy. Spread over seeds is the population standard deviation
(``ddof=0``): the seeds are the whole set of replicates trained, not a sample, and one seed gives 0.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.columns import SCALARS, SPEED, WEIGHT_CHANGE, layer_column, parse_layer_column

REQUIRED_COLUMNS = ("seed", "epoch", *SCALARS)
# The escape epoch: first epoch whose training accuracy exceeds epoch 1's by more than this.
ESCAPE_MARGIN = 0.05


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


def final_values(histories: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """Long table of per-seed final values: ``variant, depth, seed, accuracy, test_accuracy``."""
    frames = [
        final_rows(h)[["seed", "accuracy", "test_accuracy"]].assign(variant=name, depth=depth_of(h))
        for name, h in histories.items()
    ]
    columns = ["variant", "depth", "seed", "accuracy", "test_accuracy"]
    return pd.concat(frames, ignore_index=True)[columns] if frames else pd.DataFrame(columns=columns)


def vanishing_index(first_speed: Sequence[float], last_speed: Sequence[float], window: int) -> tuple[float, int]:
    """Mean over the first ``window`` epochs of (first hidden layer's speed / last hidden layer's speed),
    and how many of those epochs were skipped because the last layer's speed was zero (NaN if all were).
    1 means both ends learn equally fast; 0.01 means the first layer learns 100× slower."""
    first = np.asarray(first_speed, np.float64)[:window]
    last = np.asarray(last_speed, np.float64)[:window]
    ok = last != 0
    skipped = int((~ok).sum())
    return (float(np.mean(first[ok] / last[ok])) if ok.any() else math.nan), skipped


def escape_epoch(epochs: Sequence[int], accuracy: Sequence[float], margin: float = ESCAPE_MARGIN) -> int | None:
    """The first epoch whose training accuracy exceeds the first epoch's by more than ``margin``.

    The first epoch's accuracy is the plateau level: a net that sits on a plateau stays at it, one
    that learns leaves it at once (escape epoch 2, the earliest possible). None when no epoch gets
    there (censored: the seed may escape later, or never) or epoch 1's accuracy is not finite."""
    order = np.argsort(np.asarray(epochs))
    epochs = np.asarray(epochs)[order]
    accuracy = np.asarray(accuracy, np.float64)[order]
    if len(accuracy) == 0 or not np.isfinite(accuracy[0]):
        return None
    above = np.flatnonzero(accuracy > accuracy[0] + margin)  # NaN compares False: a diverged epoch never escapes
    return int(epochs[above[0]]) if above.size else None


def escape_epochs(history: pd.DataFrame, margin: float = ESCAPE_MARGIN) -> pd.DataFrame:
    """Per seed (sorted): ``seed``, ``escape_epoch`` (NaN when censored), ``escaped`` and ``last_epoch``."""
    rows = []
    for seed, group in history.groupby("seed", sort=True):
        epoch = escape_epoch(group["epoch"], group["accuracy"], margin)
        last = int(group["epoch"].max())
        rows.append((int(seed), np.nan if epoch is None else float(epoch), epoch is not None, last))
    return pd.DataFrame(rows, columns=["seed", "escape_epoch", "escaped", "last_epoch"])


def around_escape(history: pd.DataFrame, column: str, escapes: pd.DataFrame, window: int) -> tuple[float, float, int]:
    """Mean of ``column`` over the ``window`` epochs before each escaped seed's escape epoch and
    over the ``window`` epochs from it on (both averaged over those seeds), and how many seeds
    that is. NaN, NaN, 0 when no seed escaped or the column is missing."""
    before, after = [], []
    if column in history.columns:
        for row in escapes[escapes["escaped"]].itertuples(index=False):
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


def escape_summary(escapes: pd.DataFrame) -> dict[str, float | None]:
    """``escape_epoch`` (mean over the seeds that escaped; null when none did), ``escape_epoch_std``
    (ddof=0 over those seeds) and ``escaped_fraction``. Censored seeds are never averaged in."""
    escaped = escapes.loc[escapes["escaped"], "escape_epoch"].to_numpy(np.float64)
    return {
        "escape_epoch": _finite(escaped.mean()) if escaped.size else None,
        "escape_epoch_std": _finite(escaped.std()) if escaped.size else None,
        "escaped_fraction": float(escaped.size / len(escapes)) if len(escapes) else None,
    }


def summarize(
    history: pd.DataFrame, index_window: int, escape_margin: float = ESCAPE_MARGIN
) -> dict[str, float | int | None]:
    """``metrics.json`` of one variant: final-epoch values, the vanishing index and the escape epoch
    (:func:`escape_summary`), mean and std over seeds. Non-finite values are written as ``null`` (JSON
    has no NaN) rather than dropped, and a seed's NaN is never averaged away."""
    last = final_rows(history)
    out: dict[str, float | int | None] = {}
    for key in SCALARS:
        # skipna=False: a seed that diverged (NaN) makes the mean NaN, it is not left out.
        out[key] = _finite(last[key].mean(skipna=False))
        out[f"{key}_std"] = _finite(last[key].std(ddof=0, skipna=False))
    first, final = layer_column(SPEED, 1), layer_column(SPEED, depth_of(history))
    seeds = history.sort_values("epoch").groupby("seed")
    per_seed = [vanishing_index(rows[first], rows[final], index_window) for _, rows in seeds]
    indices = [index for index, _ in per_seed]
    out["vanishing_index"] = _finite(np.mean(indices))
    out["vanishing_index_std"] = _finite(np.std(indices))
    # Epochs (summed over seeds) left out of the index because the last layer's speed was 0.
    out["vanishing_index_skipped_epochs"] = sum(skipped for _, skipped in per_seed)
    out.update(escape_summary(escape_epochs(history, escape_margin)))
    out["escape_margin"] = escape_margin  # the definition's one setting, so that the report uses the same
    out["epochs"] = int(history["epoch"].max())
    out["replicates"] = int(history["seed"].nunique())
    return out


def _finite(value: float) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None
