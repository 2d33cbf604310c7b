"""history.py: the per-epoch table's columns and statistics, against hand-computed values."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from pipeline import history
from tests.synthetic_results import make_history


def test_layer_columns_parse_and_sort_numerically() -> None:
    frame = pd.DataFrame(columns=["grad/hidden_10", "grad/hidden_2", "grad/hidden_1", "grad_bias/hidden_1", "x"])
    assert history.layer_columns(frame, "grad") == ["grad/hidden_1", "grad/hidden_2", "grad/hidden_10"]
    assert history.layer_columns(frame, "grad_bias") == ["grad_bias/hidden_1"]
    assert history.parse_layer_column("weight_change/hidden_3") == ("weight_change", 3)
    assert history.parse_layer_column("accuracy") is None
    assert history.layer_column("grad", 2) == "grad/hidden_2"
    assert history.depth_of(make_history(3)) == 3


def test_seed_stats_hand_computed() -> None:
    table = pd.DataFrame({"seed": [0, 1, 0, 1], "epoch": [1, 1, 2, 2], "accuracy": [0.2, 0.4, 0.5, 0.9]})
    stats = history.seed_stats(table, "accuracy")
    assert list(stats.index) == [1, 2]
    assert stats.loc[2, "mean"] == pytest.approx(0.7)
    assert stats.loc[2, "std"] == pytest.approx(0.2)  # population std, like metrics.json
    assert (stats.loc[2, "min"], stats.loc[2, "max"], stats.loc[2, "count"]) == (0.5, 0.9, 2)


def test_mean_curves_one_row_per_epoch() -> None:
    table = make_history(2).sample(frac=1.0, random_state=0)  # rows in any order
    means = history.mean_curves(table)
    assert list(means["epoch"]) == [1, 2, 3, 4, 5]
    assert "seed" not in means and means.columns[0] == "epoch"
    # seeds end at 0.79 and 0.89 (depth 2): the mean ends at 0.84
    assert means["accuracy"].iloc[-1] == pytest.approx(0.84)


def test_layer_ratios_and_first_to_last() -> None:
    table = make_history(3)  # each layer's speed is 0.2 of the next one's, every seed and epoch
    ratios = history.layer_ratios(table)
    assert list(ratios) == ["hidden_1 / hidden_2", "hidden_2 / hidden_3"]
    assert np.allclose(ratios["hidden_1 / hidden_2"]["mean"], 0.2)
    assert np.allclose(history.first_to_last(table)["mean"], 0.04)
    assert history.layer_ratios(make_history(1)) == {}


def test_ratio_of_a_zero_speed_is_nan_not_inf() -> None:
    table = pd.DataFrame({"seed": [0], "epoch": [1], "a": [1.0], "b": [0.0]})
    assert math.isnan(history.with_ratio(table, "a", "b", "r")["r"].iloc[0])


def test_final_values_one_row_per_seed() -> None:
    finals = history.final_values({"d1": make_history(1), "d2": make_history(2)})
    assert len(finals) == 4
    row = finals[(finals["variant"] == "d2") & (finals["seed"] == 1)].iloc[0]
    assert row["depth"] == 2
    assert row["accuracy"] == pytest.approx(0.89)
    assert row["test_accuracy"] == pytest.approx(0.85)


def test_vanishing_index_window_and_skipped_epochs() -> None:
    first = [1.0, 2.0, 3.0, 100.0]
    last = [10.0, 0.0, 30.0, 1.0]
    # window 3 keeps epochs 1..3; epoch 2 is skipped (last layer speed 0).
    assert history.vanishing_index(first, last, 3) == (pytest.approx(0.1), 1)
    index, skipped = history.vanishing_index([1.0], [0.0], 5)
    assert math.isnan(index) and skipped == 1


def test_summarize_at_depth_three_hand_computed() -> None:
    table = make_history(3)
    metrics = history.summarize(table, index_window=3)
    # seed 0 ends at 0.78, seed 1 at 0.88 (depth 3): mean 0.83, population std 0.05
    assert metrics["accuracy"] == pytest.approx(0.83)
    assert metrics["accuracy_std"] == pytest.approx(0.05)
    assert metrics["test_accuracy"] == pytest.approx((0.76 + 0.84) / 2)
    assert metrics["loss"] == pytest.approx(0.01)
    # first / last speed is 0.2² = 0.04 in every epoch of every seed
    assert metrics["vanishing_index"] == pytest.approx(0.04)
    assert metrics["vanishing_index_std"] == pytest.approx(0.0, abs=1e-12)
    assert metrics["vanishing_index_skipped_epochs"] == 0
    assert (metrics["epochs"], metrics["replicates"]) == (5, 2)


def test_summarize_reports_skipped_epochs_and_writes_nan_as_null() -> None:
    table = make_history(2)
    table.loc[table["epoch"] == 1, "grad_bias/hidden_2"] = 0.0  # last layer still: the ratio is undefined
    table.loc[table["seed"] == 1, "loss"] = np.nan  # a diverged seed
    metrics = history.summarize(table, index_window=2)
    assert metrics["vanishing_index_skipped_epochs"] == 2  # epoch 1 of both seeds
    assert metrics["vanishing_index"] == pytest.approx(0.2)  # from epoch 2 alone
    assert metrics["loss"] is None and metrics["loss_std"] is None
    json.dumps(metrics, allow_nan=False)  # valid JSON: no NaN literal
