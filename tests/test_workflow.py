"""The GitHub Actions workflow and .ci/run: structure, shell syntax, and the chromium install step."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import ROOT

WORKFLOW = ROOT / ".github" / "workflows" / "ci.yml"
CI_RUN = ROOT / ".ci" / "run"
EXPRESSION = re.compile(r"\$\{\{.*?\}\}")


def workflow() -> dict[str, Any]:
    return yaml.safe_load(WORKFLOW.read_text(encoding="utf-8"))


def steps(wf: dict[str, Any]) -> list[dict[str, Any]]:
    return [step for job in wf["jobs"].values() for step in job["steps"]]


def scripts(wf: dict[str, Any]) -> list[str]:
    return [step["run"] for step in steps(wf) if "run" in step]


def commands(script: str) -> list[str]:
    """Non-empty, non-comment lines of a shell script."""
    return [line.strip() for line in script.splitlines() if line.strip() and not line.strip().startswith("#")]


def make_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text(encoding="utf-8")
    return set(re.findall(r"^([A-Za-z][\w-]*):", text, flags=re.MULTILINE))


def test_runs_lint_and_the_same_tests_as_ci_run() -> None:
    runs = "\n".join(scripts(workflow()))
    assert re.search(r"^make lint$", runs, flags=re.MULTILINE)
    # make test runs through .ci/run, so both install the same browser and database first.
    assert re.search(r"^bash \.ci/run$", runs, flags=re.MULTILINE) or re.search(r"^make test\b", runs, re.MULTILINE)
    assert commands(CI_RUN.read_text(encoding="utf-8"))[-1] == "make test"


def test_every_make_target_exists() -> None:
    used = {m for script in scripts(workflow()) for m in re.findall(r"\bmake ([a-z][\w-]*)", script)}
    assert used and used <= make_targets(), used - make_targets()


def test_actions_are_pinned() -> None:
    for step in steps(workflow()):
        if "uses" in step:
            assert re.fullmatch(r"[\w.-]+/[\w./-]+@(v\d+(\.\d+)*|[0-9a-f]{40})", step["uses"]), step["uses"]


def test_shell_syntax() -> None:
    for script in scripts(workflow()):
        text = EXPRESSION.sub("EXPR", script)
        result = subprocess.run(["bash", "-n"], input=text, capture_output=True, text=True)
        assert result.returncode == 0, f"{result.stderr}\n{script}"
    result = subprocess.run(["bash", "-n", str(CI_RUN)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def install_chromium_function() -> str:
    text = CI_RUN.read_text(encoding="utf-8")
    match = re.search(r"^install_chromium\(\) \{\n.*?^\}\n", text, flags=re.MULTILINE | re.DOTALL)
    assert match, "install_chromium() not found in .ci/run"
    run_at = [i for i, line in enumerate(text.splitlines()) if line.strip() in ("install_chromium", "make test")]
    assert len(run_at) == 2, "install_chromium must be called once, before make test"
    return match.group(0)


@pytest.mark.parametrize("present", [True, False])
def test_ci_run_installs_chromium_only_when_missing(tmp_path: Path, present: bool) -> None:
    """The function as written in .ci/run, with its chromium path and apt-get swapped for stubs."""
    browser = tmp_path / "chromium"
    if present:
        browser.write_text("#!/bin/sh\n")
        browser.chmod(0o755)
    stubs = tmp_path / "bin"
    stubs.mkdir()
    log = tmp_path / "apt.log"
    (stubs / "apt-get").write_text(f'#!/bin/sh\necho "apt-get DEBIAN_FRONTEND=$DEBIAN_FRONTEND $*" >> {log}\n')
    (stubs / "sudo").write_text('#!/bin/sh\nexec "$@"\n')  # not root: .ci/run uses sudo
    for stub in stubs.iterdir():
        stub.chmod(0o755)
    function = install_chromium_function().replace("/usr/bin/chromium", str(browser))
    env = {**os.environ, "PATH": f"{stubs}{os.pathsep}{os.environ['PATH']}"}
    script = f"set -euo pipefail\n{function}\ninstall_chromium\ninstall_chromium\n"
    subprocess.run(["bash", "-c", script], env=env, check=True, capture_output=True, text=True)
    calls = log.read_text().splitlines() if log.exists() else []
    if present:
        assert calls == []
    else:
        apt = [c for c in calls if c.startswith("apt-get ")]
        assert any(c.endswith("update -qq") for c in apt), calls
        install = [c for c in apt if " install " in c]
        assert install and all("DEBIAN_FRONTEND=noninteractive" in c and "-y" in c.split() for c in install), calls
        assert all(c.split()[-1] == "chromium" for c in install), calls


def test_workflow_schema() -> None:
    """GitHub's workflow schema, as vendored by check-jsonschema (offline), when it is installed."""
    pytest.importorskip("check_jsonschema", reason="check-jsonschema is not installed (optional)")
    result = subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.github-workflows", str(WORKFLOW)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
