"""Compiled whole-epoch training of a stacked model, with Keras callbacks at epoch boundaries.

Why not ``model.fit``: the networks are tiny (a 784×15 first layer), so Keras' per-step
machinery (data iterator, metric objects, callbacks hooks) costs more than the
arithmetic. Here one compiled call runs a whole epoch of plain SGD steps, the same
steps ``fit`` would take (same batches, same loss, same update), and the usual Keras
callbacks run once per epoch with per-replicate logs.

The step itself is ordinary Keras 3 (model call, ``keras.ops`` loss, a Keras SGD
optimizer); only gradient-taking and compilation are backend specific, so both the
TensorFlow and the JAX backends are supported.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import keras
import numpy as np
from keras import ops

log = logging.getLogger(__name__)

EPS = 1e-7


def replicate_losses(loss: str, y_true: Any, y_pred: Any) -> Any:
    """Per-replicate mean loss, shape (S,). ``y_true`` (B, C) is shared, ``y_pred`` is (S, B, C).

    ``mse`` is Keras' mean squared error (mean over outputs and batch); ``cross_entropy``
    is Keras' categorical cross-entropy on probabilities (clipped like Keras does).
    """
    if loss == "mse":
        return ops.mean(ops.square(y_pred - y_true[None]), axis=(1, 2))
    if loss == "cross_entropy":
        p = ops.clip(y_pred, EPS, 1.0 - EPS)
        return ops.mean(-ops.sum(y_true[None] * ops.log(p), axis=-1), axis=1)
    raise ValueError(f"unknown loss {loss!r}")


def replicate_correct(y_true: Any, y_pred: Any) -> Any:
    """Per-replicate count of argmax hits, shape (S,)."""
    hits = ops.equal(ops.argmax(y_pred, axis=-1), ops.argmax(y_true, axis=-1)[None])
    return ops.sum(ops.cast(hits, "float32"), axis=1)


class StackedTrainer:
    """Train a stacked model (see :mod:`pipeline.model`) with plain mini-batch SGD.

    The training loss is the **sum** of the replicates' own mean losses, so each
    replicate's gradient is exactly the one it would get alone.
    """

    def __init__(
        self,
        model: keras.Model,
        loss: str,
        learning_rate: float,
        batch_size: int,
        shuffle_seed: int,
    ) -> None:
        self.model = model
        self.loss = loss
        self.batch_size = batch_size
        self.optimizer = keras.optimizers.SGD(learning_rate=learning_rate, momentum=0.0)
        self.optimizer.build(model.trainable_variables)
        self.rng = np.random.default_rng(shuffle_seed)
        self.backend = keras.backend.backend()
        if self.backend == "tensorflow":
            self._impl: _Backend = _TensorFlowBackend(self)
        elif self.backend == "jax":
            self._impl = _JaxBackend(self)
        else:
            raise RuntimeError(f"KERAS_BACKEND={self.backend} is not supported; use tensorflow or jax")

    # ------------------------------------------------------------------ public API
    def epoch_order(self, n: int) -> np.ndarray:
        """Next epoch's sample order: a fresh permutation each epoch (``fit(shuffle=True)``)."""
        return self.rng.permutation(n).astype(np.int32)

    def fit(
        self,
        x: np.ndarray,
        y: np.ndarray,
        epochs: int,
        callbacks: Sequence[keras.callbacks.Callback] = (),
        initial_epoch: int = 0,
    ) -> None:
        """Train for ``epochs`` epochs. Callbacks get ``logs`` with per-replicate arrays:
        ``loss`` and ``accuracy`` of shape (S,), averaged over the epoch's batches as
        Keras' ``fit`` reports them."""
        cbs = keras.callbacks.CallbackList(list(callbacks), model=self.model)
        data = self._impl.put(x, y)
        n = len(x)
        self.model.stop_training = False
        cbs.on_train_begin()
        for epoch in range(initial_epoch, epochs):
            cbs.on_epoch_begin(epoch)
            loss_sum, correct = self._impl.run_epoch(data, self.epoch_order(n))
            logs = {"loss": loss_sum / n, "accuracy": correct / n}
            cbs.on_epoch_end(epoch, logs)
            if self.model.stop_training:
                break
        cbs.on_train_end()

    def evaluate(self, x: np.ndarray, y: np.ndarray, batch_size: int = 10_000) -> dict[str, np.ndarray]:
        """Per-replicate loss and accuracy on ``(x, y)`` in inference mode."""
        loss_sum = np.zeros(self.replicates)
        correct = np.zeros(self.replicates)
        for start in range(0, len(x), batch_size):
            xb, yb = x[start : start + batch_size], y[start : start + batch_size]
            pred = self.model(xb, training=False)
            loss_sum += ops.convert_to_numpy(replicate_losses(self.loss, yb, pred)) * len(xb)
            correct += ops.convert_to_numpy(replicate_correct(yb, pred))
        return {"loss": loss_sum / len(x), "accuracy": correct / len(x)}

    def gradients(self, x: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
        """Gradient of the summed loss w.r.t. every trainable variable (by its path), on one batch.

        Because the total is a sum of per-replicate losses, slice k of each gradient is
        replicate k's own gradient. Inference-mode forward pass (no state updates).
        """
        grads = self._impl.gradients(x, y)
        return {v.path: ops.convert_to_numpy(g) for v, g in zip(self.model.trainable_variables, grads, strict=True)}

    @property
    def replicates(self) -> int:
        return int(self.model.output_shape[0])


class _Backend:
    """Backend-specific compilation of one epoch and of one gradient evaluation."""

    def __init__(self, trainer: StackedTrainer) -> None:
        self.t = trainer

    def put(self, x: np.ndarray, y: np.ndarray) -> Any:
        raise NotImplementedError

    def run_epoch(self, data: Any, order: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def gradients(self, x: np.ndarray, y: np.ndarray) -> list[Any]:
        raise NotImplementedError


class _TensorFlowBackend(_Backend):
    def __init__(self, trainer: StackedTrainer) -> None:
        super().__init__(trainer)
        import tensorflow as tf

        self.tf = tf
        model, optimizer, loss = trainer.model, trainer.optimizer, trainer.loss
        variables = model.trainable_variables

        def step(xb: Any, yb: Any) -> tuple[Any, Any]:
            with tf.GradientTape() as tape:
                pred = model(xb, training=True)
                per_replicate = replicate_losses(loss, yb, pred)
                total = ops.sum(per_replicate)
            optimizer.apply(tape.gradient(total, variables), variables)
            n = ops.cast(ops.shape(xb)[0], "float32")
            return per_replicate * n, replicate_correct(yb, pred)

        # XLA fuses a single model's small ops (17% faster at depth 4 here), but its
        # matrix products on the wide stacked shapes are slower than oneDNN's (measured:
        # 0.20 vs 0.19 s/epoch for 4 replicates), so only a lone model is compiled with it.
        @tf.function(reduce_retracing=True, jit_compile=trainer.replicates == 1)
        def epoch(x: Any, y: Any, batches: Any) -> tuple[Any, Any]:
            # A graph-level loop over the epoch's full batches: one Python call per epoch.
            s = trainer.replicates
            loss_sum = tf.zeros((s,), tf.float32)
            correct = tf.zeros((s,), tf.float32)
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

        @tf.function(reduce_retracing=True)
        def grads(x: Any, y: Any) -> list[Any]:
            with tf.GradientTape() as tape:
                total = ops.sum(replicate_losses(loss, y, model(x, training=False)))
            return tape.gradient(total, variables)

        self._epoch: Callable[..., Any] = epoch
        self._last_batch: Callable[..., Any] = last_batch
        self._grads: Callable[..., Any] = grads

    def put(self, x: np.ndarray, y: np.ndarray) -> Any:
        return self.tf.constant(x), self.tf.constant(y)

    def run_epoch(self, data: Any, order: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        full, tail = _split_batches(order, self.t.batch_size)
        loss_sum, correct = self._epoch(data[0], data[1], full)
        if len(tail):
            tail_loss, tail_correct = self._last_batch(data[0], data[1], tail)
            loss_sum, correct = loss_sum + tail_loss, correct + tail_correct
        return loss_sum.numpy().astype(np.float64), correct.numpy().astype(np.float64)

    def gradients(self, x: np.ndarray, y: np.ndarray) -> list[Any]:
        return self._grads(self.tf.constant(x), self.tf.constant(y))


class _JaxBackend(_Backend):
    def __init__(self, trainer: StackedTrainer) -> None:
        super().__init__(trainer)
        import jax

        self.jax = jax
        model, optimizer, loss = trainer.model, trainer.optimizer, trainer.loss

        def step(state: tuple[Any, Any, Any], xb: Any, yb: Any) -> tuple[tuple[Any, Any, Any], Any, Any]:
            trainable, non_trainable, opt_vars = state

            def total_loss(tv: Any, ntv: Any) -> tuple[Any, tuple[Any, Any, Any]]:
                pred, ntv = model.stateless_call(tv, ntv, xb, training=True)
                per_replicate = replicate_losses(loss, yb, pred)
                return ops.sum(per_replicate), (per_replicate, pred, ntv)

            (_, (per_replicate, pred, non_trainable)), g = jax.value_and_grad(total_loss, has_aux=True)(
                trainable, non_trainable
            )
            trainable, opt_vars = optimizer.stateless_apply(opt_vars, g, trainable)
            n = xb.shape[0]
            return (trainable, non_trainable, opt_vars), per_replicate * n, replicate_correct(yb, pred)

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

        def grads(trainable: Any, non_trainable: Any, x: Any, y: Any) -> Any:
            def total_loss(tv: Any) -> Any:
                pred, _ = model.stateless_call(tv, non_trainable, x, training=False)
                return ops.sum(replicate_losses(loss, y, pred))

            return jax.grad(total_loss)(trainable)

        self._epoch = jax.jit(epoch, donate_argnums=0)
        self._grads = jax.jit(grads)

    def _state(self) -> tuple[Any, Any, Any]:
        m, o = self.t.model, self.t.optimizer
        return (
            [v.value for v in m.trainable_variables],
            [v.value for v in m.non_trainable_variables],
            [v.value for v in o.variables],
        )

    def put(self, x: np.ndarray, y: np.ndarray) -> Any:
        return self.jax.device_put(x), self.jax.device_put(y)

    def run_epoch(self, data: Any, order: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        full, tail = _split_batches(order, self.t.batch_size)
        state, loss_sum, correct = self._epoch(self._state(), data[0], data[1], full, tail)
        # Write the new state back so callbacks (and saving) see this epoch's weights.
        m, o = self.t.model, self.t.optimizer
        for group, values in zip((m.trainable_variables, m.non_trainable_variables, o.variables), state, strict=True):
            for var, value in zip(group, values, strict=True):
                var.assign(value)
        return np.asarray(loss_sum, np.float64), np.asarray(correct, np.float64)

    def gradients(self, x: np.ndarray, y: np.ndarray) -> list[Any]:
        m = self.t.model
        return self._grads([v.value for v in m.trainable_variables], [v.value for v in m.non_trainable_variables], x, y)


def _split_batches(order: np.ndarray, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Full batches as a (steps, batch_size) index array, plus the shorter last batch (maybe empty)."""
    n_full = len(order) // batch_size
    return order[: n_full * batch_size].reshape(n_full, batch_size), order[n_full * batch_size :]
