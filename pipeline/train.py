"""Stage ``train``: train every replicate seed of one variant at once, tracked in MLflow.

``python -m pipeline.train --depth 3 [--activation ... --loss ... --init ... --norm ...]
--data data/processed --out results/<name>``

The output folder's name (``results/${key}`` in ``dvc.yaml``) is the variant's and its MLflow runs'
name. Only once training has completed, writes atomically ``<out>/history.csv`` (one row per seed
and epoch), ``<out>/run.json`` (variant, seeds, MLflow run ids) and ``<out>/models/seed-<s>.keras``
(each replicate as a plain Keras ``Sequential``). One MLflow run per seed, ended FINISHED, FAILED
on an error or KILLED on SIGINT/SIGTERM/SIGHUP.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline import tracking
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
    Each epoch's measurements, then its ``logs`` go to ``callbacks`` (tracking, progress, stop checks)."""
    import keras

    from pipeline import callbacks as cb
    from pipeline.engine import StackedTrainer
    from pipeline.model import build_model

    keras.utils.set_random_seed(params.shuffle_seed)
    model = build_model(variant, params.seeds, params.hidden_units, params.init_scale)
    trainer = StackedTrainer(model, variant.loss, params.learning_rate, params.batch_size, params.shuffle_seed)
    probe = slice(0, min(params.probe_size, len(data.x)))
    history = cb.History(params.seeds)
    measurements = [
        cb.WeightChange(),
        cb.GradientProbe(trainer, data.x[probe], data.y[probe]),
        cb.ActivationProbe(data.x[probe], data.y[probe]),
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


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--data", required=True, type=Path, help="folder with train.npz and test.npz")
    p.add_argument("--out", required=True, type=Path, help="output folder; its name is the variant's name")
    p.add_argument("--depth", required=True, type=int)
    for field in ("activation", "loss", "init", "norm"):  # defaults: Variant's
        p.add_argument(f"--{field}")
    # Presentation only, so not a DVC param: changing it must not retrain anything.
    p.add_argument("--log-every", type=int, default=10, help="progress line every N epochs when not on a terminal")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = parse_args(argv)
    fields = {k: v for k in Variant.model_fields if (v := getattr(args, k)) is not None}
    try:
        check_file(args.params)
        variant = parse(Variant, fields, "variant (command line, from dvc.yaml)")
        train: TrainParams = load_section("train", args.params)
        track: TrackingParams = load_section("tracking", args.params)
        uri = tracking.tracking_uri()
        tracking.preflight(uri)
        check_writable(args.out.parent)
        data = load_arrays(args.data)
        train_and_track(variant, args.out.name, train, track, uri, data, args)
    except (ParamsError, tracking.TrackingError, OutputError) as exc:
        log.error("%s", exc)
        return 1
    except tracking.RunInterrupted as exc:
        if exc.finished:
            log.error("%s after training had finished and written %s: stopping here", exc, args.out)
        else:
            log.error("interrupted (%s): the MLflow runs are marked KILLED and %s was not written", exc, args.out)
        return exc.exit_status
    except KeyboardInterrupt:  # before the MLflow runs existed: nothing to mark
        log.error("interrupted: %s was not written", args.out)
        return 128 + signal.SIGINT
    return 0


def train_and_track(
    variant: Variant, name: str, train: TrainParams, track: TrackingParams, uri: str, data: Arrays, args: Any
) -> None:
    """:func:`fit_replicates` inside its MLflow runs (:mod:`pipeline.trainlog`), the outputs written
    atomically into ``args.out``, and only then each replicate's MLflow model, so that no model
    outlives outputs that were thrown away."""
    from pipeline import trainlog
    from pipeline.model import unstack

    log.info("training %s: seeds %s, %d epochs", name, list(train.seeds), train.epochs)
    with trainlog.tracked(variant, name, train, track, uri, data, args.data, args.params, args.log_every) as run:
        model, history = fit_replicates(variant, train, data, run.callbacks)
        singles = [unstack(model, variant, k) for k in range(len(train.seeds))]
        try:
            with staged_dir(args.out) as tmp:
                history.to_csv(tmp / "history.csv", index=False, float_format=CSV_FLOAT)
                (tmp / "run.json").write_text(json.dumps(run.info, indent=2) + "\n", encoding="utf-8")
                (tmp / "models").mkdir()
                for seed, single in zip(train.seeds, singles, strict=True):
                    single.save(tmp / "models" / f"seed-{seed}.keras")
                run.runs.stop.check()  # a signal during writing: the staged outputs are discarded
        except OSError as exc:
            raise OutputError(
                f"cannot write {args.out}: {exc.strerror or exc} ({exc.filename or args.out}); "
                f"free disk space or make {args.out.parent} writable, then rerun"
            ) from exc
        run.log_outputs(singles, history)
    final = history[history["epoch"] == history["epoch"].max()]["accuracy"]
    log.info("%s: final accuracy %.4f (%d seeds) -> %s", name, final.mean(), len(final), args.out)


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    raise SystemExit(main())
