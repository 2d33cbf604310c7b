"""The same sweep of N DVC experiments run serially (``dvc exp run``, one after another) and on Ray
(``python -m pipeline.sweep``, a local instance), side by side (``make bench-sweep``).

Each side gets its own copy of the repository (own DVC cache and remote, so neither reuses
the other's run cache), with the data stages already run. Prints both wall times, the
speed-up against the ideal ``min(N, cores)``, and the per-experiment overhead that Ray
adds: a task's wall time (clone, checkout, pull, run, push) minus a serial experiment's.

    python benchmarks/sweep.py --experiments 4 --epochs 20 --images 10000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.e2e.conftest import clean_env, copy_repo, synthetic_mnist, write_params  # noqa: E402
from tests.e2e.ray_cluster import ray_env  # noqa: E402


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def make_project(base: Path, name: str, data: Path, md5: dict[str, str], args: argparse.Namespace) -> Path:
    """A committed copy with the benchmark's profile and the data stages run; its own DVC remote."""
    project = base / name
    project.mkdir()
    copy_repo(project)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["fetch"]["mirrors"] = [{"kind": "file", "path": str(data)}]
    params["fetch"]["content_md5"] = md5
    params["preprocess"]["limit"] = args.images
    params["train"].update(epochs=args.epochs, seeds=list(range(args.seeds)))
    params["grid"]["depth"] = [args.depth]
    params["remedies"] = {}
    write_params(project, params)
    env = clean_env()
    for command in (
        ["dvc", "remote", "modify", "--local", "storage", "url", str(base / f"{name}-dvc")],
        ["dvc", "repro", "preprocess"],
        ["git", "add", "-A"],
        ["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost", "commit", "-qm", "benchmark profile"],
    ):
        subprocess.run(command, cwd=project, env=env, check=True, capture_output=True)
    return project


def serial(project: Path, values: list[str]) -> list[float]:
    """``dvc exp run -S train.learning_rate=v`` for each value in turn; each one's wall time."""
    times = []
    for k, value in enumerate(values, 1):
        start = time.monotonic()
        command = ["dvc", "exp", "run", "--name", f"serial-{k}", "-S", f"train.learning_rate={value}"]
        subprocess.run(command, cwd=project, env=clean_env(), check=True, capture_output=True)
        times.append(time.monotonic() - start)
        print(f"  serial {k}/{len(values)}: {times[-1]:.1f} s", flush=True)
    return times


def on_ray(project: Path, base: Path, values: list[str], jobs: int | None) -> tuple[float, list[float]]:
    """One sweep on a local Ray instance: total wall time and each task's."""
    sweep = "train.learning_rate=" + ",".join(values)
    command = [sys.executable, "-m", "pipeline.sweep", "--name", "bench", "-S", sweep]
    if jobs:
        command += ["--jobs", str(jobs)]
    start = time.monotonic()
    with ray_env(base) as own:
        done = subprocess.run(command, cwd=project, env=clean_env(**own), capture_output=True, text=True)
    total = time.monotonic() - start
    if done.returncode != 0:
        raise SystemExit(f"the Ray sweep failed:\n{done.stdout}\n{done.stderr}")
    print("\n".join("  " + line for line in done.stdout.splitlines() if line.startswith("[")), flush=True)
    results = json.loads((project / ".dvc/tmp/sweeps/bench/results.json").read_text())
    return total, [r["seconds"] for r in results.values()]


def summary(n: int, cores: int, serial_times: list[float], ray_total: float, task_times: list[float]) -> dict[str, Any]:
    """The figures. Medians, so that the first serial run (which also creates the MLflow store) does not skew them."""
    serial_total = sum(serial_times)
    parallel = min(n, cores)
    return {
        "experiments": n,
        "cores": cores,
        "serial_total_s": round(serial_total, 1),
        "serial_per_experiment_s": [round(t, 1) for t in serial_times],
        "ray_total_s": round(ray_total, 1),
        "ray_task_s": [round(t, 1) for t in task_times],
        "speedup": round(serial_total / ray_total, 2),
        "ideal_speedup": parallel,
        # what a task costs more than the same experiment run in the workspace: clone, pull, push
        "ray_overhead_per_experiment_s": round(statistics.median(task_times) - statistics.median(serial_times), 1),
        # Ray's start, the driver's checks and setup, the table: the total less the tasks' share
        "ray_fixed_s": round(ray_total - sum(task_times) / parallel, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiments", type=int, default=4, help="N: learning rates 0.1, 0.2, ... (default 4)")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--images", type=int, default=10_000, help="training images (synthetic MNIST-shaped data)")
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--seeds", type=int, default=1, help="replicate seeds per experiment")
    parser.add_argument("--jobs", type=int, default=None, help="cap the local Ray instance (default: all cores)")
    parser.add_argument("--out", type=Path, help="also write the figures as JSON here")
    args = parser.parse_args(argv)
    cores = min(os.cpu_count() or 1, args.jobs or 10**6)
    values = [f"{0.1 * k:.1f}" for k in range(1, args.experiments + 1)]
    print(
        f"Sweep benchmark on {platform.node()} ({cpu_model()}, {os.cpu_count()} cores): {args.experiments} "
        f"experiments of depth {args.depth}, {args.epochs} epochs, {args.images} images, {args.seeds} seed(s)",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as tmp:
        base = Path(tmp)
        data = base / "mnist.npz"
        md5 = synthetic_mnist(data, n_train=args.images, n_test=max(args.images // 5, 100))
        serial_project = make_project(base, "serial", data, md5, args)
        ray_project = make_project(base, "ray", data, md5, args)
        print("serial (dvc exp run, one after another):", flush=True)
        serial_times = serial(serial_project, values)
        print(f"Ray (local instance, {cores} CPUs):", flush=True)
        ray_total, task_times = on_ray(ray_project, base, values, args.jobs)
    figures = summary(args.experiments, cores, serial_times, ray_total, task_times)
    print(
        f"serial: {figures['serial_total_s']} s  |  Ray: {figures['ray_total_s']} s  |  speed-up "
        f"{figures['speedup']}x (ideal {figures['ideal_speedup']}x)  |  Ray adds "
        f"{figures['ray_overhead_per_experiment_s']:+} s per experiment (median task minus median serial run) "
        f"and {figures['ray_fixed_s']} s once (start, checks, table)",
        flush=True,
    )
    if args.out:
        args.out.write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
