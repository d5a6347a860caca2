"""Plotly figures of a :class:`~moe_lab.routing.trace.RoutingTrace`. Every function returns a plain
``go.Figure``: show it, save it with ``fig.write_html``, or change it like any plotly figure.

::

    from moe_lab import viz
    viz.setup_notebook()                      # renderer + template, once per notebook
    viz.token_figure(trace)                   # text coloured by first-choice expert (Mixtral Fig. 8)
    viz.load_heatmap(trace)                   # layer x expert share of assignments
    viz.domain_load_bars(trace, layer=0)      # per-domain load, dashed line at 1/E (Fig. 7)
    viz.repetition_figure(trace)              # consecutive tokens on the same expert (Table 5, Fig. 10)
    viz.coactivation_heatmap(trace, layer=0)  # P(j chosen | i chosen) (OLMoE)
    viz.domain_specialization_heatmap(trace)  # domain x expert share of tokens (OLMoE)
    viz.expert_paths_sankey(trace)            # first choices from layer to layer
    viz.cache_hit_figure(trace)               # expert-cache hit rate against cache size
    viz.expert_heatmap(values, rows=domains)  # row x (layer, expert) values, one panel and scale per layer
    viz.language_content_figure(result)       # routing: content and language effects (aligned paragraphs)
    viz.hidden_control_figure(control, raw)   # adjusting for a mediator (a demonstration, not a control)

Colours: one colour per expert, the same in every figure (:data:`EXPERT_COLORS`,
:func:`expert_color`): the Okabe-Ito palette for experts 0-7, which stays distinguishable
under the common forms of colour blindness, then Paul Tol's "muted" palette for experts 8-17;
beyond 18 experts no palette stays distinguishable, and colours are spread around the hue
circle (read the expert number from the hover text). Domains have their own ten colours
(:data:`DOMAIN_COLORS`, :func:`domain_colors`; a corpus domain keeps its colour in every
figure), as in the Mixtral paper's Figure 7; other series that are not experts (cache
policies, baselines) use :data:`SERIES_COLORS` or greys. Static PNGs keep these colours
exactly (``scripts/execute_notebooks.py``).

Read as a PNG (GitHub, printed exports), a figure here needs no tuning in the notebook: titles
are wrapped to the figure's width and the top margin holds them; every axis is titled; experts
get one labelled tick each (:func:`expert_axis`); log axes are labelled 1, 2, 5, 10, ...
(:func:`log_ticks`); legends sit where they cover no data. A figure computed on a stand-in
says so in its title ("DEMO MODEL: ...", "SYNTHETIC FIXTURE: ..."; :func:`figure_title`,
:func:`stamp`), from the label its trace carries or from ``source=``.

Figures that have one view per layer carry all the layers and a layer switch (plotly buttons
or a dropdown) inside the figure, so they still switch layers in a saved notebook or an HTML
export, without a running kernel. Arrays are stored compactly (numbers, not long hover
strings) so that notebooks stay small.

The numbers come from :mod:`moe_lab.analysis`; nothing is computed twice.
"""

from __future__ import annotations

import colorsys
import html
import math
import os
import sys
from typing import Sequence

import numpy as np
import plotly.graph_objects as go
import plotly.io as pio
from plotly.subplots import make_subplots

from . import analysis as A
from .corpus.base import DOMAINS
from .notebook_utils import DEFAULT_RENDERER, setup_plotly
from .routing.trace import RoutingTrace

__all__ = [
    "EXPERT_COLORS", "SERIES_COLORS", "TEMPLATE", "expert_color", "expert_colors", "setup_notebook",
    "token_figure", "load_heatmap", "domain_load_bars", "repetition_figure", "coactivation_heatmap",
    "expert_paths_sankey", "cache_hit_figure", "layer_switch_states", "next_token_figure",
    "routing_changes", "routing_change_figure", "domain_specialization_heatmap",
    "offload_policy_figure", "prefetch_figure", "tokens_per_second_figure", "calibration_figure", "stamp",
    "language_content_figure", "hidden_control_figure", "DOMAIN_COLORS", "domain_color", "domain_colors",
    "expert_heatmap", "figure_title", "log_ticks", "expert_axis",
    "ablation_scan_figure", "redundancy_figure", "dose_response_figure",
]

# --------------------------------------------------------------------------------------------
# Colours

#: Okabe & Ito (2008), "Color Universal Design": orange, sky blue, bluish green, yellow, blue,
#: vermillion, reddish purple, black; then Paul Tol's "muted" scheme (indigo, cyan, teal, green,
#: olive, sand, rose, wine, purple, pale grey) for experts 8-17.
EXPERT_COLORS: tuple[str, ...] = (
    "#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7", "#000000",
    "#332288", "#88CCEE", "#44AA99", "#117733", "#999933", "#DDCC77", "#CC6677", "#882255",
    "#AA4499", "#DDDDDD",
)

#: Colours for series that are not experts (cache policies, methods): Paul Tol's "vibrant".
SERIES_COLORS: tuple[str, ...] = ("#0077BB", "#EE7733", "#009988", "#CC3311", "#33BBEE", "#EE3377", "#BBBBBB")

#: Ten colours for domains (:func:`domain_color`): the classic Tableau/d3 "category10" with its grey
#: replaced by navy, so that no domain looks like a grey baseline. Every pair differs by a CIELAB
#: distance of at least 27 (tested), and each differs from the baseline greys by as much.
DOMAIN_COLORS: tuple[str, ...] = (
    "#1F77B4", "#FF7F0E", "#2CA02C", "#D62728", "#9467BD", "#8C564B", "#E377C2", "#17BECF", "#BCBD22", "#0B2E59",
)

#: Name of the lean plotly template that every figure here uses (registered on import).
TEMPLATE = "moe_lab"

_FONT = "Inter, 'Helvetica Neue', Arial, sans-serif"
_MONO = "'DejaVu Sans Mono', Menlo, Consolas, 'Courier New', monospace"
_GRID = "#E5E5E5"
_BASELINE_COLOR = "#555555"


def expert_color(e: int) -> str:
    """Hex colour of expert ``e`` (the same in every moe_lab figure)."""
    e = int(e)
    if e < 0:
        raise ValueError(f"expert ids are >= 0, got {e}")
    if e < len(EXPERT_COLORS):
        return EXPERT_COLORS[e]
    # golden-ratio hue steps: neighbours differ, but no longer colour-blind safe
    h = (0.11 + 0.618034 * (e - len(EXPERT_COLORS))) % 1.0
    r, g, b = colorsys.hls_to_rgb(h, 0.5, 0.65)
    return f"#{round(r * 255):02X}{round(g * 255):02X}{round(b * 255):02X}"


def expert_colors(n_experts: int) -> list[str]:
    """The colours of experts 0..n_experts-1."""
    return [expert_color(e) for e in range(n_experts)]


def _known_domains() -> tuple[str, ...]:
    return tuple(DOMAINS)


def domain_colors(domains: Sequence[str]) -> list[str]:
    """One colour per domain, distinct for up to 10 domains, and the same for a domain in every
    figure: moe_lab's corpus domains (python, english, math, french, german, spanish, italian,
    data, latex) keep a fixed slot of :data:`DOMAIN_COLORS` whichever subset a figure shows; other
    names take the free slots in the order given. Past 10 domains, colours are spread around the
    hue circle (tell them apart by the legend and hover text)."""
    domains = list(domains)
    known = _known_domains()
    slot: dict[str, int] = {}
    for d in domains:
        if d in known and known.index(d) < len(DOMAIN_COLORS):
            slot[d] = known.index(d)
    free = [i for i in range(len(DOMAIN_COLORS)) if i not in set(slot.values())]
    extra = 0
    out = []
    for d in domains:
        if d not in slot:
            if free:
                slot[d] = free.pop(0)
            else:
                slot[d] = len(DOMAIN_COLORS) + extra
                extra += 1
        i = slot[d]
        if i < len(DOMAIN_COLORS):
            out.append(DOMAIN_COLORS[i])
        else:  # golden-ratio hue steps, darker than the expert extension
            h = (0.03 + 0.618034 * (i - len(DOMAIN_COLORS))) % 1.0
            r, g, b = colorsys.hls_to_rgb(h, 0.42, 0.7)
            out.append(f"#{round(r * 255):02X}{round(g * 255):02X}{round(b * 255):02X}")
    return out


def domain_color(domain: str, domains: Sequence[str] | None = None) -> str:
    """Colour of ``domain`` among ``domains`` (the figure's domains; default: the domain alone)."""
    domains = list(domains) if domains is not None else [domain]
    if domain not in domains:
        raise KeyError(f"domain {domain!r} is not among {domains}")
    return domain_colors(domains)[domains.index(domain)]


def _rgb(color: str) -> tuple[int, int, int]:
    c = color.lstrip("#")
    return int(c[0:2], 16), int(c[2:4], 16), int(c[4:6], 16)


def _rgba(color: str, alpha: float) -> str:
    r, g, b = _rgb(color)
    return f"rgba({r},{g},{b},{alpha})"


def text_color(background: str) -> str:
    """Black or white, whichever reads better on ``background`` (WCAG relative luminance)."""
    def lin(c):
        c /= 255
        return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4
    r, g, b = (lin(c) for c in _rgb(background))
    lum = 0.2126 * r + 0.7152 * g + 0.0722 * b
    return "#000000" if (lum + 0.05) / 0.05 >= 1.05 / (lum + 0.05) else "#FFFFFF"


def _esc(text: str) -> str:
    """Escape text for plotly (which reads <, > and & as markup but shows &quot; literally)."""
    return html.escape(text, quote=False)


def _expert_tick(e: int) -> str:
    """Axis label of expert e: its number in its colour (a coloured square, then the number)."""
    return f"<span style='color:{expert_color(e)}'>■</span> {e}"


def expert_axis(n_experts: int, title: str = "expert") -> dict:
    """Axis settings that label every expert 0..n_experts-1 with its number and a square in its
    colour, as the heatmaps here do: ``fig.update_yaxes(**viz.expert_axis(8))`` on a figure whose
    y values are expert numbers."""
    return dict(title=dict(text=title), tickmode="array", tickvals=list(range(n_experts)),
                ticktext=[_expert_tick(e) for e in range(n_experts)])


# --------------------------------------------------------------------------------------------
# Template and notebook set-up

def _register_template() -> None:
    # Layout defaults only (no per-trace-type defaults), so the template embedded in each saved
    # figure is ~1 kB rather than the ~10 kB of "plotly_white".
    pio.templates[TEMPLATE] = go.layout.Template(layout=dict(
        font=dict(family=_FONT, size=13, color="#222222"),
        paper_bgcolor="white", plot_bgcolor="white", colorway=list(SERIES_COLORS),
        # log axes label their 2s and 5s in full (0.5, 1, 2, 5, 10, ...), not as bare digits
        xaxis=dict(gridcolor=_GRID, zerolinecolor=_GRID, linecolor="#BBBBBB", ticks="outside", automargin=True,
                   minorloglabels="complete", title=dict(standoff=8)),
        yaxis=dict(gridcolor=_GRID, zerolinecolor=_GRID, linecolor="#BBBBBB", ticks="outside", automargin=True,
                   minorloglabels="complete", title=dict(standoff=8)),
        hoverlabel=dict(font=dict(family=_FONT, size=12), align="left"),
        legend=dict(bgcolor="rgba(255,255,255,0.8)"),
        margin=dict(l=60, r=30, t=60, b=50),
        # a title indented from the figure's edge; automargin keeps it clear of the plot, its
        # subplot titles and its legend
        title=dict(x=0.0, xanchor="left", xref="container", pad=dict(l=14), font=dict(size=15)),
    ))


_register_template()


def _in_colab() -> bool:
    return "google.colab" in sys.modules


def setup_notebook(renderer: str | None = None, template: bool = True) -> str:
    """Pick a plotly renderer that works in JupyterLab, classic Notebook (7 and 6), VS Code and
    Colab and leaves a kernel-free rendering in the saved notebook and in HTML exports; set the
    moe_lab template as plotly's default. Returns the renderer's name. Call it once, at the top.

    Why this renderer: ``"plotly_mimetype+notebook_connected"`` (the default here) writes each
    figure twice in one output, as the plotly JSON mimetype (drawn natively by JupyterLab,
    Notebook 7 and VS Code, offline) and as an HTML part that loads plotly.js from its CDN
    (drawn by classic Notebook 6, nbviewer, ``jupyter nbconvert --to html`` and other viewers).
    Both parts are drawn from the saved output, without a kernel, and both keep the layer
    switches of the figures working. plotly.js itself (~4 MB) is *not* embedded: the
    ``"notebook"`` renderer would put it into every notebook, and our notebooks must stay
    small while you work. The price is that the HTML part needs the CDN once (online). On Google
    Colab, which draws neither part inside its sandbox, the ``"colab"`` renderer is chosen instead
    and Colab's widget manager is enabled for the explorer. The notebooks saved in the repository
    are rewritten by ``scripts/execute_notebooks.py``: every figure output also carries a static
    PNG (drawn by kaleido, for GitHub and printed exports, which run no JavaScript) and an HTML
    part with plotly.js inline once per notebook (offline HTML exports). You need none of that
    to run a notebook.

    ``renderer`` overrides the choice (e.g. ``"notebook"`` for fully offline HTML exports, or
    ``"png"`` with kaleido installed). ``template=False`` keeps plotly's default template.
    The environment variable ``PLOTLY_RENDERER`` also overrides the choice, as in plotly.
    """

    if renderer is None:
        renderer = os.environ.get("PLOTLY_RENDERER") or ("colab" if _in_colab() else DEFAULT_RENDERER)
    if _in_colab():
        try:  # ipywidgets 8 on Colab needs its custom widget manager
            from google.colab import output  # type: ignore[import-not-found]

            output.enable_custom_widget_manager()
        except Exception:  # pragma: no cover - only on Colab
            pass
    setup_plotly(renderer)
    if template:
        pio.templates.default = TEMPLATE
    return renderer


def _figure(**layout) -> go.Figure:
    fig = go.Figure()
    fig.update_layout(template=TEMPLATE, **layout)
    return fig


# --------------------------------------------------------------------------------------------
# Helpers

def _ids_note(source) -> str:
    """A subtitle for figures computed from a trace (or result) that holds expert ids only
    (vLLM, SGLang, the OLMoE study): the figure says so."""
    return "<br><sup>computed from expert ids only (no router weights or logits)</sup>" \
        if getattr(source, "ids_only", False) else ""


def _provenance(source_obj=None, source=None) -> str:
    """What the figure was computed on (:func:`moe_lab.analysis.provenance`): ``source`` if given (a
    label, or a trace, model or DataFrame that carries one), else what ``source_obj`` carries
    (``meta["provenance"]``, a trace file among the shipped fixtures, ``attrs["source"]``)."""
    return A.provenance(source) if source is not None else A.provenance(source_obj)


def figure_title(text: str, source_obj=None, source=None) -> str:
    """A figure's title that says what it was computed on, in the words :func:`stamp` and
    :func:`moe_lab.analysis.headline` use: ``"DEMO MODEL: <text>"`` / ``"SYNTHETIC FIXTURE:
    <text>"`` for a stand-in, ``"<text> (<source>)"`` for a named real source; then the
    expert-ids-only note for traces without router weights. ``source``: a label or anything that
    carries one (default: ``source_obj``'s own label). Every figure function here builds its title
    with it; use it for figures drawn by hand too: ``figure_title("Hit rate", source=trace)``."""
    label = _provenance(source_obj, source)
    if label and label.upper() not in text and label.lower() not in text.lower():
        first, sep, rest = text.partition("<br>")
        text = A.headline(label, first) + sep + rest
    return text + _ids_note(source_obj)


_CHAR_PX = 8.0  # mean width of a character of the title fonts (15-16 px), for wrapping


def _wrap(text: str, width_px: float, char_px: float = _CHAR_PX) -> str:
    """Break ``text`` at spaces (and keep its own ``<br>``) so that no line is wider than
    ``width_px``; markup such as ``<sup>...</sup>`` lines counts at 70%."""
    if not text:
        return text
    out = []
    for line in str(text).split("<br>"):
        scale = 0.7 if line.lstrip().startswith("<sup>") else 1.0
        visible = len(_strip_tags(line)) * char_px * scale
        if visible <= width_px or " " not in line:
            out.append(line)
            continue
        import re

        # a short parenthesised group, such as the "(demo model)" of figure_title, stays on one line
        words, cur = re.findall(r"\([^()<>]{0,40}\)\S*|[^\s(]*\([^()<>\s]*\)\S*|\S+", line), ""
        for w in words:
            cand = f"{cur} {w}" if cur else w
            if cur and len(_strip_tags(cand)) * char_px * scale > width_px and not _inside_tag(cur):
                out.append(cur)
                cur = w
            else:
                cur = cand
        out.append(cur)
    return "<br>".join(out)


def _strip_tags(text: str) -> str:
    import re

    return html.unescape(re.sub(r"<[^>]*>", "", text))


def _inside_tag(text: str) -> bool:
    return text.count("<span") > text.count("</span>") or text.count("<sup>") > text.count("</sup>")


def log_ticks(values, *, per_decade: Sequence[float] = (1, 2, 5)) -> dict:
    """Axis settings for a log axis over ``values``: ``type="log"`` and explicit ``tickvals`` /
    ``ticktext`` at 1, 2, 5 x 10^n covering the values (0.5, 1, 2, 5, 10, 20, 50, ...), every
    tick labelled in full. Use it as ``fig.update_yaxes(**viz.log_ticks(y))``."""
    v = np.asarray([float(x) for x in np.ravel(values) if x is not None], dtype=np.float64)
    v = v[np.isfinite(v) & (v > 0)]
    if v.size == 0:
        return dict(type="log")
    lo, hi = float(v.min()), float(v.max())
    ticks = []
    for n in range(math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 1):
        for m in per_decade:
            t = m * 10.0 ** n
            ticks.append(float(f"{t:.6g}"))
    below = [t for t in ticks if t <= lo]
    above = [t for t in ticks if t >= hi]
    first, last = (below[-1] if below else ticks[0]), (above[0] if above else ticks[-1])
    ticks = [t for t in ticks if first <= t <= last]
    text = [f"{t:,.10g}" for t in ticks]
    return dict(type="log", tickmode="array", tickvals=ticks, ticktext=text,
                range=[math.log10(first) - 0.02, math.log10(last) + 0.02])


def _axes(fig: go.Figure):
    """(name, axis) for every x and y axis of the figure."""
    for name in sorted(fig.layout.to_plotly_json()):
        if name.startswith(("xaxis", "yaxis")):
            yield name, fig.layout[name]


def _legend_rows(fig: go.Figure, width: float) -> int:
    """Rows a horizontal legend of the figure's entries needs at ``width`` pixels."""
    names = [_strip_tags(str(t.name or "")) for t in fig.data if t.showlegend is not False and t.name]
    rows, used = 1, 0.0
    for n in dict.fromkeys(names):
        w = 50 + 6.6 * len(n)
        if used and used + w > width:
            rows, used = rows + 1, 0.0
        used += w
    return rows


def _legend_below(fig: go.Figure, *, font_size: int = 11) -> go.Figure:
    """Put the legend in rows under the plot (clear of every curve) and grow the bottom margin
    and the height to hold it: for figures whose curves fill the plot area."""
    width = fig.layout.width or 700
    rows = _legend_rows(fig, width - 40)
    bottom = (fig.layout.margin.b if fig.layout.margin.b is not None else 50)
    need = 24 + 22 * rows
    fig.update_layout(legend=dict(orientation="h", x=0, xanchor="left", y=0, yanchor="bottom", yref="container",
                                  font=dict(size=font_size), bgcolor="rgba(255,255,255,0)"),
                      margin=dict(b=bottom + need), height=(fig.layout.height or 500) + need)
    return fig


def _finish(fig: go.Figure, *, min_top: int | None = None) -> go.Figure:
    """What every figure here gets before it is returned, so that its static PNG reads right with no
    tuning in the notebook: the title wrapped to the figure's width and a top margin (and height)
    grown to hold all its lines, the subplot titles and a layer switch above the plot; long axis
    titles wrapped to their axis; log axes labelled at 1-2-5 ticks (:func:`log_ticks`)."""
    lay = fig.layout
    width = lay.width or 700
    height = lay.height or 500
    margin_t = lay.margin.t if lay.margin.t is not None else 60
    title = lay.title.text
    need = min_top or 0
    if title:
        wrapped = _wrap(title, width - 30)
        lay.title.text = wrapped
        lines = wrapped.split("<br>")
        need = max(need, 30 + sum(13 if ln.lstrip().startswith("<sup>") else 21 for ln in lines)
                   + (30 if any((a.y or 0) >= 1 and a.yref == "paper" for a in lay.annotations) else 0)
                   + (34 if any((m.y or 0) >= 1 for m in lay.updatemenus) else 0))
        if lay.title.y is None:  # the title's top sits at a fixed distance from the figure's top
            # (plotly anchors a multi-line title by its first line: push it down by the others)
            down = sum(11 if ln.lstrip().startswith("<sup>") else 19 for ln in lines[1:])
            fig.update_layout(title=dict(y=1, yanchor="top", yref="container", pad=dict(t=12 + down, l=14)))
    if need > margin_t:
        fig.update_layout(margin=dict(t=need), height=height + need - margin_t)
    for name, ax in _axes(fig):
        text = ax.title.text
        if text:
            dom = ax.domain or (0, 1)
            span = (dom[1] - dom[0]) * ((height - 120) if name.startswith("y") else (width - 160))
            ax.title.text = _wrap(text, max(span, 120))
        if ax.type == "log" and ax.tickvals is None:
            data = [getattr(t, name[0], None) for t in fig.data
                    if (getattr(t, f"{name[0]}axis", None) or name[0]) == name.replace("axis", "")]
            vals = [v for d in data if d is not None for v in np.ravel(np.asarray(d, dtype=object))
                    if isinstance(v, (int, float, np.floating, np.integer))]
            if vals:
                ax.update(log_ticks(vals))
    return fig


def _layers_arg(trace: RoutingTrace, layers) -> list[int]:
    if layers is None:
        return list(trace.layers)
    if isinstance(layers, (int, np.integer)):
        layers = [int(layers)]
    layers = [int(l) for l in layers]
    for l in layers:
        trace.layer_index(l)  # KeyError naming the layers the trace has
    if not layers:
        raise ValueError("layers is empty")
    return layers


def _pieces(trace: RoutingTrace, tokenizer=None) -> list[str]:
    if trace.pieces is not None:
        return list(trace.pieces)
    if tokenizer is not None:
        return tokenizer.pieces(trace.token_ids.tolist())
    return [f"[{t}]" for t in trace.token_ids.tolist()]


def _display_piece(piece: str) -> tuple[str, bool]:
    """(text shown inside the token's box, whether a line break follows)."""
    if piece in ("\\n", "\\r\\n", "<0x0A>"):
        return "↵", True
    newline = piece.endswith("\\n")
    text = piece.replace("▁", " ")
    if newline:
        text = text[: -len("\\n")] + "↵"
    return (text if text.strip() else "·" * max(len(text), 1)), newline


def layer_switch_states(fig: go.Figure) -> list[tuple[str, list[bool]]]:
    """(label, visibility of every trace) for each entry of a figure's layer switch; used by the
    tests and handy to check what a saved figure will show."""
    out = []
    for menu in fig.layout.updatemenus or ():
        for b in menu.buttons:
            out.append((b.label, list(b.args[0]["visible"])))
    return out


def _layer_menu(labels: list[str], visible: list[list[bool]], titles: list[str] | None = None,
                active: int = 0, y: float = 1.0, x: float = 0.0, prefix: str = "layer ") -> dict:
    """updatemenus entry switching trace visibility (buttons up to 8 entries, else a dropdown)."""
    buttons = []
    for i, (label, vis) in enumerate(zip(labels, visible)):
        args: list = [{"visible": vis}]
        if titles is not None:
            args.append({"title.text": titles[i]})
        buttons.append(dict(label=f"{prefix}{label}", method="update", args=args))
    dropdown = len(buttons) > 8
    return dict(type="dropdown" if dropdown else "buttons", direction="down" if dropdown else "right",
                buttons=buttons, active=active, showactive=True, x=x, xanchor="left", y=y, yanchor="bottom",
                pad=dict(t=4, r=4), bgcolor="#F5F5F5", bordercolor="#BBBBBB", font=dict(size=12))


# --------------------------------------------------------------------------------------------
# Tokens coloured by expert (Mixtral paper, Figure 8)

def token_figure(trace: RoutingTrace, doc: int = 0, layers: Sequence[int] | int | None = None,
                 tokenizer=None, *, max_tokens: int | None = 600, line_chars: int = 80,
                 title: str | None = None, source: str | None = None) -> go.Figure:
    """The tokens of document ``doc``, each on a box coloured by its first-choice expert (the
    Mixtral paper's Figure 8), one view per layer with a layer switch built into the figure.

    Hover shows the token, its id and position, the top-k experts with their weights and, when
    the trace holds router logits, the entropy of the router's softmax over all experts.
    Tokens are laid out like text in a monospace font, ``line_chars`` characters per line;
    ``max_tokens`` cuts long documents (None: all). ``tokenizer`` gives display pieces when the
    trace has none. Trace ``i`` of the figure is layer ``layers[i]``; the last E traces only
    hold the legend (one entry per expert). ``source`` says in the title what the trace was
    computed on ("demo model", "synthetic fixture"; default: the trace's ``meta["provenance"]``), as
    in every figure of this module.
    """
    trace.require_rank_order("viz.token_figure (colours each token by its first choice)",
                             "viz.load_heatmap / viz.coactivation_heatmap (top-k sets)")
    layers = _layers_arg(trace, layers)
    if not 0 <= doc < trace.n_docs:
        raise IndexError(f"doc {doc} is not in this trace (it has {trace.n_docs} documents)")
    idx = np.flatnonzero(trace.doc_ids == doc)
    idx = idx[np.argsort(trace.positions[idx], kind="stable")]
    if max_tokens is not None:
        idx = idx[:max_tokens]
    if len(idx) == 0:
        raise ValueError(f"document {doc} has no tokens")
    all_pieces = _pieces(trace, tokenizer)
    pieces = [all_pieces[i] for i in idx]

    # layout: monospace "characters" along x, one row per line
    xs, ys, widths, texts = [], [], [], []
    x = line = 0
    for p in pieces:
        text, newline = _display_piece(p)
        w = max(len(text), 1) + 0.3
        if x > 0 and x + w > line_chars:
            x, line = 0, line + 1
        xs.append(x)
        ys.append(line)
        widths.append(w)
        texts.append(_esc(text))
        x += w
        if newline:
            x, line = 0, line + 1
    n_lines = line + 1
    char_px = 7.4

    conf = A.router_confidence(trace) if trace.router_logits is not None else None
    k = trace.top_k
    # hover data as one float32 block per layer (compact in saved notebooks): the k experts, their
    # k weights, [the router entropy,] the token id and the position
    tok_cols = np.stack([trace.token_ids[idx], trace.positions[idx]], axis=1).astype(np.float32)
    xs = [round(float(v), 1) for v in xs]  # plotly stores "base" as a plain list: keep it short
    widths, ys = np.asarray(widths, np.float32).round(2), np.asarray(ys, np.int32)
    fig = _figure()
    for li, layer in enumerate(layers):
        row = trace.layer_index(layer)
        ids = trace.expert_ids[row, idx]  # [n, k]
        colors = [expert_color(e) for e in ids[:, 0].tolist()]
        cols = [ids.astype(np.float32)]
        if trace.weights is not None:
            cols.append(trace.weights[row, idx].astype(np.float32).round(3))
            tmpl = f"layer {layer}: " + ", ".join(
                f"expert %{{customdata[{j}]}} (%{{customdata[{k + j}]:.2f}})" for j in range(k))
        else:  # id-only trace: the experts, without weights
            tmpl = f"layer {layer}: experts " + ", ".join(f"%{{customdata[{j}]}}" for j in range(k))
        c = sum(a.shape[1] for a in cols)
        if conf is not None:
            cols.append(conf.entropy[row, idx].astype(np.float32).round(3)[:, None])
            tmpl += f"<br>router entropy %{{customdata[{c}]:.2f}} nats (uniform {math.log(trace.n_experts):.2f})"
            c += 1
        cols.append(tok_cols)
        tmpl = f"<b>%{{text}}</b>  (id %{{customdata[{c}]}}, position %{{customdata[{c + 1}]}})<br>" + tmpl
        fig.add_trace(go.Bar(
            x=widths, base=xs, y=ys, orientation="h", width=0.86, text=texts,
            customdata=np.concatenate(cols, axis=1), hovertemplate=tmpl + "<extra></extra>",
            marker=dict(color=colors, line=dict(color="white", width=1)),
            textposition="inside", insidetextanchor="middle", textangle=0, constraintext="none",
            textfont=dict(family=_MONO, size=12, color=[text_color(c) for c in colors]),
            visible=li == 0, showlegend=False, name=f"layer {layer}", cliponaxis=False))
    used = sorted(set(trace.expert_ids[[trace.layer_index(l) for l in layers]][:, idx, 0].ravel().tolist()))
    for e in range(trace.n_experts):  # legend: one entry per expert
        fig.add_trace(go.Bar(x=[None], y=[None], orientation="h", marker_color=expert_color(e),
                             name=str(e), showlegend=e in used or trace.n_experts <= 8, hoverinfo="skip"))
    doc_label = f"document {doc}" + (f" ({trace.domains[doc]})" if trace.domains[doc] else "")
    base_title = title or f"First-choice expert of each token, {doc_label}"
    titles = [_wrap(figure_title(f"{base_title}: layer {l}", trace, source), line_chars * char_px + 10)
              for l in layers]
    n_tr = len(layers) + trace.n_experts
    visible = [[j == i or j >= len(layers) for j in range(n_tr)] for i in range(len(layers))]
    n_legend_rows = math.ceil((sum(1 for d in fig.data[len(layers):] if d.showlegend) + 3) / max(1, int(line_chars / 7)))
    top = (88 if len(layers) > 1 else 44) + 20 * max(t.count("<br>") for t in titles)
    bottom = 14 + 22 * n_legend_rows
    fig.update_layout(
        # (plotly anchors a multi-line title by its first line: push it down by the others)
        title=dict(text=titles[0], y=1, yref="container", yanchor="top", pad=dict(t=10 + 19 * titles[0].count("<br>"))),
        barmode="overlay", bargap=0, uniformtext=dict(minsize=12, mode="show"),
        width=int(line_chars * char_px + 40), height=int(n_lines * 24 + top + bottom),
        margin=dict(l=10, r=10, t=top, b=bottom),
        xaxis=dict(visible=False, range=[-0.3, line_chars + 0.3], fixedrange=True),
        yaxis=dict(visible=False, range=[n_lines - 0.5, -0.5], fixedrange=True),
        legend=dict(title_text="first-choice expert:", orientation="h", x=0, xanchor="left", y=0, yanchor="top",
                    font=dict(size=11), itemwidth=30, traceorder="normal"),
        hovermode="closest")
    if len(layers) > 1:
        menu = _layer_menu([str(l) for l in layers], visible, titles, y=1, x=0.0)
        fig.update_layout(updatemenus=[dict(menu, yanchor="bottom", pad=dict(t=0, b=6, l=0, r=0))])
    fig.layout.meta = dict(kind="token_figure", layers=layers, doc=int(doc), n_tokens=int(len(idx)))
    return fig


# --------------------------------------------------------------------------------------------
# Load

def load_heatmap(trace: RoutingTrace, choice: A.Choice = "either", normalization: str = "assignments",
                 *, title: str | None = None, source: str | None = None) -> go.Figure:
    """Layer x expert load: share of assignments (rows sum to 1, uniform 1/E; the Mixtral
    paper's convention) or, with ``normalization="tokens"``, share of tokens choosing the expert
    (uniform k/E; OLMoE's). Colours diverge around the uniform value: red = over-loaded,
    blue = under-loaded. ``z`` is :func:`moe_lab.analysis.expert_load`."""
    load = A.expert_load(trace, choice, normalization)
    uniform = A.uniform_load(trace, choice, normalization)
    E, L = trace.n_experts, trace.n_layers
    bal = A.load_balance(load)
    hi = max(float(np.nanmax(np.abs(load - uniform))), 1e-9)
    fig = _figure()
    fig.add_trace(go.Heatmap(
        z=load, x=list(range(E)), y=list(trace.layers), zmid=uniform, zmin=uniform - hi, zmax=uniform + hi,
        colorscale="RdBu_r", colorbar=dict(title=dict(text="share"), tickformat=".0%"),
        customdata=np.repeat(bal.cv[:, None], E, axis=1).round(3),
        texttemplate="%{z:.0%}" if L * E <= 400 else None, textfont=dict(size=11),
        hovertemplate="layer %{y}, expert %{x}: %{z:.1%}<br>CV of the layer %{customdata:.2f}<extra></extra>",
        xgap=1, ygap=1))
    what = {"first": "first choices", "second": "second choices", "either": "assignments (top-k)"}[choice]
    unit = "share of " + (what if normalization == "assignments" else "tokens choosing it")
    fig.update_layout(
        title=figure_title(title or f"Expert load per layer: {unit}; uniform = {uniform:.1%}", trace, source),
        xaxis=dict(title="expert", tickmode="array", tickvals=list(range(E)),
                   ticktext=[_expert_tick(e) for e in range(E)], showgrid=False),
        yaxis=dict(title="layer", autorange="reversed", showgrid=False, tickmode="array", tickvals=list(trace.layers)),
        height=max(260, 40 + 28 * L + 120), width=max(480, 60 * E + 260))
    fig.layout.meta = dict(kind="load_heatmap", uniform=uniform, choice=choice, normalization=normalization)
    return _finish(fig)


def domain_load_bars(trace: RoutingTrace, layer: int | Sequence[int] | None = None, choice: A.Choice = "either",
                     *, domains: Sequence[str] | None = None, title: str | None = None,
                     source: str | None = None) -> go.Figure:
    """Share of each domain's top-k assignments that go to each expert (the Mixtral paper's
    Figure 7), with the uniform share 1/E as a dashed line. As in the paper, bars are coloured by
    domain (:func:`domain_colors`: a domain has the same colour in every figure) and grouped by
    expert along x (the tick's square is the expert's colour). One panel per layer in ``layer``
    (default: the first, middle and last traced layers, as in the paper)."""
    if layer is None:
        ls = trace.layers
        layer = sorted(set([ls[0], ls[len(ls) // 2], ls[-1]]))
    layers = _layers_arg(trace, layer)
    by_domain = A.expert_load_by_domain(trace, choice)
    doms = list(domains) if domains is not None else list(by_domain)
    unknown = set(doms) - set(by_domain)
    if unknown:
        raise KeyError(f"unknown domain(s) {sorted(unknown)}; this trace has {list(by_domain)}")
    n_tok = {d: int((trace.token_domains == d).sum()) for d in doms}
    E = trace.n_experts
    uniform = A.uniform_load(trace, choice)
    fig = make_subplots(rows=len(layers), cols=1, shared_xaxes=True, vertical_spacing=0.1 if len(layers) > 1 else 0.0,
                        subplot_titles=[f"layer {l}" for l in layers])
    fig.update_layout(template=TEMPLATE)
    colors = domain_colors(doms)
    for r, l in enumerate(layers, start=1):
        row = trace.layer_index(l)
        for i, d in enumerate(doms):
            label = d or "(no domain)"
            fig.add_trace(go.Bar(
                x=list(range(E)), y=by_domain[d][row], name=label, legendgroup=label, showlegend=r == 1,
                marker=dict(color=colors[i], line=dict(width=0)),
                customdata=np.full(E, n_tok[d]),
                hovertemplate=f"{_esc(label)}, layer {l}<br>expert %{{x}}: %{{y:.1%}} of assignments"
                              "<br>%{customdata} tokens<extra></extra>"), row=r, col=1)
        fig.add_hline(y=uniform, line=dict(dash="dash", color=_BASELINE_COLOR, width=1.5), row=r, col=1)
        fig.update_yaxes(title_text="share", tickformat=".0%", row=r, col=1, rangemode="tozero")
    fig.add_trace(go.Scatter(x=[None], y=[None], mode="lines", name=f"uniform 1/E = {uniform:.1%}",
                             line=dict(dash="dash", color=_BASELINE_COLOR, width=1.5)), row=1, col=1)
    fig.update_xaxes(tickmode="array", tickvals=list(range(E)), ticktext=[_expert_tick(e) for e in range(E)],
                     showticklabels=True, showgrid=False)
    for e in range(1, E):  # a thin rule between experts: which bars belong to which expert
        fig.add_vline(x=e - 0.5, line=dict(color=_GRID, width=1))
    fig.update_xaxes(title_text="expert", row=len(layers), col=1)
    per_bar = 9 if len(doms) * E > 40 else 14
    fig.update_layout(barmode="group", bargap=0.18, bargroupgap=0.0, height=150 + 220 * len(layers),
                      width=int(min(1200, max(640, per_bar * E * len(doms) + 280))),
                      title=figure_title(title or "Share of each domain's top-k assignments per expert "
                                                  "(Mixtral Figure 7)", trace, source),
                      legend=dict(title_text="domain", tracegroupgap=2), margin=dict(t=90))
    fig.layout.meta = dict(kind="domain_load_bars", layers=layers, domains=doms, uniform=uniform)
    return _finish(fig)


# --------------------------------------------------------------------------------------------
# Repetition (Mixtral paper, Table 5 and Figure 10)

_KIND_TITLES = {"first": "same first choice", "any": "top-k sets overlap"}
_SYMBOLS = ("circle", "square", "diamond", "triangle-up", "x")


def repetition_figure(trace: RoutingTrace | Sequence[A.Repetition], kinds: Sequence[str] = ("first", "any"),
                      *, by_domain: bool = False, bos_id: int | None = 1, n_boot: int = 1000, seed: int = 0,
                      title: str | None = None, source: str | None = None) -> go.Figure:
    """Share of consecutive tokens (within a document, BOS excluded) routed alike, across all
    layers (the Mixtral paper's Table 5 and Figure 10), next to its baselines: uniform routing
    (dashed), each layer's own expert frequencies ("marginal", sum of squared shares; dotted)
    and the same documents with their tokens shuffled (dash-dot). Error bars are bootstrap 95%
    intervals over documents. A rate is evidence of "sticky" routing only where its interval
    clears the marginal and shuffled baselines.

    Pass a trace (rates computed with :func:`moe_lab.analysis.repetition`) or already computed
    ``Repetition`` results (one per kind). ``by_domain=True`` adds one line per domain (without
    error bars for a domain of a single document, where a bootstrap over documents has no spread),
    each in its domain's colour (:func:`domain_colors`).
    """
    if isinstance(trace, RoutingTrace):
        reps = [A.repetition(trace, kind, bos_id=bos_id, n_boot=n_boot, seed=seed) for kind in kinds]
    else:
        reps = list(trace)
        kinds = [r.kind for r in reps]
        if by_domain:
            raise ValueError("by_domain needs a trace, not precomputed results")
    per_domain: dict[str, list[A.Repetition]] = {}
    single_doc: set[str] = set()  # a bootstrap over one document has no spread: no error bars
    if by_domain:
        for d in trace.domain_names:
            sub = trace.select(domain=d)
            if sub.n_docs < 2:
                single_doc.add(d)
            try:
                per_domain[d] = [A.repetition(sub, kind, bos_id=bos_id, n_boot=n_boot, seed=seed) for kind in kinds]
            except ValueError:  # a domain without pairs
                continue
    fig = make_subplots(rows=1, cols=len(reps), subplot_titles=[_KIND_TITLES.get(k, k) for k in kinds],
                        horizontal_spacing=0.1)
    fig.update_layout(template=TEMPLATE)
    dcolors = dict(zip(per_domain, domain_colors(list(per_domain))))
    for c, rep in enumerate(reps, start=1):
        x = list(rep.layers)
        first = c == 1
        lo, hi = rep.rate - rep.ci_low, rep.ci_high - rep.rate
        fig.add_trace(go.Scatter(
            x=x, y=rep.rate, mode="lines+markers", name="all documents (95% CI)" if per_domain else "observed (95% CI)",
            legendgroup="obs", showlegend=first, line=dict(color="#222222", width=3), marker=dict(size=7),
            error_y=dict(type="data", symmetric=False, array=hi, arrayminus=lo, color="#222222", thickness=1.2),
            customdata=np.stack([rep.ci_low, rep.ci_high], axis=1).round(4),
            hovertemplate="layer %{x}: %{y:.1%} (95% CI %{customdata[0]:.1%}-%{customdata[1]:.1%})"
                          f"<br>{rep.n_pairs} pairs<extra>all documents</extra>"), row=1, col=c)
        for i, (d, dreps) in enumerate(per_domain.items()):
            r = dreps[c - 1]
            color = dcolors[d]
            symbol = _SYMBOLS[i % len(_SYMBOLS)]  # symbols help past 10 domains and in grey print
            fig.add_trace(go.Scatter(
                x=list(r.layers), y=r.rate, mode="lines+markers", name=d or "(no domain)", legendgroup=d,
                showlegend=first, line=dict(color=color, width=1.5), marker=dict(size=6, symbol=symbol), opacity=0.8,
                error_y=dict(type="data", symmetric=False, array=r.ci_high - r.rate, arrayminus=r.rate - r.ci_low,
                             color=color, thickness=0.8, width=2, visible=d not in single_doc),
                hovertemplate=f"{_esc(d)}, layer %{{x}}: %{{y:.1%}}<extra></extra>"), row=1, col=c)
        fig.add_trace(go.Scatter(x=x, y=rep.marginal, mode="lines", name="chance given expert frequencies",
                                 legendgroup="marg", showlegend=first,
                                 line=dict(color=_BASELINE_COLOR, dash="dot", width=2),
                                 hovertemplate="layer %{x}: marginal baseline %{y:.1%}<extra></extra>"), row=1, col=c)
        fig.add_trace(go.Scatter(x=x, y=rep.shuffled, mode="lines", name="tokens shuffled within documents",
                                 legendgroup="shuf", showlegend=first,
                                 line=dict(color="#999999", dash="dashdot", width=2),
                                 hovertemplate="layer %{x}: shuffled baseline %{y:.1%}<extra></extra>"), row=1, col=c)
        fig.add_trace(go.Scatter(x=[x[0] - 0.4, x[-1] + 0.4], y=[rep.uniform] * 2, mode="lines",
                                 name="uniform routing", legendgroup="unif", showlegend=first,
                                 line=dict(color="#BBBBBB", dash="dash", width=2),
                                 hovertemplate=f"uniform routing: {rep.uniform:.1%}<extra></extra>"), row=1, col=c)
        fig.update_xaxes(title_text="layer", dtick=1 if len(x) <= 16 else 4, row=1, col=c)
        fig.update_yaxes(tickformat=".0%", rangemode="tozero", row=1, col=c,
                         title_text="share of consecutive token pairs")
    fig.update_layout(title=figure_title(title or "Consecutive tokens routed to the same expert "
                                                  "(Mixtral Table 5 / Figure 10)",
                                         reps[0], _provenance(trace if isinstance(trace, RoutingTrace) else None,
                                                              source)),
                      height=max(430, 21 * (len(per_domain) + 5) + 130), width=460 * len(reps) + 260,
                      legend=dict(font=dict(size=11), tracegroupgap=0, y=1, yanchor="top"))
    fig.layout.meta = dict(kind="repetition_figure", kinds=list(kinds))
    return _finish(fig)


# --------------------------------------------------------------------------------------------
# Co-activation (OLMoE)

def coactivation_heatmap(trace: RoutingTrace, layer: int, *, title: str | None = None,
                         source: str | None = None) -> go.Figure:
    """C[i, j] = P(expert j also chosen | expert i chosen) at ``layer`` (OLMoE's co-activation;
    :func:`moe_lab.analysis.coactivation`). Colours diverge around the uniform value
    (k-1)/(E-1); the diagonal is blank."""
    c = A.coactivation(trace, layer)
    E, k = trace.n_experts, trace.top_k
    uniform = (k - 1) / (E - 1) if E > 1 else 0.0
    finite = c[np.isfinite(c)]
    hi = max(float(np.abs(finite - uniform).max()) if finite.size else 0.0, 1e-9)
    ticks = [_expert_tick(e) for e in range(E)]
    fig = _figure()
    fig.add_trace(go.Heatmap(
        z=c, x=list(range(E)), y=list(range(E)), zmid=uniform, zmin=max(0.0, uniform - hi), zmax=uniform + hi,
        colorscale="RdBu_r", colorbar=dict(title=dict(text="P(j | i)"), tickformat=".0%"),
        texttemplate="%{z:.0%}" if E <= 16 else None, textfont=dict(size=11), xgap=1, ygap=1,
        hovertemplate="P(expert %{x} chosen | expert %{y} chosen) = %{z:.1%}<extra></extra>"))
    fig.update_layout(
        title=figure_title(title or f"Co-activation at layer {layer}: uniform (k-1)/(E-1) = {uniform:.1%}", trace,
                           source),
        xaxis=dict(title="expert j (also chosen)", tickmode="array", tickvals=list(range(E)), ticktext=ticks,
                   showgrid=False, side="bottom"),
        yaxis=dict(title="expert i (chosen)", tickmode="array", tickvals=list(range(E)), ticktext=ticks,
                   autorange="reversed", showgrid=False, scaleanchor="x"),
        width=max(460, 46 * E + 260), height=max(420, 46 * E + 160))
    fig.layout.meta = dict(kind="coactivation_heatmap", layer=int(layer), uniform=uniform)
    return _finish(fig)


def domain_specialization_heatmap(trace: RoutingTrace, layers: Sequence[int] | int | None = None, *,
                                  title: str | None = None, source: str | None = None) -> go.Figure:
    """Domain x expert: the share of a domain's tokens whose top-k includes the expert (OLMoE's
    domain specialisation, :func:`moe_lab.analysis.domain_specialization`), one view per layer
    with a layer switch. Uniform routing gives k/E everywhere (25% for top-2 of 8); OLMoE reaches
    ~98% for some expert and domain, Mixtral stays within 27-33%."""
    layers = _layers_arg(trace, layers)
    E, k = trace.n_experts, trace.top_k
    uniform = k / E
    mats = {l: A.domain_specialization(trace, l) for l in layers}
    doms = mats[layers[0]][0]
    hi = max(max(float(np.abs(m - uniform).max()) for _, m in mats.values()), 1e-9)
    fig = _figure()
    for i, l in enumerate(layers):
        fig.add_trace(go.Heatmap(
            z=mats[l][1], x=list(range(E)), y=[d or "(no domain)" for d in doms], zmid=uniform,
            zmin=max(0.0, uniform - hi), zmax=min(1.0, uniform + hi), colorscale="RdBu_r",
            colorbar=dict(title=dict(text="share"), tickformat=".0%"), visible=i == 0, name=f"layer {l}",
            texttemplate="%{z:.0%}" if E * len(doms) <= 300 else None, textfont=dict(size=11), xgap=1, ygap=1,
            hovertemplate=f"layer {l}: %{{z:.1%}} of %{{y}} tokens have expert %{{x}} in their top-{k}<extra></extra>"))
    width = max(520, 56 * E + 260)
    titles = [_wrap(figure_title(title or f"Domain specialisation at layer {l}: uniform k/E = {uniform:.0%}",
                                 trace, source), width - 30) for l in layers]
    fig.update_layout(
        title=titles[0], margin=dict(t=90),
        xaxis=dict(title="expert", tickmode="array", tickvals=list(range(E)),
                   ticktext=[_expert_tick(e) for e in range(E)], showgrid=False),
        yaxis=dict(title="domain", autorange="reversed", showgrid=False),
        height=max(300, 30 * len(doms) + 200), width=width)
    if len(layers) > 1:
        vis = [[j == i for j in range(len(layers))] for i in range(len(layers))]
        fig.update_layout(updatemenus=[dict(_layer_menu([str(l) for l in layers], vis, titles, y=1.02),
                                            yanchor="bottom")])
    fig.layout.meta = dict(kind="domain_specialization_heatmap", layers=layers, uniform=uniform, domains=doms)
    return _finish(fig)


def expert_heatmap(values, *, rows: Sequence[str] | None = None, layers: Sequence[int] | None = None,
                   marks: Sequence[tuple] = (), mark_label: str = "marked", muted_rows: Sequence[str] = (),
                   muted_label: str = "greyed: not counted", scale: str = "per_layer", zmid: float | None = 0.0,
                   colorscale: str = "RdBu_r", colorbar_title: str = "value", row_title: str = "domain",
                   value_format: str = ".3f", show_values: bool = False, title: str | None = None,
                   source: str | None = None) -> go.Figure:
    """A row x (layer, expert) heatmap, one panel per layer: e.g. the change in each domain's loss
    when one expert is switched off (notebook 08's ablation scan). Every expert has its own tick
    (in its colour), layers are separate panels, and with ``scale="per_layer"`` (default) each
    panel has its own colour scale, symmetric around ``zmid``, with its colour bar under it, so a
    layer whose effects are 100x smaller than layer 0's still shows its pattern (read magnitudes
    from the colour bars and the hover text). ``scale="shared"`` uses one scale for all layers.

    ``values``: an array [rows, layers, experts] (then ``rows`` names its rows), or a DataFrame
    with one row per row label and (layer, expert) MultiIndex columns, as
    ``scan.pivot_table(index="domain", columns=["layer", "expert"], values="delta")`` gives.
    ``marks``: (row, layer, expert) cells circled and listed in the legend as ``mark_label``
    (e.g. "beyond the null"). ``muted_rows``: rows drawn under a white veil and labelled
    ``muted_label`` (e.g. domains with too few source documents to count). ``show_values`` writes
    each value in its cell (readable up to about 8 experts per layer with a short ``value_format``)."""
    import pandas as pd

    if isinstance(values, pd.DataFrame):
        cols = values.columns
        if not isinstance(cols, pd.MultiIndex) or cols.nlevels != 2:
            raise ValueError("expert_heatmap: a DataFrame needs (layer, expert) MultiIndex columns, got "
                             f"{type(cols).__name__} with {getattr(cols, 'nlevels', 1)} level(s)")
        lay = list(dict.fromkeys(int(l) for l in cols.get_level_values(0)))
        exp = sorted(set(int(e) for e in cols.get_level_values(1)))
        z = np.full((len(values), len(lay), len(exp)), np.nan)
        for j, (l, e) in enumerate(cols):
            z[:, lay.index(int(l)), exp.index(int(e))] = values.iloc[:, j].to_numpy(dtype=float)
        rows = [str(r) for r in values.index] if rows is None else list(rows)
        layers = lay if layers is None else list(layers)
        if exp != list(range(len(exp))):
            raise ValueError(f"expert_heatmap: experts must be 0..E-1, got {exp}")
    else:
        z = np.asarray(values, dtype=float)
        if z.ndim != 3:
            raise ValueError(f"expert_heatmap: values must be [rows, layers, experts], got shape {z.shape}")
        rows = [str(r) for r in (rows if rows is not None else range(z.shape[0]))]
        layers = list(layers) if layers is not None else list(range(z.shape[1]))
    R, L, E = z.shape
    if len(rows) != R or len(layers) != L:
        raise ValueError(f"expert_heatmap: values have {R} rows and {L} layers, but rows has {len(rows)} "
                         f"and layers {len(layers)}")
    if scale not in ("per_layer", "shared"):
        raise ValueError(f"expert_heatmap: scale must be 'per_layer' or 'shared', got {scale!r}")
    mid = 0.0 if zmid is None else float(zmid)

    def half_range(a):
        a = a[np.isfinite(a)]
        return max(float(np.abs(a - mid).max()) if a.size else 0.0, 1e-12)

    shared = half_range(z)
    gap = 0.03 if L > 1 else 0.0
    fig = make_subplots(rows=1, cols=L, shared_yaxes=True, horizontal_spacing=gap,
                        subplot_titles=[f"layer {l}" for l in layers])
    fig.update_layout(template=TEMPLATE)
    ticks = [_expert_tick(e) for e in range(E)]
    panel_w = (1 - gap * (L - 1)) / L
    show_text = show_values
    for i, l in enumerate(layers):
        hi = half_range(z[:, i]) if scale == "per_layer" else shared
        ax = f"coloraxis{i + 1 if scale == 'per_layer' else ''}"
        fig.add_trace(go.Heatmap(
            z=z[:, i], x=list(range(E)), y=rows, coloraxis=ax if scale == "per_layer" or i == 0 else "coloraxis",
            xgap=1, ygap=1, texttemplate=f"%{{z:{value_format}}}" if show_text else None, textfont=dict(size=9),
            hovertemplate=f"%{{y}}, layer {l}, expert %{{x}}: %{{z:{value_format}}}<extra></extra>"),
            row=1, col=i + 1)
        if scale == "per_layer" or i == 0:
            x0 = i * (panel_w + gap)
            fig.update_layout({ax: dict(
                colorscale=colorscale, cmid=mid, cmin=mid - hi, cmax=mid + hi,
                colorbar=dict(orientation="h", x=x0 + panel_w / 2 if scale == "per_layer" else 0.5, xanchor="center",
                              len=panel_w * 0.95 if scale == "per_layer" else 0.6, lenmode="fraction", thickness=10,
                              y=-0.2, yanchor="top", yref="paper", tickfont=dict(size=10),
                              tickmode="array", tickvals=[mid - hi, mid, mid + hi],
                              ticktext=[f"{mid - hi:.2g}", f"{mid:.2g}", f"{mid + hi:.2g}"],
                              title=dict(text=(f"layer {l}: " if scale == "per_layer" else "") + colorbar_title,
                                         side="top", font=dict(size=11))))})
    fig.update_xaxes(tickmode="array", tickvals=list(range(E)), ticktext=ticks, showgrid=False, tickangle=0,
                     title_text="expert", tickfont=dict(size=10 if E <= 8 else 8))
    fig.update_yaxes(autorange="reversed", showgrid=False)
    fig.update_yaxes(title_text=row_title, row=1, col=1)
    if marks:
        for i, l in enumerate(layers):
            pts = [(r, e) for r, ml, e in marks if int(ml) == int(l)]
            fig.add_trace(go.Scatter(
                x=[e for _, e in pts], y=[str(r) for r, _ in pts], mode="markers", name=mark_label,
                legendgroup="marks", showlegend=i == 0,
                marker=dict(symbol="circle-open", color="black", size=13, line=dict(width=2)),
                hoverinfo="skip"), row=1, col=i + 1)
        unknown = [m for m in marks if str(m[0]) not in rows or m[1] not in layers]
        if unknown:
            raise KeyError(f"expert_heatmap: marks {unknown[:3]} name a row or layer not in the figure "
                           f"(rows {rows}, layers {layers})")
    for r in muted_rows:
        if str(r) not in rows:
            raise KeyError(f"expert_heatmap: muted row {r!r} is not among {rows}")
        k = rows.index(str(r))
        for i in range(L):
            fig.add_shape(type="rect", x0=-0.5, x1=E - 0.5, y0=k - 0.5, y1=k + 0.5, row=1, col=i + 1,
                          fillcolor="rgba(255,255,255,0.75)", line=dict(width=0), layer="above")
    if muted_rows:
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", name=f"{muted_label}: {', '.join(map(str, muted_rows))}",
                                 marker=dict(symbol="square", color="#DDDDDD", size=12), legendgroup="muted"))
    left = 40 + 7 * max(len(r) for r in rows)
    width = int(min(1400, max(560, left + L * (E * 26 + 12) + 60)))
    height = int(190 + 24 * R + 90)
    fig.update_layout(
        title=figure_title(title or "Effect per domain, layer and expert", None, source),
        height=height, width=width, margin=dict(t=110, b=110, l=left, r=30),
        # the legend sits under the title, clear of the panels' titles
        legend=dict(orientation="h", x=0, xanchor="left", xref="container", y=1 - 52 / height, yanchor="top",
                    yref="container", bgcolor="rgba(255,255,255,0)"))
    fig.layout.meta = dict(kind="expert_heatmap", layers=[int(l) for l in layers], rows=rows, scale=scale,
                           n_experts=E)
    return _finish(fig)


# --------------------------------------------------------------------------------------------
# Expert paths across layers

def expert_paths_sankey(trace: RoutingTrace, layers: Sequence[int] | None = None, *, min_share: float = 0.0,
                        title: str | None = None, source: str | None = None) -> go.Figure:
    """How first choices flow from layer to layer: one node per (layer, expert) in the expert's
    colour, links between consecutive entries of ``layers`` weighted by the number of tokens
    (the counts behind :func:`moe_lab.analysis.layer_transitions`). Links carrying less than
    ``min_share`` of the tokens are dropped to declutter. Independent layers give an even
    criss-cross; thick bands mean predictable paths (compare ``analysis.cross_layer_nmi``)."""
    layers = _layers_arg(trace, layers)
    if len(layers) < 2:
        raise ValueError("expert_paths_sankey needs at least two layers")
    E, N = trace.n_experts, trace.n_tokens
    node_of = {(l, e): i * E + e for i, l in enumerate(layers) for e in range(E)}
    labels = [f"L{l} · E{e}" for l in layers for e in range(E)]
    colors = [expert_color(e) for _ in layers for e in range(E)]
    xpos = [0.001 + 0.998 * i / (len(layers) - 1) for i, _ in enumerate(layers) for _ in range(E)]
    ypos = [0.001 + 0.998 * e / max(E - 1, 1) for _ in layers for e in range(E)]
    src, dst, val, lcol = [], [], [], []
    for a, b in zip(layers[:-1], layers[1:]):
        fa = trace.expert_ids[trace.layer_index(a), :, 0]
        fb = trace.expert_ids[trace.layer_index(b), :, 0]
        counts = np.zeros((E, E), dtype=np.int64)
        np.add.at(counts, (fa, fb), 1)
        for i in range(E):
            for j in range(E):
                if counts[i, j] > 0 and counts[i, j] >= min_share * N:
                    src.append(node_of[(a, i)])
                    dst.append(node_of[(b, j)])
                    val.append(int(counts[i, j]))
                    lcol.append(_rgba(expert_color(i), 0.35))
    fig = _figure()
    fig.add_trace(go.Sankey(
        arrangement="snap",
        node=dict(label=labels, color=colors, x=xpos, y=ypos, pad=6, thickness=14,
                  line=dict(color="white", width=0.5),
                  hovertemplate="%{label}: %{value} tokens<extra></extra>"),
        link=dict(source=src, target=dst, value=val, color=lcol,
                  hovertemplate="%{source.label} → %{target.label}: %{value} tokens<extra></extra>")))
    fig.update_layout(title=figure_title(title or f"First-choice paths across layers {layers} ({N} tokens)",
                                         trace, source),
                      height=max(420, 32 * E + 160), width=max(600, 170 * len(layers) + 120),
                      font=dict(size=11))
    fig.layout.meta = dict(kind="expert_paths_sankey", layers=layers)
    return _finish(fig)


# --------------------------------------------------------------------------------------------
# Expert cache (offloading)

_POLICY_STYLE = {"optimal": ("#0077BB", "solid", "optimal (Belady, needs the future)"),
                 "lru": ("#EE7733", "dash", "LRU (least recently used)"),
                 "lfu": ("#009988", "dot", "LFU (least frequently used)")}


def cache_hit_figure(trace_or_df, *, sizes: Sequence[int] | None = None,
                     policies: Sequence[str] = ("lru", "lfu", "optimal"), title: str | None = None,
                     source: str | None = None) -> go.Figure:
    """Hit rate of a per-layer expert cache against its size (the offloading question: how many
    of the E experts must stay in fast memory?), for LRU, LFU and the optimal policy, from
    :func:`moe_lab.analysis.cache_hit_rates` (pass a trace of generated tokens, or that
    DataFrame). Lines are the mean over layers; a switch shows single layers. The grey line is
    what independent uniform routing would give (size / E): the gap above it is the reuse
    that consecutive tokens offer."""
    import pandas as pd

    if isinstance(trace_or_df, RoutingTrace):
        df = A.cache_hit_rates(trace_or_df, sizes=sizes, policies=policies)
        E = trace_or_df.n_experts
    elif isinstance(trace_or_df, pd.DataFrame):
        df = trace_or_df
        policies = [p for p in policies if p in set(df.policy)]
        E = int(df.cache_size.max())
    else:
        raise TypeError(f"cache_hit_figure takes a RoutingTrace or the DataFrame of analysis.cache_hit_rates, "
                        f"got {type(trace_or_df).__name__}")
    layers = sorted(df.layer.unique().tolist())
    views = ["mean"] + layers
    fig = _figure()
    n_per_view = len(policies)
    visible = []
    for vi, view in enumerate(views):
        sub = df if view == "mean" else df[df.layer == view]
        for p in policies:
            g = sub[sub.policy == p].groupby("cache_size").hit_rate
            mean = g.mean()
            color, dash, label = _POLICY_STYLE.get(p, ("#333333", "solid", p))
            extra = {}
            if view == "mean" and len(layers) > 1:
                lo, hi = g.min(), g.max()
                extra["error_y"] = dict(type="data", symmetric=False, array=(hi - mean).values,
                                        arrayminus=(mean - lo).values, color=color, thickness=1, width=3)
            fig.add_trace(go.Scatter(
                x=mean.index.tolist(), y=mean.values, mode="lines+markers", name=label, legendgroup=p,
                showlegend=vi == 0, visible=vi == 0, line=dict(color=color, dash=dash, width=2.5),
                hovertemplate=f"{p}, cache of %{{x}} experts: %{{y:.1%}}<extra>"
                              f"{'mean over layers' if view == 'mean' else f'layer {view}'}</extra>", **extra))
    xs = sorted(df.cache_size.unique().tolist())
    fig.add_trace(go.Scatter(x=xs, y=[s / E for s in xs], mode="lines", name="independent uniform routing (≈ size/E)",
                             line=dict(color="#AAAAAA", dash="dash", width=1.5), hoverinfo="skip"))
    n_tr = len(views) * n_per_view + 1
    for vi in range(len(views)):
        visible.append([(j // n_per_view == vi) or j == n_tr - 1 for j in range(n_tr)])
    labels = ["mean over layers (range as bars)"] + [f"layer {l}" for l in layers]
    menu = _layer_menu(labels, visible, prefix="")
    fig.update_layout(
        updatemenus=[dict(menu, type="dropdown", direction="down", y=1.02, yanchor="bottom", x=1.0, xanchor="right")],
        title=figure_title(title or "Expert-cache hit rate against cache size (tokens in decoding order)",
                           trace_or_df, source), margin=dict(t=60),
        xaxis=dict(title="experts kept in the cache (per layer)", dtick=1 if E <= 16 else None),
        yaxis=dict(title="hit rate", tickformat=".0%", range=[0, 1.02]),
        height=400, width=760)
    fig.layout.meta = dict(kind="cache_hit_figure", n_experts=E, layers=layers)
    return _finish(_legend_below(fig))


# --------------------------------------------------------------------------------------------
# Interventions: what changes when an expert is switched off or forced on

def next_token_figure(base_probs, new_probs, tokenizer=None, *, top_n: int = 10,
                      labels: tuple[str, str] = ("normal routing", "with the intervention"),
                      title: str | None = None, source: str | None = None) -> go.Figure:
    """The next-token distribution before and after an intervention: the ``top_n`` most likely
    tokens under either, as paired horizontal bars (grey = before, dark = after). The title
    gives the KL divergence KL(before || after) in nats."""
    p = np.asarray(base_probs, dtype=np.float64).ravel()
    q = np.asarray(new_probs, dtype=np.float64).ravel()
    if p.shape != q.shape:
        raise ValueError(f"the two distributions differ in size: {p.shape} and {q.shape}")
    top = list(dict.fromkeys(np.argsort(-p)[:top_n].tolist() + np.argsort(-q)[:top_n].tolist()))
    top.sort(key=lambda i: -max(p[i], q[i]))
    top = top[:top_n]
    names = tokenizer.pieces(top) if tokenizer is not None else [str(i) for i in top]
    ylab = [f"'{_esc(n)}' ({i})" for n, i in zip(names, top)]  # pieces already show a newline as \\n: no repr()
    kl = float(np.sum(np.where(p > 0, p * (np.log(np.clip(p, 1e-30, None)) - np.log(np.clip(q, 1e-30, None))), 0.0)))
    kl = max(kl, 0.0)  # KL >= 0: rounding of equal distributions must not print "-0.000"
    fig = _figure()
    fig.add_trace(go.Bar(y=ylab, x=p[top], orientation="h", name=labels[0], marker_color="#BBBBBB",
                         hovertemplate="%{y}: %{x:.2%}<extra>" + labels[0] + "</extra>"))
    fig.add_trace(go.Bar(y=ylab, x=q[top], orientation="h", name=labels[1], marker_color="#0077BB",
                         hovertemplate="%{y}: %{x:.2%}<extra>" + labels[1] + "</extra>"))
    fig.update_layout(title=figure_title(title or f"Next-token probabilities (KL = {kl:.3f} nats)", None, source),
                      barmode="group",
                      yaxis=dict(title="next token (id)", autorange="reversed", tickfont=dict(family=_MONO)),
                      xaxis=dict(title="probability", tickformat=".3~%"),
                      height=140 + 26 * len(top), width=560, legend=dict(orientation="h", y=-0.25))
    fig.layout.meta = dict(kind="next_token_figure", kl=kl, token_ids=top)
    return _finish(fig)


def routing_changes(base: RoutingTrace, new: RoutingTrace) -> tuple[list[int], np.ndarray, np.ndarray]:
    """(layers, share of tokens whose first choice changed, share whose top-k set changed)
    between two traces of the same tokens."""
    if base.n_tokens != new.n_tokens or not np.array_equal(base.token_ids, new.token_ids):
        raise ValueError("the two traces must hold the same tokens")
    if base.layers != new.layers:
        raise ValueError(f"the two traces hold different layers: {base.layers} and {new.layers}")
    first = (base.expert_ids[:, :, 0] != new.expert_ids[:, :, 0]).mean(1)
    sets = (np.sort(base.expert_ids, -1) != np.sort(new.expert_ids, -1)).any(-1).mean(1)
    return list(base.layers), first, sets


def routing_change_figure(base: RoutingTrace, new: RoutingTrace, *, marker_layer: int | None = None,
                          title: str | None = None, source: str | None = None) -> go.Figure:
    """Per layer, the share of tokens routed differently after an intervention: first choice
    changed, and top-k set changed. Layers before the intervened one cannot change (the model
    is causal across layers); ``marker_layer`` marks the intervened layer."""
    layers, first, sets = routing_changes(base, new)
    fig = _figure()
    fig.add_trace(go.Bar(x=layers, y=sets, name="top-k set changed", marker_color="#0077BB",
                         hovertemplate="layer %{x}: %{y:.0%} of tokens<extra>top-k set changed</extra>"))
    fig.add_trace(go.Bar(x=layers, y=first, name="first choice changed", marker_color="#EE7733",
                         hovertemplate="layer %{x}: %{y:.0%} of tokens<extra>first choice changed</extra>"))
    if marker_layer is not None:  # a band behind the intervened layer's bars, not a line through them
        fig.add_vrect(x0=marker_layer - 0.5, x1=marker_layer + 0.5, fillcolor="#DDDDDD", opacity=0.5, line_width=0,
                      layer="below", annotation_text="intervened layer", annotation_position="top")
    fig.update_layout(title=figure_title(title or "Tokens routed differently after the intervention", base, source),
                      barmode="group",
                      xaxis=dict(title="layer", tickmode="array", tickvals=layers),
                      yaxis=dict(title="share of tokens", tickformat=".0%", range=[0, 1.05]),
                      height=340, width=560, legend=dict(orientation="h", y=-0.3))
    fig.layout.meta = dict(kind="routing_change_figure", layers=layers)
    return _finish(fig)


# --------------------------------------------------------------------------------------------
# Causal experiments (moe_lab.causal): ablation scan, redundancy curves, dose-response

_GREY_ROW = "rgba(160,160,160,0.55)"


def ablation_scan_figure(scan, *, title: str | None = None, source: str | None = None) -> go.Figure:
    """The table of :func:`moe_lab.causal.ablation_scan` drawn by :func:`expert_heatmap`: rows are
    domains, one panel per layer with its own colour scale symmetric around 0 (so a layer whose
    effects are 100x smaller than layer 0's still shows them) and a tick in every expert's colour,
    a circle on the cells whose expert is beyond the null (``beyond_null``), and the domains that
    are not ``counted`` (too few source documents) greyed and named in the legend."""
    table = scan.pivot_table(index="domain", columns=["layer", "expert"], values="delta", sort=False)
    table = table.reindex(index=list(dict.fromkeys(scan.domain)))
    muted = []
    if "counted" in scan:
        counted = scan.groupby("domain", sort=False).counted.first()
        muted = [d for d in table.index if not counted[d]]
    marks = ([(d, int(l), int(e)) for d, l, e in scan.loc[scan.beyond_null, ["domain", "layer", "expert"]]
              .itertuples(index=False)] if "beyond_null" in scan else [])
    fig = expert_heatmap(table, marks=marks, muted_rows=muted,
                         mark_label="beyond the null (largest effect of its layer, interval > 0)"
                         if marks else "beyond the null: none",
                         muted_label="greyed, not counted (fewer than 3 source documents)",
                         colorbar_title="Δ loss (nats)",
                         title=title or "Change in loss when one expert is switched off, per domain", source=source)
    if not marks:  # no circle: say so in the legend
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", name="beyond the null: none", showlegend=True,
                                 marker=dict(symbol="circle-open", color="black", size=13)), row=1, col=1)
    fig.layout.meta = dict(fig.layout.meta, kind="ablation_scan_figure")
    return fig


def _ci_scatter(x, y, lo, hi, name, color, dash="solid", **kw):
    y, lo, hi = (np.asarray(v, dtype=float) for v in (y, lo, hi))
    return go.Scatter(x=list(x), y=y, mode="lines+markers", name=name, line=dict(color=color, dash=dash, width=2.5),
                      error_y=dict(type="data", symmetric=False, array=hi - y, arrayminus=y - lo, color=color,
                                   thickness=1.5, width=4),
                      hovertemplate=f"%{{x}}: %{{y:.3f}}<extra>{name}</extra>", **kw)


def redundancy_figure(per_token, busiest, *, title: str | None = None) -> go.Figure:
    """DeepSeekMoE's per-token test next to the global "disable the busiest experts".

    ``per_token``: :func:`moe_lab.causal.mask_top_experts`; ``busiest``:
    :func:`moe_lab.causal.disable_top_experts`, each for *one* domain (pass a single pooled
    domain). Left: Δ loss against r, with intervals, for the four curves (each token's own top r
    experts masked / r random per token; the r busiest experts of every layer disabled / r
    random ones). Right: the global version per unit of displaced load (nats per share of the
    token-slots rerouted), where busy and random experts can be compared fairly."""
    for name, df in (("per_token", per_token), ("busiest", busiest)):
        if df.domain.nunique() != 1:
            raise ValueError(f"redundancy_figure: {name} must hold one domain (pool the texts), got "
                             f"{sorted(df.domain.unique())}")
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.16,
                        subplot_titles=["Δ loss with r experts removed", "busiest vs random, per unit of load"])
    fig.update_layout(template=TEMPLATE)
    styles = [(per_token, "top", "each token's own top r masked (DeepSeekMoE, per token)", "#CC3311", "solid"),
              (per_token, "random", "r random experts masked per token", "#EE7733", "dot"),
              (busiest, "top", "r busiest experts of every layer disabled (global)", "#0077BB", "solid"),
              (busiest, "random", "r random experts of every layer disabled", "#33BBEE", "dot")]
    for df, kind, name, color, dash in styles:
        g = df[df.kind == kind].sort_values("r")
        if len(g):
            fig.add_trace(_ci_scatter(g.r, g.delta, g.delta_low, g.delta_high, name, color, dash), row=1, col=1)
    for kind, name, color, dash in (("top", "busiest (global)", "#0077BB", "solid"),
                                    ("random", "random (global)", "#33BBEE", "dot")):
        g = busiest[(busiest.kind == kind) & (busiest.r > 0)].sort_values("r")
        fig.add_trace(_ci_scatter(g.r, g.delta_per_displaced, g.dpd_low, g.dpd_high, name, color, dash,
                                  showlegend=False), row=1, col=2)
    fig.add_hline(y=0, line=dict(color=_BASELINE_COLOR, dash="dash", width=1))
    fig.update_xaxes(title_text="r (experts removed)", title_font=dict(size=12), dtick=1)
    fig.update_yaxes(title_text="Δ loss (nats)", row=1, col=1)
    fig.update_yaxes(title_text="Δ loss per share of slots displaced", row=1, col=2)
    fig.update_layout(title=title or "How redundant are the experts?", height=500, width=980,
                      margin=dict(t=80, b=170), legend=dict(orientation="h", y=-0.25, x=0, yanchor="top"))
    fig.layout.meta = dict(kind="redundancy_figure")
    return fig


def dose_response_figure(losses, behaviour=None, *, x: str = "dose", x_title: str = "steering offset",
                         behaviour_title: str = "share of continuations", baseline: float | None = None,
                         title: str | None = None) -> go.Figure:
    """A dose-response: left, Δ loss per domain against the dose with bootstrap intervals (the
    table of :func:`moe_lab.causal.dose_response`); right (``behaviour``, optional), a
    behavioural share against the dose: a DataFrame with columns ``x``, ``share``, ``ci_low``,
    ``ci_high`` (and optionally ``label`` for several series), with ``baseline`` (e.g. the
    classifier's rate on clean text) as a dashed line. No verdict: the whole curve is the result."""
    cols = 2 if behaviour is not None else 1
    fig = make_subplots(rows=1, cols=cols, horizontal_spacing=0.14,
                        subplot_titles=["Δ loss per domain (vs the plain model)"]
                        + ([behaviour_title] if behaviour is not None else []))
    fig.update_layout(template=TEMPLATE)
    for i, (d, g) in enumerate(losses.groupby("domain", sort=False)):
        g = g.sort_values(x)
        fig.add_trace(_ci_scatter(g[x], g.delta, g.delta_low, g.delta_high, f"Δ loss on {d}",
                                  SERIES_COLORS[i % len(SERIES_COLORS)]), row=1, col=1)
    fig.add_hline(y=0, line=dict(color=_BASELINE_COLOR, dash="dash", width=1), row=1, col=1)
    if behaviour is not None:
        groups = behaviour.groupby("label", sort=False) if "label" in behaviour else [("share", behaviour)]
        for i, (label, g) in enumerate(groups):
            g = g.sort_values(x)
            fig.add_trace(_ci_scatter(g[x], g.share, g.ci_low, g.ci_high, str(label),
                                      SERIES_COLORS[(i + 3) % len(SERIES_COLORS)]), row=1, col=2)
        if baseline is not None:
            fig.add_hline(y=baseline, line=dict(color=_BASELINE_COLOR, dash="dash", width=1), row=1, col=2,
                          annotation_text="on clean text", annotation_position="top left")
        fig.update_yaxes(title_text="share", tickformat=".0%", rangemode="tozero", row=1, col=2)
    fig.update_xaxes(title_text=x_title, title_font=dict(size=12))
    fig.update_yaxes(title_text="Δ loss (nats)", row=1, col=1)
    fig.update_layout(title=title or "Dose-response", height=470, width=980 if cols == 2 else 600,
                      margin=dict(t=80, b=140), legend=dict(orientation="h", y=-0.3, x=0, yanchor="top"))
    fig.layout.meta = dict(kind="dose_response_figure")
    return fig


# --------------------------------------------------------------------------------------------
# The offloading what-if (numbers from moe_lab.analysis.offload)

_OFFLOAD_STYLE = {"optimal": ("#0077BB", "solid", "Belady (optimal, knows the future)"),
                  "lru": ("#EE7733", "dash", "LRU cache"), "lfu": ("#009988", "dot", "LFU cache"),
                  "frequency": ("#CC3311", "solid", "pin most frequent (ktransformers 'frequency')"),
                  "uniform": ("#33BBEE", "dashdot", "pin experts 0..c-1 ('uniform')"),
                  "front_loading": ("#332288", "longdash", "whole layers first ('front-loading', llama.cpp -ngl)")}

#: labelled ticks for log axes of tokens/s (0.1, 0.2, 0.5, 1, 2, 5, ...)
_LOG_TICKS = [m * 10 ** e for e in range(-2, 4) for m in (1, 2, 5)]


def stamp(fig: go.Figure, source) -> go.Figure:
    """Put where the numbers come from into ``fig``'s title: ``"SYNTHETIC FIXTURE: ..."`` or
    ``"DEMO MODEL: ..."`` for a stand-in (see :func:`moe_lab.analysis.provenance`), the real
    source in parentheses otherwise. ``source``: a label, or a trace, model, Prefetch or
    DataFrame that carries one. Works on any figure; returns it (also ``layout.meta["source"]``)."""
    label = A.provenance(source)
    title = fig.layout.title.text or ""
    if label and label.upper() not in title and label not in title:
        fig.update_layout(title_text=A.headline(label, title))
    meta = dict(fig.layout.meta) if isinstance(fig.layout.meta, dict) else {}
    meta["source"] = label
    fig.layout.meta = meta
    return fig


def offload_policy_figure(df, *, n_experts: int | None = None, title: str | None = None, source=None) -> go.Figure:
    """Whole-model hit rate against the per-layer budget for each cache policy and placement, from
    :func:`moe_lab.analysis.policy_comparison`; the grey line is budget / E (random routing).
    The title says where the trace comes from (``source``, default ``df.attrs["source"]``)."""
    fig = _figure()
    for policy, g in df.groupby("policy", sort=False):
        g = g.sort_values("budget")
        color, dash, label = _OFFLOAD_STYLE.get(policy, ("#333333", "solid", policy))
        fig.add_trace(go.Scatter(x=g.budget.tolist(), y=g.hit_rate.tolist(), mode="lines+markers", name=label,
                                 line=dict(color=color, dash=dash, width=2.2),
                                 customdata=g.misses_per_token.tolist(),
                                 hovertemplate=f"{policy}, %{{x}} experts per layer: hit %{{y:.1%}}, "
                                               "%{customdata:.1f} misses per token<extra></extra>"))
    E = n_experts or int(df.budget.max())
    xs = sorted(df.budget.unique().tolist())
    fig.add_trace(go.Scatter(x=xs, y=[b / E for b in xs], mode="lines", name="random routing (budget / E)",
                             line=dict(color="#AAAAAA", dash="dash", width=1.5), hoverinfo="skip"))
    fig.update_layout(title=title or "Which experts stay resident? Hit rate by policy and budget",
                      xaxis=dict(title="experts resident per layer (budget)", dtick=1 if E <= 16 else None),
                      yaxis=dict(title="hit rate (share of expert reads resident)", tickformat=".0%",
                                 range=[0, 1.02]), height=520, width=800,
                      legend=dict(orientation="h", x=0, y=-0.18, yanchor="top", font=dict(size=11)),
                      margin=dict(b=150))
    fig.layout.meta = dict(kind="offload_policy_figure", policies=list(dict.fromkeys(df.policy)))
    return stamp(fig, source if source is not None else df)


def prefetch_figure(df, *, cache_size: int | None = None, title: str | None = None, source=None) -> go.Figure:
    """Speculative prefetch per layer, from :func:`moe_lab.analysis.prefetch_hit_rates`: the recall
    of the guesses (bars) and the cache's hit rate without and with them (markers). The title
    says which model (``source``, default ``df.attrs["source"]``)."""
    size = cache_size if cache_size is not None else int(sorted(df.cache_size.unique())[0])
    d = df[df.cache_size == size].groupby("layer", as_index=False).first()
    fig = _figure()
    labels = [f"layer {l}" for l in d.layer]
    fig.add_trace(go.Bar(x=labels, y=d.recall.tolist(), name="recall of the guess", marker_color="#BBBBBB",
                         hovertemplate="%{x}: %{y:.1%} of the chosen experts were guessed<extra></extra>"))
    fig.add_trace(go.Scatter(x=labels, y=d.hit_rate.tolist(), mode="markers+lines", name=f"hit rate, {d.policy.iloc[0]} only",
                             line=dict(color="#EE7733", dash="dash"), marker=dict(size=9)))
    fig.add_trace(go.Scatter(x=labels, y=d.hit_rate_prefetch.tolist(), mode="markers+lines",
                             name="hit rate with prefetch", line=dict(color="#0077BB"), marker=dict(size=9, symbol="diamond")))
    fig.update_layout(title=title or f"Speculative prefetch: guess layer l+1 from layer l ({size} experts cached per layer)",
                      yaxis=dict(title="recall / hit rate", tickformat=".0%",
                                 range=[0, 1.05]),
                      xaxis=dict(title="layer being guessed"), height=440, width=800, legend=dict(orientation="h", y=-0.25))
    fig.layout.meta = dict(kind="prefetch_figure", cache_size=size)
    return stamp(fig, source if source is not None else df)


def tokens_per_second_figure(table, *, scenario: str | None = None, title: str | None = None, source=None) -> go.Figure:
    """Estimated decode tokens/s by system (x: a device and its link) and expert precision (bars),
    log scale, from :func:`moe_lab.analysis.offload_table` (one scenario: the first unless named).
    Configurations that do not fit the device's memory (``fits`` False) are never drawn; the
    figure says which were left out. The title says where the hit rate comes from (``source``,
    default ``table.attrs["source"]``)."""
    scenario = scenario if scenario is not None else table.scenario.iloc[0]
    d = table[table.scenario == scenario]
    if d.empty:
        raise ValueError(f"scenario {scenario!r} is not in the table; it has {sorted(set(table.scenario))}")
    fits = d["fits"] if "fits" in d else None
    unknown = fits is None or fits.isna().all()
    drop = d[fits == False] if not unknown else d.iloc[:0]  # noqa: E712  (a column of True / False / None)
    d = d if unknown else d[fits == True]  # noqa: E712
    system_col = "system" if "system" in d else "link"
    fig = _figure()
    order = list(dict.fromkeys(table[system_col]))
    precisions = list(dict.fromkeys(table.precision))  # one colour per precision, drawn or not
    for i, prec in enumerate(precisions):
        g = d[d.precision == prec]
        if g.empty:
            continue
        fig.add_trace(go.Bar(x=g[system_col].tolist(), y=g.tokens_per_s.tolist(), name=prec,
                             marker_color=SERIES_COLORS[i % len(SERIES_COLORS)],
                             customdata=np.stack([g.GB_moved_per_token, g.demand_s, g.resident_s], -1).tolist(),
                             hovertemplate=f"{prec}, %{{x}}: %{{y:.2f}} tok/s<br>%{{customdata[0]:.2f}} GB moved per token"
                                           "<br>link %{customdata[1]:.3f} s + resident %{customdata[2]:.3f} s<extra></extra>"))
    h = table[table.scenario == scenario].hit_rate.iloc[0]
    lo, hi = float(d.tokens_per_s.min()) if len(d) else 1.0, float(d.tokens_per_s.max()) if len(d) else 10.0
    ticks = [t for t in _LOG_TICKS if lo / 2.5 <= t <= hi * 2.5]
    if unknown:
        note = "memory fit not checked (offload_table(..., resident_experts=...))"
    elif len(drop):
        per_system = {}
        for s_, p_ in zip(drop[system_col], drop.precision):
            per_system.setdefault(s_, []).append(p_)
        parts = [f"{', '.join(ps)} on {s_}" for s_, ps in per_system.items()]
        note = "not drawn, do not fit in memory: " + "".join(
            (";<br>" if j and j % 2 == 0 else "; " if j else "") + part for j, part in enumerate(parts))
    else:
        note = "every configuration fits its device's memory"
    fig.update_layout(barmode="group", title=title or f"Estimated decode speed, batch 1 ({scenario}: hit rate {h:.0%})",
                      yaxis=dict(title="tokens/s (estimate)", type="log", tickvals=ticks,
                                 ticktext=[f"{t:g}" for t in ticks]),
                      xaxis=dict(title="system: device + where the misses come from", categoryorder="array",
                                 categoryarray=order, tickangle=-20),
                      legend=dict(title="experts at"), height=600, width=900, margin=dict(b=230))
    fig.add_annotation(text=note, xref="paper", yref="paper", x=0, y=-0.42, showarrow=False, align="left",
                       font=dict(size=10, color="#555555"), xanchor="left", yanchor="top")
    fig.layout.meta = dict(kind="tokens_per_second_figure", scenario=scenario, not_drawn=len(drop), fit_checked=not unknown)
    return stamp(fig, source if source is not None else table)


def calibration_figure(cal, *, title: str | None = None) -> go.Figure:
    """Estimated against published tokens/s (log-log) from :func:`moe_lab.analysis.mixtral_calibration`;
    on the diagonal the estimate is exact, the band is a factor of 2 either way. Filled markers:
    rows without a free parameter; open markers: rows that assume something their source does
    not state (a hit rate, the CPU). Points are numbered; the legend names them."""
    fig = _figure()
    lo = 0.5 * min(cal.published_tok_s.min(), cal.predicted_tok_s.min())
    hi = 2 * max(cal.published_tok_s.max(), cal.predicted_tok_s.max())
    fig.add_trace(go.Scatter(x=[lo, hi, hi, lo], y=[lo / 2, hi / 2, hi * 2, lo * 2], fill="toself", mode="none",
                             fillcolor="rgba(170,170,170,0.2)", name="within 2x", hoverinfo="skip"))
    fig.add_trace(go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", line=dict(color="#555555", dash="dash"),
                             name="estimate = measurement", hoverinfo="skip"))
    free = cal["free_parameter"] if "free_parameter" in cal else [False] * len(cal)
    config = cal["configuration"] if "configuration" in cal else [""] * len(cal)
    for i, (r, f, c) in enumerate(zip(cal.itertuples(), free, config)):
        color = SERIES_COLORS[i % len(SERIES_COLORS)]
        fig.add_trace(go.Scatter(
            x=[r.published_tok_s], y=[r.predicted_tok_s], mode="markers+text", text=[str(i + 1)],
            textposition="middle right", textfont=dict(size=12, color=color),
            marker=dict(size=13, color=color, line=dict(color=color, width=2.5),
                        symbol="circle-open" if f else "circle"),
            name=f"{i + 1}. {r.system}, {c or r.hardware}" + (" (free parameter)" if f else " (no free parameter)"),
            hovertemplate=f"{r.system}, {r.hardware}, {r.precision}<br>published %{{x:.2f}} tok/s, "
                          "estimated %{y:.2f}<extra></extra>"))
    ticks = [t for t in _LOG_TICKS if lo <= t <= hi]
    axis = dict(type="log", tickvals=ticks, ticktext=[f"{t:g}" for t in ticks])
    fig.update_layout(title=title or "Offloading estimate vs published Mixtral 8x7B decode speeds",
                      xaxis=dict(title="published tokens/s (measured)", **axis),
                      yaxis=dict(title="estimated tokens/s (this model)", **axis),
                      height=560, width=900, legend=dict(font=dict(size=10), orientation="h", y=-0.2, yanchor="top"),
                      margin=dict(b=170))
    fig.layout.meta = dict(kind="calibration_figure")
    return fig


# --------------------------------------------------------------------------------------------
# Language or content? (aligned paragraphs; moe_lab.analysis.language)

_EFFECT_AXIS_MAX = 2.0  # effects on the 0 (neither) to 1 (noise ceiling) scale: the axis stops at 2

_EFFECT_SERIES = (("content", "same paragraph, other language (content)", "#0077BB"),
                  ("language", "other paragraph, same language (language)", "#EE7733"))


def language_content_figure(result: "A.LanguageContent", *, layers: Sequence[int] | None = None,
                            masked: "A.LanguageContent | None" = None, title: str | None = None) -> go.Figure:
    """Per layer, how much more alike the routing of two documents is when they share the content
    (the same paragraph translated) or the language, on the scale from "neither" (0: two
    unrelated documents) to the split-half noise ceiling (1: the same document re-sampled), with
    bootstrap 95% intervals over paragraphs (``result.content_effect``, ``result.language_effect``).
    ``masked``: the same study with the tokens shared across translations left out (the
    token-overlap control), drawn dashed. The raw similarities are in the result; plotting them
    would put every series in a band about 0.01 wide near 0.95. Where the band between "neither"
    and the ceiling is nearly empty, the ratio's interval can reach far: the axis stops at 2 and
    a label gives the end of any interval beyond it."""
    if result.content_effect is None:
        raise ValueError("result has no normalised effects: compute it with analysis.language_vs_content")
    x = np.asarray(list(layers) if layers is not None else list(range(len(result.content_effect))), float)
    fig = _figure()
    runs = [(result, "solid", "", 0.0)]
    if masked is not None:
        if masked.content_effect is None or len(masked.content_effect) != len(x):
            raise ValueError(f"masked must be a language_vs_content result over the same {len(x)} layers")
        runs.append((masked, "dash", ", shared tokens masked", 0.12))
    lows, highs, beyond = [0.0], [1.0], []
    for res, dash, suffix, shift in runs:
        for kind, label, color in _EFFECT_SERIES:
            y, ci = getattr(res, f"{kind}_effect"), getattr(res, f"ci_{kind}_effect")
            xs = x + (shift if kind == "language" else -shift) / 2 if shift else x
            lows.append(np.nanmin(ci[:, 0]))
            highs.append(np.nanmax(ci[:, 1]))
            beyond += [(xi, hi_, color) for xi, hi_ in zip(xs, ci[:, 1]) if hi_ > _EFFECT_AXIS_MAX]
            fig.add_trace(go.Scatter(
                x=xs, y=y, mode="lines+markers",
                name=label + suffix, line=dict(color=color, width=2.5 if dash == "solid" else 2, dash=dash),
                marker=dict(symbol="circle" if dash == "solid" else "diamond-open", size=8),
                error_y=dict(type="data", symmetric=False, array=ci[:, 1] - y, arrayminus=y - ci[:, 0],
                             color=color, thickness=1.5),
                customdata=np.c_[ci.round(3), np.full(len(x), res.n_paragraphs)],
                hovertemplate="layer %{x:.0f}: %{y:.2f} (95% CI %{customdata[0]:.2f} to %{customdata[1]:.2f}; "
                              f"%{{customdata[2]}} paragraphs)<extra>{label + suffix}</extra>"))
    for level, text, where in ((0, "neither (0)", "bottom right"), (1, "noise ceiling (1)", "top right")):
        fig.add_hline(y=level, line=dict(color=_BASELINE_COLOR, dash="dot", width=1.2),
                      annotation=dict(text=text, font=dict(size=11, color=_BASELINE_COLOR)),
                      annotation_position=where)
    # a ratio whose band (ceiling - neither) is nearly empty has intervals that reach far: the axis
    # stops at _EFFECT_AXIS_MAX and a label gives the end of each interval that goes beyond it
    lo, hi = max(min(lows), -_EFFECT_AXIS_MAX / 2), min(max(highs), _EFFECT_AXIS_MAX)
    pad = 0.06 * (hi - lo)
    stacked: dict[int, int] = {}
    for xi, end, color in beyond:  # labels of one layer stacked, so that they never overlap
        k = stacked[round(xi)] = stacked.get(round(xi), -1) + 1
        fig.add_annotation(x=xi, y=hi + pad, text=f"to {end:.1f}", showarrow=False, yanchor="top", xanchor="left",
                           xshift=6, yshift=-15 * k, font=dict(size=10, color=color), bgcolor="rgba(255,255,255,0.8)")
    fig.update_layout(
        title=title or ("Does routing follow the language or the content?<br><sup>"
                        f"{result.n_paragraphs} paragraphs x {len(result.languages)} languages; "
                        "95% intervals over paragraphs</sup>"),
        xaxis=dict(title="layer", tickmode="array", tickvals=x.tolist(), ticktext=[f"{v:g}" for v in x],
                   range=[x.min() - 0.3, x.max() + 0.3]),
        yaxis=dict(title="effect (0 = neither, 1 = noise ceiling)", range=[lo - pad, hi + pad]),
        height=500, width=760, margin=dict(l=70, r=30, t=80, b=150),
        legend=dict(orientation="h", x=0, xanchor="left", y=-0.18, yanchor="top", font=dict(size=12)))
    fig.layout.meta = dict(kind="language_content_figure", measure=result.measure, layers=x.tolist(),
                           masked=masked is not None)
    return fig


def hidden_control_figure(control: "A.HiddenControl", raw: "A.LanguageContent | None" = None, *,
                          layers: Sequence[int] | None = None, title: str | None = None) -> go.Figure:
    """Left: per layer, the share of the variance of routing similarity (over all pairs of
    documents) that the cosine similarity of their mean router inputs explains (R^2). Right: the
    content-minus-language difference of routing similarity with its 95% interval, on the raw
    similarities (``raw``, if given) and on the residuals of that fit. The residual curve is a
    demonstration of adjusting for a *mediator* (language lives in the hidden states, so the
    adjustment removes more from same-language pairs by construction), not a control; see
    :func:`moe_lab.analysis.hidden_state_control`."""
    x = list(layers) if layers is not None else list(range(len(control.r2)))
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.14,
                        subplot_titles=["explained by hidden-state similarity (R²)",
                                        "same content minus same language"])
    fig.update_layout(template=TEMPLATE)
    fig.add_trace(go.Bar(x=x, y=control.r2, name="R²", marker_color="#0077BB", showlegend=False,
                         hovertemplate="layer %{x}: R² = %{y:.2f}<extra></extra>"), row=1, col=1)
    series = [("residuals after adjusting for the mediator (biased)", control.residual, "#0077BB")]
    if raw is not None:
        series.insert(0, ("raw routing similarity", raw, "#222222"))
    for label, res, color in series:
        y, ci = res.content_minus_language, res.ci_content_minus_language
        fig.add_trace(go.Scatter(
            x=x, y=y, mode="lines+markers", name=label, line=dict(color=color, width=2.5),
            error_y=dict(type="data", symmetric=False, array=ci[:, 1] - y, arrayminus=y - ci[:, 0], color=color),
            hovertemplate=f"layer %{{x}}: %{{y:.3f}}<extra>{label}</extra>"), row=1, col=2)
    fig.add_hline(y=0, line=dict(color=_BASELINE_COLOR, dash="dash", width=1), row=1, col=2)
    fig.update_xaxes(title_text="layer", tickmode="array", tickvals=x)
    fig.update_yaxes(range=[0, 1], row=1, col=1)
    fig.update_yaxes(title_text="R² over pairs of documents", row=1, col=1)
    fig.update_yaxes(title_text="content minus language", row=1, col=2)
    fig.update_layout(title=title or "Adjusting for a mediator: how much of routing similarity is linear in "
                                     "mean-input similarity",
                      height=420, width=900, legend=dict(orientation="h", y=-0.25))
    fig.layout.meta = dict(kind="hidden_control_figure", layers=x)
    return fig
