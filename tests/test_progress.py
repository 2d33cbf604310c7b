"""Progress output on a real (pseudo-)terminal and on a pipe.

On a terminal the trainer redraws one live line (carriage return, erase line) and ends
it with a single newline; there is no per-batch output. Elsewhere (CI logs, ``dvc
repro`` piped to a file) it prints one line every ``--log-every`` epochs, plus the first
and the last.
"""

from __future__ import annotations

import os
import re
import select
import subprocess
import sys
import tty
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline import trainlog
from tests.conftest import ROOT

EPOCH = re.compile(r"epoch (\d+)/(\d+)")


def read_all(fd: int, timeout_s: float = 0.2) -> bytes:
    """Everything the terminal's other side has written so far."""
    chunks = []
    while select.select([fd], [], [], timeout_s)[0]:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: the other side closed
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def test_progress_on_a_terminal_redraws_one_line() -> None:
    master, slave = os.openpty()
    tty.setraw(slave)  # no newline translation: see exactly what Progress writes
    try:
        with os.fdopen(slave, "w", encoding="utf-8", closefd=True) as stream:
            progress = trainlog.Progress("depth-2", epochs=30, every=10, stream=stream)
            assert progress.live
            progress.on_train_begin()
            out = b""
            for epoch in range(30):
                progress.on_epoch_end(epoch, {"accuracy": np.array([0.5, 0.7])})
                out += read_all(master, 0.0)
        out += read_all(master)
    finally:
        os.close(master)
    text = out.decode()
    # Every epoch redraws the same line: erase, carriage return, no newline until the end.
    assert text.count("\r\x1b[2K") == 30
    assert text.count("\n") == 1 and text.endswith("\n")
    assert [int(m.group(1)) for m in EPOCH.finditer(text)] == list(range(1, 31))
    final = text.rsplit("\r\x1b[2K", 1)[1]
    assert final.startswith("depth-2: epoch 30/30  accuracy 0.6000 (min 0.5000 max 0.7000, 2 seeds)")


def test_progress_on_a_pipe_prints_few_lines() -> None:
    read, write = os.pipe()
    with os.fdopen(write, "w", encoding="utf-8") as stream:
        progress = trainlog.Progress("depth-1", epochs=25, every=10, stream=stream)
        assert not progress.live
        progress.on_train_begin()
        for epoch in range(25):
            progress.on_epoch_end(epoch, {"accuracy": np.array([0.25])})
    with os.fdopen(read, encoding="utf-8") as pipe:
        text = pipe.read()
    lines = text.splitlines()
    assert [int(EPOCH.search(line).group(1)) for line in lines] == [1, 10, 20, 25]
    assert "\r" not in text and "\x1b" not in text
    assert "seeds" not in text  # one replicate: no min/max


# --------------------------------------------------------------------------- the real trainer
def small_study(tmp_path: Path, epochs: int, log_every: int) -> tuple[list[str], dict[str, str]]:
    """A train stage command over tiny random data, logging to a store in ``tmp_path``."""
    rng = np.random.default_rng(0)
    data = tmp_path / "processed"
    data.mkdir()
    for split, n in (("train", 300), ("test", 100)):
        labels = rng.integers(0, 10, n)
        np.savez(
            data / f"{split}.npz", x=rng.random((n, 784), dtype=np.float32), y=np.eye(10, dtype=np.float32)[labels]
        )
    params = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    params["train"].update(epochs=epochs, seeds=[0, 1], probe_size=50)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    cmd = [sys.executable, "-m", "pipeline.train", "--params", str(tmp_path / "params.yaml")]
    cmd += ["--data", str(data), "--out", str(tmp_path / "out"), "--depth", "2", "--log-every", str(log_every)]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env |= {
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "PYTHONPATH": str(ROOT),
        "TF_CPP_MIN_LOG_LEVEL": "3",
    }
    return cmd, env


def progress_output(text: str) -> str:
    """What Progress wrote: drop the log lines and TensorFlow's start-up chatter."""
    noise = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ |I0000|W0000|WARNING: All log messages)")
    return "\n".join(line for line in text.split("\n") if not noise.match(line.lstrip("\r")))


@pytest.mark.slow
def test_training_on_a_terminal_shows_one_live_line(tmp_path: Path) -> None:
    cmd, env = small_study(tmp_path, epochs=12, log_every=5)
    master, slave = os.openpty()
    tty.setraw(slave)
    try:
        process = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave)
        os.close(slave)
        out = b""
        while process.poll() is None:
            out += read_all(master, 0.5)
        out += read_all(master)
    finally:
        os.close(master)
    text = out.decode(errors="replace")
    assert process.returncode == 0, text
    shown = progress_output(text)
    # One redraw per epoch, nothing per batch (300 images / 100 = 3 batches an epoch).
    assert [int(m.group(1)) for m in EPOCH.finditer(shown)] == list(range(1, 13)), shown
    assert shown.count("\r\x1b[2K") == 12
    assert "step" not in shown and "━" not in shown  # no Keras progress bar
    # The live line ends with one newline, once: the epochs share one terminal line.
    live = shown[shown.index("\r\x1b[2K") :]
    assert live.count("\n") == 1, live


@pytest.mark.slow
def test_training_on_a_pipe_prints_a_line_every_few_epochs(tmp_path: Path) -> None:
    cmd, env = small_study(tmp_path, epochs=12, log_every=5)
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    shown = progress_output(result.stderr + result.stdout)
    assert [int(m.group(1)) for m in EPOCH.finditer(shown)] == [1, 5, 10, 12], shown
    assert "\r" not in shown and "\x1b" not in shown
