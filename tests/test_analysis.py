"""Analyses on small traces whose answers are computed by hand."""

import numpy as np
import pytest

from moe_lab import analysis as A
from moe_lab.routing.trace import RoutingTrace
from trace_helpers import make_trace


def test_expert_load_both_normalisations():
    t = make_trace([[0, 1], [0, 2], [3, 0], [1, 2]])  # 4 tokens, top-2, E=4
    load = A.expert_load(t)  # assignments: counts 0:3 1:2 2:2 3:1 over 8
    np.testing.assert_allclose(load[0], [3 / 8, 2 / 8, 2 / 8, 1 / 8])
    np.testing.assert_allclose(A.expert_load(t, normalization="tokens")[0], [3 / 4, 2 / 4, 2 / 4, 1 / 4])
    np.testing.assert_allclose(A.expert_load(t, "first")[0], [2 / 4, 1 / 4, 0, 1 / 4])
    np.testing.assert_allclose(A.expert_load(t, "second")[0], [1 / 4, 1 / 4, 2 / 4, 0])
    assert A.uniform_load(t) == 1 / 4 and A.uniform_load(t, normalization="tokens") == 2 / 4


def test_load_by_domain_and_balance():
    t = make_trace([[0, 1], [0, 1], [2, 3], [2, 3]], doc_ids=[0, 0, 1, 1], domains=["code", "math"])
    by = A.expert_load_by_domain(t)
    np.testing.assert_allclose(by["code"][0], [0.5, 0.5, 0, 0])
    np.testing.assert_allclose(by["math"][0], [0, 0, 0.5, 0.5])
    bal = A.load_balance(np.array([[0.25] * 4, [1.0, 0, 0, 0]]))
    np.testing.assert_allclose(bal.cv, [0.0, np.sqrt(3)])
    np.testing.assert_allclose(bal.normalized_entropy, [1.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(bal.max_violation, [0.0, 3.0])


def test_repetition_rates_and_baselines():
    # doc 0: BOS, then firsts 1,1,2 ; doc 1: firsts 3,3. Pairs within docs, BOS excluded:
    # (1,1) same, (1,2) different, (3,3) same -> 2/3. The doc boundary pair (2,3) is not counted.
    ids = [[0, 1], [1, 0], [1, 2], [2, 1], [3, 0], [3, 1]]
    t = make_trace(ids, doc_ids=[0, 0, 0, 0, 1, 1], token_ids=[1, 5, 6, 7, 8, 9])
    r = A.repetition(t, "first", n_boot=200)
    assert r.n_pairs == 3
    np.testing.assert_allclose(r.rate, [2 / 3])
    assert r.uniform == 0.25
    p = np.bincount([0, 1, 1, 2, 3, 3], minlength=4) / 6  # marginal counts every token's first choice
    np.testing.assert_allclose(r.marginal, [(p**2).sum()])
    assert r.ci_low[0] <= r.rate[0] <= r.ci_high[0]
    ra = A.repetition(t, "any", n_boot=50)
    # top-2 sets: {1,0},{1,2} overlap; {1,2},{2,1} overlap; {3,0},{3,1} overlap -> 1
    np.testing.assert_allclose(ra.rate, [1.0])
    assert ra.uniform == pytest.approx(1 - 1 / 6)  # 1 - C(2,2)/C(4,2)


def test_repetition_detects_structure_and_random_does_not():
    rng = np.random.default_rng(0)
    N, E = 4000, 8
    runs = np.repeat(rng.integers(0, E, N // 4), 4)  # experts persist for 4 tokens
    second = (runs + 1 + rng.integers(0, E - 1, N)) % E
    sticky = make_trace(np.stack([runs, second], 1), doc_ids=np.repeat(np.arange(40), 100), E=E)
    r = A.repetition(sticky, "first", bos_id=None, n_boot=200)
    assert r.rate[0] == pytest.approx(0.75 + 0.25 / 8, abs=0.03)
    assert r.above_marginal()[0]
    assert r.shuffled[0] == pytest.approx(r.marginal[0], abs=0.03)
    first = rng.integers(0, E, N)
    rand = make_trace(np.stack([first, (first + 1) % E], 1), doc_ids=np.repeat(np.arange(40), 100), E=E)
    rr = A.repetition(rand, "first", bos_id=None, n_boot=200)
    assert not rr.above_marginal()[0]
    assert rr.ci_low[0] < rr.marginal[0] < rr.ci_high[0]


def test_coactivation_matrix():
    t = make_trace([[0, 1], [0, 1], [0, 2], [3, 2]])
    c = A.coactivation(t, 0)
    assert c[0, 1] == pytest.approx(2 / 3) and c[0, 2] == pytest.approx(1 / 3) and c[0, 3] == 0
    assert c[1, 0] == 1.0 and c[3, 2] == 1.0 and c[2, 3] == 0.5
    assert np.isnan(np.diag(c)).all()


def test_router_confidence_from_logits_and_weights():
    logits = np.log(np.array([[[0.7, 0.2, 0.1, 1e-9]]]))  # one token
    t = make_trace([[0, 1]], logits=logits.astype(np.float32))
    c = A.router_confidence(t)
    assert c.top1_prob[0, 0] == pytest.approx(0.7, abs=1e-6)
    assert c.margin[0, 0] == pytest.approx(0.5, abs=1e-6)
    p = np.array([0.7, 0.2, 0.1])
    assert c.entropy[0, 0] == pytest.approx(-(p * np.log(p)).sum(), abs=1e-5)
    t2 = make_trace([[0, 1]])
    t2.weights[:] = [[[0.8, 0.2]]]
    c2 = A.router_confidence(t2)
    assert c2.entropy is None and c2.margin[0, 0] == pytest.approx(0.6)


def test_vocabulary_and_domain_specialisation():
    # token 5 always goes to expert 2 (in its top-2); token 6 half the time to expert 0
    ids = [[2, 0], [2, 1], [2, 3], [0, 1], [3, 1]]
    t = make_trace(ids, token_ids=[5, 5, 5, 6, 6], doc_ids=[0, 0, 0, 1, 1], domains=["a", "b"])
    df = A.vocabulary_specialization(t, 0, min_count=2)
    row5 = df[df.token_id == 5].iloc[0]
    assert row5.top_expert == 2 and row5.specialization == 1.0
    row6 = df[df.token_id == 6].iloc[0]
    assert row6.top_expert == 1 and row6.specialization == 1.0  # expert 1 in both top-2 sets
    doms, m = A.domain_specialization(t, 0)
    assert doms == ["a", "b"]
    np.testing.assert_allclose(m[0], [1 / 3, 1 / 3, 1.0, 1 / 3])
    np.testing.assert_allclose(m[1], [0.5, 1.0, 0, 0.5])
    top = A.top_tokens_per_expert(t, 0, n=1, min_count=2)
    assert top[2][0][:2] == (5, 1.0)


def test_layer_transitions_and_nmi():
    a = np.array([0, 1, 2, 3] * 25)
    ids = np.stack([np.stack([a, (a + 1) % 4], 1), np.stack([(a + 2) % 4, a], 1)])  # layer 1 = shifted copy
    t = make_trace(ids)
    T = A.layer_transitions(t, 0, 1)
    np.testing.assert_allclose(T, np.roll(np.eye(4), 2, axis=1))
    nmi = A.cross_layer_nmi(t)
    assert nmi[0, 1] == pytest.approx(1.0)
    rng = np.random.default_rng(0)
    assert A.normalized_mutual_information(rng.integers(0, 8, 20000), rng.integers(0, 8, 20000), 8) < 0.01


def test_cache_simulator_hand_cases():
    reqs = [[0], [1], [0], [2], [0], [1]]
    # size 2, LRU: miss0 miss1 hit0 miss2(evict1) hit0 miss1(evict2) -> 2/6
    assert A.simulate_expert_cache(reqs, 2, "lru") == pytest.approx(2 / 6)
    # LFU: same until step 3 (evict 1: freq1 vs 0 freq2) -> at step 5 need 1: evict 2 (freq 1) -> 2/6
    assert A.simulate_expert_cache(reqs, 2, "lfu") == pytest.approx(2 / 6)
    # optimal: at step 3 evict 1 or 0? next use of 0 is 4, of 1 is 5 -> evict 1; at 5 miss -> 2/6
    assert A.simulate_expert_cache(reqs, 2, "optimal") == pytest.approx(2 / 6)
    reqs2 = [[0], [1], [2], [0], [1], [2]]
    assert A.simulate_expert_cache(reqs2, 2, "lru") == 0.0  # LRU thrashes on a cycle
    assert A.simulate_expert_cache(reqs2, 2, "optimal") == pytest.approx(2 / 6)
    assert A.simulate_expert_cache(reqs2, 3, "lru") == pytest.approx(3 / 6)


def test_cache_hit_rates_monotone_and_optimal_is_ceiling():
    rng = np.random.default_rng(1)
    ids = np.stack([rng.choice(8, 2, replace=False) for _ in range(300)])
    t = make_trace(ids, E=8)
    df = A.cache_hit_rates(t)
    for pol, g in df.groupby("policy"):
        assert np.all(np.diff(g.sort_values("cache_size").hit_rate.values) >= -1e-12), pol
    piv = df.pivot_table(index="cache_size", columns="policy", values="hit_rate")
    assert (piv["optimal"] >= piv["lru"] - 1e-12).all() and (piv["optimal"] >= piv["lfu"] - 1e-12).all()
    assert piv.loc[8].min() == pytest.approx(1 - 8 / 600)  # only the 8 cold misses


def test_generated_only_keeps_the_decode_steps():
    # doc 0: prompt of 2 tokens then 2 generated; doc 1: prompt of 1 then 1 generated
    ids = [[0, 1], [1, 2], [2, 3], [3, 0], [0, 2], [1, 3]]
    t = make_trace(ids, doc_ids=[0, 0, 0, 0, 1, 1], token_ids=[1, 5, 6, 7, 1, 8])
    t.meta["prompt_lengths"] = [2, 1]
    g = A.generated_only(t)
    np.testing.assert_array_equal(g.token_ids, [6, 7, 8])
    np.testing.assert_array_equal(g.positions, [2, 3, 1])
    np.testing.assert_array_equal(g.doc_ids, [0, 0, 1])
    np.testing.assert_array_equal(g.expert_ids[0], [[2, 3], [3, 0], [1, 3]])
    assert g.meta["prompt_lengths"] == [0, 0] and A.generated_only(g).n_tokens == 3  # idempotent
    # LRU with one slot on the decode steps of doc 0 then doc 1: needs 2,3 | 3,0 | 1,3
    # 2 miss, 3 miss (evicts 2), 3 hit, 0 miss, 1 miss, 3 miss -> 1/6
    assert A.simulate_expert_cache(g.expert_ids[0], 1, "lru") == pytest.approx(1 / 6)
    with pytest.raises(ValueError, match="prompt_lengths"):
        A.generated_only(make_trace(ids))


def test_domain_load_divergence():
    # code documents use experts 0/1, prose documents 2/3 (one layer, top-2 of 4): disjoint -> TV 1
    ids = [[0, 1], [0, 1], [1, 0], [0, 1], [2, 3], [3, 2], [2, 3], [2, 3]]
    t = make_trace(ids, doc_ids=[0, 0, 1, 1, 2, 2, 3, 3], domains=["code", "code", "prose", "prose"])
    df = A.domain_load_divergence(t, n_perm=100)
    assert list(df.domain) == ["code", "prose"] and (df.n_docs == 2).all()
    np.testing.assert_allclose(df.tv, [1.0, 1.0])
    # shuffling 4 documents into 2+2: 1/3 of the splits give the true split (TV 1), 2/3 give TV 0
    assert df.null_mean.iloc[0] == pytest.approx(1 / 3, abs=0.15)
    assert df.null_p95.iloc[0] == 1.0
    assert df.p_value.iloc[0] > 0.2  # with 4 documents, a perfect split is not even significant
    # code docs: experts 0,1,0,2 (share .5,.25,.25,0); prose docs: 0,1,0,1 -> TV = 1/2 (0 + .25 + .25 + 0) = .25
    ids2 = [[0, 1], [0, 2], [0, 1], [0, 1]]
    t2 = make_trace(ids2, doc_ids=[0, 0, 1, 1], domains=["code", "prose"])
    np.testing.assert_allclose(A.domain_load_divergence(t2, n_perm=10).tv, [0.25, 0.25])
    with pytest.raises(ValueError, match="two domains"):
        A.domain_load_divergence(make_trace(ids2, doc_ids=[0, 0, 1, 1], domains=["a", "a"]))


def test_router_saturation_never_counts_empty_slots():
    """Two empty slots (-1, a dropped token) are not the same expert."""
    import numpy as np
    from moe_lab import analysis as A
    from moe_lab.routing.trace import RoutingTrace

    def tr(ids):
        return RoutingTrace(token_ids=np.array([1, 2]), doc_ids=np.zeros(2, dtype=int), positions=np.arange(2),
                            expert_ids=np.array(ids), n_experts=4, layers=[0])

    early, final = tr([[[0, -1], [1, 2]]]), tr([[[0, -1], [2, 3]]])
    assert np.allclose(A.router_saturation(early, final), [(1 / 2 + 1 / 2) / 2])


def test_empty_slots_are_no_expert():
    """An empty slot (-1: a token dropped by a capacity, expert choice's padding) is routed to no
    expert in every statistic; the token itself still counts as an occurrence / a token."""
    l0 = [[0, 1], [0, -1], [-1, -1], [2, -1], [3, 0], [3, 1]]
    l1 = [[1, 0], [2, 1], [3, 2], [-1, -1], [0, 1], [0, 2]]
    t = make_trace([l0, l1], doc_ids=[0, 0, 0, 1, 1, 1], token_ids=[7, 7, 7, 7, 8, 8], domains=["a", "b"])
    # expert load: 8 filled slots of 12 at layer 0: counts 3, 2, 1, 2
    np.testing.assert_allclose(A.expert_load(t)[0], [3 / 8, 2 / 8, 1 / 8, 2 / 8])
    np.testing.assert_allclose(A.expert_load(t, normalization="tokens")[0], [3 / 6, 2 / 6, 1 / 6, 2 / 6])
    # vocabulary specialisation: token 7 occurs 4 times, 2 of them with expert 0 (one of them dropped)
    spec = A.vocabulary_specialization(t, 0, min_count=2).set_index("token_id")
    assert spec.loc[7, "count"] == 4 and spec.loc[7, "top_expert"] == 0
    assert spec.loc[7, "specialization"] == pytest.approx(2 / 4)
    assert spec.loc[8, "count"] == 2 and spec.loc[8, "top_expert"] == 3 and spec.loc[8, "specialization"] == 1
    top = A.top_tokens_per_expert(t, 0, n=2, min_count=2, choice="either")
    assert (7, 0.5, 4) in top[0] and (7, 0.25, 4) in top[2]
    # co-activation: chosen 0: 3, 1: 2, 2: 1, 3: 2 tokens
    c = A.coactivation(t, 0)
    np.testing.assert_allclose(c[0], [np.nan, 1 / 3, 0, 1 / 3])
    np.testing.assert_allclose(c[2], [0, 0, np.nan, 0])
    np.testing.assert_allclose(c[3], [1 / 2, 1 / 2, 0, np.nan])
    # domain specialisation: share of each domain's tokens (dropped ones included) whose top-k has the expert
    doms, ds = A.domain_specialization(t, 0)
    assert doms == ["a", "b"]
    np.testing.assert_allclose(ds, [[2 / 3, 1 / 3, 0, 0], [1 / 3, 1 / 3, 1 / 3, 2 / 3]])
    # layer transitions: only the tokens with a first choice at both layers
    np.testing.assert_allclose(A.layer_transitions(t, 0, 1), [[0, .5, .5, 0], [0] * 4, [0] * 4, [1, 0, 0, 0]])
    assert np.isfinite(A.cross_layer_nmi(t)).all()
