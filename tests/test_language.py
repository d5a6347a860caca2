"""moe_lab.analysis.language on hand-built traces with known answers."""

import numpy as np
import pytest
import torch

from conftest import make_model
from moe_lab import analysis as A
from moe_lab.model import ModelArgs
from trace_helpers import make_trace

BOS = 1


def aligned_trace(expert_of, P=5, G=3, T=6, E=8):
    """Document (p, g) = paragraph p in language g: T tokens after a BOS, every token routed to
    the two experts ``expert_of(p, g, t)``. Documents are numbered p * G + g."""
    ids, docs, toks = [], [], []
    for p in range(P):
        for g in range(G):
            d = p * G + g
            ids.append((7, 6))  # the BOS token's routing (must be ignored)
            docs.append(d)
            toks.append(BOS)
            for t in range(T):
                ids.append(expert_of(p, g, t))
                docs.append(d)
                toks.append(100 + t)
    paragraphs = [p for p in range(P) for g in range(G)]
    languages = [["en", "fr", "de"][g] for p in range(P) for g in range(G)]
    return make_trace(np.array(ids)[None], doc_ids=docs, token_ids=toks, E=E), paragraphs, languages


def test_expert_usage_counts_slots_and_ignores_bos():
    tr = make_trace(np.array([[(0, 1), (0, 2), (3, 0), (5, 6)]]), doc_ids=[0, 0, 0, 1],
                    token_ids=[BOS, 50, 51, 52], E=8)
    u = A.expert_usage(tr, bos_id=BOS)
    assert u.shape == (1, 2, 8)
    np.testing.assert_allclose(u[0, 0], [0.5, 0, 0.25, 0.25, 0, 0, 0, 0])
    np.testing.assert_allclose(u[0, 1], [0, 0, 0, 0, 0, 0.5, 0.5, 0])
    with pytest.raises(ValueError, match="no tokens besides bos_id"):
        A.expert_usage(make_trace(np.array([[(0, 1)]]), token_ids=[BOS], E=4), bos_id=BOS)


def test_similarity_measures_known_values():
    v = np.array([[0.5, 0.5, 0, 0], [0, 0.5, 0.5, 0], [0, 0, 0.5, 0.5], [0.5, 0.5, 0, 0]])
    js, cos = A.pairwise_similarity(v, "js"), A.pairwise_similarity(v, "cosine")
    # identical -> 1; half the mass shared -> JS divergence 0.5 bit and cosine 0.5; disjoint -> 0
    np.testing.assert_allclose(np.diag(js), 1)
    assert js[0, 3] == pytest.approx(1) and js[0, 1] == pytest.approx(0.5) and js[0, 2] == pytest.approx(0)
    assert cos[0, 1] == pytest.approx(0.5) and cos[0, 2] == pytest.approx(0)
    np.testing.assert_allclose(js, js.T)
    with pytest.raises(ValueError, match="'js' or 'cosine'"):
        A.pairwise_similarity(v, "euclid")


def test_routing_that_follows_content():
    tr, par, lang = aligned_trace(lambda p, g, t: (2 * (p % 4), 2 * (p % 4) + 1), P=4)  # disjoint per paragraph
    r = A.language_vs_content(tr, par, lang, n_boot=200, n_shuffle=50)
    assert r.same_content[0] == pytest.approx(1) and r.same_language[0] == pytest.approx(0)
    assert r.neither[0] == pytest.approx(0)
    assert r.content_minus_language[0] == pytest.approx(1)
    np.testing.assert_allclose(r.ci_content_minus_language[0], [1, 1])  # every paragraph agrees
    # paragraph labels shuffled within languages: a "same content" pair is the same paragraph
    # only by chance, so the baseline sits far below 1
    assert 0 <= r.shuffled_content[0] < 0.6
    assert r.shuffled_language[0] == pytest.approx(0)  # languages carry no information here


def test_routing_that_follows_language():
    tr, par, lang = aligned_trace(lambda p, g, t: (2 * g, 2 * g + 1))
    r = A.language_vs_content(tr, par, lang, measure="cosine", n_boot=200, n_shuffle=50)
    assert r.same_language[0] == pytest.approx(1) and r.same_content[0] == pytest.approx(0)
    np.testing.assert_allclose(r.ci_content_minus_language[0], [-1, -1])
    assert r.shuffled_language[0] < 0.7 and r.shuffled_content[0] == pytest.approx(0)
    assert r.languages == ["de", "en", "fr"] and r.n_paragraphs == 5


def test_mixed_routing_gives_intermediate_values_and_intervals_cover_them():
    rng = np.random.default_rng(0)
    # each token: the paragraph's expert with prob 0.6, the language's otherwise, plus a random one
    choice = rng.random((6, 3, 8)) < 0.6
    other = rng.integers(0, 8, (6, 3, 8))

    def expert_of(p, g, t):
        a = p if choice[p, g, t] else 6 + (g % 2)
        b = int(other[p, g, t])
        return (a, b if b != a else (a + 1) % 8)

    tr, par, lang = aligned_trace(expert_of, P=6, T=8)
    r = A.language_vs_content(tr, par, lang, n_boot=300, n_shuffle=30)
    for name in ("same_content", "same_language", "neither"):
        v, ci = getattr(r, name)[0], getattr(r, f"ci_{name}")[0]
        assert 0 < v < 1 and ci[0] <= v <= ci[1]
    assert r.same_content[0] > r.neither[0]


def test_grid_checks_the_design():
    with pytest.raises(ValueError, match="missing in language"):
        A.aligned_grid([0, 0, 1], ["en", "fr", "en"])
    with pytest.raises(ValueError, match="twice"):
        A.aligned_grid([0, 0, 1, 1], ["en", "en", "en", "fr"])
    grid, pars, langs = A.aligned_grid(["b", "a", "a", "b"], ["fr", "fr", "en", "en"])
    assert pars == ["a", "b"] and langs == ["en", "fr"] and grid.tolist() == [[2, 1], [3, 0]]


def test_hidden_control_when_routing_is_the_hidden_state():
    tr, par, lang = aligned_trace(lambda p, g, t: ((p + t) % 8, (g + 3 * t + 1) % 8 if (g + 3 * t + 1) % 8 != (p + t) % 8 else (p + t + 4) % 8))
    u = A.expert_usage(tr, bos_id=BOS)
    c = A.hidden_state_control(tr, u, par, lang, measure="cosine", n_boot=50, n_shuffle=10)
    assert c.r2[0] == pytest.approx(1) and c.slope[0] == pytest.approx(1) and c.intercept[0] == pytest.approx(0, abs=1e-9)
    np.testing.assert_allclose([c.residual.same_content[0], c.residual.same_language[0]], 0, atol=1e-9)


def test_hidden_control_with_unrelated_hidden_states_explains_little():
    tr, par, lang = aligned_trace(lambda p, g, t: (2 * p, 2 * p + 1), P=8, E=16)
    hidden = np.random.default_rng(1).normal(size=(1, 24, 16))
    c = A.hidden_state_control(tr, hidden, par, lang, n_boot=50, n_shuffle=10)
    assert c.r2[0] < 0.1
    assert c.residual.content_minus_language[0] == pytest.approx(1, abs=0.1)  # the content effect survives
    with pytest.raises(ValueError, match="documents"):
        A.hidden_state_control(tr, hidden[:, :10], par, lang)


def test_mean_router_inputs_are_what_the_router_sees():
    """The router is linear: gate(mean router input) == mean of the router logits."""
    args = ModelArgs(dim=32, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=16, hidden_dim=32, vocab_size=64,
                     max_seq_len=64, n_experts=4, experts_per_token=2, init_std=0.05)
    model = make_model(args)
    docs = [[BOS, 5, 9, 12, 3], [BOS, 40, 41]]
    h = A.mean_router_inputs(model, docs, bos_id=BOS)
    assert h.shape == (2, 2, 32)
    for d, ids in enumerate(docs):
        names = [f"blocks.{i}.moe.hook_router_logits" for i in range(2)]
        _, cache = model.run_with_cache(torch.tensor([ids]), names_filter=lambda n: n in names)
        for i, block in enumerate(model.blocks):
            mean_logits = cache[names[i]][1:].mean(0)  # tokens after BOS
            got = block.moe.gate(torch.as_tensor(h[i, d], dtype=torch.float32))
            torch.testing.assert_close(got, mean_logits, atol=1e-5, rtol=1e-5)


def test_figures_show_the_results():
    from moe_lab import viz

    tr, par, lang = aligned_trace(lambda p, g, t: (2 * (p % 4), 2 * (p % 4) + 1), P=4)
    r = A.language_vs_content(tr, par, lang, n_boot=100, n_shuffle=20)
    fig = viz.language_content_figure(r)
    by_name = {t.name: t for t in fig.data}
    assert set(by_name) == {"same paragraph, other language (content)", "other paragraph, same language (language)"}
    t = by_name["same paragraph, other language (content)"]
    np.testing.assert_allclose(t.y, r.content_effect)
    np.testing.assert_allclose(np.asarray(t.y) + np.asarray(t.error_y.array), r.ci_content_effect[:, 1])
    np.testing.assert_allclose(by_name["other paragraph, same language (language)"].y, r.language_effect)
    lo, hi = fig.layout.yaxis.range
    assert lo < 0 and hi > 1  # the axis shows the whole scale, from "neither" to the ceiling
    tr_o, par_o, lang_o = overlap_trace(P=4)
    r = A.language_vs_content(tr_o, par_o, lang_o, n_boot=50, n_shuffle=5)
    m = A.language_vs_content(tr_o, par_o, lang_o, n_boot=50, n_shuffle=5, mask_shared_tokens=True)
    fig_m = viz.language_content_figure(r, masked=m)
    masked = {t.name: t for t in fig_m.data}["same paragraph, other language (content), shared tokens masked"]
    np.testing.assert_allclose(masked.y, m.content_effect)
    with pytest.raises(ValueError, match="normalised effects"):
        viz.language_content_figure(A.compare_pairs(A.token_overlap(tr)[None], A.aligned_grid(par, lang)[0],
                                                    ["de", "en", "fr"], n_boot=5, n_shuffle=2))
    c = A.hidden_state_control(tr, np.random.default_rng(0).normal(size=(1, 12, 8)), par, lang, n_boot=50, n_shuffle=5)
    fig2 = viz.hidden_control_figure(c, r)
    bars = [t for t in fig2.data if t.type == "bar"]
    np.testing.assert_allclose(bars[0].y, c.r2)
    lines = {t.name: t for t in fig2.data if t.type == "scatter"}
    np.testing.assert_allclose(lines["raw routing similarity"].y, r.content_minus_language)
    np.testing.assert_allclose(lines["residuals after adjusting for the mediator (biased)"].y,
                               c.residual.content_minus_language)
    fig.to_json(), fig2.to_json()  # serialisable (notebooks save them)


# --------------------------------------------------------------------------- the noise ceiling and the effects


def test_split_halves_alternate_within_each_document_and_skip_bos():
    tr = make_trace(np.array([[(0, 1)] * 7]), doc_ids=[0, 0, 0, 0, 1, 1, 1], token_ids=[BOS, 5, 6, 7, BOS, 8, 9], E=4)
    a, b = A.split_halves(tr, bos_id=BOS)
    assert a.tolist() == [False, True, False, True, False, True, False]
    assert b.tolist() == [False, False, True, False, False, False, True]
    keep = np.array([True, True, False, True, True, True, True])
    a, b = A.split_halves(tr, bos_id=BOS, keep=keep)  # token 6 left out: 5 and 7 are now 1st and 2nd
    assert a.tolist() == [False, True, False, False, False, True, False]
    assert b.tolist() == [False, False, False, True, False, False, True]
    with pytest.raises(ValueError, match="bool array of shape"):
        A.split_halves(tr, keep=np.ones(3, bool))
    short = make_trace(np.array([[(0, 1)] * 3]), doc_ids=[0, 0, 1], token_ids=[BOS, 5, 6], E=4)
    with pytest.raises(ValueError, match="fewer than 2 counted tokens"):
        A.noise_ceiling(short, bos_id=BOS)


def test_noise_ceiling_known_values():
    # halves routed identically -> ceiling 1; halves on disjoint experts -> JS 0, ceiling 1 - 1/2
    same = make_trace(np.array([[(0, 1)] * 4]), doc_ids=[0] * 4, token_ids=[5, 6, 7, 8], E=4)
    assert A.noise_ceiling(same, bos_id=None)[0, 0] == pytest.approx(1)
    apart = make_trace(np.array([[(0, 1), (2, 3), (0, 1), (2, 3)]]), doc_ids=[0] * 4, token_ids=[5, 6, 7, 8], E=4)
    assert A.split_half_similarity(apart, bos_id=None)[0, 0] == pytest.approx(0)
    assert A.noise_ceiling(apart, bos_id=None)[0, 0] == pytest.approx(0.5)


def _pair_matrix(P, G, content, language, neither):
    """S [1, D, D] with the given value for every pair of each kind; documents p * G + g."""
    D = P * G
    p, g = np.divmod(np.arange(D), G)
    S = np.where(p[:, None] == p[None], content, np.where(g[:, None] == g[None], language, neither)).astype(float)
    np.fill_diagonal(S, 1.0)
    return S[None], np.arange(D).reshape(P, G)


def test_effects_are_normalised_between_neither_and_the_ceiling():
    S, grid = _pair_matrix(6, 3, content=0.95, language=0.92, neither=0.90)
    r = A.compare_pairs(S, grid, list("abc"), n_boot=50, n_shuffle=20, ceiling=np.full((1, 18), 0.98))
    assert r.ceiling[0] == pytest.approx(0.98)
    assert r.content_effect[0] == pytest.approx(0.05 / 0.08) and r.language_effect[0] == pytest.approx(0.02 / 0.08)
    np.testing.assert_allclose(r.ci_content_effect[0], 0.05 / 0.08)  # every paragraph agrees: a zero-width interval
    assert r.normalised(r.neither)[0] == pytest.approx(0) and r.normalised(r.ceiling)[0] == pytest.approx(1)
    # a ceiling below "neither" leaves no band to normalise by: NaN, not a sign flip
    low = A.compare_pairs(S, grid, list("abc"), n_boot=20, n_shuffle=2, ceiling=np.full((1, 18), 0.85))
    assert np.isnan(low.content_effect[0]) and np.isnan(low.language_effect[0])
    none = A.compare_pairs(S, grid, list("abc"), n_boot=20, n_shuffle=2)
    assert none.content_effect is None
    with pytest.raises(ValueError, match="no noise ceiling"):
        none.normalised(none.same_content)
    with pytest.raises(ValueError, match="ceiling must be"):
        A.compare_pairs(S, grid, list("abc"), n_boot=5, n_shuffle=2, ceiling=np.ones((1, 5)))


def test_shuffled_baselines_sit_at_their_exact_expectation():
    """Permuting paragraph labels within languages makes a 'same content' pair the same paragraph with
    probability 1/P, so the baseline's effect is content_effect / P; language labels: language_effect / G."""
    rng = np.random.default_rng(3)
    P, G = 8, 4
    S, grid = _pair_matrix(P, G, content=0.96, language=0.93, neither=0.90)
    noise = rng.normal(0, 0.01, S.shape)
    S = S + (noise + np.swapaxes(noise, 1, 2)) / 2
    r = A.compare_pairs(S, grid, list("abcd"), n_boot=20, n_shuffle=600, ceiling=np.full((1, P * G), 0.98))
    assert r.normalised(r.shuffled_content)[0] == pytest.approx(r.content_effect[0] / P, abs=0.01)
    assert r.normalised(r.shuffled_language)[0] == pytest.approx(r.language_effect[0] / G, abs=0.01)
    assert r.content_effect[0] > 0.5 and r.language_effect[0] > 0.3  # the tolerance is far below the effects


def test_resampled_content_reaches_the_noise_ceiling():
    """Each paragraph has its own expert distribution; each language version is a fresh sample of it
    and languages carry nothing: the content effect is about 1 (translations are as alike as re-samples
    of one document), the language effect about 0."""
    rng = np.random.default_rng(0)
    P, G, T, E = 10, 3, 120, 8
    dist = rng.dirichlet(np.full(E, 0.7), size=P)

    def expert_of(p, g, t):
        return tuple(rng.choice(E, 2, replace=False, p=dist[p]))

    tr, par, lang = aligned_trace(expert_of, P=P, G=G, T=T, E=E)
    r = A.language_vs_content(tr, par, lang, n_boot=300, n_shuffle=20)
    assert 0.9 < r.content_effect[0] < 1.1  # the split-half correction calibrates the top of the scale
    assert abs(r.language_effect[0]) < 0.1 and r.ci_language_effect[0, 0] < 0 < r.ci_language_effect[0, 1]
    assert r.ceiling[0] < 1  # finite samples: re-samples of one document are not identical


# --------------------------------------------------------------------------- the token-overlap control


def overlap_trace(P=6, G=3, T=16, E=8, seed=0):
    """Routing is a lookup on the token id. Every version of paragraph p contains the paragraph's
    'names' (ids shared by its translations, routed to experts 0/1 or 2/3 by paragraph parity) and
    words of its own language (routed to the language's experts 4+g); words differ per paragraph."""
    rng = np.random.default_rng(seed)
    ids, docs, toks = [], [], []
    for p in range(P):
        for g in range(G):
            d = p * G + g
            ids.append((7, 6)); docs.append(d); toks.append(BOS)
            for t in range(T):
                if t % 2 == 0:  # a name shared by the translations
                    tok, ex = 1000 + 10 * p + rng.integers(0, 3), (0, 1) if p % 2 == 0 else (2, 3)
                else:  # a word of this language and paragraph
                    tok, ex = 2000 + 100 * g + 10 * p + rng.integers(0, 5), (4 + g, 7 if g != 3 else 6)
                ids.append(ex); docs.append(d); toks.append(int(tok))
    paragraphs = [p for p in range(P) for g in range(G)]
    languages = [["en", "fr", "de"][g] for p in range(P) for g in range(G)]
    return make_trace(np.array(ids)[None], doc_ids=docs, token_ids=toks, E=E), paragraphs, languages


def test_masking_shared_tokens_removes_a_content_effect_made_of_shared_tokens():
    tr, par, lang = overlap_trace()
    keep = A.shared_token_mask(tr, par, lang, bos_id=BOS)
    assert not keep[tr.token_ids < 2000][tr.token_ids[tr.token_ids < 2000] != BOS].any()  # every name is masked
    assert keep[tr.token_ids >= 2000].all()  # no word is: the languages use different ids
    grid, _, langs = A.aligned_grid(par, lang)
    overlap = A.compare_pairs(A.token_overlap(tr, bos_id=BOS, keep=keep)[None], grid, langs, n_boot=10, n_shuffle=2)
    assert overlap.same_content[0] == 0  # once masked, translations share no token id at all
    raw = A.language_vs_content(tr, par, lang, n_boot=200, n_shuffle=20)
    masked = A.language_vs_content(tr, par, lang, n_boot=200, n_shuffle=20, mask_shared_tokens=True)
    assert raw.ci_content_effect[0, 0] > 0.3  # the names make translations look alike ...
    assert abs(masked.content_effect[0]) < 0.05  # ... and nothing else does
    assert masked.shared_tokens_masked and not raw.shared_tokens_masked and masked.dropped_paragraphs == []


def test_masking_drops_paragraphs_with_too_few_tokens_left():
    tr, par, lang = overlap_trace(P=4, T=6)
    # paragraph 0: its French version repeats the English one (an untranslated fallback)
    en, fr = (np.flatnonzero(np.asarray(tr.doc_ids) == d) for d in (0, 1))
    tr.token_ids[fr] = tr.token_ids[en]
    r = A.language_vs_content(tr, par, lang, n_boot=20, n_shuffle=5, mask_shared_tokens=True, min_tokens=2)
    assert r.dropped_paragraphs == [0] and r.n_paragraphs == 3


def test_untranslated_paragraphs_are_found():
    rows = [{"id": "a", "en": "Install the package with apt.", "fr": "Installez le paquet avec apt."},
            {"id": "b", "en": "Restart the web server now.", "fr": "Restart the web server now!"}]
    assert A.untranslated_paragraphs(rows, languages=("en", "fr")) == ["b"]
    with pytest.raises(ValueError, match="lacks"):
        A.untranslated_paragraphs([{"id": "c", "en": "x"}], languages=("en", "fr"))


def test_js_similarity_is_the_same_in_blocks():
    """Rows are computed 128 at a time: the result must not depend on where the blocks fall."""
    v = np.random.default_rng(0).dirichlet(np.ones(8), size=(2, 300))  # [L=2, D=300, E=8]
    full = A.pairwise_similarity(v, "js")
    assert full.shape == (2, 300, 300)
    one = A.pairwise_similarity(v[1, 250:260], "js")
    np.testing.assert_allclose(full[1, 250:260, 250:260], one, atol=1e-12)
    np.testing.assert_allclose(full, np.swapaxes(full, -1, -2), atol=1e-12)


def test_effect_figure_labels_intervals_beyond_its_axis():
    from moe_lab import viz

    tr, par, lang = overlap_trace(P=4)
    r = A.language_vs_content(tr, par, lang, n_boot=20, n_shuffle=2)
    r.ci_content_effect = r.ci_content_effect.copy()
    r.ci_content_effect[0, 1] = 7.5  # a nearly empty band: the ratio's interval reaches far
    fig = viz.language_content_figure(r)
    assert fig.layout.yaxis.range[1] < 2.5  # the axis stops near 2 ...
    assert any(a.text == "to 7.5" for a in fig.layout.annotations)  # ... and says where the interval ends


def test_bad_input_names_what_was_expected():
    S, grid = _pair_matrix(3, 2, content=0.9, language=0.8, neither=0.7)
    with pytest.raises(ValueError, match=r"S must be \[layers, 6, 6\]"):
        A.compare_pairs(S[:, :5, :5], grid, ["a", "b"], n_boot=5, n_shuffle=2)
    tr, par, lang = aligned_trace(lambda p, g, t: (0, 1), P=3, T=4)  # every token id is shared by all versions
    with pytest.raises(ValueError, match="no paragraph keeps 4 tokens"):
        A.language_vs_content(tr, par, lang, n_boot=5, n_shuffle=2, mask_shared_tokens=True)
    with pytest.raises(ValueError, match="labelled documents"):
        A.shared_token_mask(tr, par[:6], lang[:6])  # two whole paragraphs of three
