"""curves.py: the seed-mean, long-form plot data that `dvc plots` draws."""

from __future__ import annotations

import pandas as pd
import pytest

from pipeline import curves


def history(depth: int, seeds=(0, 1), epochs: int = 3, offset: float = 0.0) -> pd.DataFrame:
    """Rows per (seed, epoch) as the train stage writes them, seeds interleaved."""
    rows = []
    for epoch in range(1, epochs + 1):
        for seed in seeds:
            row = {"seed": seed, "epoch": epoch, "accuracy": offset + 0.1 * epoch + 0.01 * seed, "loss": 1.0 / epoch}
            for layer in range(1, depth + 1):
                row[f"weight_change/hidden_{layer}"] = layer * epoch + seed
                row[f"grad/hidden_{layer}"] = 10.0 * layer + seed
                row[f"grad_bias/hidden_{layer}"] = 100.0 * layer
            row["test_accuracy"] = 0.5 + seed
            row["test_loss"] = 2.0 / epoch
            rows.append(row)
    return pd.DataFrame(rows)


COLORS = {"depth-1": "#440154", "depth-2": "#21918c"}


def test_study_curves_long_form_in_study_order_with_each_variants_colour() -> None:
    frame = curves.study_curves({"depth-2": history(2), "depth-1": history(1, offset=0.5)}, COLORS)
    assert list(frame.columns) == [
        "variant",
        "color",
        "depth",
        "epoch",
        "accuracy",
        "loss",
        "test_accuracy",
        "test_loss",
    ]
    assert frame["variant"].tolist() == ["depth-2"] * 3 + ["depth-1"] * 3
    assert frame["color"].tolist() == ["#21918c"] * 3 + ["#440154"] * 3
    assert frame["depth"].tolist() == [2] * 3 + [1] * 3
    assert frame["epoch"].tolist() == [1, 2, 3, 1, 2, 3]
    assert frame["accuracy"].tolist() == pytest.approx([0.105, 0.205, 0.305, 0.605, 0.705, 0.805])


def test_layer_curves_one_row_per_variant_layer_epoch() -> None:
    frame = curves.layer_curves({"depth-1": history(1), "depth-2": history(2)})
    assert list(frame.columns) == ["variant", "layer", "epoch", "weight_change", "grad", "grad_bias"]
    assert len(frame) == 3 + 2 * 3
    d2 = frame[frame["variant"] == "depth-2"]
    assert d2["layer"].tolist() == [1, 1, 1, 2, 2, 2]
    assert d2["weight_change"].tolist() == pytest.approx([1.5, 2.5, 3.5, 2.5, 4.5, 6.5])
    assert d2["grad"].tolist() == pytest.approx([10.5] * 3 + [20.5] * 3)


def test_layer_curves_ignores_other_columns_and_sorts_layers_numerically() -> None:
    h = history(11, epochs=1)
    h["speed/hidden_1"] = 1.0  # not a layer kind this module plots
    frame = curves.layer_curves({"deep": h})
    assert frame["layer"].tolist() == list(range(1, 12))
    assert set(frame.columns) == {"variant", "layer", "epoch", "weight_change", "grad", "grad_bias"}


def test_write_plot_data(tmp_path) -> None:
    paths = curves.write_plot_data({"depth-1": history(1), "depth-2": history(2)}, COLORS, tmp_path / "plots")
    assert [p.name for p in paths] == ["curves.csv", "layers.csv"]
    study = pd.read_csv(paths[0])
    assert study["variant"].unique().tolist() == ["depth-1", "depth-2"]
    layers = pd.read_csv(paths[1])
    assert layers.groupby("variant")["layer"].max().to_dict() == {"depth-1": 1, "depth-2": 2}


def test_empty_study() -> None:
    assert curves.study_curves({}, {}).empty
    assert curves.layer_curves({}).empty
