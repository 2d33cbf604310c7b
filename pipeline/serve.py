"""``python -m pipeline.serve ui|server``: the MLflow UI over the project's store, or a tracking server.

Both bind 127.0.0.1 unless told otherwise, refuse a busy port, print the link to the experiment's
training runs, and run MLflow in its own process group, so that Ctrl-C, SIGTERM, SIGHUP or the death
of the parent ``make`` stops all of its workers. The server proxies artifacts: clients need only its URL.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import types
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence

from pipeline import tracking
from pipeline.params import ParamsError, TrackingParams, load_section

log = logging.getLogger("pipeline.serve")

SERVER_DIR = "mlserver"
# MLflow's default is 4 uvicorn workers of some 250 MB each; 2 serve one user's pipeline, and 1 one
# person's browser (on 2 cores it answers in about 7 s where 4 take 13 s).
SERVER_WORKERS, UI_WORKERS = 2, 1


# MLflow 3.17's UI keeps a runs page's state (search, sorting, charts and their order) in a
# "shared view": an experiment tag mlflow.sharedViewState.<key> holding the state as JSON, opened
# by ?viewStateShareKey=<key>. Read from its bundle (server/js/build): the key constants, the reader
# (which ignores the view when the URL also carries search parameters such as searchFilter, and
# drops runsPinned, runsHidden and runsVisibilityMap: a view cannot hide one run) and the chart and
# section fields. Its default chart order puts metrics without a "/" section ("Model metrics")
# after every named section, so without a view the first charts would be act_mean/..., not accuracy.
# A chart card's legend is 32 px tall (two lines, two or three runs); its full screen lists every run.
SHARED_VIEW_TAG = "mlflow.sharedViewState."
MODEL_METRICS = "Model metrics"  # the UI's section of metrics with no "/" in their key
STORY = ("accuracy", "test_accuracy", "loss", "test_loss")
LAYER_STORY = ("grad_bias", "grad", "weight_change")  # per-layer sections, in this order after the first
LEGEND_HINT = "all runs: run list, full screen"  # in each section's name: where every run's colour is
MAX_VIEW_CHARS = 19_000  # MLflow limits an experiment tag's value to 20,000 characters


def view_key(report_run_id: str) -> str:
    """The shared view's key for the study a report run describes."""
    return f"study-{report_run_id}"


def study_view(run_ids: Sequence[str], depth: int) -> dict[str, object]:
    """The runs page of one study's variant runs ``run_ids`` (not the report's run, which has no metrics
    and would head every legend), in chart view, two charts a row: accuracy and loss first, then each
    hidden layer's ‖∂C/∂b‖, kernel gradient and weight change, every visible run charted."""
    groups = [(MODEL_METRICS, list(STORY))]
    groups += [(kind, [f"{kind}/hidden_{i}" for i in range(1, depth + 1)]) for kind in LAYER_STORY]
    sections, charts = [], []
    for n, (name, keys) in enumerate(groups):
        section = f"section-{n}"
        sections.append(
            {"uuid": section, "name": f"{name} · {LEGEND_HINT}", "display": True, "isReordered": True,
             "deleted": False, "columns": 2}
        )  # fmt: skip
        charts += [_line_chart(f"{section}-{i}", section, key) for i, key in enumerate(keys)]
    listed = ", ".join(f"'{run_id}'" for run_id in run_ids)
    return {
        "searchFilter": f"attributes.run_id IN ({listed})",
        "orderByKey": "attributes.start_time",  # the UI nests seeds under their variant only in this order
        "orderByAsc": False,
        "runsHiddenMode": "SHOW_ALL",
        "compareRunCharts": charts,
        "compareRunSections": sections,
        "isAccordionReordered": True,  # keep this order; sections of other metrics follow
    }


def _line_chart(uuid: str, section: str, key: str) -> dict[str, object]:
    """A line chart card over epochs (the fields of the UI's own LINE card)."""
    return {
        "uuid": uuid,
        "type": "LINE",
        "runsCountToCompare": 10,
        "metricSectionId": section,
        "deleted": False,
        "isGenerated": True,
        "metricKey": key,
        "displayName": key,
        "lineSmoothness": 0,
        "xAxisScaleType": "linear",
        "scaleType": "log" if key.startswith(LAYER_STORY) else "linear",
        "range": {},
        "xAxisKey": "step",
        "selectedXAxisMetricKey": "",
        "yAxisKey": "metric",
        "yAxisExpressions": [],
        "ignoreOutliers": False,
        "useGlobalXaxisKey": True,
        "useGlobalLineSmoothing": True,
    }


def ui_path(experiment_id: str, page: str = "runs", **query: str) -> str:
    """A page of the UI (``runs``, ``runs/<run id>/artifacts/<path>``, ``models``...) in Model training
    mode, as a link relative to the UI that shows it: usable as is in MLflow descriptions."""
    query = {"workflowType": "machine_learning", **query}
    return f"#/experiments/{experiment_id}/{page}?{urllib.parse.urlencode(query)}"


def runs_link(base_url: str, experiment_id: str | None, view: str | None = None) -> str:
    """Link to an experiment's training runs (or the UI root); with ``view``, that shared view's charts."""
    base = base_url.rstrip("/") + "/"
    if not experiment_id:
        return base
    return base + ui_path(experiment_id, **({"viewStateShareKey": view, "compareRunsMode": "CHART"} if view else {}))


def find_study(store_uri: str, name: str) -> tuple[str | None, str | None, str | None]:
    """The id of experiment ``name``, its latest report run and that run's shared view; None for each
    until the store has it (a viewer must start even on a new store, or one that cannot be searched)."""
    exp_id = report_id = view = None
    with contextlib.suppress(Exception):
        client = tracking.open_store(store_uri)
        experiment = client.get_experiment_by_name(name)
        if experiment is not None:
            exp_id = str(experiment.experiment_id)
            (report,) = client.search_runs(
                [exp_id], "attributes.run_name = 'report'", order_by=["attributes.start_time DESC"], max_results=1
            )
            report_id, key = report.info.run_id, view_key(report.info.run_id)
            view = key if SHARED_VIEW_TAG + key in experiment.tags else None
    return exp_id, report_id, view


def mlflow_command(
    mode: str, store: str, host: str, port: int, workers: int, artifacts: str | None = None
) -> list[str]:
    """``mlflow ui`` or ``mlflow server`` (the same command in MLflow 3) over ``store``; given ``artifacts``,
    it proxies that artifact store, so that clients never touch it."""
    command = [
        sys.executable, "-m", "mlflow", mode, "--backend-store-uri", store,
        "--host", host, "--port", str(port), "--workers", str(workers),
    ]  # fmt: skip
    if artifacts:
        command += ["--artifacts-destination", artifacts, "--serve-artifacts"]
    return command


def port_free(host: str, port: int) -> bool:
    """Whether ``host:port`` can be bound now (another server there would answer our health check)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def wait_until_up(url: str, process: subprocess.Popen[bytes], timeout_s: float = 180.0) -> bool:
    """Poll ``url``/health until it answers 200, the process dies, or ``timeout_s`` passes."""
    health, deadline = url.rstrip("/") + "/health", time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        with contextlib.suppress(OSError), urllib.request.urlopen(health, timeout=2) as resp:  # noqa: S310 (our loopback URL)
            if resp.status == 200:
                return True
        time.sleep(0.3)
    return False


def stop_group(process: subprocess.Popen[bytes], grace_s: float = 10.0) -> None:
    """Terminate MLflow and every worker it started: its process group, which outlives MLflow if it crashed."""
    with contextlib.suppress(ProcessLookupError):  # raised once the whole group has exited
        os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            process.poll()  # reap MLflow itself: a zombie still counts as a member of the group
            os.killpg(process.pid, 0)
            time.sleep(0.1)
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def _raise_interrupt(signum: int, frame: types.FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _die_with_parent() -> None:
    """On Linux, receive SIGTERM when the parent dies: ``make`` killed by SIGTERM does not pass it on."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def child_env(environ: Mapping[str, str]) -> dict[str, str]:
    """MLflow's GenAI job runner (some seven processes of 250 MB, unused here) stays off unless asked for."""
    return {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **environ}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipeline.serve", description=__doc__.splitlines()[0])
    p.add_argument("mode", choices=["ui", "server"])
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--backend-store-uri", default=None, help="server: SQL backend (default: mlserver/mlflow.db)")
    p.add_argument("--artifacts-destination", default=None, help="server: artifact store (default: mlserver/artifacts)")
    p.add_argument(
        "--workers", type=int, default=SERVER_WORKERS, help="server: worker processes (default: %(default)s)"
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parser().parse_args(argv)
    try:
        track: TrackingParams = load_section("tracking", args.params)
    except ParamsError as exc:
        log.error("%s", exc)
        return 1
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("binding %s exposes the store to the network; MLflow has no authentication here", args.host)
    root = tracking.project_root()
    host = f"[{args.host}]" if ":" in args.host else args.host
    base = f"http://{host}:{args.port}"
    if args.mode == "ui":
        store, artifacts, workers = tracking.tracking_uri(root), None, UI_WORKERS
        if store.startswith(("http://", "https://")):
            log.error("MLFLOW_TRACKING_URI is the server %s: open it in a browser (it is its own UI)", store)
            return 1
        if store.startswith("sqlite:///") and not tracking.sqlite_path(store).exists():
            log.error("no MLflow store at %s yet: run `make repro` first", store)
            return 1
    else:
        store = args.backend_store_uri or f"sqlite:///{root / SERVER_DIR / 'mlflow.db'}"
        artifacts = args.artifacts_destination or str(root / SERVER_DIR / "artifacts")
        workers = args.workers
    if not port_free(args.host, args.port):
        log.error(
            "%s:%s is already in use (another MLflow?): stop it or pick another port (PORT=5001)", host, args.port
        )
        return 1
    if artifacts:
        log.info("Starting MLflow tracking server: store %s, artifacts %s", tracking.redact(store), artifacts)
    command = mlflow_command(args.mode, store, args.host, args.port, workers, artifacts)
    previous = {sig: signal.signal(sig, _raise_interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    _die_with_parent()
    process = subprocess.Popen(command, env=child_env(os.environ), start_new_session=True)
    try:
        # The project's store is searched while MLflow starts; a server's, through it once it is up.
        study = find_study(store, track.experiment) if args.mode == "ui" else None
        if not wait_until_up(base, process):
            log.error("MLflow did not start on %s; see its messages above", base)
            return 1
        if args.mode == "server":
            log.info("Tracking server: %s\nLog the pipeline to it with:  MLFLOW_TRACKING_URI=%s make repro", base, base)
        exp_id, report_id, view = study or find_study(base, track.experiment)
        log.info("Training runs: %s", runs_link(base, exp_id, view))
        if report_id:
            log.info("Report: %s/%s", base, ui_path(exp_id, f"runs/{report_id}/artifacts/index.html"))
        log.info(
            'Runs and models open in MLflow\'s GenAI mode until "Model training" is picked at the top left of'
            " %s/#/experiments (once per browser).\n(Ctrl-C to stop)",
            base,
        )
        return process.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        stop_group(process)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    raise SystemExit(main())
