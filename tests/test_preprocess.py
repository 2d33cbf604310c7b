"""The preprocess stage: scaling, one-hot labels, limit, atomic output."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from pipeline import preprocess as pp
from pipeline.params import ParamsError
from tests.helpers_data import npz_bytes, synthetic_arrays, write_params


def test_shapes_dtypes_scaling_and_one_hot() -> None:
    arrays = synthetic_arrays(20, 10)
    out = pp.preprocess(arrays, None)
    assert out["x_train"].shape == (20, 784) and out["x_train"].dtype == np.float32
    assert out["y_train"].shape == (20, 10) and out["y_train"].dtype == np.float32
    assert out["x_test"].shape == (10, 784) and out["y_test"].shape == (10, 10)
    np.testing.assert_array_equal(out["x_train"], arrays.x_train.reshape(20, 784) / np.float32(255))
    assert out["x_train"].min() >= 0 and out["x_train"].max() <= 1
    np.testing.assert_array_equal(out["y_train"].argmax(axis=1), arrays.y_train)
    np.testing.assert_array_equal(out["y_train"].sum(axis=1), np.ones(20, np.float32))
    assert set(np.unique(out["y_test"])) <= {0.0, 1.0}


def test_extremes_map_to_zero_and_one() -> None:
    arrays = synthetic_arrays(2, 1)
    arrays.x_train[0] = 0
    arrays.x_train[1] = 255
    out = pp.preprocess(arrays, None)
    assert (out["x_train"][0] == 0).all() and (out["x_train"][1] == 1).all()


def test_limit_keeps_first_training_images_only() -> None:
    arrays = synthetic_arrays(20, 10)
    out = pp.preprocess(arrays, 7)
    assert out["x_train"].shape == (7, 784) and out["y_train"].shape == (7, 10)
    np.testing.assert_array_equal(out["y_train"].argmax(axis=1), arrays.y_train[:7])
    assert out["x_test"].shape == (10, 784), "the test set is never cut"
    assert pp.preprocess(arrays, 20)["x_train"].shape == (20, 784)


def test_limit_larger_than_data() -> None:
    with pytest.raises(ParamsError, match=r"preprocess\.limit: 21 is more than the 20 training images"):
        pp.preprocess(synthetic_arrays(20, 10), 21)


# ---------------------------------------------------------------------- the stage
@pytest.fixture
def stage(tmp_path: Path) -> dict[str, Path]:
    raw = tmp_path / "raw" / "mnist.npz"
    raw.parent.mkdir()
    raw.write_bytes(npz_bytes(synthetic_arrays(20, 10)))
    out = tmp_path / "data" / "processed"
    return {"raw": raw, "out": out, "params": tmp_path / "params.yaml"}


def run_stage(stage: dict[str, Path], limit: object) -> int:
    write_params(stage["params"], preprocess={"limit": limit})
    return pp.main(["--params", str(stage["params"]), "--in", str(stage["raw"]), "--out", str(stage["out"])])


def test_stage_writes_train_and_test_only(stage: dict[str, Path]) -> None:
    assert run_stage(stage, 12) == 0
    out = stage["out"]
    assert sorted(p.name for p in out.iterdir()) == ["test.npz", "train.npz"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["processed"], "temporary folders left behind"
    with np.load(out / "train.npz", allow_pickle=False) as train:
        assert sorted(train.files) == ["x", "y"]
        assert train["x"].shape == (12, 784) and train["x"].dtype == np.float32
        assert train["y"].shape == (12, 10) and train["y"].dtype == np.float32
    with np.load(out / "test.npz", allow_pickle=False) as test:
        assert test["x"].shape == (10, 784) and test["y"].shape == (10, 10)


def test_stage_output_is_deterministic(stage: dict[str, Path]) -> None:
    assert run_stage(stage, None) == 0
    first = (stage["out"] / "train.npz").read_bytes()
    assert run_stage(stage, None) == 0
    assert (stage["out"] / "train.npz").read_bytes() == first


def test_stage_replaces_existing_output_dir(stage: dict[str, Path]) -> None:
    out = stage["out"]
    out.mkdir(parents=True)
    (out / "stale.txt").write_text("old")
    assert run_stage(stage, None) == 0
    assert sorted(p.name for p in out.iterdir()) == ["test.npz", "train.npz"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["processed"]


@pytest.mark.parametrize(("limit", "match"), [(0, "must be null or > 0"), (21, "more than the 20"), ("x", "integer")])
def test_stage_bad_limit_leaves_output_untouched(
    stage: dict[str, Path], caplog: pytest.LogCaptureFixture, limit: object, match: str
) -> None:
    out = stage["out"]
    out.mkdir(parents=True)
    (out / "train.npz").write_text("previous result")
    assert run_stage(stage, limit) == 1
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "preprocess.limit" in errors[0] and match in errors[0]
    assert (out / "train.npz").read_text() == "previous result"
    assert sorted(p.name for p in out.parent.iterdir()) == ["processed"]


def test_stage_missing_or_corrupt_input(stage: dict[str, Path], caplog: pytest.LogCaptureFixture) -> None:
    stage["raw"].unlink()
    assert run_stage(stage, None) == 1
    assert "run the fetch stage first" in caplog.text
    stage["raw"].write_bytes(b"garbage")
    assert run_stage(stage, None) == 1
    assert "cannot read npz" in caplog.text
    assert not stage["out"].exists()
    assert not stage["out"].parent.exists() or list(stage["out"].parent.iterdir()) == []


def test_failure_while_writing_cleans_up(stage: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    out = stage["out"]
    assert run_stage(stage, None) == 0
    before = (out / "train.npz").read_bytes()

    def boom(file: object, arrays: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(pp, "write_npz", boom)
    assert run_stage(stage, 5) == 1
    assert (out / "train.npz").read_bytes() == before, "the previous result survives"
    assert sorted(p.name for p in out.parent.iterdir()) == ["processed"]
