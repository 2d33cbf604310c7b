"""Per-epoch measurements and logging as Keras callbacks.

:class:`pipeline.engine.StackedTrainer` calls them once per epoch with ``logs`` whose
values are per-replicate arrays of shape (S,). Measurement callbacks add their keys
to ``logs``; the recorders that follow (history, MLflow, progress) see everything.
Order therefore matters: measurements first, then :class:`History`,
:class:`MlflowLogger` and :class:`Progress`.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, TextIO

import keras
import numpy as np
from keras import ops

from pipeline import measures
from pipeline.engine import StackedTrainer
from pipeline.model import hidden_layers

log = logging.getLogger(__name__)


def _kernels(model: keras.Model) -> list[tuple[str, np.ndarray]]:
    return [(layer.name, ops.convert_to_numpy(layer.kernel)) for layer in hidden_layers(model)]


class WeightChange(keras.callbacks.Callback):
    """``weight_change/hidden_i``: mean |ΔW| of each hidden kernel since the previous epoch
    (the first epoch compares with the initial kernel)."""

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        self._previous = _kernels(self.model)

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        current = _kernels(self.model)
        for (name, before), (_, now) in zip(self._previous, current, strict=True):
            logs[f"weight_change/{name}"] = measures.mean_abs_change(before, now)
        self._previous = current


class GradientProbe(keras.callbacks.Callback):
    """``grad/hidden_i`` (mean |∂C/∂W|) and ``grad_bias/hidden_i`` (‖∂C/∂b‖) of each hidden
    layer, on a fixed probe batch so that epochs are comparable."""

    def __init__(self, trainer: StackedTrainer, x: np.ndarray, y: np.ndarray) -> None:
        super().__init__()
        self.trainer, self.x, self.y = trainer, x, y

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        grads = self.trainer.gradients(self.x, self.y)
        for layer in hidden_layers(self.model):
            logs[f"grad/{layer.name}"] = measures.mean_abs(grads[layer.kernel.path])
            logs[f"grad_bias/{layer.name}"] = measures.l2_norm(grads[layer.bias.path])


class HeldOut(keras.callbacks.Callback):
    """``test_loss`` and ``test_accuracy`` on held-out data at the end of every epoch."""

    def __init__(self, trainer: StackedTrainer, x: np.ndarray, y: np.ndarray) -> None:
        super().__init__()
        self.trainer, self.x, self.y = trainer, x, y

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        result = self.trainer.evaluate(self.x, self.y)
        logs["test_loss"], logs["test_accuracy"] = result["loss"], result["accuracy"]


class History(keras.callbacks.Callback):
    """Collects one row per (seed, epoch) with every per-replicate value in ``logs``."""

    def __init__(self, seeds: Sequence[int]) -> None:
        super().__init__()
        self.seeds = list(seeds)
        self.rows: list[dict[str, float | int]] = []

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        for k, seed in enumerate(self.seeds):
            row: dict[str, float | int] = {"seed": seed, "epoch": epoch + 1}
            row.update({key: float(np.asarray(value)[k]) for key, value in logs.items()})
            self.rows.append(row)


class MlflowLogger(keras.callbacks.Callback):
    """Logs every per-replicate value to that replicate's MLflow run, step = epoch (1-based).

    Metrics are buffered and sent in batches at most every ``flush_s`` seconds (and at
    the end), so a local SQLite store does not cost a transaction per metric.
    """

    def __init__(self, client: Any, run_ids: Sequence[str], flush_s: float = 5.0) -> None:
        super().__init__()
        self.client, self.run_ids, self.flush_s = client, list(run_ids), flush_s
        self._buffer: list[list[Any]] = [[] for _ in self.run_ids]
        self._last_flush = time.monotonic()

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        from mlflow.entities import Metric

        now_ms = int(time.time() * 1000)
        for key, value in logs.items():
            values = np.asarray(value)
            for k in range(len(self.run_ids)):
                # NaN and ±inf too: MLflow stores them, and a diverging run must show that it diverged.
                self._buffer[k].append(Metric(key=key, value=float(values[k]), timestamp=now_ms, step=epoch + 1))
        if time.monotonic() - self._last_flush >= self.flush_s:
            self.flush()

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        self.flush()

    def flush(self) -> None:
        for k, run_id in enumerate(self.run_ids):
            metrics = self._buffer[k]
            for start in range(0, len(metrics), 1000):  # MLflow's per-request limit
                self.client.log_batch(run_id, metrics=metrics[start : start + 1000], synchronous=True)
            self._buffer[k] = []
        self._last_flush = time.monotonic()


class Progress(keras.callbacks.Callback):
    """One live line per model set on a terminal; one short line every ``every`` epochs otherwise."""

    def __init__(self, label: str, epochs: int, every: int = 10, stream: TextIO | None = None) -> None:
        super().__init__()
        self.label, self.epochs, self.every = label, epochs, every
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty()

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        self._start = time.monotonic()

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        done = epoch + 1
        elapsed = time.monotonic() - self._start
        remaining = elapsed / done * (self.epochs - done)
        acc = np.asarray(logs["accuracy"])
        line = (
            f"{self.label}: epoch {done}/{self.epochs}  accuracy {acc.mean():.4f}"
            + (f" (min {acc.min():.4f} max {acc.max():.4f}, {len(acc)} seeds)" if len(acc) > 1 else "")
            + f"  elapsed {elapsed:.0f}s  remaining ~{remaining:.0f}s"
        )
        if self.live:
            self.stream.write("\r\x1b[2K" + line)
            if done == self.epochs:
                self.stream.write("\n")
            self.stream.flush()
        elif done % self.every == 0 or done in (1, self.epochs):
            self.stream.write(line + "\n")
            self.stream.flush()


class StopOnSignal(keras.callbacks.Callback):
    """Honours a deferred stop signal at the end of each epoch (see ``tracking.StopSignals``).

    Last in the list, so that the epoch it stops after is fully recorded first.
    """

    def __init__(self, check: Callable[[], None]) -> None:
        super().__init__()
        self.check = check

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self.check()
