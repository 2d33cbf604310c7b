"""Pure measurements of learning speed: weight change, gradient magnitude, vanishing index.

Arrays carry a leading replicate axis (S, ...); every function returns one value
per replicate.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def mean_abs_change(previous: np.ndarray, current: np.ndarray) -> np.ndarray:
    """Mean |current - previous| over everything but the replicate axis: shape (S,)."""
    diff = np.abs(np.asarray(current, np.float64) - np.asarray(previous, np.float64))
    return diff.reshape(diff.shape[0], -1).mean(axis=1)


def mean_abs(values: np.ndarray) -> np.ndarray:
    """Mean |values| per replicate: shape (S,)."""
    flat = np.abs(np.asarray(values, np.float64))
    return flat.reshape(flat.shape[0], -1).mean(axis=1)


def l2_norm(values: np.ndarray) -> np.ndarray:
    """Euclidean norm per replicate: shape (S,)."""
    flat = np.asarray(values, np.float64)
    return np.sqrt((flat.reshape(flat.shape[0], -1) ** 2).sum(axis=1))


def vanishing_index(first_speed: Sequence[float], last_speed: Sequence[float], window: int) -> float:
    """Mean over the first ``window`` epochs of (first hidden layer's speed / last hidden layer's speed).

    Speed is the norm of the bias gradient, ‖∂C/∂b‖, Nielsen's "speed of learning".
    1 means both ends learn equally fast; 0.01 means the first layer learns 100× slower.
    Epochs where the last layer's speed is zero are skipped (the ratio is undefined).
    """
    first = np.asarray(first_speed, np.float64)[:window]
    last = np.asarray(last_speed, np.float64)[:window]
    ok = last > 0
    if not ok.any():
        return float("nan")
    return float(np.mean(first[ok] / last[ok]))
