"""Plot data for ``dvc plots``: each variant's means over its replicate seeds, in long form.

``history.csv`` drawn as one line zig-zags between seeds, and DVC's top-level ``plots`` cannot list a
file per matrix item; so the report stage writes two study-wide files that ``.dvc/plots/`` draws, one
line per variant: ``curves.csv`` (a row per variant and epoch, with its colour in the report) and
``layers.csv`` (a row per variant, hidden layer and epoch; layer 1 is the first hidden layer).
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
    """One row per (variant, epoch), variants in the given order: its colour, depth and seed-mean scalars."""
    frames = [
        mean_curves(h)[["epoch", *SCALARS]].assign(variant=name, color=colors[name], depth=depth_of(h))
        for name, h in histories.items()
    ]
    return _concat(frames, ["variant", "color", "depth", "epoch", *SCALARS])


def layer_curves(histories: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """One row per (variant, hidden layer, epoch): the seed-mean weight change and gradients of that layer."""
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
