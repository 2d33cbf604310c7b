"""Pure measurements of learning speed: weight change and gradient magnitude.

Arrays carry a leading replicate axis (S, ...); every function returns one value
per replicate.
"""

from __future__ import annotations

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
