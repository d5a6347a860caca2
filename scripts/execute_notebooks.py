#!/usr/bin/env python
"""Execute the notebooks and save them with figures that render everywhere.

    python scripts/execute_notebooks.py                  # all notebooks (notebooks/*.ipynb, notebooks/solutions/*.ipynb), full mode
    python scripts/execute_notebooks.py 05 08 --fast     # the named ones (a number, a name or a path), fast mode
    python scripts/execute_notebooks.py -j 2 --timeout 3600
    python scripts/execute_notebooks.py --no-execute     # only add the static forms to the saved outputs

Each plotly figure in a notebook is saved by moe_lab's renderer (``viz.setup_notebook()``) as the
plotly JSON mimetype, which JupyterLab, Notebook 7 and VS Code draw interactively, plus an HTML part
that loads plotly.js from its CDN. A learner needs nothing else. This script, which produces the
notebooks committed to the repository, then rewrites every figure output into three forms in the
same output:

* ``application/vnd.plotly.v1+json``  unchanged: interactive in JupyterLab, Notebook 7, VS Code;
* ``image/png``                       drawn by kaleido in a headless browser: GitHub, nbviewer
  without JavaScript, VS Code without a kernel, printed and PDF exports;
* ``text/html``                       the interactive figure for ``jupyter nbconvert --to html``,
  nbviewer and classic Notebook, with plotly.js *inline, once per notebook* (in the first
  figure) instead of from a CDN, so an HTML export works offline; the PNG comes first in it
  as an ``<img>`` that the figure's script removes, for viewers that pick the HTML part but
  run no JavaScript. ``--html none`` drops this part instead: exports then show the PNGs
  (notebooks 5 MB smaller, no interactivity outside Jupyter).

The loader output that the connected renderer writes before the first figure (a
``<script type="module">`` importing plotly.js from cdn.plot.ly) is removed.

Static export needs kaleido (``pip install -e ".[figures]"``, installed by ``scripts/setup.sh --dev``)
and a Chromium-family browser: ``BROWSER_PATH``, else ``chromium``/``google-chrome`` on the PATH,
else Debian's ``chromium`` package is installed with apt-get when running as root. Without them
the script stops before executing anything and says what is missing. The library itself never
needs either.

Run times: a notebook's header states how long it takes in each mode between the markers
``<!-- run-time fast -->`` / ``<!-- run-time full -->`` and ``<!-- /run-time -->``. Each run of this
script rewrites the marker of the mode it ran with what it measured (the kernel's execution time),
so the numbers are never typed by hand. ``--times-only`` runs the notebooks and rewrites only those
numbers in the saved files, leaving their outputs as they are (e.g. ``--fast --times-only`` after a
full-mode run, to measure fast mode without saving fast-mode outputs).

Notebooks run in a fresh kernel each (this checkout's ``moe_lab`` first on ``PYTHONPATH``,
``MOE_LAB_FAST=0`` or ``1``, ``PYTHONHASHSEED=0``), in the notebook's folder. A notebook is written
only when it ran without error and every figure got its PNG, through a temporary file renamed over
the old one: a failed or timed-out run leaves the old file as it was and keeps the partly executed
copy in a temporary folder whose path is printed.
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures as cf
import hashlib
import html as html_lib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
PLOTLY_MIME = "application/vnd.plotly.v1+json"
PNG_MIME = "image/png"
HTML_MIME = "text/html"
GRAPH_DIV = 'class="plotly-graph-div"'  # the <div> plotly.io.to_html draws a figure into
PLOTLY_CDN = "cdn.plot.ly"
# PNGs at plotly's own size (the figure's layout width/height, else 700 x 500) and scale 1, then
# reduced to 256 colours without dithering (figures use few colours; the text stays sharp):
# 10-100 kB per figure, a quarter of kaleido's RGBA PNG.
PNG_SCALE = 1.0
PNG_COLORS = 256
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
HTML_MODES = ("inline", "none")


class FigureToolsMissing(RuntimeError):
    """kaleido or a browser for it is missing (the message says how to get them)."""


# ---------------------------------------------------------------- the figure tools

def find_browser(install: bool = False) -> str:
    """Path of a Chromium-family browser for kaleido: ``BROWSER_PATH``, else one on the PATH, else
    (``install=True``, root, apt-get present) Debian's ``chromium`` installed now. Raises
    :class:`FigureToolsMissing` saying what to do when there is none."""
    env = os.environ.get("BROWSER_PATH")
    if env:
        if not (os.path.isfile(env) and os.access(env, os.X_OK)):
            raise FigureToolsMissing(f"BROWSER_PATH={env!r} is not an executable file")
        return env
    for name in BROWSERS:
        found = shutil.which(name)
        if found:
            return found
    if install and shutil.which("apt-get") and hasattr(os, "geteuid") and os.geteuid() == 0:
        print("no browser found: installing Debian's chromium with apt-get (for the figures' PNGs)", file=sys.stderr)
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-qq"], check=False, env=env)
        done = subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "chromium"], env=env)
        found = shutil.which("chromium")
        if done.returncode == 0 and found:
            return found
    raise FigureToolsMissing(
        "no Chromium-family browser found for the figures' static PNGs (kaleido draws them in a headless "
        f"browser). Looked for $BROWSER_PATH and {', '.join(BROWSERS)} on the PATH. Install one, e.g. "
        "`sudo apt-get install chromium` (Debian/Ubuntu), or set BROWSER_PATH to a Chrome/Chromium binary.")


def require_figure_tools(install: bool = False) -> str:
    """Check that kaleido imports and a browser exists; export ``BROWSER_PATH`` for kaleido; return it."""
    try:
        import kaleido  # noqa: F401
        import PIL  # noqa: F401
    except ImportError as e:
        raise FigureToolsMissing(
            f"{e.name} is not installed: kaleido draws the figures' static PNGs, Pillow shrinks them. Install the figure tools: "
            f"`{sys.executable} -m pip install -e '{ROOT}[figures]'` (or `bash scripts/setup.sh --dev`).") from None
    browser = find_browser(install=install)
    os.environ["BROWSER_PATH"] = browser  # choreographer (kaleido's browser driver) reads it
    return browser


# ---------------------------------------------------------------- one output at a time

def is_figure_output(output: dict) -> bool:
    """A display/execute output that holds a plotly figure (its JSON, or an HTML-only figure)."""
    data = output.get("data", {})
    return PLOTLY_MIME in data or GRAPH_DIV in _text(data.get(HTML_MIME))


def is_plotly_loader(output: dict) -> bool:
    """The output a plotly HTML renderer writes once to load plotly.js (no figure in it)."""
    data = output.get("data", {})
    html = _text(data.get(HTML_MIME))
    return (output.get("output_type") == "display_data" and set(data) <= {HTML_MIME, "text/plain"}
            and GRAPH_DIV not in html and ("plotly.js" in html or PLOTLY_CDN in html or "window.PlotlyConfig" in html))


def _text(value) -> str:
    return "".join(value) if isinstance(value, list) else (value or "")


def _split(figure: dict) -> tuple[dict, dict]:
    fig = {k: v for k, v in figure.items() if k in ("data", "layout", "frames")}
    return fig, dict(figure.get("config") or {})


def figure_png(figure: dict, scale: float = PNG_SCALE, colors: int = PNG_COLORS) -> bytes:
    """The figure (its plotly JSON) as PNG bytes, at its layout's size (plotly's 700 x 500 without
    one), on white, reduced to ``colors`` colours (0: kaleido's PNG as it is)."""
    import io
    import warnings

    import plotly.io as pio
    from PIL import Image

    fig, _ = _split(figure)
    with warnings.catch_warnings():  # plotly passes kaleido options that a running server ignores
        warnings.filterwarnings("ignore", message="The kopts argument is ignored")
        png = pio.to_image(fig, format="png", scale=scale, validate=False)
    if not colors:
        return png
    image = Image.open(io.BytesIO(png)).convert("RGBA")
    flat = Image.alpha_composite(Image.new("RGBA", image.size, "white"), image).convert("RGB")
    out = io.BytesIO()
    quantize_keeping(flat, colors, key_colors()).save(out, "PNG", optimize=True)
    return out.getvalue()


def key_colors() -> list[str]:
    """Colours that must survive the reduction to 256 colours exactly: moe_lab's expert and domain
    colours (a median cut alone maps a small orange expert swatch beside a red heatmap to red)."""
    try:
        from moe_lab import viz
    except Exception:  # the script also runs where moe_lab does not import
        return []
    return list(dict.fromkeys(list(viz.expert_colors(18)) + list(viz.DOMAIN_COLORS)
                              + ["#000000", "#FFFFFF", "#222222", "#555555"]))


def quantize_keeping(flat, colors: int, keep: list[str]):
    """``flat`` (RGB) reduced to ``colors`` palette colours without dithering; the colours in ``keep``
    that occur in the image are palette entries, so their pixels keep their exact colour."""
    from PIL import Image

    present = {c for _, c in (flat.getcolors(flat.width * flat.height) or [])}
    fixed = []
    for c in keep:
        rgb = tuple(int(c.lstrip("#")[i:i + 2], 16) for i in (0, 2, 4))
        if rgb in present and rgb not in fixed:
            fixed.append(rgb)
    if len(present) <= colors:  # every colour fits: keep them all
        palette = [v for rgb in sorted(present) for v in rgb]
    else:
        rest = flat.quantize(colors - len(fixed), method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
        palette = [v for rgb in fixed for v in rgb] + rest.getpalette()[: 3 * (colors - len(fixed))]
    import numpy as np  # each pixel to its nearest palette colour, exactly (Pillow's palette mapping
                        # works on a coarser colour grid and moves white to (252, 252, 253))

    pal = np.asarray(palette, dtype=np.int32).reshape(-1, 3)
    rgb = np.asarray(flat, dtype=np.int32)
    codes = rgb[..., 0] << 16 | rgb[..., 1] << 8 | rgb[..., 2]
    uniq, inverse = np.unique(codes.ravel(), return_inverse=True)
    u = np.stack([uniq >> 16, (uniq >> 8) & 255, uniq & 255], axis=1)
    nearest = np.empty(len(u), dtype=np.uint8)
    for i in range(0, len(u), 4096):
        d = ((u[i:i + 4096, None, :] - pal[None]) ** 2).sum(-1)
        nearest[i:i + 4096] = d.argmin(1)
    out = Image.fromarray(nearest[inverse].reshape(codes.shape), mode="P")
    out.putpalette([int(v) for v in pal.ravel()] + [0] * (768 - pal.size))
    return out


def figure_html(figure: dict, include_plotlyjs: bool, div_id: str | None = None, png: bytes | None = None) -> str:
    """The figure as an HTML fragment that needs no network: plotly.js inline when asked, else the
    ``window.Plotly`` of an earlier fragment on the same page; no MathJax from a CDN.

    ``png``: the static image goes first, as a fallback for viewers that show HTML but run no
    JavaScript (the figure's script removes it once plotly has drawn). The ``<div>``'s id is
    ``div_id``, else drawn from the figure's JSON, so that saving the same figure twice gives the
    same bytes (small diffs when notebooks are re-executed)."""
    import plotly.io as pio

    fig, config = _split(figure)
    if div_id is None:
        digest = hashlib.sha1(json.dumps(figure, sort_keys=True).encode()).hexdigest()[:16]
        div_id = f"plotly-{digest}"
    post_script = None
    fallback = ""
    if png is not None:
        title = ((fig.get("layout") or {}).get("title") or {})
        alt = html_lib.escape(title.get("text", "") if isinstance(title, dict) else str(title)) or "plotly figure"
        fallback = (f'<img id="{div_id}-png" alt="{alt}" style="max-width:100%" '
                    f'src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">')
        post_script = "var png = document.getElementById('{plot_id}-png'); if (png) { png.remove(); }"
    return fallback + pio.to_html(fig, config=config, include_plotlyjs=include_plotlyjs, include_mathjax=False,
                                  full_html=False, default_width="100%", default_height=525, validate=False,
                                  div_id=div_id, post_script=post_script)


def add_static_figures(nb: dict, html: str = "inline", scale: float = PNG_SCALE, progress=None) -> dict:
    """Give every plotly figure output of ``nb`` (an nbformat dict, changed in place) its PNG and an
    offline HTML part (plotly.js inline in the first figure; ``html="none"``: no HTML part), and
    drop the plotly.js loader outputs. Returns counts: figures, loaders_removed, png_bytes.

    A figure saved only as HTML (no plotly JSON) cannot be redrawn: that is an error naming the cell.
    """
    if html not in HTML_MODES:
        raise ValueError(f"html={html!r}: use one of {HTML_MODES}")
    stats = {"figures": 0, "loaders_removed": 0, "png_bytes": 0}
    first = True
    for i, cell in enumerate(nb.get("cells", [])):
        if cell.get("cell_type") != "code":
            continue
        kept = []
        for output in cell.get("outputs", []):
            if is_plotly_loader(output):
                stats["loaders_removed"] += 1
                continue
            kept.append(output)
            if not is_figure_output(output):
                continue
            data = output["data"]
            if PLOTLY_MIME not in data:
                raise ValueError(f"cell {i}: a plotly figure saved as HTML only (no {PLOTLY_MIME}); "
                                 "show it with fig.show() after viz.setup_notebook() so its JSON is saved")
            png = figure_png(data[PLOTLY_MIME], scale=scale)
            data[PNG_MIME] = base64.b64encode(png).decode("ascii")
            stats["png_bytes"] += len(png)
            if html == "inline":
                digest = hashlib.sha1(json.dumps(data[PLOTLY_MIME], sort_keys=True).encode()).hexdigest()[:12]
                div_id = f"plotly-{i}-{len(kept) - 1}-{digest}"  # unique in the notebook, stable across saves
                data[HTML_MIME] = figure_html(data[PLOTLY_MIME], include_plotlyjs=first, div_id=div_id, png=png)
                first = False
            else:
                data.pop(HTML_MIME, None)
            stats["figures"] += 1
            if progress is not None:
                progress(i)
        cell["outputs"] = kept
    return stats


def figures_missing_png(nb: dict) -> list[int]:
    """Indices of the code cells with a figure output that has no PNG."""
    return [i for i, cell in enumerate(nb.get("cells", [])) if cell.get("cell_type") == "code"
            and any(is_figure_output(o) and PNG_MIME not in o.get("data", {}) for o in cell.get("outputs", []))]


# ---------------------------------------------------------------- measured run times in the header

RUN_TIME_MODES = ("fast", "full")
_RUN_TIME = re.compile(r"(<!-- run-time (fast|full) -->)(.*?)(<!-- /run-time -->)", re.S)


def format_run_time(seconds: float) -> str:
    """A measured duration as a header states it: "about 40 s", "about 2.5 min", "about 15 min"."""
    if seconds < 90:
        return f"about {max(5, 5 * round(seconds / 5)):.0f} s"
    minutes = seconds / 60
    return f"about {round(minutes * 2) / 2:g} min" if minutes < 10 else f"about {round(minutes):.0f} min"


def set_run_time(nb: dict, mode: str, seconds: float) -> int:
    """Write ``seconds`` (formatted) between the ``<!-- run-time {mode} -->`` marker and its end in
    the markdown cells of ``nb`` (an nbformat dict, changed in place); returns how many were written."""
    if mode not in RUN_TIME_MODES:
        raise ValueError(f"mode={mode!r}: use one of {RUN_TIME_MODES}")
    count = 0
    for cell in nb.get("cells", []):
        if cell.get("cell_type") != "markdown":
            continue
        source = _text(cell.get("source"))

        def put(m):
            nonlocal count
            if m.group(2) != mode:
                return m.group(0)
            count += 1
            return m.group(1) + format_run_time(seconds) + m.group(4)

        new = _RUN_TIME.sub(put, source)
        if new != source:
            cell["source"] = new
    return count


def run_times(nb: dict) -> dict[str, str]:
    """The run times a notebook's markdown states, by mode ({"fast": "about 40 s", ...})."""
    return {m.group(2): m.group(3) for cell in nb.get("cells", []) if cell.get("cell_type") == "markdown"
            for m in _RUN_TIME.finditer(_text(cell.get("source")))}


# ---------------------------------------------------------------- one notebook (a worker process)

def write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder, renamed over it."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        if path.exists():
            os.chmod(tmp, path.stat().st_mode & 0o777)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def kernel_env(fast: bool, jobs: int = 1) -> dict:
    """The environment of the notebooks' kernels: this checkout's moe_lab first, the mode, a fixed
    hash seed, and (unless set) the CPU cores shared out between the ``jobs`` kernels running at once."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // jobs)))
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env["MOE_LAB_FAST"] = "1" if fast else "0"
    env.pop("PLOTLY_RENDERER", None)  # viz.setup_notebook() would honour it: the saved form needs the default
    env.setdefault("PYTHONHASHSEED", "0")
    return env


def run_one(path: Path, *, execute: bool, fast: bool, cell_timeout: int, html: str, scale: float,
            failed_dir: Path, progress: bool, jobs: int = 1, times_only: bool = False) -> dict:
    """Execute one notebook (``execute``), write its measured run time into its header, add the
    static figures, write it back atomically. ``times_only``: write only the run time into the saved
    file (its outputs stay as they were)."""
    import nbformat

    result = {"notebook": str(path), "bytes_before": path.stat().st_size, "executed": execute}
    nb = nbformat.read(path, as_version=4)
    t0 = time.perf_counter()
    if execute:
        from nbclient import NotebookClient
        from nbclient.exceptions import CellExecutionError

        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=sum(c.cell_type == "code" for c in nb.cells), desc=path.name, unit="cell",
                       leave=False, file=sys.stderr)
        os.environ.update(kernel_env(fast, jobs))  # the kernel inherits this process's environment
        client = NotebookClient(nb, timeout=cell_timeout, kernel_name="python3", record_timing=True,  # per-cell times: scripts/instructor_times.py
                                resources={"metadata": {"path": str(path.parent)}},
                                on_cell_executed=(lambda **kw: bar.update()) if bar else None)
        try:
            client.execute()
        except CellExecutionError as e:
            kept = failed_dir / path.name
            nbformat.write(nb, kept)
            result.update(ok=False, error=f"{str(e)[-3000:]}\n(partly executed copy: {kept})")
            return result
        finally:
            if bar is not None:
                bar.close()
    result["execute_s"] = time.perf_counter() - t0
    if execute:
        mode = "fast" if fast else "full"
        if times_only:
            saved = nbformat.read(path, as_version=4)
            result["run_time_markers"] = set_run_time(saved, mode, result["execute_s"])
            text = nbformat.writes(saved) + "\n"
            write_atomically(path, text)
            result.update(ok=True, figures=0, figures_s=0.0, bytes_after=len(text.encode("utf-8")))
            return result
        result["run_time_markers"] = set_run_time(nb, mode, result["execute_s"])
    t1 = time.perf_counter()
    stats = add_static_figures(nb, html=html, scale=scale)
    missing = figures_missing_png(nb)
    if missing:
        result.update(ok=False, error=f"figures without PNG in cells {missing}")
        return result
    result["figures_s"] = time.perf_counter() - t1
    text = nbformat.writes(nb) + "\n"
    nbformat.validate(nbformat.reads(text, as_version=4))
    write_atomically(path, text)
    result.update(stats, ok=True, bytes_after=len(text.encode("utf-8")))
    return result


def _worker_main(args) -> int:
    if args.times_only:  # no figure is drawn: no browser needed
        result = run_one(Path(args.worker), execute=True, fast=args.fast, cell_timeout=args.cell_timeout,
                         html=args.html, scale=args.png_scale, failed_dir=Path(args.failed_dir),
                         progress=args.jobs == 1, jobs=args.jobs, times_only=True)
        print("RESULT " + json.dumps(result), flush=True)
        return 0 if result["ok"] else 1
    import kaleido

    kaleido.start_sync_server(silence_warnings=True)  # one browser for all the notebook's figures
    try:
        result = run_one(Path(args.worker), execute=not args.no_execute, fast=args.fast,
                         cell_timeout=args.cell_timeout, html=args.html, scale=args.png_scale,
                         failed_dir=Path(args.failed_dir), progress=args.jobs == 1, jobs=args.jobs,
                         times_only=args.times_only)
    except Exception as e:  # reported by the parent, with the notebook's name
        result = {"notebook": args.worker, "ok": False, "error": f"{type(e).__name__}: {e}"}
    finally:
        kaleido.stop_sync_server(silence_warnings=True)
    print("RESULT " + json.dumps(result), flush=True)
    return 0 if result["ok"] else 1


# ---------------------------------------------------------------- all of them

def all_notebooks() -> list[Path]:
    return sorted(NOTEBOOKS.glob("*.ipynb")) + sorted((NOTEBOOKS / "solutions").glob("*.ipynb"))


def resolve(names: list[str]) -> list[Path]:
    """Notebooks by path, file name, stem or number prefix ("05"); an unknown name is an error."""
    if not names:
        return all_notebooks()
    known, out = all_notebooks(), []
    for name in names:
        p = Path(name)
        if p.suffix == ".ipynb" and p.exists():
            out.append(p.resolve())
            continue
        hits = [q for q in known if name in (q.name, q.stem, str(q.relative_to(NOTEBOOKS)))]
        hits = hits or [q for q in known if q.parent == NOTEBOOKS and q.name.startswith(name)]
        if len(hits) != 1:
            raise SystemExit(f"{name!r}: expected one notebook under {NOTEBOOKS}, found "
                             f"{[str(h.relative_to(NOTEBOOKS)) for h in hits] or 'none'}")
        out.append(hits[0])
    return out


def _launch(path: Path, args, failed_dir: Path) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(path), "--failed-dir", str(failed_dir),
           "--html", args.html, "--png-scale", str(args.png_scale), "--cell-timeout", str(args.cell_timeout),
           "-j", str(args.jobs)] + (["--fast"] if args.fast else []) + (["--no-execute"] if args.no_execute else []) \
        + (["--times-only"] if args.times_only else [])
    log = failed_dir / f"{path.stem}.log"
    t0 = time.perf_counter()
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=None if args.jobs == 1 else err,
                                text=True, start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the worker and its kernel
            proc.communicate()
            return {"notebook": str(path), "ok": False, "wall_s": time.perf_counter() - t0,
                    "error": f"timed out after {args.timeout} s (--timeout); the old file is unchanged"}
    lines = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
    result = json.loads(lines[-1][7:]) if lines else {
        "notebook": str(path), "ok": False, "error": f"worker exited with {proc.returncode}; log: {log}"}
    result["wall_s"] = time.perf_counter() - t0
    return result


def _report(r: dict) -> str:
    name = Path(r["notebook"]).relative_to(NOTEBOOKS) if Path(r["notebook"]).is_relative_to(NOTEBOOKS) else r["notebook"]
    if not r["ok"]:
        return f"FAILED {name} after {r.get('wall_s', 0):.0f} s: {r['error']}"
    ran = f"executed in {r['execute_s']:.1f} s" if r.get("executed") else "outputs kept"
    if r.get("executed") and not r.get("run_time_markers"):
        ran += " (no run-time marker in its header: nothing written)"
    return (f"ok     {name}: {ran}, {r['figures']} figures drawn in {r['figures_s']:.1f} s "
            f"({r['wall_s']:.0f} s in all), {r['bytes_before']:,} -> {r['bytes_after']:,} bytes")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("notebooks", nargs="*", help="numbers (05), names or paths; default: every notebook and solution")
    ap.add_argument("--fast", action="store_true", help="fast mode (MOE_LAB_FAST=1, what CI runs); default: full mode")
    ap.add_argument("-j", "--jobs", type=int, default=1, help="notebooks run at the same time (default 1)")
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per notebook before it is stopped (default 3600)")
    ap.add_argument("--cell-timeout", type=int, default=1800, help="seconds per cell (default 1800)")
    ap.add_argument("--html", choices=HTML_MODES, default="none",
                    help="none (default): the plotly JSON (interactive in Jupyter/VS Code) + a PNG that GitHub, nbviewer and HTML exports show, offline; inline: also an HTML part with plotly.js inline (interactive offline HTML, ~5 MB more per notebook)")
    ap.add_argument("--png-scale", type=float, default=PNG_SCALE, help=f"PNG scale factor (default {PNG_SCALE})")
    ap.add_argument("--no-execute", action="store_true", help="keep the saved outputs; only add the static forms")
    ap.add_argument("--no-install", action="store_true", help="never apt-get install a browser")
    ap.add_argument("--times-only", action="store_true",
                    help="run the notebooks but write only the measured run time into each saved header")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--failed-dir", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.jobs < 1:
        ap.error("-j must be at least 1")
    if args.times_only and args.no_execute:
        ap.error("--times-only measures a run: it cannot go with --no-execute")
    try:
        browser = "not needed (--times-only)" if args.times_only else require_figure_tools(install=not args.no_install)
    except FigureToolsMissing as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.worker:
        return _worker_main(args)

    from tqdm import tqdm

    paths = resolve(args.notebooks)
    failed_dir = Path(tempfile.mkdtemp(prefix="moe_lab_notebooks_"))
    mode = "keep outputs" if args.no_execute else ("fast mode" if args.fast else "full mode")
    print(f"{len(paths)} notebooks, {mode}, {args.jobs} at a time; browser {browser}; logs in {failed_dir}")
    results, t0 = [], time.perf_counter()
    with cf.ThreadPoolExecutor(max_workers=args.jobs) as pool, \
            tqdm(total=len(paths), desc="notebooks", unit="nb", file=sys.stdout) as bar:
        futures = {pool.submit(_launch, p, args, failed_dir): p for p in paths}
        for fut in cf.as_completed(futures):
            r = fut.result()
            results.append(r)
            bar.write(_report(r))
            bar.update()
    failed = [r for r in results if not r["ok"]]
    print(f"{len(results) - len(failed)}/{len(results)} notebooks written in {time.perf_counter() - t0:.0f} s"
          + (f"; FAILED (old files kept): {', '.join(Path(r['notebook']).name for r in failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
