"""Compiled whole-epoch training of a stacked model, with Keras callbacks at epoch boundaries.

One compiled call runs a whole epoch of the plain SGD steps ``fit`` would take (same batches,
loss and update; why and how much faster: docs/performance.md), and the usual Keras callbacks
run once per epoch with per-replicate logs. The step is ordinary Keras 3; only gradient-taking
and compilation are backend specific (TensorFlow and JAX).

Cross-entropy is computed from the logits behind the softmax output, as Keras' ``fit`` does on
TensorFlow (``_get_logits`` in ``keras/src/backend/tensorflow/nn.py``): from clipped
probabilities the gradient would vanish wherever a probability fell below 1e-7.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from typing import Any

import keras
import numpy as np
from keras import ops

from pipeline.model import logits_model

# run_epoch(x, y, full batches, short last batch) -> per-replicate loss sum and hits; grads(x, y).
Compiled = tuple[Callable[..., tuple[np.ndarray, np.ndarray]], Callable[[Any, Any], list[Any]]]


def configure_backend() -> str:
    """Pin thread pools and determinism before the backend does any work; returns the backend.

    One intra-op and one inter-op thread is *faster* here: the ops are small, and
    thread hand-offs cost more than they save (measured: 0.10 s vs 0.32 s per epoch
    at depth 4 on 2 cores). It also makes results bit-for-bit repeatable.
    """
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(1)
        tf.config.threading.set_inter_op_parallelism_threads(1)
        tf.config.experimental.enable_op_determinism()
        # Recent NVIDIA GPUs would otherwise multiply float32 in TF32 (a 10-bit mantissa),
        # which is not the experiment's arithmetic. No effect on a CPU.
        tf.config.experimental.enable_tensor_float_32_execution(False)
    elif backend == "jax" and "JAX_DEFAULT_MATMUL_PRECISION" not in os.environ:
        import jax

        # GPUs would otherwise multiply float32 in TF32, which is not the experiment's arithmetic.
        jax.config.update("jax_default_matmul_precision", "highest")
    return backend


def replicate_losses(loss: str, y_true: Any, outputs: Any) -> Any:
    """Per-replicate mean loss, shape (S,). ``y_true`` (B, C) is shared, ``outputs`` is (S, B, C):
    the (sigmoid) outputs for ``mse``, the logits behind the softmax for ``cross_entropy``."""
    if loss == "mse":
        return ops.mean(ops.square(outputs - y_true[None]), axis=(1, 2))
    if loss == "cross_entropy":
        return ops.mean(-ops.sum(y_true[None] * ops.log_softmax(outputs, axis=-1), axis=-1), axis=1)
    raise ValueError(f"unknown loss {loss!r}")


def replicate_correct(y_true: Any, outputs: Any) -> Any:
    """Per-replicate count of argmax hits, shape (S,) (the same on probabilities or logits)."""
    hits = ops.equal(ops.argmax(outputs, axis=-1), ops.argmax(y_true, axis=-1)[None])
    return ops.sum(ops.cast(hits, "float32"), axis=1)


class StackedTrainer:
    """Train a stacked model (see :mod:`pipeline.model`) with plain mini-batch SGD.

    The training loss is the **sum** of the replicates' own mean losses, so each
    replicate's gradient is exactly the one it would get alone.
    """

    def __init__(self, model: keras.Model, loss: str, learning_rate: float, batch_size: int, shuffle_seed: int) -> None:
        self.model = model
        self.loss = loss
        self.batch_size = batch_size
        self.replicates = int(model.output_shape[0])
        # What the loss sees: the logits behind the softmax for cross-entropy (same variables).
        self.forward = logits_model(model) if loss == "cross_entropy" else model
        optimizer = keras.optimizers.SGD(learning_rate=learning_rate, momentum=0.0)
        optimizer.build(self.forward.trainable_variables)
        self.rng = np.random.default_rng(shuffle_seed)
        backend = keras.backend.backend()
        if backend not in _COMPILERS:
            raise RuntimeError(f"KERAS_BACKEND={backend} is not supported; use tensorflow or jax")
        self._run_epoch, self._grads = _COMPILERS[backend](self.forward, optimizer, loss, self.replicates)

    def fit(
        self, x: np.ndarray, y: np.ndarray, epochs: int, callbacks: Sequence[keras.callbacks.Callback] = ()
    ) -> None:
        """Train for ``epochs`` epochs. Callbacks get ``logs`` with per-replicate arrays:
        ``loss`` and ``accuracy`` of shape (S,), averaged over the epoch's batches as
        Keras' ``fit`` reports them."""
        cbs = keras.callbacks.CallbackList(list(callbacks), model=self.model)
        n = len(x)
        n_full = n // self.batch_size * self.batch_size
        x, y = ops.convert_to_tensor(x), ops.convert_to_tensor(y)
        self.model.stop_training = False
        cbs.on_train_begin()
        for epoch in range(epochs):
            cbs.on_epoch_begin(epoch)
            # A fresh permutation each epoch, as fit(shuffle=True): full batches, then the short one.
            order = self.rng.permutation(n).astype(np.int32)
            loss_sum, correct = self._run_epoch(x, y, order[:n_full].reshape(-1, self.batch_size), order[n_full:])
            cbs.on_epoch_end(epoch, {"loss": loss_sum / n, "accuracy": correct / n})
            if self.model.stop_training:
                break
        cbs.on_train_end()

    def evaluate(self, x: np.ndarray, y: np.ndarray, batch_size: int = 10_000) -> dict[str, np.ndarray]:
        """Per-replicate loss and accuracy on ``(x, y)`` in inference mode."""
        loss_sum = np.zeros(self.replicates)
        correct = np.zeros(self.replicates)
        for start in range(0, len(x), batch_size):
            xb, yb = x[start : start + batch_size], y[start : start + batch_size]
            out = self.forward(xb, training=False)
            loss_sum += ops.convert_to_numpy(replicate_losses(self.loss, yb, out)) * len(xb)
            correct += ops.convert_to_numpy(replicate_correct(yb, out))
        return {"loss": loss_sum / len(x), "accuracy": correct / len(x)}

    def gradients(self, x: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
        """Gradient of the summed loss w.r.t. every trainable variable (by its path) on one batch, in
        inference mode (no state updates). Slice k of each gradient is replicate k's own gradient."""
        grads = self._grads(ops.convert_to_tensor(x), ops.convert_to_tensor(y))
        variables = self.forward.trainable_variables
        return {v.path: ops.convert_to_numpy(g) for v, g in zip(variables, grads, strict=True)}


def _compile_tf(forward: keras.Model, optimizer: keras.optimizers.Optimizer, loss: str, replicates: int) -> Compiled:
    import tensorflow as tf

    variables = forward.trainable_variables

    def step(xb: Any, yb: Any) -> tuple[Any, Any]:
        with tf.GradientTape() as tape:
            out = forward(xb, training=True)
            per_replicate = replicate_losses(loss, yb, out)
            total = ops.sum(per_replicate)
        optimizer.apply(tape.gradient(total, variables), variables)
        n = ops.cast(ops.shape(xb)[0], "float32")
        return per_replicate * n, replicate_correct(yb, out)

    # XLA fuses a single model's small ops (17% faster at depth 4 here), but its
    # matrix products on the wide stacked shapes are slower than oneDNN's (measured:
    # 0.20 vs 0.19 s/epoch for 4 replicates), so only a lone model is compiled with it.
    @tf.function(reduce_retracing=True, jit_compile=replicates == 1)
    def epoch(x: Any, y: Any, batches: Any) -> tuple[Any, Any]:
        # A graph-level loop over the epoch's full batches: one Python call per epoch.
        loss_sum = correct = tf.zeros((replicates,), tf.float32)
        for i in tf.range(tf.shape(batches)[0]):
            idx = batches[i]
            dl, dc = step(tf.gather(x, idx), tf.gather(y, idx))
            loss_sum += dl
            correct += dc
        return loss_sum, correct

    @tf.function(reduce_retracing=True)
    def last_batch(x: Any, y: Any, idx: Any) -> tuple[Any, Any]:
        # Called from Python only when the last batch is short. An in-graph
        # ``tf.cond`` on its size is lowered so that an empty batch still reaches
        # kernels in the branch not taken (SIGFPE in the cross-entropy gradient).
        return step(tf.gather(x, idx), tf.gather(y, idx))

    def run_epoch(x: Any, y: Any, full: np.ndarray, tail: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        loss_sum, correct = epoch(x, y, full)
        if len(tail):
            tail_loss, tail_correct = last_batch(x, y, tail)
            loss_sum, correct = loss_sum + tail_loss, correct + tail_correct
        return loss_sum.numpy().astype(np.float64), correct.numpy().astype(np.float64)

    @tf.function(reduce_retracing=True)
    def grads(x: Any, y: Any) -> list[Any]:
        with tf.GradientTape() as tape:
            total = ops.sum(replicate_losses(loss, y, forward(x, training=False)))
        return tape.gradient(total, variables)

    return run_epoch, grads


def _compile_jax(forward: keras.Model, optimizer: keras.optimizers.Optimizer, loss: str, replicates: int) -> Compiled:
    import jax

    def step(state: tuple[Any, Any, Any], xb: Any, yb: Any) -> tuple[tuple[Any, Any, Any], Any, Any]:
        trainable, non_trainable, opt_vars = state

        def total_loss(tv: Any, ntv: Any) -> tuple[Any, tuple[Any, Any, Any]]:
            out, ntv = forward.stateless_call(tv, ntv, xb, training=True)
            per_replicate = replicate_losses(loss, yb, out)
            return ops.sum(per_replicate), (per_replicate, out, ntv)

        g, (per_replicate, out, non_trainable) = jax.grad(total_loss, has_aux=True)(trainable, non_trainable)
        trainable, opt_vars = optimizer.stateless_apply(opt_vars, g, trainable)
        return (trainable, non_trainable, opt_vars), per_replicate * xb.shape[0], replicate_correct(yb, out)

    @functools.partial(jax.jit, donate_argnums=0)
    def epoch(state: Any, x: Any, y: Any, batches: Any, tail: Any) -> tuple[Any, Any, Any]:
        def body(carry: Any, idx: Any) -> tuple[Any, tuple[Any, Any]]:
            carry, dl, dc = step(carry, x[idx], y[idx])
            return carry, (dl, dc)

        state, (dl, dc) = jax.lax.scan(body, state, batches)
        loss_sum, correct = dl.sum(axis=0), dc.sum(axis=0)
        if tail.shape[0] > 0:  # static under jit: the tail length is part of the shape
            state, tl, tc = step(state, x[tail], y[tail])
            loss_sum, correct = loss_sum + tl, correct + tc
        return state, loss_sum, correct

    def run_epoch(x: Any, y: Any, full: np.ndarray, tail: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        groups = forward.trainable_variables, forward.non_trainable_variables, optimizer.variables
        state, loss_sum, correct = epoch(tuple([v.value for v in group] for group in groups), x, y, full, tail)
        # Write the new state back so callbacks (and saving) see this epoch's weights.
        for group, values in zip(groups, state, strict=True):
            for var, value in zip(group, values, strict=True):
                var.assign(value)
        return np.asarray(loss_sum, np.float64), np.asarray(correct, np.float64)

    @jax.jit
    def grads_of(trainable: Any, non_trainable: Any, x: Any, y: Any) -> Any:
        def total_loss(tv: Any) -> Any:
            out, _ = forward.stateless_call(tv, non_trainable, x, training=False)
            return ops.sum(replicate_losses(loss, y, out))

        return jax.grad(total_loss)(trainable)

    def grads(x: Any, y: Any) -> list[Any]:
        values = [v.value for v in forward.trainable_variables], [v.value for v in forward.non_trainable_variables]
        return grads_of(*values, x, y)

    return run_epoch, grads


_COMPILERS: dict[str, Callable[..., Compiled]] = {"tensorflow": _compile_tf, "jax": _compile_jax}
