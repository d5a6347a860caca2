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
    viz.language_content_figure(result)       # routing: same content vs same language (aligned paragraphs)
    viz.hidden_control_figure(control, raw)   # how much of it hidden-state similarity explains

Colours: one colour per expert, the same in every figure (:data:`EXPERT_COLORS`,
:func:`expert_color`): the Okabe-Ito palette for experts 0-7, which stays distinguishable
under the common forms of colour blindness, then Paul Tol's "muted" palette for experts 8-17;
beyond 18 experts no palette stays distinguishable, and colours are spread around the hue
circle (read the expert number from the hover text). Series that are *not* experts (domains,
cache policies, baselines) use :data:`SERIES_COLORS` or greys, never the expert colours'
meaning.

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
from .notebook_utils import DEFAULT_RENDERER, setup_plotly
from .routing.trace import RoutingTrace

__all__ = [
    "EXPERT_COLORS", "SERIES_COLORS", "TEMPLATE", "expert_color", "expert_colors", "setup_notebook",
    "token_figure", "load_heatmap", "domain_load_bars", "repetition_figure", "coactivation_heatmap",
    "expert_paths_sankey", "cache_hit_figure", "layer_switch_states", "next_token_figure",
    "routing_changes", "routing_change_figure", "domain_specialization_heatmap",
    "offload_policy_figure", "prefetch_figure", "tokens_per_second_figure", "calibration_figure",
    "language_content_figure", "hidden_control_figure",
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

#: Colours for series that are not experts (domains, cache policies): Paul Tol's "vibrant".
SERIES_COLORS: tuple[str, ...] = ("#0077BB", "#EE7733", "#009988", "#CC3311", "#33BBEE", "#EE3377", "#BBBBBB")

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


# --------------------------------------------------------------------------------------------
# Template and notebook set-up

def _register_template() -> None:
    # Layout defaults only (no per-trace-type defaults), so the template embedded in each saved
    # figure is ~1 kB rather than the ~10 kB of "plotly_white".
    pio.templates[TEMPLATE] = go.layout.Template(layout=dict(
        font=dict(family=_FONT, size=13, color="#222222"),
        paper_bgcolor="white", plot_bgcolor="white", colorway=list(SERIES_COLORS),
        xaxis=dict(gridcolor=_GRID, zerolinecolor=_GRID, linecolor="#BBBBBB", ticks="outside", automargin=True),
        yaxis=dict(gridcolor=_GRID, zerolinecolor=_GRID, linecolor="#BBBBBB", ticks="outside", automargin=True),
        hoverlabel=dict(font=dict(family=_FONT, size=12), align="left"),
        legend=dict(bgcolor="rgba(255,255,255,0.8)"),
        margin=dict(l=60, r=30, t=60, b=50),
        title=dict(x=0.0, xanchor="left", font=dict(size=15)),
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
                 title: str | None = None) -> go.Figure:
    """The tokens of document ``doc``, each on a box coloured by its first-choice expert (the
    Mixtral paper's Figure 8), one view per layer with a layer switch built into the figure.

    Hover shows the token, its id and position, the top-k experts with their weights and, when
    the trace holds router logits, the entropy of the router's softmax over all experts.
    Tokens are laid out like text in a monospace font, ``line_chars`` characters per line;
    ``max_tokens`` cuts long documents (None: all). ``tokenizer`` gives display pieces when the
    trace has none. Trace ``i`` of the figure is layer ``layers[i]``; the last E traces only
    hold the legend (one entry per expert).
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
    titles = [f"{base_title}: layer {l}{_ids_note(trace)}" for l in layers]
    n_tr = len(layers) + trace.n_experts
    visible = [[j == i or j >= len(layers) for j in range(n_tr)] for i in range(len(layers))]
    char_px = 7.4
    n_legend_rows = math.ceil((sum(1 for d in fig.data[len(layers):] if d.showlegend) + 3) / max(1, int(line_chars / 7)))
    top = 88 if len(layers) > 1 else 44
    bottom = 14 + 22 * n_legend_rows
    fig.update_layout(
        title=dict(text=titles[0], y=1, yref="container", yanchor="top", pad=dict(t=10)),
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
                 *, title: str | None = None) -> go.Figure:
    """Layer x expert load: share of assignments (rows sum to 1, uniform 1/E; the Mixtral
    paper's convention) or, with ``normalization="tokens"``, share of tokens choosing the expert
    (uniform k/E; OLMoE's). Colours diverge around the uniform value: red = over-loaded,
    blue = under-loaded. ``z`` is :func:`moe_lab.analysis.expert_load`."""
    load = A.expert_load(trace, choice, normalization)
    uniform = A.uniform_load(trace, choice, normalization)
    E, L = trace.n_experts, trace.n_layers
    bal = A.load_balance(load)
    ylabels = [f"layer {l}" for l in trace.layers]
    hi = max(float(np.nanmax(np.abs(load - uniform))), 1e-9)
    fig = _figure()
    fig.add_trace(go.Heatmap(
        z=load, x=list(range(E)), y=ylabels, zmid=uniform, zmin=uniform - hi, zmax=uniform + hi,
        colorscale="RdBu_r", colorbar=dict(title=dict(text="share"), tickformat=".0%"),
        customdata=np.repeat(bal.cv[:, None], E, axis=1).round(3),
        texttemplate="%{z:.0%}" if L * E <= 400 else None, textfont=dict(size=11),
        hovertemplate="%{y}, expert %{x}: %{z:.1%}<br>CV of the layer %{customdata:.2f}<extra></extra>",
        xgap=1, ygap=1))
    what = {"first": "first choices", "second": "second choices", "either": "assignments (top-k)"}[choice]
    unit = "share of " + (what if normalization == "assignments" else "tokens choosing it")
    fig.update_layout(
        title=(title or f"Expert load per layer: {unit}; uniform = {uniform:.1%}") + _ids_note(trace),
        xaxis=dict(title="expert", tickmode="array", tickvals=list(range(E)),
                   ticktext=[_expert_tick(e) for e in range(E)], showgrid=False),
        yaxis=dict(autorange="reversed", showgrid=False),
        height=max(260, 40 + 28 * L + 120), width=max(480, 60 * E + 260))
    fig.layout.meta = dict(kind="load_heatmap", uniform=uniform, choice=choice, normalization=normalization)
    return fig


_PATTERNS = ("", "/", ".", "x", "\\", "+", "-", "|")


def domain_load_bars(trace: RoutingTrace, layer: int | Sequence[int] | None = None, choice: A.Choice = "either",
                     *, domains: Sequence[str] | None = None, title: str | None = None) -> go.Figure:
    """Share of each domain's top-k assignments that go to each expert (the Mixtral paper's
    Figure 7), with the uniform share 1/E as a dashed line. Bars keep the expert colours; the
    domain is told by the bar's pattern (see the legend). One panel per layer in ``layer``
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
    fig = make_subplots(rows=len(layers), cols=1, shared_xaxes=True, vertical_spacing=0.08,
                        subplot_titles=[f"layer {l}" for l in layers])
    fig.update_layout(template=TEMPLATE)
    colors = expert_colors(E)
    for r, l in enumerate(layers, start=1):
        row = trace.layer_index(l)
        for i, d in enumerate(doms):
            label = d or "(no domain)"
            fig.add_trace(go.Bar(
                x=list(range(E)), y=by_domain[d][row], name=label, legendgroup=label, showlegend=False,
                marker=dict(color=colors, line=dict(color="#333333", width=0.5),
                            pattern=dict(shape=_PATTERNS[i % len(_PATTERNS)], fgcolor="#333333", size=6, solidity=0.25)),
                customdata=np.full(E, n_tok[d]),
                hovertemplate=f"{_esc(label)}, layer {l}<br>expert %{{x}}: %{{y:.1%}} of assignments"
                              "<br>%{customdata} tokens<extra></extra>"), row=r, col=1)
        fig.add_hline(y=uniform, line=dict(dash="dash", color=_BASELINE_COLOR, width=1.5), row=r, col=1)
        fig.update_yaxes(title_text="share", tickformat=".0%", row=r, col=1, rangemode="tozero")
    for i, d in enumerate(doms):  # legend swatches: the pattern on white
        label = d or "(no domain)"
        fig.add_trace(go.Bar(x=[None], y=[None], name=label, legendgroup=label, showlegend=True,
                             marker=dict(color="white", line=dict(color="#333333", width=1),
                                         pattern=dict(shape=_PATTERNS[i % len(_PATTERNS)], fgcolor="#333333",
                                                      size=6, solidity=0.25))), row=1, col=1)
    fig.add_trace(go.Scatter(x=[None], y=[None], mode="lines", name=f"uniform 1/E = {uniform:.1%}",
                             line=dict(dash="dash", color=_BASELINE_COLOR, width=1.5)), row=1, col=1)
    fig.update_xaxes(tickmode="array", tickvals=list(range(E)), ticktext=[_expert_tick(e) for e in range(E)])
    fig.update_xaxes(title_text="expert", row=len(layers), col=1)
    fig.update_layout(barmode="group", bargap=0.2, bargroupgap=0.05, height=170 + 230 * len(layers),
                      width=max(620, 90 * E + 250),
                      title=(title or "Share of each domain's top-k assignments per expert (Mixtral Figure 7)")
                      + _ids_note(trace),
                      legend=dict(title_text="domain"), margin=dict(t=90))
    fig.layout.meta = dict(kind="domain_load_bars", layers=layers, domains=doms, uniform=uniform)
    return fig


# --------------------------------------------------------------------------------------------
# Repetition (Mixtral paper, Table 5 and Figure 10)

_KIND_TITLES = {"first": "same first choice", "any": "top-k sets overlap"}
_SYMBOLS = ("circle", "square", "diamond", "triangle-up", "x")


def repetition_figure(trace: RoutingTrace | Sequence[A.Repetition], kinds: Sequence[str] = ("first", "any"),
                      *, by_domain: bool = False, bos_id: int | None = 1, n_boot: int = 1000, seed: int = 0,
                      title: str | None = None) -> go.Figure:
    """Share of consecutive tokens (within a document, BOS excluded) routed alike, across all
    layers (the Mixtral paper's Table 5 and Figure 10), next to its baselines: uniform routing
    (dashed), each layer's own expert frequencies ("marginal", sum of squared shares; dotted)
    and the same documents with their tokens shuffled (dash-dot). Error bars are bootstrap 95%
    intervals over documents. A rate is evidence of "sticky" routing only where its interval
    clears the marginal and shuffled baselines.

    Pass a trace (rates computed with :func:`moe_lab.analysis.repetition`) or already computed
    ``Repetition`` results (one per kind). ``by_domain=True`` adds one line per domain (without
    error bars for a domain of a single document, where a bootstrap over documents has no spread).
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
            color = SERIES_COLORS[i % len(SERIES_COLORS)]
            symbol = _SYMBOLS[i % len(_SYMBOLS)]  # colour and symbol together tell up to 35 domains apart
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
        fig.update_yaxes(tickformat=".0%", rangemode="tozero", row=1, col=c)
    fig.update_yaxes(title_text="consecutive token pairs", row=1, col=1)
    fig.update_layout(title=(title or "Consecutive tokens routed to the same expert (Mixtral Table 5 / Figure 10)")
                      + _ids_note(reps[0]),
                      height=max(430, 30 * (len(per_domain) + 4) + 100), width=460 * len(reps) + 200,
                      legend=dict(font=dict(size=11)))
    fig.layout.meta = dict(kind="repetition_figure", kinds=list(kinds))
    return fig


# --------------------------------------------------------------------------------------------
# Co-activation (OLMoE)

def coactivation_heatmap(trace: RoutingTrace, layer: int, *, title: str | None = None) -> go.Figure:
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
        title=(title or f"Co-activation at layer {layer}: uniform (k-1)/(E-1) = {uniform:.1%}") + _ids_note(trace),
        xaxis=dict(title="expert j (also chosen)", tickmode="array", tickvals=list(range(E)), ticktext=ticks,
                   showgrid=False, side="bottom"),
        yaxis=dict(title="expert i (chosen)", tickmode="array", tickvals=list(range(E)), ticktext=ticks,
                   autorange="reversed", showgrid=False, scaleanchor="x"),
        width=max(460, 46 * E + 260), height=max(420, 46 * E + 160))
    fig.layout.meta = dict(kind="coactivation_heatmap", layer=int(layer), uniform=uniform)
    return fig


def domain_specialization_heatmap(trace: RoutingTrace, layers: Sequence[int] | int | None = None, *,
                                  title: str | None = None) -> go.Figure:
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
    titles = [(title or f"Domain specialisation at layer {l}: uniform k/E = {uniform:.0%}") + _ids_note(trace)
              for l in layers]
    fig.update_layout(
        title=titles[0], margin=dict(t=90),
        xaxis=dict(title="expert", tickmode="array", tickvals=list(range(E)),
                   ticktext=[_expert_tick(e) for e in range(E)], showgrid=False),
        yaxis=dict(autorange="reversed", showgrid=False),
        height=max(300, 30 * len(doms) + 200), width=max(520, 56 * E + 260))
    if len(layers) > 1:
        vis = [[j == i for j in range(len(layers))] for i in range(len(layers))]
        fig.update_layout(updatemenus=[dict(_layer_menu([str(l) for l in layers], vis, titles, y=1.02),
                                            yanchor="bottom")])
    fig.layout.meta = dict(kind="domain_specialization_heatmap", layers=layers, uniform=uniform, domains=doms)
    return fig


# --------------------------------------------------------------------------------------------
# Expert paths across layers

def expert_paths_sankey(trace: RoutingTrace, layers: Sequence[int] | None = None, *, min_share: float = 0.0,
                        title: str | None = None) -> go.Figure:
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
    fig.update_layout(title=title or f"First-choice paths across layers {layers} ({N} tokens)",
                      height=max(420, 32 * E + 160), width=max(600, 170 * len(layers) + 120),
                      font=dict(size=11))
    fig.layout.meta = dict(kind="expert_paths_sankey", layers=layers)
    return fig


# --------------------------------------------------------------------------------------------
# Expert cache (offloading)

_POLICY_STYLE = {"optimal": ("#0077BB", "solid", "optimal (Belady, needs the future)"),
                 "lru": ("#EE7733", "dash", "LRU (least recently used)"),
                 "lfu": ("#009988", "dot", "LFU (least frequently used)")}


def cache_hit_figure(trace_or_df, *, sizes: Sequence[int] | None = None,
                     policies: Sequence[str] = ("lru", "lfu", "optimal"), title: str | None = None) -> go.Figure:
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
        title=(title or "Expert-cache hit rate against cache size (tokens in decoding order)")
        + _ids_note(trace_or_df), margin=dict(t=100),
        xaxis=dict(title="experts kept in the cache (per layer)", dtick=1 if E <= 16 else None),
        yaxis=dict(title="hit rate", tickformat=".0%", range=[0, 1.02]),
        height=450, width=760, legend=dict(x=0.02, y=0.98, font=dict(size=11)))
    fig.layout.meta = dict(kind="cache_hit_figure", n_experts=E, layers=layers)
    return fig


# --------------------------------------------------------------------------------------------
# Interventions: what changes when an expert is switched off or forced on

def next_token_figure(base_probs, new_probs, tokenizer=None, *, top_n: int = 10,
                      labels: tuple[str, str] = ("normal routing", "with the intervention"),
                      title: str | None = None) -> go.Figure:
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
    fig = _figure()
    fig.add_trace(go.Bar(y=ylab, x=p[top], orientation="h", name=labels[0], marker_color="#BBBBBB",
                         hovertemplate="%{y}: %{x:.2%}<extra>" + labels[0] + "</extra>"))
    fig.add_trace(go.Bar(y=ylab, x=q[top], orientation="h", name=labels[1], marker_color="#0077BB",
                         hovertemplate="%{y}: %{x:.2%}<extra>" + labels[1] + "</extra>"))
    fig.update_layout(title=title or f"Next-token probabilities (KL = {kl:.3f} nats)", barmode="group",
                      yaxis=dict(autorange="reversed", tickfont=dict(family=_MONO)),
                      xaxis=dict(title="probability", tickformat=".3~%"),
                      height=140 + 26 * len(top), width=560, legend=dict(orientation="h", y=-0.25))
    fig.layout.meta = dict(kind="next_token_figure", kl=kl, token_ids=top)
    return fig


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
                          title: str | None = None) -> go.Figure:
    """Per layer, the share of tokens routed differently after an intervention: first choice
    changed, and top-k set changed. Layers before the intervened one cannot change (the model
    is causal across layers); ``marker_layer`` marks the intervened layer."""
    layers, first, sets = routing_changes(base, new)
    fig = _figure()
    fig.add_trace(go.Bar(x=layers, y=sets, name="top-k set changed", marker_color="#0077BB",
                         hovertemplate="layer %{x}: %{y:.0%} of tokens<extra>top-k set changed</extra>"))
    fig.add_trace(go.Bar(x=layers, y=first, name="first choice changed", marker_color="#EE7733",
                         hovertemplate="layer %{x}: %{y:.0%} of tokens<extra>first choice changed</extra>"))
    if marker_layer is not None:
        fig.add_vline(x=marker_layer, line=dict(color=_BASELINE_COLOR, dash="dash"),
                      annotation_text="intervention", annotation_position="top")
    fig.update_layout(title=title or "Tokens routed differently after the intervention", barmode="group",
                      xaxis=dict(title="layer", tickmode="array", tickvals=layers),
                      yaxis=dict(title="share of tokens", tickformat=".0%", range=[0, 1.05]),
                      height=340, width=560, legend=dict(orientation="h", y=-0.3))
    fig.layout.meta = dict(kind="routing_change_figure", layers=layers)
    return fig


# --------------------------------------------------------------------------------------------
# The offloading what-if (numbers from moe_lab.analysis.offload)

_OFFLOAD_STYLE = {"optimal": ("#0077BB", "solid", "Belady (optimal, knows the future)"),
                  "lru": ("#EE7733", "dash", "LRU cache"), "lfu": ("#009988", "dot", "LFU cache"),
                  "frequency": ("#CC3311", "solid", "pin most frequent (ktransformers 'frequency')"),
                  "uniform": ("#33BBEE", "dashdot", "pin experts 0..c-1 ('uniform')"),
                  "front_loading": ("#EE3377", "longdash", "whole layers first ('front-loading', llama.cpp -ngl)")}


def offload_policy_figure(df, *, n_experts: int | None = None, title: str | None = None) -> go.Figure:
    """Whole-model hit rate against the per-layer budget for each cache policy and placement, from
    :func:`moe_lab.analysis.policy_comparison`; the grey line is budget / E (random routing)."""
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
                      yaxis=dict(title="share of expert reads served from fast memory", tickformat=".0%",
                                 range=[0, 1.02]), height=450, width=780, legend=dict(x=0.02, y=0.98, font=dict(size=11)))
    fig.layout.meta = dict(kind="offload_policy_figure", policies=list(dict.fromkeys(df.policy)))
    return fig


def prefetch_figure(df, *, cache_size: int | None = None, title: str | None = None) -> go.Figure:
    """Speculative prefetch per layer, from :func:`moe_lab.analysis.prefetch_hit_rates`: the recall
    of the guesses (bars) and the cache's hit rate without and with them (markers)."""
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
                      yaxis=dict(tickformat=".0%", range=[0, 1.05]), xaxis=dict(title="layer being guessed"),
                      height=420, width=780, legend=dict(orientation="h", y=-0.25))
    fig.layout.meta = dict(kind="prefetch_figure", cache_size=size)
    return fig


def tokens_per_second_figure(table, *, scenario: str | None = None, title: str | None = None) -> go.Figure:
    """Predicted decode tokens/s by link (x) and expert precision (bars), log scale, from
    :func:`moe_lab.analysis.offload_table` (one scenario: the first unless named)."""
    scenario = scenario if scenario is not None else table.scenario.iloc[0]
    d = table[table.scenario == scenario]
    fig = _figure()
    for i, (prec, g) in enumerate(d.groupby("precision", sort=False)):
        fig.add_trace(go.Bar(x=g.link.tolist(), y=g.tokens_per_s.tolist(), name=prec,
                             marker_color=SERIES_COLORS[i % len(SERIES_COLORS)],
                             customdata=np.stack([g.GB_moved_per_token, g.demand_s, g.resident_s], -1).tolist(),
                             hovertemplate=f"{prec}, %{{x}}: %{{y:.2f}} tok/s<br>%{{customdata[0]:.2f}} GB moved per token"
                                           "<br>link %{customdata[1]:.3f} s + resident %{customdata[2]:.3f} s<extra></extra>"))
    h = d.hit_rate.iloc[0]
    fig.update_layout(barmode="group", title=title or f"Predicted decode speed ({scenario}: hit rate {h:.0%})",
                      yaxis=dict(title="tokens/s (upper bound, batch 1)", type="log"), xaxis=dict(title="where misses come from"),
                      height=450, width=820)
    fig.layout.meta = dict(kind="tokens_per_second_figure", scenario=scenario)
    return fig


def calibration_figure(cal, *, title: str | None = None) -> go.Figure:
    """Predicted against published tokens/s (log-log) from :func:`moe_lab.analysis.mixtral_calibration`;
    on the diagonal the model is exact, the band is a factor of 2 either way."""
    fig = _figure()
    lo = 0.5 * min(cal.published_tok_s.min(), cal.predicted_tok_s.min())
    hi = 2 * max(cal.published_tok_s.max(), cal.predicted_tok_s.max())
    fig.add_trace(go.Scatter(x=[lo, hi, hi, lo], y=[lo / 2, hi / 2, hi * 2, lo * 2], fill="toself", mode="none",
                             fillcolor="rgba(170,170,170,0.2)", name="within 2x", hoverinfo="skip"))
    fig.add_trace(go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", line=dict(color="#555555", dash="dash"),
                             name="prediction = measurement", hoverinfo="skip"))
    for i, r in enumerate(cal.itertuples()):
        fig.add_trace(go.Scatter(x=[r.published_tok_s], y=[r.predicted_tok_s], mode="markers+text", text=[r.system],
                                 textposition="top center", marker=dict(size=12, color=SERIES_COLORS[i % len(SERIES_COLORS)]),
                                 name=f"{r.system}: {r.hardware}",
                                 hovertemplate=f"{r.system}, {r.hardware}, {r.precision}<br>published %{{x:.2f}} tok/s, "
                                               "predicted %{y:.2f}<extra></extra>"))
    fig.update_layout(title=title or "Offloading model vs published Mixtral 8x7B decode speeds",
                      xaxis=dict(title="published tokens/s", type="log"), yaxis=dict(title="predicted tokens/s", type="log"),
                      height=480, width=820, legend=dict(font=dict(size=10)))
    fig.layout.meta = dict(kind="calibration_figure")
    return fig


# --------------------------------------------------------------------------------------------
# Language or content? (aligned paragraphs; moe_lab.analysis.language)

_PAIR_SERIES = (("same_content", "same paragraph, other language", "#0077BB"),
                ("same_language", "other paragraph, same language", "#EE7733"),
                ("neither", "other paragraph, other language", "#999999"))


def language_content_figure(result: "A.LanguageContent", *, layers: Sequence[int] | None = None,
                            title: str | None = None) -> go.Figure:
    """Per layer, how alike the routing of two documents is (mean pair similarity of their
    expert-usage vectors) when they share the content (the same paragraph translated), the
    language, or neither; error bars are bootstrap 95% intervals over paragraphs. Dashed: the
    shuffled baselines (paragraph labels permuted within each language, language labels
    permuted within each paragraph), what "no effect" looks like."""
    x = list(layers) if layers is not None else list(range(len(result.same_content)))
    fig = _figure()
    for name, label, color in _PAIR_SERIES:
        y, ci = getattr(result, name), getattr(result, f"ci_{name}")
        fig.add_trace(go.Scatter(
            x=x, y=y, mode="lines+markers", name=label, line=dict(color=color, width=2.5),
            error_y=dict(type="data", symmetric=False, array=ci[:, 1] - y, arrayminus=y - ci[:, 0], color=color),
            customdata=ci.round(4),
            hovertemplate="layer %{x}: %{y:.3f} (95% CI %{customdata[0]:.3f}-%{customdata[1]:.3f})"
                          f"<extra>{label}</extra>"))
    for name, label, color in (("shuffled_content", "shuffled: paragraphs within a language", "#0077BB"),
                               ("shuffled_language", "shuffled: languages within a paragraph", "#EE7733")):
        fig.add_trace(go.Scatter(x=x, y=getattr(result, name), mode="lines", name=label,
                                 line=dict(color=color, dash="dash", width=1.5),
                                 hovertemplate=f"layer %{{x}}: %{{y:.3f}}<extra>{label}</extra>"))
    measure = {"js": "1 - Jensen-Shannon divergence (bits)", "cosine": "cosine similarity"}.get(result.measure,
                                                                                                 result.measure)
    fig.update_layout(title=title or f"Does routing follow the language or the content? ({result.n_paragraphs} "
                                     f"paragraphs x {len(result.languages)} languages)",
                      xaxis=dict(title="layer", tickmode="array", tickvals=x),
                      yaxis=dict(title=f"routing similarity ({measure})"),
                      height=420, width=720, legend=dict(font=dict(size=11)))
    fig.layout.meta = dict(kind="language_content_figure", measure=result.measure, layers=x)
    return fig


def hidden_control_figure(control: "A.HiddenControl", raw: "A.LanguageContent | None" = None, *,
                          layers: Sequence[int] | None = None, title: str | None = None) -> go.Figure:
    """Left: per layer, the share of the variance of routing similarity (over all pairs of
    documents) that the cosine similarity of their mean router inputs explains (R^2). Right: the
    content-minus-language difference of routing similarity with its 95% interval, on the raw
    similarities (``raw``, if given) and on what the hidden states leave unexplained (residuals):
    a difference that survives the control is more than "similar inputs, similar routing"."""
    x = list(layers) if layers is not None else list(range(len(control.r2)))
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.14,
                        subplot_titles=["explained by hidden-state similarity (R²)",
                                        "same content minus same language"])
    fig.update_layout(template=TEMPLATE)
    fig.add_trace(go.Bar(x=x, y=control.r2, name="R²", marker_color="#0077BB", showlegend=False,
                         hovertemplate="layer %{x}: R² = %{y:.2f}<extra></extra>"), row=1, col=1)
    series = [("residuals after the control", control.residual, "#0077BB")]
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
    fig.update_layout(title=title or "The control: how much of routing similarity the hidden states explain",
                      height=400, width=900, legend=dict(orientation="h", y=-0.25))
    fig.layout.meta = dict(kind="hidden_control_figure", layers=x)
    return fig
