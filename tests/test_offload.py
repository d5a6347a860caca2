"""The offloading what-if (moe_lab.analysis.offload): hand-built traces with known answers."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from conftest import make_model
from moe_lab import ModelArgs
from moe_lab import analysis as A
from trace_helpers import make_trace


def brute_force_min_misses(reqs: list[int], size: int) -> int:
    """Fewest misses of any eviction policy (top-1 requests), by trying every eviction choice."""
    best = {frozenset(): 0}
    for e in reqs:
        nxt = {}
        for cache, misses in best.items():
            if e in cache:
                options = [(cache, misses)]
            elif len(cache) < size:
                options = [(cache | {e}, misses + 1)]
            else:
                options = [((cache - {v}) | {e}, misses + 1) for v in cache]
            for c, m in options:
                nxt[c] = min(m, nxt.get(c, m))
        best = nxt
    return min(best.values())


def test_cyclic_pattern_lru_thrashes_belady_does_not():
    n, size, rounds = 4, 3, 25  # experts 0 1 2 3 0 1 2 3 ... with room for 3
    reqs = [[e] for e in list(range(n)) * rounds]
    lru = A.simulate_layer_cache(reqs, size, "lru")
    opt = A.simulate_layer_cache(reqs, size, "optimal")
    assert lru.hits == 0 and lru.misses == n * rounds  # every request evicts the next one needed
    # Belady: after the 4 compulsory misses, one miss every `size` requests (it keeps 2 of the next 3)
    assert opt.misses == brute_force_min_misses([r[0] for r in reqs], size)
    assert opt.hit_rate > 0.6
    assert A.simulate_expert_cache(reqs, size, "lru") == 0.0  # the old name gives the same answer


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 4), min_size=1, max_size=14), st.integers(1, 4))
def test_belady_is_the_optimum(reqs, size):
    opt = A.simulate_layer_cache([[e] for e in reqs], size, "optimal")
    assert opt.misses == brute_force_min_misses(reqs, size)
    for policy in ("lru", "lfu"):
        assert A.simulate_layer_cache([[e] for e in reqs], size, policy).misses >= opt.misses


def test_counts_add_up_and_misses_per_token():
    rng = np.random.default_rng(0)
    reqs = np.stack([rng.choice(8, 2, replace=False) for _ in range(200)])
    for policy in A.POLICIES:
        r = A.simulate_layer_cache(reqs, 3, policy)
        assert r.hits + r.misses == r.requests == 400
        assert r.misses_per_token.sum() == r.misses and r.misses_per_token.max() <= 2
    with pytest.raises(ValueError, match="policy"):
        A.simulate_layer_cache(reqs, 3, "fifo")


def test_prefetch_that_is_always_right_leaves_no_misses():
    rng = np.random.default_rng(1)
    reqs = np.stack([rng.choice(8, 2, replace=False) for _ in range(100)])
    for policy in A.POLICIES:
        r = A.simulate_layer_cache(reqs, 2, policy, prefetch=reqs)
        assert r.misses == 0 and r.hit_rate == 1.0
        assert r.prefetched == r.useful_prefetches > 0  # every load was a needed expert
    # a prefetch that is always wrong (never the needed experts) only costs transfers
    wrong = np.stack([[e for e in range(8) if e not in row][:2] for row in reqs])
    r = A.simulate_layer_cache(reqs, 2, "lru", prefetch=wrong)
    assert r.hits == 0 and r.useful_prefetches == 0 and 0 < r.prefetched <= 200  # it even evicts the reuse


def test_placements():
    # layer 0 uses expert 3 most, then 1; layer 1 only experts 0 and 2
    l0 = [[3, 1], [3, 0], [3, 1], [2, 3]]
    l1 = [[0, 2]] * 4
    t = make_trace(np.stack([l0, l1]), E=4)
    assert A.placement(t, 2, "frequency") == {0: [1, 3], 1: [0, 2]}
    assert A.placement(t, 1, "uniform") == {0: [0], 1: [0]}
    assert A.placement(t, [1, 1], "front_loading") == {0: [0, 1], 1: []}
    df = A.simulate_offload(t, 2, "frequency")
    np.testing.assert_allclose(df.hit_rate, [6 / 8, 1.0])  # layer 0: 3 x4 + 1 x2 of 8 requests
    np.testing.assert_allclose(df.misses_per_token, [2 / 4, 0])
    df = A.simulate_offload(t, 1, "front_loading")  # 2 slots in all: experts 0, 1 of layer 0
    np.testing.assert_allclose(df.hit_rate, [3 / 8, 0.0])
    lru = A.simulate_offload(t, [2, 1], "lru")
    assert list(lru.budget) == [2, 1]
    with pytest.raises(ValueError, match="exceeds"):
        A.placement(t, 5, "frequency")
    with pytest.raises(ValueError, match="strategy"):
        A.placement(t, 1, "hottest")


def _echo_model(n_layers=3, seed=0) -> torch.nn.Module:
    """A Mixtral whose blocks add nothing (wo = w2 = 0) and share one ffn_norm and gate: every
    layer routes the embedding alone, so the next layer's router on this layer's hidden state is
    exactly what the next layer chooses."""
    model = make_model(ModelArgs.from_name("tiny", n_layers=n_layers, vocab_size=64), seed)
    with torch.no_grad():
        for b in model.blocks:
            b.attn.wo.weight.zero_()
            for ex in b.moe.experts:
                ex.w2.weight.zero_()
            b.ffn_norm.weight.copy_(model.blocks[0].ffn_norm.weight)
            b.moe.gate.weight.copy_(model.blocks[0].moe.gate.weight)
    return model.eval()


DOCS = [[1, 5, 9, 22, 7, 8, 8, 8], [1] + list(range(30, 60))]


@pytest.mark.parametrize("source", A.PREFETCH_SOURCES)
def test_speculative_prefetch_always_right_on_an_echo_model(source):
    model = _echo_model()
    pf = A.speculative_prefetch(model, DOCS, source=source)
    assert pf.layers == [1, 2] and pf.actual.shape == (2, sum(map(len, DOCS)), 2)
    np.testing.assert_array_equal(pf.recall, [1.0, 1.0])
    df = A.prefetch_hit_rates(pf, sizes=[2, 4])
    assert (df.hit_rate_prefetch == 1.0).all() and (df.hit_rate < 1.0).all()


def test_speculative_prefetch_on_a_real_model_and_the_bridge():
    pytest.importorskip("transformers")
    from conftest import make_pair

    model, hf = make_pair(ModelArgs.from_name("tiny", n_layers=3, vocab_size=64), seed=3)
    ours = A.speculative_prefetch(model, DOCS)
    theirs = A.speculative_prefetch(hf, DOCS)
    np.testing.assert_array_equal(ours.actual, theirs.actual)
    np.testing.assert_array_equal(ours.guess, theirs.guess)  # same router, same hidden state
    assert ours.layers == theirs.layers == [1, 2]
    assert 0 < ours.recall.min() and ours.recall.max() <= 1
    wide = A.speculative_prefetch(model, DOCS, n_guess=4)
    assert (wide.recall >= ours.recall).all() and wide.guess.shape[-1] == 4  # more guesses, more recall


def test_speculative_prefetch_refuses_an_id_only_trace():
    t = make_trace([[0, 1], [1, 2]], E=4)
    with pytest.raises(TypeError, match="hidden states"):
        A.speculative_prefetch(t, DOCS)


def test_bytes_model_arithmetic():
    b = A.moe_bytes("mixtral-8x7b", "fp16")
    assert b.expert == 3 * 4096 * 14336 * 2 == 352_321_536
    attn = 4096 * 4096 * 2 + 4096 * 1024 * 2
    assert b.dense == 2 * (32 * (attn + 2 * 4096 + 8 * 4096) + 32000 * 4096 + 2 * 4096)
    # total = every weight once, minus the input embedding matrix (only a row is read) + a row
    assert b.total == pytest.approx(2 * (46_702_792_704 - 32000 * 4096 + 4096))
    assert A.moe_bytes("mixtral-8x7b", "4bit").expert == pytest.approx(b.expert * 4.5 / 16)
    assert A.moe_bytes("mixtral-8x7b", 3).expert == pytest.approx(b.expert * 3 / 16)
    link = A.Link("test", 10e9, efficiency=0.5, latency=1e-3)  # 5 GB/s effective
    mem = A.Link("fast", 100e9, efficiency=1.0, latency=0.0)
    t = A.decode_time(b, misses_per_token=10, link=link, memory=mem)
    assert t["demand_s"] == pytest.approx(10 * 1e-3 + 10 * b.expert / 5e9)
    assert t["resident_s"] == pytest.approx((b.dense + (64 - 10) * b.expert) / 100e9)
    assert t["tokens_per_s"] == pytest.approx(1 / (t["resident_s"] + t["demand_s"]))
    # prefetch that fits under the resident time is free; the rest is charged
    small = A.decode_time(b, 0, link, mem, prefetched_per_token=1)
    assert small["prefetch_s"] == pytest.approx(max(0, 1e-3 + b.expert / 5e9 - small["resident_s"]))
    assert A.decode_time(b, 0, link, mem, prefetched_per_token=1, overlap=False)["prefetch_s"] == pytest.approx(
        1e-3 + b.expert / 5e9)
    with pytest.raises(ValueError, match="misses"):
        A.decode_time(b, 65, link, mem)
    with pytest.raises(ValueError, match="precision"):
        A.moe_bytes("mixtral-8x7b", "fp7")


def test_offload_table_and_calibration():
    df = A.offload_table({"lru": 0.5, "all resident": 1.0}, precisions=("fp16", "4bit"), links=("pcie4_x16",))
    assert len(df) == 4
    res = df[df.scenario == "all resident"]
    assert (res.misses_per_token == 0).all() and (res.demand_s == 0).all()
    half = df[(df.scenario == "lru") & (df.precision == "fp16")].iloc[0]
    assert half.misses_per_token == 32 and half.GB_moved_per_token == pytest.approx(32 * 0.352321536)
    cal = A.mixtral_calibration()
    assert len(cal) == len(A.MIXTRAL_PUBLISHED) and cal.source.str.len().min() > 10
    assert np.allclose(cal["predicted / published"], cal.predicted_tok_s / cal.published_tok_s)
    # the CPU-only llama.cpp row is pure arithmetic: Q4_K_M active bytes at DDR4's effective bandwidth
    cpu = cal[(cal.system == "llama.cpp") & cal.hardware.str.startswith("CPU")].iloc[0]
    b = A.moe_bytes("mixtral-8x7b", "q4_k_m")
    assert cpu.predicted_tok_s == pytest.approx(A.LINKS["ddr4"].effective / b.active)
    better = A.mixtral_calibration({"MoE-Infinity": 0.5})
    assert better.set_index("system").loc["MoE-Infinity", "predicted_tok_s"] > \
        cal.set_index("system").loc["MoE-Infinity", "predicted_tok_s"]


def test_offload_figures():
    from moe_lab import viz

    rng = np.random.default_rng(2)
    ids = np.stack([np.stack([rng.choice(8, 2, replace=False) for _ in range(60)]) for _ in range(2)])
    t = make_trace(ids, E=8)
    pc = A.policy_comparison(t, budgets=[2, 4, 8])
    assert set(pc.policy) == set(A.POLICIES + A.PLACEMENTS) and len(pc) == 18
    assert (pc[pc.budget == 8].hit_rate >= 1 - 8 / 120 - 1e-12).all()  # all experts fit: compulsory misses only
    fig = viz.offload_policy_figure(pc)
    assert len(fig.data) == 7 and list(fig.data[0].y) == pc[pc.policy == "lru"].hit_rate.tolist()
    model = _echo_model()
    ph = A.prefetch_hit_rates(A.speculative_prefetch(model, DOCS), sizes=[2])
    fig = viz.prefetch_figure(ph)
    assert list(fig.data[0].y) == [1.0, 1.0] and list(fig.data[2].y) == [1.0, 1.0]
    tab = A.offload_table(0.5, precisions=("fp16", "4bit"), links=("pcie3_x16", "ddr5"))
    fig = viz.tokens_per_second_figure(tab)
    assert len(fig.data) == 2 and fig.data[1].y[0] > fig.data[0].y[0]  # 4-bit moves fewer bytes: faster
    cal = A.mixtral_calibration()
    fig = viz.calibration_figure(cal)
    assert [d.x[0] for d in fig.data[2:]] == cal.published_tok_s.tolist()


@pytest.mark.parametrize("model_type", ["granitemoe", "olmoe", "qwen2_moe", "gpt_oss"])
def test_speculative_prefetch_on_other_transformers_moes(model_type):
    pytest.importorskip("transformers")
    from moe_lab import trace_routing
    from test_bridge import tiny_hf

    model = tiny_hf(model_type)
    trace = trace_routing(model, DOCS, progress=False)
    pf = A.speculative_prefetch(model, DOCS)
    assert pf.layers == trace.layers[1:]  # each MoE layer guessed from the previous MoE layer
    # what the guesses are scored against is what the bridge traces (an independent recording)
    np.testing.assert_array_equal(np.sort(pf.actual, -1), np.sort(trace.expert_ids[1:], -1))
    assert ((pf.recall > 0) & (pf.recall <= 1)).all()
    everything = A.speculative_prefetch(model, DOCS, n_guess=trace.n_experts, source="resid_post")
    np.testing.assert_array_equal(everything.recall, 1.0)  # guessing every expert finds them all


def test_speculative_prefetch_streams_from_disk(tmp_path):
    """On StreamingMixtral's model (blocks loaded one at a time) it gives what the in-memory model gives."""
    from moe_lab import StreamingMixtral, save_model

    model = make_model(ModelArgs.from_name("tiny", n_layers=3, vocab_size=64), 5).eval()
    save_model(model, tmp_path / "ckpt")
    ref = A.speculative_prefetch(model, DOCS)
    with StreamingMixtral(tmp_path / "ckpt") as sm:
        for source in A.PREFETCH_SOURCES:
            got = A.speculative_prefetch(sm.model, DOCS, source=source)
            want = ref if source == "resid_mid" else A.speculative_prefetch(model, DOCS, source=source)
            np.testing.assert_array_equal(got.guess, want.guess)
            np.testing.assert_array_equal(got.actual, want.actual)
        assert sm.loaded_blocks() == []


def test_speculative_prefetch_batches_equal_length_documents():
    pytest.importorskip("transformers")
    from conftest import make_pair

    docs = [[1, 5, 9, 22, 7], [1, 7, 7, 3, 2], [1, 40, 41], [1, 2, 3, 4, 5]]  # batches: 2 docs, 1, 1
    model, hf = make_pair(ModelArgs.from_name("tiny", n_layers=3, vocab_size=64), seed=4)
    for m in (model, hf):
        one = A.speculative_prefetch(m, docs, batch_size=1)
        many = A.speculative_prefetch(m, docs, batch_size=8)
        np.testing.assert_array_equal(one.actual, many.actual)
        np.testing.assert_array_equal(one.guess, many.guess)
        assert many.n_tokens_per_doc == [5, 5, 3, 5]


def test_speculative_prefetch_needs_two_layers():
    with pytest.raises(ValueError, match=">= 2 layers"):
        A.speculative_prefetch(make_model(ModelArgs.from_name("tiny", n_layers=1, vocab_size=64), 0), DOCS)


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 3), st.integers(0, 5))
def test_general_simulator_agrees_with_the_fast_one(seed, k, extra):
    """simulate_layer_cache (counts, placements, prefetch) gives stats.simulate_expert_cache's hit
    rates (the fast path for stores) for every policy and every budget >= k."""
    rng = np.random.default_rng(seed)
    E = 6
    reqs = np.stack([rng.choice(E, k, replace=False) for _ in range(60)])
    size = min(E, k + extra)
    for policy in A.POLICIES:
        assert A.simulate_layer_cache(reqs, size, policy).hit_rate == pytest.approx(
            A.simulate_expert_cache(reqs, size, policy)), (policy, size)
