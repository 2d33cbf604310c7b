"""trainlog.py: what the train stage tells MLflow and the terminal; get-or-create races in the store."""

from __future__ import annotations

import io
import math
import multiprocessing as mp
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline import tracking, trainlog


def test_progress_lines_when_not_a_terminal() -> None:
    stream = io.StringIO()
    progress = trainlog.Progress("depth-2", epochs=20, every=10, stream=stream)
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
    logger = trainlog.MlflowLogger(client, runs, flush_s=3600)
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


def _twin(uri: str, experiment_id: str, trials: int, barrier: object, failures: object) -> None:
    """One of several experiments logging the same dataset at the same moment, ``trials`` times."""
    from mlflow import MlflowClient

    from pipeline.params import TrainParams, Variant
    from pipeline.train import Arrays

    client = MlflowClient(uri)
    x, y = np.zeros((4, 784), np.float32), np.eye(10, dtype=np.float32)[:4]
    data = Arrays(x, y, x, y)
    for trial in range(trials):
        parent = client.create_run(experiment_id).info.run_id
        runs = tracking.RunSet(client, [client.create_run(experiment_id).info.run_id], parent)
        barrier.wait(timeout=120)  # type: ignore[attr-defined]
        try:
            digest = f"{trial:032d}"  # one dataset per trial, shared by every twin
            trainlog.log_run_inputs(
                client, runs, Variant(depth=1), TrainParams(), "tensorflow", data, digest, Path("d")
            )
        except Exception as exc:  # noqa: BLE001 - reported to the test
            failures.put(f"trial {trial}: {type(exc).__name__}: {str(exc)[:200]}")  # type: ignore[attr-defined]


def race_twins(uri: str, twins: int = 3, trials: int = 12) -> list[str]:
    """``twins`` processes log one new dataset at the same moment, ``trials`` times; the failures."""
    from mlflow import MlflowClient

    experiment_id = MlflowClient(uri).create_experiment(f"race-{time.time_ns()}")
    ctx = mp.get_context("spawn")  # a fresh interpreter each, as separate experiments are
    barrier, failures = ctx.Barrier(twins), ctx.Queue()
    procs = [ctx.Process(target=_twin, args=(uri, experiment_id, trials, barrier, failures)) for _ in range(twins)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    found = []
    while not failures.empty():
        found.append(failures.get())
    client = MlflowClient(uri)
    datasets = {i.dataset.digest for r in client.search_runs([experiment_id]) for i in r.inputs.dataset_inputs}
    assert len(datasets) == trials or found  # every run got its dataset
    return found


@pytest.mark.slow
def test_twins_logging_one_dataset_at_once_never_fail_on_sqlite(tmp_path: Path) -> None:
    """Without :func:`tracking.race_safe`, about one trial in two fails here with
    ``UNIQUE constraint failed: datasets.experiment_id, datasets.name, datasets.digest``."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking.open_store(uri)
    assert race_twins(uri) == []


def test_race_safe_retries_only_a_lost_get_or_create() -> None:
    calls = []

    def lost_once(value: int) -> int:
        calls.append(value)
        if len(calls) == 1:
            raise RuntimeError("(sqlite3.IntegrityError) UNIQUE constraint failed: datasets.digest")
        return value

    assert tracking.race_safe(lost_once, 7) == 7 and calls == [7, 7]

    def broken() -> None:
        calls.append(0)
        raise RuntimeError("no such table: datasets")

    calls.clear()
    with pytest.raises(RuntimeError, match="no such table"):
        tracking.race_safe(broken)
    assert calls == [0]  # not retried


@pytest.mark.slow
@pytest.mark.parametrize("fail", ["rename", "none"])
def test_models_follow_the_outputs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fail: str) -> None:
    """A replicate's LoggedModel exists only once the variant's outputs are in place: when moving
    them into place fails, the runs fail and the store holds no model, PENDING or otherwise."""
    import argparse
    from contextlib import contextmanager

    import keras
    from mlflow import MlflowClient
    from mlflow.entities import LoggedModelStatus

    from pipeline import engine, outputs, train
    from pipeline.params import TrackingParams, TrainParams, Variant

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    # The stage pins TensorFlow's thread pools in a fresh process; in a test process that has already
    # run TensorFlow they can no longer be set, and their number does not matter here.
    monkeypatch.setattr(engine, "configure_backend", lambda: keras.backend.backend())
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    rng = np.random.default_rng(0)
    x = rng.random((20, 784), dtype=np.float32)
    y = np.eye(10, dtype=np.float32)[rng.integers(0, 10, 20)]
    data = train.Arrays(x, y, x[:10], y[:10])
    out = tmp_path / "results" / "v"

    @contextmanager
    def rename_fails(target: Path):
        with outputs.staged_dir(target) as tmp:
            yield tmp
            raise OSError(28, "No space left on device", str(target))  # as a failed move into place

    if fail == "rename":
        monkeypatch.setattr(train, "staged_dir", rename_fails)
    args = argparse.Namespace(out=out, data=tmp_path, params="params.yaml", log_every=10)
    params = TrainParams(seeds=(0, 1), epochs=1, batch_size=10, probe_size=10)
    if fail == "rename":
        with pytest.raises(train.OutputError, match="No space left"):
            train.train_and_track(Variant(depth=1), "v", params, TrackingParams(), uri, data, args)
    else:
        train.train_and_track(Variant(depth=1), "v", params, TrackingParams(), uri, data, args)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("vanishing-gradient").experiment_id
    models = client.search_logged_models([experiment])
    statuses = {r.info.run_name: r.info.status for r in client.search_runs([experiment])}
    if fail == "rename":
        assert not out.exists() and models == []
        assert statuses == {"v": "FAILED", "v-seed-0": "FAILED", "v-seed-1": "FAILED"}
    else:
        assert sorted(m.name for m in models) == ["v-seed-0", "v-seed-1"]
        assert [m.status for m in models] == [LoggedModelStatus.READY] * 2
        assert set(statuses.values()) == {"FINISHED"} and (out / "history.csv").is_file()


def test_fit_replicates_starts_from_the_scaled_kernels() -> None:
    """``train.init_scale`` reaches the model the stage trains: its first kernels are the
    default ones times the scale, biases unchanged (zero)."""
    import keras

    from pipeline.model import hidden_layers
    from pipeline.params import TrainParams, Variant
    from pipeline.train import Arrays, fit_replicates

    class Initial(keras.callbacks.Callback):
        def on_train_begin(self, logs: dict | None = None) -> None:
            self.kernels = [keras.ops.convert_to_numpy(v) for v in self.model.weights]

    rng = np.random.default_rng(0)
    x = rng.random((20, 784), dtype=np.float32)
    y = np.eye(10, dtype=np.float32)[rng.integers(0, 10, 20)]
    data = Arrays(x, y, x[:10], y[:10])
    seen = {}
    for scale in (1.0, 2.5):
        initial = Initial()
        params = TrainParams(seeds=(0, 1), epochs=1, batch_size=10, probe_size=10, init_scale=scale)
        model, _ = fit_replicates(Variant(depth=2), params, data, [initial])
        seen[scale] = initial.kernels
        assert len(hidden_layers(model)) == 2
    for default, scaled in zip(seen[1.0], seen[2.5], strict=True):
        np.testing.assert_array_equal(scaled, default * np.float32(2.5) if default.any() else default)
