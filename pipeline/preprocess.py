"""Stage ``preprocess``: scale and flatten the images, one-hot encode the labels.

``python -m pipeline.preprocess [--params params.yaml] --in data/raw/mnist.npz --out data/processed``

Writes ``<out>/train.npz`` and ``<out>/test.npz`` (keys ``x``: float32 (n, 784) in [0, 1],
``y``: float32 one-hot (n, 10)) and nothing else, into a folder built beside ``<out>`` and
renamed into place, so ``<out>`` is either the old or the new result.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pipeline import cli
from pipeline.mnist import NUM_CLASSES, DataError, MnistArrays, npz_to_arrays, write_npz
from pipeline.outputs import staged_dir
from pipeline.params import ParamsError, PreprocessParams

log = logging.getLogger("pipeline.preprocess")


def one_hot(labels: np.ndarray) -> np.ndarray:
    """float32 one-hot rows for integer ``labels`` 0..9."""
    return np.eye(NUM_CLASSES, dtype=np.float32)[labels]


def scale(images: np.ndarray) -> np.ndarray:
    """uint8 (n, 28, 28) -> float32 (n, 784) in [0, 1] (pixel / 255)."""
    return images.reshape(len(images), -1).astype(np.float32) / np.float32(255)


def preprocess(arrays: MnistArrays, limit: int | None) -> dict[str, np.ndarray]:
    """Network-ready arrays; ``limit`` (None or > 0, as PreprocessParams checks) keeps the first N training images."""
    n_train = len(arrays.x_train)
    if limit is not None and limit > n_train:
        raise ParamsError(
            f"preprocess.limit: {limit} is more than the {n_train} training images; "
            f"set it to null (all) or at most {n_train}"
        )
    return {
        "x_train": scale(arrays.x_train[:limit]),
        "y_train": one_hot(arrays.y_train[:limit]),
        "x_test": scale(arrays.x_test),
        "y_test": one_hot(arrays.y_test),
    }


def run(in_path: Path, out: Path, limit: int | None) -> None:
    if not in_path.is_file():
        raise DataError(f"{in_path}: no such file; run the fetch stage first (dvc repro fetch)")
    data = preprocess(npz_to_arrays(in_path), limit)
    with staged_dir(out) as tmp:
        for split in ("train", "test"):
            with (tmp / f"{split}.npz").open("wb") as f:
                write_npz(f, {"x": data[f"x_{split}"], "y": data[f"y_{split}"]})
                f.flush()
                os.fsync(f.fileno())
    log.info(
        "wrote %s: %d training and %d test examples (limit %s)",
        out, len(data["x_train"]), len(data["x_test"]), limit,
    )  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--in", dest="in_path", type=Path, default=Path("data/raw/mnist.npz"), help="fetched .npz")
    parser.add_argument("--out", type=Path, default=Path("data/processed"), help="output folder")

    def body(args: argparse.Namespace, params: PreprocessParams) -> None:
        try:
            run(args.in_path, args.out, params.limit)
        except OSError as exc:
            raise DataError(f"I/O error (reading {args.in_path} or writing {args.out}): {exc}") from exc

    return cli.run_stage(parser, "preprocess", body, (DataError,), argv)


if __name__ == "__main__":
    raise SystemExit(main())
