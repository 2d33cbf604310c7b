"""Fast tests of the sweep's parts: ``-S`` expansion, names, checks, the table, the worker's steps,
the workspace snapshot (real git in a temporary folder) and the supervisor (real processes)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from pipeline.sweep import spec, supervise, worker, workspace
from pipeline.sweep.__main__ import Target, cluster_token, experiment_names, parse_args, ray_environment, ray_target
from pipeline.sweep.spec import Experiment, SweepError

GIT = ["git", "-c", "user.name=test", "-c", "user.email=test@example.invalid"]
IDENTITY = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}


# -- -S expansion, as dvc exp run --queue does it ---------------------------------------------


def test_comma_lists_expand_to_the_cartesian_product() -> None:
    combos = spec.expand(["train.learning_rate=0.1,0.2", "train.epochs=50", "grid.depth=[1],[2,3]"])
    assert combos == [
        ("params.yaml:train.learning_rate=0.1", "params.yaml:train.epochs=50", "params.yaml:grid.depth=[1]"),
        ("params.yaml:train.learning_rate=0.1", "params.yaml:train.epochs=50", "params.yaml:grid.depth=[2,3]"),
        ("params.yaml:train.learning_rate=0.2", "params.yaml:train.epochs=50", "params.yaml:grid.depth=[1]"),
        ("params.yaml:train.learning_rate=0.2", "params.yaml:train.epochs=50", "params.yaml:grid.depth=[2,3]"),
    ]


def test_bracketed_values_stay_intact() -> None:
    assert spec.expand(["train.seeds=[0],[1]"]) == [("params.yaml:train.seeds=[0]",), ("params.yaml:train.seeds=[1]",)]
    assert spec.expand(["train.seeds=[0,1,2]"]) == [("params.yaml:train.seeds=[0,1,2]",)]
    assert spec.expand(["other.yaml:a.b=1,2"]) == [("other.yaml:a.b=1",), ("other.yaml:a.b=2",)]


def test_no_set_param_is_one_unchanged_experiment() -> None:
    assert spec.expand([]) == [()]
    (exp,) = spec.plan("s", [])
    assert exp == Experiment("s-1", ()) and exp.overrides == {}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train.learning_rate"], "expected key=value"),
        (["train.seeds=[0"], "train.seeds=[0"),
        (["train.x=glob(*)"], "not supported"),
    ],
)
def test_bad_set_params_are_refused(args: list[str], message: str) -> None:
    with pytest.raises(SweepError, match=re.escape(message)):
        spec.expand(args)


def test_plan_names_experiments_and_caps_the_count() -> None:
    plan = spec.plan("sw1", ["train.learning_rate=" + ",".join(str(i / 100) for i in range(1, 12))])
    assert [e.name for e in plan][:2] == ["sw1-01", "sw1-02"] and plan[-1].name == "sw1-11"
    assert plan[0].overrides == {"train.learning_rate": "0.01"}
    assert Experiment("x", ("other.yaml:a.b=1",)).overrides == {"other.yaml:a.b": "1"}
    with pytest.raises(SweepError, match="exceed --max-experiments 3"):
        spec.plan("sw1", ["train.epochs=1,2,3,4"], max_experiments=3)


@pytest.mark.parametrize("name", ["Upper", "-dash", "with space", "a" * 42, "ref/slash"])
def test_bad_sweep_names_are_refused(name: str) -> None:
    with pytest.raises(SweepError, match="--name"):
        spec.check_name(name)


# -- checks ---------------------------------------------------------------------------------------


def test_a_gpu_per_task_when_there_are_gpus() -> None:
    assert spec.gpus_per_task(None, 0) == 0 and spec.gpus_per_task(None, 8) == 1
    assert spec.gpus_per_task(0, 8) == 0 and spec.gpus_per_task(0.5, 1) == 0.5
    with pytest.raises(SweepError, match="has 0 GPU"):
        spec.gpus_per_task(1, 0)


def test_remote_workers_need_a_tracking_server() -> None:
    spec.check_tracking("sqlite:////tmp/mlflow.db", remote_workers=False)
    spec.check_tracking("http://10.0.0.5:5000", remote_workers=True)
    with pytest.raises(SweepError, match=r"cannot write to.*make server"):
        spec.check_tracking("sqlite:////tmp/mlflow.db", remote_workers=True)


def test_ray_addresses() -> None:
    assert ray_target(None).local and ray_target("").local and ray_target("local").local
    target = ray_target("10.1.2.3:6379")
    assert (target.host, target.port, target.local, target.loopback) == ("10.1.2.3", 6379, False, False)
    assert ray_target("127.0.0.1:6379").loopback and ray_target("localhost:1234").loopback
    assert ray_target("ray://head.example:10001").host == "head.example"
    assert ray_target("auto") == Target("auto")
    for bad in ("head", "head:", "head:port", "head:70000", ":6379"):
        with pytest.raises(SweepError, match="expected host:port"):
            ray_target(bad)


def test_token_authentication_stays_on_and_is_passed_explicitly() -> None:
    environ = {"PATH": "/usr/bin"}
    local = ray_environment(Target(None), environ)
    assert environ == {"PATH": "/usr/bin"}  # nothing set behind the caller's back
    assert local["RAY_AUTH_MODE"] == "token" and local["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"
    assert len(local["RAY_AUTH_TOKEN"]) == 64 != ray_environment(Target(None), {})["RAY_AUTH_TOKEN"]  # its own
    assert "RAY_AUTH_TOKEN" not in ray_environment(Target(None), {"RAY_AUTH_TOKEN": "mine"})
    assert ray_environment(ray_target("10.1.2.3:6379"), {}) == {"RAY_AUTH_MODE": "token"}  # a cluster's: the user's
    assert "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" in ray_environment(ray_target("127.0.0.1:6379"), {})
    with pytest.raises(SweepError, match="only with Ray's token authentication"):
        ray_environment(Target(None), {"RAY_AUTH_MODE": "disabled"})


def test_a_clusters_token_comes_from_a_private_file(tmp_path: Path) -> None:
    with pytest.raises(SweepError, match=r"No Ray token.*ray get-auth-token"):
        cluster_token({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "none")})
    token = tmp_path / "token"
    token.write_text("secret\n")
    token.chmod(0o644)  # as ray get-auth-token --generate leaves it
    with pytest.raises(SweepError, match=f"mode 644.*chmod 600 {re.escape(str(token))}"):
        cluster_token({"RAY_AUTH_TOKEN_PATH": str(token)})
    token.chmod(0o600)
    assert cluster_token({"RAY_AUTH_TOKEN_PATH": str(token)}) == ("secret", str(token))
    assert cluster_token({"RAY_AUTH_TOKEN": "env", "RAY_AUTH_TOKEN_PATH": str(token)}) == ("env", "RAY_AUTH_TOKEN")


def test_make_passes_empty_jobs_and_gpus() -> None:
    args = parse_args(["-S", "train.epochs=1,2", "--jobs", "", "--gpus", ""])
    assert (args.jobs, args.gpus, args.set_param) == (None, None, ["train.epochs=1,2"])
    assert parse_args(["--jobs", "3", "--gpus", "0.5", "--metrics", "loss"]).jobs == 3
    for bad in (["--retries", "-1"], ["--step-timeout", "0"], ["--jobs", "0"], ["--gpus", "-1"]):
        with pytest.raises(SystemExit):
            parse_args(bad)
    defaults = parse_args([])
    assert (defaults.step_timeout, defaults.run_timeout) == (600, 86_400)


# -- results --------------------------------------------------------------------------------------

SHOWN = {
    "workspace": {
        "data": {
            "results/d1/metrics.json": {"data": {"accuracy": 0.93, "vanishing_index": 1.0, "epochs": 3, "ok": True}},
            "results/d4/metrics.json": {"data": {"accuracy": 0.35, "vanishing_index": 0.0147}},
            "results/d5/metrics.json": {"error": {"type": "FileNotFoundError"}},
        }
    }
}


def test_variant_metrics_and_headline() -> None:
    metrics = spec.variant_metrics(SHOWN)
    assert metrics == {
        "d1": {"accuracy": 0.93, "vanishing_index": 1.0, "epochs": 3.0},  # the boolean is dropped
        "d4": {"accuracy": 0.35, "vanishing_index": 0.0147},
    }
    assert spec.headline(metrics) == "accuracy 0.35-0.93 (2 variants)"
    assert spec.headline({"d1": metrics["d1"]}) == "accuracy 0.93"
    assert spec.headline({}, "loss") == "no loss"


def test_comparison_table() -> None:
    exps = spec.plan("s", ["train.learning_rate=0.1,0.5", "train.epochs=3"])
    table = spec.comparison_table(exps, {"s-1": spec.variant_metrics(SHOWN)}, spec.DEFAULT_METRICS)
    assert table.splitlines() == [
        "| experiment | train.learning_rate | variant | accuracy | vanishing_index |",
        "| --- | --- | --- | --- | --- |",
        "| s-1 | 0.1 | d1 | 0.93 | 1 |",
        "| s-1 | 0.1 | d4 | 0.35 | 0.0147 |",
        "| s-2 | 0.5 | did not land |  |  |",
        "Same in every experiment: train.epochs=3",
    ]
    (one,) = spec.plan("t", ["train.epochs=3"])
    assert spec.comparison_table([one], {}, ["accuracy"]).splitlines()[2] == "| t-1 | 3 | did not land |"


# -- the worker's steps ---------------------------------------------------------------------------

JOB = {
    "sweep": "s",
    "name": "s-1",
    "git_url": "/ws",
    "ref": "refs/sweeps/s",
    "base": "b" * 40,
    "commit": "c" * 40,
    "dvc_remote": "storage",
    "dvc_url": "/remote",
    "cache_dir": "/ws/.dvc/cache",
    "set_params": ["params.yaml:train.learning_rate=0.1"],
    "step_timeout": 60.0,
    "run_timeout": 600.0,
    "env": {"PIPELINE_SWEEP": "s", "MLFLOW_TRACKING_URI": "sqlite:////ws/mlflow.db"},
}


def test_steps_end_with_the_experiments_push() -> None:
    labels = [label for label, _ in worker.steps(JOB, "/tmp/c")]
    assert labels == [
        "clone",
        "fetch",
        "checkout",
        "changes",
        "dvc remote",
        "dvc cache",
        "dvc exp run",
        "metrics",
        "dvc push",
        "git push",
    ]
    steps = dict(worker.steps(JOB, "/tmp/c"))
    assert steps["changes"] == ["git", "read-tree", "-u", "--reset", "c" * 40]
    run_args = ["exp", "run", "--pull", "--name", "s-1", "-S", "params.yaml:train.learning_rate=0.1"]
    assert steps["dvc exp run"][3:] == run_args
    ref = f"refs/exps/bb/{'b' * 38}/s-1"  # where DVC keeps it: under the baseline
    assert worker.exp_ref(JOB) == ref and steps["git push"] == ["git", "push", "--quiet", "/ws", f"{ref}:{ref}"]
    cluster = {**JOB, "cache_dir": None, "commit": JOB["base"]}
    labels = [label for label, _ in worker.steps(cluster, "/tmp/c")]
    assert "changes" not in labels and "dvc cache" not in labels


def test_task_env_drops_other_stores_and_adds_the_sweeps() -> None:
    env = worker.task_env(JOB, {"PATH": "/usr/bin", "MLFLOW_TRACKING_URI": "http://other", "DVC_EXP_NAME": "x"})
    assert env["MLFLOW_TRACKING_URI"] == "sqlite:////ws/mlflow.db" and "DVC_EXP_NAME" not in env
    assert env["PIPELINE_SWEEP"] == "s" and env["PATH"].startswith(str(Path(sys.executable).parent))


def _job(tmp_path: Path, remote: Path, **changes: object) -> dict:
    return {**JOB, "git_url": str(remote), "work_root": str(tmp_path), **changes}


def test_an_attempt_whose_experiment_landed_runs_nothing(tmp_path: Path) -> None:
    """A retry after a worker died past its push: the ref is on the remote, so the attempt returns it as
    landed without cloning, training or logging anything (a clone would fail here: the ref is not a branch)."""
    remote = _repo(tmp_path / "ws")
    subprocess.run(["git", "update-ref", worker.exp_ref(JOB), "HEAD"], cwd=remote, check=True)
    result = worker.run_experiment(_job(tmp_path, remote))
    assert (result["ok"], result["earlier"]) == (True, True), result
    assert result["log"].splitlines()[0] == f"$ git ls-remote {remote} {worker.exp_ref(JOB)}"
    assert "an earlier attempt landed it" in result["log"] and "git clone" not in result["log"]
    assert not (tmp_path / "sweep-s").exists()  # the attempt's folder


def test_a_failed_step_is_reported_with_its_log(tmp_path: Path) -> None:
    result = worker.run_experiment(_job(tmp_path, tmp_path / "missing"))  # the remote's check fails
    assert (result["ok"], result["step"], result["status"], result["timed_out"]) == (False, "check", 128, None)
    assert "does not appear to be a git repository" in result["log"] or "does not exist" in result["log"], result


# -- the workspace snapshot, on real git ----------------------------------------------------------


def _repo(path: Path) -> Path:
    path.mkdir()
    (path / ".dvc").mkdir()
    (path / "kept.txt").write_text("1\n")
    (path / "gone.txt").write_text("1\n")
    (path / ".gitignore").write_text("ignored.txt\n")
    subprocess.run(["git", "init", "-q"], cwd=path, check=True)
    subprocess.run(["git", "add", "-A"], cwd=path, check=True)
    subprocess.run([*GIT, "commit", "-qm", "base"], cwd=path, check=True)
    return path


def test_snapshot_takes_the_working_tree_and_leaves_it_alone(tmp_path: Path) -> None:
    repo = _repo(tmp_path / "ws")
    assert workspace.workspace_root(repo / ".dvc") == repo
    clean = workspace.snapshot(repo, "s0")
    assert clean.commit == clean.base and clean.ref == "refs/sweeps/s0"

    (repo / "kept.txt").write_text("2\n")
    (repo / "gone.txt").unlink()
    (repo / "new.txt").write_text("new\n")
    (repo / "ignored.txt").write_text("not sent\n")
    subprocess.run(["git", "add", "kept.txt"], cwd=repo, check=True)  # the user's index: kept as it is
    before = subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True, text=True).stdout
    snap = workspace.snapshot(repo, "s1")
    assert snap.commit != snap.base == clean.base
    after = subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True, text=True).stdout
    assert after == before
    files = workspace.git(["ls-tree", "--name-only", snap.ref], repo).split()
    assert files == [".gitignore", "kept.txt", "new.txt"]  # gone.txt deleted, ignored.txt not sent
    assert workspace.git(["show", f"{snap.ref}:kept.txt"], repo) == "2"
    assert workspace.git(["rev-parse", f"{snap.commit}^"], repo) == snap.base

    workspace.delete_ref(repo, snap.ref)
    assert not workspace.git(["for-each-ref", "refs/sweeps/s1"], repo)


def test_workspace_errors_say_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(SweepError, match="not inside a git repository"):
        workspace.workspace_root(tmp_path)
    bare = tmp_path / "bare"
    bare.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=bare, check=True)
    with pytest.raises(SweepError, match="no commit yet"):
        workspace.workspace_root(bare)


def test_the_commit_must_be_on_the_remote(tmp_path: Path) -> None:
    repo = _repo(tmp_path / "ws")
    with pytest.raises(SweepError, match=r"no git remote 'origin'.*git remote add origin"):
        workspace.remote_url(repo)
    subprocess.run(["git", "init", "-q", "--bare", str(tmp_path / "origin.git")], check=True)
    subprocess.run(["git", "remote", "add", "origin", "../origin.git"], cwd=repo, check=True)
    assert workspace.remote_url(repo) == str(tmp_path / "origin.git")  # relative: made absolute
    head = workspace.git(["rev-parse", "HEAD"], repo)
    with pytest.raises(SweepError, match=r"not on the git remote 'origin'.*git push origin HEAD"):
        workspace.check_on_remote(repo, "origin", head)
    subprocess.run(["git", "push", "-q", "origin", "HEAD:refs/heads/main"], cwd=repo, check=True)
    workspace.check_on_remote(repo, "origin", head)
    (repo / "kept.txt").write_text("3\n")
    subprocess.run([*GIT, "commit", "-qam", "next"], cwd=repo, check=True)
    subprocess.run(["git", "push", "-q", "origin", "HEAD:refs/heads/main"], cwd=repo, check=True)
    workspace.check_on_remote(repo, "origin", head)  # an ancestor of what is there


# -- the supervisor, on real processes ------------------------------------------------------------

SUPERVISE = Path(supervise.__file__)


def test_supervisor_passes_the_exit_status(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(SUPERVISE), str(os.getpid()), str(tmp_path), "60", "sh", "-c", "exit 3"])
    assert done.returncode == 3 and tmp_path.exists()


def test_a_step_past_its_time_limit_is_stopped_whole(tmp_path: Path) -> None:
    """The command's whole group goes (grandchildren too), the guard says so and exits 124; the attempt's
    folder stays for the worker, which is still there, to report and clean up."""
    pids = tmp_path / "pids"
    script = f"sleep 60 & echo $! > {pids}; sleep 61 & echo $! >> {pids}; wait"
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, str(SUPERVISE), str(os.getpid()), str(tmp_path), "1", "sh", "-c", script],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert done.returncode == supervise.TIMED_OUT and time.monotonic() - started < 10
    assert "timed out after 1 s" in done.stderr and tmp_path.exists()
    assert not [pid for pid in map(int, pids.read_text().split()) if psutil.pid_exists(pid)]


def _wait_for(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("victim", ["worker", "launcher"])
def test_the_command_group_never_outlives_the_task(tmp_path: Path, victim: str) -> None:
    """SIGKILL of the Ray worker (the OOM killer), or of its direct child as Ray's force-cancel does:
    the guard SIGTERMs the command's whole group, grandchildren included, and removes the attempt folder."""
    attempt = tmp_path / "sweep-s" / "s-1.123"
    attempt.mkdir(parents=True)
    worker_code = (
        "import os, subprocess, sys, time\n"
        f"subprocess.Popen([sys.executable, {str(SUPERVISE)!r}, str(os.getpid()), {str(attempt)!r}, '600',"
        " 'sh', '-c', 'sleep 60 & sleep 61; wait'])\n"
        "time.sleep(60)\n"
    )
    worker_proc = subprocess.Popen([sys.executable, "-c", worker_code])
    tree = psutil.Process(worker_proc.pid)
    try:

        def sleepers() -> list[psutil.Process]:
            return [p for p in tree.children(recursive=True) if p.name() == "sleep"]

        # the guard runs in a session of its own, so it is no longer the worker's descendant once the launcher dies
        assert _wait_for(lambda: len(sleepers()) == 2)
        started = sleepers()
        if victim == "worker":
            worker_proc.send_signal(signal.SIGKILL)
            worker_proc.wait()
        else:
            (launcher,) = tree.children()
            launcher.send_signal(signal.SIGKILL)
        _, alive = psutil.wait_procs(started, timeout=10)
        assert not alive, alive
        assert _wait_for(lambda: not attempt.parent.exists())
    finally:
        worker_proc.kill()
        worker_proc.wait()


def test_experiment_names_default_to_the_pipelines_experiment(tmp_path: Path) -> None:
    """The MLflow experiments a sweep pre-creates: tracking.experiment, its overrides, else the default name."""
    lr = Experiment("a", ("params.yaml:train.learning_rate=0.1",))
    named = Experiment("b", ("params.yaml:tracking.experiment=other",))
    (tmp_path / "params.yaml").write_text("train: {epochs: 2}\n")
    assert experiment_names(tmp_path, [lr, named]) == {"vanishing-gradient", "other"}
    (tmp_path / "params.yaml").write_text("tracking: {experiment: mine}\n")
    assert experiment_names(tmp_path, [lr]) == {"mine"}


@pytest.mark.slow
def test_bring_back_fetches_outputs_from_the_relative_default_remote(tmp_path: Path) -> None:
    """A cluster sweep's experiment, pushed from a clone elsewhere, comes back usable although the committed
    DVC remote is a relative path (which DVC would resolve against the wrong folder); missing outputs are
    named, never passed over."""
    dvc = [sys.executable, "-m", "dvc"]
    ws = _repo(tmp_path / "ws")
    shutil.rmtree(ws / ".dvc")
    (ws / "make.py").write_text("import os, sys\nos.makedirs('out', exist_ok=True)\nopen('out/a', 'w').write('5')\n")
    (ws / "dvc.yaml").write_text("stages:\n  make:\n    cmd: python make.py\n    deps: [make.py]\n    outs: [out]\n")
    subprocess.run([*dvc, "init", "-q"], cwd=ws, check=True)
    subprocess.run([*dvc, "remote", "add", "-d", "storage", "../storage"], cwd=ws / ".dvc", check=True)
    assert "url = ../storage" in (ws / ".dvc" / "config").read_text()  # relative to .dvc/: tmp_path/ws/storage
    subprocess.run(["git", "add", "-A"], cwd=ws, check=True)
    subprocess.run([*GIT, "commit", "-qm", "dvc"], cwd=ws, check=True)
    subprocess.run(["git", "clone", "-q", "--bare", str(ws), str(tmp_path / "origin.git")], check=True)
    subprocess.run(["git", "remote", "add", "origin", str(tmp_path / "origin.git")], cwd=ws, check=True)

    clone = tmp_path / "elsewhere" / "clone"  # a worker's clone: the remote given by its absolute location
    subprocess.run(["git", "clone", "-q", str(tmp_path / "origin.git"), str(clone)], check=True)
    subprocess.run([*dvc, "remote", "modify", "--local", "storage", "url", str(ws / "storage")], cwd=clone, check=True)
    subprocess.run([*dvc, "exp", "run", "-q", "--name", "s-1"], cwd=clone, check=True, env={**os.environ, **IDENTITY})
    subprocess.run([*dvc, "push", "-q"], cwd=clone, check=True)
    ref = workspace.exp_refs(clone, ".", ["s-1"])["s-1"]
    subprocess.run(["git", "push", "-q", "origin", f"{ref}:{ref}"], cwd=clone, check=True)

    assert workspace.bring_back(ws, ["s-1", "s-2"], "origin") == {"s-1": {"missing": [], "metrics": {}}}
    subprocess.run([*dvc, "exp", "apply", "s-1"], cwd=ws, check=True)
    assert (ws / "out" / "a").read_text() == "5"

    shutil.rmtree(ws / ".dvc" / "cache")
    shutil.rmtree(ws / "storage" / "files")
    assert workspace.bring_back(ws, ["s-1"]) == {"s-1": {"missing": ["out"], "metrics": {}}}
