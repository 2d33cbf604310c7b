"""Build the study's networks as Keras 3 models, several replicate seeds stacked in one.

A stacked model holds S independent networks (the layout: docs/performance.md), each initialised from
its own seed with the initialiser's own fans (a single ``Dense(15·S)`` would use fan_out = 15·S and
change the glorot scale), so each follows exactly its own trajectory when the loss is the *sum* of theirs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras
import numpy as np
from keras import ops

from pipeline.params import Variant

INPUT_DIM = 784
N_CLASSES = 10


def layer_seed(seed: int, layer_index: int) -> int:
    """Initialiser seed of one layer of one replicate, independent of the other replicates."""
    return int(np.random.SeedSequence([seed, layer_index]).generate_state(1)[0] % (2**31 - 1))


@keras.saving.register_keras_serializable(package="pipeline")
class StackedDense(keras.layers.Layer):
    """S independent ``Dense`` layers evaluated at once: kernel (S, in, units), bias (S, units),
    output (S, batch, units). The input is (batch, in), fed to every replicate, when
    ``shared_input`` (the first layer), else (S, batch, in), one slice per replicate."""

    def __init__(
        self,
        units: int,
        seeds: Sequence[int],
        layer_index: int,
        kernel_initializer: str = "glorot_uniform",
        shared_input: bool = False,
        kernel_scale: float = 1.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.units = int(units)
        self.seeds = [int(s) for s in seeds]
        self.replicates = len(self.seeds)
        self.layer_index = int(layer_index)
        self.kernel_initializer = kernel_initializer
        self.shared_input = bool(shared_input)
        self.kernel_scale = float(kernel_scale)

    def build(self, input_shape: tuple[int | None, ...]) -> None:
        in_dim = int(input_shape[-1])

        def initializer(seed: int) -> keras.initializers.Initializer:
            if self.kernel_initializer == "glorot_standard":  # Glorot & Bengio's U[-1/√fan_in, 1/√fan_in]
                limit = 1.0 / np.sqrt(in_dim)
                return keras.initializers.RandomUniform(-limit, limit, seed=seed)
            return keras.initializers.get({"class_name": self.kernel_initializer, "config": {"seed": seed}})

        def stacked_init(shape: tuple[int, ...], dtype: Any = None) -> Any:
            # One initialiser per replicate, each on an (in, units) slice: correct fans.
            kernel = ops.stack(
                [initializer(layer_seed(s, self.layer_index))((in_dim, self.units), dtype) for s in self.seeds]
            )
            # Not even a multiplication by 1: the default initial weights stay bit for bit.
            return kernel if self.kernel_scale == 1.0 else kernel * self.kernel_scale

        self.kernel = self.add_weight(
            name="kernel", shape=(self.replicates, in_dim, self.units), initializer=stacked_init
        )
        self.bias = self.add_weight(name="bias", shape=(self.replicates, self.units), initializer="zeros")

    def call(self, inputs: Any) -> Any:
        if self.shared_input:
            # One wide product (batch, in) @ (in, S·units): the cheapest way to evaluate
            # every replicate's first layer, which holds ~95% of the arithmetic.
            s, i, u = self.replicates, self.kernel.shape[1], self.units
            wide = ops.reshape(ops.transpose(self.kernel, (1, 0, 2)), (i, s * u))
            out = ops.matmul(inputs, wide)
            out = ops.transpose(ops.reshape(out, (-1, s, u)), (1, 0, 2))
        else:
            out = ops.einsum("sbi,sio->sbo", inputs, self.kernel)
        return out + ops.expand_dims(self.bias, 1)

    def get_config(self) -> dict[str, Any]:
        keys = ("units", "seeds", "layer_index", "kernel_initializer", "shared_input", "kernel_scale")
        return super().get_config() | {key: getattr(self, key) for key in keys}


@keras.saving.register_keras_serializable(package="pipeline")
class StackedBatchNormalization(keras.layers.Layer):
    """Batch normalisation of (S, batch, units): statistics over the batch axis, separately
    for every replicate and unit, exactly as each replicate's own ``BatchNormalization``."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.norm = keras.layers.BatchNormalization(axis=-1, name="norm")

    def build(self, input_shape: tuple[int | None, ...]) -> None:
        self.replicates, self.units = int(input_shape[0]), int(input_shape[-1])
        self.norm.build((None, self.replicates * self.units))

    def call(self, inputs: Any, training: bool | None = None) -> Any:
        # (S, B, U) -> (B, S·U): one feature column per (replicate, unit).
        s, u = self.replicates, self.units
        wide = ops.reshape(ops.transpose(inputs, (1, 0, 2)), (-1, s * u))
        wide = self.norm(wide, training=training)
        return ops.transpose(ops.reshape(wide, (-1, s, u)), (1, 0, 2))


def build_model(variant: Variant, seeds: Sequence[int], hidden_units: int = 15, init_scale: float = 1.0) -> keras.Model:
    """784 → ``depth`` × [StackedDense(hidden_units) (→ BatchNorm) → activation] → StackedDense(10) → output;
    every initial kernel is the variant's initialiser's draw times ``init_scale``."""
    init = {"kernel_initializer": variant.init, "kernel_scale": init_scale}
    inputs = keras.Input(shape=(INPUT_DIM,), name="pixels")
    x = inputs
    for i in range(1, variant.depth + 1):
        x = StackedDense(hidden_units, seeds, layer_index=i, shared_input=(i == 1), name=f"hidden_{i}", **init)(x)
        if variant.norm == "batch":
            x = StackedBatchNormalization(name=f"batchnorm_{i}")(x)
        x = keras.layers.Activation(variant.activation, name=f"{variant.activation}_{i}")(x)
    x = StackedDense(N_CLASSES, seeds, layer_index=0, name="output", **init)(x)
    # Sigmoid outputs for the classic MSE setup, softmax for cross-entropy.
    last = keras.layers.Activation("softmax" if variant.loss == "cross_entropy" else "sigmoid", name="probabilities")
    return keras.Model(inputs, last(x), name=f"stacked-{variant.label}")


def logits_model(model: keras.Model) -> keras.Model:
    """The same network up to the output layer's pre-activation (shares every variable)."""
    return keras.Model(model.input, model.get_layer("output").output, name=f"{model.name}-logits")


def hidden_layers(model: keras.Model) -> list[StackedDense]:
    """The hidden StackedDense layers in order (the output layer excluded)."""
    return [layer for layer in model.layers if isinstance(layer, StackedDense) and layer.name.startswith("hidden_")]


def unstack(model: keras.Model, variant: Variant, replicate: int) -> keras.Sequential:
    """Replicate ``replicate`` as a plain Keras ``Sequential`` of ``Dense`` layers, which loads
    without this project's code and computes exactly what the replicate computes when stacked."""
    layers: list[keras.layers.Layer] = [keras.Input(shape=(INPUT_DIM,))]
    weights: dict[str, list[np.ndarray]] = {}
    for layer in model.layers:
        if isinstance(layer, StackedDense):
            layers.append(keras.layers.Dense(layer.units, name=layer.name))
            weights[layer.name] = [ops.convert_to_numpy(v)[replicate] for v in (layer.kernel, layer.bias)]
        elif isinstance(layer, StackedBatchNormalization):
            layers.append(keras.layers.BatchNormalization(name=layer.name))
            # gamma, beta, moving mean and variance: this replicate's columns of the wide layer.
            u = layer.units
            weights[layer.name] = [
                ops.convert_to_numpy(w)[replicate * u : (replicate + 1) * u] for w in layer.norm.weights
            ]
        elif isinstance(layer, keras.layers.Activation):
            layers.append(keras.layers.Activation(layer.activation, name=layer.name))
    single = keras.Sequential(layers, name=f"{variant.label}-seed-{model.get_layer('output').seeds[replicate]}")
    for name, values in weights.items():
        single.get_layer(name).set_weights(values)
    return single
