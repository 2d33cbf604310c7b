"""Stage ``preprocess``: scale and flatten the images, one-hot encode the labels.

``python -m pipeline.preprocess [--params params.yaml] --in data/raw/mnist.npz --out data/processed``

Writes only ``<out>/train.npz`` and ``<out>/test.npz`` (``x``: float32 (n, 784) in [0, 1], ``y``: float32
one-hot (n, 10)), built beside ``<out>`` and renamed into place.
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
from pipeline.params import ParamsError

log = logging.getLogger("pipeline.preprocess")


def preprocess(arrays: MnistArrays, limit: int | None) -> dict[str, np.ndarray]:
    """Float32 images (n, 784) as pixel / 255 and one-hot labels; ``limit`` keeps the first N training images."""
    if limit is not None and limit > len(arrays.x_train):
        raise ParamsError(
            f"preprocess.limit: {limit} is more than the {len(arrays.x_train)} training images; "
            f"set it to null (all) or at most {len(arrays.x_train)}"
        )
    out = {}
    for split, x, y in (
        ("train", arrays.x_train[:limit], arrays.y_train[:limit]),
        ("test", arrays.x_test, arrays.y_test),
    ):
        out[f"x_{split}"] = x.reshape(len(x), -1).astype(np.float32) / np.float32(255)
        out[f"y_{split}"] = np.eye(NUM_CLASSES, dtype=np.float32)[y]
    return out


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
        "wrote %s: %d training and %d test examples (limit %s)", out, len(data["x_train"]), len(data["x_test"]), limit
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--in", dest="in_path", type=Path, default=Path("data/raw/mnist.npz"), help="fetched .npz")
    parser.add_argument("--out", type=Path, default=Path("data/processed"), help="output folder")
    # OSError: an unreadable input or a full disk is one error line, like bad data.
    return cli.run_stage(parser, "preprocess", lambda a, p: run(a.in_path, a.out, p.limit), (DataError, OSError), argv)


if __name__ == "__main__":
    raise SystemExit(main())
