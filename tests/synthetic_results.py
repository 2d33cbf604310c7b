"""Tiny synthetic train-stage outputs (history.csv, metrics.json, run.json) for report tests.

Values are chosen so that final-epoch means and stds are easy to compute by hand:
seed k's training accuracy at the last epoch is ``FINAL_ACCURACY[k] - 0.01 * (depth - 1)``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pandas as pd

from pipeline.params import Variant

SEEDS = (0, 1)
EPOCHS = 5
FINAL_ACCURACY = {0: 0.80, 1: 0.90}
FINAL_TEST_ACCURACY = {0: 0.78, 1: 0.86}


def make_history(
    depth: int,
    seeds: tuple[int, ...] = SEEDS,
    epochs: int = EPOCHS,
    grads: bool = True,
    test: bool = True,
) -> pd.DataFrame:
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
            }
            if test:
                row["test_loss"] = 0.1 * (1.0 - frac) + 0.02
                row["test_accuracy"] = 0.1 + (final_test - 0.1) * frac
            for layer in range(1, depth + 1):
                # Earlier layers learn slower: a factor 0.2 per layer from the last one.
                scale = 0.2 ** (depth - layer) * (1.0 + 0.1 * seed)
                row[f"weight_change/hidden_{layer}"] = scale * (0.5 if epoch == 1 else 0.01 / epoch)
                if grads:
                    row[f"grad/hidden_{layer}"] = scale * 1e-3 / epoch
                    row[f"grad_bias/hidden_{layer}"] = scale * 1e-2 / epoch
            rows.append(row)
    return pd.DataFrame(rows)


def metrics_of(history: pd.DataFrame, depth: int) -> dict[str, float]:
    """What the train stage writes to metrics.json (population std over seeds)."""
    last = history[history["epoch"] == history["epoch"].max()]
    out: dict[str, float] = {}
    for key in ("accuracy", "loss", "test_accuracy", "test_loss"):
        if key in last:
            out[key] = float(last[key].mean())
            out[f"{key}_std"] = float(last[key].std(ddof=0))
    index = 1.0 if depth == 1 else 0.2 ** (depth - 1)
    out["vanishing_index"] = index
    out["vanishing_index_std"] = 0.0
    out["epochs"] = int(history["epoch"].max())
    out["replicates"] = int(history["seed"].nunique())
    return out


def write_variant(results: Path, variant: Variant, seeds: tuple[int, ...] = SEEDS, **history_kw: bool) -> Path:
    """Write one variant folder the way the train stage does; returns the folder."""
    folder = results / f"d{variant.depth}-{variant.activation}-{variant.loss}-{variant.init}-{variant.norm}"
    folder.mkdir(parents=True)
    history = make_history(variant.depth, seeds=seeds, **history_kw)
    history.to_csv(folder / "history.csv", index=False, float_format="%.8g")
    (folder / "metrics.json").write_text(json.dumps(metrics_of(history, variant.depth)), encoding="utf-8")
    run = {
        "variant": dataclasses.asdict(variant),
        "label": variant.label,
        "seeds": list(seeds),
        "runs": {str(s): f"run{variant.label.replace('-', '')}s{s}" for s in seeds},
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


def write_results(results: Path, variants: tuple[Variant, ...] = DEFAULT_VARIANTS) -> Path:
    """A results folder with one subfolder per variant."""
    for variant in variants:
        write_variant(results, variant)
    return results


def histories(variants: tuple[Variant, ...] = DEFAULT_VARIANTS, **kw: bool) -> dict[str, pd.DataFrame]:
    """Label -> synthetic history, in memory."""
    return {v.label: make_history(v.depth, **kw) for v in variants}
