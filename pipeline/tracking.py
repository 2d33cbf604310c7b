"""Where the MLflow store is, how runs start and end, and lineage tags.

The default store is ``sqlite:///<root>/mlflow.db`` (``MLFLOW_TRACKING_URI`` overrides it), artifacts
in ``<root>/mlartifacts``; the root of a ``dvc exp run --queue`` copy is its workspace.
"""

from __future__ import annotations

import contextlib
import getpass
import hashlib
import json
import logging
import os
import signal
import socket
import subprocess
import threading
import time
import types
import urllib.parse
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

log = logging.getLogger(__name__)
T = TypeVar("T")

STORE_FILE = "mlflow.db"
ARTIFACT_DIR = "mlartifacts"
EXPS_TMP = "/.dvc/tmp/exps/"  # where `dvc exp run --queue` copies the workspace to run stages
EXECUTION_ENV = "PIPELINE_EXECUTION"
EXECUTION_TAG = "pipeline.execution"
SWEEP_ENV = "PIPELINE_SWEEP"
SWEEP_TAG = "pipeline.sweep"
GROUP_TAG = "pipeline.group"
PARENT_TAG = "mlflow.parentRunId"  # MLflow's nesting: the UI shows the seeds under their variant
NOTE_TAG = "mlflow.note.content"  # a run's Markdown description in the UI
# MLflow's own kind of experiment (what the UI's kind selector writes): model training, not GenAI. In 3.17 it
# decides only the experiment page's mode; links carry workflowType=machine_learning (serve.ui_path).
KIND_TAG, KIND = "mlflow.experimentKind", "custom_model_development"


class TrackingError(RuntimeError):
    """The tracking store cannot be used; the message says what to do."""


class RunInterrupted(BaseException):
    """Training stopped on a signal (SIGINT, SIGTERM, SIGHUP): the runs end KILLED."""

    def __init__(self, signum: int, finished: bool = False) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum
        self.finished = finished  # it came after the runs had ended FINISHED
        self.exit_status = 128 + signum  # the shell's convention for a process stopped by a signal


class StopSignals:
    """Defers SIGINT, SIGTERM and SIGHUP to :meth:`check`, called at every epoch end and before outputs
    are committed; a second signal raises at once, for a process stuck where it never checks.

    Python raises a signal's exception wherever the main thread is: inside TensorFlow's Python layers that
    left the runtime corrupted under stress (it trained on, or aborted with a glibc heap error).
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self) -> None:
        self.signum: int | None = None

    def _handle(self, signum: int, frame: types.FrameType | None) -> None:
        if self.signum is not None:
            raise RunInterrupted(signum)
        self.signum = signum

    def check(self) -> None:
        """Raise :class:`RunInterrupted` when a signal has arrived."""
        if self.signum is not None:
            raise RunInterrupted(self.signum)

    @contextmanager
    def installed(self) -> Iterator[StopSignals]:
        """Handle the signals for the duration (in the main thread: stages and tests run there)."""
        previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def project_root(start: str | Path | None = None) -> Path:
    """``start`` (default: ``DVC_ROOT``, which DVC sets for every stage, else cwd), or the workspace
    that a DVC experiment copy under ``.dvc/tmp/exps`` belongs to."""
    path = Path(start or os.environ.get("DVC_ROOT") or Path.cwd()).resolve()
    workspace, in_copy, _ = f"{path}/".partition(EXPS_TMP)
    return Path(workspace) if in_copy else path


def tracking_uri(root: str | Path | None = None) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else the project's SQLite store ``sqlite:///<absolute root>/mlflow.db``."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_root(root) / STORE_FILE}"


def preflight(uri: str, timeout_s: float = 5.0, attempts: int = 3) -> None:
    """Before any training, raise :class:`TrackingError` naming ``uri`` and the remedy if its store
    cannot be used. A server gets ``attempts`` requests of ``timeout_s`` each, not MLflow's minutes
    of retries; a missing SQLite store is left for :func:`open_store` to create, so a failing stage
    leaves none."""
    if uri.startswith(("http://", "https://")):
        _check_server(uri, timeout_s, attempts)
        return
    if uri.startswith("sqlite:///"):
        path = sqlite_path(uri)
        if not path.parent.is_dir() or not os.access(path.parent, os.W_OK):
            raise TrackingError(f"MLflow store {uri}: folder {path.parent} is missing or not writable.")
        if path.exists():
            open_store(uri)
        return
    # Another database (or a file store, which MLflow refuses): MLflow retries a connection for minutes.
    errors: list[BaseException] = []

    def target() -> None:
        try:
            open_store(uri)
        except BaseException as exc:  # noqa: BLE001 - raised below, in the caller's thread
            errors.append(exc)

    thread = threading.Thread(target=target, name="mlflow-preflight", daemon=True)
    thread.start()
    thread.join(timeout_s * attempts)
    if thread.is_alive():
        raise TrackingError(
            f"MLflow store {uri} did not answer within {timeout_s * attempts:g} s; check MLFLOW_TRACKING_URI."
        )
    if errors:
        raise errors[0]


_SERVER_HELP = "Start it (make server), fix MLFLOW_TRACKING_URI, or unset it to use the local SQLite store."


def _check_server(uri: str, timeout_s: float, attempts: int) -> None:
    """One bounded request to the tracking API with MLflow's own credentials and TLS settings
    (``MLFLOW_TRACKING_USERNAME``, ``_TOKEN``, ``_SERVER_CERT_PATH``...).

    MLflow's ``http_request``, not ``MlflowClient``: the client reads its timeout and retries only from
    process-wide variables (``MLFLOW_HTTP_REQUEST_*``, minutes by default), and reports every HTTP
    status alike."""
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    endpoint = "/api/2.0/mlflow/experiments/search"
    bounds = {"max_retries": attempts - 1, "backoff_factor": 0.5, "backoff_jitter": 0.0, "timeout": timeout_s}
    retry_log = logging.getLogger("urllib3.connectionpool")
    level = retry_log.level
    retry_log.setLevel(logging.ERROR)  # one clear message below instead of a warning per retry
    try:
        creds = get_default_host_creds(uri)
        response = http_request(creds, endpoint, "GET", params={"max_results": 1}, raise_on_status=False, **bounds)
    except Exception as exc:  # noqa: BLE001 - connection refused, DNS, TLS, timeouts: all mean "not reachable"
        # MLflow folds the requests/urllib3 error into its message: its gist is found there.
        message = str(exc).strip()
        gists = (
            ("connection refused", "connection refused (nothing listens on that port)"),
            ("timed out", f"no answer within {timeout_s:g} s"),
            ("failed to resolve", "unknown host name"),  # urllib3 2's wording for every DNS failure
            ("ssl", "TLS error (see MLFLOW_TRACKING_SERVER_CERT_PATH)"),
        )
        why = next((gist for needle, gist in gists if needle in message.lower()), message.splitlines()[0][:300])
        raise TrackingError(
            f"MLflow tracking server {uri} is not reachable: {why} "
            f"({attempts} attempt(s), {timeout_s:g} s each). {_SERVER_HELP}"
        ) from None
    finally:
        retry_log.setLevel(level)
    status = response.status_code
    if status == 200:
        with contextlib.suppress(ValueError):  # answered, but perhaps not with the tracking API's JSON
            response.json()
            return
    if status in (401, 403):
        problem = (
            f"refused the request (HTTP {status}): set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD "
            "(or MLFLOW_TRACKING_TOKEN) for it."
        )
    elif status >= 500:
        problem = f"answered HTTP {status}: its backend store is probably down or misconfigured; see its log."
    else:
        found = f"HTTP {status}" if status != 200 else "a response that is not the tracking API's JSON"
        problem = (
            f"does not look like an MLflow tracking server ({endpoint} gave {found}): check the scheme, host, "
            f"port and path of MLFLOW_TRACKING_URI. {_SERVER_HELP}"
        )
    raise TrackingError(f"MLflow tracking server {uri} {problem}")


def sqlite_path(uri: str) -> Path:
    """The database file of a ``sqlite:///`` URI (query string dropped)."""
    return Path(uri.removeprefix("sqlite:///").split("?", 1)[0])


def open_store(uri: str, lock_timeout_s: float = 300.0) -> Any:
    """An ``MlflowClient`` on an open, usable store, or :class:`TrackingError` naming ``uri``.

    MLflow creates or migrates a schema unguarded, and two processes opening one new SQLite store at once
    (``dvc queue start -j 2``) corrupt each other's migrations: for SQLite that step holds ``<db>-lock``.
    """
    from filelock import FileLock, Timeout
    from mlflow import MlflowClient

    lock: Any = contextlib.nullcontext()
    if uri.startswith("sqlite:///"):
        path = sqlite_path(uri)
        lock = FileLock(path.with_name(path.name + "-lock"), timeout=lock_timeout_s)
    try:
        with lock:
            client = MlflowClient(tracking_uri=uri)
            client.search_experiments(max_results=1)  # builds the store: creates or verifies the schema
    except Timeout:
        raise TrackingError(
            f"MLflow store {uri}: another process has held {lock.lock_file} for over {lock_timeout_s:g} s; "
            "if none is running, delete that file."
        ) from None
    except Exception as exc:  # MLflow and SQLAlchemy raise many kinds, with pages of context: one clear line
        reason = (str(exc).strip() or type(exc).__name__).splitlines()[0]
        raise TrackingError(f"MLflow store {uri} cannot be opened: {reason}") from exc
    return client


def study_digest(code_dir: Path, params_file: Path) -> str:
    """What defines a study: the pipeline's code and the parsed params (comments and layout ignored).
    Not git's view: the stages rewrite committed files (``dvc.lock``), which would split one ``dvc repro``."""
    h = hashlib.sha256()
    for source in sorted(code_dir.glob("*.py")):
        h.update(source.name.encode() + b"\0" + source.read_bytes() + b"\0")
    params = yaml.safe_load(params_file.read_text(encoding="utf-8")) if params_file.is_file() else None
    h.update(json.dumps(params, sort_keys=True, default=str).encode())
    return h.hexdigest()[:12]


def execution_id() -> str:
    """One id per ``dvc repro``, shared by every stage it runs: ``PIPELINE_EXECUTION``, else the
    parent process (stage commands ``exec`` Python, so DVC itself) by its pid and start time."""
    if os.environ.get(EXECUTION_ENV):
        return os.environ[EXECUTION_ENV]
    parent = os.getppid()
    try:
        # Field 22 of /proc/<pid>/stat is the start time; the command name (field 2) may hold spaces.
        started = Path(f"/proc/{parent}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):  # no /proc: each process gets its own id
        return uuid.uuid4().hex[:12]
    return hashlib.sha256(f"{socket.gethostname()}:{parent}:{started}".encode()).hexdigest()[:12]


def lineage_tags(root: Path, stage: str, params_file: str | Path = "params.yaml") -> dict[str, str]:
    """Tags that tie a run to its code, pipeline stage, study and ``dvc repro``."""
    # HEAD's full hash (never a tag's name), "-dirty" when tracked files changed.
    command = ["git", "describe", "--always", "--abbrev=40", "--exclude=*", "--dirty"]
    try:
        described = subprocess.run(command, cwd=root, capture_output=True, text=True, check=True, timeout=10)
        commit = described.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    tags = {
        # MLflow's own tags fill the UI's Source, Version and User columns.
        "mlflow.source.name": stage,
        "mlflow.source.type": "JOB",
        "mlflow.source.git.commit": commit.removesuffix("-dirty"),
        "git.commit": commit,
        "dvc.stage": stage,
        GROUP_TAG: study_digest(Path(__file__).resolve().parent, Path(params_file)),
        EXECUTION_TAG: execution_id(),
    }
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc.exp_name"] = os.environ["DVC_EXP_NAME"]
    if os.environ.get(SWEEP_ENV):  # set by pipeline.sweep for every experiment of one sweep
        tags[SWEEP_TAG] = os.environ[SWEEP_ENV]
    with contextlib.suppress(Exception):  # no user name in some containers: leave the column empty
        tags["mlflow.user"] = getpass.getuser()
    return tags


def redact(uri: str) -> str:
    """``uri`` without a password (``user:secret@host`` -> ``user:***@host``), for files and pages."""
    parts = urllib.parse.urlsplit(uri)
    if parts.password is None:
        return uri
    host = parts.netloc.rsplit("@", 1)[1]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))


# A get-or-create that lost a race with a concurrent twin (two experiments of a sweep logging one
# dataset at once): MLflow's store reads, then inserts, and the second insert breaks a unique key.
_DUPLICATE = ("unique constraint", "duplicate key", "duplicate entry", "already exists")


def race_safe(call: Callable[..., T], *args: Any, attempts: int = 4) -> T:
    """``call(*args)``, retried when it failed only because a concurrent writer created the same
    row first; the retry then finds that row. Any other error is raised at once."""
    for attempt in range(1, attempts):
        try:
            return call(*args)
        except Exception as exc:
            if not any(d in str(exc).lower() for d in _DUPLICATE):
                raise
            time.sleep(0.05 * attempt)
    return call(*args)


def ensure_experiment(client: Any, name: str, root: Path) -> str:
    """Experiment id of ``name``, tagged as model training, created with artifacts under
    ``<root>/mlartifacts`` for local stores; safe when another stage creates it at the same time."""
    existing = client.get_experiment_by_name(name)
    if existing is None:
        artifacts = (root / ARTIFACT_DIR).as_uri() if client.tracking_uri.startswith("sqlite:") else None
        try:
            return str(client.create_experiment(name, artifact_location=artifacts, tags={KIND_TAG: KIND}))
        except Exception:
            existing = client.get_experiment_by_name(name)  # another stage may have created it meanwhile
            if existing is None:
                raise
    if existing.lifecycle_stage == "deleted":
        raise TrackingError(
            f"MLflow experiment '{name}' is deleted; restore it (mlflow experiments restore) "
            "or choose another tracking.experiment in params.yaml."
        )
    if existing.tags.get(KIND_TAG) != KIND:  # a store made by an earlier version
        race_safe(client.set_experiment_tag, existing.experiment_id, KIND_TAG, KIND)
    return str(existing.experiment_id)


@dataclass
class RunSet:
    """MLflow runs that live and end together: one per seed, nested under the variant's run if any."""

    client: Any
    run_ids: list[str]
    parent_id: str | None = None
    stop: StopSignals = field(default_factory=StopSignals)

    def end(self, status: str) -> None:
        """Mark every run ``status``, the parent last; then raise :class:`TrackingError` naming any that
        could not be marked, since a run left RUNNING misleads whoever reads the store."""
        failed = []
        for run_id in [*self.run_ids, *([self.parent_id] if self.parent_id else [])]:
            try:
                self.client.set_terminated(run_id, status=status)
            except Exception as exc:
                log.error("could not mark MLflow run %s as %s: %s", run_id, status, exc, exc_info=True)
                failed.append(run_id)
        if failed:
            raise TrackingError(
                f"could not mark MLflow run(s) {', '.join(failed)} as {status}; they stay RUNNING in the store. "
                "Check the store, then set their status in the MLflow UI or with `mlflow runs` if needed."
            )


@contextmanager
def run_set(
    client: Any,
    experiment_id: str,
    run_names: Sequence[str],
    tags: Mapping[str, str],
    parent: str | None = None,
    description: str | None = None,
) -> Iterator[RunSet]:
    """One run per name, nested under a run named ``parent`` (with ``description`` as its note) when
    given; they end FINISHED, FAILED on an exception, KILLED on a signal (:class:`StopSignals`: the
    body calls ``runs.stop.check()``). A signal after the last check still stops the process, once the
    runs end FINISHED, so that ``dvc repro`` goes no further."""
    runs = RunSet(client, [])
    with runs.stop.installed():
        try:
            child_tags = dict(tags)
            if parent is not None:
                note = {NOTE_TAG: description} if description else {}
                runs.parent_id = client.create_run(experiment_id, tags={**tags, **note}, run_name=parent).info.run_id
                child_tags[PARENT_TAG] = runs.parent_id
            for name in run_names:
                run = client.create_run(experiment_id, tags=child_tags, run_name=name)
                runs.run_ids.append(run.info.run_id)
            runs.stop.check()
            yield runs
        except (KeyboardInterrupt, RunInterrupted):
            runs.end("KILLED")
            raise
        except BaseException:
            runs.end("FAILED")
            raise
        else:
            runs.end("FINISHED")
    if runs.stop.signum is not None:
        raise RunInterrupted(runs.stop.signum, finished=True)
