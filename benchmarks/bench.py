"""Side-by-side benchmark: seed-style Keras ``fit`` against the project's stacked trainer.

Three sides train the same replicates (same initial weights) for the same epochs, in
interleaved rounds so that machine noise hits all of them:

- ``seedstyle``: ``Sequential.fit(x, y, batch_size=100, shuffle=True)``, as the classic
  notebook does (steps_per_execution 1);
- ``baseline``: the same ``fit`` on the project's batch order (pre-shuffled arrays,
  ``shuffle=False``), so that its accuracy must equal the project's to float noise;
- ``project``: :class:`pipeline.engine.StackedTrainer`.

Each side runs in its own process so each gets its own TensorFlow thread settings: the
Keras sides keep TensorFlow's defaults, as a user's script would.

    python benchmarks/bench.py --depth 4 --replicates 1 --epochs 6 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SIDES = ("seedstyle", "baseline", "project")
LABELS = {
    "seedstyle": "seed-style Keras fit (shuffle=True)",
    "baseline": "Keras fit on the project's batches",
    "project": "project (stacked, compiled epoch)",
}


def load_data(path: Path, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        x, y = data["x"], data["y"]
    return (x[:limit], y[:limit]) if limit else (x, y)


def worker(side: str, args: argparse.Namespace) -> None:
    """Serve rounds over stdin/stdout: each input line runs that many epochs."""
    sys.path.insert(0, str(ROOT))
    import keras

    from pipeline.engine import StackedTrainer, configure_backend
    from pipeline.model import build_model, unstack
    from pipeline.params import Variant

    if side == "project":
        configure_backend()
    x, y = load_data(args.data, args.limit)
    seeds = list(range(args.replicates))
    variant = Variant(depth=args.depth)
    keras.utils.set_random_seed(0)
    stacked = build_model(variant, seeds)
    if side == "project":
        trainer = StackedTrainer(stacked, "mse", 0.2, 100, shuffle_seed=0)
    else:  # baseline and seedstyle: plain Keras models with the same initial weights
        models = [unstack(stacked, variant, k) for k in range(len(seeds))]
        for m in models:
            m.compile(optimizer=keras.optimizers.SGD(0.2), loss="mse", metrics=["accuracy"], steps_per_execution=1)
        rng = np.random.default_rng(0)  # the same orders the project's trainer draws

    class Timer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
            self.t0 = time.perf_counter()

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            self.times.append(time.perf_counter() - self.t0)
            self.acc.append(np.atleast_1d(np.asarray(logs["accuracy"], dtype=float)))

    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        epochs = int(line)
        timer = Timer()
        timer.times, timer.acc = [], []
        if side == "project":
            trainer.fit(x, y, epochs, [timer])
            times, acc = timer.times, [a.tolist() for a in timer.acc]
        else:
            times, acc = [], []
            for _ in range(epochs):
                if side == "seedstyle":
                    xs, ys, shuffle = x, y, True
                else:
                    order = rng.permutation(len(x))
                    xs, ys, shuffle = x[order], y[order], False
                epoch_time, epoch_acc = 0.0, []
                for m in models:
                    timer.times, timer.acc = [], []
                    m.fit(xs, ys, batch_size=100, epochs=1, shuffle=shuffle, verbose=0, callbacks=[timer])
                    epoch_time += timer.times[0]
                    epoch_acc.append(float(timer.acc[0][0]))
                times.append(epoch_time)
                acc.append(epoch_acc)
        print(json.dumps({"times": times, "accuracy": acc}), flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--replicates", type=int, default=1)
    p.add_argument("--epochs", type=int, default=4, help="epochs per round and side")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--data", type=Path, default=ROOT / "data/processed/train.npz")
    p.add_argument("--limit", type=int, default=None, help="first N training images only")
    p.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args.worker, args)
        return 0
    if not args.data.is_file():
        print(f"{args.data} not found: run `dvc repro preprocess` first", file=sys.stderr)
        return 1
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    argv = [sys.argv[0], *sys.argv[1:]]
    procs = {
        side: subprocess.Popen(
            [sys.executable, *argv, "--worker", side], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )
        for side in SIDES
    }
    for proc in procs.values():
        json.loads(proc.stdout.readline())
    results: dict[str, dict[str, list]] = {side: {"times": [], "accuracy": []} for side in procs}
    for r in range(args.rounds):
        for side, proc in procs.items():  # interleaved: noise hits both sides
            proc.stdin.write(f"{args.epochs}\n")
            proc.stdin.flush()
            out = json.loads(proc.stdout.readline())
            results[side]["times"] += out["times"]
            results[side]["accuracy"] += out["accuracy"]
            print(f"round {r + 1}: {side:8s} {np.median(out['times']):.3f} s/epoch", file=sys.stderr)
    for proc in procs.values():
        proc.stdin.close()
        proc.wait()

    total = args.epochs * args.rounds
    n_images = len(load_data(args.data, args.limit)[0])
    print(f"\ndepth {args.depth}, {args.replicates} replicate(s), {total} epochs each, {n_images} images")
    medians = {}
    for side in SIDES:
        times = results[side]["times"][1:]  # the first epoch includes compilation
        medians[side] = float(np.median(times))
        print(
            f"  {LABELS[side]:44s} {medians[side]:.3f} s/epoch (median)  "
            f"{args.replicates / medians[side]:6.1f} model-epochs/s"
        )
    for side in ("seedstyle", "baseline"):
        print(f"  speed-up over {LABELS[side]}: {medians[side] / medians['project']:.1f}x")
    a = np.asarray(results["baseline"]["accuracy"][-1])
    b = np.asarray(results["project"]["accuracy"][-1])
    print(f"  accuracy after {total} epochs (same batches): baseline {np.round(a, 4).tolist()}", end="")
    print(f"  project {np.round(b, 4).tolist()}")
    diff = float(np.max(np.abs(a - b)))
    print(f"  max |difference|: {diff:.2e} ({'agree' if diff < 2e-3 else 'DISAGREE'})")
    return 0 if diff < 2e-3 else 1


if __name__ == "__main__":
    raise SystemExit(main())
