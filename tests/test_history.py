"""history.py: the per-epoch table's columns and statistics, against hand-computed values."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from pipeline import columns, history
from pipeline.params import SummaryParams
from tests.synthetic_results import make_history


def test_layer_columns_parse_and_sort_numerically() -> None:
    frame = pd.DataFrame(columns=["grad/hidden_10", "grad/hidden_2", "grad/hidden_1", "grad_bias/hidden_1", "x"])
    assert history.layer_columns(frame, "grad") == ["grad/hidden_1", "grad/hidden_2", "grad/hidden_10"]
    assert history.layer_columns(frame, "grad_bias") == ["grad_bias/hidden_1"]
    assert columns.parse_layer_column("weight_change/hidden_3") == ("weight_change", 3)
    assert columns.parse_layer_column("accuracy") is None
    assert columns.layer_column("grad", 2) == "grad/hidden_2"
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
    assert math.isnan(history.ratio_stats(table, "a", "b")["mean"].iloc[0])


def test_vanishing_index_window_and_skipped_epochs() -> None:
    first = [1.0, 2.0, 3.0, 100.0]
    last = [10.0, 0.0, 30.0, 1.0]
    # window 3 keeps epochs 1..3; epoch 2 is skipped (last layer speed 0).
    assert history.vanishing_index(first, last, 3) == (pytest.approx(0.1), 1)
    index, skipped = history.vanishing_index([1.0], [0.0], 5)
    assert math.isnan(index) and skipped == 1


def test_summarize_at_depth_three_hand_computed() -> None:
    table = make_history(3)
    metrics = history.summarize(table, SummaryParams(index_window=3), plateau=0.1)
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
    metrics = history.summarize(table, SummaryParams(index_window=2), plateau=0.1)
    assert metrics["vanishing_index_skipped_epochs"] == 2  # epoch 1 of both seeds
    assert metrics["vanishing_index"] == pytest.approx(0.2)  # from epoch 2 alone
    assert metrics["loss"] is None and metrics["loss_std"] is None
    json.dumps(metrics, allow_nan=False)  # valid JSON: no NaN literal


# ------------------------------------------------------------------------ escape epoch (issue 16)
def test_plateau_is_the_constant_predictors_accuracy() -> None:
    # Labels 1, 1, 2, 3: always answering 1 is right half the time.
    assert history.plateau_accuracy(np.eye(10)[[1, 1, 2, 3]]) == 0.5
    assert history.plateau_accuracy(np.array([0, 0, 1])) == pytest.approx(2 / 3)  # class indices too
    with pytest.raises(ValueError, match="no labels"):
        history.plateau_accuracy(np.zeros((0, 10)))


def test_escape_epoch_first_epoch_above_the_plateau_plus_margin() -> None:
    epochs = [1, 2, 3, 4, 5]
    # Plateau 0.11; 0.16 is not above 0.11 + 0.05 (strictly), 0.17 is.
    assert history.escape_epoch(epochs, [0.11, 0.11, 0.12, 0.17, 0.5], 0.11, 0.05) == 4
    assert history.escape_epoch(epochs, [0.11, 0.11, 0.12, 0.16, 0.16], 0.11, 0.05) is None  # censored
    assert history.escape_epoch([3, 1, 2], [0.5, 0.1, 0.1], 0.11, 0.05) == 3  # order by epoch
    assert history.escape_epoch(epochs, [np.nan, 0.5, 0.6, 0.7, 0.8], 0.11, 0.05) == 2  # a NaN never escapes
    assert history.escape_epoch([], [], 0.11, 0.05) is None
    # A seed that starts a little above the plateau is measured against the plateau, not its own start.
    assert history.escape_epoch(epochs, [0.14, 0.14, 0.17, 0.3, 0.5], 0.11, 0.05) == 3


def test_a_net_that_learns_within_epoch_one_escapes_at_epoch_one() -> None:
    """A depth-1 sigmoid net on learnable data: its epoch-1 accuracy is already far above the plateau."""
    from pipeline.engine import StackedTrainer
    from pipeline.model import build_model
    from pipeline.params import Variant
    from tests.test_engine import Recorder, tiny_data

    x, y = tiny_data(n=500)
    trainer = StackedTrainer(build_model(Variant(depth=1), [0]), "mse", 2.0, 20, 0)
    recorder = Recorder()
    trainer.fit(x, y, 3, [recorder])
    accuracy = [log["accuracy"][0] for log in recorder.logs]
    plateau = history.plateau_accuracy(y)
    assert accuracy[0] > plateau + 0.05  # it learned within epoch 1 …
    assert history.escape_epoch([1, 2, 3], accuracy, plateau, 0.05) == 1  # … and escapes at epoch 1, not 2


def _plateaus(escapes: dict[int, int | None], epochs: int = 10) -> pd.DataFrame:
    """Seeds at accuracy 0.11 until their escape epoch (None: never), 0.5 from then on."""
    rows = [
        {"seed": seed, "epoch": e, "accuracy": 0.11 if at is None or e < at else 0.5, "saturation/hidden_2": e}
        for seed, at in escapes.items()
        for e in range(1, epochs + 1)
    ]
    return pd.DataFrame(rows)


def test_escape_epochs_per_seed_mark_the_censored() -> None:
    table = history.escape_epochs(_plateaus({0: 4, 1: None, 2: 8}), 0.11, 0.05)
    assert table["seed"].tolist() == [0, 1, 2]
    assert table["censored"].tolist() == [False, True, False]
    assert table["escape_epoch"].tolist()[::2] == [4.0, 8.0] and np.isnan(table["escape_epoch"][1])
    assert table["last_epoch"].tolist() == [10, 10, 10]


def _blow_up(seeds: dict[int, float | None], epochs: int = 60) -> pd.DataFrame:
    """The forecast law's own world: seed k's output signal is 1 / (c · (t* - t)) until its escape at
    t* (None: no plateau, a constant signal), then 0.2; accuracy 0.11 on the plateau, 0.5 after."""
    rows = []
    for seed, t_star in seeds.items():
        for t in range(1, epochs + 1):
            on = t_star is not None and t < t_star
            signal = 1 / (1e3 * (t_star - t)) if on else 0.2
            rows.append({"seed": seed, "epoch": t, "accuracy": 0.11 if on else 0.5, "signal/output": signal})
    return pd.DataFrame(rows)


def test_escape_forecast_finds_a_blow_up_it_has_not_seen() -> None:
    table = _blow_up({0: 50.0, 1: 130.5, 2: None, 3: 15.0, 4: 41.0})
    forecasts = history.escape_forecasts(table, 40, 0.11, 0.05)
    assert forecasts["seed"].tolist() == [0, 1, 2, 3, 4]
    # Seeds 0, 1 and 4 are on the plateau through epoch 40: their zero crossings are 50, 130.5 and 41.
    np.testing.assert_allclose(forecasts["forecast"][[0, 1, 4]], [50.0, 130.5, 41.0], rtol=1e-9)
    # Seed 2 never had a plateau and seed 3 escaped at 15, inside the window: no forecast.
    assert forecasts["forecast"][[2, 3]].isna().all()
    # A signal that does not grow has no crossing, even on the plateau.
    flat = table.assign(**{"signal/output": 1e-4, "accuracy": 0.11})
    assert history.escape_forecasts(flat, 40, 0.11, 0.05)["forecast"].isna().all()
    # A window longer than the history, or a history without the column: no forecast either.
    assert history.escape_forecasts(table, 61, 0.11, 0.05)["forecast"].isna().all()
    assert history.escape_forecasts(table.drop(columns="signal/output"), 40, 0.11, 0.05)["forecast"].isna().all()


def test_escape_summary_averages_only_seeds_that_escaped() -> None:
    table = _blow_up({0: 50.0, 1: None, 2: 30.0, 3: 100.0}, epochs=80)
    forecasts = history.escape_forecasts(table, 20, 0.11, 0.05)
    summary = history.escape_summary(history.escape_epochs(table, 0.11, 0.05), forecasts)
    # Escapes at 50, 1 (no plateau), 30; seed 3 censored at 80. Forecasts 50, 30 and 100 (seed 1 has none).
    assert summary == {
        "escaped_fraction": 0.75,
        "escape_epoch": pytest.approx(27.0),
        "escape_epoch_std": pytest.approx(np.std([50, 1, 30])),
        "escape_forecast": pytest.approx(60.0),
        "escape_forecast_std": pytest.approx(np.std([50, 30, 100])),
        "forecast_fraction": 0.75,
        "escape_forecast_error": pytest.approx(0.0, abs=1e-9),  # seeds 0 and 2: exact
        "escape_forecast_rel_error": pytest.approx(0.0, abs=1e-9),
    }
    never = history.escape_epochs(_plateaus({0: None, 1: None}), 0.11, 0.05)
    none = history.escape_summary(never, pd.DataFrame({"seed": [0, 1], "forecast": [np.nan, np.nan]}))
    assert none["escape_epoch"] is None and none["escape_forecast"] is None and none["escaped_fraction"] == 0.0
    assert none["escape_forecast_error"] is None and none["forecast_fraction"] == 0.0
    json.dumps(none, allow_nan=False)


def test_around_escape_before_and_after_windows() -> None:
    table = _plateaus({0: 4, 1: None, 2: 8})  # the column is the epoch itself
    escapes = history.escape_epochs(table, 0.11, 0.05)
    before, after, seeds = history.around_escape(table, "saturation/hidden_2", escapes, window=2)
    # seed 0: epochs 2, 3 then 4, 5; seed 2: 6, 7 then 8, 9; seed 1 (censored) left out.
    assert (before, after, seeds) == (pytest.approx((2.5 + 6.5) / 2), pytest.approx((4.5 + 8.5) / 2), 2)
    assert np.isnan(history.around_escape(table, "missing", escapes, window=2)[0])


def test_summarize_adds_the_escape_epoch_its_forecast_and_their_settings() -> None:
    table = make_history(1, epochs=60)
    blow_up = _blow_up({0: 50.0, 1: None}, epochs=60)  # seed 0 escapes at 50, seed 1 has no plateau
    table[["accuracy", "signal/output"]] = blow_up[["accuracy", "signal/output"]].to_numpy()
    metrics = history.summarize(table, SummaryParams(index_window=2, escape_margin=0.05, forecast_epochs=40), 0.11)
    assert (metrics["escape_epoch"], metrics["escaped_fraction"]) == (pytest.approx(25.5), 1.0)
    assert metrics["escape_forecast"] == pytest.approx(50.0) and metrics["forecast_fraction"] == 0.5
    assert metrics["escape_forecast_error"] == pytest.approx(0.0, abs=1e-9)
    assert (metrics["plateau"], metrics["escape_margin"], metrics["forecast_epochs"]) == (0.11, 0.05, 40)
    assert {"accuracy", "vanishing_index", "vanishing_index_skipped_epochs", "epochs", "replicates"} <= set(metrics)
    # A larger margin than any gain: every seed censored, and nothing averaged.
    late = history.summarize(make_history(2), SummaryParams(index_window=2, escape_margin=0.9), 0.1)
    assert (late["escape_epoch"], late["escape_epoch_std"], late["escaped_fraction"]) == (None, None, 0.0)
    assert late["escape_forecast"] is None  # no signal/output column: histories from before issue 16


def test_probe_columns() -> None:
    assert columns.probe_column(columns.SATURATION, 3) == "saturation/hidden_3"
    assert columns.probe_column(columns.ACT_P02, None) == "act_p02/output"
    assert columns.parse_layer_column("act_p98/hidden_2") == ("act_p98", 2)
    assert history.layer_columns(make_history(3), columns.JAC_MEAN) == [f"jac_mean/hidden_{i}" for i in (1, 2, 3)]


def test_summarize_stage_measures_the_escape_against_the_training_labels_plateau(tmp_path) -> None:
    """The stage reads the plateau from train.npz's labels and passes summary.escape_margin on."""
    from pipeline import summarize as stage

    make_history(2).to_csv(tmp_path / "history.csv", index=False)
    np.savez(tmp_path / "train.npz", x=np.zeros((4, 1)), y=np.eye(10)[[1, 1, 2, 3]])  # plateau 0.5
    args = ["--params", str(tmp_path / "params.yaml"), "--history", str(tmp_path / "history.csv")]
    args += ["--train", str(tmp_path / "train.npz"), "--out", str(tmp_path / "metrics.json")]
    # Accuracy rises by 0.138 (seed 0) and 0.158 (seed 1) an epoch from 0.1: above 0.55 at epochs 4 and 3.
    for margin, expected in ((0.05, (3.5, 1.0)), (0.9, (None, 0.0))):
        (tmp_path / "params.yaml").write_text(f"summary: {{index_window: 2, escape_margin: {margin}}}\n")
        assert stage.main(args) == 0
        metrics = json.loads((tmp_path / "metrics.json").read_text())
        assert (metrics["escape_epoch"], metrics["escaped_fraction"]) == expected
        assert (metrics["plateau"], metrics["escape_margin"]) == (0.5, margin)


def test_summarize_stage_without_the_training_labels_says_what_to_do(tmp_path, caplog) -> None:
    from pipeline import summarize as stage

    make_history(2).to_csv(tmp_path / "history.csv", index=False)
    (tmp_path / "params.yaml").write_text("summary: {index_window: 2}\n")
    args = ["--params", str(tmp_path / "params.yaml"), "--history", str(tmp_path / "history.csv")]
    assert stage.main([*args, "--train", str(tmp_path / "train.npz"), "--out", str(tmp_path / "m.json")]) == 1
    assert "cannot read the training labels" in caplog.text and "run the preprocess stage" in caplog.text
    assert not (tmp_path / "m.json").exists()


def test_prior_mse_is_the_quadratic_cost_of_predicting_the_class_frequencies() -> None:
    labels = np.eye(3)[[0, 0, 0, 1]]  # frequencies 3/4, 1/4, 0
    direct = ((labels - labels.mean(axis=0)) ** 2).mean()  # Keras' mse of the constant predictor
    assert history.prior_mse(labels) == pytest.approx(0.125) == pytest.approx(direct)
