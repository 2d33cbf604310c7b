"""Publish stage: the report and the study's numbers into MLflow. The page itself is the report stage's.

One run named ``report`` holds ``reports/`` and the results table; each variant's run gets its figures, its
``metrics.json`` as ``summary/<key>``, its report colour and a relative link to the report; the study's view
of the runs page is saved. ``--out`` is written once all of it is done: a failure changes no file.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import cli, figures, report, serve, tracking
from pipeline.outputs import write_text_atomic
from pipeline.params import TrackingParams, load_section

log = logging.getLogger(__name__)

STAGE, RUN_NAME = "publish", "report"  # serve.find_study opens the view of the latest run named "report"
REPORT_LINE = "The study's report:"  # the line of a variant run's description that links the latest report
COLOR_TAG = "mlflow.runColor"  # the MLflow UI draws a run in this colour (hex) in its charts and table


def publish(uri: str, experiment: str, params_file: Path, results: Path, pages: Path) -> dict[str, str]:
    """Log the report and update the study's variant runs in the store at ``uri``; returns the record."""
    study = report.study_names(load_section("grid", params_file), load_section("remedies", params_file))
    colors = figures.variant_colors(study)
    variants = {name: report.read_json(results / name / "run.json") for name in study}
    metrics = {name: report.read_json(results / name / "metrics.json") for name in study}
    table = (pages / "summary.md").read_text(encoding="utf-8").split("\n", 2)[2]  # without its title
    root = tracking.project_root()
    client = tracking.open_store(uri)
    experiment_id = tracking.ensure_experiment(client, experiment, root)
    ours = {name: run for name, run in variants.items() if run.get("tracking_uri") == tracking.redact(uri)}
    for name in sorted(set(variants) - set(ours)):
        log.info("%s: its runs are not in %s; they get no figures, summary or colour there", name, uri)
    with tracking.run_set(client, experiment_id, [RUN_NAME], tracking.lineage_tags(root, STAGE, params_file)) as runs:
        report_id = runs.run_ids[0]
        link = serve.ui_path(experiment_id, f"runs/{report_id}/artifacts")  # relative, in Model training mode
        note = f"The study's front page: **[index.html]({link})** in this run's artifacts.\n\n{table}"
        client.set_tag(report_id, tracking.NOTE_TAG, note)
        client.log_artifacts(report_id, str(pages))
        for name, run in ours.items():
            update_variant_run(client, name, run, metrics[name], colors[name], pages, link)
        save_study_view(client, experiment_id, report_id, ours.values(), max(v.depth for v in study.values()))
        runs.stop.check()  # a signal during the upload: the run ends KILLED and no record is written
    return {"tracking_uri": tracking.redact(uri), "experiment_id": experiment_id, "report_run": report_id}


def update_variant_run(
    client: Any, name: str, run: Mapping[str, Any], metrics: Mapping[str, Any], color: str, pages: Path, link: str
) -> None:
    """The variant's parent run gets its figures, ``summary/<key>`` metrics (NaN for null) and the report's
    link in its description; it and its seed runs get the variant's colour."""
    from mlflow.entities import Metric

    parent = str(run["parent_run"])
    for png in (pages / f"{kind}-{name}.png" for kind in report.VARIANT_FIGURES):
        if png.is_file():
            client.log_artifact(parent, str(png), "figures")
    now = int(time.time() * 1000)
    values = [Metric(f"summary/{k}", np.nan if v is None else float(v), now, 0) for k, v in metrics.items()]
    client.log_batch(parent, metrics=values, synchronous=True)
    for run_id in (parent, *(run.get("runs") or {}).values()):
        client.set_tag(str(run_id), COLOR_TAG, color)
    note = client.get_run(parent).data.tags.get(tracking.NOTE_TAG, "").split(REPORT_LINE)[0].rstrip()
    client.set_tag(parent, tracking.NOTE_TAG, f"{note}\n\n{REPORT_LINE} [index.html]({link}).")


def save_study_view(client: Any, experiment_id: str, report_id: str, runs: Any, depth: int) -> None:
    """The MLflow UI's shared view of this study (``make ui`` prints its link; see :mod:`pipeline.serve`)."""
    ids = [str(i) for run in runs for i in (run["parent_run"], *(run.get("runs") or {}).values())]  # not the report's
    view = json.dumps(serve.study_view(ids, depth))
    if len(view) > serve.MAX_VIEW_CHARS:
        log.warning(
            "the study has too many runs for one MLflow view (%d characters); make ui opens the table", len(view)
        )
        return
    client.set_experiment_tag(experiment_id, serve.SHARED_VIEW_TAG + serve.view_key(report_id), view)


def _stage(args: argparse.Namespace, tp: TrackingParams) -> None:
    uri = tracking.tracking_uri()
    tracking.preflight(uri)
    try:
        record = publish(uri, tp.experiment, Path(args.params), args.results, args.report)
    except Exception as exc:  # any failure, the run already marked FAILED: one clear line (the traceback: debug)
        log.debug("publishing failed", exc_info=True)
        raise tracking.TrackingError(
            f"publishing {args.report} to MLflow at {uri} failed: {exc}. The report in {args.report} is intact; "
            "once the store works, rerun `dvc repro publish`"
        ) from exc
    write_text_atomic(args.out, json.dumps(record, indent=2) + "\n")
    log.info("publish: %s -> MLflow run %s (experiment %s)", args.report, record["report_run"], tp.experiment)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the stage; 0 on success, 1 on a known failure, 128 + n on signal n (the run ends KILLED)."""
    parser = argparse.ArgumentParser(prog="python -m pipeline.publish", description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=Path("results"), help="folder of variant results")
    parser.add_argument("--report", type=Path, default=Path("reports"), help="the report stage's folder")
    parser.add_argument("--out", type=Path, default=Path("published.json"), help="record of what was published")
    try:
        return cli.run_stage(parser, "tracking", _stage, (tracking.TrackingError, OSError), argv)
    except tracking.RunInterrupted as exc:
        log.error("publish: interrupted (%s): the report run is marked KILLED; the report is intact", exc)
        return exc.exit_status


if __name__ == "__main__":
    raise SystemExit(main())
