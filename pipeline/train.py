"""Stage ``train``: train every replicate seed of one variant at once, tracked in MLflow.

``python -m pipeline.train --depth 3 [--activation ... --loss ... --init ... --norm ...]
--data data/processed --out results/<name>``

The variant's name is the name of its output folder (``dvc.yaml`` passes ``results/${key}``,
DVC's name for the stage item), and its MLflow runs are named after it. Writes, atomically,
``<out>/history.csv`` (one row per seed and epoch), ``<out>/run.json`` (variant, seeds,
MLflow run ids) and ``<out>/models/seed-<s>.keras`` (each replicate as a plain Keras
``Sequential``). Summary statistics and figures are computed downstream (``summarize``,
``report``), so changing them retrains nothing. One MLflow run per seed, ended FINISHED,
FAILED on an error or KILLED on SIGINT/SIGTERM/SIGHUP; nothing is written to ``<out>``
unless training completed.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import logging
import os
import signal
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline import tracking
from pipeline.columns import SCALARS
from pipeline.outputs import staged_dir
from pipeline.params import ParamsError, TrackingParams, TrainParams, Variant, check_file, load_section, parse

log = logging.getLogger("pipeline.train")
CSV_FLOAT = "%.8g"  # float32 values round-trip through history.csv


class OutputError(RuntimeError):
    """The stage's inputs or outputs cannot be read or written; the message says what to do."""


@dataclass(frozen=True)
class Arrays:
    """The preprocessed data one variant trains and is evaluated on."""

    x: np.ndarray
    y: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def fit_replicates(
    variant: Variant, params: TrainParams, data: Arrays, callbacks: Sequence[Any] = ()
) -> tuple[Any, pd.DataFrame]:
    """Train every seed of ``variant`` as one stacked model; returns it and the per-epoch history.

    Measures each epoch (weight change, probe gradients, held-out loss and accuracy), then
    hands the epoch's ``logs`` to ``callbacks`` (tracking, progress, stop checks), in order.
    """
    import keras

    from pipeline import callbacks as cb
    from pipeline.engine import StackedTrainer
    from pipeline.model import build_model

    keras.utils.set_random_seed(params.shuffle_seed)
    model = build_model(variant, params.seeds, params.hidden_units)
    trainer = StackedTrainer(model, variant.loss, params.learning_rate, params.batch_size, params.shuffle_seed)
    probe = slice(0, min(params.probe_size, len(data.x)))
    history = cb.History(params.seeds)
    measurements = [
        cb.WeightChange(),
        cb.GradientProbe(trainer, data.x[probe], data.y[probe]),
        cb.ActivationProbe(data.x[probe]),
        cb.HeldOut(trainer, data.x_test, data.y_test),
    ]
    trainer.fit(data.x, data.y, params.epochs, callbacks=[*measurements, history, *callbacks])
    return model, pd.DataFrame(history.rows)


def check_writable(folder: Path) -> None:
    """Fail before training, not after, when ``folder`` cannot hold the outputs."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryDirectory(prefix=".write-check-", dir=folder).cleanup()
    except OSError as exc:
        raise OutputError(f"cannot write into {folder}: {exc.strerror or exc}; make it writable, then rerun") from exc


def load_split(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``x`` and ``y`` of one preprocessed split (no pickles)."""
    with np.load(path, allow_pickle=False) as data:
        return data["x"], data["y"]


def load_arrays(folder: Path) -> Arrays:
    """The train and test splits written by the preprocess stage."""
    for split in ("train.npz", "test.npz"):
        if not (folder / split).is_file():
            raise OutputError(f"{folder / split} is missing: run the preprocess stage first (dvc repro)")
    return Arrays(*load_split(folder / "train.npz"), *load_split(folder / "test.npz"))


def data_digest(*arrays: np.ndarray) -> str:
    """sha256 over the exact training inputs (shapes, dtypes and bytes)."""
    import hashlib

    h = hashlib.sha256()
    for a in arrays:
        h.update(f"{a.shape}{a.dtype}".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def run_params(variant: Variant, train: TrainParams, seed: int, backend: str) -> dict[str, str]:
    """Every parameter that determines one replicate, flattened for MLflow."""
    params: dict[str, Any] = variant.model_dump() | train.model_dump()
    params["seeds"] = ",".join(map(str, train.seeds))
    params["seed"] = seed
    params["backend"] = backend
    return {k: str(v) for k, v in params.items()}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--data", required=True, type=Path, help="folder with train.npz and test.npz")
    p.add_argument("--out", required=True, type=Path, help="output folder; its name is the variant's name")
    p.add_argument("--depth", required=True, type=int)
    p.add_argument("--activation", default="sigmoid")
    p.add_argument("--loss", default="mse")
    p.add_argument("--init", default="glorot_uniform")
    p.add_argument("--norm", default="none")
    # Presentation only, so not a DVC param: changing it must not retrain anything.
    p.add_argument("--log-every", type=int, default=10, help="progress line every N epochs when not on a terminal")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = parse_args(argv)
    fields = ("depth", "activation", "loss", "init", "norm")
    try:
        check_file(args.params)
        variant = parse(Variant, {k: getattr(args, k) for k in fields}, "variant (command line, from dvc.yaml)")
        train: TrainParams = load_section("train", args.params)
        track: TrackingParams = load_section("tracking", args.params)
        uri = tracking.tracking_uri()
        tracking.preflight(uri)
        check_writable(args.out.parent)
        data = load_arrays(args.data)
    except (ParamsError, tracking.TrackingError, OutputError) as exc:
        log.error("%s", exc)
        return 1
    try:
        train_and_track(variant, args.out.name, train, track, uri, data, args)
    except (tracking.TrackingError, OutputError) as exc:
        log.error("%s", exc)
        return 1
    except tracking.RunInterrupted as exc:
        if exc.finished:
            log.error("%s after training had finished and written %s: stopping here", exc, args.out)
        else:
            log.error("interrupted (%s): the MLflow runs are marked KILLED and %s was not written", exc, args.out)
        return exc.exit_status
    except KeyboardInterrupt:  # before the runs existed: nothing to mark
        log.error("interrupted: %s was not written", args.out)
        return 128 + signal.SIGINT
    return 0


def train_and_track(
    variant: Variant, name: str, train: TrainParams, track: TrackingParams, uri: str, data: Arrays, args: Any
) -> None:
    """The stage's shell around :func:`fit_replicates`: MLflow runs around training, then the
    outputs, written atomically into ``args.out``."""
    from pipeline import callbacks as cb
    from pipeline.engine import configure_backend
    from pipeline.model import unstack

    backend = configure_backend()
    digest = data_digest(data.x, data.y)
    root = tracking.project_root()
    client = tracking.open_store(uri)
    experiment_id = tracking.ensure_experiment(client, track.experiment, root)
    stage = os.environ.get("DVC_STAGE") or f"train@{name}"
    tags = tracking.lineage_tags(root, stage, args.params) | {"data.digest": digest, "variant": name}
    names = [f"{name}-seed-{s}" for s in train.seeds]
    log.info("training %s: seeds %s, %d epochs, backend %s", name, list(train.seeds), train.epochs, backend)
    note = describe(name, variant, train)
    with tracking.run_set(client, experiment_id, names, tags, parent=name, description=note) as runs:
        _log_run_inputs(client, runs, variant, train, backend, data, digest, args.data)
        runs.stop.check()  # no need to wait for the first epoch (and its compilation)
        logger = cb.MlflowLogger(client, runs.run_ids, runs.parent_id)
        try:
            model, history = fit_replicates(
                variant,
                train,
                data,
                [logger, cb.Progress(name, train.epochs, args.log_every), cb.StopOnSignal(runs.stop.check)],
            )
        finally:
            # Also when interrupted or failing: a KILLED/FAILED run keeps the epochs it finished.
            logger.flush()
        run_info = {
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
        try:
            with staged_dir(args.out) as tmp:
                singles = [unstack(model, variant, k) for k in range(len(train.seeds))]
                _write_outputs(tmp, history, run_info, singles)
                _log_run_outputs(client, experiment_id, runs, names, train.seeds, singles, history)
                runs.stop.check()  # a signal during writing: the staged outputs are discarded
        except OSError as exc:
            raise OutputError(
                f"cannot write {args.out}: {exc.strerror or exc} ({exc.filename or args.out}); "
                f"free disk space or make {args.out.parent} writable, then rerun"
            ) from exc
    final = history[history["epoch"] == history["epoch"].max()]["accuracy"]
    log.info("%s: final accuracy %.4f (%d seeds) -> %s", name, final.mean(), len(final), args.out)


def _write_outputs(folder: Path, history: pd.DataFrame, run_info: dict[str, Any], models: list[Any]) -> None:
    history.to_csv(folder / "history.csv", index=False, float_format=CSV_FLOAT)
    (folder / "run.json").write_text(json.dumps(run_info, indent=2) + "\n", encoding="utf-8")
    (folder / "models").mkdir()
    for seed, single in zip(run_info["seeds"], models, strict=True):
        single.save(folder / "models" / f"seed-{seed}.keras")


def describe(name: str, variant: Variant, train: TrainParams) -> str:
    """The variant run's Markdown description in the MLflow UI: what it is and what to look at."""
    act = {"sigmoid": "sigmoid", "tanh": "tanh", "relu": "ReLU"}[variant.activation]
    loss = "mean squared error" if variant.loss == "mse" else "cross-entropy (softmax outputs)"
    norm = ", batch normalisation before each activation" if variant.norm == "batch" else ""
    return (
        f"**{name}**: {variant.depth} hidden layer(s) of {train.hidden_units} {act} units, {loss}, "
        f"{variant.init} initialisation{norm}; plain SGD at learning rate {train.learning_rate}, batch size "
        f"{train.batch_size}, {train.epochs} epochs, seeds {', '.join(map(str, train.seeds))} "
        "(one nested run each).\n\n"
        "Metrics are the mean over seeds per epoch (`std/<metric>`: their spread). Look at `accuracy` beside the "
        "other variants, then `grad_bias/hidden_i`: the first hidden layer's speed of learning against the last's "
        "(each sigmoid layer passes back at most 1/4 of the error). `summary/*` holds the final values and the "
        "vanishing index; the study's page is `index.html` in the artifacts of the run named `report`."
    )


def _log_run_inputs(
    client: Any,
    runs: tracking.RunSet,
    variant: Variant,
    train: TrainParams,
    backend: str,
    data: Arrays,
    digest: str,
    source: Path,
) -> None:
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
    variant_params = {k: v for k, v in run_params(variant, train, train.seeds[0], backend).items() if k != "seed"}
    client.log_batch(runs.parent_id, params=[Param(k, v) for k, v in variant_params.items()], synchronous=True)
    client.log_inputs(runs.parent_id, inputs)
    for seed, run_id in zip(train.seeds, runs.run_ids, strict=True):
        params = [Param(k, v) for k, v in run_params(variant, train, seed, backend).items()]
        client.log_batch(run_id, params=params, synchronous=True)
        client.log_inputs(run_id, inputs)


def _log_run_outputs(
    client: Any,
    experiment_id: str,
    runs: tracking.RunSet,
    names: Sequence[str],
    seeds: Sequence[int],
    models: list[Any],
    history: pd.DataFrame,
) -> None:
    """Per run: its own rows of the history, and its replicate as an MLflow model (a LoggedModel in the
    experiment's Models tab, loadable with ``mlflow.pyfunc.load_model``) linked to its final metrics."""
    import keras
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
    final = history.sort_values("epoch").groupby("seed").tail(1).set_index("seed")
    for seed, run_id, single, name in zip(seeds, runs.run_ids, models, names, strict=True):
        with tempfile.TemporaryDirectory() as scratch:
            csv = Path(scratch) / "history.csv"
            history[history["seed"] == seed].to_csv(csv, index=False, float_format=CSV_FLOAT)
            client.log_artifact(run_id, str(csv))
            model = client.create_logged_model(
                experiment_id, name=name, source_run_id=run_id, model_type="keras", params={"seed": str(seed)}
            )
            saved = str(Path(scratch) / "model")
            mlflow.keras.save_model(single, saved, signature=signature, pip_requirements=requirements)
            client.log_model_artifacts(model.model_id, saved)
        client.finalize_logged_model(model.model_id, "READY")
        epoch, now = int(final.loc[seed, "epoch"]), int(time.time() * 1000)
        client.log_outputs(run_id, [LoggedModelOutput(model.model_id, epoch)])
        # Under their own keys: the per-epoch series of `accuracy` keeps one value per epoch.
        values = {f"final/{k}": float(final.loc[seed, k]) for k in SCALARS}
        metrics = [Metric(k, v, now, epoch, model_id=model.model_id) for k, v in values.items()]
        client.log_batch(run_id, metrics=metrics, synchronous=True)


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    raise SystemExit(main())
