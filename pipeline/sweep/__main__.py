"""The sweep driver: ``python -m pipeline.sweep [-S key=v1,v2 ...] [--jobs N] [--gpus G]`` (``make sweep``).

Without ``RAY_ADDRESS``: a local Ray instance on 127.0.0.1, sized to the cores (``--jobs`` caps
it); the workers fetch the code from the workspace and push their experiments straight back.
With ``RAY_ADDRESS=host:port``: that cluster; the workers fetch from and push to ``origin``,
and the driver then pulls the experiments (``dvc exp pull``). Everything that can be checked
is checked before anything is submitted (exit 2, nothing left behind; see the README's
Faults). Exit 1 when an experiment failed, 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import ipaddress
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import params, tracking
from pipeline.sweep import spec, supervise, worker, workspace
from pipeline.sweep.spec import Experiment, SweepError

log = logging.getLogger("pipeline.sweep")
say = functools.partial(print, flush=True)  # the user-facing lines (progress, table); diagnostics go to logging

PROBE_TIMEOUT_S = 120.0
TAIL_SHOWN = 25
# Pickled by value, not by name: the workers have the project's requirements but not its code (they clone it).
SHIPPED_BY_VALUE = (worker, supervise)


@dataclass(frozen=True)
class Target:
    """Where the tasks run: a local instance (``address`` None) or a cluster at ``host:port``."""

    address: str | None
    host: str | None = None
    port: int | None = None

    @property
    def local(self) -> bool:
        return self.address is None

    @property
    def loopback(self) -> bool:
        """A local instance or a cluster on this machine's loopback: Ray must keep 127.0.0.1 as it is."""
        if self.local or self.host == "localhost":
            return True
        try:
            return bool(self.host) and ipaddress.ip_address(str(self.host)).is_loopback
        except ValueError:
            return False


def ray_target(address: str | None) -> Target:
    """Parse ``RAY_ADDRESS``: unset/``local`` (local instance), ``host:port``, ``ray://host:port`` or ``auto``."""
    address = (address or "").strip()
    if address in ("", "local"):
        return Target(None)
    if address == "auto":
        return Target(address)
    rest = address.removeprefix("ray://")
    host, sep, port = rest.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise SweepError(f"RAY_ADDRESS={address}: expected host:port (the head's GCS port, 6379 by default).")
    return Target(address, host.strip("[]"), int(port))


def check_reachable(target: Target, timeout_s: float = 3.0) -> None:
    """A TCP connection to the head, so that a wrong address fails in seconds."""
    if target.host is None or target.port is None:
        return
    try:
        socket.create_connection((target.host, target.port), timeout=timeout_s).close()
    except OSError as exc:
        raise SweepError(
            f"RAY_ADDRESS={target.address}: nothing answers at {target.host}:{target.port} ({exc.strerror or exc}). "
            "Start the cluster (ray start --head ...; see the README), or fix RAY_ADDRESS; unset it to run locally."
        ) from None


def check_auth(target: Target, environ: dict[str, str]) -> None:
    """Token authentication stays on; a cluster's driver must have the cluster's token."""
    mode = environ.setdefault("RAY_AUTH_MODE", "token")
    if mode != "token":
        raise SweepError(
            f"RAY_AUTH_MODE={mode}: sweeps run only with Ray's token authentication (RAY_AUTH_MODE=token), "
            "since anyone who reaches an unauthenticated cluster can run code on it."
        )
    if target.local or environ.get("RAY_AUTH_TOKEN"):
        return  # a local instance makes its own token (~/.ray/auth_token) when there is none
    token_file = Path(environ.get("RAY_AUTH_TOKEN_PATH") or "~/.ray/auth_token").expanduser()
    if not token_file.is_file() or not token_file.read_text(encoding="utf-8").strip():
        raise SweepError(
            f"No Ray token for the cluster at {target.address}: {token_file} is missing or empty. On the head node, "
            "`ray get-auth-token` prints it; store it in ~/.ray/auth_token (chmod 600) or point "
            "RAY_AUTH_TOKEN_PATH at a file holding it."
        )


def new_sweep_id() -> str:
    """``sw`` + UTC date and time + 4 random hex digits: sortable and unique."""
    return time.strftime("sw%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(2)


def experiment_names(root: Path, experiments: Sequence[Experiment]) -> set[str]:
    """The MLflow experiment names the sweep logs to (``tracking.experiment``, as overridden)."""
    try:
        section = params.read_params_file(root / "params.yaml").get("tracking") or {}
        default = params.parse(params.TrackingParams, section, "tracking").experiment
    except params.ParamsError:  # the experiments' own params check says what is wrong
        default = params.TrackingParams().experiment
    return {str(n) for n in (exp.overrides.get("tracking.experiment", default) for exp in experiments) if n}


def report(result: dict[str, Any], count: str, metric: str) -> None:
    """A finished experiment's line (``count`` is ``[k/n]``): its headline metric, or where it failed and its log."""
    took = spec.format_seconds(result.get("seconds", 0.0))
    if result.get("ok"):
        summary = spec.headline(spec.variant_metrics(result.get("metrics") or {}), metric)
        say(f"{count} {result['name']}  done in {took}  {summary}")
        return
    step = result.get("step")
    where = "in Ray (its worker died more often than --retries allows)" if step == "ray" else f"at {step}"
    if result.get("status") is not None:
        where += f" (exit {result['status']})"
    say(f"{count} {result['name']}  FAILED {where} after {took}")
    for text in (result.get("tail") or "").splitlines()[-TAIL_SHOWN:]:
        say(f"    | {text}")


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP stop the driver the way Ctrl-C does (SIGINT too where the shell
    started it with SIGINT ignored, as a non-interactive shell does for background jobs)."""
    signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {sig: signal.signal(sig, signal.default_int_handler) for sig in signals}  # raises KeyboardInterrupt
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _ray_init(target: Target, jobs: int | None) -> Any:
    import ray

    local = {"num_cpus": spec.check_jobs(jobs, os.cpu_count() or 1), "include_dashboard": False} if target.local else {}
    try:
        ray.init(address=target.address or "local", log_to_driver=False, logging_level=logging.WARNING, **local)
    except Exception as exc:  # noqa: BLE001 - Ray raises ConnectionError, RuntimeError, ValueError...
        why = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        if target.local:
            raise SweepError(f"Could not start a local Ray instance: {why}") from None
        raise SweepError(
            f"Could not connect to the Ray cluster at {target.address}: {why}. "
            "Check RAY_ADDRESS and that your token is the cluster's (RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token)."
        ) from None
    return ray


def _probe(ray: Any, job: dict[str, Any], gpus: float) -> None:
    """One small task that checks, from a worker, that the code and the tracking server are reachable."""
    remote = ray.remote(worker.probe).options(num_cpus=1, num_gpus=gpus, max_retries=0, name="sweep:probe")
    ref = remote.remote(job["git_url"], job["ref"], job["env"]["MLFLOW_TRACKING_URI"])
    ready, _ = ray.wait([ref], timeout=PROBE_TIMEOUT_S)
    if not ready:
        ray.cancel(ref, force=True)
        raise SweepError(
            f"No worker took the sweep's first task within {PROBE_TIMEOUT_S:g} s: does the cluster have a free CPU"
            + (f" and {gpus:g} GPU(s)" if gpus else "")
            + " (ray status)?"
        )
    answer = ray.get(ref)
    if "error" in answer:
        raise SweepError(answer["error"] + ". Nothing was submitted.")
    if answer["sha"] != job["commit"]:
        raise SweepError(f"Workers see {job['ref']} at {answer['sha'][:12]}, not {job['commit'][:12]}: push again.")


def prepare(args: argparse.Namespace, root: Path, target: Target, sweep_id: str) -> tuple[list[Experiment], dict]:
    """Every check that needs no Ray, and the jobs' shared fields. Creates the sweep's ref (and pushes it)."""
    experiments = spec.plan(sweep_id, args.set_param, args.max_experiments)
    uri = tracking.tracking_uri(root)
    spec.check_tracking(uri, remote_workers=not target.local)
    tracking.preflight(uri)
    dvc_name, dvc_url, cache_dir = workspace.dvc_config(root)
    check_reachable(target)
    check_auth(target, os.environ)
    git_url = str(root) if target.local else workspace.remote_url(root, args.git_remote)
    remote = None if target.local else args.git_remote
    if remote:
        workspace.check_on_remote(root, remote, workspace.git(["rev-parse", "HEAD^{commit}"], root))
    names = [e.name for e in experiments]
    taken = sorted(experiments_in(root, ".", names) | (experiments_in(root, remote, names) if remote else set()))
    if taken:  # a task's push would replace them
        raise SweepError(
            f"Experiments named {', '.join(taken)} exist already: choose another --name, or remove them first "
            "(dvc exp remove" + (f" --git-remote {remote}" if remote else "") + " <names>)."
        )
    snap = workspace.snapshot(root, sweep_id)
    try:
        if remote:
            workspace.push_ref(root, remote, snap.ref)
        if uri.startswith("sqlite:"):  # artifacts under the workspace, not under a worker's clone
            client = tracking.open_store(uri)
            for name in experiment_names(root, experiments):
                tracking.ensure_experiment(client, name, root)
    except BaseException:
        workspace.delete_ref(root, snap.ref, remote)
        raise
    job = {
        "sweep": sweep_id,
        "git_url": git_url,
        "ref": snap.ref,
        "base": snap.base,
        "commit": snap.commit,
        "dvc_remote": dvc_name,
        "dvc_url": dvc_url,
        "cache_dir": cache_dir if target.local else None,
        "supervisor": Path(supervise.__file__).read_text(encoding="utf-8"),
        "env": {
            tracking.SWEEP_ENV: sweep_id,
            "MLFLOW_TRACKING_URI": uri,
            **workspace.identity(root),
            **{k: os.environ[k] for k in ("KERAS_BACKEND", "TF_CPP_MIN_LOG_LEVEL", "SHELL") if k in os.environ},
        },
    }
    return experiments, job


def submit_and_wait(
    ray: Any, job: dict, experiments: Sequence[Experiment], gpus: float, retries: int, metric: str
) -> dict[str, dict[str, Any]]:
    """One task per experiment; a line per finished one. Ctrl-C cancels the rest (KeyboardInterrupt re-raised)."""
    task = ray.remote(num_cpus=1, num_gpus=gpus, max_retries=retries, retry_exceptions=False)(worker.run_experiment)
    pending = {}
    for exp in experiments:
        job_of = {**job, "name": exp.name, "set_params": list(exp.set_params)}
        pending[task.options(name=f"sweep:{exp.name}").remote(job_of)] = exp.name
    results: dict[str, dict[str, Any]] = {}
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
            for ref in ready:
                name = pending.pop(ref)
                try:
                    result = ray.get(ref)
                except Exception as exc:  # noqa: BLE001 - a task that died more often than its retries allow
                    result = {"name": name, "ok": False, "step": "ray", "tail": str(exc), "seconds": 0.0}
                results[name] = result
                report(result, f"[{len(results)}/{len(experiments)}]", metric)
    except KeyboardInterrupt:
        for ref in pending:
            ray.cancel(ref, force=True)
        say(f"Interrupted: cancelling {len(pending)} outstanding experiment(s)...")
        ray.wait(list(pending), num_returns=len(pending), timeout=30)
        raise
    return results


def experiments_in(root: Path, repo: str, names: Sequence[str]) -> set[str]:
    """Which of ``names`` are experiments in ``repo``: a git remote, or ``"."`` for the workspace."""
    listing = workspace.git(["ls-remote", repo, "refs/exps/*"], root, timeout=120)
    present = {line.rsplit("/", 1)[-1] for line in listing.splitlines()}
    return {n for n in names if n in present}


def bring_back(root: Path, git_url: str | None, names: Sequence[str]) -> set[str]:
    """Which of ``names`` are in the workspace now. A cluster sweep (``git_url``: ``origin``) first fetches
    the experiments (refs and outputs) into it; only those that are there (after Ctrl-C, some never were)."""
    there = sorted(experiments_in(root, git_url, names)) if git_url else []
    if there:
        pull = [sys.executable, "-m", "dvc", "exp", "pull", git_url, *there]
        done = subprocess.run(pull, cwd=root, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            log.error("dvc exp pull %s failed:\n%s", git_url, (done.stdout + done.stderr).strip())
    return experiments_in(root, ".", names)


def save_logs(root: Path, sweep_id: str, results: dict[str, dict[str, Any]]) -> Path:
    """Each experiment's log tail under ``.dvc/tmp/sweeps/<id>/`` (ignored by git)."""
    folder = root / ".dvc" / "tmp" / "sweeps" / sweep_id
    folder.mkdir(parents=True, exist_ok=True)
    for name, result in results.items():
        (folder / f"{name}.log").write_text(result.get("tail") or "", encoding="utf-8")
    (folder / "results.json").write_text(json.dumps(results, indent=1, default=str), encoding="utf-8")
    return folder


def run(args: argparse.Namespace) -> int:
    root = workspace.workspace_root(Path.cwd())
    target = ray_target(args.address)
    if target.loopback:
        # Ray maps 127.0.0.1 to the machine's outward address unless told this is a one-machine
        # instance; this keeps a local instance (and a loopback test cluster) on loopback.
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    sweep_id = spec.check_name(args.name) if args.name else new_sweep_id()
    if args.dry_run:
        for exp in spec.plan(sweep_id, args.set_param, args.max_experiments):
            say(exp.name, " ".join(f"-S {p}" for p in exp.set_params) or "(no change)")
        return 0
    experiments, job = prepare(args, root, target, sweep_id)
    if args.jobs and not target.local:
        log.info("JOBS=%s applies to a local Ray instance; the cluster runs as many at once as it has CPUs.", args.jobs)
    names = [e.name for e in experiments]
    where = "a local Ray instance" if target.local else f"the Ray cluster at {target.address}"
    pulled_from = None if target.local else job["git_url"]  # a local sweep's workers push into the workspace
    ray = None
    try:
        with sigterm_as_interrupt():
            ray = _ray_init(target, args.jobs)
        with sigterm_as_interrupt():  # again: ray.init may have installed handlers of its own
            for module in SHIPPED_BY_VALUE:
                ray.cloudpickle.register_pickle_by_value(module)
            gpus = spec.gpus_per_task(args.gpus, ray.cluster_resources().get("GPU", 0))
            if not target.local:
                _probe(ray, job, gpus)
            cpus = int(ray.cluster_resources().get("CPU", 0))
            say(
                f"Sweep {sweep_id}: {len(experiments)} experiment(s) on {where} ({cpus} CPU(s), "
                f"{gpus:g} GPU(s) per experiment), baseline {job['base'][:7]}"
                + (" + uncommitted changes" if job["commit"] != job["base"] else "")
            )
            try:
                results = submit_and_wait(ray, job, experiments, gpus, args.retries, args.metrics[0])
            except KeyboardInterrupt:
                kept = bring_back(root, pulled_from, names)
                say(f"Stopped. {len(kept)} experiment(s) had finished and are in dvc exp show.")
                return 130
    except KeyboardInterrupt:
        say("Stopped before any experiment was submitted.")
        return 130
    finally:
        if ray is not None and ray.is_initialized():
            ray.shutdown()
        workspace.delete_ref(root, job["ref"], None if target.local else args.git_remote)
    kept = bring_back(root, pulled_from, [name for name, r in results.items() if r.get("ok")])
    failed = [n for n in names if n not in kept]
    logs = save_logs(root, sweep_id, results)
    metrics = {name: spec.variant_metrics(r.get("metrics") or {}) for name, r in results.items() if r.get("ok")}
    say(f"\n{spec.comparison_table(experiments, metrics, failed, args.metrics)}\n")
    say(
        f"{len(kept)} of {len(experiments)} experiment(s) landed: dvc exp show; dvc exp apply <name>; "
        f"MLflow: tags.\"{tracking.SWEEP_TAG}\" = '{sweep_id}'. Logs: {logs.relative_to(root)}"
    )
    return 0 if not failed else 1


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.sweep",
        description="Run a sweep of DVC experiments on Ray: locally, or on the cluster at RAY_ADDRESS.",
    )
    parser.add_argument(
        "-S", "--set-param", action="append", default=[], metavar="[FILE:]KEY=VALUES",
        help="as dvc exp run -S; comma lists expand to the cartesian product (repeatable)",
    )  # fmt: skip
    parser.add_argument("--jobs", type=_optional_int, help="local Ray: at most this many at once (default: all cores)")
    parser.add_argument("--gpus", type=_optional_float, help="GPUs per experiment (default: 1 if the cluster has GPUs)")
    parser.add_argument(
        "--retries", type=int, default=2, help="Ray retries of an experiment whose worker died (default 2)"
    )
    parser.add_argument("--name", help="sweep id (default: sw<date>-<time>-<random>); experiments are <id>-<k>")
    parser.add_argument(
        "--address", default=os.environ.get("RAY_ADDRESS"), help="Ray cluster (default: RAY_ADDRESS; unset: local)"
    )
    parser.add_argument("--git-remote", default="origin", help="cluster: the git remote workers fetch from and push to")
    parser.add_argument(
        "--metrics", type=lambda s: [m for m in s.split(",") if m], default=list(spec.DEFAULT_METRICS),
        help="metrics of the table, comma-separated; the first is the progress lines' headline",
    )  # fmt: skip
    parser.add_argument("--max-experiments", type=int, default=1000, help="refuse larger sweeps (default 1000)")
    parser.add_argument("--dry-run", action="store_true", help="print the experiments and exit")
    args = parser.parse_args(argv)
    if args.retries < 0:
        parser.error("--retries must be 0 or more")
    if not args.metrics:
        parser.error("--metrics needs at least one name")
    return args


def _optional_int(text: str) -> int | None:
    return int(text) if text.strip() else None


def _optional_float(text: str) -> float | None:
    return float(text) if text.strip() else None


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        return run(args)
    except (SweepError, tracking.TrackingError) as exc:  # refused before anything was submitted
        log.error("%s", exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())
