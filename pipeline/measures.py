"""Pure per-epoch measurements: gradient magnitudes, saturation, layer Jacobians, signal propagation.

Arrays carry a leading replicate axis (S, ...); every function returns one value per replicate.
The definitions, with what they show: docs/science.md.
"""

from __future__ import annotations

import numpy as np


def mean_abs(values: np.ndarray) -> np.ndarray:
    """Mean |values| per replicate: shape (S,)."""
    flat = np.abs(np.asarray(values, np.float64))
    return flat.reshape(flat.shape[0], -1).mean(axis=1)


def l2_norm(values: np.ndarray) -> np.ndarray:
    """Euclidean norm per replicate: shape (S,)."""
    flat = np.asarray(values, np.float64)
    return np.sqrt((flat.reshape(flat.shape[0], -1) ** 2).sum(axis=1))


# ------------------------------------------------------------------ activations and saturation
# The largest value of each activation's (diagonal) derivative f'(u): σ'(0) = 1/4, tanh'(0) = 1,
# ReLU' = 1 on u > 0; softmax's diagonal ∂p_j/∂u_j = p_j(1 - p_j) peaks at p_j = 1/2, like σ'.
MAX_SLOPE = {"sigmoid": 0.25, "tanh": 1.0, "relu": 1.0, "softmax": 0.25}
# A unit is saturated (in the flat part of its activation) where f'(u) < SATURATED · max f'.
SATURATED = 0.1
# Percentiles of activations over (example, unit) that give the spread of a layer.
PERCENTILES = (2.0, 98.0)


def activation_derivative(activation: str, u: np.ndarray) -> np.ndarray:
    """f'(u) elementwise for the activation's input ``u``; float64, same shape.

    ReLU's derivative at 0 is 0 (as its gradient in TensorFlow and JAX). Softmax (over the
    last axis) gives its diagonal p(1 - p): how much an output moves with its own logit.
    """
    u = np.asarray(u, np.float64)
    if activation == "sigmoid":
        s = 0.5 * (1.0 + np.tanh(0.5 * u))  # σ(u) without overflow in exp
        return s * (1.0 - s)
    if activation == "tanh":
        return 1.0 - np.tanh(u) ** 2
    if activation == "relu":
        return (u > 0).astype(np.float64)
    if activation == "softmax":
        e = np.exp(u - u.max(axis=-1, keepdims=True))
        p = e / e.sum(axis=-1, keepdims=True)
        return p * (1.0 - p)
    raise ValueError(f"unknown activation {activation!r}; expected one of {', '.join(MAX_SLOPE)}")


def saturation(activation: str, u: np.ndarray) -> np.ndarray:
    """Fraction of (example, unit) pairs with f'(u) < SATURATED · max f', per replicate: shape (S,).
    For the sigmoid σ'(u) < 0.025 (|u| > 3.6), for tanh |u| > 1.82, for ReLU u ≤ 0 ("dead")."""
    slope = activation_derivative(activation, u)
    flat = (slope < SATURATED * MAX_SLOPE[activation]).reshape(slope.shape[0], -1)
    return flat.mean(axis=1)


def activation_stats(a: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean and the 2nd and 98th percentiles of activations over (example, unit), per replicate: (S,) each."""
    flat = np.asarray(a).reshape(np.shape(a)[0], -1)
    low, high = np.percentile(flat, PERCENTILES, axis=1).astype(np.float64)
    return flat.mean(axis=1, dtype=np.float64), low, high


# ---------------------------------------------------------------------------- layer Jacobians
def jacobian_singular_values(slope: np.ndarray, next_kernel: np.ndarray) -> np.ndarray:
    """Singular values (S, B, min(U, V)), largest first, of each example's back-propagation
    Jacobian diag(slope) W_next of one hidden layer: ``slope`` (S, B, U) is ∂a/∂z per example,
    ``next_kernel`` (S, U, V) the next layer's kernel (δ = diag(slope) W_next δ_next)."""
    slope = np.asarray(slope, np.float64)
    kernel = np.asarray(next_kernel, np.float64)
    jac = slope[..., :, None] * kernel[:, None]  # (S, B, U, V)
    # Eigenvalues of the smaller Gram matrix: the squared singular values, cheaper than an SVD.
    gram = jac.swapaxes(-1, -2) @ jac if jac.shape[-1] <= jac.shape[-2] else jac @ jac.swapaxes(-1, -2)
    eig = np.linalg.eigvalsh(gram)[..., ::-1]
    return np.sqrt(np.clip(eig, 0.0, None))


def jacobian_summary(slope: np.ndarray, next_kernel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per replicate (S,): mean over examples of the mean singular value, and of the largest one."""
    sv = jacobian_singular_values(slope, next_kernel)
    return sv.mean(axis=(1, 2)), sv[..., 0].mean(axis=1)


# ----------------------------------------------------------------------- signal propagation
def signal(a: np.ndarray) -> np.ndarray:
    """Mean over units of each unit's standard deviation over the examples (axis -2): (S,) from
    (S, B, U), a scalar from an input shared by every replicate, (B, U)."""
    return np.asarray(a, np.float64).std(axis=-2).mean(axis=-1)


def gain(signal_out: np.ndarray, signal_in: np.ndarray | float) -> np.ndarray:
    """signal_out / signal_in per replicate; NaN where nothing came in (signal_in 0)."""
    out, into = np.broadcast_arrays(np.asarray(signal_out, np.float64), np.asarray(signal_in, np.float64))
    return np.divide(out, into, out=np.full(out.shape, np.nan), where=into != 0)


def coupling(outputs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per replicate (S,): the largest singular value s₁ of the cross-covariance between the outputs
    (S, B, C) and the one-hot ``labels`` (B, K), and its share s₁² / Σ sᵢ² (NaN when it is 0)."""
    o = np.asarray(outputs, np.float64)
    y = np.asarray(labels, np.float64)
    o = o - o.mean(axis=-2, keepdims=True)
    cov = o.swapaxes(-1, -2) @ (y - y.mean(axis=0)) / y.shape[0]  # (S, C, K)
    sv = np.linalg.svd(cov, compute_uv=False)
    energy = (sv**2).sum(axis=-1)
    return sv[:, 0], np.divide(sv[:, 0] ** 2, energy, out=np.full(energy.shape, np.nan), where=energy > 0)
