"""The MLflow UI over a store made by ``dvc repro``, in a real (headless) browser.

``make ui`` starts ``python -m pipeline.serve ui``, which prints the direct link to the
experiment's training runs; the test follows that link in Debian's chromium driven by
Playwright, checks the runs table, a run's metric charts and the report's artifacts,
and then stops ``make ui`` the way a person does (Ctrl-C) and checks that MLflow and
all of its worker processes are gone.

Needs /usr/bin/chromium (``.ci/run`` installs it). Where it is missing or cannot start
the test is skipped, except under CI (``CI`` set), where it fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.conftest import ROOT
from tests.e2e.conftest import BIN, clean_env, run

CHROMIUM = "/usr/bin/chromium"
# Root, no display, no network but the loopback (see shared/UI_NOTES.md).
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
LINK = re.compile(r"Training runs: (http://\S+/#/experiments/(\d+)/runs\S*)")
TIMEOUT_MS = 60_000


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def unavailable(reason: str) -> None:
    """Skip on a developer's machine; fail in CI, which must run the browser test."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI must run the browser test: .ci/run installs chromium)")
    pytest.skip(reason)


def expected_runs(project: Path) -> list[str]:
    """One run per variant and seed, named from run.json, plus the report's run."""
    names = ["report"]
    for run_json in sorted((project / "results").glob("*/run.json")):
        info = json.loads(run_json.read_text())
        names += [f"{info['name']}-seed-{seed}" for seed in info["seeds"]]
    return names


class MakeUi:
    """``make ui`` in the project copy, in its own process group, output to a file."""

    def __init__(self, project: Path, port: int, log: Path) -> None:
        self.log = log
        cmd = ["make", "--no-print-directory", "-o", ".venv/.installed", "ui", f"PORT={port}", f"BIN={BIN}"]
        with log.open("wb") as out:
            self.process = subprocess.Popen(
                cmd, cwd=project, env=clean_env(), stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                start_new_session=True,
            )  # fmt: skip
        self.children: list[psutil.Process] = []

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for_link(self, timeout_s: float = 180.0) -> re.Match[str]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if match := LINK.search(self.output()):
                # Everything started under make by now: MLflow runs in a session of its own.
                self.children = psutil.Process(self.process.pid).children(recursive=True)
                return match
            if self.process.poll() is not None:
                break
            time.sleep(0.2)
        raise AssertionError(f"make ui printed no 'Training runs:' link\n{self.output()}")

    def interrupt(self) -> list[psutil.Process]:
        """Ctrl-C, as in a terminal; returns whatever is still alive afterwards (killed)."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGINT)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        _, alive = psutil.wait_procs(self.children, timeout=20)
        for proc in alive:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(os.getpgid(proc.pid), signal.SIGKILL)
        return alive


@pytest.fixture
def browser() -> Iterator[object]:
    if not Path(CHROMIUM).is_file():
        unavailable(f"{CHROMIUM} is missing: apt-get install chromium")
    from playwright.sync_api import Error, sync_playwright

    with sync_playwright() as pw:
        try:
            chromium = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        except Error as exc:
            unavailable(f"chromium cannot be launched: {str(exc).splitlines()[0]}")
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.mark.slow
def test_the_printed_link_opens_the_study(make_project, browser, tmp_path: Path) -> None:
    """What a newcomer sees after `make repro`, `make ui` and the printed link, without clicking:
    the chart view, whose first chart is training accuracy with one line per variant; a table of one
    row per variant. Then: a variant's seeds unfold under it, and the Models tab lists the replicates."""
    project = make_project()
    run(["dvc", "repro"], project)
    variants = sorted(json.loads(p.read_text())["name"] for p in (project / "results").glob("*/run.json"))
    seeds = expected_runs(project)
    assert len(variants) == 3, variants

    ui = MakeUi(project, free_port(), tmp_path / "make-ui.log")
    try:
        match = ui.wait_for_link()
        link, experiment_id = match.group(1), match.group(2)
        assert "viewStateShareKey=study-" in link, link
        assert ui.children, "nothing started under make ui"

        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(TIMEOUT_MS)
        # The UI polls forever: wait for `load`, then for the elements (networkidle never comes).
        page.goto(link, wait_until="load")
        assert f"/#/experiments/{experiment_id}/runs" in page.url
        page.locator(".js-plotly-plot").first.wait_for()
        # The first chart: training accuracy, a line per variant (legend "<run> (<metric>)").
        for name in variants:
            page.get_by_text(f"{name} (accuracy)", exact=True).first.wait_for()
        texts = page.inner_text("body")
        charts = texts[texts.index("matching runs") :]  # the chart area, after the runs table
        assert charts.index("Model metrics") < charts.index("grad_bias"), "accuracy's section comes first"
        legends = re.findall(r"^[\w.-]+ \(([^()\n]+)\)$", charts, flags=re.M)
        assert legends and legends[0] == "accuracy", legends[:5]
        # The table: one row per variant (and the report), seeds folded away.
        for name in variants:
            page.get_by_role("link", name=name, exact=True).first.wait_for()
        assert not page.get_by_role("link", name=f"{variants[0]}-seed-0", exact=True).count()
        page.screenshot(path=tmp_path / "study.png")

        # A variant unfolds into its seeds.
        row = page.locator(".ag-row", has=page.get_by_role("link", name=variants[0], exact=True)).first
        row.locator("button[data-component-id*='runnamecellrenderer']").first.click()
        page.get_by_role("link", name=f"{variants[0]}-seed-0", exact=True).first.wait_for()
        page.get_by_role("link", name=f"{variants[0]}-seed-1", exact=True).first.wait_for()
        page.screenshot(path=tmp_path / "seeds.png")

        # The Models tab lists every replicate as an MLflow model.
        page.get_by_role("link", name="Models", exact=True).first.click()
        for name in (n for n in seeds if "-seed-" in n):
            page.get_by_text(name, exact=True).first.wait_for()
        page.screenshot(path=tmp_path / "models.png")
        page.close()
    finally:
        leaked = ui.interrupt()
    assert not leaked, f"processes left running after Ctrl-C on make ui: {leaked}"
    assert (tmp_path / "study.png").stat().st_size > 10_000
    print(f"screenshots: {tmp_path}")


def test_make_ui_runs_the_serve_module() -> None:
    """`make ui` is `python -m pipeline.serve ui` with HOST and PORT (the link comes from there)."""
    # --no-print-directory: under `make test` this is a sub-make, which would print directory lines.
    command = ["make", "--no-print-directory", "-n", "-o", ".venv/.installed", "ui", "PORT=5123", "HOST=127.0.0.1"]
    result = run(command, ROOT)
    assert re.search(r"python -m pipeline\.serve ui --host 127\.0\.0\.1 --port 5123$", result.stdout.strip(), re.M)
