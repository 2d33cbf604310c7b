"""Tiny synthetic train-stage outputs (history.csv, metrics.json, run.json) for report tests.

Values are chosen so that final-epoch means and stds are easy to compute by hand:
seed k's training accuracy at the last epoch is ``FINAL_ACCURACY[k] - 0.01 * (depth - 1)``,
so that every seed passes ``PLATEAU`` + 0.05 (escapes) at epoch 3; hidden layer i's saturation
falls linearly from 0.1·i to 0, every layer Jacobian's mean singular value is 0.2, and of the signal
(0.2 at the input) hidden_1 passes on half, every later layer a quarter and the output a fifth.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from pipeline.history import summarize
from pipeline.params import SummaryParams, Variant

SEEDS = (0, 1)
EPOCHS = 5
FINAL_ACCURACY = {0: 0.80, 1: 0.90}
FINAL_TEST_ACCURACY = {0: 0.78, 1: 0.86}
PLATEAU = 0.4  # the plateau's accuracy the summarize stage would compute from the training labels


def make_history(depth: int, seeds: tuple[int, ...] = SEEDS, epochs: int = EPOCHS) -> pd.DataFrame:
    """One row per (seed, epoch); accuracy rises linearly to the seed's final value."""
    rows = []
    for seed in seeds:
        final = FINAL_ACCURACY.get(seed, 0.85) - 0.01 * (depth - 1)
        final_test = FINAL_TEST_ACCURACY.get(seed, 0.80) - 0.01 * (depth - 1)
        for epoch in range(1, epochs + 1):
            frac = epoch / epochs
            row: dict[str, float] = {
                "seed": seed,
                "epoch": epoch,
                "loss": 0.1 * (1.0 - frac) + 0.01,
                "accuracy": 0.1 + (final - 0.1) * frac,
                "test_accuracy": 0.1 + (final_test - 0.1) * frac,
                "test_loss": 0.1 * (1.0 - frac) + 0.02,
            }
            for layer in range(1, depth + 1):
                # Earlier layers learn slower: a factor 0.2 per layer from the last one.
                scale = 0.2 ** (depth - layer) * (1.0 + 0.1 * seed)
                row[f"weight_change/hidden_{layer}"] = scale * (0.5 if epoch == 1 else 0.01 / epoch)
                row[f"grad/hidden_{layer}"] = scale * 1e-3 / epoch
                row[f"grad_bias/hidden_{layer}"] = scale * 1e-2 / epoch
                # The probe's measurements: the top layer starts most saturated and leaves it.
                row[f"act_mean/hidden_{layer}"] = 0.5 + 0.1 * layer * (1.0 - frac)
                row[f"act_p02/hidden_{layer}"] = 0.1
                row[f"act_p98/hidden_{layer}"] = 0.9
                row[f"saturation/hidden_{layer}"] = 0.1 * layer * (1.0 - frac)
                row[f"jac_mean/hidden_{layer}"] = 0.2
                row[f"jac_max/hidden_{layer}"] = 0.4
                # Signal: the input's is 0.2; hidden_1 passes on half of it, every later layer a quarter.
                row[f"gain/hidden_{layer}"] = 0.5 if layer == 1 else 0.25
                row[f"signal/hidden_{layer}"] = 0.2 * 0.5 * 0.25 ** (layer - 1)
            row.update({"act_mean/output": 0.3, "act_p02/output": 0.01, "act_p98/output": 0.9})
            row.update({"gain/output": 0.2, "signal/output": row[f"signal/hidden_{depth}"] * 0.2})
            row["saturation/output"] = 0.5 * (1.0 - frac)
            row["jac_product"] = 0.2 ** (depth - 1)
            rows.append(row)
    return pd.DataFrame(rows)


def name_of(variant: Variant) -> str:
    """The name DVC's matrix gives a grid variant's stage item (and so its folder)."""
    return f"{variant.depth}-{variant.activation}-{variant.loss}-{variant.init}-{variant.norm}"


def write_variant(results: Path, variant: Variant, name: str | None = None, seeds: tuple[int, ...] = SEEDS) -> Path:
    """Write one variant folder the way the train and summarize stages do; returns the folder."""
    name = name or name_of(variant)
    folder = results / name
    folder.mkdir(parents=True)
    table = make_history(variant.depth, seeds=seeds)
    table.to_csv(folder / "history.csv", index=False, float_format="%.8g")
    (folder / "metrics.json").write_text(
        json.dumps(summarize(table, SummaryParams(index_window=3), plateau=PLATEAU)), encoding="utf-8"
    )
    run = {
        "name": name,
        "variant": variant.model_dump(),
        "seeds": list(seeds),
        "parent_run": f"run{name.replace('-', '')}",
        "runs": {str(s): f"run{name.replace('-', '')}s{s}" for s in seeds},
        "experiment_id": "7",
        "tracking_uri": "sqlite:///nowhere/mlflow.db",
        "group": "abc123",
    }
    (folder / "run.json").write_text(json.dumps(run), encoding="utf-8")
    return folder


DEFAULT_VARIANTS = (
    Variant(depth=1),
    Variant(depth=2),
    Variant(depth=2, activation="relu", loss="cross_entropy", init="he_normal"),
)
# The study by name, as the report stage names it from params.yaml: the grid's DVC names, a remedy's key.
DEFAULT_STUDY = {name_of(DEFAULT_VARIANTS[0]): DEFAULT_VARIANTS[0], name_of(DEFAULT_VARIANTS[1]): DEFAULT_VARIANTS[1]}
DEFAULT_STUDY["relu-ce-he"] = DEFAULT_VARIANTS[2]
PARAMS = """\
train: {epochs: 5}
grid: {depth: [1, 2]}
remedies:
  relu-ce-he: {depth: 2, activation: relu, loss: cross_entropy, init: he_normal, norm: none}
summary: {index_window: 3}
tracking:
  experiment: report-test
report:
  change_clip_quantile: 0.9
  dpi: 40
  ui_url: http://127.0.0.1:5077/
"""


def write_results(results: Path, study: dict[str, Variant] | None = None) -> Path:
    """A results folder with one subfolder per variant of ``study`` (default: the one ``PARAMS`` names)."""
    for name, variant in (study or DEFAULT_STUDY).items():
        write_variant(results, variant, name)
    return results


def histories() -> dict[str, pd.DataFrame]:
    """Name -> synthetic history of the default study, in memory."""
    return {name: make_history(v.depth) for name, v in DEFAULT_STUDY.items()}
