"""The explorer in a real browser (issue 16, item 6).

JupyterLab is started on a free local port, headless Chromium (the system's, never a downloaded
one) opens a copy of ``notebooks/00_quickstart.ipynb``, runs all its cells, and then does what a
learner does in the explorer: types a new text, changes the layer and switches an expert off. After
each step the page must show what the step asks for:

- the new text: the table lists exactly the tokenizer's pieces of that text, the coloured tokens
  are those tokens with the colour of each token's first-choice expert in the table, and the
  next-token figure is the one of the new text, with no intervention shown;
- another layer: the coloured tokens and the load chart say that layer, the table's experts changed
  and the colours still follow them;
- the ablation: the effect line and the next-token figure name it, the figure's "after" bars differ
  from its unchanged "before" bars, and the routing-change figure appears;
- nothing anywhere in the notebook is an error (error outputs, tracebacks on stderr, widgets that
  failed to display, the explorer's status line).

The checks read the page only (the DOM and the plotly figures' data), so they hold for whichever
demo model the notebook loads. Waits are explicit: each step polls the page until it shows the new
state or a generous timeout passes. On failure, screenshots, the page state, the notebook's error
outputs, the browser console and the server log go to a temporary folder whose path the failure
message prints.

Needs Chromium (Debian's ``chromium``: ``bash scripts/install_browser.sh``, which
``scripts/setup.sh --dev`` runs) and Playwright for Python (the ``browser`` extra); set
``MOE_LAB_CHROMIUM=/path/to/chromium`` to use another Chromium build. Skipped, with the reason,
where no Chromium can be found. ``MOE_LAB_BROWSER_KEEP=1`` keeps the artefacts of a passing run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.request
from pathlib import Path

import pytest

from moe_lab.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "00_quickstart.ipynb"
CHROMIUM_ENV = "MOE_LAB_CHROMIUM"
KEEP_ENV = "MOE_LAB_BROWSER_KEEP"  # set: keep the artefacts (and a screenshot of the explorer) after a pass too
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")

# what the learner types: plain prose with a number, far from every sample of notebook 00
NEW_TEXT = "Seven zebras quietly painted 42 yellow boats before lunch."

# Generous: each wait ends as soon as the page shows what it waits for. On a 2-core machine with a
# load average of 16 (training runs beside the tests), opening the notebook and starting its kernel
# took over 3 minutes once, against 1-1.5 minutes usually.
STARTUP_TIMEOUT = 600  # s: JupyterLab's server, its page, the notebook and its kernel
RUN_ALL_TIMEOUT = 1200  # s: the whole notebook
STEP_TIMEOUT = 300  # s: one explorer action (a forward pass or two of the demo model)
CLICK_TIMEOUT = 120  # s: Playwright's wait for an element to click or fill


def find_chromium() -> str | None:
    """``$MOE_LAB_CHROMIUM``, else the first Chromium on PATH."""
    if os.environ.get(CHROMIUM_ENV):
        path = shutil.which(os.environ[CHROMIUM_ENV])
        if path is None:
            raise FileNotFoundError(f"{CHROMIUM_ENV}={os.environ[CHROMIUM_ENV]!r} is not an executable")
        return path
    return next((p for p in map(shutil.which, CHROMIUM_NAMES) if p), None)


# --------------------------------------------------------------------------------------------
# JupyterLab on a free port, in a scratch folder

class JupyterLab:
    """A JupyterLab server with its own root, settings, workspaces and runtime folders under ``work``."""

    def __init__(self, work: Path):
        self.work = work
        self.root = work / "notebooks"
        self.root.mkdir()
        self.log_path = work / "jupyterlab.log"
        settings = work / "settings"
        # no news/update toasts over the page; every cell in the DOM (no windowed notebook)
        self._write(settings / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings",
                    {"fetchNews": "false", "checkForUpdates": False})
        self._write(settings / "@jupyterlab" / "notebook-extension" / "tracker.jupyterlab-settings",
                    {"windowingMode": "none"})
        self.token = os.urandom(16).hex()
        env = dict(os.environ)
        env.pop("MOE_LAB_WIDGETS", None)  # the explorer must find out by itself that it has a front-end
        # the server's own runtime, config and data folders: no user config, kernels or settings leak in
        env.update(JUPYTER_RUNTIME_DIR=str(work / "runtime"), JUPYTER_CONFIG_DIR=str(work / "config"),
                   JUPYTER_DATA_DIR=str(work / "data"),
                   PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p]),
                   OMP_NUM_THREADS="1")
        env.setdefault("MOE_LAB_FAST", "1")
        env.setdefault("PYTHONHASHSEED", "0")
        cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1",
               "--ServerApp.port=0", "--ServerApp.port_retries=0", f"--IdentityProvider.token={self.token}",
               f"--ServerApp.root_dir={self.root}", f"--LabApp.user_settings_dir={settings}",
               f"--LabApp.workspaces_dir={work / 'workspaces'}", "--LabApp.extension_manager=readonly",
               "--ServerApp.terminals_enabled=False"]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            cmd.append("--allow-root")  # CI and containers run as root
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=self.root)
        self.url = self._wait_for_url()

    @staticmethod
    def _write(path: Path, data: dict) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data))

    def _wait_for_url(self) -> str:
        """The server writes ``jpserver-<pid>.json`` (with the port it got) once it listens."""
        deadline = time.monotonic() + STARTUP_TIMEOUT
        info = self.work / "runtime" / f"jpserver-{self.proc.pid}.json"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"JupyterLab exited with code {self.proc.returncode}:\n{self.log()}")
            if info.exists():
                try:
                    url = f"http://127.0.0.1:{json.loads(info.read_text())['port']}"
                    with urllib.request.urlopen(f"{url}/api/status?token={self.token}", timeout=5):
                        return url
                except (OSError, ValueError, KeyError):
                    pass  # written but not complete yet, or not answering yet
            time.sleep(0.2)
        raise TimeoutError(f"JupyterLab did not answer within {STARTUP_TIMEOUT} s:\n{self.log()}")

    def notebook_json(self, name: str) -> dict:
        """The notebook as saved on the server (contents API)."""
        with urllib.request.urlopen(f"{self.url}/api/contents/{name}?content=1&token={self.token}", timeout=30) as r:
            return json.loads(r.read())["content"]

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-20000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # jupyter_server shuts its kernels down on SIGTERM
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._log.close()


# --------------------------------------------------------------------------------------------
# Reading the page

# Everything the checks look at, read from the DOM and from the plotly figures' own data.
STATE_JS = r"""
() => {
  const root = document.querySelector('.moe-explorer');
  if (!root) return null;
  const q = (cls) => root.querySelector('.' + cls);
  const plot = (cls) => {
    const gd = root.querySelector('.' + cls + ' .js-plotly-plot');
    if (!gd || !gd.data) return null;
    const arr = (a) => (a == null ? null : Array.from(a));
    return {
      title: gd.layout && gd.layout.title ? (gd.layout.title.text || '') : '',
      meta: gd.layout ? (gd.layout.meta || null) : null,
      // plotly.py sends numpy arrays base64-encoded; plotly.js decodes them into _fullData
      traces: gd.data.map((d, i) => { const f = (gd._fullData || []).find((t) => t.index === i) || d; return {
        name: d.name ?? null, visible: d.visible ?? true, hovertemplate: d.hovertemplate ?? null,
        x: arr(f.x), y: arr(f.y), text: arr(f.text),
        colors: d.marker && Array.isArray(d.marker.color) ? Array.from(d.marker.color) : null,
      }; }),
    };
  };
  const table = q('moe-explorer-table');
  const select = (cls) => {  // the label of the chosen option
    const s = root.querySelector('.' + cls + ' select');
    return s && s.selectedIndex >= 0 ? s.options[s.selectedIndex].textContent.trim() : null;
  };
  const options = (cls) => Array.from(root.querySelectorAll('.' + cls + ' select option')).map((o) => o.textContent.trim());
  return {
    text: (root.querySelector('.moe-explorer-text textarea') || {}).value ?? null,
    layer: select('moe-explorer-layer'), layers: options('moe-explorer-layer'),
    iv_layer: select('moe-explorer-iv-layer'), expert: select('moe-explorer-expert'),
    status: q('moe-explorer-status') ? q('moe-explorer-status').innerText.trim() : null,
    effect: q('moe-explorer-effect') ? q('moe-explorer-effect').innerText.trim() : null,
    table: table ? {
      head: Array.from(table.querySelectorAll('thead th')).map((th) => th.textContent),
      rows: Array.from(table.querySelectorAll('tbody tr')).map(
        (tr) => Array.from(tr.querySelectorAll('td')).map((td) => td.textContent)),
      styles: Array.from(table.querySelectorAll('tbody tr')).map(
        (tr) => Array.from(tr.querySelectorAll('td')).map((td) => td.getAttribute('style') || '')),
    } : null,
    tokens: plot('moe-explorer-tokens'), load: plot('moe-explorer-load'),
    next: plot('moe-explorer-next-token'), change: plot('moe-explorer-routing-change'),
  };
}
"""

# Problems anywhere in the notebook's DOM: tracebacks, widgets that failed to show.
PAGE_ERRORS_JS = r"""
() => {
  const found = [];
  document.querySelectorAll('.jp-OutputArea-output').forEach((el) => {
    const mime = el.getAttribute('data-mime-type') || '';
    const text = el.innerText || '';
    if (mime.includes('error') || (mime.includes('stderr') && /Traceback|Error\b|Exception\b/.test(text)))
      found.push(mime + ': ' + text.slice(0, 2000));
    if (/Error displaying widget|Error rendering output/i.test(text)) found.push('widget: ' + text.slice(0, 500));
  });
  return found;
}
"""

OPEN_JS = r"""
() => {
  const panel = document.querySelector('.jp-NotebookPanel');
  const text = (sel) => { const el = panel && panel.querySelector(sel); return el ? el.innerText.trim() : ''; };
  const ind = panel && panel.querySelector('.jp-Notebook-ExecutionIndicator');
  return {cells: panel ? panel.querySelectorAll('.jp-Cell').length : 0, kernel: text('.jp-Toolbar-kernelName'),
          status: ind ? ind.getAttribute('data-status') : '',
          dialog: Array.from(document.querySelectorAll('.jp-Dialog')).map((d) => d.innerText.slice(0, 200)).join(' | ')};
}
"""

PROMPTS_JS = r"""
() => Array.from(document.querySelectorAll('.jp-NotebookPanel .jp-CodeCell .jp-InputPrompt'))
           .map((p) => p.textContent.trim())
"""


def wait_for(page, what: str, predicate, timeout: float = STEP_TIMEOUT, js: str = STATE_JS):
    """Poll the page (``js``) until ``predicate(value)`` is true; return that value. The timeout
    error names what was awaited and shows the last value seen."""
    deadline = time.monotonic() + timeout
    value = None
    while True:
        value = page.evaluate(js)
        try:
            if value is not None and predicate(value):
                return value
        except (KeyError, IndexError, TypeError):
            pass  # part of the state is not there yet
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout:.0f} s for {what}; last state:\n"
                               f"{json.dumps(value, indent=1, default=str)[:6000]}")
        time.sleep(0.25)


def table_column(state: dict, name: str) -> list[str]:
    j = state["table"]["head"].index(name)
    return [row[j] for row in state["table"]["rows"]]


def first_choice_colors(state: dict) -> list[str]:
    """The background colour of each row's 'expert 1' cell (inline style, as the explorer wrote it)."""
    j = state["table"]["head"].index("expert 1")
    out = []
    for styles in state["table"]["styles"]:
        bg = [s.split(":", 1)[1] for s in styles[j].split(";") if s.strip().startswith("background")]
        out.append(bg[0].strip().lower() if bg else "")
    return out


def token_colors(state: dict) -> list[str]:
    """The colours of the coloured-token figure's boxes (its first trace: the layer shown)."""
    return [c.lower() for c in state["tokens"]["traces"][0]["colors"]]


def shown_layer(state: dict) -> str:
    """The layer named by the token figure's hover text (``"layer 3: expert ..."``)."""
    found = re.search(r"layer (\d+):", state["tokens"]["traces"][0]["hovertemplate"])
    return found.group(1) if found else None


def assert_views_agree(state: dict) -> None:
    """The coloured tokens are the table's tokens, coloured by the table's first-choice expert."""
    assert state["status"] == "", f"the explorer's status line shows an error: {state['status']!r}"
    n = len(state["table"]["rows"])
    assert len(token_colors(state)) == n, f"{len(token_colors(state))} coloured tokens but {n} table rows"
    assert token_colors(state) == first_choice_colors(state), "token colours differ from the table's first choices"
    assert shown_layer(state) == state["layer"], f"tokens show layer {shown_layer(state)}, dropdown {state['layer']}"
    assert state["layer"] in state["load"]["title"], f"load chart title {state['load']['title']!r} != layer {state['layer']}"


# --------------------------------------------------------------------------------------------
# The test

@pytest.fixture
def chromium():
    path = find_chromium()
    if path is None:
        pytest.skip(f"no Chromium found (looked for {', '.join(CHROMIUM_NAMES)} on PATH and ${CHROMIUM_ENV}); "
                    "bash scripts/install_browser.sh installs Debian's chromium when run as root")
    return path


@pytest.fixture
def sync_playwright():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        if os.environ.get("CI"):
            raise  # scripts/setup.sh --dev installs it: missing in CI is a broken setup, not a skip
        pytest.skip("Playwright is not installed (pip install -e '.[browser]', or bash scripts/setup.sh --dev)")
    return sync_playwright


def test_explorer_in_jupyterlab(chromium, sync_playwright):
    tokenizer = load_tokenizer()
    expected_pieces = list(tokenizer.pieces(tokenizer.encode(NEW_TEXT)))
    work = Path(tempfile.mkdtemp(prefix="moe_lab_browser_"))
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    lab = page = None
    console: list[str] = []
    try:
        shutil.copy(NOTEBOOK, work / "notebook.ipynb.orig")
        lab = JupyterLab(work)
        shutil.copy(NOTEBOOK, lab.root / NOTEBOOK.name)  # a copy: saving it never touches the repository
        timings["server"] = time.perf_counter() - t0
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, headless=True,
                                         args=["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 1400, "height": 1400})
            page.set_default_timeout(CLICK_TIMEOUT * 1000)
            page.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
            page.on("pageerror", lambda e: console.append(f"pageerror: {e}"))
            try:
                _drive(page, lab, expected_pieces, timings)
                if os.environ.get(KEEP_ENV):
                    page.locator(".moe-explorer").first.screenshot(path=str(work / "explorer.png"))
            except BaseException:
                _save_failure(page, lab, work, console)
                raise
            finally:
                browser.close()
    except BaseException as e:
        if lab is not None and not (work / "jupyterlab.log.txt").exists():
            (work / "jupyterlab.log.txt").write_text(lab.log())
        (work / "console.txt").write_text("\n".join(console))
        (work / "traceback.txt").write_text(traceback.format_exc())
        print(f"\nbrowser test failed: screenshots, page state, error outputs and logs are in {work}")
        print("timings so far (s): " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
        if isinstance(e, Exception):  # the same failure, with where to look
            raise AssertionError(f"{type(e).__name__}: {e}\n(artefacts: {work})") from e
        raise
    finally:
        if lab is not None:
            lab.stop()
    timings["total"] = time.perf_counter() - t0
    print("browser test timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
    if os.environ.get(KEEP_ENV):
        print(f"browser test artefacts kept in {work} (${KEEP_ENV} is set)")
    else:
        shutil.rmtree(work, ignore_errors=True)


def test_setup_installs_what_the_browser_test_needs():
    """``scripts/setup.sh --dev`` (run by ``scripts/test.sh``, so by CI) installs Playwright (the
    ``browser`` extra) and runs ``scripts/install_browser.sh``, which installs no downloaded browser."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        from pip._vendor import tomli as tomllib
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(r.startswith("playwright") for r in extras["browser"]), extras.get("browser")
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    assert re.search(r'--dev" \] && extras="[a-z,]*\bbrowser\b', setup), "setup.sh --dev must install the browser extra"
    assert "scripts/install_browser.sh" in setup, "setup.sh --dev must run scripts/install_browser.sh"
    script = (ROOT / "scripts" / "install_browser.sh").read_text()
    assert "apt-get install" in script and "playwright install" not in script  # the system's browser only


def _drive(page, lab: JupyterLab, expected_pieces: list[str], timings: dict) -> None:
    t = time.perf_counter()
    page.goto(f"{lab.url}/lab/tree/{NOTEBOOK.name}?reset&token={lab.token}", timeout=STARTUP_TIMEOUT * 1000)
    n_cells = len(json.loads(NOTEBOOK.read_text())["cells"])

    def ready(s):  # every cell loaded, its kernel started and idle; a kernel-choice dialog accepted
        if s["dialog"]:
            page.locator(".jp-Dialog .jp-mod-accept").first.click()
            return False
        return s["cells"] == n_cells and s["kernel"] not in ("", "No Kernel") and s["status"] == "idle"

    wait_for(page, f"the notebook's {n_cells} cells and an idle kernel", ready, timeout=STARTUP_TIMEOUT, js=OPEN_JS)
    timings["open"] = time.perf_counter() - t

    # Run > Run All Cells, then wait until every code cell has run (or a cell failed and stopped the run)
    t = time.perf_counter()
    page.locator("#jp-MainMenu .lm-MenuBar-item", has_text="Run").first.click()
    page.get_by_role("menuitem", name="Run All Cells", exact=True).click()
    prompts = wait_for(page, "every code cell to run",
                       lambda ps: ps and all(p.strip("[]:").isdigit() for p in ps)
                       or (not any("*" in p for p in ps) and any(not p.strip("[]: ") for p in ps)),
                       timeout=RUN_ALL_TIMEOUT, js=PROMPTS_JS)
    errors = page.evaluate(PAGE_ERRORS_JS)
    assert not errors, "the notebook shows errors after Run All:\n" + "\n".join(errors)
    assert all(p.strip("[]:").isdigit() for p in prompts), f"Run All stopped early (prompts {prompts})"
    before = wait_for(page, "the explorer's widget with its figures",
                      lambda s: s["table"]["rows"] and s["tokens"] and s["load"] and s["next"])
    assert_views_agree(before)
    timings["run_all"] = time.perf_counter() - t

    # 1. type a new text and trace it
    t = time.perf_counter()
    box = page.locator(".moe-explorer-text textarea")
    box.fill("")
    box.press_sequentially(NEW_TEXT)  # real key presses: JupyterLab's shortcuts must not take them
    page.locator("button.moe-explorer-trace").click()
    after_text = wait_for(page, "the table to show the new text's tokens",
                          lambda s: table_column(s, "token") == expected_pieces
                          and len(s["tokens"]["traces"][0]["colors"]) == len(expected_pieces)
                          and s["next"]["traces"][0]["x"] != before["next"]["traces"][0]["x"])
    assert after_text["text"] == NEW_TEXT
    assert_views_agree(after_text)
    assert after_text["layer"] == before["layer"], "tracing a text must keep the layer"
    # a new text forgets the intervention the notebook applied: one visible set of bars, no change figure
    assert [tr["visible"] for tr in after_text["next"]["traces"]][1:] == [False], after_text["next"]["traces"]
    assert after_text["change"] is None, "the routing-change figure of the old intervention is still shown"
    timings["type_text"] = time.perf_counter() - t

    # 2. another layer
    t = time.perf_counter()
    layers = after_text["layers"]
    new_layer = layers[0] if after_text["layer"] != layers[0] else layers[-1]
    assert new_layer != after_text["layer"], f"the model has one layer only ({layers})"
    page.locator(".moe-explorer-layer select").select_option(label=new_layer)
    after_layer = wait_for(page, f"the explorer to show layer {new_layer}",
                           lambda s: s["layer"] == new_layer and shown_layer(s) == new_layer
                           and new_layer in s["load"]["title"])
    assert_views_agree(after_layer)
    assert table_column(after_layer, "token") == expected_pieces
    experts = [h for h in after_layer["table"]["head"] if h.startswith("expert")]
    routing = lambda s: [tuple(table_column(s, h)) for h in experts]  # noqa: E731
    assert routing(after_layer) != routing(after_text), f"layers {after_text['layer']} and {new_layer} route alike"
    assert after_layer["next"]["traces"][0]["x"] == after_text["next"]["traces"][0]["x"], \
        "changing the layer shown must not change the next-token distribution"
    timings["change_layer"] = time.perf_counter() - t

    # 3. switch off the layer's busiest expert (reroute) at the layer shown
    t = time.perf_counter()
    counts: dict[str, int] = {}
    for h in experts:
        for e in table_column(after_layer, h):
            counts[e] = counts.get(e, 0) + 1
    expert = max(counts, key=lambda e: (counts[e], -int(e)))
    page.locator(".moe-explorer-kind button", has_text="switch off: reroute").click()
    page.locator(".moe-explorer-expert select").select_option(label=expert)
    page.locator(".moe-explorer-iv-layer select").select_option(label=new_layer)
    page.locator("button.moe-explorer-apply").click()
    what = f"expert {expert} switched off (rerouted) at layer {new_layer}"
    after_iv = wait_for(page, f"the effect of switching off expert {expert}",
                        lambda s: s["effect"].lower().startswith(what) and s["change"] is not None
                        and s["next"]["traces"][1]["name"] == what and s["next"]["traces"][1]["visible"] is not False)
    assert_views_agree(after_iv)
    assert routing(after_iv) == routing(after_layer), "the table shows normal routing, before the intervention"
    base, new = after_iv["next"]["traces"]
    assert (base["x"], base["y"]) != (new["x"], new["y"]), "the ablation did not change the next-token bars"
    # the grey "before" bars are the unchanged distribution (same probabilities for the tokens shown before)
    before_probs = dict(zip(after_layer["next"]["traces"][0]["y"], after_layer["next"]["traces"][0]["x"]))
    for label, p in zip(base["y"], base["x"]):
        if label in before_probs:
            assert abs(before_probs[label] - p) < 1e-9, f"'before' bar of {label} changed"
    timings["ablate"] = time.perf_counter() - t

    # nothing in the notebook is an error, in the page and in the saved notebook
    errors = page.evaluate(PAGE_ERRORS_JS)
    assert not errors, "the notebook shows errors:\n" + "\n".join(errors)
    _save(page)
    saved = lab.notebook_json(NOTEBOOK.name)
    bad = [o for c in saved["cells"] for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not bad, f"the saved notebook has error outputs: {json.dumps(bad)[:3000]}"


def _save(page) -> None:
    """File > Save (Ctrl+S in the notebook), then wait until the tab shows no unsaved changes."""
    page.locator(".jp-NotebookPanel .jp-Notebook").first.click(position={"x": 5, "y": 5})
    page.keyboard.press("Control+s")
    page.wait_for_selector(".lm-DockPanel-tabBar .lm-TabBar-tab.jp-mod-current:not(.jp-mod-dirty)", timeout=60_000)


def _save_failure(page, lab: JupyterLab, work: Path, console: list[str]) -> None:
    """Screenshots, the page state, error outputs and the saved notebook's errors, each best effort."""
    steps = [
        ("page.png", lambda: page.screenshot(path=str(work / "page.png"))),
        ("explorer.png", lambda: page.locator(".moe-explorer").first.screenshot(path=str(work / "explorer.png"),
                                                                                   timeout=10_000)),
        ("state.json", lambda: (work / "state.json").write_text(json.dumps(page.evaluate(STATE_JS), indent=1))),
        ("page_errors.txt", lambda: (work / "page_errors.txt").write_text("\n\n".join(page.evaluate(PAGE_ERRORS_JS)))),
        ("save", lambda: _save(page)),
        ("error_outputs.json", lambda: (work / "error_outputs.json").write_text(json.dumps(
            [o for c in lab.notebook_json(NOTEBOOK.name)["cells"] for o in c.get("outputs", [])
             if o.get("output_type") == "error" or o.get("name") == "stderr"], indent=1))),
        ("jupyterlab.log.txt", lambda: (work / "jupyterlab.log.txt").write_text(lab.log())),
    ]
    for name, step in steps:
        try:
            step()
        except Exception as e:  # noqa: BLE001 - collecting evidence must not hide the failure
            console.append(f"(could not write {name}: {type(e).__name__}: {e})")


def test_explorer_widgets_carry_the_css_classes_the_browser_test_finds():
    """The hooks the browser test clicks and reads (no browser needed): one CSS class per control
    and output, each on exactly one widget, the explorer's root among them."""
    pytest.importorskip("ipywidgets")
    import torch

    from moe_lab.model import Mixtral, ModelArgs
    from moe_lab.widgets import RoutingExplorer

    torch.manual_seed(0)
    model = Mixtral(ModelArgs.from_name("tiny").replace(n_layers=2)).eval()
    ex = RoutingExplorer(model, load_tokenizer(), text="a b c")
    root = ex.widget
    assert "moe-explorer" in root._dom_classes
    used = set(re.findall(r"moe-explorer-[a-z]+(?:-[a-z]+)*", STATE_JS))  # every class the page reader reads ...
    assert len(used) >= 10, used
    found: dict[str, list] = {}
    stack = [root]
    while stack:  # ... is on exactly one widget of the explorer
        w = stack.pop()
        for css in getattr(w, "_dom_classes", ()):
            found.setdefault(css, []).append(w)
        stack.extend(getattr(w, "children", ()))
    for css in used | {"moe-explorer-trace", "moe-explorer-apply", "moe-explorer-kind"}:
        assert len(found.get(css, [])) == 1, f"{css}: on {len(found.get(css, []))} widgets"
    assert found["moe-explorer-text"][0] is ex.w_text and found["moe-explorer-apply"][0] is ex.w_apply
