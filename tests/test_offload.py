"""The offloading what-if (moe_lab.analysis.offload): hand-built traces with known answers."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import moe_lab
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
    assert len(df) == 4 and set(df.link) == {"PCIe 4.0 x16"}  # the older call: one memory with each link
    assert df.fits.isna().all()  # no resident_experts: the fit is unknown, not assumed
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


def test_calibration_rows_are_modelled_as_measured():
    cal = A.mixtral_calibration()
    # rows without a free parameter come first, then the others (they stand apart)
    free = cal.free_parameter.tolist()
    assert free == sorted(free) and 0 < sum(free) < len(free)
    assert (cal[cal.free_parameter].free_parameters != "none").all()
    mo = cal[cal.system == "mixtral-offloading"].set_index("configuration")
    assert set(mo.published_tok_s) == {2.092, 1.567}  # Table 2: with and without pre-loading
    full, plain = mo.loc["2-bit experts, with pre-loading"], mo.loc["2-bit experts, without pre-loading"]
    assert full.prefetch and not plain.prefetch
    # pre-loading moves the guessed experts ahead *and* the misses its wrong guesses leave: more bytes
    assert full.GB_moved_per_token > plain.GB_moved_per_token
    # 2-bit experts, as measured (not 3-bit): 2.5 bits per weight with HQQ's scales
    run = next(r for r in A.MIXTRAL_PUBLISHED if r.tokens_per_s == 1.567)
    sizes = A.moe_bytes("mixtral-8x7b", run.expert_precision, run.dense_precision)
    assert sizes.expert == pytest.approx(3 * 4096 * 14336 * 2.5 / 8)
    t = A.decode_time(sizes, 64 * (1 - run.hit_rate), run.link, run.memory)
    assert plain.predicted_tok_s == pytest.approx(t["tokens_per_s"])
    # an estimate, not a bound: some rows run faster than estimated
    assert (cal["predicted / published"] < 1).any() and (cal["predicted / published"] > 1).any()
    # every row whose device memory is stated fits it, as the measured system did
    assert cal.fits.dropna().all() and cal.fits.notna().sum() >= 4


def test_resident_bytes_and_fits():
    b = A.moe_bytes("mixtral-8x7b", "fp16")
    kv = 2 * 32 * 8 * 128 * 2
    assert b.kv_per_token == kv == 131072  # 128 KiB per token of context
    assert b.dense_stored == pytest.approx(b.dense + 31999 * 4096 * 2)  # the whole embedding matrix is stored
    need = A.resident_bytes(b, 4, context_tokens=1000)
    assert need == pytest.approx(4 * 32 * b.expert + b.dense_stored + 1000 * kv)
    # the review's example: 4 of 8 experts per layer at fp16 (45 GB) or int8 do not fit a 24 GB RTX 3090
    t = A.offload_table({"LRU 4 of 8": 0.6}, resident_experts=4, systems=["rtx3090_pcie4"],
                        precisions=("fp16", "int8", "4bit"))
    assert t.set_index("precision").fits.to_dict() == {"fp16": False, "int8": False, "4bit": True}
    assert (t.capacity_GB == 24 * 2 ** 30 / 1e9).all()
    # the boundary: exactly the bytes needed fits, one byte less does not
    need4 = A.resident_bytes(A.moe_bytes("mixtral-8x7b", "4bit"), 4)
    at = A.offload_table(0.6, resident_experts=4, systems=["rtx3090_pcie4"], precisions=("4bit",), memory=need4)
    below = A.offload_table(0.6, resident_experts=4, systems=["rtx3090_pcie4"], precisions=("4bit",), memory=need4 - 1)
    assert bool(at.fits.iloc[0]) and not bool(below.fits.iloc[0])
    # per-scenario budgets
    t = A.offload_table({"cache": 0.7, "nothing": 0.0}, resident_experts={"cache": 8, "nothing": 0},
                        systems=["colab_t4"], precisions=("fp16",))
    assert t.set_index("scenario").fits.to_dict() == {"cache": False, "nothing": True}
    # max_resident_experts is the largest budget that fits
    for key in A.SYSTEMS:
        for prec in ("fp16", "4bit"):
            sizes, cap = A.moe_bytes("mixtral-8x7b", prec), A.SYSTEMS[key].capacity
            m = A.max_resident_experts(key, prec)
            assert A.resident_bytes(sizes, m) <= cap
            assert m == 8 or A.resident_bytes(sizes, m + 1) > cap
    with pytest.raises(ValueError, match="scenarios"):
        A.offload_table({"a": 0.5}, resident_experts={"b": 2})
    with pytest.raises(ValueError, match=r"resident_experts must be in \[0, 8\]"):
        A.resident_bytes(b, 9)


def test_systems_are_pairs_and_small_memories_are_refused():
    t = A.offload_table({"x": 0.5}, resident_experts=2, precisions=("4bit",))
    assert len(t) == len(A.SYSTEMS)  # one row per (device, link) pair, not every link with one device
    pairs = set(zip(t.memory, t.link))
    assert pairs == {(s.memory_link.name, s.miss_link.name) for s in A.SYSTEMS.values()}
    assert ("NVIDIA T4 (GDDR6)", "PCIe 3.0 x16") in pairs and not any("unified" in l for _, l in pairs)
    with pytest.raises(ValueError, match=r"smaller than the dense weights.*fp16"):
        A.offload_table(0.5, resident_experts=0, memory=2e9, precisions=("fp16",))
    with pytest.raises(ValueError, match="dense"):
        A.max_resident_experts(A.System("tiny card", "T4", 1e9, "pcie3_x16"), "4bit")
    with pytest.raises(ValueError, match="unknown system"):
        A.offload_table(0.5, systems=["rtx9090"])


def test_warm_caches_against_placements():
    rng = np.random.default_rng(3)
    ids = np.stack([np.stack([rng.choice(8, 2, replace=False) for _ in range(40)]) for _ in range(2)])
    t = make_trace(ids, E=8)
    cold = A.simulate_offload(t, 8, "lru")
    warm = A.simulate_offload(t, 8, "lru", warmup=t)  # every expert seen before: no compulsory miss
    assert (cold.hit_rate < 1).all() and (warm.hit_rate == 1).all()
    pc = A.policy_comparison(t, budgets=[8], warmup=t)
    assert (pc.hit_rate == 1).all()  # warm caches reach what the resident placements reach
    with pytest.raises(ValueError, match="warmup"):
        A.simulate_offload(t, 2, "lru", warmup=make_trace(ids[:1], E=8))


def test_provenance_travels_with_the_data(tmp_path):
    from moe_lab import viz

    fixture = moe_lab_fixture()
    tr = moe_lab.RoutingTrace.from_olmoe(fixture)
    assert A.provenance(tr) == A.SYNTHETIC_FIXTURE and A.is_stand_in(tr)
    assert A.provenance(tr.select(docs=[0])) == A.SYNTHETIC_FIXTURE
    pc = A.policy_comparison(tr.select(docs=[0]), budgets=[2, 4], policies=("lru",))
    assert pc.attrs["source"] == A.SYNTHETIC_FIXTURE
    fig = viz.offload_policy_figure(pc)
    assert fig.layout.title.text.startswith("SYNTHETIC FIXTURE: ") and fig.layout.meta["source"] == A.SYNTHETIC_FIXTURE
    # a copy of the same file elsewhere is not known to be synthetic: the label is the file's place
    other = tmp_path / "c4_results.jsonl"
    other.write_bytes(fixture.read_bytes())
    assert A.provenance(moe_lab.RoutingTrace.from_olmoe(other)) == ""
    # a model: the demo model says so; a mark on a trace survives selection and concatenation
    demo = moe_lab.load_demo_model(random_if_missing=True)
    assert A.provenance(demo) in (A.DEMO_MODEL, A.RANDOM_MODEL)
    t = A.mark(make_trace([[0, 1], [1, 2]], E=4), demo)
    assert A.provenance(t.select(docs=[0])) == A.provenance(demo)
    assert A.headline(t, "Table 5") == A.provenance(demo).upper() + ": Table 5"
    assert A.headline("Mixtral 8x7B", "Table 5") == "Table 5 (Mixtral 8x7B)" and not A.is_stand_in("Mixtral 8x7B")
    model = A.mark(_echo_model(), A.DEMO_MODEL)
    pf = A.speculative_prefetch(model, DOCS)
    assert pf.provenance == A.DEMO_MODEL
    fig = viz.prefetch_figure(A.prefetch_hit_rates(pf, sizes=[2]))
    assert fig.layout.title.text.startswith("DEMO MODEL: ") and fig.layout.yaxis.title.text
    # stamp works on any figure and does not stamp twice
    fig = viz.stamp(viz.stamp(viz.load_heatmap(tr), tr), tr)
    assert fig.layout.title.text.count("SYNTHETIC FIXTURE") == 1
    tab = A.offload_table(0.5, resident_experts=4, precisions=("4bit",), source=A.provenance(tr))
    assert "SYNTHETIC FIXTURE" in viz.tokens_per_second_figure(tab).layout.title.text


def moe_lab_fixture():
    import moe_lab

    return moe_lab.demo_model_dir().parent / "fixtures" / "traces" / "olmoe_study" / "mixtral" / "c4_results.jsonl"


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
    # rows that do not fit are never drawn: 4 of 8 experts per layer at fp16 / int8 on 24 GiB
    tab = A.offload_table(0.5, resident_experts=4, precisions=("fp16", "int8", "4bit"),
                          systems=["rtx3090_pcie4", "a100_pcie4"])
    fig = viz.tokens_per_second_figure(tab)
    drawn = {(d.name, x) for d in fig.data for x in d.x}
    assert drawn == {(p, s) for s, p, f in zip(tab.system, tab.precision, tab.fits) if f}
    assert ("fp16", "RTX 3090 24 GiB + PCIe 4.0") not in drawn and ("int8", "A100 40 GiB + PCIe 4.0") in drawn
    assert fig.layout.meta["not_drawn"] == 3 and "fp16, int8 on RTX 3090" in fig.layout.annotations[0].text
    ticks = list(fig.layout.yaxis.tickvals)  # labelled ticks on the log axis: 1, 2, 5, 10, ...
    assert ticks and set(ticks) <= set(viz._LOG_TICKS) and list(fig.layout.yaxis.ticktext) == [f"{v:g}" for v in ticks]
    a100 = tab[(tab.system == "A100 40 GiB + PCIe 4.0")].set_index("precision").tokens_per_s
    assert a100["4bit"] > a100["int8"]  # 4-bit moves fewer bytes: faster
    cal = A.mixtral_calibration()
    fig = viz.calibration_figure(cal)
    assert [d.x[0] for d in fig.data[2:]] == cal.published_tok_s.tolist()
    symbols = [d.marker.symbol for d in fig.data[2:]]
    assert symbols == ["circle-open" if f else "circle" for f in cal.free_parameter]


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


def test_notebook_09_says_where_every_figure_comes_from():
    """Every figure notebook 09 draws carries its provenance: wrapped in viz.stamp(...), titled with
    A.headline(...), or drawn by a function that reads the label from its input (the offload
    figures); the calibration figure shows published measurements, not a stand-in's."""
    import ast
    import json
    from pathlib import Path

    import moe_lab
    from moe_lab import viz

    auto = {"offload_policy_figure", "prefetch_figure", "tokens_per_second_figure", "calibration_figure"}
    not_figures = {"stamp", "setup_notebook"}
    path = Path(moe_lab.__file__).resolve().parent.parent / "notebooks" / "09_real_moes.ipynb"
    cells = [c for c in json.loads(path.read_text(encoding="utf-8"))["cells"] if c["cell_type"] == "code"]
    unlabelled, seen = [], 0
    for cell in cells:
        src = "".join(cell["source"])
        tree = ast.parse(src)
        stamped = set()
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "stamp"
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "viz"):
                stamped |= {id(a) for a in node.args}
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "viz"):
                continue
            name = node.func.attr
            if name in not_figures:
                continue
            assert callable(getattr(viz, name)), name
            seen += 1
            titled = any(k.arg == "title" and "headline" in ast.unparse(k.value) for k in node.keywords)
            if not (name in auto or id(node) in stamped or titled):
                unlabelled.append(f"viz.{name} in: {src.splitlines()[node.lineno - 1].strip()}")
    assert seen >= 10  # the notebook's figures were found
    assert not unlabelled, "figures without their provenance (wrap them in viz.stamp(fig, trace)): " + "; ".join(unlabelled)
