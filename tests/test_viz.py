"""Figures reflect the trace they were drawn from: checked on small hand-built traces."""

import json

import numpy as np
import plotly.graph_objects as go
import plotly.io as pio
import pytest

from moe_lab import analysis as A
from moe_lab import viz
from moe_lab.routing.trace import RoutingTrace
from trace_helpers import make_trace


# two layers, 5 tokens in doc 0 and 3 in doc 1, top-2 of 4
IDS = np.array([
    [[0, 1], [1, 2], [2, 3], [3, 0], [0, 2], [1, 0], [1, 3], [2, 1]],
    [[3, 2], [3, 1], [0, 1], [0, 2], [1, 2], [2, 3], [2, 0], [0, 3]],
])
DOCS = [0, 0, 0, 0, 0, 1, 1, 1]
PIECES = ["<s>", "▁def", "▁f", "(", "x", "<s>", "▁The", "▁cat"]


@pytest.fixture
def trace():
    rng = np.random.default_rng(0)
    w = np.stack([np.full(8, 0.7), np.full(8, 0.3)], -1)[None].repeat(2, 0)
    return make_trace(IDS, doc_ids=DOCS, domains=["code", "prose"], pieces=PIECES, weights=w,
                      logits=rng.normal(size=(2, 8, 4)).astype(np.float32), token_ids=[1, 11, 12, 13, 14, 1, 15, 16])


# ---------------------------------------------------------------- colours

def test_expert_colors_are_distinct_stable_and_extend_past_the_palette():
    assert viz.expert_color(0) == "#E69F00" and viz.expert_color(7) == "#000000"  # Okabe-Ito
    cols = viz.expert_colors(64)
    assert len(set(cols)) == 64
    assert cols[:8] == list(viz.EXPERT_COLORS[:8])
    assert all(c.startswith("#") and len(c) == 7 for c in cols)
    assert viz.expert_colors(64) == cols  # deterministic
    with pytest.raises(ValueError):
        viz.expert_color(-1)


def test_setup_notebook_sets_renderer_and_template(monkeypatch):
    monkeypatch.delenv("PLOTLY_RENDERER", raising=False)
    old_r, old_t = pio.renderers.default, pio.templates.default
    try:
        r = viz.setup_notebook()
        assert r == "plotly_mimetype+notebook_connected" == pio.renderers.default
        assert pio.templates.default == viz.TEMPLATE
        bundle = go.Figure()._repr_mimebundle_()  # what Jupyter stores in the saved notebook
        assert "application/vnd.plotly.v1+json" in bundle and "text/html" in bundle
        assert len(bundle["text/html"]) < 20_000  # plotly.js is loaded from the CDN, not embedded
        assert viz.setup_notebook("json") == "json"
    finally:
        pio.renderers.default, pio.templates.default = old_r, old_t


def test_template_is_small():
    fig = viz.load_heatmap(make_trace(IDS[:, :, :], doc_ids=DOCS))
    assert len(json.dumps(fig.to_plotly_json()["layout"]["template"])) < 2000


# ---------------------------------------------------------------- tokens (Figure 8)

def test_token_colors_are_first_choice_expert_colors(trace):
    fig = viz.token_figure(trace, doc=0)
    assert fig.data[0].name == "layer 0" and fig.data[1].name == "layer 1"
    for li in range(2):
        expected = [viz.expert_color(e) for e in IDS[li, :5, 0]]
        assert list(fig.data[li].marker.color) == expected
    assert list(fig.data[0].text) == ["&lt;s&gt;", " def", " f", "(", "x"]
    # hover data: top-2 experts and weights, then entropy (trace has logits)
    cd = np.asarray(fig.data[1].customdata)
    np.testing.assert_array_equal(cd[:, :2], IDS[1, :5])
    np.testing.assert_allclose(cd[:, 2:4], [[0.7, 0.3]] * 5, atol=1e-3)
    np.testing.assert_allclose(cd[:, 4], A.router_confidence(trace).entropy[1, :5], atol=1e-3)
    assert "router entropy" in fig.data[0].hovertemplate


def test_token_figure_layer_switch(trace):
    fig = viz.token_figure(trace, doc=1)
    states = viz.layer_switch_states(fig)
    assert [label for label, _ in states] == ["layer 0", "layer 1"]
    n = len(fig.data)
    assert n == 2 + 4  # one trace per layer + one legend entry per expert
    assert states[0][1] == [True, False] + [True] * 4
    assert states[1][1] == [False, True] + [True] * 4
    assert fig.data[0].visible is True and fig.data[1].visible is False
    assert "layer 1" in fig.layout.updatemenus[0].buttons[1].args[1]["title.text"]
    # doc 1 holds tokens 5..7
    assert list(fig.data[1].marker.color) == [viz.expert_color(e) for e in IDS[1, 5:, 0]]


def test_token_figure_single_layer_has_no_switch_and_no_entropy_without_logits():
    t = make_trace(IDS, doc_ids=DOCS)
    fig = viz.token_figure(t, layers=1)
    assert not fig.layout.updatemenus
    assert list(fig.data[0].marker.color) == [viz.expert_color(e) for e in IDS[1, :5, 0]]
    assert "entropy" not in fig.data[0].hovertemplate
    assert list(fig.data[0].text) == ["[10]", "[11]", "[12]", "[13]", "[14]"]  # ids when no pieces
    with pytest.raises(KeyError, match="layer 5"):
        viz.token_figure(t, layers=[5])
    with pytest.raises(IndexError):
        viz.token_figure(t, doc=2)


def test_token_figure_wraps_lines_and_breaks_after_newlines():
    pieces = ["▁aaaa"] * 10 + ["\\n", "▁b"]
    t = make_trace(np.zeros((1, 12, 2), int), pieces=pieces, E=2)
    fig = viz.token_figure(t, line_chars=20)
    y = list(fig.data[0].y)
    assert y[0] == 0 and max(y[:10]) >= 2  # 10 five-char tokens need several 20-char lines
    assert y[11] == y[10] + 1 and fig.data[0].base[11] == 0  # "\n" ends its line
    assert fig.data[0].text[10] == "↵"


def test_token_text_is_readable_on_its_colour(trace):
    fig = viz.token_figure(trace, layers=0)
    for bg, fg in zip(fig.data[0].marker.color, fig.data[0].textfont.color):
        assert fg == ("#FFFFFF" if bg in ("#000000", "#0072B2", "#D55E00") else "#000000")


# ---------------------------------------------------------------- load

def test_load_heatmap_is_expert_load(trace):
    fig = viz.load_heatmap(trace)
    np.testing.assert_allclose(np.asarray(fig.data[0].z), A.expert_load(trace))
    assert fig.data[0].zmid == pytest.approx(0.25)
    assert list(fig.data[0].y) == [0, 1] and fig.layout.yaxis.title.text == "layer"
    fig_t = viz.load_heatmap(trace, "first", normalization="tokens")
    np.testing.assert_allclose(np.asarray(fig_t.data[0].z), A.expert_load(trace, "first", "tokens"))


def test_domain_load_bars(trace):
    fig = viz.domain_load_bars(trace, layer=1)
    bars = [d for d in fig.data if d.x[0] is not None]
    by = A.expert_load_by_domain(trace)
    assert [b.name for b in bars] == ["code", "prose"]
    for b in bars:
        np.testing.assert_allclose(b.y, by[b.name][1])
        # coloured by domain, as the paper's Figure 7 (the expert is the x position and its tick)
        assert b.marker.color == viz.domain_color(b.name, ["code", "prose"])
    assert bars[0].marker.color != bars[1].marker.color
    assert list(fig.layout.xaxis.tickvals) == [0, 1, 2, 3]
    dashed = [s for s in fig.layout.shapes if s.line.dash == "dash"]
    assert len(dashed) == 1 and dashed[0].y0 == dashed[0].y1 == pytest.approx(0.25)
    fig3 = viz.domain_load_bars(trace)  # default: first, middle, last layers -> here 0 and 1
    assert fig3.layout.meta["layers"] == [0, 1]
    assert len([s for s in fig3.layout.shapes if s.line.dash == "dash"]) == 2
    # one legend entry per domain (plus the uniform line), whatever the number of panels
    assert [d.name for d in fig3.data if d.showlegend is not False][:2] == ["code", "prose"]
    assert sum(d.showlegend is not False for d in fig3.data) == 3


# ---------------------------------------------------------------- repetition (Table 5 / Figure 10)

def test_repetition_figure_shows_rates_cis_and_baselines(trace):
    fig = viz.repetition_figure(trace, n_boot=50)
    reps = [A.repetition(trace, k, n_boot=50) for k in ("first", "any")]
    obs = [d for d in fig.data if d.name == "observed (95% CI)"]
    assert len(obs) == 2
    for d, r in zip(obs, reps):
        np.testing.assert_allclose(d.y, r.rate)
        np.testing.assert_allclose(np.asarray(d.y) - np.asarray(d.error_y.arrayminus), r.ci_low)
        np.testing.assert_allclose(np.asarray(d.y) + np.asarray(d.error_y.array), r.ci_high)
    marg = [d for d in fig.data if d.name.startswith("chance given")]
    np.testing.assert_allclose(marg[0].y, reps[0].marginal)
    unif = [d for d in fig.data if d.name == "uniform routing"]
    assert unif[0].y[0] == pytest.approx(0.25) and unif[1].y[0] == pytest.approx(1 - 1 / 6)
    assert any(d.name == "tokens shuffled within documents" for d in fig.data)


def test_repetition_figure_by_domain_and_from_results(trace):
    fig = viz.repetition_figure(trace, kinds=("first",), by_domain=True, n_boot=20)
    names = [d.name for d in fig.data]
    assert "code" in names and "prose" in names and "all documents (95% CI)" in names
    code = A.repetition(trace.select(domain="code"), "first", n_boot=20)
    np.testing.assert_allclose(fig.data[names.index("code")].y, code.rate)
    rep = A.repetition(trace, "any", n_boot=20)
    fig2 = viz.repetition_figure([rep])
    np.testing.assert_allclose(fig2.data[0].y, rep.rate)


# ---------------------------------------------------------------- co-activation, paths, cache

def test_coactivation_heatmap(trace):
    fig = viz.coactivation_heatmap(trace, layer=0)
    z = np.asarray(fig.data[0].z, dtype=float)
    np.testing.assert_allclose(z, A.coactivation(trace, 0))
    assert np.isnan(np.diag(z)).all()
    assert fig.data[0].zmid == pytest.approx(1 / 3)  # (k-1)/(E-1)


def test_domain_specialization_heatmap(trace):
    fig = viz.domain_specialization_heatmap(trace)
    for i, layer in enumerate(trace.layers):
        doms, mat = A.domain_specialization(trace, layer)
        np.testing.assert_allclose(np.asarray(fig.data[i].z), mat)
        assert list(fig.data[i].y) == doms == ["code", "prose"]
    assert fig.data[0].zmid == pytest.approx(0.5)  # k/E = 2/4
    assert [v for _, v in viz.layer_switch_states(fig)] == [[True, False], [False, True]]


def test_sankey_links_count_first_choice_transitions(trace):
    fig = viz.expert_paths_sankey(trace)
    s = fig.data[0]
    assert list(s.node.color) == viz.expert_colors(4) * 2
    counts = np.zeros((4, 4), int)
    for a, b, v in zip(s.link.source, s.link.target, s.link.value):
        counts[a, b - 4] += v
    expected = np.zeros((4, 4), int)
    np.add.at(expected, (IDS[0, :, 0], IDS[1, :, 0]), 1)
    np.testing.assert_array_equal(counts, expected)
    assert sum(s.link.value) == trace.n_tokens
    with pytest.raises(ValueError):
        viz.expert_paths_sankey(trace, layers=[0])


def test_cache_hit_figure(trace):
    df = A.cache_hit_rates(trace)
    fig = viz.cache_hit_figure(trace)
    lru_mean = [d for d in fig.data if d.legendgroup == "lru"][0]  # first view: mean over layers
    expected = df[df.policy == "lru"].groupby("cache_size").hit_rate.mean()
    np.testing.assert_allclose(lru_mean.y, expected.values)
    assert list(lru_mean.x) == [1, 2, 3, 4]
    states = viz.layer_switch_states(fig)
    assert [s[0] for s in states] == ["mean over layers (range as bars)", "layer 0", "layer 1"]
    # each view shows its 3 policies plus the reference line
    for label, vis in states:
        assert sum(vis) == 4 and vis[-1]
    opt = [d for d in fig.data if d.legendgroup == "optimal"]
    lay1 = df[(df.policy == "optimal") & (df.layer == 1)].hit_rate.values
    np.testing.assert_allclose(opt[2].y, lay1)
    assert np.all(np.asarray(opt[0].y) >= np.asarray(lru_mean.y) - 1e-12)  # optimal is the ceiling
    fig_df = viz.cache_hit_figure(df)
    np.testing.assert_allclose(fig_df.data[0].y, fig.data[0].y)
    trace.meta["provenance"] = "demo model"  # the DataFrame carries the trace's label to the title
    assert viz.cache_hit_figure(A.cache_hit_rates(trace)).layout.title.text.startswith("DEMO MODEL: ")
    with pytest.raises(TypeError):
        viz.cache_hit_figure([1, 2])


def test_every_figure_is_a_plain_figure_and_serialises(trace):
    figs = [viz.token_figure(trace), viz.load_heatmap(trace), viz.domain_load_bars(trace, 0),
            viz.repetition_figure(trace, n_boot=20), viz.coactivation_heatmap(trace, 1), viz.domain_specialization_heatmap(trace, 0),
            viz.expert_paths_sankey(trace), viz.cache_hit_figure(trace)]
    for f in figs:
        assert type(f) is go.Figure
        json.loads(f.to_json())


# ---------------------------------------------------------------- interventions

def test_next_token_figure():
    p = np.array([0.5, 0.3, 0.1, 0.1, 0.0])
    q = np.array([0.1, 0.3, 0.5, 0.05, 0.05])
    fig = viz.next_token_figure(p, q, top_n=3)
    # top 3 by max(p, q): token 0 (0.5), token 2 (0.5), token 1 (0.3)
    assert fig.layout.meta["token_ids"] == [0, 2, 1]
    np.testing.assert_allclose(fig.data[0].x, [0.5, 0.1, 0.3])
    np.testing.assert_allclose(fig.data[1].x, [0.1, 0.5, 0.3])
    kl = 0.5 * np.log(5) + 0.3 * 0 + 0.1 * np.log(0.2) + 0.1 * np.log(2)
    assert fig.layout.meta["kl"] == pytest.approx(kl)
    with pytest.raises(ValueError):
        viz.next_token_figure(p, q[:3])
    rng = np.random.default_rng(0)  # rounding must not print a negative KL (this pair gives -1e-15 raw)
    a = rng.random(50)
    a /= a.sum()
    b = a.copy()
    b[rng.integers(50)] += 1e-15
    same = viz.next_token_figure(a, b)
    assert same.layout.meta["kl"] == 0.0 and "-0.000" not in same.layout.title.text


def test_routing_change_figure():
    base = make_trace([[[0, 1], [1, 2], [2, 3], [3, 0]], [[0, 1], [1, 2], [2, 3], [3, 0]]])
    new = make_trace([[[0, 1], [1, 2], [2, 3], [3, 0]], [[1, 0], [1, 3], [2, 3], [3, 0]]])
    layers, first, sets = viz.routing_changes(base, new)
    # layer 1: token 0 swapped ranks (first choice changed, same set); token 1 changed its set
    np.testing.assert_allclose(first, [0, 0.25])
    np.testing.assert_allclose(sets, [0, 0.25])
    fig = viz.routing_change_figure(base, new, marker_layer=1)
    band = [sh for sh in fig.layout.shapes if sh.type == "rect"]  # behind layer 1's bars, not across them
    assert len(band) == 1 and (band[0].x0, band[0].x1) == (0.5, 1.5) and band[0].layer == "below"
    np.testing.assert_allclose(fig.data[0].y, [0, 0.25])
    np.testing.assert_allclose(fig.data[1].y, [0, 0.25])
    with pytest.raises(ValueError):
        viz.routing_changes(base, make_trace(IDS))


# ---------------------------------------------------------------- figures a reader can read (issue 23 item 9)

def _generic_figures(trace):
    """name -> figure, for every generic figure function (those of the causal, offload and language
    topics are checked by their own tests)."""
    z = np.random.default_rng(0).normal(size=(2, 2, 4))
    return {
        "load_heatmap": viz.load_heatmap(trace),
        "domain_load_bars": viz.domain_load_bars(trace),
        "repetition_figure": viz.repetition_figure(trace, by_domain=True, n_boot=20),
        "coactivation_heatmap": viz.coactivation_heatmap(trace, 1),
        "domain_specialization_heatmap": viz.domain_specialization_heatmap(trace),
        "cache_hit_figure": viz.cache_hit_figure(trace),
        "next_token_figure": viz.next_token_figure([0.6, 0.3, 0.1], [0.2, 0.3, 0.5]),
        "routing_change_figure": viz.routing_change_figure(trace, trace, marker_layer=1),
        "expert_heatmap": viz.expert_heatmap(z, rows=["code", "prose"], layers=[0, 1]),
    }


def _axes(fig):
    lay = fig.layout.to_plotly_json()
    return {k: fig.layout[k] for k in lay if k.startswith(("xaxis", "yaxis"))} or {"xaxis": fig.layout.xaxis,
                                                                                      "yaxis": fig.layout.yaxis}


def test_every_axis_of_every_generic_figure_has_a_title(trace):
    for name, fig in _generic_figures(trace).items():
        axes = _axes(fig)
        titled = {k for k, ax in axes.items() if ax.title.text}
        for k, ax in axes.items():
            if ax.visible is False or k in titled:
                continue
            # a shared axis is covered by the titled axis of the same column (x) or row (y)
            dom = tuple(ax.domain or (0, 1))
            assert any(k2[0] == k[0] and tuple(axes[k2].domain or (0, 1)) == dom for k2 in titled), (
                f"{name}: {k} has no title and shares its position with no titled axis")


def test_every_generic_figure_says_what_it_was_computed_on(trace):
    for name, fig in _generic_figures(trace).items():
        assert "DEMO MODEL" not in (fig.layout.title.text or ""), name
    assert viz.load_heatmap(trace, source="demo model").layout.title.text.startswith("DEMO MODEL: Expert load")
    assert viz.domain_load_bars(trace, source="synthetic fixture").layout.title.text.startswith("SYNTHETIC FIXTURE: ")
    assert viz.token_figure(trace, source="demo model").layout.title.text.startswith("DEMO MODEL: ")
    assert viz.expert_heatmap(np.zeros((1, 1, 4)), source="demo model").layout.title.text.startswith("DEMO MODEL")
    assert "(Mixtral 8x7B)" in viz.load_heatmap(trace, source="Mixtral 8x7B").layout.title.text  # a real source
    # a trace that carries its provenance says it without being told
    trace.meta["provenance"] = "synthetic fixture"
    for fig in [viz.load_heatmap(trace), viz.repetition_figure(trace, n_boot=20), viz.coactivation_heatmap(trace, 0),
                viz.domain_specialization_heatmap(trace), viz.expert_paths_sankey(trace), viz.cache_hit_figure(trace)]:
        assert fig.layout.title.text.startswith("SYNTHETIC FIXTURE: ")
    # the layer switch keeps it in every view's title
    assert all(b.args[1]["title.text"].startswith("SYNTHETIC FIXTURE: ")
               for b in viz.domain_specialization_heatmap(trace).layout.updatemenus[0].buttons)
    assert viz.figure_title("Hit rate (synthetic fixture)", source="synthetic fixture") == "Hit rate (synthetic fixture)"
    assert viz.figure_title("Hit rate", source=trace) == "SYNTHETIC FIXTURE: Hit rate"  # as viz.stamp writes it


def test_heatmaps_have_one_tick_per_expert_in_its_colour(trace):
    figs = _generic_figures(trace)
    for name in ("load_heatmap", "coactivation_heatmap", "domain_specialization_heatmap", "expert_heatmap",
                 "domain_load_bars"):
        for k, ax in _axes(figs[name]).items():
            if not k.startswith("xaxis"):
                continue
            assert list(ax.tickvals) == [0, 1, 2, 3], (name, k)
            assert [viz.expert_color(e) in t and t.endswith(f" {e}") for e, t in enumerate(ax.ticktext)] == [True] * 4


def test_one_colour_per_expert_across_figures(trace):
    """Every place a figure shows an expert's colour (tokens, legend, ticks, Sankey nodes) uses
    expert_color(e), so expert e looks the same in all of them."""
    import re

    seen: dict[int, set] = {}
    tok = viz.token_figure(trace)
    for d in tok.data[len(trace.layers):]:  # the legend entries
        seen.setdefault(int(d.name), set()).add(d.marker.color)
    for fig in _generic_figures(trace).values():
        for _, ax in _axes(fig).items():
            for t in ax.ticktext or ():
                m = re.match(r"<span style='color:(#[0-9A-Fa-f]{6})'>■</span> (\d+)$", t)
                if m:
                    seen.setdefault(int(m.group(2)), set()).add(m.group(1))
    s = viz.expert_paths_sankey(trace).data[0]
    for label, c in zip(s.node.label, s.node.color):
        seen.setdefault(int(label.split("E")[-1]), set()).add(c)
    assert set(seen) == {0, 1, 2, 3}
    for e, colours in seen.items():
        assert colours == {viz.expert_color(e)}, (e, colours)


def _lab(hex_color):
    rgb = np.array([int(hex_color.lstrip("#")[i:i + 2], 16) / 255 for i in (0, 2, 4)])
    rgb = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    xyz = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]]) @ rgb
    f = np.cbrt(np.maximum(xyz / np.array([0.95047, 1.0, 1.08883]), 0.008856))
    return np.array([116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2])])


def test_ten_domain_colours_are_distinct_stable_and_not_grey():
    import itertools

    assert len(viz.DOMAIN_COLORS) == 10
    for a, b in itertools.combinations(viz.DOMAIN_COLORS, 2):
        assert np.linalg.norm(_lab(a) - _lab(b)) > 25, (a, b)
    for c in viz.DOMAIN_COLORS:  # no domain looks like a baseline (greys) or the "all documents" line
        for g in ("#555555", "#999999", "#AAAAAA", "#BBBBBB", "#222222"):
            assert np.linalg.norm(_lab(c) - _lab(g)) > 25, (c, g)
    corpus = ["python", "english", "math", "french", "german", "spanish", "italian", "data", "latex"]
    full = viz.domain_colors(corpus)
    assert len(set(full)) == 9
    # a subset keeps each domain's colour (05 shows 5 of the 9 domains, 06 all of them)
    assert viz.domain_colors(["latex", "python"]) == [full[8], full[0]]
    other = viz.domain_colors([f"d{i}" for i in range(10)])
    assert other == list(viz.DOMAIN_COLORS)
    assert len(set(viz.domain_colors([f"d{i}" for i in range(14)]))) == 14
    assert len(set(viz.domain_colors(corpus + ["c4"]))) == 10
    with pytest.raises(KeyError):
        viz.domain_color("c4", ["python"])


def test_repetition_by_domain_uses_the_domain_colours(trace):
    fig = viz.repetition_figure(trace, by_domain=True, n_boot=20)
    lines = {d.name: d.line.color for d in fig.data if d.name in ("code", "prose")}
    assert lines == dict(zip(["code", "prose"], viz.domain_colors(["code", "prose"])))


def test_log_ticks_label_1_2_5_in_full():
    t = viz.log_ticks([0.55, 1.3, 60])
    assert t["type"] == "log" and t["tickvals"] == [0.5, 1, 2, 5, 10, 20, 50, 100]
    assert t["ticktext"] == ["0.5", "1", "2", "5", "10", "20", "50", "100"]
    assert viz.log_ticks([2, 3])["tickvals"] == [2, 5]
    assert viz.log_ticks([1500, 1e5])["ticktext"][0] == "1,000"
    # figures finished here get them on every log axis; the template labels plotly's own log ticks
    # in full for the rest (no bare "2" and "5" between decades)
    fig = go.Figure(go.Bar(x=["a", "b"], y=[0.7, 40]))
    fig.update_layout(yaxis_type="log")
    viz._finish(fig)
    assert list(fig.layout.yaxis.tickvals) == [0.5, 1, 2, 5, 10, 20, 50]
    assert pio.templates[viz.TEMPLATE].layout.yaxis.minorloglabels == "complete"
    assert pio.templates[viz.TEMPLATE].layout.xaxis.minorloglabels == "complete"


def test_long_titles_wrap_to_the_figure_and_the_margin_holds_them(trace):
    long = "A title long enough to run past the right edge of a figure that is only five hundred pixels wide"
    fig = viz.load_heatmap(trace, title=long)
    width = fig.layout.width
    lines = fig.layout.title.text.split("<br>")
    assert len(lines) >= 2 and all(len(viz._strip_tags(ln)) * viz._CHAR_PX <= width - 30 for ln in lines)
    short = viz.load_heatmap(trace, title="Load")
    assert short.layout.title.text == "Load"
    top = [f.layout.margin.t or pio.templates[viz.TEMPLATE].layout.margin.t for f in (fig, short)]
    assert top[0] >= 30 + 21 * len(lines) and top[0] > top[1]  # room for every line
    assert fig.layout.height - top[0] == short.layout.height - top[1]  # the same plot area


def test_legends_under_the_plot_get_their_own_room(trace):
    fig = viz.cache_hit_figure(trace)
    leg = fig.layout.legend
    assert leg.orientation == "h" and leg.yref == "container" and leg.y == 0
    assert fig.layout.margin.b >= 40 + 22 * viz._legend_rows(fig, fig.layout.width - 40)
    # the repetition figure's legend (one entry per domain + 4) fits its height
    rep = viz.repetition_figure(trace, by_domain=True, n_boot=20)
    entries = sum(d.showlegend is not False for d in rep.data)
    m = pio.templates[viz.TEMPLATE].layout.margin
    assert rep.layout.height - (rep.layout.margin.t or m.t) - (rep.layout.margin.b or m.b) >= 21 * entries


def test_expert_heatmap_one_colour_scale_per_layer_and_marks():
    import pandas as pd

    rng = np.random.default_rng(1)
    z = rng.normal(size=(3, 2, 4)) * np.array([1.0, 0.01])[None, :, None]  # layer 1 is 100x smaller
    rows = ["python", "english", "math"]
    fig = viz.expert_heatmap(z, rows=rows, layers=[0, 3], marks=[("math", 3, 2)], mark_label="beyond the null",
                             muted_rows=["english"], source="demo model")
    heat = [d for d in fig.data if d.type == "heatmap"]
    assert [h.coloraxis for h in heat] == ["coloraxis", "coloraxis2"]
    for i, h in enumerate(heat):
        ca = fig.layout[h.coloraxis]
        assert ca.cmax == pytest.approx(np.abs(z[:, i]).max()) and ca.cmin == pytest.approx(-ca.cmax)
        assert ca.colorbar.orientation == "h" and "layer" in ca.colorbar.title.text
    assert [a.text for a in fig.layout.annotations] == ["layer 0", "layer 3"]  # one panel per layer
    mark = [d for d in fig.data if d.name == "beyond the null"]
    assert [d.showlegend for d in mark] == [True, False] and list(mark[1].x) == [2] and list(mark[1].y) == ["math"]
    assert len([s for s in fig.layout.shapes if s.type == "rect"]) == 2  # the muted row, in both panels
    shared = viz.expert_heatmap(z, rows=rows, scale="shared")
    assert {h.coloraxis for h in shared.data} == {"coloraxis"}
    # the DataFrame that scan.pivot_table(index="domain", columns=["layer", "expert"]) gives
    cols = pd.MultiIndex.from_tuples([(l, e) for l in (0, 3) for e in range(4)], names=["layer", "expert"])
    df = pd.DataFrame(z.reshape(3, 8), index=rows, columns=cols)
    from_df = viz.expert_heatmap(df)
    np.testing.assert_allclose(np.asarray(from_df.data[1].z), z[:, 1])
    assert from_df.layout.meta["layers"] == [0, 3] and from_df.layout.meta["rows"] == rows
    with pytest.raises(ValueError, match="rows, layers, experts"):
        viz.expert_heatmap(np.zeros((2, 4)))
    with pytest.raises(KeyError, match="marks"):
        viz.expert_heatmap(z, rows=rows, layers=[0, 3], marks=[("latex", 0, 1)])
    with pytest.raises(ValueError, match="scale"):
        viz.expert_heatmap(z, rows=rows, scale="log")


def test_traces_of_the_demo_model_say_so_in_every_figure_title():
    import torch

    import moe_lab

    torch.manual_seed(0)
    model = moe_lab.Mixtral(moe_lab.ModelArgs.from_name("tiny").replace(n_layers=2)).eval()
    plain = moe_lab.trace_routing(model, {"code": [[1, 5, 6, 7, 8]]}, progress=False)
    assert "provenance" not in plain.meta and not viz.load_heatmap(plain).layout.title.text.startswith("DEMO")
    model.is_demo = True  # what load_demo_model sets
    t = moe_lab.trace_routing(model, {"code": [[1, 5, 6, 7, 8]]}, progress=False)
    assert t.meta["provenance"] == "demo model"
    for fig in (viz.load_heatmap(t), viz.token_figure(t), viz.domain_load_bars(t), viz.coactivation_heatmap(t, 0)):
        assert fig.layout.title.text.startswith("DEMO MODEL: ")
    model.is_demo = False  # load_demo_model's random fallback
    assert moe_lab.trace_routing(model, [[1, 5, 6]], progress=False).meta["provenance"] == "random untrained model"


def test_expert_axis_labels_every_expert_in_its_colour():
    ax = viz.expert_axis(10, title="expert")
    fig = go.Figure(go.Heatmap(z=np.eye(10)))
    fig.update_yaxes(**ax)
    assert list(fig.layout.yaxis.tickvals) == list(range(10)) and fig.layout.yaxis.title.text == "expert"
    assert all(viz.expert_color(e) in t for e, t in enumerate(fig.layout.yaxis.ticktext))
