"""Where the MLflow store is, how runs start and end, and lineage tags.

The default store is SQLite at the project root (``sqlite:///<root>/mlflow.db``);
``MLFLOW_TRACKING_URI`` overrides it. Artifacts of experiments this project
creates go to ``<root>/mlartifacts``. ``dvc exp run --queue`` executes stages in
temporary copies under ``<root>/.dvc/tmp/exps/``; the root is resolved through
such a copy so those runs land in the same store as the workspace.
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import subprocess
import time
import types
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

STORE_FILE = "mlflow.db"
ARTIFACT_DIR = "mlartifacts"
EXPS_TMP = (".dvc", "tmp", "exps")
GROUP_TAG = "pipeline.group"


class TrackingError(RuntimeError):
    """The tracking store cannot be used; the message says what to do."""


class RunInterrupted(BaseException):
    """Raised inside training when SIGTERM or SIGINT arrives (ends runs as KILLED)."""


def project_root(start: str | Path | None = None) -> Path:
    """The project root: ``start`` (default: ``DVC_ROOT``, which DVC sets for every stage and
    points at the workspace for queued experiments, else cwd), or the workspace a DVC
    experiment copy under ``.dvc/tmp/exps`` belongs to."""
    path = Path(start or os.environ.get("DVC_ROOT") or Path.cwd()).resolve()
    parts = path.parts
    for i in range(len(parts) - len(EXPS_TMP) + 1):
        if parts[i : i + len(EXPS_TMP)] == EXPS_TMP:
            return Path(*parts[:i])
    return path


def default_tracking_uri(root: str | Path | None = None) -> str:
    """``sqlite:///<absolute root>/mlflow.db``."""
    return f"sqlite:///{project_root(root) / STORE_FILE}"


def tracking_uri(root: str | Path | None = None) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else the project's SQLite store."""
    return os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(root)


def preflight(uri: str, timeout_s: float = 5.0, attempts: int = 3) -> None:
    """Check that the store at ``uri`` answers before any training starts.

    HTTP servers get a bounded number of short health requests; SQLite stores need
    a writable folder. Raises :class:`TrackingError` naming the URI and the remedy.
    """
    if uri.startswith(("http://", "https://")):
        url = uri.rstrip("/") + "/health"
        last: Exception | None = None
        for attempt in range(attempts):
            try:
                with urllib.request.urlopen(url, timeout=timeout_s) as resp:  # noqa: S310 (scheme checked)
                    if resp.status == 200:
                        return
                    last = RuntimeError(f"HTTP {resp.status}")
            except (TimeoutError, urllib.error.URLError, OSError) as exc:
                last = exc
            if attempt + 1 < attempts:
                time.sleep(0.5 * (attempt + 1))
        raise TrackingError(
            f"MLflow tracking server {uri} is not reachable ({last}). Start it (make server), "
            "fix MLFLOW_TRACKING_URI, or unset it to use the local SQLite store."
        )
    if uri.startswith("sqlite:///"):
        folder = Path(uri.removeprefix("sqlite:///")).parent
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            raise TrackingError(f"MLflow store {uri}: folder {folder} is missing or not writable.")
        return
    if uri.startswith(("file:", "/")) or "://" not in uri:
        raise TrackingError(
            f"MLFLOW_TRACKING_URI={uri} is a file store, which MLflow deprecated; "
            f"use sqlite:///<path>/mlflow.db or an http(s) server."
        )


def git_commit(root: Path) -> str:
    """HEAD's commit (``-dirty`` appended when tracked files changed), or ``unknown``."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def group_id(commit: str, params_text: str) -> str:
    """Runs with the same code and params form one group: one ``dvc repro``."""
    digest = hashlib.sha256(f"{commit}\n{params_text}".encode()).hexdigest()
    return digest[:12]


def lineage_tags(root: Path, stage: str, params_file: str | Path = "params.yaml") -> dict[str, str]:
    """Tags that tie a run to its code, pipeline stage and ``dvc repro``."""
    commit = git_commit(root)
    params_path = Path(params_file)
    params_text = params_path.read_text(encoding="utf-8") if params_path.is_file() else ""
    tags = {
        "mlflow.source.git.commit": commit.removesuffix("-dirty"),
        "git.commit": commit,
        "dvc.stage": stage,
        GROUP_TAG: group_id(commit, params_text),
    }
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc.exp_name"] = os.environ["DVC_EXP_NAME"]
    return tags


def ensure_experiment(client: Any, name: str, root: Path) -> str:
    """Experiment id of ``name``, created with artifacts under ``<root>/mlartifacts`` for local stores."""
    existing = client.get_experiment_by_name(name)
    if existing is not None:
        if existing.lifecycle_stage == "deleted":
            raise TrackingError(
                f"MLflow experiment '{name}' is deleted; restore it (mlflow experiments restore) "
                "or choose another tracking.experiment in params.yaml."
            )
        return str(existing.experiment_id)
    artifact_location = None
    if client.tracking_uri.startswith("sqlite:"):
        artifact_location = (root / ARTIFACT_DIR).as_uri()
    try:
        return str(client.create_experiment(name, artifact_location=artifact_location))
    except Exception:
        existing = client.get_experiment_by_name(name)
        if existing is None:
            raise
        return str(existing.experiment_id)


def make_client(uri: str) -> Any:
    """An ``MlflowClient`` bound to ``uri`` (imported lazily: MLflow is slow to import)."""
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


@dataclass
class RunSet:
    """Several MLflow runs that live and end together (one per replicate seed)."""

    client: Any
    run_ids: list[str]

    def end(self, status: str) -> None:
        for run_id in self.run_ids:
            try:
                self.client.set_terminated(run_id, status=status)
            except Exception:
                log.exception("could not mark run %s as %s", run_id, status)


@contextmanager
def run_set(
    client: Any,
    experiment_id: str,
    run_names: Sequence[str],
    tags: Mapping[str, str],
) -> Iterator[RunSet]:
    """Create one run per name; end them FINISHED, FAILED on an exception, KILLED on a signal.

    SIGTERM is turned into :class:`RunInterrupted` for the duration, so ``kill`` and
    Ctrl-C (``KeyboardInterrupt``) both end the runs as KILLED before the process exits.
    """
    runs = RunSet(client, [])
    previous = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum: int, frame: types.FrameType | None) -> None:
        raise RunInterrupted(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        for name in run_names:
            run = client.create_run(experiment_id, tags=dict(tags), run_name=name)
            runs.run_ids.append(run.info.run_id)
        yield runs
    except (KeyboardInterrupt, RunInterrupted):
        runs.end("KILLED")
        raise
    except BaseException:
        runs.end("FAILED")
        raise
    else:
        runs.end("FINISHED")
    finally:
        signal.signal(signal.SIGTERM, previous)
