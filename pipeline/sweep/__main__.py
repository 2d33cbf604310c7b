"""The sweep driver: ``python -m pipeline.sweep [-S key=v1,v2 ...] [--jobs N] [--gpus G]`` (``make sweep``).

Without ``RAY_ADDRESS``: a local Ray instance whose workers fetch from and push to the workspace;
with it, that cluster, through ``origin``. Then what landed comes into the workspace, outputs
included (docs/sweeps.md). Exit 2 when refused before anything was submitted, 1 when an
experiment did not land, 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import ipaddress
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import params, tracking
from pipeline.sweep import spec, worker, workspace
from pipeline.sweep.spec import Experiment, SweepError

log = logging.getLogger("pipeline.sweep")
say = functools.partial(print, flush=True)  # the user-facing lines (progress, table); diagnostics go to logging

PROBE_TIMEOUT_S = 120.0
CANCEL_WAIT_S = 30.0
TAIL_SHOWN = 25


@dataclass(frozen=True)
class Target:
    """Where the tasks run: a local instance (``address`` None) or a cluster."""

    address: str | None
    host: str | None = None
    port: int | None = None

    @property
    def local(self) -> bool:
        return self.address is None

    @property
    def loopback(self) -> bool:
        """A local instance or a cluster on this machine's loopback: Ray must keep 127.0.0.1 as it is."""
        with contextlib.suppress(ValueError):
            return self.local or self.host == "localhost" or ipaddress.ip_address(str(self.host)).is_loopback
        return False


def ray_target(address: str | None) -> Target:
    """Parse ``RAY_ADDRESS``: unset/``local`` (local instance), ``host:port``, ``ray://host:port`` or ``auto``."""
    address = (address or "").strip()
    if address in ("", "local"):
        return Target(None)
    if address == "auto":
        return Target(address)
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise SweepError(f"RAY_ADDRESS={address}: expected host:port (the head's GCS port, 6379 by default).")
    return Target(address, host.strip("[]"), int(port))


def ray_environment(target: Target, environ: Mapping[str, str]) -> dict[str, str]:
    """What Ray reads from the environment only: token authentication, a local instance's own token, and on
    loopback the one-machine switch (else Ray swaps 127.0.0.1 for the outward address, on every interface)."""
    if (mode := environ.get("RAY_AUTH_MODE", "token")) != "token":
        raise SweepError(
            f"RAY_AUTH_MODE={mode}: sweeps run only with Ray's token authentication (RAY_AUTH_MODE=token), "
            "since anyone who reaches an unauthenticated cluster can run code on it."
        )
    needed = {"RAY_AUTH_MODE": "token"} | ({"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"} if target.loopback else {})
    return needed | (
        {"RAY_AUTH_TOKEN": secrets.token_hex(32)} if target.local and "RAY_AUTH_TOKEN" not in environ else {}
    )


def cluster_token(environ: Mapping[str, str]) -> tuple[str, str]:
    """The cluster's token and where it is from, in Ray's order; a file other users can read is refused."""
    if environ.get("RAY_AUTH_TOKEN", "").strip():
        return environ["RAY_AUTH_TOKEN"].strip(), "RAY_AUTH_TOKEN"
    path = Path(environ.get("RAY_AUTH_TOKEN_PATH") or "~/.ray/auth_token").expanduser()
    if not path.is_file() or not path.read_text(encoding="utf-8").strip():
        raise SweepError(
            f"No Ray token for the cluster: {path} is missing or empty. On the head node, `ray get-auth-token` "
            "prints it; store it in ~/.ray/auth_token (chmod 600) or point RAY_AUTH_TOKEN_PATH at a file holding it."
        )
    if (mode := path.stat().st_mode & 0o777) & 0o077:
        raise SweepError(
            f"{path} is open to other users (mode {mode:o}); with the token anyone runs code on the cluster: "
            f"chmod 600 {path}"
        )
    return path.read_text(encoding="utf-8").strip(), str(path)


def check_cluster(target: Target, token: str, source: str, timeout_s: float = 5.0) -> None:
    """One gRPC call to the GCS with ``token``: a wrong address or token fails in seconds, not after Ray's retries."""
    import grpc

    host = f"[{target.host}]" if ":" in str(target.host) else target.host
    with grpc.insecure_channel(f"{host}:{target.port}") as channel:
        try:  # no serializers: bytes in and out, b"" the empty request
            channel.unary_unary("/ray.rpc.NodeInfoGcsService/GetClusterId")(
                b"", timeout=timeout_s, metadata=[("authorization", f"Bearer {token}")]
            )
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                raise SweepError(
                    f"The Ray cluster at {target.address} refuses the token from {source}: use the cluster's "
                    "(`ray get-auth-token` on the head node prints it)."
                ) from None
            if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise SweepError(
                    f"RAY_ADDRESS={target.address}: nothing answers at {host}:{target.port}. Start the cluster (ray "
                    "start --head ...; docs/sweeps.md), or fix RAY_ADDRESS; unset it to run locally."
                ) from None


def experiment_names(root: Path, experiments: Sequence[Experiment]) -> set[str]:
    """The MLflow experiment names the sweep logs to (``tracking.experiment``, as overridden)."""
    try:
        section = params.read_params_file(root / "params.yaml").get("tracking") or {}
        default = params.parse(params.TrackingParams, section, "tracking").experiment
    except params.ParamsError:  # the experiments' own params check says what is wrong
        default = params.TrackingParams().experiment
    return {str(n) for n in (exp.overrides.get("tracking.experiment", default) for exp in experiments) if n}


def failure(result: dict[str, Any]) -> str:
    """Where and how a task failed: ``at git push (timed out after 600 s)``."""
    if result.get("step") == "ray":
        return "in Ray (its worker died more often than --retries allows)"
    if result.get("step"):
        how = f"timed out after {result['timed_out']:g} s" if result.get("timed_out") else f"exit {result['status']}"
        return f"at {result['step']} ({how})"
    return f"with {result.get('error')}"


def progress(result: dict[str, Any], count: str, metric: str) -> None:
    """A finished task's line: its headline metric, or where it failed and its log's end."""
    took, name = datetime.timedelta(seconds=round(result.get("seconds", 0))), result["name"]
    if result.get("earlier"):
        return say(f"{count} {name}  landed by an earlier attempt (whose worker died after pushing it)")
    if result.get("ok"):
        headline = spec.headline(spec.variant_metrics(result.get("metrics") or {}), metric)
        return say(
            f"{count} {name}  done in {took}  {headline}"
            + (f"  (then: {result['error']})" if result.get("error") else "")
        )
    say(f"{count} {name}  FAILED {failure(result)} after {took}")
    for text in (result.get("log") or result.get("error") or "").splitlines()[-TAIL_SHOWN:]:
        say(f"    | {text}")


class Stops:
    """SIGINT, SIGTERM and SIGHUP (even where inherited ignored): the first raises KeyboardInterrupt while
    ``raising``; later ones only count, so that no Ctrl-C cuts short the (timed) bring-back or the logs."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self) -> None:
        self.count, self.raising = 0, True

    def install(self) -> None:
        for sig in self.SIGNALS:
            signal.signal(sig, self)

    @contextlib.contextmanager
    def installed(self) -> Iterator[Stops]:
        """The handlers for the duration; the process's own ones back after (``run`` is a library call too)."""
        previous = {sig: signal.getsignal(sig) for sig in self.SIGNALS}
        self.install()
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def __call__(self, signum: int, frame: object) -> None:
        self.count += 1
        if self.raising:
            self.raising = False
            raise KeyboardInterrupt
        say("Finishing first: bringing back what landed and saving the logs (each step has a time limit)...")


@contextlib.contextmanager
def ray_session(target: Target, jobs: int | None, stops: Stops) -> Iterator[Any]:
    """Ray with :func:`ray_environment` set meanwhile, the ``pipeline`` package shipped to the workers."""
    environ = ray_environment(target, os.environ)
    saved = {k: os.environ.get(k) for k in environ}
    os.environ.update(environ)
    ray = None
    try:
        import ray

        local = {"num_cpus": min(jobs or os.cpu_count() or 1, os.cpu_count() or 1), "include_dashboard": False}
        package = {"py_modules": [str(Path(__file__).resolve().parents[1])], "excludes": ["__pycache__"]}
        try:
            ray.init(
                target.address or "local", runtime_env=package, log_to_driver=False, logging_level=logging.WARNING,
                **(local if target.local else {}),
            )  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - Ray raises ConnectionError, RuntimeError, ValueError...
            why = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise SweepError(f"Could not start Ray ({target.address or 'local'}): {why}") from None
        stops.install()  # again: ray.init may install handlers of its own
        yield ray
    finally:
        stops.raising = False
        if ray is not None and ray.is_initialized():
            ray.shutdown()
        for key, value in saved.items():
            os.environ.pop(key, None) if value is None else os.environ.update({key: value})


def _probe(ray: Any, job: dict[str, Any], gpus: float) -> None:
    """A task that checks, from a worker, that the code and the tracking server are reachable."""
    remote = ray.remote(worker.probe).options(num_cpus=1, num_gpus=gpus, max_retries=0, name="sweep:probe")
    ref = remote.remote(job["git_url"], job["ref"], job["env"]["MLFLOW_TRACKING_URI"])
    if not ray.wait([ref], timeout=PROBE_TIMEOUT_S)[0]:
        ray.cancel(ref, force=True)
        need = f"a free CPU and {gpus:g} GPU(s)" if gpus else "a free CPU"
        raise SweepError(f"No worker took the sweep's first task within {PROBE_TIMEOUT_S:g} s: has the cluster {need}?")
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
    ray_environment(target, os.environ)  # refuses RAY_AUTH_MODE=disabled
    if not target.local:
        token, source = cluster_token(os.environ)
        if target.host and not str(target.address).startswith("ray://"):
            check_cluster(target, token, source)
    remote = None if target.local else args.git_remote
    git_url = workspace.remote_url(root, remote) if remote else str(root)
    names = [e.name for e in experiments]
    taken = workspace.exp_refs(root, ".", names)
    if remote:
        workspace.check_on_remote(root, remote, workspace.git(["rev-parse", "HEAD^{commit}"], root))
        taken |= workspace.exp_refs(root, remote, names)
    if taken:
        raise SweepError(
            f"Experiments named {', '.join(sorted(taken))} exist already: choose another --name, or remove them first "
            "(dvc exp remove" + (f" --git-remote {remote}" if remote else "") + " <names>)."
        )
    snap = workspace.snapshot(root, sweep_id)
    try:
        if remote:
            workspace.git(["push", "--quiet", "--force", remote, f"{snap.ref}:{snap.ref}"], root, timeout=300)
        if uri.startswith("sqlite:"):  # artifacts under the workspace, not under a worker's clone
            client = tracking.open_store(uri)
            for name in experiment_names(root, experiments):
                tracking.ensure_experiment(client, name, root)
    except BaseException:
        workspace.delete_ref(root, snap.ref, remote)
        raise
    copied = {k: os.environ[k] for k in ("KERAS_BACKEND", "TF_CPP_MIN_LOG_LEVEL", "SHELL") if k in os.environ}
    job = {
        "sweep": sweep_id, "git_url": git_url, "remote": remote, "ref": snap.ref, "base": snap.base,
        "commit": snap.commit, "dvc_remote": dvc_name, "dvc_url": dvc_url, "cache_dir": None if remote else cache_dir,
        "step_timeout": args.step_timeout, "run_timeout": args.run_timeout,
        "env": {tracking.SWEEP_ENV: sweep_id, "MLFLOW_TRACKING_URI": uri, **workspace.identity(root), **copied},
    }  # fmt: skip
    return experiments, job


def submit_and_wait(
    ray: Any, job: dict, experiments: Sequence[Experiment], args: argparse.Namespace, stops: Stops, results: dict
) -> None:
    """A task per experiment, a line and ``results[name]`` per finished one. On Ctrl-C: cancels the rest,
    waits up to CANCEL_WAIT_S for them (a second Ctrl-C: no longer) and re-raises."""
    gpus = spec.gpus_per_task(args.gpus, ray.cluster_resources().get("GPU", 0))
    if job["remote"]:
        _probe(ray, job, gpus)
    say(
        f"Sweep {job['sweep']}: {len(experiments)} experiment(s) on "
        + (f"the Ray cluster at {args.address}" if job["remote"] else "a local Ray instance")
        + f" ({int(ray.cluster_resources().get('CPU', 0))} CPU(s), {gpus:g} GPU(s) per experiment), "
        f"baseline {job['base'][:7]}" + (" + uncommitted changes" if job["commit"] != job["base"] else "")
    )
    task = ray.remote(num_cpus=1, num_gpus=gpus, max_retries=args.retries, retry_exceptions=False)(
        worker.run_experiment
    )
    pending = {
        task.options(name=f"sweep:{e.name}").remote({**job, "name": e.name, "set_params": list(e.set_params)}): e.name
        for e in experiments
    }

    def collect(ref: Any) -> dict[str, Any]:
        name = pending.pop(ref)
        try:
            results[name] = ray.get(ref)
        except Exception as exc:  # noqa: BLE001 - a task that died more often than its retries allow, or cancelled
            results[name] = {"name": name, "ok": False, "step": "ray", "error": str(exc), "seconds": 0.0}
        return results[name]

    try:
        while pending:
            for ref in ray.wait(list(pending), num_returns=1, timeout=1.0)[0]:
                progress(collect(ref), f"[{len(results)}/{len(experiments)}]", args.metrics[0])
    except KeyboardInterrupt:
        say(f"Interrupted: cancelling {len(pending)} outstanding experiment(s)... (Ctrl-C again: stop waiting)")
        for ref in pending:
            ray.cancel(ref, force=True)
        deadline = time.monotonic() + CANCEL_WAIT_S
        while pending and stops.count < 2 and time.monotonic() < deadline:
            for ref in ray.wait(list(pending), num_returns=len(pending), timeout=0.5)[0]:
                collect(ref)
        raise


def bring_back(root: Path, names: Sequence[str], remote: str | None, timeout: float) -> dict[str, dict[str, Any]]:
    """:func:`workspace.bring_back` timed, in a session of its own: no Ctrl-C cuts it short."""
    command = [sys.executable, "-m", "pipeline.sweep.workspace", *names, *(["--git-remote", remote] if remote else [])]
    done = subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=timeout, start_new_session=True)
    if done.returncode not in (0, 1) or not done.stdout.strip():
        raise SweepError((done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1])
    return json.loads(done.stdout.splitlines()[-1])


def save_logs(root: Path, sweep_id: str, results: dict[str, dict[str, Any]]) -> Path:
    """Each experiment's whole log, and the results less the logs, in ``.dvc/tmp/sweeps/<id>/``."""
    folder = root / ".dvc" / "tmp" / "sweeps" / sweep_id
    folder.mkdir(parents=True, exist_ok=True)
    for name, result in results.items():
        (folder / f"{name}.log").write_text(result.get("log") or result.get("error") or "", encoding="utf-8")
    rest = {name: {k: v for k, v in result.items() if k != "log"} for name, result in results.items()}
    (folder / "results.json").write_text(json.dumps(rest, indent=1, default=str), encoding="utf-8")
    return folder


def finish(args: argparse.Namespace, root: Path, job: dict, experiments: Sequence[Experiment], results: dict) -> int:
    """Bring back what landed; the logs, the table, the sweep report; the exit status."""
    names = [e.name for e in experiments]
    again = "python -m pipeline.sweep.workspace" + (f" --git-remote {job['remote']}" if job["remote"] else "")
    try:
        back = bring_back(root, names, job["remote"], args.step_timeout * len(names))
    except (SweepError, subprocess.SubprocessError, ValueError) as exc:
        log.error("Could not bring the experiments back: %s. Once that is fixed: %s <names>", exc, again)
        back = {}
    landed = [n for n in names if n in back and not back[n]["missing"]]
    for name in names:
        if back.get(name, {}).get("missing"):
            missing = ", ".join(back[name]["missing"])
            log.error(
                "%s landed, but dvc exp apply cannot restore %s: not in the DVC remote %s as seen from here. Give the "
                "workers and this machine one DVC remote (S3, or one shared path), then %s %s",
                name, missing, job["dvc_url"], again, name,
            )  # fmt: skip
        elif name in landed and not results.get(name, {"ok": True})["ok"]:  # its push went through, then...
            say(f"{name} landed, although its task then failed {failure(results[name])}")
    logs = save_logs(root, job["sweep"], results).relative_to(root)
    if job.get("stopped"):
        say(f"Stopped. {len(landed)} of {len(names)} experiment(s) landed: {', '.join(landed) or 'none'}. Logs: {logs}")
        return 130
    metrics = {name: back[name]["metrics"] for name in landed}
    say(f"\n{spec.comparison_table(experiments, metrics, args.metrics)}\n")
    say(
        f"{len(landed)} of {len(names)} experiment(s) landed: dvc exp show; dvc exp apply <name>; "
        f"MLflow: tags.\"{tracking.SWEEP_TAG}\" = '{job['sweep']}'. Logs: {logs}"
    )
    if landed:
        try:
            from pipeline.sweep.report import build_sweep_report

            say(f"Sweep report: {build_sweep_report(job['sweep'], root, landed)}")
        except Exception as exc:  # noqa: BLE001 - the experiments landed whatever the report does
            log.error("sweep report failed: %s; rerun with `python -m pipeline.sweep.report %s`", exc, job["sweep"])
    return 0 if len(landed) == len(names) else 1


def run(args: argparse.Namespace) -> int:
    root, target = workspace.workspace_root(Path.cwd()), ray_target(args.address)
    sweep_id = time.strftime("sw%Y%m%d-%H%M%S-", time.gmtime()) + secrets.token_hex(2)  # sortable and unique
    sweep_id = spec.check_name(args.name) if args.name else sweep_id
    if args.dry_run:
        for exp in spec.plan(sweep_id, args.set_param, args.max_experiments):
            say(exp.name, " ".join(f"-S {p}" for p in exp.set_params) or "(no change)")
        return 0
    try:
        experiments, job = prepare(args, root, target, sweep_id)
    except KeyboardInterrupt:
        say("Stopped before anything was submitted; nothing was left behind.")
        return 130
    if args.jobs and not target.local:
        log.info("JOBS=%s applies to a local Ray instance; the cluster runs as many at once as it has CPUs.", args.jobs)
    results: dict[str, dict[str, Any]] = {}
    with Stops().installed() as stops:
        try:
            with ray_session(target, args.jobs, stops) as ray:
                submit_and_wait(ray, job, experiments, args, stops, results)
        except KeyboardInterrupt:
            job["stopped"] = True
        finally:
            stops.raising = False
            workspace.delete_ref(root, job["ref"], job["remote"])
        return finish(args, root, job, experiments, results)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.sweep",
        description="Run a sweep of DVC experiments on Ray: locally, or on the cluster at RAY_ADDRESS.",
    )
    add = parser.add_argument
    add("-S", "--set-param", action="append", default=[], metavar="[FILE:]KEY=VALUES",
        help="as dvc exp run -S; comma lists expand to the cartesian product (repeatable)")  # fmt: skip
    add("--jobs", type=lambda t: int(t) if t.strip() else None,  # make passes JOBS= empty
        help="local Ray: at most this many at once (JOBS; default: all cores)")  # fmt: skip
    add("--gpus", type=lambda t: float(t) if t.strip() else None,
        help="GPUs per experiment (SWEEP_GPUS; default: 1 if the cluster has GPUs)")  # fmt: skip
    add("--retries", type=int, default=2, help="Ray retries of an experiment whose worker died (default 2)")
    add("--step-timeout", type=float, default=600.0, metavar="S",
        help="time limit of each other step of an experiment, and of bringing it back (default 600 s)")  # fmt: skip
    add("--run-timeout", type=float, default=86_400.0, metavar="S",
        help="time limit of an experiment's dvc exp run (default 86400 s, a day)")  # fmt: skip
    add("--name", help="sweep id (default: sw<date>-<time>-<random>); experiments are <id>-<k>")
    add("--address", default=os.environ.get("RAY_ADDRESS"), help="Ray cluster (default: RAY_ADDRESS; unset: local)")
    add("--git-remote", default="origin", help="cluster: the git remote workers fetch from and push to")
    add("--metrics", type=lambda s: [m for m in s.split(",") if m], default=list(spec.DEFAULT_METRICS),
        help="metrics of the table, comma-separated; the first is the progress lines' headline")  # fmt: skip
    add("--max-experiments", type=int, default=1000, help="refuse larger sweeps (default 1000)")
    add("--dry-run", action="store_true", help="print the experiments and exit")
    args = parser.parse_args(argv)
    if args.retries < 0 or not args.metrics or min(args.step_timeout, args.run_timeout) <= 0:
        parser.error("--retries must be 0 or more, --metrics name one at least, the timeouts be above 0")
    if (args.jobs is not None and args.jobs < 1) or (args.gpus or 0) < 0:
        parser.error(f"JOBS={args.jobs} or SWEEP_GPUS={args.gpus}: give at least 1 experiment at once, 0 GPUs or more")
    return args


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
