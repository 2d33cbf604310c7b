"""engine.py: the compiled epoch loop takes exactly the steps Keras' fit would take, and
stacked replicates follow exactly the trajectory each would follow alone."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from pipeline.engine import StackedTrainer, replicate_correct, replicate_losses
from pipeline.model import build_model, hidden_layers, unstack
from pipeline.params import ACTIVATIONS, INITIALIZERS, LOSSES, NORMS, Variant


def tiny_data(n: int = 250, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.random((n, 784), dtype=np.float32) * 0.2
    labels = rng.integers(0, 10, n)
    # A block of bright pixels per class makes the labels learnable, so accuracy moves.
    for k in range(10):
        x[labels == k, 40 * k : 40 * k + 40] += 1.0
    return x, np.eye(10, dtype=np.float32)[labels]


class Recorder(keras.callbacks.Callback):
    def __init__(self) -> None:
        super().__init__()
        self.logs: list[dict[str, np.ndarray]] = []

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self.logs.append({k: np.array(v) for k, v in logs.items()})


def train(variant: Variant, seeds: list[int], x: np.ndarray, y: np.ndarray, epochs: int = 3, lr: float = 0.2):
    model = build_model(variant, seeds, hidden_units=15)
    trainer = StackedTrainer(model, variant.loss, lr, batch_size=100, shuffle_seed=5)
    rec = Recorder()
    trainer.fit(x, y, epochs, [rec])
    return model, rec


def test_replicate_losses_are_per_replicate_means() -> None:
    y = np.eye(10, dtype=np.float32)[[1, 2]]
    pred = np.stack([np.full((2, 10), 0.5, np.float32), np.asarray(y)])
    np.testing.assert_allclose(keras.ops.convert_to_numpy(replicate_losses("mse", y, pred)), [0.25, 0.0])
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(replicate_correct(y, pred)), [0.0 + (pred[0][0].argmax() == 1) + 0, 2.0]
    )
    # Cross-entropy takes logits: -log softmax(z)[label], mean over the batch.
    logits = np.array([[[0.0, 2.0, 0.0, 0, 0, 0, 0, 0, 0, 0], [1.0, 0, 0, 0, 0, 0, 0, 0, 0, 0]]], np.float32)
    log_norm = np.log(np.exp(logits[0]).sum(axis=1))
    expected = np.mean([log_norm[0] - 2.0, log_norm[1] - 0.0])
    ce = keras.ops.convert_to_numpy(replicate_losses("cross_entropy", y, logits))
    np.testing.assert_allclose(ce, [expected], rtol=1e-6)


@pytest.mark.parametrize(
    "variant",
    [
        Variant(depth=3),
        Variant(depth=2, activation="relu", loss="cross_entropy", init="he_normal"),
        Variant(depth=2, activation="tanh", norm="batch"),
    ],
)
def test_stacked_replicate_equals_alone(variant: Variant) -> None:
    x, y = tiny_data()
    stacked, rec_stacked = train(variant, [0, 1, 2], x, y)
    alone, rec_alone = train(variant, [1], x, y)
    for s, a in zip(unstack(stacked, variant, 1).weights, unstack(alone, variant, 0).weights, strict=True):
        np.testing.assert_allclose(keras.ops.convert_to_numpy(s), keras.ops.convert_to_numpy(a), rtol=1e-4, atol=1e-6)
    for ls, la in zip(rec_stacked.logs, rec_alone.logs, strict=True):
        np.testing.assert_allclose(ls["accuracy"][1], la["accuracy"][0], atol=1e-6)
        np.testing.assert_allclose(ls["loss"][1], la["loss"][0], rtol=1e-5)
    # The replicates really are different networks.
    assert not np.allclose(
        keras.ops.convert_to_numpy(stacked.trainable_variables[0])[0],
        keras.ops.convert_to_numpy(stacked.trainable_variables[0])[1],
    )


ALL_SETTINGS = [
    Variant(depth=2, activation=a, loss=lo, init=i, norm=n)
    for a in ACTIVATIONS
    for lo in LOSSES
    for i in INITIALIZERS
    for n in NORMS
]


# A larger and a smaller initial scale (train.init_scale) on top of every setting at scale 1.
SCALED = [(Variant(depth=2), 4.0), (Variant(depth=2, activation="relu", init="glorot_standard"), 0.5)]


@pytest.mark.parametrize(
    ("variant", "init_scale"),
    [*((v, 1.0) for v in ALL_SETTINGS), *SCALED],
    ids=lambda p: f"{p.activation}-{p.loss}-{p.init}-{p.norm}" if isinstance(p, Variant) else f"x{p:g}",
)
def test_same_steps_as_keras_fit(variant: Variant, init_scale: float) -> None:
    """One replicate vs a plain Sequential trained by Keras' own ``fit`` on the same batches,
    for every activation, loss, initialiser and normalisation the params allow, and initial scales.

    Tolerance: weights (batch-norm statistics included) to rtol 1e-4 / atol 1e-6 after 3
    epochs of 3 steps; per-epoch accuracy to 1e-6. float32 sums in another order differ by
    about 1e-7 per step, far inside that.
    """
    x, y = tiny_data(n=250)  # 2 full batches and a short last batch of 50
    model = build_model(variant, [0], init_scale=init_scale)
    reference = unstack(model, variant, 0)  # same initial weights
    keras_loss = "categorical_crossentropy" if variant.loss == "cross_entropy" else "mse"
    reference.compile(optimizer=keras.optimizers.SGD(0.2), loss=keras_loss, metrics=["categorical_accuracy"])
    trainer = StackedTrainer(model, variant.loss, 0.2, batch_size=100, shuffle_seed=3)
    rec = Recorder()
    orders = np.random.default_rng(3)
    ref_acc = []
    for _ in range(3):
        order = orders.permutation(len(x))
        hist = reference.fit(x[order], y[order], batch_size=100, epochs=1, shuffle=False, verbose=0)
        ref_acc.append(hist.history["categorical_accuracy"][0])
    trainer.fit(x, y, 3, [rec])
    trained = unstack(model, variant, 0)
    for a, b in zip(trained.weights, reference.weights, strict=True):
        np.testing.assert_allclose(keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose([log["accuracy"][0] for log in rec.logs], ref_acc, atol=1e-6)


def test_cross_entropy_gradient_survives_a_vanishing_probability() -> None:
    """With the true class's probability at e^-60 (far below Keras' 1e-7 clip), the gradient of
    the output bias is still p - y ≈ -1 for that class, as from logits; clipped probabilities
    would give exactly 0 there."""
    x, y = tiny_data(n=8)
    labels = y.argmax(axis=1)
    y = np.eye(10, dtype=np.float32)[np.ones_like(labels)]  # every example is class 1
    model = build_model(Variant(depth=1, loss="cross_entropy"), [0])
    output = model.get_layer("output")
    output.kernel.assign(np.zeros(output.kernel.shape, np.float32))
    output.bias.assign(np.eye(10, dtype=np.float32)[[0]] * 60.0)  # class 0 dominates everywhere
    trainer = StackedTrainer(model, "cross_entropy", 0.2, batch_size=8, shuffle_seed=0)
    grad = trainer.gradients(x, y)[output.bias.path][0]
    np.testing.assert_allclose(grad[1], -1.0, atol=1e-6)
    np.testing.assert_allclose(grad[0], 1.0, atol=1e-6)
    loss = trainer.evaluate(x, y)["loss"][0]
    np.testing.assert_allclose(loss, 60.0, rtol=1e-5)  # not the clipped -log(1e-7) = 16.1


def test_training_is_deterministic() -> None:
    x, y = tiny_data()
    m1, r1 = train(Variant(depth=2), [0, 1], x, y)
    m2, r2 = train(Variant(depth=2), [0, 1], x, y)
    for a, b in zip(m1.trainable_variables, m2.trainable_variables, strict=True):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b))
    for a, b in zip(r1.logs, r2.logs, strict=True):
        np.testing.assert_array_equal(a["accuracy"], b["accuracy"])


def test_accuracy_improves_on_learnable_data() -> None:
    x, y = tiny_data(n=500)
    _, rec = train(Variant(depth=1), [0], x, y, epochs=10, lr=2.0)
    assert rec.logs[-1]["accuracy"][0] > rec.logs[0]["accuracy"][0] + 0.2


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-z))


def test_gradients_match_hand_computed_backprop() -> None:
    """Mean-squared-error sigmoid net, depth 2: backprop written out in NumPy."""
    x, y = tiny_data(n=4)
    model = build_model(Variant(depth=2), [0, 1])
    trainer = StackedTrainer(model, "mse", 0.2, 100, 0)
    grads = trainer.gradients(x, y)
    weights = [
        (keras.ops.convert_to_numpy(layer.kernel), keras.ops.convert_to_numpy(layer.bias))
        for layer in [*hidden_layers(model), model.get_layer("output")]
    ]
    for k in range(2):
        acts = [x.astype(np.float64)]
        for w, b in weights:
            acts.append(_sigmoid(acts[-1] @ w[k] + b[k]))
        out = acts[-1]
        # d(mean over batch and 10 outputs of (out - y)^2) / d out
        delta = 2 * (out - y) / out.size * out * (1 - out)
        expected = []
        for layer in range(len(weights) - 1, -1, -1):
            w, _ = weights[layer]
            expected.append((acts[layer].T @ delta, delta.sum(axis=0)))
            delta = (delta @ w[k].T) * acts[layer] * (1 - acts[layer])
        expected.reverse()
        layers = [*hidden_layers(model), model.get_layer("output")]
        for layer, (gw, gb) in zip(layers, expected, strict=True):
            # float32 sums of terms that cancel: entries near zero are exact only up to the
            # tensor's own scale (on a GPU they differ by ~1e-7 of it, not of the entry).
            for got, want in ((grads[layer.kernel.path][k], gw), (grads[layer.bias.path][k], gb)):
                np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
@pytest.mark.parametrize("n", [200, 230])
def test_with_and_without_a_short_last_batch(loss: str, n: int) -> None:
    # Regression: an empty last batch inside an in-graph cond crashed TF (SIGFPE) with cross-entropy.
    x, y = tiny_data(n=n)
    _, rec = train(Variant(depth=2, loss=loss), [0, 1], x, y, epochs=2)
    assert all(np.isfinite(log["loss"]).all() for log in rec.logs)


# Every value of every axis, and every pair of values of two axes, in 9 settings (a pairwise
# covering array): the same check on JAX at a quarter of the 36 settings' compile time.
PAIRWISE_ON_JAX = [
    "sigmoid-mse-glorot_uniform-none-x1",
    "sigmoid-cross_entropy-glorot_standard-batch-x1",
    "sigmoid-mse-he_normal-batch-x1",
    "tanh-cross_entropy-glorot_uniform-batch-x1",
    "tanh-mse-glorot_standard-none-x1",
    "tanh-cross_entropy-he_normal-none-x1",
    "relu-mse-glorot_uniform-batch-x1",
    "relu-cross_entropy-glorot_standard-none-x1",
    "relu-cross_entropy-he_normal-batch-x1",
]


@pytest.mark.slow
def test_same_steps_as_keras_fit_on_jax() -> None:
    """The same-steps-as-fit and cross-entropy checks above, rerun under KERAS_BACKEND=jax (the
    backend is chosen at import, hence a separate process)."""
    import importlib.util
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    if importlib.util.find_spec("jax") is None:
        pytest.skip("JAX is not installed (requirements.lock installs it)")
    if keras.backend.backend() == "jax":
        pytest.skip("already running on JAX")
    here = "tests/test_engine.py"
    tests = [f"{here}::test_same_steps_as_keras_fit[{setting}]" for setting in PAIRWISE_ON_JAX]
    tests.append(f"{here}::test_cross_entropy_gradient_survives_a_vanishing_probability")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests],
        cwd=ROOT,
        env=os.environ | {"KERAS_BACKEND": "jax"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert f"{len(tests)} passed" in result.stdout
