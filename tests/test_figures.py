"""Figures on tiny synthetic histories (2 seeds × 5 epochs)."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.figure import Figure

from pipeline import figures, history
from tests.synthetic_results import DEFAULT_VARIANTS, histories, make_history, name_of

D1, D2, REMEDY = (name_of(v) for v in DEFAULT_VARIANTS)


def line_labels(ax) -> list[str]:
    return [line.get_label() for line in ax.get_lines() if not line.get_label().startswith("_")]


def assert_labelled(fig: Figure) -> None:
    for ax in fig.axes:
        assert ax.get_title(), "every axis has a title"
        assert ax.get_xlabel(), f"{ax.get_title()}: x label"
        assert ax.get_ylabel(), f"{ax.get_title()}: y label"


def bound_lines(ax) -> list:
    return [line for line in ax.get_lines() if line.get_label().startswith(figures.BOUND_LABEL)]


# ------------------------------------------------------------------------- helpers
def test_sigmoid_bound_is_computed_quarter():
    assert np.isclose(figures.SIGMOID_BOUND, 0.25)
    x = np.linspace(-5, 5, 1001)
    assert figures.sigmoid_prime(x).max() == pytest.approx(figures.SIGMOID_BOUND)


# ------------------------------------------------------------------ classic figures
def test_classic_figure_panels_and_clip():
    table = make_history(3, seeds=(0,))
    fig = figures.classic_figure(table, "depth-3", clip_quantile=0.5)
    assert isinstance(fig, Figure)
    acc_ax, change_ax = fig.axes
    assert acc_ax.get_lines()[0].get_ydata()[-1] == pytest.approx(0.78)
    assert line_labels(change_ax) == ["hidden_1", "hidden_2", "hidden_3"]
    assert [t.get_text() for t in change_ax.get_legend().get_texts()] == ["hidden_1", "hidden_2", "hidden_3"]
    later = table.loc[table["epoch"] >= 2, history.layer_columns(table, "weight_change")].to_numpy().ravel()
    assert change_ax.get_ylim()[1] == pytest.approx(np.quantile(later, 0.5) * 1.05)
    assert change_ax.get_ylim()[1] < table["weight_change/hidden_3"].max()  # epoch 1 is clipped away
    assert fig.get_suptitle() == "depth-3"
    assert_labelled(fig)


def test_classic_figure_given_several_seeds_draws_the_lowest():
    fig = figures.classic_figure(make_history(1, seeds=(1, 0)), "t")
    assert fig.axes[0].get_lines()[0].get_ydata()[-1] == pytest.approx(0.80)  # seed 0's final accuracy
    assert len(fig.axes[0].get_lines()[0].get_xdata()) == 5


def test_accuracy_by_depth_one_line_and_two_bands_per_variant():
    fig = figures.accuracy_by_depth(histories())
    (ax,) = fig.axes
    assert line_labels(ax) == [D1, D2, REMEDY]
    assert len(ax.collections) == 2 * 3  # ±std and min–max per variant
    assert ax.get_lines()[1].get_ydata()[-1] == pytest.approx(0.84)
    assert_labelled(fig)


def test_single_seed_has_no_bands():
    fig = figures.accuracy_by_depth({"depth-1": make_history(1, seeds=(0,))})
    assert len(fig.axes[0].collections) == 0


def test_first_layer_change_log_scale():
    fig = figures.first_layer_change(histories())
    (ax,) = fig.axes
    assert ax.get_yscale() == "log"
    assert line_labels(ax) == [D1, D2, REMEDY]
    assert_labelled(fig)


def test_final_accuracy_vs_depth_means_and_strip():
    finals = history.final_values(histories((DEFAULT_VARIANTS[0], DEFAULT_VARIANTS[1])))
    fig = figures.final_accuracy_vs_depth(finals)
    (ax,) = fig.axes
    (errorbars,) = ax.containers
    assert errorbars.get_label() == "mean ± std"
    means = errorbars.lines[0]
    assert list(means.get_xdata()) == [1, 2]
    assert list(means.get_ydata()) == pytest.approx([0.85, 0.84])
    strip_points = sum(len(c.get_offsets()) for c in ax.collections if hasattr(c, "get_offsets"))
    assert strip_points >= 4  # one point per (depth, seed)
    assert_labelled(fig)


def test_sigmoid_figure_marks_quarter():
    fig = figures.sigmoid_figure()
    (ax,) = fig.axes
    assert {"σ(x)", "σ'(x) = σ(x)(1 − σ(x))"} <= set(line_labels(ax))
    assert any(np.allclose(line.get_ydata(), 0.25) for line in ax.get_lines())
    assert any("1/4" in text.get_text() for text in ax.texts)
    assert_labelled(fig)


# --------------------------------------------------------------------- replicates
def test_bands_figure_accuracy_and_each_layer():
    fig = figures.bands_figure(make_history(3), "depth-3")
    assert len(fig.axes) == 1 + 3
    for ax in fig.axes:
        assert len(ax.get_lines()) == 1
        assert len(ax.collections) == 2
    assert "2 seed" in fig.get_suptitle()
    assert_labelled(fig)


# ---------------------------------------------------------------------- gradients
def test_gradient_figure_log_panels_ratio_and_bound():
    fig = figures.gradient_figure(make_history(3), "depth-3")
    kernel, bias, ratio = fig.axes
    assert all(ax.get_yscale() == "log" for ax in fig.axes)
    assert line_labels(kernel) == ["hidden_1", "hidden_2", "hidden_3"]
    assert line_labels(bias) == ["hidden_1", "hidden_2", "hidden_3"]
    (bound,) = bound_lines(ratio)
    assert bound.get_label() == "σ'(x) ≤ 1/4 per sigmoid layer"
    assert np.allclose(bound.get_ydata(), 0.25)
    ratios = [line for line in ratio.get_lines() if line not in bound_lines(ratio)]
    assert [line.get_label() for line in ratios] == ["hidden_1 / hidden_2", "hidden_2 / hidden_3"]
    assert np.allclose(ratios[0].get_ydata(), 0.2)  # synthetic: each layer 0.2× the next
    assert "‖∂C/∂b‖" in ratio.get_ylabel()
    assert_labelled(fig)


def test_gradient_figure_one_layer_has_no_ratio_panel():
    fig = figures.gradient_figure(make_history(1), "depth-1")
    assert len(fig.axes) == 2
    assert not any(bound_lines(ax) for ax in fig.axes)


# ----------------------------------------------------------------------- remedies
def test_remedies_figure_accuracy_and_first_to_last_ratio():
    group = {k: v for k, v in histories().items() if k in (D2, REMEDY)}
    fig = figures.remedies_figure(group)
    acc_ax, ratio_ax = fig.axes
    assert line_labels(acc_ax) == [D2, REMEDY]
    assert ratio_ax.get_yscale() == "log"
    variant_lines = [line for line in ratio_ax.get_lines() if line.get_label() in (D2, REMEDY)]
    assert len(variant_lines) == 2
    assert np.allclose(variant_lines[0].get_ydata(), 0.2)
    (bound,) = bound_lines(ratio_ax)
    assert np.allclose(bound.get_ydata(), 0.25)  # depth 2: one layer of the σ' bound
    assert "2" in fig.get_suptitle()
    assert_labelled(fig)


def test_vs_train_figure_side_by_side():
    fig = figures.test_vs_train_figure(histories())
    train_ax, test_ax = fig.axes
    assert line_labels(train_ax) == [D1, D2, REMEDY]
    assert line_labels(test_ax) == [D1, D2, REMEDY]
    assert test_ax.get_lines()[0].get_ydata()[-1] == pytest.approx(0.82)
    assert_labelled(fig)


# ------------------------------------------------------- why deep sigmoid nets stall (issue 12)
def test_activation_figure_one_panel_with_mean_and_band_per_layer_and_the_output():
    table = make_history(2)
    fig = figures.activation_figure(table, "d2", history.escape_epochs(table))
    assert [ax.get_title() for ax in fig.axes] == ["hidden_1", "hidden_2", "output"]
    for ax in fig.axes:
        assert line_labels(ax) == ["mean", figures.ESCAPE_LABEL]
        assert len(ax.collections) == 1  # the 2–98 % band
        escape_line = next(line for line in ax.get_lines() if line.get_label() == figures.ESCAPE_LABEL)
        assert escape_line.get_xdata()[0] == 2  # every synthetic seed escapes at epoch 2
    # hidden_2's mean is 0.5 + 0.2·(1 - epoch/5); its band the seed-mean 2nd and 98th percentiles, 0.1 to 0.9.
    np.testing.assert_allclose(fig.axes[1].get_lines()[0].get_ydata(), [0.5 + 0.2 * (1 - e / 5) for e in range(1, 6)])
    band = fig.axes[1].collections[0].get_paths()[0].vertices[:, 1]
    assert band.min() == pytest.approx(0.1) and band.max() == pytest.approx(0.9)
    assert fig.axes[-1].get_xlabel() == "epoch"


def test_saturation_figure_per_layer_in_unit_range():
    table = make_history(3)
    fig = figures.saturation_figure(table, "d3")
    (ax,) = fig.axes
    assert line_labels(ax) == ["hidden_1", "hidden_2", "hidden_3", "output"]
    top = ax.get_lines()[2]
    np.testing.assert_allclose(top.get_ydata(), [0.3 * (1 - e / 5) for e in range(1, 6)])
    assert ax.get_ylim() == (-0.02, 1.02)
    assert_labelled(fig)


def test_saturation_by_variant_one_panel_each():
    hs = histories()
    fig = figures.saturation_by_variant(hs, {name: history.escape_epochs(h) for name, h in hs.items()})
    assert [ax.get_title() for ax in fig.axes] == list(hs)
    assert line_labels(fig.axes[0]) == ["hidden_1", "output", figures.ESCAPE_LABEL]


def test_escape_figure_marks_censored_seeds_with_a_triangle_at_the_last_epoch():
    escaped = history.escape_epochs(make_history(2))
    censored = history.escape_epochs(make_history(2), margin=0.9)  # no seed gains 0.9: both censored
    fig = figures.escape_figure({"a": escaped, "b": censored}, margin=0.05)
    (ax,) = fig.axes
    # Per row, in order: the dots of the seeds that escaped, then the censored seeds' triangles.
    points = [c.get_offsets() for c in ax.collections[:4]]
    np.testing.assert_allclose(points[0][:, 0], [2, 2])  # row a: both escaped at epoch 2
    assert len(points[1]) == len(points[2]) == 0
    np.testing.assert_allclose(points[3][:, 0], [5, 5])  # row b: censored, at its last epoch
    np.testing.assert_allclose(points[3][:, 1], [0.85, 1.15])
    assert [t.get_text() for t in ax.get_yticklabels()] == ["a", "b"]
    assert "censored: not by its last epoch" in [t.get_text() for t in fig.legends[0].get_texts()]
    assert "+ 0.05)" in ax.get_title()
    assert "+ its margin)" in figures.escape_figure({"a": escaped}, margin=None).axes[0].get_title()
    assert_labelled(fig)


def test_jacobian_figure_singular_values_bound_and_prediction_against_measurement():
    table = make_history(3)
    fig = figures.jacobian_figure(table, "d3")
    top, bottom = fig.axes
    labels = line_labels(top)
    assert labels[:2] == ["hidden_1 mean", "hidden_1 largest"] and len(bound_lines(top)) == 1
    assert bound_lines(top)[0].get_ydata()[0] == pytest.approx(0.25)
    assert line_labels(bottom)[:2] == ["predicted: product of mean singular values", "measured: first / last ‖∂C/∂b‖"]
    predicted, measured = bottom.get_lines()[:2]
    np.testing.assert_allclose(predicted.get_ydata(), 0.04)  # 0.2 × 0.2
    np.testing.assert_allclose(measured.get_ydata(), 0.04)  # speeds fall by 0.2 per layer
    assert bound_lines(bottom)[0].get_ydata()[0] == pytest.approx(0.25**2)
    assert top.get_yscale() == bottom.get_yscale() == "log"
    assert len(figures.jacobian_figure(make_history(1), "d1").axes) == 1  # one layer: no product
