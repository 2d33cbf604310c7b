"""model.py: the builder follows the variant; stacked replicates equal single models."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from pipeline.model import StackedBatchNormalization, StackedDense, build_model, hidden_layers, layer_seed, unstack
from pipeline.params import Variant


@pytest.mark.parametrize("depth", [1, 2, 4])
def test_layers_follow_the_variant(depth: int) -> None:
    model = build_model(Variant(depth=depth), seeds=[0, 1, 2], hidden_units=15)
    hidden = hidden_layers(model)
    assert [layer.name for layer in hidden] == [f"hidden_{i}" for i in range(1, depth + 1)]
    assert all(layer.units == 15 for layer in hidden)
    assert hidden[0].kernel.shape == (3, 784, 15)
    assert all(layer.kernel.shape == (3, 15, 15) for layer in hidden[1:])
    acts = [layer.activation.__name__ for layer in model.layers if isinstance(layer, keras.layers.Activation)]
    assert acts == ["sigmoid"] * depth + ["sigmoid"]
    assert model.get_layer("output").kernel.shape == (3, 15, 10)
    assert model.output_shape == (3, None, 10)
    # Keras defaults: zero biases.
    assert all(not np.any(keras.ops.convert_to_numpy(layer.bias)) for layer in hidden)


def test_remedy_variant_layers() -> None:
    model = build_model(Variant(depth=2, activation="relu", loss="cross_entropy", norm="batch"), seeds=[0])
    acts = [layer.activation.__name__ for layer in model.layers if isinstance(layer, keras.layers.Activation)]
    assert acts == ["relu", "relu", "softmax"]
    assert sum(isinstance(layer, StackedBatchNormalization) for layer in model.layers) == 2


def test_glorot_limit_is_per_replicate() -> None:
    # A single Dense(15·S) would use fan_out 15·S; each replicate must keep its own fans.
    model = build_model(Variant(depth=1), seeds=list(range(8)))
    kernel = keras.ops.convert_to_numpy(hidden_layers(model)[0].kernel)
    limit = np.sqrt(6 / (784 + 15))
    assert np.abs(kernel).max() <= limit
    assert np.abs(kernel).max() > 0.95 * limit


def test_he_normal_scale() -> None:
    model = build_model(Variant(depth=1, init="he_normal"), seeds=[0, 1])
    kernel = keras.ops.convert_to_numpy(hidden_layers(model)[0].kernel)
    # Keras' VarianceScaling corrects the truncation so the std is sqrt(2 / fan_in).
    assert abs(kernel.std() / np.sqrt(2 / 784) - 1) < 0.05


def test_glorot_standard_is_uniform_within_one_over_root_fan_in() -> None:
    model = build_model(Variant(depth=2, init="glorot_standard"), seeds=list(range(4)))
    for layer, fan_in in zip([*hidden_layers(model), model.get_layer("output")], (784, 15, 15), strict=True):
        kernel = keras.ops.convert_to_numpy(layer.kernel)
        assert np.abs(kernel).max() <= 1 / np.sqrt(fan_in)
        assert np.abs(kernel).max() > 0.95 / np.sqrt(fan_in)
        assert abs(kernel.std() * np.sqrt(3 * fan_in) - 1) < 0.1  # U[-a, a] has std a / √3


def test_init_scale_multiplies_every_initial_kernel_and_nothing_else() -> None:
    plain = build_model(Variant(depth=2), seeds=[0, 1])
    scaled = build_model(Variant(depth=2), seeds=[0, 1], init_scale=4.0)
    for a, b in zip(plain.weights, scaled.weights, strict=True):
        factor = 4.0 if "kernel" in a.path else 1.0  # biases stay zero
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(a) * factor, keras.ops.convert_to_numpy(b))


def test_replicate_init_does_not_depend_on_companions() -> None:
    alone = build_model(Variant(depth=3), seeds=[7])
    stacked = build_model(Variant(depth=3), seeds=[1, 7, 9])
    for a, s in zip(alone.trainable_variables, stacked.trainable_variables, strict=True):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(a)[0], keras.ops.convert_to_numpy(s)[1])


def test_layer_seeds_differ() -> None:
    seeds = {layer_seed(s, i) for s in range(5) for i in range(5)}
    assert len(seeds) == 25


@pytest.mark.parametrize("variant", [Variant(depth=2), Variant(depth=2, activation="tanh", norm="batch")])
def test_unstack_computes_the_same_function(tmp_path, variant: Variant) -> None:
    model = build_model(variant, seeds=[3, 4])
    x = np.random.default_rng(0).random((5, 784), dtype=np.float32)
    stacked = keras.ops.convert_to_numpy(model(x))
    single = unstack(model, variant, 1)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(single(x)), stacked[1], rtol=1e-5, atol=1e-6)
    path = tmp_path / "m.keras"
    single.save(path)
    reloaded = keras.saving.load_model(path)
    np.testing.assert_allclose(reloaded.predict(x, verbose=0), stacked[1], rtol=1e-5, atol=1e-6)


def test_stacked_model_round_trips_through_keras_format(tmp_path) -> None:
    model = build_model(Variant(depth=2), seeds=[0, 1])
    path = tmp_path / "stacked.keras"
    model.save(path)
    reloaded = keras.saving.load_model(path)
    x = np.ones((2, 784), np.float32)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(reloaded(x)), keras.ops.convert_to_numpy(model(x)))
    assert isinstance(reloaded.get_layer("hidden_1"), StackedDense)
