"""Throughput of the project's trainer alone: many replicate seeds of one depth.

Runs on either backend (``KERAS_BACKEND=jax`` on a GPU machine) and needs only
Keras, NumPy and this repository's ``pipeline`` package (no MLflow, no DVC).

    python benchmarks/replicates.py --depth 4 --replicates 100 --epochs 200 --data data/raw/mnist.npz
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def load(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Training and test arrays from a raw (uint8 ``x_train``...) or processed (``x``, ``y``) npz."""
    with np.load(path, allow_pickle=False) as d:
        if "x_train" in d:

            def prep(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
                return (x.reshape(len(x), -1) / 255.0).astype(np.float32), np.eye(10, dtype=np.float32)[y]

            return (*prep(d["x_train"], d["y_train"]), *prep(d["x_test"], d["y_test"]))
        x, y = d["x"], d["y"]
        return x, y, x[:1000], y[:1000]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--replicates", type=int, default=10)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--data", type=Path, default=ROOT / "data/raw/mnist.npz")
    p.add_argument("--measure", action="store_true", help="also run the per-epoch measurement callbacks")
    args = p.parse_args()

    import keras

    from pipeline.engine import StackedTrainer, configure_backend
    from pipeline.model import build_model
    from pipeline.params import Variant

    backend = configure_backend()
    x, y, x_test, y_test = load(args.data)
    keras.utils.set_random_seed(0)
    seeds = list(range(args.replicates))
    t0 = time.perf_counter()
    model = build_model(Variant(depth=args.depth), seeds)
    trainer = StackedTrainer(model, "mse", 0.2, 100, shuffle_seed=0)
    build_s = time.perf_counter() - t0

    times: list[float] = []
    accuracy: list[np.ndarray] = []

    class Timer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
            self.t = time.perf_counter()

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            times.append(time.perf_counter() - self.t)
            accuracy.append(np.asarray(logs["accuracy"]))

    callbacks: list[keras.callbacks.Callback] = []
    if args.measure:
        from pipeline import callbacks as cb

        callbacks = [
            cb.WeightChange(),
            cb.GradientProbe(trainer, x[:1000], y[:1000]),
            cb.HeldOut(trainer, x_test, y_test),
        ]
    t0 = time.perf_counter()
    trainer.fit(x, y, args.epochs, [*callbacks, Timer()])
    total = time.perf_counter() - t0
    steady = float(np.median(times[1:])) if len(times) > 1 else times[0]
    try:
        import jax

        device = str(jax.devices()[0]) if backend == "jax" else "cpu"
    except ImportError:
        device = "cpu"
    print(
        f"backend {backend} on {device}: depth {args.depth}, {args.replicates} replicates, {args.epochs} epochs"
        f"{' with measurements' if args.measure else ''}\n"
        f"  model build {build_s:.2f} s; first epoch (compile) {times[0]:.2f} s; "
        f"steady {steady:.4f} s/epoch ({args.replicates / steady:.0f} model-epochs/s)\n"
        f"  {args.epochs} epochs: {total:.1f} s in all; final accuracy mean {accuracy[-1].mean():.4f} "
        f"(min {accuracy[-1].min():.4f}, max {accuracy[-1].max():.4f})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
