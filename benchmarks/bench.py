"""Side-by-side benchmark: seed-style Keras ``fit`` against the project's stacked trainer.

Both train the same replicates (same initial weights, same per-epoch batch order) for
the same epochs; rounds alternate between the two so that machine noise hits both.
Each side runs in its own process so each gets its own TensorFlow thread settings:
the baseline keeps TensorFlow's defaults, as a user's script would.

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


def load_data(path: Path, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        x, y = data["x"], data["y"]
    return (x[:limit], y[:limit]) if limit else (x, y)


def worker(side: str, args: argparse.Namespace) -> None:
    """Serve rounds over stdin/stdout: each input line runs that many epochs."""
    sys.path.insert(0, str(ROOT))
    import keras

    from pipeline.engine import StackedTrainer
    from pipeline.model import build_model, unstack
    from pipeline.params import Variant
    from pipeline.train import configure_backend

    if side == "project":
        configure_backend()
    x, y = load_data(args.data, args.limit)
    seeds = list(range(args.replicates))
    variant = Variant(depth=args.depth)
    keras.utils.set_random_seed(0)
    stacked = build_model(variant, seeds)
    if side == "project":
        trainer = StackedTrainer(stacked, "mse", 0.2, 100, shuffle_seed=0)
    else:
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
                order = rng.permutation(len(x))
                xs, ys = x[order], y[order]
                epoch_time, epoch_acc = 0.0, []
                for m in models:
                    timer.times, timer.acc = [], []
                    m.fit(xs, ys, batch_size=100, epochs=1, shuffle=False, verbose=0, callbacks=[timer])
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
    p.add_argument("--worker", choices=["baseline", "project"], help=argparse.SUPPRESS)
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
        for side in ("baseline", "project")
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
    for side in ("baseline", "project"):
        times = results[side]["times"][1:]  # the first epoch includes compilation
        medians[side] = float(np.median(times))
        label = "seed-style Keras fit" if side == "baseline" else "project (stacked, compiled epoch)"
        print(
            f"  {label:34s} {medians[side]:.3f} s/epoch (median)   "
            f"{args.replicates / medians[side]:6.1f} model-epochs/s"
        )
    print(f"  speed-up: {medians['baseline'] / medians['project']:.1f}x")
    a = np.asarray(results["baseline"]["accuracy"][-1])
    b = np.asarray(results["project"]["accuracy"][-1])
    print(f"  accuracy after {total} epochs: baseline {np.round(a, 4).tolist()}  project {np.round(b, 4).tolist()}")
    diff = float(np.max(np.abs(a - b)))
    print(f"  max |difference|: {diff:.2e} ({'agree' if diff < 2e-3 else 'DISAGREE'})")
    return 0 if diff < 2e-3 else 1


if __name__ == "__main__":
    raise SystemExit(main())
