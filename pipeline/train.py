"""Stage ``train``: train every replicate seed of one variant at once, tracked in MLflow.

``python -m pipeline.train --depth 3 [--activation ... --loss ... --init ... --norm ...]
--data data/processed --out results/<variant>``

Writes, atomically, ``<out>/history.csv`` (one row per seed and epoch),
``<out>/metrics.json`` (final values, mean and std over seeds), ``<out>/run.json``
(variant, seeds, MLflow run ids) and ``<out>/models/seed-<s>.keras`` (each replicate
as a plain Keras ``Sequential``). One MLflow run per seed, ended FINISHED, FAILED on
an error or KILLED on SIGINT/SIGTERM; nothing is written to ``<out>`` unless training
completed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import tracking
from pipeline.outputs import staged_dir
from pipeline.params import ParamsError, TrackingParams, TrainParams, Variant, check_file, load_section, parse

log = logging.getLogger("pipeline.train")
CSV_FLOAT = "%.8g"  # float32 values round-trip through history.csv


def configure_backend(deterministic: bool = True) -> str:
    """Pin thread pools and determinism before the backend does any work.

    One intra-op and one inter-op thread is *faster* here: the ops are small, and
    thread hand-offs cost more than they save (measured: 0.10 s vs 0.32 s per epoch
    at depth 4 on 2 cores). It also makes results bit-for-bit repeatable.
    """
    import keras

    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(1)
        tf.config.threading.set_inter_op_parallelism_threads(1)
        if deterministic:
            tf.config.experimental.enable_op_determinism()
        # Recent NVIDIA GPUs would otherwise multiply float32 in TF32 (a 10-bit mantissa),
        # which is not the experiment's arithmetic. No effect on a CPU.
        tf.config.experimental.enable_tensor_float_32_execution(False)
    elif backend == "jax" and "JAX_DEFAULT_MATMUL_PRECISION" not in os.environ:
        import jax

        # GPUs would otherwise multiply float32 in TF32, which is not the experiment's arithmetic.
        jax.config.update("jax_default_matmul_precision", "highest")
    return backend


class OutputError(RuntimeError):
    """The stage's inputs or outputs cannot be read or written; the message says what to do."""


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
    params: dict[str, Any] = dataclasses.asdict(variant) | dataclasses.asdict(train)
    params["seeds"] = ",".join(map(str, train.seeds))
    params["seed"] = seed
    params["backend"] = backend
    return {k: str(v) for k, v in params.items()}


def final_metrics(history: Any, depth: int, window: int) -> dict[str, float]:
    """metrics.json: final-epoch values and the vanishing index, mean and std over seeds."""
    from pipeline.measures import vanishing_index

    last = history[history["epoch"] == history["epoch"].max()]
    out: dict[str, float] = {}
    for key in ("accuracy", "loss", "test_accuracy", "test_loss"):
        out[key] = float(last[key].mean())
        out[f"{key}_std"] = float(last[key].std(ddof=0))
    indices = [
        vanishing_index(rows["grad_bias/hidden_1"], rows[f"grad_bias/hidden_{depth}"], window)
        for _, rows in history.sort_values("epoch").groupby("seed")
    ]
    out["vanishing_index"] = float(np.mean(indices))
    out["vanishing_index_std"] = float(np.std(indices))
    out["epochs"] = int(history["epoch"].max())
    out["replicates"] = int(history["seed"].nunique())
    return out


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--data", required=True, type=Path, help="folder with train.npz and test.npz")
    p.add_argument("--out", required=True, type=Path, help="output folder for this variant")
    p.add_argument("--stage", default=None, help="DVC stage name, recorded as a tag")
    p.add_argument("--depth", required=True, type=int)
    p.add_argument("--activation", default="sigmoid")
    p.add_argument("--loss", default="mse")
    p.add_argument("--init", default="glorot_uniform")
    p.add_argument("--norm", default="none")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = parse_args(argv)
    try:
        check_file(args.params)
        variant = parse(
            Variant,
            {
                "depth": args.depth,
                "activation": args.activation,
                "loss": args.loss,
                "init": args.init,
                "norm": args.norm,
            },
            "variant (command line, from grid or remedies in params.yaml)",
        )
        train: TrainParams = load_section("train", args.params)
        track: TrackingParams = load_section("tracking", args.params)
        uri = tracking.tracking_uri()
        tracking.preflight(uri)
        check_writable(args.out.parent)
        for split in ("train.npz", "test.npz"):
            if not (args.data / split).is_file():
                raise OutputError(f"{args.data / split} is missing: run the preprocess stage first (dvc repro)")
    except (ParamsError, tracking.TrackingError, OutputError) as exc:
        log.error("%s", exc)
        return 1
    stage = args.stage or os.environ.get("DVC_STAGE") or f"train@{variant.label}"
    try:
        train_variant(variant, train, track, uri, args.data, args.out, stage, args.params)
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


def train_variant(
    variant: Variant,
    train: TrainParams,
    track: TrackingParams,
    uri: str,
    data_dir: Path,
    out: Path,
    stage: str,
    params_file: str,
) -> None:
    """Train all seeds of ``variant``; log to MLflow; write ``out`` atomically."""
    backend = configure_backend()
    import keras

    from pipeline import callbacks as cb
    from pipeline.engine import StackedTrainer
    from pipeline.model import build_model, unstack

    x, y = load_split(data_dir / "train.npz")
    x_test, y_test = load_split(data_dir / "test.npz")
    digest = data_digest(x, y)
    probe = slice(0, min(train.probe_size, len(x)))

    keras.utils.set_random_seed(train.shuffle_seed)
    model = build_model(variant, train.seeds, train.hidden_units)
    trainer = StackedTrainer(model, variant.loss, train.learning_rate, train.batch_size, train.shuffle_seed)

    root = tracking.project_root()
    client = tracking.open_store(uri)
    experiment_id = tracking.ensure_experiment(client, track.experiment, root)
    tags = tracking.lineage_tags(root, stage, params_file) | {"data.digest": digest, "variant": variant.label}
    names = [f"{variant.label}-seed-{s}" for s in train.seeds]
    log.info("training %s: seeds %s, %d epochs, backend %s", variant.label, list(train.seeds), train.epochs, backend)
    with tracking.run_set(client, experiment_id, names, tags) as runs:
        _log_run_inputs(client, runs.run_ids, variant, train, backend, x, y, digest)
        runs.stop.check()  # no need to wait for the first epoch (and its compilation)
        history = cb.History(train.seeds)
        logger = cb.MlflowLogger(client, runs.run_ids)
        try:
            trainer.fit(
                x,
                y,
                train.epochs,
                callbacks=[
                    cb.WeightChange(),
                    cb.GradientProbe(trainer, x[probe], y[probe]),
                    cb.HeldOut(trainer, x_test, y_test),
                    history,
                    logger,
                    cb.Progress(variant.label, train.epochs, train.log_every),
                    cb.StopOnSignal(runs.stop.check),
                ],
            )
        finally:
            # Also when interrupted or failing: a KILLED/FAILED run keeps the epochs it finished.
            logger.flush()
        import pandas as pd

        frame = pd.DataFrame(history.rows)
        metrics = final_metrics(frame, variant.depth, train.index_window)
        run_info = {
            "variant": dataclasses.asdict(variant),
            "label": variant.label,
            "seeds": list(train.seeds),
            "runs": {str(s): r for s, r in zip(train.seeds, runs.run_ids, strict=True)},
            "experiment_id": experiment_id,
            "tracking_uri": uri,
            "group": tags[tracking.GROUP_TAG],
        }
        try:
            with staged_dir(out) as tmp:
                singles = [unstack(model, variant, k) for k in range(len(train.seeds))]
                _write_outputs(tmp, frame, metrics, run_info, singles)
                _log_run_outputs(client, runs.run_ids, train.seeds, tmp, frame, variant)
                runs.stop.check()  # a signal during writing: the staged outputs are discarded
        except OSError as exc:
            raise OutputError(
                f"cannot write {out}: {exc.strerror or exc} ({exc.filename or out}); "
                f"free disk space or make {out.parent} writable, then rerun"
            ) from exc
    log.info(
        "%s: final accuracy %.4f ± %.4f, vanishing index %.3g -> %s",
        variant.label,
        metrics["accuracy"],
        metrics["accuracy_std"],
        metrics["vanishing_index"],
        out,
    )


def _write_outputs(
    folder: Path, history: Any, metrics: dict[str, float], run_info: dict[str, Any], models: list[Any]
) -> None:
    history.to_csv(folder / "history.csv", index=False, float_format=CSV_FLOAT)
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    (folder / "run.json").write_text(json.dumps(run_info, indent=2) + "\n", encoding="utf-8")
    (folder / "models").mkdir()
    for seed, single in zip(run_info["seeds"], models, strict=True):
        single.save(folder / "models" / f"seed-{seed}.keras")


def _log_run_inputs(
    client: Any,
    run_ids: list[str],
    variant: Variant,
    train: TrainParams,
    backend: str,
    x: np.ndarray,
    y: np.ndarray,
    digest: str,
) -> None:
    from mlflow.entities import Dataset, DatasetInput, InputTag, Param

    entity = Dataset(
        name="mnist-train",
        digest=digest[:32],  # MLflow keeps at most 36 characters; the full digest is the data.digest tag
        source_type="local",
        source=json.dumps({"uri": "data/processed/train.npz"}),
        profile=json.dumps({"num_rows": len(x), "features_shape": list(x.shape), "targets_shape": list(y.shape)}),
    )
    for seed, run_id in zip(train.seeds, run_ids, strict=True):
        params = [Param(k, v) for k, v in run_params(variant, train, seed, backend).items()]
        client.log_batch(run_id, params=params, synchronous=True)
        client.log_inputs(run_id, [DatasetInput(entity, [InputTag("mlflow.data.context", "training")])])


def _log_run_outputs(
    client: Any, run_ids: list[str], seeds: Sequence[int], folder: Path, history: Any, variant: Variant
) -> None:
    """Per run: its own rows of the history, its classic figure, its model and the variant's metrics."""
    from pipeline.figures import classic_figure

    for seed, run_id in zip(seeds, run_ids, strict=True):
        rows = history[history["seed"] == seed]
        with tempfile.TemporaryDirectory() as scratch:
            csv = Path(scratch) / "history.csv"
            rows.to_csv(csv, index=False, float_format=CSV_FLOAT)
            client.log_artifact(run_id, str(csv))
            fig = classic_figure(rows, f"{variant.label}, seed {seed}")
            png = Path(scratch) / "figure.png"
            fig.savefig(png, dpi=100)
            client.log_artifact(run_id, str(png))
        client.log_artifact(run_id, str(folder / "models" / f"seed-{seed}.keras"), "model")
        client.log_artifact(run_id, str(folder / "metrics.json"))


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    raise SystemExit(main())
