"""moe_lab.causal: ablation scans, DeepSeekMoE's redundancy test, contrastive experts, alternative routes."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import CONFIG_IDS, TINY_CONFIGS, make_model, random_tokens
from moe_lab import AblateExpert, StreamingMixtral, intervene, load_model, save_model, trace_routing
from moe_lab import MaskTopExperts, SteerExperts, SwapExpert
from moe_lab.causal import (ablation_scan, alternative_routes, bootstrap_mean, contrastive_experts,
                            disable_top_experts, document_losses, dose_response, mask_top_experts, paired_gap,
                            scan_cells)


def texts_for(args, seed=0):
    """Two 'domains' of token documents of different lengths (so batches are left-padded)."""
    g = torch.Generator().manual_seed(seed)
    a = [torch.randint(0, args.vocab_size // 2, (n,), generator=g).tolist() for n in (12, 9, 14)]
    b = [torch.randint(args.vocab_size // 2, args.vocab_size, (n,), generator=g).tolist() for n in (10, 13)]
    return {"low": a, "high": b}


def doc_loss(model, doc):
    with torch.no_grad():
        logits = model(torch.tensor(doc)[None])[0]
    return F.cross_entropy(logits[:-1].float(), torch.tensor(doc[1:])).item()


@pytest.mark.parametrize("args", TINY_CONFIGS, ids=CONFIG_IDS)
def test_ablation_scan_exact_and_prefix_reuse_identical(args):
    model = make_model(args, seed=31)
    texts = texts_for(args)
    kw = dict(n_boot=50, progress=False, batch_size=2)
    for mode in ("reroute", "zero"):
        fast = ablation_scan(model, texts, mode=mode, **kw)
        slow = ablation_scan(model, texts, mode=mode, reuse_prefix=False, **kw)
        assert np.array_equal(fast.delta.to_numpy(), slow.delta.to_numpy())  # same numbers, bit for bit
        assert len(fast) == args.n_layers * args.n_experts * 2
        # one row by hand
        L, e = args.n_layers - 1, 1
        row = fast[(fast.layer == L) & (fast.expert == e) & (fast.domain == "low")].iloc[0]
        base = [doc_loss(model, d) for d in texts["low"]]
        with intervene(model, AblateExpert(L, e, mode=mode)):
            abl = [doc_loss(model, d) for d in texts["low"]]
        assert math.isclose(row.base_loss, np.mean(base), abs_tol=1e-5)
        assert math.isclose(row.delta, np.mean(abl) - np.mean(base), abs_tol=1e-5)
        assert row.ci_low <= row.delta <= row.ci_high and row.n_docs == 3
    # the null: gap = delta - the largest other effect of the layer, with a paired interval
    for (L, d), g in fast.groupby(["layer", "domain"]):
        for _, r in g.iterrows():
            others = g[g.expert != r.expert].delta
            assert math.isclose(r.max_other, others.max(), abs_tol=1e-12)
            assert math.isclose(r.gap, r.delta - others.max(), abs_tol=1e-12)
            assert r.gap_low <= r.gap + 1e-12 <= r.gap_high + 2e-12
        assert (g.gap > 0).sum() <= 1 and g.beyond_null.sum() <= 1  # at most one expert per cell
    assert (fast.beyond_null == (fast.gap_low > 0) & fast.counted).all()
    assert (fast.beyond_control == fast.beyond_null).all()


def test_ablation_scan_on_partial_and_streaming_models(tmp_path):
    args = TINY_CONFIGS[3]  # 3 layers, top-2 of 4
    path = save_model(make_model(args, seed=32), tmp_path / "c")
    part = load_model(path, layers=[1, 2])
    texts = texts_for(args, seed=1)
    kw = dict(n_boot=20, progress=False, batch_size=4)
    ours = ablation_scan(part, texts, layers=[2], experts=[0, 3], **kw)
    assert set(ours.layer) == {2} and set(ours.expert) == {0, 3}
    with StreamingMixtral(path, layers=[1, 2]) as sm:
        streamed = ablation_scan(sm, texts, layers=[2], experts=[0, 3], **kw)
        assert sm.loaded_blocks() == []
    np.testing.assert_allclose(streamed.delta, ours.delta, atol=1e-6)
    doc = texts["low"][0]
    routes = alternative_routes(part, doc, 2, 6)
    red = disable_top_experts(part, texts, r_values=[0, 2], n_random=1, n_boot=10, progress=False)
    con = contrastive_experts(part, texts["low"], texts["high"], n_boot=10)
    assert set(con.layer) == {1, 2}
    with StreamingMixtral(path, layers=[1, 2]) as sm:
        s_routes = alternative_routes(sm, doc, 2, 6)
        s_red = disable_top_experts(sm, texts, r_values=[0, 2], n_random=1, n_boot=10, progress=False)
        s_con = contrastive_experts(sm, texts["low"], texts["high"], n_boot=10)
        assert sm.loaded_blocks() == []
    np.testing.assert_allclose(s_routes.logprob, routes.logprob, atol=1e-6)
    assert list(s_routes.experts) == list(routes.experts)
    np.testing.assert_allclose(s_red.loss, red.loss, atol=1e-6)
    np.testing.assert_allclose(s_con.risk_diff, con.risk_diff, atol=0)
    with pytest.raises(ValueError, match=r"layer 0 is not in this model \(its layers: \[1, 2\]\)"):
        ablation_scan(part, texts, layers=[0], **kw)
    with pytest.raises(ValueError, match="unknown mode"):
        ablation_scan(part, texts, mode="swap", **kw)
    with pytest.raises(ValueError, match=r"expert 4 is outside \[0, 4\)"):
        ablation_scan(part, texts, experts=[4], **kw)
    with pytest.raises(TypeError, match="mapping domain"):
        ablation_scan(part, texts["low"], **kw)


def test_disable_top_experts():
    args = TINY_CONFIGS[1]  # top-2 of 8
    model = make_model(args, seed=33)
    texts = texts_for(args, seed=2)
    df = disable_top_experts(model, texts, r_values=[0, 2, 7], n_random=2, n_boot=20, progress=False)
    assert len(df) == 3 * 2 * 2 and (df.selected_on == "the scored texts").all()
    r0 = df[df.r == 0]
    for d, g in r0.groupby("domain"):  # r = 0 is the plain model for both kinds
        assert g.loss.nunique() == 1
        assert math.isclose(g.loss.iloc[0], np.mean([doc_loss(model, x) for x in texts[d]]), abs_tol=1e-5)
    # r = 2 "top": the two most-routed experts of every layer (over all the texts) switched off
    docs = texts["low"] + texts["high"]
    t = trace_routing(model, docs, progress=False)
    top = [np.argsort(-np.bincount(t.expert_ids[L].ravel(), minlength=8), kind="stable")[:2].tolist()
           for L in range(args.n_layers)]
    with intervene(model, *[AblateExpert(L, es) for L, es in enumerate(top)]):
        want = np.mean([doc_loss(model, x) for x in texts["high"]])
    row = df[(df.r == 2) & (df.kind == "top") & (df.domain == "high")].iloc[0]
    assert math.isclose(row.loss, want, abs_tol=1e-5)
    base = np.mean([doc_loss(model, x) for x in texts["high"]])
    assert math.isclose(row.delta, want - base, abs_tol=1e-5) and row.delta_low <= row.delta <= row.delta_high
    # displaced: the share of the high documents' (token, layer, slot) assignments the disabled experts held
    th = trace_routing(model, texts["high"], progress=False)
    shares = [np.mean([np.isin(th.expert_ids[L][th.doc_ids == i], top[L]).mean() for L in range(args.n_layers)])
              for i in range(len(texts["high"]))]
    assert math.isclose(row.displaced, np.mean(shares), abs_tol=1e-9)
    assert math.isclose(row.delta_per_displaced, row.delta / row.displaced, rel_tol=1e-9)
    assert row.dpd_low <= row.delta_per_displaced <= row.dpd_high
    # r = 7 of 8: only the slots of the one expert left stay put
    assert df[df.r == 0].displaced.eq(0).all() and df[df.r == 7].displaced.between(0.75, 1.0).all()
    # the busy experts chosen on other texts: ranked on those
    other = texts_for(args, seed=9)
    df2 = disable_top_experts(model, texts, r_values=[2], n_random=1, n_boot=20, select_texts=other, progress=False)
    t2 = trace_routing(model, other["low"] + other["high"], progress=False)
    top2 = [np.argsort(-np.bincount(t2.expert_ids[L].ravel(), minlength=8), kind="stable")[:2].tolist()
            for L in range(args.n_layers)]
    with intervene(model, *[AblateExpert(L, es) for L, es in enumerate(top2)]):
        want2 = np.mean([doc_loss(model, x) for x in texts["low"]])
    row2 = df2[(df2.kind == "top") & (df2.domain == "low")].iloc[0]
    assert math.isclose(row2.loss, want2, abs_tol=1e-5) and row2.selected_on == "other texts"
    with pytest.raises(ValueError, match=r"r=8 is outside \[0, 7\]"):
        disable_top_experts(model, texts, r_values=[8], progress=False)


def test_contrastive_experts():
    args = TINY_CONFIGS[2]  # top-3 of 8
    model = make_model(args, seed=34)
    texts = texts_for(args, seed=3)
    df = contrastive_experts(model, texts["low"], texts["high"], n_boot=50)
    assert len(df) == args.n_layers * args.n_experts
    assert (np.diff(df.risk_diff) <= 0).all() and list(df["rank"]) == list(range(1, len(df) + 1))
    ta = trace_routing(model, texts["low"], progress=False)
    tb = trace_routing(model, texts["high"], progress=False)
    for _, r in df.head(3).iterrows():
        ra = (ta.expert_ids[int(r.layer)] == r.expert).any(-1).mean()
        rb = (tb.expert_ids[int(r.layer)] == r.expert).any(-1).mean()
        assert math.isclose(r.rate_a, ra, abs_tol=1e-12) and math.isclose(r.risk_diff, ra - rb, abs_tol=1e-12)
        assert r.ci_low <= r.risk_diff <= r.ci_high
    # each layer's rates sum to k (every token uses k experts)
    np.testing.assert_allclose(df.groupby("layer").rate_a.sum(), args.experts_per_token)
    # the interval: documents resampled with their own token counts (a document-level bootstrap by hand)
    rng = np.random.default_rng(0)
    L0, e0 = int(df.layer[0]), int(df.expert[0])
    hits_a = [(ta.expert_ids[L0][ta.doc_ids == i] == e0).any(-1) for i in range(3)]
    hits_b = [(tb.expert_ids[L0][tb.doc_ids == i] == e0).any(-1) for i in range(2)]
    boots = [np.concatenate([hits_a[i] for i in rng.integers(0, 3, 3)]).mean()
             - np.concatenate([hits_b[i] for i in rng.integers(0, 2, 2)]).mean() for _ in range(50)]
    np.testing.assert_allclose([df.ci_low[0], df.ci_high[0]], np.quantile(boots, [0.025, 0.975]), atol=1e-12)
    same = contrastive_experts(model, texts["low"], texts["low"], n_boot=20)
    assert (same.risk_diff == 0).all()


@pytest.mark.parametrize("args", TINY_CONFIGS, ids=CONFIG_IDS)
def test_alternative_routes_router_choice_equals_plain_model(args):
    model = make_model(args, seed=35)
    tokens = random_tokens(args, 1, 11, seed=8)
    L, pos = args.n_layers - 1, 6
    df = alternative_routes(model, tokens, L, pos)
    assert len(df) == math.comb(args.n_experts, args.experts_per_token)
    assert df.router_choice.sum() == 1 and (np.diff(df.logprob) <= 0).all()
    with torch.no_grad():
        plain = model(tokens)[0, pos].float().log_softmax(-1)[tokens[0, pos + 1]].item()
    own = df[df.router_choice].iloc[0]
    assert math.isclose(own.logprob, plain, abs_tol=1e-5) and math.isclose(df.attrs["plain_logprob"], plain, abs_tol=1e-6)
    _, cache = model.run_with_cache(tokens, names_filter=["topk_indices", "router_probs"])
    assert own.experts == tuple(sorted(cache["topk_indices", L][pos].tolist()))
    # the worst route by hand: replace the MoE output of that token with the mixture written out
    alt = df[~df.router_choice].iloc[-1]
    probs = cache["router_probs", L][pos]
    w = probs[list(alt.experts)] / probs[list(alt.experts)].sum()
    np.testing.assert_allclose(alt.weights, w.numpy(), atol=1e-6)
    _, c2 = model.run_with_cache(tokens, names_filter=f"blocks.{L}.hook_resid_mid")
    block = model.blocks[L]
    with torch.no_grad():
        x = block.ffn_norm(c2["resid_mid", L][0, pos])[None]
        mixture = sum(wi * block.moe.experts[e](x)[0] for e, wi in zip(alt.experts, w))

        def replace(out, hook):
            out = out.clone()
            out[0, pos] = mixture
            return out
        with model.hooks(fwd_hooks=[(f"blocks.{L}.hook_moe_out", replace)]):
            by_hand = model(tokens[:, :pos + 1])[0, -1].float().log_softmax(-1)[tokens[0, pos + 1]].item()
    assert math.isclose(alt.logprob, by_hand, abs_tol=1e-5)
    if args.experts_per_token < args.n_experts:
        assert df.logprob.nunique() > 1  # the routes differ
    with pytest.raises(ValueError, match="has no next token"):
        alternative_routes(model, tokens, L, 10)


def test_bootstrap_mean():
    m, lo, hi = bootstrap_mean(np.array([1.0, 2.0, 3.0, 4.0]), n_boot=500)
    assert m == 2.5 and 1.0 <= lo < m < hi <= 4.0
    m, lo, hi = bootstrap_mean(np.full(5, 7.0))
    assert m == lo == hi == 7.0


def test_document_losses():
    args = TINY_CONFIGS[2]
    model = make_model(args, seed=36)
    texts = texts_for(args, seed=4)
    df = document_losses(model, texts, batch_size=2)
    assert list(df.domain) == ["low"] * 3 + ["high"] * 2 and list(df.doc) == [0, 1, 2, 0, 1]
    np.testing.assert_allclose(df.loss, [doc_loss(model, d) for ds in texts.values() for d in ds], atol=1e-5)
    sw = document_losses(model, texts, interventions=[SwapExpert(0, 1, 2)])
    with intervene(model, SwapExpert(0, 1, 2)):
        np.testing.assert_allclose(sw.loss, [doc_loss(model, d) for ds in texts.values() for d in ds], atol=1e-5)


# --------------------------------------------------------------------------------------------
# issue 23: the null of the scan, the per-token redundancy test, dose-response, mean ablation


def test_scan_null_by_hand_sources_and_cells():
    args = TINY_CONFIGS[3]  # 3 layers, top-2 of 4
    model = make_model(args, seed=41)
    texts = texts_for(args, seed=5)
    scan = ablation_scan(model, texts, layers=[2], n_boot=200, seed=3, progress=False, batch_size=4,
                         n_sources={"low": 3, "high": 1})
    assert set(scan[scan.domain == "high"].counted) == {False} and set(scan[scan.domain == "low"].counted) == {True}
    assert not scan[scan.domain == "high"].beyond_null.any()  # a domain from 1 source is never counted
    # the paired bootstrap by hand for the low domain
    g = scan[scan.domain == "low"].sort_values("expert")
    base = np.array([doc_loss(model, d) for d in texts["low"]])
    D = []
    for e in range(args.n_experts):
        with intervene(model, AblateExpert(2, e)):
            D.append(np.array([doc_loss(model, d) for d in texts["low"]]) - base)
    D = np.stack(D, 1)  # (3 docs, 4 experts)
    np.testing.assert_allclose(g.delta, D.mean(0), atol=1e-5)
    boot = D[np.random.default_rng(3).integers(0, 3, size=(200, 3))].mean(1)
    for e in range(args.n_experts):
        others = [x for x in range(args.n_experts) if x != e]
        lo, hi = np.quantile(boot[:, e] - boot[:, others].max(1), [0.025, 0.975])
        row = g[g.expert == e].iloc[0]
        assert math.isclose(row.gap_low, lo, abs_tol=1e-5) and math.isclose(row.gap_high, hi, abs_tol=1e-5)
    cells = scan_cells(scan)
    assert len(cells) == 2 and set(cells.domain) == {"low", "high"}
    for _, c in cells.iterrows():
        sub = scan[(scan.layer == c.layer) & (scan.domain == c.domain)]
        assert c.expert == sub.loc[sub.delta.idxmax(), "expert"]
    with pytest.raises(ValueError, match="n_sources has no entry for domain 'high'"):
        ablation_scan(model, texts, layers=[2], n_sources={"low": 3}, progress=False)
    with pytest.raises(ValueError, match="column 'gap' is missing"):
        scan_cells(scan.drop(columns="gap"))


def test_paired_gap_finds_a_planted_effect():
    """One column made clearly larger is beyond the null; with no planted effect, none is."""
    rng = np.random.default_rng(0)
    D = rng.normal(0.0, 0.01, size=(12, 8)) + rng.normal(0.0, 0.05, size=(12, 1))  # shared document noise
    gap, lo, hi = paired_gap(D, 500)
    assert not (lo > 0).any() and (gap > 0).sum() == 1
    D[:, 5] += 0.05
    gap, lo, hi = paired_gap(D, 500)
    assert lo[5] > 0 and (lo > 0).sum() == 1 and np.all(lo <= gap) and np.all(gap <= hi)
    # paired: the shared document noise cancels; unpaired intervals of the means overlap
    m5 = bootstrap_mean(D[:, 5], 500)
    m_other = max(bootstrap_mean(D[:, j], 500)[2] for j in range(8) if j != 5)
    assert m5[1] < m_other
    with pytest.raises(ValueError, match="needs effects"):
        paired_gap(np.zeros(4))


def test_mean_ablation_scan():
    args = TINY_CONFIGS[1]
    model = make_model(args, seed=43)
    texts = texts_for(args, seed=6)
    reference = [random_tokens(args, 1, 24, seed=s)[0].tolist() for s in range(10, 16)]
    scan = ablation_scan(model, texts, layers=[1], experts=[2], mode="mean", reference=reference, n_boot=20,
                         progress=False)
    with intervene(model, AblateExpert(1, 2, mode="mean", reference=reference)):
        want = np.mean([doc_loss(model, d) for d in texts["low"]])
    row = scan[scan.domain == "low"].iloc[0]
    assert math.isclose(row.ablated_loss, want, abs_tol=1e-5) and row["mode"] == "mean"
    with pytest.raises(ValueError, match="mode='mean'\\) needs reference="):
        ablation_scan(model, texts, mode="mean", progress=False)


def test_mask_top_experts_curve():
    args = TINY_CONFIGS[1]  # top-2 of 8
    model = make_model(args, seed=44)
    texts = texts_for(args, seed=7)
    df = mask_top_experts(model, texts, r_values=[0, 1, 6], n_boot=20, progress=False)
    assert len(df) == 3 * 2 * 2
    assert (df[df.r == 0].delta.abs() < 1e-12).all()
    with intervene(model, MaskTopExperts(1)):
        want = np.mean([doc_loss(model, d) for d in texts["high"]])
    row = df[(df.r == 1) & (df.kind == "top") & (df.domain == "high")].iloc[0]
    assert math.isclose(row.loss, want, abs_tol=1e-5) and row.delta_low <= row.delta <= row.delta_high
    assert abs(row.delta) > 1e-6  # it did something (on a random model, in either direction)
    rnd = df[(df.kind == "random") & (df.r == 6)]
    assert len(rnd) == 2 and (rnd.delta.abs() > 1e-6).all()
    with pytest.raises(ValueError, match=r"r=7 is outside \[0, 6\]"):
        mask_top_experts(model, texts, r_values=[7], progress=False)


def test_dose_response():
    args = TINY_CONFIGS[1]
    model = make_model(args, seed=45)
    texts = texts_for(args, seed=8)
    df = dose_response(model, texts, lambda d: [SteerExperts(0, {1: d})], [0.0, 3.0], n_boot=20, progress=False)
    assert len(df) == 4 and (df[df.dose == 0].delta == 0).all()
    plain = np.mean([doc_loss(model, d) for d in texts["low"]])
    with intervene(model, SteerExperts(0, {1: 3.0})):
        steered = np.mean([doc_loss(model, d) for d in texts["low"]])
    row = df[(df.dose == 3.0) & (df.domain == "low")].iloc[0]
    assert math.isclose(row.delta, steered - plain, abs_tol=1e-5) and row.delta != 0
