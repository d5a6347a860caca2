"""Figures that render everywhere (issue 16 item 4).

The saved notebooks (produced by ``scripts/execute_notebooks.py``) carry every plotly figure as its
JSON, a PNG and an offline HTML part with plotly.js inline once per notebook; the script's
PNG/HTML step and its run-and-save logic are tested on small notebooks built here.
"""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import plotly
import plotly.graph_objects as go
import plotly.io as pio
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "execute_notebooks.py"
_spec = importlib.util.spec_from_file_location("execute_notebooks", SCRIPT)
xn = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(xn)

SAVED = xn.all_notebooks()
PLOTLYJS_BANNER = re.compile(r"\* plotly\.js v\d")  # the licence header that opens plotly.min.js
CDN_SCRIPT = re.compile(r"""(src=|import\s*)["']https://cdn\.plot\.ly/""")


def _figure_tools_or_skip() -> str:
    try:
        return xn.require_figure_tools(install=False)
    except xn.FigureToolsMissing as e:
        print(f"SKIPPED: {e}")
        pytest.skip(f"no figure tools here: {e}")


def _figure_outputs(nb: dict):
    for i, cell in enumerate(nb["cells"]):
        for j, out in enumerate(cell.get("outputs", [])):
            if xn.is_figure_output(out):
                yield i, j, out


# ---------------------------------------------------------------- the saved notebooks

@pytest.mark.parametrize("path", SAVED, ids=lambda p: str(p.relative_to(ROOT / "notebooks")))
def test_every_saved_figure_has_a_png(path):
    nb = json.loads(path.read_text())
    missing = [f"cell {i} output {j}" for i, j, out in _figure_outputs(nb) if xn.PNG_MIME not in out["data"]]
    assert not missing, (f"{path.name}: plotly figures without a static PNG ({', '.join(missing)}): GitHub and "
                         f"printed exports show nothing there. Save it with `python scripts/execute_notebooks.py "
                         f"{path.relative_to(ROOT)}`")


@pytest.mark.parametrize("path", SAVED, ids=lambda p: str(p.relative_to(ROOT / "notebooks")))
def test_saved_notebooks_load_plotly_js_inline_not_from_a_cdn(path):
    text = path.read_text()
    nb = json.loads(text)
    cdn = [f"cell {i}" for i, cell in enumerate(nb["cells"])
           if any(CDN_SCRIPT.search(xn._text(out.get("data", {}).get(xn.HTML_MIME))) for out in cell.get("outputs", []))]
    assert not cdn, (f"{path.name}: plotly.js loaded from its CDN in {', '.join(cdn)} (an HTML export opened "
                     f"offline shows no figure). Save it with `python scripts/execute_notebooks.py {path.relative_to(ROOT)}`")
    inline = len(PLOTLYJS_BANNER.findall(text))
    html_figures = sum(xn.HTML_MIME in out["data"] for _, _, out in _figure_outputs(nb))
    assert inline == (1 if html_figures else 0), (
        f"{path.name}: plotly.js is inline {inline} times for {html_figures} figures with an HTML part (expected "
        f"once per notebook with figures)")


# ---------------------------------------------------------------- the script's pieces, without a browser

def _figure(n: int) -> go.Figure:
    return go.Figure(go.Bar(x=["a", "b", "c"], y=[1, n, 3], marker_color=["#E69F00", "#56B4E9", "#009E73"]),
                     layout=dict(width=420, height=260, title=f"figure {n}"))


def _saved_like_jupyter(fig: go.Figure) -> dict:
    """The output moe_lab's default renderer leaves in a notebook (JSON + CDN html)."""
    return nbformat.v4.new_output("display_data", data={
        xn.PLOTLY_MIME: json.loads(pio.to_json(fig, validate=False)) | {"config": {"plotlyServerURL": "https://plot.ly"}},
        xn.HTML_MIME: pio.to_html(fig, include_plotlyjs="cdn", full_html=False),
        "text/plain": "Figure()"})


def _loader() -> dict:
    html = (f'<script>window.PlotlyConfig = {{MathJaxConfig: \'local\'}};</script>\n'
            f'<script type="module">import "https://cdn.plot.ly/plotly-{plotly.offline.get_plotlyjs_version()}.min"</script>')
    return nbformat.v4.new_output("display_data", data={xn.HTML_MIME: html})


def _small_notebook() -> dict:
    table = nbformat.v4.new_output("execute_result", execution_count=3, data={
        xn.HTML_MIME: "<table><tr><td>1</td></tr></table>", "text/plain": "   0\n0  1"})
    cells = [nbformat.v4.new_markdown_cell("# two figures"),
             nbformat.v4.new_code_cell("fig1", outputs=[_loader(), _saved_like_jupyter(_figure(2))]),
             nbformat.v4.new_code_cell("df", outputs=[table]),
             nbformat.v4.new_code_cell("fig2", outputs=[_saved_like_jupyter(_figure(5))])]
    return nbformat.v4.new_notebook(cells=cells)


def test_figure_and_loader_outputs_are_told_apart():
    nb = _small_notebook()
    loader, fig1 = nb.cells[1].outputs
    table, fig2 = nb.cells[2].outputs[0], nb.cells[3].outputs[0]
    assert xn.is_plotly_loader(loader) and not xn.is_figure_output(loader)
    assert xn.is_figure_output(fig1) and not xn.is_plotly_loader(fig1)
    assert not xn.is_figure_output(table) and not xn.is_plotly_loader(table)
    assert xn.figures_missing_png(nb) == [1, 3]
    html_only = nbformat.v4.new_output("display_data", data={xn.HTML_MIME: fig2["data"][xn.HTML_MIME]})
    assert xn.is_figure_output(html_only)
    with pytest.raises(ValueError, match=r"cell 0: a plotly figure saved as HTML only"):
        xn.add_static_figures(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x", outputs=[html_only])]))


def test_no_browser_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("BROWSER_PATH", str(tmp_path / "no-such-chrome"))
    with pytest.raises(xn.FigureToolsMissing, match="BROWSER_PATH=.*not an executable"):
        xn.find_browser(install=False)
    monkeypatch.delenv("BROWSER_PATH")
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(xn.FigureToolsMissing, match=r"no Chromium-family browser.*apt-get install chromium"):
        xn.find_browser(install=False)


def test_notebooks_are_found_by_number_and_unknown_names_are_errors():
    if not (ROOT / "notebooks" / "05_visualising_experts.ipynb").exists():
        pytest.skip("notebook 05 renamed")
    assert xn.resolve(["05"]) == [ROOT / "notebooks" / "05_visualising_experts.ipynb"]
    with pytest.raises(SystemExit, match="'99': expected one notebook"):
        xn.resolve(["99"])


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "a.ipynb"
    path.write_text("old")

    with pytest.raises(TypeError):
        xn.write_atomically(path, 123)  # not text: the write fails half-way
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["a.ipynb"]
    xn.write_atomically(path, "new")
    assert path.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["a.ipynb"]


# ---------------------------------------------------------------- with kaleido and a browser

def _png_size(data: str) -> tuple[int, int]:
    png = base64.b64decode(data)
    assert png[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")


def _drawn_offline(browser: str, html: Path, tmp_path: Path) -> str:
    """The page's DOM after its scripts ran in headless Chromium with every network request failing."""
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           f"--user-data-dir={tmp_path / 'profile'}", "--proxy-server=http://127.0.0.1:9",
           "--host-resolver-rules=MAP * ~NOTFOUND", "--virtual-time-budget=20000", "--dump-dom", html.as_uri()]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.fixture()
def kaleido_server():
    """One headless browser for all the figures of a test (as the script's workers do)."""
    browser = _figure_tools_or_skip()
    import kaleido

    kaleido.start_sync_server(silence_warnings=True)
    yield browser
    kaleido.stop_sync_server(silence_warnings=True)


def test_static_figures_png_and_offline_html(tmp_path, kaleido_server):
    browser = kaleido_server
    from nbconvert import HTMLExporter
    from PIL import Image

    nb = _small_notebook()
    json_before = [out["data"][xn.PLOTLY_MIME] for _, _, out in _figure_outputs(nb)]
    stats = xn.add_static_figures(nb)
    assert stats["figures"] == 2 and stats["loaders_removed"] == 1
    assert xn.figures_missing_png(nb) == []
    assert len(nb.cells[1].outputs) == 1, "the CDN loader output is dropped"
    figures = [out for _, _, out in _figure_outputs(nb)]
    assert [out["data"][xn.PLOTLY_MIME] for out in figures] == json_before, "the interactive JSON is kept as it was"
    for out in figures:
        assert _png_size(out["data"][xn.PNG_MIME]) == (420, 260)  # the figure's layout size, scale 1
        image = Image.open(io.BytesIO(base64.b64decode(out["data"][xn.PNG_MIME]))).convert("RGB")
        colours = {c for _, c in image.getcolors(1 << 16)}
        assert {(0xE6, 0x9F, 0x00), (0x56, 0xB4, 0xE9), (0x00, 0x9E, 0x73)} <= colours, "the bars are drawn"
    html1, html2 = (xn._text(out["data"][xn.HTML_MIME]) for out in figures)
    for html, out, n in ((html1, figures[0], 2), (html2, figures[1], 5)):  # the PNG first, for viewers without JS
        assert html.startswith(f'<img id="plotly-') and f'alt="figure {n}"' in html
        assert f'src="data:image/png;base64,{out["data"][xn.PNG_MIME]}"' in html
    assert len(PLOTLYJS_BANNER.findall(html1)) == 1 and not PLOTLYJS_BANNER.search(html2), "plotly.js once, first"
    assert not CDN_SCRIPT.search(html1 + html2) and not re.search(r"<script[^>]*src=", html1 + html2), "no CDN"
    assert nb.cells[2].outputs[0]["data"][xn.HTML_MIME].startswith("<table>"), "other outputs untouched"
    nbformat.validate(nb)

    body, _ = HTMLExporter().from_notebook_node(nbformat.from_dict(nb))
    assert not CDN_SCRIPT.search(body) and len(PLOTLYJS_BANNER.findall(body)) == 1
    page = tmp_path / "export.html"
    page.write_text(body)
    dom = _drawn_offline(browser, page, tmp_path)
    drawn = re.findall(r'class="plotly-graph-div js-plotly-plot"', dom)  # plotly adds js-plotly-plot once drawn
    assert len(drawn) == 2, f"{len(drawn)} of 2 figures drawn offline in {page}"
    assert dom.count('class="main-svg"') >= 2
    fallback = re.compile(r'<img [^>]*id="plotly-[^"]*-png"')
    assert len(fallback.findall(body)) == 2 and not fallback.search(dom), "the fallback PNGs go once plotly drew"

    again = json.loads(json.dumps(nb))  # a second pass over a saved notebook changes nothing
    assert xn.add_static_figures(again)["loaders_removed"] == 0
    assert [o["data"][xn.HTML_MIME] for _, _, o in _figure_outputs(again)] == [html1, html2]

    small = json.loads(json.dumps(_small_notebook()))
    xn.add_static_figures(small, html="none")
    assert all(xn.HTML_MIME not in o["data"] and xn.PNG_MIME in o["data"] for _, _, o in _figure_outputs(small))


def test_the_script_executes_and_saves_atomically(tmp_path):
    _figure_tools_or_skip()
    good = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("import os\nfrom moe_lab import viz\nviz.setup_notebook()\n"
                                  "assert os.environ['MOE_LAB_FAST'] == '1'"),
        nbformat.v4.new_code_cell("import plotly.graph_objects as go\n"
                                  "go.Figure(go.Bar(y=[1, 3, 2]), layout=dict(width=300, height=200))")])
    bad = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("raise ValueError('this notebook fails')")])
    (tmp_path / "good.ipynb").write_text(nbformat.writes(good))
    (tmp_path / "bad.ipynb").write_text(old := nbformat.writes(bad))
    env = dict(os.environ, MOE_LAB_FAST="0")  # the script, not the caller, picks the mode
    done = subprocess.run([sys.executable, str(SCRIPT), "--fast", "--no-install", "-j", "2", "--cell-timeout", "300",
                           str(tmp_path / "good.ipynb"), str(tmp_path / "bad.ipynb")],
                          capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "FAILED" in done.stdout and "bad.ipynb" in done.stdout and "this notebook fails" in done.stdout
    assert (tmp_path / "bad.ipynb").read_text() == old, "a failed run leaves the old file"
    saved = json.loads((tmp_path / "good.ipynb").read_text())
    assert not [o for c in saved["cells"] for o in c["outputs"] if o["output_type"] == "error"]
    figs = list(_figure_outputs(saved))
    assert len(figs) == 1 and _png_size(figs[0][2]["data"][xn.PNG_MIME]) == (300, 200)
    # the default --html none: plotly JSON + PNG, no HTML part (so no plotly.js and no CDN link)
    assert xn.HTML_MIME not in figs[0][2]["data"]
    assert len(PLOTLYJS_BANNER.findall(json.dumps(saved))) == 0 and not CDN_SCRIPT.search(json.dumps(saved))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.ipynb", "good.ipynb"], "no temporary files left"


# ---------------------------------------------------------------- PNGs a reader can read (issue 23 item 9)

def test_colour_reduction_keeps_the_expert_and_domain_colours_exact():
    """A median cut alone maps a small orange expert swatch beside a red heatmap to red (05 [25]
    showed expert 0 in expert 5's vermillion); the key colours are kept as palette entries."""
    import numpy as np
    from PIL import Image

    from moe_lab import viz

    h, w = 120, 400
    grad = np.zeros((h, w, 3), np.uint8)
    grad[..., 0] = 255
    grad[..., 1] = np.linspace(0, 200, w, dtype=np.uint8)[None, :]  # 400 reds and oranges
    grad[..., 2] = np.linspace(0, 200, h, dtype=np.uint8)[:, None]
    grad[:10, :10] = (0xE6, 0x9F, 0x00)  # expert 0's swatch
    grad[20:30, :10] = (0xD5, 0x5E, 0x00)  # expert 5's
    grad[40:50, :10] = (0x1F, 0x77, 0xB4)  # a domain's
    grad[-10:, -10:] = 255  # the white background
    out = xn.quantize_keeping(Image.fromarray(grad), 64, xn.key_colors()).convert("RGB")
    assert len(out.getcolors(1 << 16)) <= 64
    for xy, want in (((5, 5), "#E69F00"), ((5, 25), "#D55E00"), ((5, 45), "#1F77B4"), ((w - 5, h - 5), "#FFFFFF")):
        assert "#%02X%02X%02X" % out.getpixel(xy) == want
    assert {"#E69F00", "#D55E00", "#1F77B4"} <= set(xn.key_colors())
    assert set(viz.expert_colors(8)) <= set(xn.key_colors())
    # an image with few colours keeps all of them
    few = Image.fromarray(grad[:50, :10].copy())
    assert sorted(c for _, c in few.getcolors()) == sorted(
        c for _, c in xn.quantize_keeping(few, 256, []).convert("RGB").getcolors())


def _edges_blank(png: bytes, border: int = 2) -> list[str]:
    """The sides of the image where something is drawn within ``border`` px of the edge (a title,
    legend or axis title cut off by the figure's edge)."""
    import numpy as np
    from PIL import Image

    a = np.asarray(Image.open(io.BytesIO(png)).convert("L"))
    sides = {"top": a[:border], "bottom": a[-border:], "left": a[:, :border], "right": a[:, -border:]}
    return [k for k, v in sides.items() if (v < 200).any()]


def test_generic_figures_draw_nothing_at_the_png_edge(kaleido_server):
    """Rendered as the saved notebooks' PNGs are: no title, legend, axis title or colour bar runs
    into the edge of the image, for figures with long titles, many legend entries and subplots."""
    import numpy as np

    from moe_lab import viz
    from trace_helpers import make_trace

    rng = np.random.default_rng(0)
    ids = np.stack([np.stack([rng.permutation(8)[:2] for _ in range(300)]) for _ in range(4)])
    domains = ["python", "english", "math", "french", "german", "spanish", "italian", "data", "latex"]
    docs = np.repeat(np.arange(18), 300 // 18 + 1)[:300]
    trace = make_trace(ids, doc_ids=docs, domains=[domains[d % 9] for d in range(18)], E=8)
    long = "a source label long enough to need a second line in every figure's title"
    figs = {
        "load_heatmap": viz.load_heatmap(trace, source=long),
        "domain_load_bars": viz.domain_load_bars(trace, source=long),
        "repetition_figure": viz.repetition_figure(trace, by_domain=True, n_boot=20, source=long),
        "coactivation_heatmap": viz.coactivation_heatmap(trace, 3, source=long),
        "domain_specialization_heatmap": viz.domain_specialization_heatmap(trace, source=long),
        "cache_hit_figure": viz.cache_hit_figure(trace, source=long),
        "expert_heatmap": viz.expert_heatmap(rng.normal(size=(9, 4, 8)), rows=domains, marks=[("math", 1, 3)],
                                             mark_label="beyond the null", source=long),
        "token_figure": viz.token_figure(trace, source=long, max_tokens=40),
    }
    clipped = {}
    for name, fig in figs.items():
        sides = _edges_blank(xn.figure_png(fig.to_plotly_json()))
        if sides:
            clipped[name] = sides
    assert not clipped, f"drawn up to the edge of the PNG (clipped?): {clipped}"
