"""Plot data for ``dvc plots``: per-epoch means over the replicate seeds, in long form.

``history.csv`` has one row per (seed, epoch); drawn as one line it zig-zags between
seeds, and DVC's top-level ``plots`` cannot list one file per variant of a matrix. So
the report stage writes two study-wide files (:func:`write_plot_data`) that the
templates in ``.dvc/plots/`` draw one line per variant (colour) and per hidden layer:

``curves.csv``  one row per (variant, epoch): ``variant, color, depth, epoch, accuracy, loss,
                test_accuracy, test_loss`` (whichever were measured; ``color``: the variant's
                colour in the report, which the ``variants`` template uses too).
``layers.csv``  one row per (variant, layer, epoch): ``variant, layer, epoch,
                weight_change, grad, grad_bias`` (layer 1 is the first hidden layer).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from pipeline.columns import LAYER_KINDS, SCALARS, layer_column
from pipeline.history import depth_of, mean_curves

CURVES_FILE = "curves.csv"
LAYERS_FILE = "layers.csv"


def study_curves(histories: Mapping[str, pd.DataFrame], colors: Mapping[str, str]) -> pd.DataFrame:
    """One row per (variant, epoch), variants in the given order: its colour and the seed-mean of
    accuracy, loss, test accuracy and test loss."""
    frames = [
        mean_curves(h)[["epoch", *SCALARS]].assign(variant=name, color=colors[name], depth=depth_of(h))
        for name, h in histories.items()
    ]
    return _concat(frames, ["variant", "color", "depth", "epoch", *SCALARS])


def layer_curves(histories: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """One row per (variant, hidden layer, epoch): the seed-mean weight change and
    gradients of that layer (``layer`` 1 is next to the input)."""
    frames = []
    for name, history in histories.items():
        means = mean_curves(history)
        for layer in range(1, depth_of(history) + 1):
            kinds = {layer_column(kind, layer): kind for kind in LAYER_KINDS if layer_column(kind, layer) in means}
            frames.append(means[["epoch", *kinds]].rename(columns=kinds).assign(variant=name, layer=layer))
    return _concat(frames, ["variant", "layer", "epoch", *LAYER_KINDS])


def write_plot_data(histories: Mapping[str, pd.DataFrame], colors: Mapping[str, str], folder: Path) -> list[Path]:
    """Write ``curves.csv`` and ``layers.csv`` into ``folder`` (created); returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, frame in ((CURVES_FILE, study_curves(histories, colors)), (LAYERS_FILE, layer_curves(histories))):
        frame.to_csv(folder / name, index=False, float_format="%.6g")
    return [folder / CURVES_FILE, folder / LAYERS_FILE]


def _concat(frames: list[pd.DataFrame], order: list[str]) -> pd.DataFrame:
    if not frames:
        return pd.DataFrame(columns=order)
    out = pd.concat(frames, ignore_index=True)
    return out[[c for c in order if c in out.columns]]
