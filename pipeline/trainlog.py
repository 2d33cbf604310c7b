"""What the train stage tells MLflow and the terminal; never what it computes.

Not a code dependency of the train stage in ``dvc.yaml``: rewording a run description, the progress
line or the MLflow logging retrains nothing. The numbers come from :func:`pipeline.train.fit_replicates`,
which hands its per-epoch ``logs`` to the callbacks defined here.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import keras
import numpy as np
import pandas as pd

from pipeline import tracking
from pipeline.columns import SCALARS
from pipeline.params import TrackingParams, TrainParams, Variant
from pipeline.train import CSV_FLOAT

if TYPE_CHECKING:
    from pipeline.train import Arrays


class MlflowLogger(keras.callbacks.Callback):
    """Logs each replicate's values to its run, step = epoch (1-based), and to the parent run their mean
    (same key) and population std (``std/<key>``), so that the parent charts the variant as one line.
    Batched every ``flush_s`` seconds and at the end: a SQLite store costs a transaction per request."""

    def __init__(self, client: Any, run_ids: Sequence[str], parent_id: str | None = None, flush_s: float = 5.0) -> None:
        super().__init__()
        self.client, self.run_ids, self.parent_id, self.flush_s = client, list(run_ids), parent_id, flush_s
        self._buffer: dict[str, list[Any]] = {run_id: [] for run_id in [*self.run_ids, parent_id] if run_id}
        self._last_flush = time.monotonic()

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        from mlflow.entities import Metric

        now_ms = int(time.time() * 1000)
        for key, value in logs.items():
            values = np.asarray(value, np.float64)
            for run_id, v in zip(self.run_ids, values, strict=True):
                # NaN and ±inf too: MLflow stores them, and a diverging run must show that it diverged.
                self._buffer[run_id].append(Metric(key, float(v), now_ms, epoch + 1))
            if self.parent_id:
                for name, v in ((key, values.mean()), (f"std/{key}", values.std())):
                    self._buffer[self.parent_id].append(Metric(name, float(v), now_ms, epoch + 1))
        if time.monotonic() - self._last_flush >= self.flush_s:
            self.flush()

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        self.flush()

    def flush(self) -> None:
        for run_id, metrics in self._buffer.items():
            for start in range(0, len(metrics), 1000):  # MLflow's per-request limit
                self.client.log_batch(run_id, metrics=metrics[start : start + 1000], synchronous=True)
            metrics.clear()
        self._last_flush = time.monotonic()


class Progress(keras.callbacks.Callback):
    """One live line per model set on a terminal; one short line every ``every`` epochs otherwise."""

    def __init__(self, label: str, epochs: int, every: int = 10, stream: TextIO | None = None) -> None:
        super().__init__()
        self.label, self.epochs, self.every = label, epochs, every
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty()

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        self._start = time.monotonic()

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        done = epoch + 1
        elapsed = time.monotonic() - self._start
        remaining = elapsed / done * (self.epochs - done)
        acc = np.asarray(logs["accuracy"])
        line = (
            f"{self.label}: epoch {done}/{self.epochs}  accuracy {acc.mean():.4f}"
            + (f" (min {acc.min():.4f} max {acc.max():.4f}, {len(acc)} seeds)" if len(acc) > 1 else "")
            + f"  elapsed {elapsed:.0f}s  remaining ~{remaining:.0f}s"
        )
        if self.live:  # redraw the line; keep it at the end
            self.stream.write("\r\x1b[2K" + line + ("\n" if done == self.epochs else ""))
        elif done % self.every == 0 or done in (1, self.epochs):
            self.stream.write(line + "\n")
        self.stream.flush()


def run_params(variant: Variant, train: TrainParams, backend: str, seed: int | None) -> dict[str, str]:
    """Every parameter that determines the variant (and given ``seed``, one replicate), flattened for MLflow."""
    seeds = ",".join(map(str, train.seeds))
    params = variant.model_dump() | train.model_dump() | {"seeds": seeds, "backend": backend}
    if seed is not None:
        params["seed"] = seed
    return {k: str(v) for k, v in params.items()}


def data_digest(*arrays: np.ndarray) -> str:
    """sha256 over the exact training inputs (shapes, dtypes and bytes)."""
    h = hashlib.sha256()
    for a in arrays:
        h.update(f"{a.shape}{a.dtype}".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def describe(name: str, variant: Variant, train: TrainParams) -> str:
    """The variant run's Markdown description in the MLflow UI: what it is and what to look at."""
    act = {"sigmoid": "sigmoid", "tanh": "tanh", "relu": "ReLU"}[variant.activation]
    loss = "mean squared error" if variant.loss == "mse" else "cross-entropy (softmax outputs)"
    norm = ", batch normalisation before each activation" if variant.norm == "batch" else ""
    scale = f" with every initial kernel times {train.init_scale:g}" if train.init_scale != 1 else ""
    return (
        f"**{name}**: {variant.depth} hidden layer(s) of {train.hidden_units} {act} units, {loss}, "
        f"{variant.init} initialisation{scale}{norm}; plain SGD at learning rate {train.learning_rate}, batch size "
        f"{train.batch_size}, {train.epochs} epochs, seeds {', '.join(map(str, train.seeds))} "
        "(one nested run each).\n\n"
        "Metrics are the mean over seeds per epoch (`std/<metric>`: their spread). Look at `accuracy` beside the "
        "other variants, then `grad_bias/hidden_i`: the first hidden layer's speed of learning against the last's "
        "(each sigmoid layer passes back at most 1/4 of the error). `summary/*` holds the final values and the "
        "vanishing index; the study's page is `index.html` in the artifacts of the run named `report`."
    )


def log_run_inputs(
    client: Any,
    runs: tracking.RunSet,
    variant: Variant,
    train: TrainParams,
    backend: str,
    data: Arrays,
    digest: str,
    source: Path,
) -> None:
    """Each run's params (the variant's run has all but ``seed``) and its training dataset."""
    from mlflow.entities import Dataset, DatasetInput, InputTag, Param

    entity = Dataset(
        name="mnist-train",
        digest=digest[:32],  # MLflow keeps at most 36 characters; the full digest is the data.digest tag
        source_type="local",
        source=json.dumps({"uri": str(source / "train.npz")}),
        profile=json.dumps(
            {"num_rows": len(data.x), "features_shape": list(data.x.shape), "targets_shape": list(data.y.shape)}
        ),
    )
    inputs = [DatasetInput(entity, [InputTag("mlflow.data.context", "training")])]
    for run_id, seed in [(runs.parent_id, None), *zip(runs.run_ids, train.seeds, strict=True)]:
        params = [Param(k, v) for k, v in run_params(variant, train, backend, seed).items()]
        client.log_batch(run_id, params=params, synchronous=True)
        tracking.race_safe(client.log_inputs, run_id, inputs)


@dataclass
class Tracked:
    """One variant's open MLflow runs: the callbacks that log to them, and what run.json records."""

    client: Any
    runs: tracking.RunSet
    experiment_id: str
    names: list[str]
    seeds: list[int]
    info: dict[str, Any]
    callbacks: list[keras.callbacks.Callback] = field(default_factory=list)

    def log_outputs(self, models: list[Any], history: pd.DataFrame) -> None:
        """Per run, once the outputs are in place: its rows of the history, and its replicate as an MLflow
        model (a LoggedModel in the Models tab, loadable with ``mlflow.pyfunc.load_model``) linked to its
        final metrics."""
        import mlflow.keras
        from mlflow.entities import LoggedModelOutput, Metric
        from mlflow.models import ModelSignature
        from mlflow.types import Schema, TensorSpec

        from pipeline.model import INPUT_DIM, N_CLASSES

        signature = ModelSignature(
            # Unnamed tensors: pyfunc then passes a plain (n, 784) array, as the Sequential expects.
            Schema([TensorSpec(np.dtype(np.float32), (-1, INPUT_DIM))]),
            Schema([TensorSpec(np.dtype(np.float32), (-1, N_CLASSES))]),
        )
        backend = keras.backend.backend()  # what the saved model needs to load: Keras and its backend, pinned
        requirements = [f"keras=={keras.__version__}", f"{backend}=={importlib.metadata.version(backend)}"]
        client = self.client
        final = history.sort_values("epoch").groupby("seed").tail(1).set_index("seed")
        for seed, run_id, single, name in zip(self.seeds, self.runs.run_ids, models, self.names, strict=True):
            with tempfile.TemporaryDirectory() as scratch:
                csv = Path(scratch) / "history.csv"
                history[history["seed"] == seed].to_csv(csv, index=False, float_format=CSV_FLOAT)
                client.log_artifact(run_id, str(csv))
                model = client.create_logged_model(
                    self.experiment_id, name=name, source_run_id=run_id, model_type="keras", params={"seed": str(seed)}
                )
                try:
                    saved = str(Path(scratch) / "model")
                    mlflow.keras.save_model(single, saved, signature=signature, pip_requirements=requirements)
                    client.log_model_artifacts(model.model_id, saved)
                except BaseException:
                    # Never leave a PENDING model behind: it would look like one still being written.
                    with contextlib.suppress(Exception):
                        client.finalize_logged_model(model.model_id, "FAILED")
                    raise
            client.finalize_logged_model(model.model_id, "READY")
            epoch, now = int(final.loc[seed, "epoch"]), int(time.time() * 1000)
            client.log_outputs(run_id, [LoggedModelOutput(model.model_id, epoch)])
            # Under their own keys: the per-epoch series of `accuracy` keeps one value per epoch.
            values = {f"final/{k}": float(final.loc[seed, k]) for k in SCALARS}
            metrics = [Metric(k, v, now, epoch, model_id=model.model_id) for k, v in values.items()]
            client.log_batch(run_id, metrics=metrics, synchronous=True)


@contextmanager
def tracked(
    variant: Variant,
    name: str,
    train: TrainParams,
    track: TrackingParams,
    uri: str,
    data: Arrays,
    source: Path,
    params_file: str,
    log_every: int,
) -> Iterator[Tracked]:
    """Open the variant's runs, log their params and dataset, and yield the callbacks that log each
    epoch (MLflow, progress line, stop checks). The runs end FINISHED, FAILED or KILLED with the body."""
    from pipeline import callbacks as cb
    from pipeline.engine import configure_backend

    backend = configure_backend()
    logging.getLogger("pipeline.train").info("%s: Keras on %s, runs in %s", name, backend, tracking.redact(uri))
    digest = data_digest(data.x, data.y)
    root = tracking.project_root()
    client = tracking.open_store(uri)
    experiment_id = tracking.ensure_experiment(client, track.experiment, root)
    stage = os.environ.get("DVC_STAGE") or f"train@{name}"
    tags = tracking.lineage_tags(root, stage, params_file) | {"data.digest": digest, "variant": name}
    names = [f"{name}-seed-{s}" for s in train.seeds]
    note = describe(name, variant, train)
    with tracking.run_set(client, experiment_id, names, tags, parent=name, description=note) as runs:
        log_run_inputs(client, runs, variant, train, backend, data, digest, source)
        runs.stop.check()  # no need to wait for the first epoch (and its compilation)
        logger = MlflowLogger(client, runs.run_ids, runs.parent_id)
        info = {
            "name": name,
            "variant": variant.model_dump(),
            "seeds": list(train.seeds),
            "parent_run": runs.parent_id,
            "runs": {str(s): r for s, r in zip(train.seeds, runs.run_ids, strict=True)},
            "experiment_id": experiment_id,
            "tracking_uri": tracking.redact(uri),
            "group": tags[tracking.GROUP_TAG],
            "execution": tags[tracking.EXECUTION_TAG],
        }
        callbacks = [logger, Progress(name, train.epochs, log_every), cb.StopOnSignal(runs.stop.check)]
        try:
            yield Tracked(client, runs, experiment_id, names, list(train.seeds), info, callbacks)
        finally:
            # Also when interrupted or failing: a KILLED/FAILED run keeps the epochs it finished.
            logger.flush()
