"""The dashboard's study page as a browser renders it (#21 item 2): headless Chromium
(Debian's ``chromium``) loads ``prunesearch dashboard``'s ``/dashboard/studies/<id>`` on a
finished study with infeasible trials; the rendered DOM must show the objectives by name,
a Pareto-front plot whose points are split into exactly status's front, the other feasible
trials and the infeasible ones, and a "Best Trials" list of exactly status's front; a
screenshot of the page must be a real, non-blank picture of the app.

optuna-dashboard 0.21 draws the Pareto-front plot in the browser: it splits the trials into
feasible and infeasible from each trial's ``constraints`` (so this checks they are stored
where the dashboard reads them) and computes the non-dominated feasible trials itself,
while the "Best Trials" list comes from the server (``search.dashboard.feasible_front``).
Plotly keeps hover texts out of the DOM, so the plot's points are read from their SVG
positions and mapped back to objective values through the axis grid lines and tick labels.

Without ``chromium`` the test is skipped, except under ``CI=true`` (``.ci/run`` installs it)
where it fails. ``docs/dashboard.png`` is a ``screenshot`` of the quickstart study's page.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest

from search.config import load_config
from search.records import pareto_front
from search.runner import run_study
from search.storage import load_records
from tests.fakes import FakePool, tiny_config
from tests.test_dashboard import free_port, get_json, stop_server

ROOT = Path(__file__).resolve().parents[1]
WINDOW = (1400, 900)
PIXEL_TOL = 1.5  # a plotted point lies within this many pixels of its trial's values


def chromium_or_skip() -> str:
    found = shutil.which("chromium")
    if found:
        return found
    if os.environ.get("CI") == "true":
        pytest.fail("chromium is not installed: CI must run the dashboard's browser test (.ci/run installs it)")
    pytest.skip("Debian's chromium is not installed (apt-get install chromium)")


def chromium(url: str, tmp: Path, *mode: str) -> subprocess.CompletedProcess:
    """One headless Chromium run on ``url``; ``--virtual-time-budget`` lets the SPA's fetches
    and renders finish (virtual time waits on the network) before the DOM or picture is taken."""
    command = [chromium_or_skip(), "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               "--no-first-run", "--hide-scrollbars", f"--user-data-dir={tmp / 'chromium-profile'}",
               f"--window-size={WINDOW[0]},{WINDOW[1]}", "--virtual-time-budget=20000", *mode, url]
    return subprocess.run(command, capture_output=True, text=True, timeout=90, cwd=tmp)


def screenshot(url: str, path: Path, tmp: Path) -> Path:
    done = chromium(url, tmp, f"--screenshot={path}")
    assert path.exists(), f"chromium wrote no screenshot (exit {done.returncode}): {done.stderr[-2000:]}"
    return path


class Node:
    def __init__(self, tag: str, attrs: dict[str, str | None]):
        self.tag, self.attrs, self.children, self.text = tag, attrs, [], []

    def classes(self) -> set[str]:
        return set((self.attrs.get("class") or "").split())

    def walk(self):
        yield self
        for child in self.children:
            yield from child.walk()

    def find_all(self, tag: str | None = None, cls: str | None = None) -> list["Node"]:
        return [n for n in self.walk() if (tag is None or n.tag == tag) and (cls is None or cls in n.classes())]

    def all_text(self) -> str:
        """The text, a space between elements (the rendered page separates them by layout)."""
        return " ".join(part if isinstance(part, str) else part.all_text() for part in self.text)


class Tree(HTMLParser):
    """The DOM Chromium dumped, as a tree (Chromium closes every SVG element explicitly)."""

    VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}

    def __init__(self, html: str):
        super().__init__(convert_charrefs=True)
        self.root = Node("#root", {})
        self.stack = [self.root]
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        node = Node(tag, dict(attrs))
        self.stack[-1].children.append(node)
        self.stack[-1].text.append(node)
        if tag not in self.VOID:
            self.stack.append(node)

    def handle_endtag(self, tag):
        for i in range(len(self.stack) - 1, 0, -1):
            if self.stack[i].tag == tag:
                del self.stack[i:]
                return

    def handle_data(self, data):
        if self.stack[-1].tag not in ("script", "style"):
            self.stack[-1].text.append(data)


def translate(node: Node) -> tuple[float, float]:
    match = re.search(r"translate\(([-\d.e]+)[ ,]*([-\d.e]+)?\)", node.attrs.get("transform") or "")
    assert match, f"no translate() on <{node.tag} {node.attrs}>"
    return float(match.group(1)), float(match.group(2) or 0.0)


def axis_map(plot: Node, axis: str):
    """Pixel -> value along ``axis`` ('x' or 'y') of a linear plotly axis: its grid lines'
    positions paired with its tick labels' values."""
    grid = [translate(n)[0 if axis == "x" else 1] for n in plot.find_all("path", f"{axis}grid")]
    ticks = [float(n.find_all("text")[0].attrs["data-unformatted"]) for n in plot.find_all("g", f"{axis}tick")]
    assert len(grid) == len(ticks) >= 2, f"{axis} axis: {len(grid)} grid lines for {len(ticks)} ticks"
    (p0, v0), (p1, v1) = (grid[0], ticks[0]), (grid[-1], ticks[-1])
    return lambda value: p0 + (value - v0) * (p1 - p0) / (v1 - v0)


def plotted_groups(plot: Node, values: dict[int, tuple[float, float]]) -> list[set[int]]:
    """The trial numbers of each non-empty scatter trace of the Pareto-front plot, each point
    matched to the trial whose (x, y) values it is drawn at."""
    to_x, to_y = axis_map(plot, "x"), axis_map(plot, "y")
    expected = {n: (to_x(x), to_y(y)) for n, (x, y) in values.items()}
    (area,) = [g for g in plot.find_all("g", "xy") if "translate" in (g.attrs.get("transform") or "")]
    ox, oy = translate(area)  # points are drawn relative to the plot area, grid lines are not
    groups = []
    for trace in area.find_all("g", "trace"):
        numbers = set()
        for point in trace.find_all("path", "point"):
            px, py = translate(point)
            px, py = px + ox, py + oy
            near = [n for n, (ex, ey) in expected.items() if abs(ex - px) <= PIXEL_TOL and abs(ey - py) <= PIXEL_TOL]
            assert len(near) == 1, f"point at ({px:.1f}, {py:.1f}) px matches trials {near}"
            numbers |= set(near)
        if numbers:
            groups.append(numbers)
    return groups


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A finished tiny study with infeasible trials, served by ``prunesearch dashboard``."""
    chromium_or_skip()
    tmp = tmp_path_factory.mktemp("browser")
    path = tiny_config(tmp, n_trials=16, constraints="max_flops_ratio = 0.4")
    config = load_config(path)
    run_study(config, pool_factory=lambda p, a: FakePool(p.space), progress=False)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "search", "dashboard", str(path), "--port", str(port)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        studies = get_json(f"http://127.0.0.1:{port}/api/studies", time.monotonic() + 60, proc)["study_summaries"]
        (summary,) = [s for s in studies if s["study_name"] == config.name]
        yield tmp, config, f"http://127.0.0.1:{port}/dashboard/studies/{summary['study_id']}"
    finally:
        stop_server(proc)


def test_study_page_shows_named_objectives_and_the_feasible_front(served):
    tmp, config, url = served
    records = [r for r in load_records(config) if r.values is not None]
    front = {r.number for r in pareto_front(records, config.study.directions)}
    infeasible = {r.number for r in records if not r.feasible}
    assert front and infeasible and {r.number for r in records} - front - infeasible  # all three kinds exist
    assert config.study.objectives == ("accuracy", "flops")

    done = chromium(url, tmp, "--dump-dom")
    assert done.returncode == 0, done.stderr[-2000:]
    page = Tree(done.stdout).root
    text = re.sub(r"\s+", " ", page.all_text())
    assert "Pareto Front" in text, f"the study page did not render: {text[:500]!r}"

    # the objective selectors of the Pareto-front plot show the names (optuna-dashboard shows
    # "0" and "1" when the study has no metric names)
    assert re.search(r"Objective X: accuracy\b", text), text[:1500]
    assert re.search(r"Objective Y: flops\b", text), text[:1500]

    # the plot: one trace per kind of point, each exactly its trials (x = accuracy, y = flops)
    (plot,) = [n for n in page.walk() if n.attrs.get("id") == "graph-pareto-front"]
    values = {r.number: (r.values[0], r.values[1]) for r in records}
    groups = plotted_groups(plot, values)
    assert sorted(map(sorted, groups)) == sorted(map(sorted, [front, infeasible, set(values) - front - infeasible]))

    # the "Best Trials" list (the server's best trials) is status's front, in trial order
    best = text.split("Best Trials", 1)[1].split("Study User Attributes", 1)[0]
    listed = [int(n) for n in re.findall(r"Trial (\d+) Objective Values", best)]
    assert listed == sorted(front)


def test_study_page_screenshot_is_a_picture_of_the_app(served):
    from PIL import Image

    tmp, _, url = served
    with Image.open(screenshot(url, tmp / "study.png", tmp)) as shot:
        image = shot.convert("RGB")
    assert image.size == WINDOW
    colours = image.getcolors(maxcolors=1 << 20)
    assert len(colours) > 50  # plots, text and the app bar, not one blank colour
    # the app bar (top 40 px) is the dashboard's blue: an error page or a blank page is white there
    (count, (r, g, b)), = sorted(image.crop((0, 0, WINDOW[0], 40)).getcolors(maxcolors=1 << 20))[-1:]
    assert count > 0.8 * WINDOW[0] * 40 and b - r > 100, (count, (r, g, b))
