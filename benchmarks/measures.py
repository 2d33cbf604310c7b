"""Cost of the probe pass (``callbacks.ActivationProbe``): activations, saturation, signal, gain, coupling, Jacobians.

Times :func:`pipeline.train.fit_replicates` (the train stage's training and every per-epoch
measurement, without MLflow) with and without the probe, in interleaved rounds so that the
machine's load hits both alike, and prints the ratio of the medians. Also times the probe's
own ``on_epoch_end`` against the whole epoch.

    python benchmarks/measures.py --depth 4 --seeds 5 --epochs 10 --rounds 3 --data data/processed
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--data", type=Path, default=ROOT / "data/processed", help="the preprocess stage's folder")
    args = p.parse_args()

    import keras

    from pipeline import callbacks as cb
    from pipeline.engine import configure_backend
    from pipeline.params import TrainParams, Variant
    from pipeline.train import fit_replicates, load_arrays

    backend = configure_backend()
    data = load_arrays(args.data)
    params = TrainParams(seeds=tuple(range(args.seeds)), epochs=args.epochs)
    variant = Variant(depth=args.depth)
    real_probe = cb.ActivationProbe
    probe_s: list[float] = []

    class TimedProbe(real_probe):
        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            t0 = time.perf_counter()
            super().on_epoch_end(epoch, logs)
            probe_s.append(time.perf_counter() - t0)

    class NoProbe(keras.callbacks.Callback):
        def __init__(self, x: np.ndarray, y: np.ndarray) -> None:
            super().__init__()

    epoch_s: list[float] = []
    first: list[bool] = []

    class EpochTimer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
            self.t0 = time.perf_counter()

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            if len(probe_s) > len(epoch_s):  # an epoch of a run with the probe
                epoch_s.append(time.perf_counter() - self.t0)
                first.append(epoch == 0)

    timings: dict[str, list[float]] = {"without": [], "with": []}
    finals: dict[str, np.ndarray] = {}
    for _ in range(args.rounds):
        for label, probe in (("without", NoProbe), ("with", TimedProbe)):
            cb.ActivationProbe = probe
            t0 = time.perf_counter()
            _, table = fit_replicates(variant, params, data, callbacks=[EpochTimer()])
            timings[label].append(time.perf_counter() - t0)
            finals[label] = table.loc[table["epoch"] == args.epochs, ["accuracy", "loss"]].to_numpy()
    cb.ActivationProbe = real_probe

    without, with_ = (float(np.median(timings[k])) for k in ("without", "with"))
    later = ~np.array(first)
    probe, epoch = float(np.median(np.array(probe_s)[later])), float(np.median(np.array(epoch_s)[later]))
    print(
        f"backend {backend}: depth {args.depth}, {args.seeds} seeds, {args.epochs} epochs, "
        f"{args.rounds} interleaved rounds (fit_replicates: model build, training, every measurement)\n"
        f"  without the probe: {without:.2f} s (runs: {', '.join(f'{t:.2f}' for t in timings['without'])})\n"
        f"  with the probe:    {with_:.2f} s (runs: {', '.join(f'{t:.2f}' for t in timings['with'])})\n"
        f"  overhead: {100 * (with_ / without - 1):+.1f} % of training time; the probe's own median "
        f"{1000 * float(np.median(probe_s)):.1f} ms/epoch = {100 * float(np.sum(probe_s)) / sum(timings['with']):.1f} %"
        f" of the runs with it\n"
        f"  per epoch of the runs with it (medians; each run's first epoch, the compile, left out): the probe "
        f"{1000 * probe:.1f} ms of {1000 * epoch:.0f} ms, i.e. {100 * probe / (epoch - probe):.1f} % on top of the "
        f"rest of the epoch\n"
        f"  same final accuracy and loss with and without: {np.array_equal(finals['with'], finals['without'])}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
