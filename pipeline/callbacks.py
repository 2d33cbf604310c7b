"""Per-epoch measurements as Keras callbacks: what the train stage's outputs are made of.

:class:`pipeline.engine.StackedTrainer` calls them once per epoch with ``logs`` whose
values are per-replicate arrays of shape (S,). Measurement callbacks add their keys
to ``logs``; the recorders that follow (:class:`History`, then MLflow and the progress
line from :mod:`pipeline.trainlog`) see everything, so measurements come first.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from typing import Any

import keras
import numpy as np
from keras import ops

from pipeline import columns, measures
from pipeline.engine import StackedTrainer
from pipeline.model import hidden_layers

log = logging.getLogger(__name__)


def _kernels(model: keras.Model) -> list[tuple[str, np.ndarray]]:
    return [(layer.name, ops.convert_to_numpy(layer.kernel)) for layer in hidden_layers(model)]


class WeightChange(keras.callbacks.Callback):
    """``weight_change/hidden_i``: mean |ΔW| of each hidden kernel since the previous epoch
    (the first epoch compares with the initial kernel)."""

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        self._previous = _kernels(self.model)

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        current = _kernels(self.model)
        for (name, before), (_, now) in zip(self._previous, current, strict=True):
            logs[f"weight_change/{name}"] = measures.mean_abs_change(before, now)
        self._previous = current


class GradientProbe(keras.callbacks.Callback):
    """``grad/hidden_i`` (mean |∂C/∂W|) and ``grad_bias/hidden_i`` (‖∂C/∂b‖) of each hidden
    layer, on a fixed probe batch so that epochs are comparable."""

    def __init__(self, trainer: StackedTrainer, x: np.ndarray, y: np.ndarray) -> None:
        super().__init__()
        self.trainer, self.x, self.y = trainer, x, y

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        grads = self.trainer.gradients(self.x, self.y)
        for layer in hidden_layers(self.model):
            logs[f"grad/{layer.name}"] = measures.mean_abs(grads[layer.kernel.path])
            logs[f"grad_bias/{layer.name}"] = measures.l2_norm(grads[layer.bias.path])


class HeldOut(keras.callbacks.Callback):
    """``test_loss`` and ``test_accuracy`` on held-out data at the end of every epoch."""

    def __init__(self, trainer: StackedTrainer, x: np.ndarray, y: np.ndarray) -> None:
        super().__init__()
        self.trainer, self.x, self.y = trainer, x, y

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        result = self.trainer.evaluate(self.x, self.y)
        logs["test_loss"], logs["test_accuracy"] = result["loss"], result["accuracy"]


class History(keras.callbacks.Callback):
    """Collects one row per (seed, epoch) with every per-replicate value in ``logs``."""

    def __init__(self, seeds: Sequence[int]) -> None:
        super().__init__()
        self.seeds = list(seeds)
        self.rows: list[dict[str, float | int]] = []

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        for k, seed in enumerate(self.seeds):
            row: dict[str, float | int] = {"seed": seed, "epoch": epoch + 1}
            row.update({key: float(np.asarray(value)[k]) for key, value in logs.items()})
            self.rows.append(row)


class StopOnSignal(keras.callbacks.Callback):
    """Honours a deferred stop signal at the end of each epoch (see ``tracking.StopSignals``).

    Last in the list, so that the epoch it stops after is fully recorded first.
    """

    def __init__(self, check: Callable[[], None]) -> None:
        super().__init__()
        self.check = check

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self.check()


# Probe examples whose layer Jacobians are decomposed every epoch (the first ones of the probe
# batch): one small eigendecomposition per example, replicate and layer is the costly part.
JACOBIAN_EXAMPLES = 50


class ActivationProbe(keras.callbacks.Callback):
    """Why a layer learns slowly, on the fixed probe batch ``x`` with one-hot labels ``y`` (an
    inference-mode forward pass that only reads the weights): per hidden layer ``act_mean``,
    ``act_p02``, ``act_p98``, ``saturation``, ``signal`` and ``gain``, and the singular values of
    its back-propagation Jacobian (``jac_mean``, ``jac_max``, on the first ``jacobian_examples``
    probe examples); the same activation and signal statistics for the output layer
    (``…/output``); ``jac_product`` over hidden layers 1 … L-1; and the output–label
    ``coupling`` and ``coupling_share``. Definitions in :mod:`pipeline.measures`; column names
    in :mod:`pipeline.columns`.
    """

    def __init__(self, x: np.ndarray, y: np.ndarray, jacobian_examples: int = JACOBIAN_EXAMPLES) -> None:
        super().__init__()
        self.x, self.y, self.jacobian_examples = x, y, jacobian_examples
        self._input_signal = measures.signal(x)  # what hidden_1's gain is relative to
        self._probe: keras.Model | None = None

    def _build(self) -> None:
        # Every Activation layer's input u (z, or its batch-normalised value) and output a.
        layers = [layer for layer in self.model.layers if isinstance(layer, keras.layers.Activation)]
        self._activations = [layer.get_config()["activation"] for layer in layers]
        outputs = [t for layer in layers for t in (layer.input, layer.output)]
        self._probe = keras.Model(self.model.input, outputs, name=f"{self.model.name}-activations")

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        self._build()

    def _batchnorm_scale(self, layer: int, replicates: int) -> np.ndarray | None:
        """∂(batch norm)/∂z in inference mode, γ / √(moving variance + ε), as (S, 1, U); None without one."""
        name = f"batchnorm_{layer}"
        if name not in {other.name for other in self.model.layers}:
            return None
        norm = self.model.get_layer(name).norm
        variance = ops.convert_to_numpy(norm.moving_variance).astype(np.float64)
        gamma = ops.convert_to_numpy(norm.gamma).astype(np.float64) if norm.scale else np.ones_like(variance)
        return (gamma / np.sqrt(variance + norm.epsilon)).reshape(replicates, 1, -1)

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if self._probe is None:
            self._build()
        # predict_on_batch: Keras' compiled inference function (training=False), no state updates.
        values = [np.asarray(v) for v in self._probe.predict_on_batch(self.x)]
        hidden = hidden_layers(self.model)
        kernels = [ops.convert_to_numpy(layer.kernel) for layer in [*hidden[1:], self.model.get_layer("output")]]
        replicates = values[0].shape[0]
        products, received = [], self._input_signal
        for i, activation in enumerate(self._activations):
            u, a = values[2 * i], values[2 * i + 1]
            layer = i + 1 if i < len(hidden) else None  # the last Activation is the output layer's
            column = functools.partial(columns.probe_column, layer=layer)
            mean, low, high = measures.activation_stats(a)
            logs[column(columns.ACT_MEAN)], logs[column(columns.ACT_P02)] = mean, low
            logs[column(columns.ACT_P98)] = high
            logs[column(columns.SATURATION)] = measures.saturation(activation, u)
            logs[column(columns.SIGNAL)] = spread = measures.signal(a)
            logs[column(columns.GAIN)], received = measures.gain(spread, received), spread
            if layer is None:
                continue
            slope = measures.activation_derivative(activation, u[:, : self.jacobian_examples])
            scale = self._batchnorm_scale(layer, replicates)
            if scale is not None:
                slope = slope * scale
            jac_mean, jac_max = measures.jacobian_summary(slope, kernels[i])
            logs[column(columns.JAC_MEAN)], logs[column(columns.JAC_MAX)] = jac_mean, jac_max
            if layer < len(hidden):
                products.append(jac_mean)
        # Over hidden layers 1 … L-1: the L-1 factors between the last hidden layer's error and the first's.
        logs[columns.JAC_PRODUCT] = np.prod(products, axis=0) if products else np.ones(replicates)
        logs[columns.COUPLING], logs[columns.COUPLING_SHARE] = measures.coupling(values[-1], self.y)
