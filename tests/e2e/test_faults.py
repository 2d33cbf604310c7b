"""Failure paths through ``dvc repro``: each protection is exercised the way a user meets the fault.

Every test works in a temporary copy of the repository (``make_project``) cut down to one
variant (depth 1, two seeds, no remedies) so that each fault costs a few seconds. What
"nothing half-written" means here: no ``results/<variant>`` outputs (DVC itself may leave
the folder's ``.gitignore``), no hidden ``.<name>.tmp-*`` scratch folder, ``dvc.lock``
byte-identical, and MLflow runs ended FAILED or KILLED, never left RUNNING.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from tests.e2e.conftest import (
    clean_env,
    prepare_project,
    run,
    start_background,
    write_params,
)

VARIANT = "1-sigmoid-mse-glorot_uniform-none"  # DVC's name for the stage item: folder and runs
STAGE = "train@1-sigmoid-mse-glorot_uniform-none"
OUTPUTS = ("history.csv", "metrics.json", "run.json", "models")


def one_variant(params: dict[str, Any]) -> None:
    params["grid"]["depth"] = [1]
    params["remedies"] = {}


def prepared(make_project: Callable[..., Path], edit: Callable[[dict[str, Any]], None] | None = None) -> Path:
    """A one-variant project whose fetch and preprocess stages have run (they touch no MLflow store)."""

    def both(params: dict[str, Any]) -> None:
        one_variant(params)
        if edit:
            edit(params)

    project = make_project(both)
    run(["dvc", "repro", "preprocess"], project)
    return project


def runs(project: Path) -> list[tuple[str, str]]:
    """(name, status) of every MLflow run in the project's SQLite store; [] when there is no store."""
    store = project / "mlflow.db"
    if not store.exists():
        return []
    with sqlite3.connect(store) as db:
        return sorted(db.execute("SELECT name, status FROM runs").fetchall())


def written_results(project: Path) -> list[str]:
    """What the stages put in ``results/`` (the folder itself is in git, with a .gitkeep)."""
    results = project / "results"
    return sorted(p.name for p in results.iterdir() if p.name != ".gitkeep") if results.exists() else []


def assert_nothing_written(project: Path, variant: str = VARIANT) -> None:
    results = project / "results"
    if results.exists():
        leftovers = [name for name in written_results(project) if name.startswith(".")]
        assert leftovers == [], f"scratch folders left behind: {leftovers}"
    folder = results / variant
    for name in OUTPUTS:
        assert not (folder / name).exists(), f"{folder / name} was written"


def set_params(project: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    edit(params)
    write_params(project, params)


def _drop(section: str, key: str | None = None) -> Callable[[dict[str, Any]], None]:
    def edit(params: dict[str, Any]) -> None:
        if key is None:
            del params[section]
        else:
            del params[section][key]

    return edit


def _set(section: str, **values: Any) -> Callable[[dict[str, Any]], None]:
    return lambda params: params[section].update(values)


# ------------------------------------------------------------------ tracking server
@pytest.mark.slow
def test_unreachable_or_wrong_server_fails_fast_before_training(make_project) -> None:
    from tests.helpers_data import serve

    project = prepared(make_project)
    lock = (project / "dvc.lock").read_bytes()
    refused = closed_url()
    with serve({}) as (not_mlflow, _):
        for uri, reason in ((refused, "connection refused"), (not_mlflow, "does not look like an MLflow")):
            start = time.monotonic()
            result = run(["dvc", "repro"], project, env=clean_env(MLFLOW_TRACKING_URI=uri), check=False)
            took = time.monotonic() - start
            output = result.stdout + result.stderr
            assert result.returncode != 0
            assert f"failed to reproduce '{STAGE}'" in output
            assert uri in output and reason in output and "make server" in output, output
            assert took < 60, f"took {took:.0f} s"
            assert written_results(project) == []
            assert not (project / "mlflow.db").exists() and not (project / "mlartifacts").exists()
            assert (project / "dvc.lock").read_bytes() == lock
            assert "Running stage 'report'" not in output


def closed_url() -> str:
    """A loopback URL on which nothing listens."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


# ------------------------------------------------------------------------- signals
def start_repro(project: Path, shell: str = "/bin/sh") -> tuple[subprocess.Popen[str], list[str], threading.Thread]:
    """``dvc repro`` in its own process group, its output collected line by line; DVC runs the
    stage commands through ``shell``."""
    return start_background(["dvc", "repro"], project, env=clean_env(SHELL=shell))


def wait_until_training(project: Path, process: subprocess.Popen[str], lines: list[str]) -> None:
    """Until both seeds' MLflow runs are RUNNING and the progress log is past epoch 20."""
    deadline = time.monotonic() + 180
    while True:
        assert process.poll() is None, "".join(lines)
        assert time.monotonic() < deadline, "training did not start:\n" + "".join(lines)
        if any("epoch 20/" in line for line in lines) and len(runs(project)) == 3:
            assert {status for _, status in runs(project)} == {"RUNNING"}
            return
        time.sleep(0.1)


def interrupt(project: Path, signum: int, target: str, shell: str = "/bin/sh") -> tuple[int, str, bool]:
    """Start ``dvc repro``, wait until both runs are training, send ``signum`` to the process group
    (``group``) or to the training process alone (``train``); wait until every process has ended.
    Returns dvc's exit status, its output, and whether training had ended by the time dvc did."""
    import psutil

    process, lines, reader = start_repro(project, shell)
    try:
        wait_until_training(project, process, lines)
        children = psutil.Process(process.pid).children(recursive=True)
        train = [p for p in children if "pipeline.train" in p.cmdline()]
        assert len(train) == 1, [p.cmdline() for p in children]
        if target == "group":
            os.killpg(process.pid, signum)
        else:
            train[0].send_signal(signum)
        try:
            rc = process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            pytest.fail("dvc repro still running 120 s after the signal:\n" + "".join(lines))
        ended_first = not train[0].is_running()
        _, alive = psutil.wait_procs(train, timeout=120)  # when dvc itself died, training still ends its runs
        assert not alive, "training process still running"
        reader.join(timeout=30)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    return rc, "".join(lines), ended_first


def assert_interrupted_cleanly(project: Path, rc: int, output: str, lock: bytes, signum: int) -> None:
    assert rc != 0, output
    name = signal.Signals(signum).name
    assert f"interrupted (stopped by {name}): the MLflow runs are marked KILLED" in output, output
    assert runs(project) == [(VARIANT, "KILLED"), (f"{VARIANT}-seed-0", "KILLED"), (f"{VARIANT}-seed-1", "KILLED")]
    assert_nothing_written(project)
    assert (project / "dvc.lock").read_bytes() == lock
    assert "Running stage 'report'" not in output


def long_training(params: dict[str, Any]) -> None:
    params["train"]["epochs"] = 100_000


@pytest.mark.slow
@pytest.mark.parametrize(
    ("signum", "target", "shell"),
    [
        # Ctrl-C in a terminal: the whole foreground process group. Under dash (/bin/sh, DVC's
        # fallback) and bash: the stage commands `exec` Python, so no shell sits in between.
        (signal.SIGINT, "group", "/bin/sh"),
        (signal.SIGINT, "group", "/bin/bash"),
        (signal.SIGTERM, "train", "/bin/sh"),  # `kill <pid>` of the training process alone
    ],
    ids=["sigint-group-sh", "sigint-group-bash", "sigterm-train"],
)
def test_signal_mid_training_kills_runs_and_writes_nothing(make_project, signum: int, target: str, shell: str) -> None:
    project = prepared(make_project, long_training)
    lock = (project / "dvc.lock").read_bytes()
    rc, output, ended_first = interrupt(project, signum, target, shell)
    assert_interrupted_cleanly(project, rc, output, lock, signum)
    # dvc outlived the signal and waited for training to end its runs: it names the stage and
    # training's own exit status 128 + signum (a shell killed by SIGINT in between would show -2).
    assert f"failed to reproduce '{STAGE}'" in output and f"exited with {128 + signum}" in output, output
    assert ended_first, "dvc exited while training was still ending its runs"


@pytest.mark.slow
def test_sigterm_to_dvc_then_rerun_then_run_cache_restore(make_project) -> None:
    """SIGTERM to the whole group (CI cancelling a job, ``timeout``, ``docker stop``) kills dvc outright;
    training still ends its runs KILLED. The next ``dvc repro`` is not blocked by dvc's stale locks.
    Then: change a param, repro, change it back, repro -- DVC restores the earlier outputs from its
    run-cache without running the command, so MLflow gets no new run. (Shown on the report stage: the
    train stages declare ``run.json`` with ``cache: false``, which keeps DVC from run-caching them.)"""
    project = prepared(make_project, long_training)
    lock = (project / "dvc.lock").read_bytes()
    rc, output, _ = interrupt(project, signal.SIGTERM, "group")
    assert_interrupted_cleanly(project, rc, output, lock, signal.SIGTERM)

    set_params(project, lambda p: p["train"].update(epochs=3))
    again = run(["dvc", "repro"], project)
    assert "Running stage 'report'" in again.stdout
    assert (project / "results" / VARIANT / "metrics.json").is_file()
    first = runs(project)
    assert [s for _, s in first].count("FINISHED") == 4  # the variant, 2 seeds, the report
    summary = (project / "reports" / "summary.md").read_bytes()

    set_params(project, _set("report", dpi=120))
    changed = run(["dvc", "repro"], project)
    assert "Running stage 'report'" in changed.stdout
    assert len(runs(project)) == len(first) + 1

    set_params(project, _set("report", dpi=110))
    restored = run(["dvc", "repro"], project)
    assert "Stage 'report' is cached - skipping run, checking out outputs" in restored.stdout
    assert "Running stage" not in restored.stdout
    assert len(runs(project)) == len(first) + 1, "a run-cache restore must not create an MLflow run"
    assert (project / "reports" / "summary.md").read_bytes() == summary


# ---------------------------------------------------------------- error in training
@pytest.mark.slow
def test_exception_inside_training_fails_runs_and_stops_the_pipeline(make_project) -> None:
    """A test split of the wrong width: training starts, the held-out evaluation of epoch 1 raises."""
    project = prepared(make_project)
    run(["dvc", "freeze", "preprocess"], project)  # keep DVC from re-creating the damaged file
    test_file = project / "data" / "processed" / "test.npz"
    with np.load(test_file, allow_pickle=False) as data:
        x, y = data["x"], data["y"]
    np.savez(test_file, x=x[:, :-1], y=y)
    result = run(["dvc", "repro"], project, check=False)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert f"failed to reproduce '{STAGE}'" in output
    assert "expected shape=(None, 784), found shape=(200, 783)" in output
    assert "Running stage 'report'" not in output and not (project / "reports").exists()
    assert runs(project) == [(VARIANT, "FAILED"), (f"{VARIANT}-seed-0", "FAILED"), (f"{VARIANT}-seed-1", "FAILED")]
    assert_nothing_written(project)
    assert STAGE not in (project / "dvc.lock").read_text()


# ------------------------------------------------------------------- bad params.yaml
BAD_PARAMS = {
    "epochs-wrong-type": (_set("train", epochs="ten"), ["train.epochs", "expected an integer", "'ten'"]),
    "epochs-zero": (_set("train", epochs=0), ["train.epochs", "must be >= 1", "got 0"]),
    "epochs-negative": (_set("train", epochs=-5), ["train.epochs", "must be >= 1", "got -5"]),
    "learning-rate-wrong-type": (_set("train", learning_rate="fast"), ["train.learning_rate", "expected a number"]),
    "unknown-activation": (_set("grid", activation=["sigmoidd"]), ["'sigmoidd'", "allowed: sigmoid, tanh, relu"]),
    "unknown-loss": (_set("grid", loss=["hinge"]), ["'hinge'", "allowed: mse, cross_entropy"]),
    "removed-key": (_set("train", optimizer="adam"), ["train: unknown key(s) optimizer", "allowed keys: seeds"]),
    "depth-zero": (_set("grid", depth=[0]), ["grid.depth", "must be >= 1", "got [0]"]),
    "missing-section": (_drop("tracking"), ["'tracking'", "missing"]),
    "missing-key": (_drop("grid", "depth"), ["grid.depth"]),
    "unknown-key": (_set("train", epoch=5), ["unknown key(s) epoch", "allowed keys: seeds, epochs"]),
    # Checked by params.check_file, which every stage runs first: the first stage to run stops.
    "empty-depth-list": (_set("grid", depth=[]), ["grid.depth", "must list at least one value"]),
    "unknown-section": (lambda params: params.update(trian={"epochs": 10}), ["unknown section(s) trian"]),
}


@pytest.fixture(scope="module")
def params_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One prepared project shared by the bad-params cases (a rejected params.yaml writes nothing)."""
    project = prepare_project(tmp_path_factory.mktemp("bad-params"), one_variant)
    run(["dvc", "repro", "preprocess"], project)
    return project


@pytest.mark.slow
@pytest.mark.parametrize(("edit", "expected"), list(BAD_PARAMS.values()), ids=list(BAD_PARAMS))
def test_bad_params_fail_before_any_output_or_run(
    params_project: Path, edit: Callable[[dict[str, Any]], None], expected: list[str]
) -> None:
    project = params_project
    good = (project / "params.yaml").read_text()
    lock = (project / "dvc.lock").read_bytes()
    try:
        set_params(project, edit)
        result = run(["dvc", "repro"], project, check=False)
        output = result.stdout + result.stderr
        assert result.returncode != 0, output
        for text in expected:
            assert text in output, f"{text!r} not in:\n{output}"
        assert "Traceback" not in output
        assert written_results(project) == [], "a stage wrote results before the error"
        assert runs(project) == [], "an MLflow run was created before the error"
        assert (project / "dvc.lock").read_bytes() == lock
    finally:
        (project / "params.yaml").write_text(good)
        for name in ("reports", "mlartifacts", *(f"results/{r}" for r in written_results(project))):
            shutil.rmtree(project / name, ignore_errors=True)
        for store in project.glob("mlflow.db*"):
            store.unlink()
        (project / "dvc.lock").write_bytes(lock)


# -------------------------------------------------------- determinism, concurrency
@pytest.mark.slow
def test_same_params_and_seed_give_identical_results_even_when_run_concurrently(make_project) -> None:
    """Two trainings of one variant at once, into two folders, on a new SQLite store: both succeed
    (the store's schema is created once, under a lock) and agree bit for bit."""
    import keras

    project = prepared(make_project)
    assert not (project / "mlflow.db").exists()
    command = [sys.executable, "-m", "pipeline.train", "--data", "data/processed", "--depth", "1", "--out"]
    procs = [
        subprocess.Popen(
            [*command, f"results/copy-{k}"],
            cwd=project,
            env=clean_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for k in (1, 2)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out
        assert "database is locked" not in out
    a, b = project / "results" / "copy-1", project / "results" / "copy-2"
    assert (a / "history.csv").read_bytes() == (b / "history.csv").read_bytes()
    assert json.loads((a / "run.json").read_text())["runs"] != json.loads((b / "run.json").read_text())["runs"]
    for seed in (0, 1):
        wa = keras.saving.load_model(a / "models" / f"seed-{seed}.keras").get_weights()
        wb = keras.saving.load_model(b / "models" / f"seed-{seed}.keras").get_weights()
        assert len(wa) == len(wb) > 0
        for x, y in zip(wa, wb, strict=True):
            assert x.dtype == y.dtype and np.array_equal(x, y)
    assert [s for _, s in runs(project)] == ["FINISHED"] * 6  # per training: the variant's run and 2 seeds


# ------------------------------------------------------------------ untrusted input
class _Boom:
    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, ("touch PWNED",))


def test_train_refuses_pickles_in_preprocessed_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """data/processed comes from a DVC remote as easily as from preprocess: a pickle in it must not run."""
    from pipeline.train import load_split

    monkeypatch.chdir(tmp_path)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        with archive.open("x.npy", "w") as member:
            np.lib.format.write_array(member, np.array([_Boom()], dtype=object), allow_pickle=True)
        with archive.open("y.npy", "w") as member:
            np.lib.format.write_array(member, np.zeros((1, 10), np.float32))
    (tmp_path / "train.npz").write_bytes(buffer.getvalue())
    assert pickle.dumps(_Boom())  # the payload is a real pickle
    with pytest.raises(ValueError, match="allow_pickle"):
        load_split(tmp_path / "train.npz")
    assert not (tmp_path / "PWNED").exists()


# --------------------------------------------------------- disk full, read-only output
def _private_mount_prefix() -> list[str] | str:
    """``unshare`` arguments for a private mount namespace, or why there is none here."""
    if shutil.which("unshare") is None:
        return "unshare is not installed"
    prefix = ["unshare", "--mount"] + ([] if os.geteuid() == 0 else ["--map-root-user"])
    probe = subprocess.run(
        [*prefix, "sh", "-c", 'd=$(mktemp -d) && mount -t tmpfs -o size=64k tmpfs "$d" && umount "$d"'],
        capture_output=True,
        text=True,
        check=False,
    )
    if probe.returncode != 0:
        return f"cannot mount a tmpfs in a private namespace: {probe.stderr.strip()}"
    return prefix


@pytest.mark.slow
@pytest.mark.parametrize(
    ("mount_options", "error"),
    [("size=48k", "No space left on device"), ("ro", "Read-only file system")],
    ids=["disk-full", "read-only"],
)
def test_unwritable_results_fail_cleanly(make_project, mount_options: str, error: str) -> None:
    """``results/`` on a 48 kB tmpfs (a full disk) or a read-only one, in a private mount namespace
    (root is not stopped by file modes). Training runs; writing its outputs fails."""
    prefix = _private_mount_prefix()
    if isinstance(prefix, str):
        pytest.skip(prefix)
    project = prepared(make_project)
    lock = (project / "dvc.lock").read_bytes()
    script = (
        f"mount -t tmpfs -o {mount_options} tmpfs results || exit 99; "
        "dvc repro; rc=$?; echo '--- left in results:'; find results -mindepth 1; exit $rc"
    )
    result = run([*prefix, "sh", "-c", script], project, check=False)
    output = result.stdout + result.stderr
    assert result.returncode not in (0, 99), output
    assert f"failed to reproduce '{STAGE}'" in output
    assert error in output
    left = result.stdout.split("--- left in results:")[1].split()
    assert left == [], f"left in results: {left}"
    assert "Traceback" not in output
    if mount_options == "ro":
        # Checked before training starts: no run at all.
        assert "cannot write into results" in output
        assert runs(project) == []
    else:
        # Found only when the outputs are written: the runs fail.
        assert "cannot write results/" in output and "free disk space" in output
        assert runs(project) == [(VARIANT, "FAILED"), (f"{VARIANT}-seed-0", "FAILED"), (f"{VARIANT}-seed-1", "FAILED")]
    assert (project / "dvc.lock").read_bytes() == lock
    assert "Running stage 'report'" not in output
