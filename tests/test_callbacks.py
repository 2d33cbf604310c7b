"""callbacks.py and measures.py: per-epoch measurements against hand-computed values."""

from __future__ import annotations

import io
import math

import keras
import numpy as np
import pytest

from pipeline import callbacks as cb
from pipeline import measures
from pipeline.model import build_model, hidden_layers
from pipeline.params import Variant


def test_mean_abs_change_per_replicate() -> None:
    before = np.zeros((2, 2, 3))
    after = np.array([np.full((2, 3), 0.5), [[1, -1, 0], [0, 0, 4]]])
    np.testing.assert_allclose(measures.mean_abs_change(before, after), [0.5, 1.0])


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


def test_progress_lines_when_not_a_terminal() -> None:
    stream = io.StringIO()
    progress = cb.Progress("depth-2", epochs=20, every=10, stream=stream)
    progress.on_train_begin()
    for epoch in range(20):
        progress.on_epoch_end(epoch, {"accuracy": np.array([0.5, 0.7])})
    lines = stream.getvalue().splitlines()
    assert [line.split(":")[1].split()[1] for line in lines] == ["1/20", "10/20", "20/20"]
    assert "accuracy 0.6000 (min 0.5000 max 0.7000, 2 seeds)" in lines[-1]
    assert "\r" not in stream.getvalue()


def test_mlflow_logger_steps_are_epochs(tmp_path) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.create_experiment("t", artifact_location=(tmp_path / "a").as_uri())
    runs = [client.create_run(exp).info.run_id for _ in range(2)]
    logger = cb.MlflowLogger(client, runs, flush_s=3600)
    for epoch in range(3):
        logger.on_epoch_end(
            epoch, {"accuracy": np.array([0.1 * epoch, 0.2 * epoch]), "grad/hidden_1": np.array([np.nan, 1.0])}
        )
    assert client.get_metric_history(runs[0], "accuracy") == []  # buffered
    logger.on_train_end()
    history = client.get_metric_history(runs[1], "accuracy")
    assert [(m.step, round(m.value, 6)) for m in history] == [(1, 0.0), (2, 0.2), (3, 0.4)]
    # Non-finite values are logged too (MLflow stores NaN), not dropped: a diverging run shows it.
    assert all(math.isnan(m.value) for m in client.get_metric_history(runs[0], "grad/hidden_1"))
    assert len(client.get_metric_history(runs[0], "grad/hidden_1")) == 3
    assert len(client.get_metric_history(runs[1], "grad/hidden_1")) == 3


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
