"""The interactive explorers work in a real JupyterLab: a headless chromium, driven by Playwright,
runs a notebook up to its ipywidgets explorer, moves a slider, and sees the output redrawn.

Needs Debian's `chromium` (or `chromium-browser`, or $CHROMIUM pointing at one) and Playwright for
Python (the `dev` extra); no `playwright install`: the system's chromium is used. Skipped when either
is missing. Screenshots go to tests/browser_screenshots/ (git-ignored).

    .venv/bin/python -m pytest -p no:randomly -m browser tests/test_browser.py
"""
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = [pytest.mark.browser, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
SCREENSHOTS = Path(__file__).resolve().parent / "browser_screenshots"
SERVER_START_TIMEOUT = 120   # s: JupyterLab answering /api/status
RUN_TIMEOUT = 420            # s: the cells up to and including the explorer (about a minute here)
WIDGET_TIMEOUT = 60          # s: the widget drawn, then redrawn after the slider moved


def _chromium():
    for candidate in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser"):
        if candidate and shutil.which(candidate):
            return shutil.which(candidate)
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


class Lab:
    "A JupyterLab server started for the test: its base url, token, log file and process."

    def __init__(self, tmp: Path):
        pytest.importorskip("jupyterlab", reason="JupyterLab is not installed (pip install -e '.[course]')")
        pytest.importorskip("ipywidgets", reason="ipywidgets is not installed (pip install -e '.[course]')")
        self.tmp = tmp
        self.root = tmp / "notebooks"
        shutil.copytree(ROOT / "notebooks", self.root,
                        ignore=shutil.ignore_patterns(".ipynb_checkpoints", "__pycache__"))
        config = tmp / "jupyter_config"
        settings = config / "lab" / "user-settings" / "@jupyterlab"
        # the notebook's kernel starts without the Select Kernel dialog; every cell in the DOM (no
        # virtual scrolling); no news or update pop-ups over the notebook
        _write_json(settings / "notebook-extension" / "tracker.jupyterlab-settings",
                    {"autoStartDefaultKernel": True, "windowingMode": "none"})
        _write_json(settings / "apputils-extension" / "notification.jupyterlab-settings",
                    {"fetchNews": "false", "checkForUpdates": False})
        env = {k: v for k, v in os.environ.items() if not k.startswith(("JUPYTER", "MPLBACKEND"))}
        env.update(JUPYTER_CONFIG_DIR=str(config), JUPYTER_DATA_DIR=str(tmp / "jupyter_data"),
                   JUPYTER_RUNTIME_DIR=str(tmp / "jupyter_runtime"), IPYTHONDIR=str(tmp / "ipython"))
        self.port, self.token = _free_port(), secrets.token_hex(16)
        self.base = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ServerApp.ip=127.0.0.1",
               f"--ServerApp.port={self.port}", "--ServerApp.port_retries=0",
               f"--IdentityProvider.token={self.token}", f"--ServerApp.root_dir={self.root}",
               "--LabApp.expose_app_in_browser=True", "--LabApp.check_for_updates_class="
               "jupyterlab.handlers.announcements.NeverCheckForUpdate"]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            cmd.append("--allow-root")
        self.log_path = tmp / "jupyterlab.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, cwd=self.root, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self._wait_ready()

    def api(self, path: str, method: str = "GET"):
        req = urllib.request.Request(f"{self.base}{path}", method=method,
                                     headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(req, timeout=10) as r:
            body = r.read()
        return json.loads(body) if body else None

    def log_tail(self, n: int = 4000) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")[-n:]

    def _wait_ready(self):
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"JupyterLab exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                self.api("/api/status")
                return
            except OSError:
                time.sleep(0.5)
        self.close()
        pytest.fail(f"JupyterLab did not answer in {SERVER_START_TIMEOUT} s:\n{self.log_tail()}")

    def close(self):
        if self.proc.poll() is None:
            try:
                self.api("/api/shutdown", method="POST")   # shuts the kernels down too
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                pass
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()


@pytest.fixture(scope="module")
def lab(browser, tmp_path_factory):
    "The server, started only once chromium and Playwright are known to be here."
    server = Lab(tmp_path_factory.mktemp("jupyterlab"))
    yield server
    server.close()


@pytest.fixture(scope="module")
def browser():
    chromium = _chromium()
    if chromium is None:
        pytest.skip("chromium is not installed (Debian: apt-get install chromium; or set CHROMIUM=/path/to/it)")
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="Playwright for Python is not installed (pip install -e '.[dev]')")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium, headless=True)
        yield b
        b.close()


@pytest.fixture
def page(browser, lab):
    "A fresh browser page; afterwards the kernels it started are shut down (each holds a model)."
    context = browser.new_context(viewport={"width": 1400, "height": 1600})
    pg = context.new_page()
    yield pg
    context.close()
    for session in lab.api("/api/sessions"):
        lab.api(f"/api/sessions/{session['id']}", method="DELETE")


# In the page: window.jupyterapp (expose_app_in_browser) and its current notebook.
_JS_OPEN = """([notebook, needle]) => {
  const panel = window.jupyterapp.shell.currentWidget;
  if (!panel || !panel.content || !panel.sessionContext || !panel.context.isReady) return -1;
  // the workspace of an earlier test may be restored first: wait until our notebook is the current one
  if (panel.context.path.split('/').pop() !== notebook) return -1;
  const sc = panel.sessionContext;
  if (!sc.isReady || !sc.session || sc.kernelDisplayStatus !== 'idle') return -1;
  // the cell widgets are created after the model is ready, in batches: wait for all of them
  const model = panel.content.model;
  if (!model) return -1;
  const sources = Array.from(model.cells, c => c.type === 'code' ? c.sharedModel.getSource() : '');
  const i = sources.findIndex(s => s.includes(needle));
  if (i < 0) throw new Error('no code cell contains ' + needle);
  const cells = panel.content.widgets;
  if (cells.length < sources.length || cells[i].model !== model.cells.get(i)) return -1;
  cells[i].node.dataset.browserTest = 'explorer';
  return i;
}"""

_JS_RUN_UP_TO = """async (i) => {
  const app = window.jupyterapp;
  const notebook = app.shell.currentWidget.content;
  await app.commands.execute('notebook:clear-all-cell-outputs');   // execution counts back to null
  notebook.activeCellIndex = i;
  notebook.deselectAll();
  for (const cell of notebook.widgets.slice(0, i + 1)) notebook.select(cell);
  // Run > Run Selected Cells, in order; not awaited: the test polls, and sees errors as they come
  window.browserTestRun = app.commands.execute('notebook:run-cell').catch(e => { window.browserTestError = String(e); });
}"""

_JS_STATE = """(i) => {
  const panel = window.jupyterapp.shell.currentWidget;
  const cells = panel.content.widgets;
  const errors = [];
  for (const c of cells.slice(0, i + 1)) {
    if (c.model.type !== 'code') continue;
    for (const o of c.model.outputs.toJSON())
      if (o.output_type === 'error') errors.push(o.ename + ': ' + o.evalue + '\\n' + (o.traceback || []).join('\\n'));
  }
  if (window.browserTestError) errors.push('Run Selected Cells failed: ' + window.browserTestError);
  return {kernel: panel.sessionContext.kernelDisplayStatus, count: cells[i].model.executionCount,
          errors: errors};
}"""


def _poll(what: str, fn, timeout: float, page=None, shot: str = None, interval: float = 0.5):
    "fn() until it returns something truthy; else a screenshot (when page and shot) and a failure."
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(interval)
    if page is not None and shot:
        page.screenshot(path=str(SCREENSHOTS / shot), full_page=False)
    pytest.fail(f"timed out after {timeout} s waiting for {what} (last: {last!r})")


def _output(explorer):
    "What the explorer's interact output shows: its text and its figure (a PNG data URL)."
    out = explorer.locator(".widget-interact .widget-output").first
    imgs = out.locator("img")
    return {"text": out.inner_text(),
            "img": imgs.first.get_attribute("src") if imgs.count() else None}


def _open_and_run(lab, page, notebook: str, needle: str, stem: str):
    "Open notebook in JupyterLab, run every cell up to the explorer (needle in its source); the explorer cell."
    SCREENSHOTS.mkdir(exist_ok=True)
    # ?reset: start from an empty workspace, not the layout the previous test left open
    page.goto(f"{lab.base}/lab/tree/{notebook}?reset&token={lab.token}", timeout=120_000)
    page.wait_for_function("() => window.jupyterapp && window.jupyterapp.shell.currentWidget"
                           " && window.jupyterapp.shell.currentWidget.sessionContext", timeout=120_000)
    index = _poll(f"{notebook} to open with an idle kernel",
                  lambda: (lambda i: i + 1 if i >= 0 else None)(page.evaluate(_JS_OPEN, [notebook, needle])),
                  120, page, f"{stem}_0_open_failed.png") - 1
    page.evaluate(_JS_RUN_UP_TO, index)
    t0 = time.monotonic()

    def done():
        state = page.evaluate(_JS_STATE, index)
        if state["errors"]:
            page.screenshot(path=str(SCREENSHOTS / f"{stem}_0_error.png"))
            pytest.fail(f"{notebook}: a cell raised:\n" + "\n".join(state["errors"]))
        return state["count"] is not None and state["kernel"] == "idle"

    _poll(f"{notebook} to run up to its explorer", done, RUN_TIMEOUT, page, f"{stem}_0_run_failed.png")
    print(f"{notebook}: cells up to the explorer ran in {time.monotonic() - t0:.0f} s")
    explorer = page.locator("[data-browser-test=explorer]")
    explorer.scroll_into_view_if_needed()
    _poll("the explorer's widget and its first figure",
          lambda: explorer.locator(".widget-interact .widget-output img").count() > 0,
          WIDGET_TIMEOUT, page, f"{stem}_0_widget_failed.png")
    return explorer


def _slider(explorer, label: str):
    return explorer.locator(".widget-slider").filter(
        has=explorer.page.locator(".widget-label", has_text=label)).first


def _wait_redrawn(explorer, before: dict, what: str, page, stem: str):
    def changed():
        now = _output(explorer)
        return now if now["img"] and now["img"] != before["img"] and now["text"] != before["text"] else None
    _poll(what, changed, WIDGET_TIMEOUT, page, f"{stem}_2_not_redrawn.png")
    # settled: the same output twice in a row (each slider step redraws)
    _poll("the output to settle", lambda: (time.sleep(1.0), _output(explorer) == _output(explorer))[1],
          WIDGET_TIMEOUT)
    return _output(explorer)


def test_sampling_explorer_redraws(lab, page):
    stem = "07c_sampling_explorer"
    explorer = _open_and_run(lab, page, "07c_generation.ipynb", "widgets.interact(show_sampling", stem)
    slider = _slider(explorer, "temperature")
    readout = slider.locator(".widget-readout")
    assert readout.inner_text().strip() == "1.00"
    before = _output(explorer)
    assert "temperature=1.0" in before["text"], before["text"]
    explorer.screenshot(path=str(SCREENSHOTS / f"{stem}_1_before.png"))

    # drag the temperature handle to the right with the mouse
    handle = slider.locator(".noUi-handle").first
    handle.scroll_into_view_if_needed()
    box = handle.bounding_box()
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(x, y)
    page.mouse.down()
    page.mouse.move(x + 60, y, steps=6)
    page.mouse.up()

    _poll("the temperature readout to change", lambda: readout.inner_text().strip() != "1.00", WIDGET_TIMEOUT)
    after = _wait_redrawn(explorer, before, "the sampling explorer to redraw", page, stem)
    temperature = float(readout.inner_text())
    assert temperature > 1.0
    assert f"temperature={temperature}" in after["text"], (temperature, after["text"])
    assert after["img"] != before["img"]
    explorer.screenshot(path=str(SCREENSHOTS / f"{stem}_2_after.png"))
    page.screenshot(path=str(SCREENSHOTS / f"{stem}_page.png"))


def test_quantization_explorer_redraws(lab, page):
    stem = "08_quantization_explorer"
    explorer = _open_and_run(lab, page, "08_quantization.ipynb", "widgets.interact(plot_errors", stem)
    slider = _slider(explorer, "bits")
    readout = slider.locator(".widget-readout")
    assert readout.inner_text().strip() == "4"
    before = _output(explorer)
    explorer.screenshot(path=str(SCREENSHOTS / f"{stem}_1_before.png"))

    # the keyboard: focus the bits handle, two steps right (4 -> 6 bits)
    handle = slider.locator(".noUi-handle").first
    handle.focus()
    handle.press("ArrowRight")
    handle.press("ArrowRight")

    _poll("the bits readout to show 6", lambda: readout.inner_text().strip() == "6", WIDGET_TIMEOUT)
    # the figure is all the output shows: its PNG must change (text stays empty, or the same repr)
    def redrawn():
        now = _output(explorer)
        return now if now["img"] and now["img"] != before["img"] else None
    _poll("the quantization explorer to redraw", redrawn, WIDGET_TIMEOUT, page, f"{stem}_2_not_redrawn.png")
    _poll("the output to settle", lambda: (time.sleep(1.0), _output(explorer) == _output(explorer))[1],
          WIDGET_TIMEOUT)
    explorer.screenshot(path=str(SCREENSHOTS / f"{stem}_2_after.png"))
    page.screenshot(path=str(SCREENSHOTS / f"{stem}_page.png"))
