"""Pure parts of a sweep: ``-S`` expansion (as ``dvc exp run --queue``), names, checks, the comparison table."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath

DEFAULT_METRICS = ("accuracy", "test_accuracy", "vanishing_index")
_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,40}$")


class SweepError(RuntimeError):
    """Bad input or an unusable setup, found before anything was submitted; the message says what to do."""


@dataclass(frozen=True)
class Experiment:
    """One combination: its DVC experiment name and its ``-S`` arguments (``file:key=value``)."""

    name: str
    set_params: tuple[str, ...]

    @property
    def overrides(self) -> dict[str, str]:
        """``{"train.learning_rate": "0.1", ...}`` (the params file is named only when not params.yaml)."""
        out = {}
        for arg in self.set_params:
            path, _, override = arg.partition(":")
            key, _, value = override.partition("=")
            out[key if path == "params.yaml" else f"{path}:{key}"] = value
        return out


def expand(set_params: Sequence[str]) -> list[tuple[str, ...]]:
    """One tuple of ``file:key=value`` per experiment, by DVC's own helpers (Hydra's grammar): comma lists give the
    cartesian product; ``train.seeds=[0],[1]`` is two experiments, ``[0,1]`` one; ``[]`` one with no change."""
    from dvc.exceptions import DvcException
    from dvc.utils.cli_parse import to_path_overrides
    from dvc.utils.hydra import get_hydra_sweeps
    from hydra.errors import HydraException

    for arg in set_params:
        if "=" not in arg:
            raise SweepError(f"-S {arg!r}: expected key=value (for example -S 'train.learning_rate=0.1,0.5').")
    if not set_params:
        return [()]
    try:
        sweeps = get_hydra_sweeps(to_path_overrides(list(set_params)))
    except (DvcException, HydraException) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SweepError(f"-S {' -S '.join(set_params)}: {first}") from None
    return [tuple(f"{path}:{o}" for path, overrides in sweep.items() for o in overrides) for sweep in sweeps]


def check_name(prefix: str) -> str:
    """A sweep name usable in git refs, DVC experiment names and MLflow tags."""
    if not _NAME.match(prefix):
        raise SweepError(
            f"--name {prefix!r}: use 1-41 lowercase letters, digits and dashes, starting with a letter or digit."
        )
    return prefix


def plan(sweep_id: str, set_params: Sequence[str], max_experiments: int = 10_000) -> list[Experiment]:
    """One :class:`Experiment` per combination, named ``<sweep_id>-<k>`` (k from 1, zero-padded)."""
    combos = expand(set_params)
    if len(combos) > max_experiments:
        raise SweepError(
            f"{len(combos)} experiments exceed --max-experiments {max_experiments}; raise it if you mean it."
        )
    width = len(str(len(combos)))
    return [Experiment(f"{sweep_id}-{k:0{width}d}", combo) for k, combo in enumerate(combos, 1)]


def gpus_per_task(requested: float | None, cluster_gpus: float) -> float:
    """GPUs each experiment asks Ray for: ``SWEEP_GPUS`` when given, else one when the cluster has GPUs."""
    if requested is None:
        return 1.0 if cluster_gpus > 0 else 0.0
    if requested > cluster_gpus:
        raise SweepError(f"SWEEP_GPUS={requested:g}, but Ray has {cluster_gpus:g} GPU(s): no task could start.")
    return requested


def check_tracking(uri: str, remote_workers: bool) -> None:
    """Workers on other machines need a tracking server: a SQLite file (or a file store) lives on this one."""
    if remote_workers and not uri.startswith(("http://", "https://")):
        raise SweepError(
            f"MLFLOW_TRACKING_URI={uri} is a store on this machine, which the cluster's workers cannot write to. "
            "Start a tracking server they can reach (make server HOST=<address>, or your team's) and set "
            "MLFLOW_TRACKING_URI=http://<host>:<port>."
        )


def variant_metrics(metrics_show: Mapping[str, object]) -> dict[str, dict[str, float]]:
    """``{variant: {metric: value}}`` (numbers only) from ``dvc metrics show --json`` of one revision."""
    out: dict[str, dict[str, float]] = {}
    for rev in metrics_show.values():
        files = rev.get("data", {}) if isinstance(rev, Mapping) else {}
        for path, entry in files.items():
            data = entry.get("data") if isinstance(entry, Mapping) else None
            if not isinstance(data, Mapping):
                continue
            variant = PurePosixPath(path.replace("\\", "/")).parent.name or path
            numbers = {k: float(v) for k, v in data.items() if isinstance(v, int | float) and not isinstance(v, bool)}
            if numbers:
                out[variant] = numbers
    return out


def headline(metrics: Mapping[str, Mapping[str, float]], key: str = "accuracy") -> str:
    """A short summary of one metric over the variants: ``accuracy 0.912`` or ``accuracy 0.35-0.98 (7 variants)``."""
    values = [m[key] for m in metrics.values() if key in m and math.isfinite(m[key])]
    if not values:
        return f"no {key}"
    if len(values) == 1:
        return f"{key} {values[0]:.4g}"
    return f"{key} {min(values):.3g}-{max(values):.3g} ({len(values)} variants)"


def comparison_table(
    experiments: Sequence[Experiment], metrics: Mapping[str, Mapping[str, Mapping[str, float]]], keys: Sequence[str]
) -> str:
    """A Markdown table, a row per experiment and variant (``did not land``: not in ``metrics``), with the params
    that differ and ``keys``; the params the same in every experiment are named below it."""
    params = list(dict.fromkeys(k for exp in experiments for k in exp.overrides))  # in order, each once
    values = {k: {e.overrides.get(k) for e in experiments} for k in params}
    changed = [k for k in params if len(values[k]) > 1 or len(experiments) == 1]
    shown = [k for k in keys if any(k in m for exp in metrics.values() for m in exp.values())]
    rows = [["experiment", *changed, "variant", *shown], ["---"] * (len(changed) + len(shown) + 2)]
    for exp in experiments:
        row = [exp.name, *(exp.overrides.get(k, "") for k in changed)]
        variants = sorted(metrics.get(exp.name, {"did not land": {}}).items())
        rows += [[*row, variant, *(f"{m[k]:.4g}" if k in m else "" for k in shown)] for variant, m in variants]
    lines = ["| " + " | ".join(row) + " |" for row in rows]
    same = [f"{k}={next(iter(values[k]))}" for k in params if k not in changed]
    return "\n".join(lines + (["Same in every experiment: " + ", ".join(same)] if same else []))
