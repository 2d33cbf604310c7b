"""End-to-end fixtures: a temporary copy of the repository with a small profile.

The copy is a real git repository (DVC needs one) whose ``params.yaml`` points the
fetch stage at a small synthetic MNIST-shaped file, with its own checksums, and cuts
the experiment down to a few epochs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from tests.conftest import ROOT

BIN = Path(sys.executable).parent


def synthetic_mnist(path: Path, n_train: int = 1200, n_test: int = 200, seed: int = 0) -> dict[str, str]:
    """Write an MNIST-shaped npz with learnable structure; return its content md5s."""
    from pipeline.mnist import MnistArrays, content_md5

    rng = np.random.default_rng(seed)

    def images(labels: np.ndarray) -> np.ndarray:
        x = rng.integers(0, 60, (len(labels), 28, 28), dtype=np.uint8)
        for k in range(10):  # a bright row per class
            x[labels == k, 2 + 2 * k, :] = 255
        return x

    y_train = rng.integers(0, 10, n_train).astype(np.uint8)
    y_test = rng.integers(0, 10, n_test).astype(np.uint8)
    arrays = MnistArrays(images(y_train), y_train, images(y_test), y_test)
    np.savez(path, x_train=arrays.x_train, y_train=arrays.y_train, x_test=arrays.x_test, y_test=arrays.y_test)
    return content_md5(arrays)


def small_profile(params: dict[str, Any], data: Path, md5: dict[str, str]) -> dict[str, Any]:
    """A few epochs, two depths and one remedy, two seeds, a local mirror."""
    params["fetch"]["mirrors"] = [{"kind": "file", "path": str(data)}]
    params["fetch"]["content_md5"] = md5
    params["preprocess"]["limit"] = 1000
    params["train"].update(epochs=3, seeds=[0, 1], probe_size=100)
    params["summary"]["index_window"] = 2
    params["grid"]["depth"] = [1, 2]
    params["remedies"] = {
        "relu-ce-he": {"depth": 2, "activation": "relu", "loss": "cross_entropy", "init": "he_normal", "norm": "none"}
    }
    return params


def clean_env(**extra: str) -> dict[str, str]:
    """The test's environment minus anything pointing at another MLflow store."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    # DVC runs stage commands through $SHELL, else /bin/sh; pin the fallback so that a
    # developer's login shell does not make local runs differ from CI's.
    env["SHELL"] = "/bin/sh"
    env.update(extra)
    return env


def run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None, check: bool = True, timeout: float = 600):
    """Run a command in the project copy; on failure show its output."""
    result = subprocess.run(cmd, cwd=cwd, env=env or clean_env(), capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{cmd} exited {result.returncode}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"
        )
    return result


def copy_repo(dst: Path) -> Path:
    """Copy the files git tracks, less the committed study's results, then commit them in a fresh repo."""
    files = subprocess.run(
        ["git", "ls-files", "-c", "-z"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split("\0")
    for rel in filter(None, files):
        if rel == "dvc.lock" or (rel.startswith("results/") and rel != "results/.gitkeep"):
            continue  # the committed study's results: each test starts a fresh pipeline
        src = ROOT / rel
        if src.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.invalid"]
    run(["git", "init", "-q"], dst)
    run([*git, "add", "-A"], dst)
    run([*git, "commit", "-qm", "copy"], dst)
    return dst


def write_params(project: Path, params: dict[str, Any]) -> None:
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")


def prepare_project(base: Path, edit: Callable[[dict[str, Any]], None] | None = None, name: str = "repo") -> Path:
    """A repository copy in ``base/name`` with the small profile; ``edit(params)`` may change it further."""
    project = copy_repo(base / name)
    data = base / "mnist-small.npz"
    params = small_profile(yaml.safe_load((project / "params.yaml").read_text()), data, synthetic_mnist(data))
    if edit:
        edit(params)
    write_params(project, params)
    return project


def start_background(
    command: list[str], project: Path, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[str], list[str], threading.Thread]:
    """Start ``command`` in its own process group; its output lines collect in the returned list."""
    process = subprocess.Popen(
        command,
        cwd=project,
        env=env or clean_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(process.stdout or []), daemon=True)
    reader.start()
    return process, lines, reader


@pytest.fixture
def make_project(tmp_path: Path) -> Iterator[Callable[..., Path]]:
    """Factory: :func:`prepare_project` in the test's temporary folder."""

    def factory(edit: Callable[[dict[str, Any]], None] | None = None, name: str = "repo") -> Path:
        return prepare_project(tmp_path, edit, name)

    yield factory
