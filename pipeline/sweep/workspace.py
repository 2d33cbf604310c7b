"""The workspace side of a sweep: its code as one commit the workers can fetch, its git and DVC remotes.

As ``dvc exp run --queue`` does, the whole working tree becomes a commit on ``HEAD`` (built in a
temporary index: the user's index and files stay untouched) on the ref ``refs/sweeps/<id>``.
``python -m pipeline.sweep.workspace [--git-remote R] NAME...`` brings landed experiments back.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.sweep.spec import SweepError, variant_metrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Snapshot:
    """The sweep's code: the baseline commit, the commit with the working tree, and the ref that holds it."""

    base: str
    commit: str
    ref: str


def git(args: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 120) -> str:
    """Run git in a session of its own (a deferred Ctrl-C does not reach it): its stdout, else SweepError."""
    full_env = {**os.environ, "GIT_TERMINAL_PROMPT": "0", **(env or {})}
    try:
        done = subprocess.run(
            ["git", *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout, check=False,
            start_new_session=True,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        raise SweepError(f"git {' '.join(args)} did not finish within {timeout:g} s (in {cwd}).") from None
    if done.returncode != 0:
        raise SweepError(f"git {' '.join(args)} failed in {cwd}: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout.strip()


def workspace_root(cwd: Path) -> Path:
    """The git work tree containing ``cwd``; it must have a commit and a DVC project."""
    try:
        root = Path(git(["rev-parse", "--show-toplevel"], cwd))
    except SweepError:
        raise SweepError(f"{cwd} is not inside a git repository: a sweep runs DVC experiments of one.") from None
    try:
        git(["rev-parse", "--verify", "--quiet", "HEAD^{commit}"], root)
    except SweepError:
        raise SweepError(f"{root} has no commit yet: commit the project first (git add -A && git commit).") from None
    if not (root / ".dvc").is_dir():
        raise SweepError(f"{root} is not a DVC project (no .dvc folder): run dvc init, or make repro once.")
    return root


def identity(root: Path) -> dict[str, str]:
    """``GIT_AUTHOR_*`` and ``GIT_COMMITTER_*`` for the sweep's commits: the workspace's user, else a fallback."""
    who = {
        "NAME": git(["config", "--get", "--default", "vanishing-gradient sweep", "user.name"], root),
        "EMAIL": git(["config", "--get", "--default", "sweep@localhost", "user.email"], root),
    }
    return {f"GIT_{role}_{key}": value for role in ("AUTHOR", "COMMITTER") for key, value in who.items()}


def snapshot(root: Path, sweep_id: str) -> Snapshot:
    """Record the working tree as a commit on ``HEAD`` under ``refs/sweeps/<sweep_id>``."""
    base = git(["rev-parse", "HEAD^{commit}"], root)
    git_dir = Path(git(["rev-parse", "--absolute-git-dir"], root))
    with tempfile.TemporaryDirectory(prefix="sweep-index-") as tmp:
        index = Path(tmp) / "index"
        if (git_dir / "index").is_file():
            shutil.copy2(git_dir / "index", index)  # keeps git's stat cache: add -A stays fast
        env = {"GIT_INDEX_FILE": str(index)}
        git(["add", "-A", "."], root, env=env, timeout=600)
        tree = git(["write-tree"], root, env=env)
    commit = base
    if tree != git(["rev-parse", f"{base}^{{tree}}"], root):
        message = f"sweep {sweep_id}: uncommitted changes of the workspace"
        commit = git(["commit-tree", tree, "-p", base, "-m", message], root, env=identity(root))
    ref = f"refs/sweeps/{sweep_id}"
    git(["update-ref", ref, commit], root)
    return Snapshot(base, commit, ref)


def delete_ref(root: Path, ref: str, remote: str | None = None) -> None:
    """Remove the sweep's ref here (and on ``remote``); failures are only logged."""
    commands = [["update-ref", "-d", ref]]
    if remote:
        commands.append(["push", "--quiet", remote, f":{ref}"])
    for args in commands:
        try:
            git(args, root, timeout=60)
        except SweepError as exc:
            log.warning("could not remove %s: %s", ref, exc)


def remote_url(root: Path, remote: str = "origin") -> str:
    """The fetch URL of a git remote, a local path made absolute (workers do not share the cwd)."""
    try:
        url = git(["remote", "get-url", remote], root)
    except SweepError:
        raise SweepError(
            f"The workspace has no git remote '{remote}', which a cluster's workers fetch the code from: "
            f"git remote add {remote} <url>, then git push."
        ) from None
    path = root / Path(url).expanduser()  # an absolute url stays as it is
    return str(path.resolve()) if "://" not in url and path.exists() else url


def check_on_remote(root: Path, remote: str, commit: str) -> None:
    """``commit`` must be on ``remote`` (a ref there points at it or at a descendant we know of)."""
    shas = {line.split()[0] for line in git(["ls-remote", remote], root, timeout=60).splitlines() if line.strip()}
    ancestor = ["git", "merge-base", "--is-ancestor", commit]  # fails for a sha we do not have, too
    if any(subprocess.run([*ancestor, sha], cwd=root, capture_output=True).returncode == 0 for sha in shas):
        return
    raise SweepError(
        f"Commit {commit[:12]} (HEAD) is not on the git remote '{remote}', so the cluster's workers cannot check it "
        f"out: git push {remote} HEAD, then run the sweep again. (Uncommitted changes are sent for you.)"
    )


def dvc_config(root: Path) -> tuple[str, str, str]:
    """The default DVC remote's name and URL (as DVC resolves it: absolute) and the workspace's DVC cache folder."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        name = repo.config["core"].get("remote")
        remotes = repo.config.get("remote", {})
        cache_dir = str(repo.cache.local_cache_dir)
    if not name or name not in remotes:
        raise SweepError(
            "The workspace has no default DVC remote, where each experiment's outputs go: "
            "dvc remote add -d storage <path or URL>."
        )
    return name, str(remotes[name]["url"]), cache_dir


def exp_refs(root: Path, repo: str, names: Sequence[str] | None = None) -> dict[str, str]:
    """``{name: ref}`` of the experiments (among ``names``) in ``repo``: a git remote, or ``"."`` for the workspace."""
    listing = git(["ls-remote", repo, "refs/exps/*"], root)
    found = {ref.rsplit("/", 1)[-1]: ref for ref in (line.split()[-1] for line in listing.splitlines() if line)}
    return found if names is None else {n: found[n] for n in names if n in found}


def bring_back(root: Path, names: Sequence[str], git_remote: str | None = None) -> dict[str, dict[str, Any]]:
    """Fetch the landed experiments among ``names`` (their refs from ``git_remote``, if given) and their outputs,
    from the default DVC remote by its absolute URL: DVC would resolve a relative one against each experiment's
    own ``.dvc/config``. ``{name: {"missing": [outputs not in the cache], "metrics": ...}}``."""
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    refs = exp_refs(root, git_remote or ".", names)
    if not refs:
        return {}
    if git_remote:
        git(["fetch", "--quiet", git_remote, *(f"{ref}:{ref}" for ref in refs.values())], root, timeout=600)
    remote, url, _ = dvc_config(root)
    revs = list(refs.values())
    with Repo(str(root)) as repo:
        try:
            repo.fetch(revs=revs, workspace=False, remote=remote, config={"remote": {remote: {"url": url}}})
        except DvcException as exc:  # what did not come is listed below
            log.error("dvc fetch from %s failed: %s", url, exc)
        shown = repo.metrics.show(revs=revs)
        missing = {
            rev: [str(out) for out in repo.index.outs if out.use_cache and out.changed_cache()]
            for rev in repo.brancher(revs=revs, workspace=False)
        }
    return {n: {"missing": missing[r], "metrics": variant_metrics({r: shown.get(r, {})})} for n, r in refs.items()}


def main(argv: Sequence[str] | None = None) -> int:
    """Bring landed experiments and their outputs into the workspace; print as JSON which outputs are missing.
    Exit 0 when every one named is there with all its outputs, 1 if not."""
    parser = argparse.ArgumentParser(prog="python -m pipeline.sweep.workspace", description=main.__doc__)
    parser.add_argument("names", nargs="+", metavar="NAME", help="experiment names (<sweep id>-<k>)")
    parser.add_argument("--git-remote", help="fetch their refs from this git remote first (a cluster sweep: origin)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        found = bring_back(workspace_root(Path.cwd()), args.names, args.git_remote)
    except SweepError as exc:
        log.error("%s", exc)
        return 2
    print(json.dumps(found))
    return 0 if all(name in found and not found[name]["missing"] for name in args.names) else 1


if __name__ == "__main__":
    sys.exit(main())
