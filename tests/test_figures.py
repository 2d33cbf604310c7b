"""Figures on tiny synthetic histories (2 seeds × 5 epochs): values, one colour per variant, legibility."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_hex
from matplotlib.figure import Figure
from matplotlib.text import Text

from pipeline import figures, history
from pipeline.params import Variant
from tests.synthetic_results import DEFAULT_STUDY, histories, make_history

D1, D2, REMEDY = DEFAULT_STUDY
COLORS = figures.variant_colors(DEFAULT_STUDY)
PLATEAU, MARGIN = 0.4, 0.05  # every synthetic seed escapes at epoch 3


def escapes(table, margin: float = MARGIN):
    return history.escape_epochs(table, PLATEAU, margin)


def line_labels(ax) -> list[str]:
    return [line.get_label() for line in ax.get_lines() if not line.get_label().startswith("_")]


def bound_lines(ax) -> list:
    return [line for line in ax.get_lines() if line.get_label().startswith(figures.BOUND_LABEL)]


HS, TABLE = histories(), make_history(3)
ES = {name: escapes(h) for name, h in HS.items()}
FORECASTS = {name: pd.DataFrame({"seed": [0, 1], "forecast": [2.5, 4.0]}) for name in (D2, REMEDY)}
# Every figure the report draws, on the synthetic study.
FIGURES: dict[str, Callable[[], Figure]] = {
    "accuracy_by_depth": lambda: figures.by_variant(HS, COLORS, "accuracy", "Training accuracy"),
    "first_layer_change": lambda: figures.by_variant(HS, COLORS, "weight_change/hidden_1", "hidden_1", log=True),
    "sigmoid": figures.sigmoid_figure,
    "remedies": lambda: figures.remedies_figure({k: HS[k] for k in (D2, REMEDY)}, COLORS),
    "test_vs_train": lambda: figures.test_vs_train_figure(HS, COLORS),
    "escape": lambda: figures.escape_figure(ES, COLORS),
    "saturation_by_variant": lambda: figures.saturation_by_variant(HS, ES, COLORS),
    "bands": lambda: figures.bands_figure(TABLE, "d3", COLORS[D2]),
    "gradients": lambda: figures.gradient_figure(TABLE, "d3"),
    "signal": lambda: figures.signal_figure(TABLE, "d3", escapes(TABLE)),
    "forecast": lambda: figures.forecast_figure(ES, FORECASTS, COLORS),
    "saturation": lambda: figures.saturation_figure(TABLE, "d3", escapes(TABLE)),
    "jacobians": lambda: figures.jacobian_figure(TABLE, "d3"),
}


# ------------------------------------------------------------------- the palette
def test_palette_depths_on_one_ordered_ramp_remedies_in_distinct_hues():
    study = {
        "d3": Variant(depth=3),
        "b": Variant(depth=4, activation="relu"),
        "d1": Variant(depth=1),
        "a": Variant(depth=4, loss="cross_entropy"),
        "c": Variant(depth=2, activation="relu"),
    }
    colors = figures.variant_colors(study)
    assert colors == figures.variant_colors(dict(reversed(study.items())))  # whatever the order of the study
    # Remedies by depth, then name, through Okabe & Ito's hues.
    assert [colors[n] for n in ("c", "a", "b")] == list(figures.HUES[:3])
    # Depths darkest first: the ramp's luminance rises with depth.
    lum = [np.dot([int(colors[n][i : i + 2], 16) for i in (1, 3, 5)], [0.2126, 0.7152, 0.0722]) for n in ("d1", "d3")]
    assert lum[0] < lum[1]
    assert len(set(colors.values())) == len(colors)


def test_every_variant_has_one_colour_in_every_figure():
    """Lines, bands' edges aside, scatter points and panel titles labelled with a variant's name all carry
    that variant's colour, and every variant appears in the figures that compare them."""
    seen: dict[str, set[str]] = {name: set() for name in COLORS}
    for name, make in FIGURES.items():
        for ax in make().axes:
            for line in ax.get_lines():
                if line.get_label() in COLORS:
                    assert to_hex(line.get_color()) == COLORS[line.get_label()], (name, line.get_label())
                    seen[line.get_label()].add(name)
            for points in ax.collections:
                if points.get_label() in COLORS:
                    assert to_hex(points.get_facecolor()[0]) == COLORS[points.get_label()], (name, points.get_label())
                    seen[points.get_label()].add(name)
            if ax.get_title() in COLORS:
                assert to_hex(ax.title.get_color()) == COLORS[ax.get_title()], name
                seen[ax.get_title()].add(name)
            if name == "escape":  # one row per variant, its points in the variant's colour
                labels = [t.get_text() for t in ax.get_yticklabels()]
                for row, label in enumerate(labels):
                    points = [c for c in ax.collections if len(c.get_offsets()) and round(c.get_offsets()[0][1]) == row]
                    assert points and all(to_hex(c.get_facecolor()[0]) == COLORS[label] for c in points), label
                    seen[label].add(name)
    for label, where in seen.items():
        assert {"accuracy_by_depth", "test_vs_train", "escape", "saturation_by_variant"} <= where, label


@pytest.mark.parametrize("name", list(FIGURES))
def test_legends_never_cover_the_data_and_text_is_legible(name):
    """Every legend lies outside every axis; every text is at least 9 px on the page (figures.PX_PER_INCH per
    inch of figure), whose column is figures.WIDTH inches wide."""
    fig = FIGURES[name]()
    assert fig.get_figwidth() <= figures.WIDTH
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    boxes = [ax.get_window_extent(renderer) for ax in fig.axes if ax.get_visible()]
    legends = [*fig.legends, *(ax.get_legend() for ax in fig.axes if ax.get_legend())]
    assert legends or name in ("bands",), "a figure of several series has a legend"
    for legend in legends:
        extent = legend.get_window_extent(renderer)
        assert not any(extent.overlaps(box) for box in boxes), name
    for text in fig.findobj(Text):
        if text.get_text() and text.get_visible():
            assert text.get_fontsize() * figures.PX_PER_INCH / 72 >= 9, (name, text.get_text())


# ------------------------------------------------------------------------ values
def test_sigmoid_bound_is_computed_quarter():
    assert np.isclose(figures.SIGMOID_BOUND, 0.25)
    assert figures.sigmoid_prime(np.linspace(-5, 5, 1001)).max() == pytest.approx(figures.SIGMOID_BOUND)
    (ax,) = figures.sigmoid_figure().axes
    assert any(np.allclose(line.get_ydata(), 0.25) for line in ax.get_lines())
    assert any("1/4" in text.get_text() for text in ax.texts)


def test_by_variant_one_line_and_two_bands_per_variant():
    (ax,) = figures.by_variant(histories(), COLORS, "accuracy", "Training accuracy").axes
    assert line_labels(ax) == [D1, D2, REMEDY]
    assert len(ax.collections) == 2 * 3  # ±std and min–max per variant
    assert ax.get_lines()[1].get_ydata()[-1] == pytest.approx(0.84)
    single = figures.by_variant({D1: make_history(1, seeds=(0,))}, COLORS, "accuracy", "t")
    assert len(single.axes[0].collections) == 0  # one seed: no bands


def test_by_variant_log_scale():
    (ax,) = figures.by_variant(histories(), COLORS, "weight_change/hidden_1", "hidden_1", log=True).axes
    assert ax.get_yscale() == "log" and line_labels(ax) == [D1, D2, REMEDY]
    assert ax.get_ylabel() == "weight_change/hidden_1"


def test_bands_figure_accuracy_and_each_layer_in_the_variants_colour():
    fig = figures.bands_figure(make_history(3), "depth-3", "#123456")
    assert len(fig.axes) == 1 + 3
    for ax in fig.axes:
        assert [to_hex(line.get_color()) for line in ax.get_lines()] == ["#123456"]
        assert len(ax.collections) == 2
    assert "2 seed" in fig.get_suptitle()


def test_gradient_figure_log_panels_ratio_and_bound():
    kernel, bias, ratio = figures.gradient_figure(make_history(3), "depth-3").axes
    assert all(ax.get_yscale() == "log" for ax in (kernel, bias, ratio))
    assert line_labels(kernel) == line_labels(bias) == ["hidden_1", "hidden_2", "hidden_3"]
    (bound,) = bound_lines(ratio)
    assert np.allclose(bound.get_ydata(), 0.25)
    ratios = [line for line in ratio.get_lines() if line not in bound_lines(ratio)]
    assert [line.get_label() for line in ratios] == ["hidden_1 / hidden_2", "hidden_2 / hidden_3"]
    assert np.allclose(ratios[0].get_ydata(), 0.2)  # synthetic: each layer 0.2× the next
    assert len(figures.gradient_figure(make_history(1), "depth-1").axes) == 2  # one layer: no ratio panel


def test_remedies_figure_accuracy_and_first_to_last_ratio():
    acc_ax, ratio_ax = figures.remedies_figure({k: v for k, v in histories().items() if k != D1}, COLORS).axes
    assert line_labels(acc_ax) == [D2, REMEDY]
    assert ratio_ax.get_yscale() == "log"
    assert np.allclose(ratio_ax.get_lines()[0].get_ydata(), 0.2)
    (bound,) = bound_lines(ratio_ax)
    assert np.allclose(bound.get_ydata(), 0.25)  # depth 2: one layer of the σ' bound


def test_vs_train_figure_side_by_side():
    train_ax, test_ax = figures.test_vs_train_figure(histories(), COLORS).axes
    assert line_labels(train_ax) == line_labels(test_ax) == [D1, D2, REMEDY]
    assert test_ax.get_lines()[0].get_ydata()[-1] == pytest.approx(0.82)


def test_signal_figure_per_layer_with_the_inputs():
    (ax,) = figures.signal_figure(make_history(2), "d2", escapes(make_history(2))).axes
    assert line_labels(ax) == ["hidden_1", "hidden_2", "output", "input", figures.ESCAPE_LABEL]
    assert ax.get_yscale() == "log"
    np.testing.assert_allclose([line.get_ydata()[0] for line in ax.get_lines()[:4]], [0.1, 0.025, 0.005, 0.2])


def test_forecast_figure_forecast_against_actual_with_censored_seeds_at_their_last_epoch():
    censored = escapes(make_history(2), margin=0.9)  # no seed escapes: both censored at epoch 5
    fig = figures.forecast_figure(
        {"a": ES[D2], "b": censored},
        {"a": FORECASTS[D2], "b": FORECASTS[D2]},
        COLORS | {"a": "#000000", "b": "#111111"},
    )
    (ax,) = fig.axes
    done, _, _, hollow = (c.get_offsets() for c in ax.collections[:4])
    np.testing.assert_allclose(done, [[3, 2.5], [3, 4.0]])  # (actual, forecast) of each seed of a
    np.testing.assert_allclose(hollow, [[5, 2.5], [5, 4.0]])  # b's seeds: at their last epoch
    (diagonal,) = [line for line in ax.get_lines() if line.get_label() == "forecast = actual"]
    assert diagonal.get_xdata()[0] == diagonal.get_ydata()[0] == 0


def test_saturation_figures_per_layer_in_unit_range():
    (ax,) = figures.saturation_figure(make_history(3), "d3").axes
    assert line_labels(ax) == ["hidden_1", "hidden_2", "hidden_3", "output"]
    np.testing.assert_allclose(ax.get_lines()[2].get_ydata(), [0.3 * (1 - e / 5) for e in range(1, 6)])
    assert ax.get_ylim() == (-0.02, 1.02)
    hs = histories()
    fig = figures.saturation_by_variant(hs, {name: escapes(h) for name, h in hs.items()}, COLORS)
    assert [ax.get_title() for ax in fig.axes if ax.get_visible()] == list(hs)
    assert line_labels(fig.axes[0]) == ["hidden_1", "output", figures.ESCAPE_LABEL]


def test_escape_figure_marks_censored_seeds_with_a_triangle_at_the_last_epoch():
    table = make_history(2)
    fig = figures.escape_figure(
        {"a": escapes(table), "b": escapes(table, margin=0.9)}, {"a": "#000000", "b": "#111111"}
    )
    (ax,) = fig.axes
    points = [c.get_offsets() for c in ax.collections[:4]]  # per row: the escaped seeds, then the censored
    np.testing.assert_allclose(points[0][:, 0], [3, 3])  # row a: both escaped at epoch 3
    assert len(points[1]) == len(points[2]) == 0
    np.testing.assert_allclose(points[3][:, 0], [5, 5])  # row b: censored, at its last epoch
    np.testing.assert_allclose(points[3][:, 1], [0.85, 1.15])
    assert [t.get_text() for t in ax.get_yticklabels()] == ["a", "b"]
    assert "censored: not by its last epoch" in [t.get_text() for t in fig.legends[0].get_texts()]


def test_jacobian_figure_singular_values_bound_and_prediction_against_measurement():
    top, bottom = figures.jacobian_figure(make_history(3), "d3").axes
    assert line_labels(top)[:2] == ["hidden_1 mean", "hidden_1 largest"] and len(bound_lines(top)) == 1
    assert bound_lines(top)[0].get_ydata()[0] == pytest.approx(0.25)
    assert line_labels(bottom)[:2] == ["predicted: product of mean singular values", "measured: first / last ‖∂C/∂b‖"]
    predicted, measured = bottom.get_lines()[:2]
    np.testing.assert_allclose(predicted.get_ydata(), 0.04)  # 0.2 × 0.2
    np.testing.assert_allclose(measured.get_ydata(), 0.04)  # speeds fall by 0.2 per layer
    assert bound_lines(bottom)[0].get_ydata()[0] == pytest.approx(0.25**2)
    assert len(figures.jacobian_figure(make_history(1), "d1").axes) == 1  # one layer: no product
