"""The sweep report: every seed's escape epoch and its forecast across a sweep's experiments.

``python -m pipeline.sweep.report <sweep id>`` (also run at a sweep's end) reads each experiment's commit and
writes ``sweeps/<sweep id>/`` (index.html, a PNG per variant, seeds.csv), then logs it to one MLflow run.
"""

from __future__ import annotations

import argparse
import html
import io
import json
import logging
import re
import sys
from base64 import b64encode
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from pandas.api.types import is_numeric_dtype

from pipeline import cli, history, params, tracking
from pipeline.outputs import staged_dir
from pipeline.sweep.spec import SweepError
from pipeline.sweep.workspace import exp_refs, git, workspace_root

log = logging.getLogger("pipeline.sweep.report")
SOURCE = "pipeline.sweep.report"  # the report run's mlflow.source.name, beside the sweep's tag
SEED_COLUMNS = ["seed", "escape_epoch", "censored", "epochs", "forecast", "accuracy", "test_accuracy"]
MARKERS = (("escape epoch", "o"), ("censored: epochs trained", "^"), ("forecast", "x"))


def experiment_refs(root: Path, sweep_id: str, names: Sequence[str] | None = None) -> dict[str, str]:
    """``{name: ref}`` of the sweep's DVC experiments in ``root``, sorted: ``names``, or every ``<sweep_id>-<k>``."""
    refs = exp_refs(root, ".")
    ours = [n for n in refs if re.fullmatch(rf"{re.escape(sweep_id)}-\d+", n)]
    wanted = ours if names is None else list(names)
    missing = [n for n in wanted if n not in refs] or ([] if wanted else [f"{sweep_id}-<k>"])
    if missing:
        why = f"No DVC experiment {', '.join(missing)} in {root}: dvc exp show lists them"
        fetch = "python -m pipeline.sweep.workspace --git-remote origin <names>"
        raise SweepError(f"{why}; those of a cluster sweep come with {fetch}.")
    return {n: refs[n] for n in sorted(wanted)}


def seed_table(table: pd.DataFrame, plateau: float, margin: float, forecast_epochs: int) -> pd.DataFrame:
    """Per seed of one variant's history: escape epoch (NaN when censored), ``censored``, ``epochs`` trained,
    forecast, final training and test accuracy."""
    last = history.final_rows(table)[["seed", "epoch", "accuracy", "test_accuracy"]]
    escapes = history.escape_epochs(table, plateau, margin)[["seed", "escape_epoch", "censored"]]
    seeds = escapes.merge(history.escape_forecasts(table, forecast_epochs, plateau, margin), on="seed")
    return seeds.merge(last.rename(columns={"epoch": "epochs"}), on="seed")[SEED_COLUMNS]


def read_experiment(root: Path, ref: str) -> tuple[dict[str, Any], dict[str, pd.DataFrame]]:
    """An experiment's params and :func:`seed_table` of each variant, with the thresholds its metrics.json records."""
    values = yaml.safe_load(git(["show", f"{ref}:params.yaml"], root)) or {}
    grid = params.parse(params.GridParams, values.get("grid") or {}, "grid").expand()
    names = ["-".join(map(str, v.model_dump().values())) for v in grid] + list(values.get("remedies") or {})
    variants = {}
    for name in names:
        frame = pd.read_csv(io.StringIO(git(["show", f"{ref}:results/{name}/history.csv"], root)))
        metrics = json.loads(git(["show", f"{ref}:results/{name}/metrics.json"], root))
        variants[name] = seed_table(frame, metrics["plateau"], metrics["escape_margin"], metrics["forecast_epochs"])
    return values, variants


def sweep_table(loaded: Mapping[str, tuple[dict[str, Any], dict[str, pd.DataFrame]]]) -> tuple[pd.DataFrame, list[str]]:
    """The tidy table, a row per (experiment, swept params..., variant, seed), and the swept params (those that
    differ between the experiments); ``loaded``: :func:`read_experiment`'s."""
    flat = {name: pd.json_normalize(values, sep=".").to_dict("records")[0] for name, (values, _) in loaded.items()}
    flat = {name: {k: json.dumps(v) if isinstance(v, list) else v for k, v in f.items()} for name, f in flat.items()}
    keys = list(dict.fromkeys(k for f in flat.values() for k in f))
    swept = [k for k in keys if len({json.dumps(f.get(k)) for f in flat.values()}) > 1]
    frames = [
        seeds.assign(experiment=name, **{k: flat[name].get(k) for k in swept}, variant=variant)
        for name, (_, variants) in loaded.items()
        for variant, seeds in variants.items()
    ]
    return pd.concat(frames, ignore_index=True)[["experiment", *swept, "variant", *SEED_COLUMNS]], swept


def summary_table(table: pd.DataFrame, swept: Sequence[str]) -> pd.DataFrame:
    """Per experiment and variant: the means and counts that the page's text lists."""
    table = table.assign(forecast_abs_error=(table["forecast"] - table["escape_epoch"]).abs())
    groups = table.groupby(["variant", "experiment", *swept], sort=False, dropna=False)
    means = {c: (c, "mean") for c in ("escape_epoch", "forecast", "forecast_abs_error", "accuracy", "test_accuracy")}
    std = ("escape_epoch", lambda s: s.std(ddof=0))
    summary = groups.agg(seeds=("seed", "size"), escaped=("escape_epoch", "count"), **means, escape_std=std)
    return summary.reset_index().sort_values("variant", kind="stable")


def escape_figure(table: pd.DataFrame, swept: Sequence[str], variant: str) -> Figure:
    """A panel per swept param: each seed's escape epoch, censoring epoch and forecast against the param's value,
    a colour per value of the other swept params."""
    rows = table[table["variant"] == variant]
    axes_of = list(swept) or ["experiment"]
    fig = Figure(figsize=(1.0 + 4.6 * len(axes_of), 4.6), layout="constrained")
    axes = fig.subplots(1, len(axes_of), sharey=True, squeeze=False)[0]
    for ax, param in zip(axes, axes_of, strict=True):
        levels = sorted(rows[param].unique(), key=None if is_numeric_dtype(rows[param]) else str)
        others = [p for p in swept if p != param]
        groups = list(rows.groupby(others, sort=True, dropna=False)) if others else [((), rows)]
        width = 0.7 / len(groups)
        for g, (key, group) in enumerate(groups):
            by_level = group.groupby(param, sort=False, dropna=False)
            spread = (by_level.cumcount() + 0.5) / by_level["seed"].transform("size") - 0.5  # seeds side by side
            x = group[param].map(levels.index) + (g - (len(groups) - 1) / 2 + 0.8 * spread) * width
            colour, done = f"C{g % 10}", ~group["censored"]
            label = ", ".join(f"{p}={v}" for p, v in zip(others, key, strict=True)) or None  # key: a tuple
            ax.scatter(x[done], group.loc[done, "escape_epoch"], s=18, color=colour, label=label)
            ax.scatter(x[~done], group.loc[~done, "epochs"], s=30, marker="^", facecolors="none", edgecolors=colour)
            ax.scatter(x, group["forecast"], s=24, marker="x", color=colour, linewidths=1)
        ax.set(xticks=range(len(levels)), xticklabels=[str(v) for v in levels], xlim=(-0.5, len(levels) - 0.5))
        ax.set(xlabel=param, ylabel="epoch (log)", yscale="log")  # every epoch and forecast is >= 1
        if others:
            ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), fontsize="small", ncol=2, frameon=False)
    key = [Line2D([], [], ls="", marker=m, mfc="none" if m == "^" else None, color="0.3", label=t) for t, m in MARKERS]
    fig.legend(handles=key, loc="outside lower center", ncol=3, fontsize="small", frameon=False)
    fig.suptitle(f"{variant}: escape epoch of every seed")
    return fig


def page_html(sweep_id: str, table: pd.DataFrame, swept: Sequence[str], pngs: Mapping[str, bytes]) -> str:
    """The self-contained page: what was swept, the summary per experiment and variant, the figures."""
    numbers = summary_table(table, swept).to_html(index=False, na_rep="–", float_format=lambda v: f"{v:.4g}")
    images = "".join(f'<img alt="{n}" src="data:image/png;base64,{b64encode(p).decode()}">' for n, p in pngs.items())
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>Sweep {html.escape(sweep_id)}</title><style>
body{{font-family:sans-serif;max-width:1200px;margin:1em auto}}img{{max-width:100%}}table{{border-collapse:collapse}}
td,th{{padding:2px 8px;border-bottom:1px solid #ccc;white-space:nowrap}}</style></head><body><h1>Sweep \
{html.escape(sweep_id)}</h1><p>{table["experiment"].nunique()} experiment(s), {table["variant"].nunique()} \
variant(s), {len(table)} seed(s); swept: {html.escape(", ".join(swept) or "nothing")}. Escape epoch: the first \
epoch whose training accuracy exceeds the plateau (the accuracy of the constant predictor of the training labels) \
by more than <code>summary.escape_margin</code>; a censored seed had not escaped by its last epoch. Forecast: the \
escape epoch predicted from the first <code>summary.forecast_epochs</code> epochs (docs/science.md). Figures: dots, \
escape epochs; open triangles, censored seeds at their last epoch; crosses, forecasts.</p>{images}<p>Per variant \
and experiment: seeds escaped, escape epoch over those (mean, std), forecast (mean), |forecast − escape epoch| \
(mean where both exist), final training and test accuracy (mean). Every seed: <a href="seeds.csv">seeds.csv</a>.\
</p>{numbers}
</body></html>
"""


def write_report(folder: Path, sweep_id: str, table: pd.DataFrame, swept: Sequence[str]) -> None:
    """``seeds.csv``, ``escape-<variant>.png`` per variant and ``index.html`` in ``folder``."""
    table.to_csv(folder / "seeds.csv", index=False)
    for variant in dict.fromkeys(table["variant"]):
        escape_figure(table, swept, variant).savefig(folder / f"escape-{variant}.png", dpi=100)
    pngs = {png.name: png.read_bytes() for png in sorted(folder.glob("escape-*.png"))}
    (folder / "index.html").write_text(page_html(sweep_id, table, swept, pngs), encoding="utf-8")


def publish(folder: Path, sweep_id: str, root: Path, experiment: str) -> None:
    """Log ``folder`` as one run tagged with the sweep, then delete the sweep's earlier report runs."""
    uri = tracking.tracking_uri(root)
    try:
        tracking.preflight(uri)
        client = tracking.open_store(uri)
        experiment_id = tracking.ensure_experiment(client, experiment, root)
        mine = f"tags.`{tracking.SWEEP_TAG}` = '{sweep_id}' and tags.`mlflow.source.name` = '{SOURCE}'"
        earlier = client.search_runs([experiment_id], mine)
        note = f"The report of sweep {sweep_id}: index.html in this run's artifacts."
        tags = {tracking.SWEEP_TAG: sweep_id, "mlflow.source.name": SOURCE, tracking.NOTE_TAG: note}
        with tracking.run_set(client, experiment_id, [f"sweep-report {sweep_id}"], tags) as runs:
            client.log_artifacts(runs.run_ids[0], str(folder))
        for run in earlier:
            client.delete_run(run.info.run_id)
    except Exception as exc:  # MLflow, SQLAlchemy and HTTP errors alike: one clear line
        raise SweepError(
            f"Publishing the sweep report to MLflow at {tracking.redact(uri)} failed ({exc}); the page is kept in "
            f"{folder}. Fix the store, then rerun: python -m pipeline.sweep.report {sweep_id}"
        ) from exc


def build_sweep_report(sweep_id: str, root: Path, experiments: Sequence[str]) -> Path:
    """Write ``<root>/sweeps/<sweep_id>/`` from ``experiments`` (every ``<sweep_id>-<k>`` when empty) and publish it.
    SweepError before anything is written when an experiment cannot be read, or when publishing fails."""
    loaded = {}
    for name, ref in experiment_refs(root, sweep_id, list(experiments) or None).items():
        try:
            loaded[name] = read_experiment(root, ref)
        except (KeyError, ValueError, params.ParamsError) as exc:
            why = exc if isinstance(exc, ValueError) else f"no {exc}"
            raise SweepError(f"Experiment {name} ({ref}) cannot be reported: {why}") from exc
    table, swept = sweep_table(loaded)
    folder = root / "sweeps" / sweep_id
    with staged_dir(folder) as tmp:
        write_report(tmp, sweep_id, table, swept)
    first = next(iter(loaded.values()))[0].get("tracking") or {}
    publish(folder, sweep_id, root, first.get("experiment") or params.TrackingParams().experiment)
    return folder


def main(argv: Sequence[str] | None = None) -> int:
    """Build and publish one sweep's report; 1 with one error line when that fails."""
    parser = argparse.ArgumentParser(prog="python -m pipeline.sweep.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_id", help="the sweep's id: its experiments are <sweep id>-<k> (dvc exp show)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=cli.LOG_FORMAT)
    try:
        folder = build_sweep_report(args.sweep_id, workspace_root(Path.cwd()), [])
    except SweepError as exc:
        log.error("%s", exc)
        return 1
    log.info("sweep report: %s and MLflow; git add -f sweeps/%s keeps it", folder / "index.html", args.sweep_id)
    return 0


if __name__ == "__main__":
    sys.exit(main())
