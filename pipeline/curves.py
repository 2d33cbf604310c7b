"""Plot data for ``dvc plots``: per-epoch means over the replicate seeds, in long form.

``history.csv`` has one row per (seed, epoch); drawn as one line it zig-zags between
seeds, and DVC's top-level ``plots`` cannot list one file per variant of a matrix. So
the report stage writes two study-wide files (:func:`write_plot_data`) that the
templates in ``.dvc/plots/`` draw one line per variant (colour) and per hidden layer:

``curves.csv``  one row per (variant, epoch): ``variant, depth, epoch, accuracy, loss,
                test_accuracy, test_loss`` (whichever of those were measured).
``layers.csv``  one row per (variant, layer, epoch): ``variant, layer, epoch,
                weight_change, grad, grad_bias`` (layer 1 is the first hidden layer).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import pandas as pd

SCALARS = ("accuracy", "loss", "test_accuracy", "test_loss")
LAYER_KINDS = ("weight_change", "grad", "grad_bias")
LAYER_COLUMN = re.compile(r"^(?P<kind>[a-z_]+)/hidden_(?P<layer>\d+)$")
CURVES_FILE = "curves.csv"
LAYERS_FILE = "layers.csv"


def mean_curves(history: pd.DataFrame) -> pd.DataFrame:
    """Per-epoch mean over seeds of every measured column: one row per epoch, sorted,
    ``epoch`` first, no ``seed`` column, column order otherwise kept."""
    if "epoch" not in history:
        raise ValueError("history has no 'epoch' column")
    values = [c for c in history.columns if c not in ("seed", "epoch")]
    means = history.groupby("epoch", sort=True)[values].mean().reset_index()
    means["epoch"] = means["epoch"].astype(int)
    return means


def study_curves(histories: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """One row per (variant, epoch), variants in the given order: the seed-mean of
    accuracy, loss, test accuracy and test loss (those present)."""
    frames = []
    for label, history in histories.items():
        means = mean_curves(history)
        frame = means[["epoch", *[c for c in SCALARS if c in means]]]
        frame.insert(0, "depth", _depth(history))
        frame.insert(0, "variant", label)
        frames.append(frame)
    return _concat(frames, ["variant", "depth", "epoch", *SCALARS])


def layer_curves(histories: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """One row per (variant, hidden layer, epoch): the seed-mean weight change and
    gradients of that layer (``layer`` 1 is next to the input)."""
    frames = []
    for label, history in histories.items():
        means = mean_curves(history)
        columns: dict[int, dict[str, str]] = {}
        for column in means.columns:
            if (m := LAYER_COLUMN.match(column)) and m["kind"] in LAYER_KINDS:
                columns.setdefault(int(m["layer"]), {})[m["kind"]] = column
        for layer in sorted(columns):
            renamed = {column: kind for kind, column in columns[layer].items()}
            frame = means[["epoch", *renamed]].rename(columns=renamed)
            frame.insert(0, "layer", layer)
            frame.insert(0, "variant", label)
            frames.append(frame)
    return _concat(frames, ["variant", "layer", "epoch", *LAYER_KINDS])


def write_plot_data(histories: Mapping[str, pd.DataFrame], folder: Path) -> list[Path]:
    """Write ``curves.csv`` and ``layers.csv`` into ``folder`` (created); returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, frame in ((CURVES_FILE, study_curves(histories)), (LAYERS_FILE, layer_curves(histories))):
        frame.to_csv(folder / name, index=False, float_format="%.6g")
        written.append(folder / name)
    return written


def _depth(history: pd.DataFrame) -> int:
    layers = [int(m["layer"]) for c in history.columns if (m := LAYER_COLUMN.match(c))]
    return max(layers, default=0)


def _concat(frames: list[pd.DataFrame], order: list[str]) -> pd.DataFrame:
    if not frames:
        return pd.DataFrame(columns=order[:3])
    out = pd.concat(frames, ignore_index=True)
    return out[[c for c in order if c in out.columns]]
