"""Per-epoch measurements as Keras callbacks, on the ``logs`` of per-replicate arrays (S,) that
:class:`pipeline.engine.StackedTrainer` hands them. Measurements add their keys to ``logs``, so they
come before the recorders (:class:`History`, then MLflow and the progress line of :mod:`pipeline.trainlog`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import keras
import numpy as np
from keras import ops

from pipeline import columns, measures
from pipeline.engine import StackedTrainer
from pipeline.model import StackedBatchNormalization, hidden_layers

# Probe examples whose layer Jacobians are decomposed every epoch (the first ones of the probe
# batch): one small eigendecomposition per example, replicate and layer is the costly part.
JACOBIAN_EXAMPLES = 50


class WeightChange(keras.callbacks.Callback):
    """``weight_change/hidden_i``: mean |ΔW| of each hidden kernel since the previous epoch
    (the first epoch compares with the initial kernel)."""

    def kernels(self) -> dict[str, np.ndarray]:
        return {
            layer.name: ops.convert_to_numpy(layer.kernel).astype(np.float64) for layer in hidden_layers(self.model)
        }

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        self.previous = self.kernels()

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        current = self.kernels()
        for name, now in current.items():
            logs[f"weight_change/{name}"] = measures.mean_abs(now - self.previous[name])
        self.previous = current


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
    """Raises a deferred stop signal (``tracking.StopSignals.check``) at the end of an epoch; last
    in the list, so that the epoch it stops after is fully recorded first."""

    def __init__(self, check: Callable[[], None]) -> None:
        super().__init__()
        self.check = check

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self.check()


class ActivationProbe(keras.callbacks.Callback):
    """Why a layer learns slowly, on the fixed probe batch ``x`` with one-hot labels ``y`` (an
    inference-mode forward pass that only reads the weights): activation statistics, saturation,
    layer Jacobians (on the first ``jacobian_examples`` examples), signal, gain and output–label
    coupling; what each column means: docs/science.md, the maths: :mod:`pipeline.measures`."""

    def __init__(self, x: np.ndarray, y: np.ndarray, jacobian_examples: int = JACOBIAN_EXAMPLES) -> None:
        super().__init__()
        self.x, self.y, self.jacobian_examples = x, y, jacobian_examples
        self.input_signal = measures.signal(x)  # what hidden_1's gain is relative to
        self.probe: keras.Model | None = None

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        model = self.model
        activations = [layer for layer in model.layers if isinstance(layer, keras.layers.Activation)]
        if self.probe is None:
            # Every Activation layer's input u (z, or its batch-normalised value) and output a.
            outputs = [t for layer in activations for t in (layer.input, layer.output)]
            self.probe = keras.Model(model.input, outputs, name=f"{model.name}-activations")
        # predict_on_batch: Keras' compiled inference function (training=False), no state updates.
        values = [np.asarray(v) for v in self.probe.predict_on_batch(self.x)]
        hidden = hidden_layers(model)
        next_kernels = [ops.convert_to_numpy(layer.kernel) for layer in [*hidden[1:], model.get_layer("output")]]
        norms = {layer.name: layer.norm for layer in model.layers if isinstance(layer, StackedBatchNormalization)}
        replicates = values[0].shape[0]
        received, jac_means = self.input_signal, []
        for i, layer in enumerate(activations):
            activation = layer.get_config()["activation"]
            u, a = values[2 * i], values[2 * i + 1]
            mean, low, high = measures.activation_stats(a)
            found = {columns.ACT_MEAN: mean, columns.ACT_P02: low, columns.ACT_P98: high}
            found[columns.SATURATION] = measures.saturation(activation, u)
            found[columns.SIGNAL] = spread = measures.signal(a)
            found[columns.GAIN], received = measures.gain(spread, received), spread
            if i < len(hidden):
                slope = measures.activation_derivative(activation, u[:, : self.jacobian_examples])
                if (norm := norms.get(f"batchnorm_{i + 1}")) is not None:
                    # ∂(batch norm)/∂z in inference mode: γ / √(moving variance + ε).
                    variance = ops.convert_to_numpy(norm.moving_variance).astype(np.float64)
                    gamma = ops.convert_to_numpy(norm.gamma).astype(np.float64)
                    slope = slope * (gamma / np.sqrt(variance + norm.epsilon)).reshape(replicates, 1, -1)
                found[columns.JAC_MEAN], found[columns.JAC_MAX] = measures.jacobian_summary(slope, next_kernels[i])
                jac_means.append(found[columns.JAC_MEAN])
            # The last Activation is the output layer's.
            layer_number = i + 1 if i < len(hidden) else None
            logs.update({columns.probe_column(kind, layer_number): value for kind, value in found.items()})
        # Over hidden layers 1 … L-1: the L-1 factors between the last hidden layer's error and the first's.
        products = jac_means[:-1]
        logs[columns.JAC_PRODUCT] = np.prod(products, axis=0) if products else np.ones(replicates)
        logs[columns.COUPLING], logs[columns.COUPLING_SHARE] = measures.coupling(values[-1], self.y)
