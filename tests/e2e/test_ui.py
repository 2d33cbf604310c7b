"""The MLflow UI over a store made by ``dvc repro``, in a real (headless) browser.

``make ui`` on a port other than 5000 starts ``python -m pipeline.serve ui``, which prints the
direct link to the study's charts, the report's link and how to keep the UI in Model training
mode; the test follows them in Debian's chromium driven by Playwright as a newcomer would: the
charts and their legends, a click into a variant run and into a logged model (mode, breadcrumb,
links), and then stops ``make ui`` the way a person does (Ctrl-C) and checks that MLflow and all of
its worker processes are gone.

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

from pipeline import serve
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
REPORT = re.compile(r"^Report: (http://\S+)$", re.M)
PICK_MODE = re.compile(r'"Model training" is picked at the top left of (http://\S+) ')
TIMEOUT_MS = 60_000
# A run's or model's rendered description; pages left behind stay in the document, hidden.
DESCRIPTION = "[data-testid='note-editor-preview-content']:visible"
LOOPBACK = re.compile(r"^https?://(127\.0\.0\.1|localhost|\[::1\])[:/]")


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
        """The "Training runs:" link, once everything make ui prints is there."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if (match := LINK.search(self.output())) and "(Ctrl-C to stop)" in self.output():
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


def mode(page: object) -> str:
    """The UI's mode as its sidebar shows it: GenAI lists "Evaluation runs", Model training does not."""
    sidebar = page.locator("aside nav:visible").first
    sidebar.get_by_role("link").first.wait_for()
    return "GenAI" if sidebar.get_by_role("link", name="Evaluation runs").count() else "Model training"


def breadcrumb(page: object) -> list[str]:
    return page.locator("div[class*='breadcrumb']:visible").first.inner_text().split()


def foreign_links(page: object, base: str) -> list[str]:
    """Links on the page (MLflow's and those in descriptions) into a loopback UI other than ``base``."""
    hrefs = page.eval_on_selector_all("a[href]", "els => els.map(e => e.href)")
    return [h for h in hrefs if LOOPBACK.match(h) and not h.startswith(base + "/")]


def description_links(page: object) -> list[str]:
    """The links in the Markdown description of the run or model the page shows."""
    page.locator(DESCRIPTION).first.wait_for()
    return page.locator(DESCRIPTION).first.locator("a[href]").evaluate_all("els => els.map(e => e.href)")


def legend_entry(scope: object, run_name: str, metric: str) -> dict[str, object]:
    """A chart legend's entry: its line colour and whether it lies inside the legend's visible box."""
    return scope.get_by_text(f"{run_name} ({metric})", exact=True).first.evaluate(
        """e => {
            let box = e.parentElement;
            while (box && getComputedStyle(box).overflowY !== 'auto') box = box.parentElement;
            const r = e.getBoundingClientRect(), b = box.getBoundingClientRect();
            return {stroke: e.parentElement.querySelector('path').style.stroke,
                    shown: r.top >= b.top - 1 && r.bottom <= b.bottom + 1};
        }"""
    )


def rgb(hex_colour: str) -> str:
    """``#0072b2`` -> ``rgb(0, 114, 178)``, as the browser reports a line's colour."""
    return "rgb({}, {}, {})".format(*(int(hex_colour.lstrip("#")[i : i + 2], 16) for i in (0, 2, 4)))


@pytest.mark.slow
def test_a_newcomer_follows_the_printed_links(make_project, browser, tmp_path: Path) -> None:
    """After `make repro` and `make ui PORT=<not 5000>`, what make ui prints and a browser shows
    (:func:`walk`); then Ctrl-C stops MLflow and every worker it started."""
    port = free_port()
    assert port != 5000
    # The report links its runs into the UI named by report.ui_url: the one this test starts.
    project = make_project(lambda params: params["report"].update(ui_url=f"http://127.0.0.1:{port}/"))
    run(["dvc", "repro"], project)
    variants = sorted(json.loads(p.read_text())["name"] for p in (project / "results").glob("*/run.json"))
    seeds = [n for n in expected_runs(project) if "-seed-" in n]
    assert len(variants) == 3, variants

    ui = MakeUi(project, port, tmp_path / "make-ui.log")
    try:
        ui.wait_for_link()
        assert ui.children, "nothing started under make ui"
        walk(browser, ui.output(), port, variants, seeds, tmp_path)
    finally:
        leaked = ui.interrupt()
    assert not leaked, f"processes left running after Ctrl-C on make ui: {leaked}"
    assert (tmp_path / "study.png").stat().st_size > 10_000
    print(f"screenshots: {tmp_path}")


def walk(browser: object, printed: str, port: int, variants: list[str], seeds: list[str], shots: Path) -> None:
    """A newcomer follows what make ui ``printed``: the study's charts open in Model training mode,
    accuracy first, every variant in its colour and in every story chart's legend (two or three fit a
    card; its section says where the rest are; its full screen shows them all), no report run in them;
    a variant unfolds into its seeds. A fresh browser opens a run from the table in MLflow's GenAI mode;
    after the printed step, a variant run and a logged model open in Model training mode with their
    breadcrumb, and no link on their pages, the report's run page or the report itself leads elsewhere."""
    from mlflow import MlflowClient

    base = f"http://127.0.0.1:{port}"
    match = LINK.search(printed)
    link, experiment_id = match.group(1), match.group(2)
    assert link.startswith(f"{base}/#/") and "viewStateShareKey=study-" in link, link
    report_link, pick_mode = REPORT.search(printed).group(1), PICK_MODE.search(printed).group(1)
    assert report_link.startswith(f"{base}/#/") and pick_mode == f"{base}/#/experiments", printed
    client = MlflowClient(base)  # the UI is a tracking server too
    colours = {
        r.info.run_name: r.data.tags.get("mlflow.runColor")
        for r in client.search_runs([experiment_id], max_results=500)
        if r.info.run_name in variants
    }
    assert all(colours.values()) and len(colours) == len(variants), f"variant runs without mlflow.runColor: {colours}"

    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(TIMEOUT_MS)
    # The UI polls forever: wait for `load`, then for the elements (networkidle never comes).
    page.goto(link, wait_until="load")
    assert f"/#/experiments/{experiment_id}/runs" in page.url
    page.locator(".js-plotly-plot").first.wait_for()
    with contextlib.suppress(Exception):  # MLflow's assistant panel opens once per browser: close it
        page.locator("[data-component-id='mlflow.assistant.chat_panel.close']").click(timeout=5_000)
    assert mode(page) == "Model training"
    # The charts: training accuracy first, a line per variant in its colour, in every story chart's legend.
    for name in variants:
        page.get_by_text(f"{name} (accuracy)", exact=True).first.wait_for()
    texts = page.inner_text("body")
    charts = texts[texts.index("matching runs") :]  # the chart area, after the runs table
    assert charts.index(f"Model metrics · {serve.LEGEND_HINT}") < charts.index("grad_bias"), "story first"
    legends = re.findall(r"^([\w.-]+) \(([^()\n]+)\)$", charts, flags=re.M)
    assert legends and legends[0][1] == "accuracy", legends[:5]
    assert "report" not in {name for name, _ in legends}, "the report run (no metrics) is charted"
    for metric in serve.STORY:
        assert sorted(name for name, m in legends if m == metric) == variants, metric
    for name in variants:
        assert legend_entry(page, name, "accuracy")["stroke"] == rgb(colours[name]), name
    page.screenshot(path=shots / "study.png")
    # A card's legend shows what fits; its section says where all are; its full screen shows them all.
    card = page.locator("[data-testid='experiment-view-compare-runs-card']").first
    card.locator("button[data-component-id='fullscreen_button_chartcard']").click()
    full = page.get_by_role("dialog")
    assert all(legend_entry(full, name, "accuracy")["shown"] for name in variants)
    page.keyboard.press("Escape")
    # The table: one row per variant, seeds folded away; a variant unfolds into its seeds.
    for name in variants:
        page.get_by_role("link", name=name, exact=True).first.wait_for()
    assert not page.get_by_role("link", name=f"{variants[0]}-seed-0", exact=True).count()
    row = page.locator(".ag-row", has=page.get_by_role("link", name=variants[0], exact=True)).first
    row.locator("button[data-component-id*='runnamecellrenderer']").first.click()
    page.get_by_role("link", name=f"{variants[0]}-seed-1", exact=True).first.wait_for()

    # MLflow's own links carry no mode: a fresh browser opens a run from the table in GenAI mode.
    page.get_by_role("link", name=variants[0], exact=True).first.click()
    page.get_by_text("About this run").first.wait_for()
    assert mode(page) == "GenAI", "MLflow now keeps Model training mode by itself: drop make ui's hint"
    # The printed step, once; then a variant run opens in Model training mode.
    page.goto(pick_mode, wait_until="load")
    page.get_by_text("Model training", exact=True).first.click()
    page.goto(link, wait_until="load")
    page.get_by_role("link", name=variants[-1], exact=True).first.click()
    page.get_by_text("About this run").first.wait_for()
    assert (mode(page), breadcrumb(page)) == ("Model training", ["vanishing-gradient", "Runs"])
    links = description_links(page)  # the variant's description links the report, in this UI
    assert links and all(h.startswith(f"{base}/#/") for h in links), links
    assert not foreign_links(page, base)

    # The Models tab lists every replicate; one opens in Model training mode.
    page.locator("aside nav").get_by_role("link", name="Models", exact=True).click()
    for name in seeds:
        page.get_by_text(name, exact=True).first.wait_for()
    page.screenshot(path=shots / "models.png")
    page.get_by_role("link", name=seeds[0], exact=True).first.click()
    page.get_by_text("About this logged model").first.wait_for()
    assert (mode(page), breadcrumb(page)) == ("Model training", ["vanishing-gradient", "Models"])
    assert not foreign_links(page, base)

    # The report's link: index.html in its run's artifacts, whose links lead to this UI; so do the run's.
    page.goto(report_link, wait_until="load")
    report = page.locator("iframe").first.element_handle().content_frame()  # MLflow's view of an HTML file
    report.locator("a[href]").first.wait_for()
    assert mode(page) == "Model training"
    assert not foreign_links(report, base), "the report's own links"
    page.screenshot(path=shots / "report.png")
    page.get_by_text("Overview", exact=True).first.click()
    links = description_links(page)
    assert links and all(h.startswith(f"{base}/#/") for h in links), links
    assert not foreign_links(page, base)
    page.close()


def test_make_ui_runs_the_serve_module() -> None:
    """`make ui` is `python -m pipeline.serve ui` with HOST and PORT (the link comes from there)."""
    # --no-print-directory: under `make test` this is a sub-make, which would print directory lines.
    command = ["make", "--no-print-directory", "-n", "-o", ".venv/.installed", "ui", "PORT=5123", "HOST=127.0.0.1"]
    result = run(command, ROOT)
    assert re.search(r"python -m pipeline\.serve ui --host 127\.0\.0\.1 --port 5123$", result.stdout.strip(), re.M)
