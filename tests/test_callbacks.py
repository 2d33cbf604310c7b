"""callbacks.py and measures.py: per-epoch measurements against hand-computed values."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from pipeline import callbacks as cb
from pipeline import measures
from pipeline.model import build_model, hidden_layers
from pipeline.params import Variant


def test_mean_abs_and_norm() -> None:
    g = np.array([[[3.0, -4.0]], [[0.0, 1.0]]])
    np.testing.assert_allclose(measures.mean_abs(g), [3.5, 0.5])
    np.testing.assert_allclose(measures.l2_norm(g), [5.0, 1.0])


def test_weight_change_callback_hand_computed() -> None:
    model = build_model(Variant(depth=2), [0, 1])
    callback = cb.WeightChange()
    callback.set_model(model)
    callback.on_train_begin()
    layers = hidden_layers(model)
    before = [keras.ops.convert_to_numpy(layer.kernel) for layer in layers]
    layers[0].kernel.assign(before[0] + np.array([0.1, -0.3]).reshape(2, 1, 1))
    logs: dict = {}
    callback.on_epoch_end(0, logs)
    np.testing.assert_allclose(logs["weight_change/hidden_1"], [0.1, 0.3], rtol=1e-5)
    np.testing.assert_allclose(logs["weight_change/hidden_2"], [0.0, 0.0])
    # The next epoch compares with the end of the previous epoch, not the start.
    logs = {}
    callback.on_epoch_end(1, logs)
    np.testing.assert_allclose(logs["weight_change/hidden_1"], [0.0, 0.0], atol=1e-7)


def test_history_rows() -> None:
    history = cb.History([3, 5])
    history.on_epoch_end(0, {"accuracy": np.array([0.1, 0.2]), "loss": np.array([1.0, 2.0])})
    assert history.rows == [
        {"seed": 3, "epoch": 1, "accuracy": 0.1, "loss": 1.0},
        {"seed": 5, "epoch": 1, "accuracy": 0.2, "loss": 2.0},
    ]


def test_stop_on_signal_ends_training_after_the_epoch_in_which_it_arrived() -> None:
    """A SIGTERM during epoch 2 is recorded, not raised inside the training loop; the
    epoch is recorded in full, then StopOnSignal raises."""
    import os
    import signal

    from pipeline.engine import StackedTrainer
    from pipeline.tracking import RunInterrupted, StopSignals

    class SendDuringEpoch(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
            if epoch == 1:
                os.kill(os.getpid(), signal.SIGTERM)

    rng = np.random.default_rng(0)
    x = rng.random((20, 784), dtype=np.float32)
    y = np.eye(10, dtype=np.float32)[rng.integers(0, 10, 20)]
    model = build_model(Variant(depth=1), [0, 1])
    trainer = StackedTrainer(model, "mse", 0.2, 10, 0)
    history = cb.History([0, 1])
    stop = StopSignals()
    with pytest.raises(RunInterrupted, match="SIGTERM"), stop.installed():
        trainer.fit(x, y, 10, callbacks=[SendDuringEpoch(), history, cb.StopOnSignal(stop.check)])
    assert sorted({row["epoch"] for row in history.rows}) == [1, 2]


def _forward(model: keras.Model, x: np.ndarray, k: int) -> list[np.ndarray]:
    """Activations of replicate k of a sigmoid network, in float64 NumPy."""
    acts = [x.astype(np.float64)]
    for layer in [*hidden_layers(model), model.get_layer("output")]:
        w, b = (keras.ops.convert_to_numpy(v)[k].astype(np.float64) for v in (layer.kernel, layer.bias))
        acts.append(1 / (1 + np.exp(-(acts[-1] @ w + b))))
    return acts


def _tiny(n: int = 6) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    return rng.random((n, 784), dtype=np.float32), np.eye(10, dtype=np.float32)[rng.integers(0, 10, n)]


def test_gradient_probe_hand_computed() -> None:
    """grad/hidden_1 = mean |∂C/∂W₁| and grad_bias/hidden_1 = ‖∂C/∂b₁‖ of a depth-1 MSE net, by hand."""
    from pipeline.engine import StackedTrainer

    x, y = _tiny()
    model = build_model(Variant(depth=1), [0, 1])
    probe = cb.GradientProbe(StackedTrainer(model, "mse", 0.2, 100, 0), x, y)
    probe.set_model(model)
    logs: dict = {}
    probe.on_epoch_end(0, logs)
    w2 = keras.ops.convert_to_numpy(model.get_layer("output").kernel).astype(np.float64)
    for k in range(2):
        _, hidden, out = _forward(model, x, k)
        delta_out = 2 * (out - y) / out.size * out * (1 - out)  # C = mean over batch and outputs
        delta_hidden = (delta_out @ w2[k].T) * hidden * (1 - hidden)
        np.testing.assert_allclose(logs["grad/hidden_1"][k], np.abs(x.T @ delta_hidden).mean(), rtol=1e-4)
        np.testing.assert_allclose(logs["grad_bias/hidden_1"][k], np.linalg.norm(delta_hidden.sum(axis=0)), rtol=1e-4)


def test_held_out_hand_computed() -> None:
    """test_loss is the mean squared error and test_accuracy the argmax hit rate on the held-out data."""
    from pipeline.engine import StackedTrainer

    x, y = _tiny(n=40)
    model = build_model(Variant(depth=2), [3, 4])
    held_out = cb.HeldOut(StackedTrainer(model, "mse", 0.2, 100, 0), x, y)
    logs: dict = {}
    held_out.on_epoch_end(0, logs)
    for k in range(2):
        out = _forward(model, x, k)[-1]
        np.testing.assert_allclose(logs["test_loss"][k], np.mean((out - y) ** 2), rtol=1e-5)
        assert logs["test_accuracy"][k] == pytest.approx(np.mean(out.argmax(1) == y.argmax(1)))


# --------------------------------------------------- activations, saturation, Jacobians (issue 12)
def test_saturation_of_a_saturated_sigmoid_unit() -> None:
    # σ'(0) = 1/4 (not saturated), σ'(±5) = 0.0066 < 0.025 (saturated), σ'(3) = 0.045 (not).
    u = np.array([[[0.0, 5.0, -5.0, 3.0]], [[0.0, 0.0, 0.0, 0.0]]])
    np.testing.assert_allclose(measures.saturation("sigmoid", u), [0.5, 0.0])
    np.testing.assert_allclose(measures.activation_derivative("sigmoid", [[0.0]]), [[0.25]])


def test_saturation_of_a_dead_relu_is_its_inactive_fraction() -> None:
    u = np.array([[[-1.0, 0.0, 2.0, 3.0]]])  # ReLU'(0) = 0, as its gradient
    np.testing.assert_allclose(measures.activation_derivative("relu", u), [[[0, 0, 1, 1]]])
    np.testing.assert_allclose(measures.saturation("relu", u), [0.5])


def test_saturation_of_tanh_and_softmax() -> None:
    # tanh'(2) = 0.0707 < 0.1; tanh'(1) = 0.42.
    np.testing.assert_allclose(measures.saturation("tanh", np.array([[[0.0, 1.0, 2.0, -2.0]]])), [0.5])
    # Softmax: diagonal p(1 - p) against its largest value 1/4.
    confident = np.array([[[10.0, 0.0, 0.0]]])  # p = 0.9999, 4.5e-5, 4.5e-5: all flat
    undecided = np.array([[[0.0, 0.0]]])  # p = 1/2: p(1 - p) = 1/4
    np.testing.assert_allclose(measures.saturation("softmax", confident), [1.0])
    np.testing.assert_allclose(measures.activation_derivative("softmax", undecided), [[[0.25, 0.25]]])
    np.testing.assert_allclose(measures.saturation("softmax", undecided), [0.0])
    with pytest.raises(ValueError, match="unknown activation 'elu'"):
        measures.saturation("elu", confident)


def test_activation_stats_mean_and_percentiles() -> None:
    a = np.stack([np.arange(101.0).reshape(1, 101) / 100, np.full((1, 101), 0.3)])
    mean, low, high = measures.activation_stats(a)
    np.testing.assert_allclose(mean, [0.5, 0.3])
    np.testing.assert_allclose(low, [0.02, 0.3])
    np.testing.assert_allclose(high, [0.98, 0.3])


def test_jacobian_singular_values_written_down() -> None:
    # diag(1/4, 1/10) @ [[2, 0], [0, 3]] = diag(0.5, 0.3): singular values 0.5 and 0.3.
    slope = np.array([[[0.25, 0.1], [0.25, 0.25]]])  # one replicate, two examples
    kernel = np.array([[[2.0, 0.0], [0.0, 3.0]]])
    np.testing.assert_allclose(measures.jacobian_singular_values(slope, kernel)[0, 0], [0.5, 0.3])
    np.testing.assert_allclose(measures.jacobian_singular_values(slope, kernel)[0, 1], [0.75, 0.5])
    mean, largest = measures.jacobian_summary(slope, kernel)
    np.testing.assert_allclose(mean, [(0.4 + 0.625) / 2])
    np.testing.assert_allclose(largest, [(0.5 + 0.75) / 2])
    # A 2 × 1 Jacobian [[1/4 · 3], [1/4 · 4]] has one singular value, its norm 1/4 · 5.
    np.testing.assert_allclose(
        measures.jacobian_singular_values(np.array([[[0.25, 0.25]]]), np.array([[[3.0], [4.0]]])), [[[1.25]]]
    )
    # A rotation keeps the slopes as singular values.
    c, s = np.cos(0.3), np.sin(0.3)
    rotation = np.array([[[c, -s], [s, c]]])
    np.testing.assert_allclose(measures.jacobian_singular_values(np.array([[[0.2, 0.05]]]), rotation), [[[0.2, 0.05]]])


def test_signal_is_the_mean_over_units_of_each_units_spread_over_examples() -> None:
    # Replicate 0: unit 0 takes 0 and 2 (std 1), unit 1 takes 5 and 5 (std 0, however large): signal 1/2.
    # Replicate 1: units take ±3 and ±1 around their means (std 3 and 1): signal 2.
    a = np.array([[[0.0, 5.0], [2.0, 5.0]], [[-3.0, 1.0], [3.0, -1.0]]])
    np.testing.assert_allclose(measures.signal(a), [0.5, 2.0])
    assert measures.signal(a[0]) == pytest.approx(0.5)  # a shared input (B, U): one value
    np.testing.assert_allclose(measures.gain(measures.signal(a), 0.5), [1.0, 4.0])
    np.testing.assert_allclose(measures.gain(np.array([1.0, 2.0]), np.array([0.0, 4.0])), [np.nan, 0.5])


def test_coupling_of_a_rank_one_cross_covariance() -> None:
    """Outputs (2·(y·v), 0) with v = (1, -1, 0) follow one label direction: C = mean (o - ō)(y - ȳ)ᵀ
    has one non-zero row, 2·Cov(y·v, y) = 2·(3/8, -5/16, -1/16), so s₁ = √62 / 8 and its share is 1."""
    labels = np.eye(3)[[0, 1, 2, 0]]
    outputs = np.stack([np.stack([2 * labels @ [1.0, -1.0, 0.0], np.zeros(4)], axis=1), np.zeros((4, 2))])
    s1, share = measures.coupling(outputs, labels)
    np.testing.assert_allclose(s1, [np.sqrt(62) / 8, 0.0], atol=1e-12)
    np.testing.assert_allclose(share, [1.0, np.nan])  # replicate 1's constant output: no mode at all
    # Outputs equal to balanced one-hot labels of 3 classes: C = diag(1/3) - 1/9, singular values
    # 1/3, 1/3, 0: two equal modes, share 1/2.
    balanced = np.eye(3)[[0, 1, 2, 0, 1, 2]]
    s1, share = measures.coupling(balanced[None], balanced)
    np.testing.assert_allclose((s1, share), ([1 / 3], [0.5]))


def _sigma(z: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-z))


def test_activation_probe_hand_computed_on_a_depth_two_sigmoid_net() -> None:
    """Every key against a float64 NumPy forward pass, with one hidden unit driven into saturation."""
    x, y = _tiny(n=8)
    model = build_model(Variant(depth=2), [0, 1])
    first = hidden_layers(model)[0]
    bias = keras.ops.convert_to_numpy(first.bias).copy()
    bias[0, 3] = 20.0  # replicate 0, unit 3 of hidden_1: σ ≈ 1, σ' ≈ 2e-9 for every example
    first.bias.assign(bias)
    probe = cb.ActivationProbe(x, y, jacobian_examples=5)
    probe.set_model(model)
    probe.on_train_begin()
    logs: dict = {}
    probe.on_epoch_end(0, logs)
    kernels = [keras.ops.convert_to_numpy(v.kernel).astype(np.float64) for v in [*hidden_layers(model)]]
    kernels.append(keras.ops.convert_to_numpy(model.get_layer("output").kernel).astype(np.float64))
    for k in range(2):
        acts = _forward(model, x, k)
        names = ["hidden_1", "hidden_2", "output"]
        means = []
        for layer, a, name in zip(range(3), acts[1:], names, strict=True):
            signal = a.std(axis=0).mean()  # each unit's spread over the 8 examples, averaged over units
            np.testing.assert_allclose(logs[f"signal/{name}"][k], signal, rtol=1e-4)
            received = acts[layer].std(axis=0).mean()  # the input's, for hidden_1
            np.testing.assert_allclose(logs[f"gain/{name}"][k], signal / received, rtol=1e-4)
            np.testing.assert_allclose(logs[f"act_mean/{name}"][k], a.mean(), rtol=1e-5)
            np.testing.assert_allclose(logs[f"act_p02/{name}"][k], np.percentile(a, 2), rtol=1e-5)
            np.testing.assert_allclose(logs[f"act_p98/{name}"][k], np.percentile(a, 98), rtol=1e-5)
            np.testing.assert_allclose(logs[f"saturation/{name}"][k], np.mean(a * (1 - a) < 0.025), atol=1e-12)
            if name == "output":
                continue
            slope = (a * (1 - a))[:5]
            sv = np.stack([np.linalg.svd(np.diag(s) @ kernels[layer + 1][k], compute_uv=False) for s in slope])
            np.testing.assert_allclose(logs[f"jac_mean/{name}"][k], sv.mean(), rtol=1e-4)
            np.testing.assert_allclose(logs[f"jac_max/{name}"][k], sv[:, 0].mean(), rtol=1e-4)
            means.append(sv.mean())
        np.testing.assert_allclose(logs["jac_product"][k], means[0], rtol=1e-4)  # hidden_1 only: L - 1 = 1
        out = acts[-1]
        sv = np.linalg.svd((out - out.mean(axis=0)).T @ (y - y.mean(axis=0)) / len(y), compute_uv=False)
        np.testing.assert_allclose(logs["coupling"][k], sv[0], rtol=1e-4)
        np.testing.assert_allclose(logs["coupling_share"][k], sv[0] ** 2 / (sv**2).sum(), rtol=1e-4)
    assert logs["saturation/hidden_1"][0] >= 1 / 15  # the saturated unit, for every example
    assert set(logs) == {
        *(f"{kind}/{n}" for kind in ("act_mean", "act_p02", "act_p98", "saturation", "signal", "gain") for n in names),
        *(f"{kind}/hidden_{i}" for kind in ("jac_mean", "jac_max") for i in (1, 2)),
        *("jac_product", "coupling", "coupling_share"),
    }
    assert all(np.shape(v) == (2,) for v in logs.values())


def test_activation_probe_counts_a_dead_relu_and_scales_by_batch_norm() -> None:
    """ReLU with batch norm: a unit whose normalised input is always negative is dead (saturated);
    the Jacobian is diag(ReLU'(u) · γ / √(var + ε)) W_next in inference mode."""
    x, y = _tiny(n=8)
    model = build_model(Variant(depth=1, activation="relu", norm="batch"), [0])
    norm = model.get_layer("batchnorm_1").norm
    beta = keras.ops.convert_to_numpy(norm.beta).copy()
    beta[0] = -100.0  # unit 0: u = z / √(1 + ε) - 100 < 0 for every example
    norm.beta.assign(beta)
    probe = cb.ActivationProbe(x, y)
    probe.set_model(model)
    logs: dict = {}
    probe.on_epoch_end(0, logs)
    hidden = model.get_layer("hidden_1")
    w, b = (keras.ops.convert_to_numpy(v)[0].astype(np.float64) for v in (hidden.kernel, hidden.bias))
    u = (x @ w + b) / np.sqrt(1 + norm.epsilon) + beta
    np.testing.assert_allclose(logs["saturation/hidden_1"], [np.mean(u <= 0)])
    assert np.all(u[:, 0] < 0) and logs["saturation/hidden_1"][0] >= 1 / 15
    w_out = keras.ops.convert_to_numpy(model.get_layer("output").kernel)[0].astype(np.float64)
    slope = (u > 0) / np.sqrt(1 + norm.epsilon)
    sv = np.stack([np.linalg.svd(np.diag(s) @ w_out, compute_uv=False) for s in slope])
    np.testing.assert_allclose(logs["jac_mean/hidden_1"], [sv.mean()], rtol=1e-4)
    np.testing.assert_allclose(logs["jac_product"], [1.0])  # one hidden layer: no layer-to-layer factor


def test_new_measurements_do_not_change_training(monkeypatch) -> None:
    """fit_replicates with and without the probe: the same seeds give the same accuracy, loss,
    every other measurement and final weights, bit for bit."""
    from pipeline.params import TrainParams
    from pipeline.train import Arrays, fit_replicates

    rng = np.random.default_rng(3)
    x = rng.random((250, 784), dtype=np.float32)
    y = np.eye(10, dtype=np.float32)[rng.integers(0, 10, 250)]
    data = Arrays(x, y, x[:50], y[:50])
    params = TrainParams(seeds=(0, 1), epochs=3, batch_size=50, probe_size=40)

    def run() -> tuple[list[np.ndarray], object]:
        model, table = fit_replicates(Variant(depth=3), params, data)
        return [keras.ops.convert_to_numpy(w) for w in model.weights], table

    weights_with, with_probe = run()

    class Nothing(keras.callbacks.Callback):
        def __init__(self, x: np.ndarray, y: np.ndarray) -> None:
            super().__init__()

    monkeypatch.setattr(cb, "ActivationProbe", Nothing)
    weights_without, without = run()
    assert "saturation/hidden_3" in with_probe.columns and "saturation/hidden_3" not in without.columns
    assert with_probe[without.columns].equals(without)  # accuracy, loss, gradients, held-out: identical
    for a, b in zip(weights_with, weights_without, strict=True):
        np.testing.assert_array_equal(a, b)
