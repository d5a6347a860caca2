"""The on-disk trace store (moe_lab.routing.store) and the analyses that run over it in chunks:
identical results to the in-memory path, whatever the chunking."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from moe_lab import RoutingTrace
from moe_lab import analysis as A
from moe_lab.analysis import stats
from moe_lab.routing.importers import RoutedDocument
from moe_lab.routing.store import TraceStore, TraceWriter, open_store, save_store


def synthetic(n_docs=23, L=3, k=2, E=8, seed=0, weights=False, vocab=40):
    """Documents of uneven lengths (1..60 tokens), BOS first, sticky Zipf-like routing, three
    domains, prompt lengths for generated tails."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 60, n_docs)
    N = int(lengths.sum())
    p = 1 / np.arange(1, E + 1)
    p /= p.sum()
    ids = np.zeros((L, N, k), dtype=np.int64)
    for l in range(L):
        for t in range(N):
            first = ids[l, t - 1, 0] if t and rng.random() < 0.3 else rng.choice(E, p=p)
            rest = rng.choice([e for e in range(E) if e != first], k - 1, replace=False)
            ids[l, t] = [first, *rest]
    tok = rng.integers(2, vocab, N)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    tok[starts] = 1
    w = None
    if weights:
        w = rng.random((L, N, k)).astype(np.float32)
        w /= w.sum(-1, keepdims=True)
    doms = ["code", "prose", "math"]
    return RoutingTrace(token_ids=tok, doc_ids=np.repeat(np.arange(n_docs), lengths),
                        positions=np.concatenate([np.arange(n) for n in lengths]), expert_ids=ids, weights=w,
                        domains=[doms[i % 3] for i in range(n_docs)], n_experts=E,
                        meta={"prompt_lengths": [int(n) // 2 for n in lengths], "model": "synthetic"})


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(stats, "CHUNK_TOKENS", 50)  # many chunks, documents cut nowhere


def test_round_trip_and_manifest(tmp_path):
    t = synthetic(weights=True)
    path = save_store(t, tmp_path / "s", shard_tokens=200)
    st = open_store(path)
    m = json.loads((path / "manifest.json").read_text())
    assert m["format"] == "moe_lab.routing_store" and m["columns"]["expert_ids"]["dtype"] == "|i1"  # 8 experts: int8 (-1 = empty)
    assert len(m["shards"]) > 2 and m["n_tokens"] == t.n_tokens and m["model"] == "synthetic"
    assert (st.n_tokens, st.n_docs, st.layers, st.top_k, st.n_experts) == (t.n_tokens, t.n_docs, t.layers, 2, 8)
    assert st.domains == t.domains and st.domain_names == t.domain_names and not st.ids_only
    assert np.load(path / "shard-000000" / "expert_ids.npy", mmap_mode="r").dtype == np.int8
    back = st.to_trace()
    for f in ("token_ids", "doc_ids", "positions", "expert_ids", "weights"):
        assert np.array_equal(getattr(back, f), getattr(t, f)), f
    assert back.meta["prompt_lengths"] == t.meta["prompt_lengths"] and back.domains == t.domains
    assert np.array_equal(st.is_generated, t.is_generated)
    head = st.to_trace(max_tokens=100)
    assert head.n_tokens <= 100 and np.array_equal(head.expert_ids, t.expert_ids[:, :head.n_tokens])
    some = st.to_trace(docs=[1, 2, 7])
    assert np.array_equal(some.expert_ids, t.select(docs=[1, 2, 7]).expert_ids)
    # chunks are whole documents and cover everything once
    seen = 0
    for c, d0, t0 in st.iter_chunks(37, progress=False):
        assert t0 == seen and c.n_tokens == st.doc_lengths[d0:d0 + c.n_docs].sum()
        assert np.array_equal(c.expert_ids, t.expert_ids[:, t0:t0 + c.n_tokens])
        seen += c.n_tokens
    assert seen == t.n_tokens
    assert np.array_equal(st.column("expert_ids", layer=2), t.expert_ids[2])


def test_chunked_analyses_identical_to_in_memory(tmp_path, small_chunks):
    t = synthetic()
    st = open_store(save_store(t, tmp_path / "s", shard_tokens=300))
    for choice in ("first", "second", "either"):
        for norm in ("assignments", "tokens"):
            assert np.array_equal(A.expert_load(st, choice, norm), A.expert_load(t, choice, norm))
    by_s, by_t = A.expert_load_by_domain(st), A.expert_load_by_domain(t)
    assert list(by_s) == list(by_t) and all(np.array_equal(by_s[d], by_t[d]) for d in by_t)
    for kind in ("first", "any"):
        rs, rt = A.repetition(st, kind, n_boot=200, n_marginal_pairs=5000), A.repetition(t, kind, n_boot=200,
                                                                                           n_marginal_pairs=5000)
        for f in ("rate", "ci_low", "ci_high", "marginal", "shuffled"):
            assert np.array_equal(getattr(rs, f), getattr(rt, f)), (kind, f)
        assert rs.n_pairs == rt.n_pairs and rs.uniform == rt.uniform
    for layer in t.layers:
        assert np.array_equal(A.coactivation(st, layer), A.coactivation(t, layer), equal_nan=True)
        ds, dt = A.domain_specialization(st, layer), A.domain_specialization(t, layer)
        assert ds[0] == dt[0] and np.array_equal(ds[1], dt[1])
        pd.testing.assert_frame_equal(A.vocabulary_specialization(st, layer, 2), A.vocabulary_specialization(t, layer, 2))
        assert A.top_tokens_per_expert(st, layer, 3, 2) == A.top_tokens_per_expert(t, layer, 3, 2)
    pd.testing.assert_frame_equal(A.cache_hit_rates(st, sizes=[2, 3], generated=True),
                                  A.cache_hit_rates(A.generated_only(t), sizes=[2, 3]))
    pd.testing.assert_frame_equal(A.cache_hit_rates(st, sizes=[3], layers=[1]), A.cache_hit_rates(t, sizes=[3], layers=[1]))


def test_chunked_repetition_counts_match_a_direct_count(tmp_path, small_chunks):
    t = synthetic(seed=3)
    st = open_store(save_store(t, tmp_path / "s", shard_tokens=120))
    r = A.repetition(st, "first", n_boot=50)
    ids = t.expert_ids[:, :, 0]
    ok = (t.doc_ids[1:] == t.doc_ids[:-1]) & (t.token_ids[:-1] != 1)  # same document, BOS excluded
    np.testing.assert_allclose(r.rate, (ids[:, 1:] == ids[:, :-1])[:, ok].mean(1))
    assert r.n_pairs == ok.sum()
    assert (r.ci_low <= r.rate).all() and (r.rate <= r.ci_high).all()


def test_store_refuses_weight_analyses_and_serves_in_memory_ones(tmp_path):
    t = synthetic()
    t.weights = None
    st = open_store(save_store(t, tmp_path / "s"))
    assert st.ids_only and not (tmp_path / "s" / "shard-000000" / "weights.npy").exists()
    assert isinstance(st, RoutingTrace)  # one type: a store is a RoutingTrace read from disk
    with pytest.raises(ValueError, match="router_confidence needs the router's weights or router_logits"):
        A.router_confidence(st)
    assert np.array_equal(A.cross_layer_nmi(st), A.cross_layer_nmi(t))  # its arrays, memory-mapped
    assert A.repetition(st, n_boot=10).ids_only


def test_save_load_is_the_chunked_form_memory_mapped(tmp_path):
    t = synthetic(weights=True)
    t.pieces = [f"p{i}" for i in range(t.n_tokens)]
    t.meta["doc_checkpoints"] = ["main" if d % 2 else "step5000" for d in range(t.n_docs)]
    path = t.save(tmp_path / "trace")
    assert (path / "manifest.json").exists() and len(list(path.glob("shard-*"))) == 1
    back = RoutingTrace.load(path)
    assert isinstance(back, RoutingTrace) and isinstance(back, TraceStore)
    assert isinstance(back._whole_column("expert_ids"), np.memmap)  # nothing copied into memory
    assert back.expert_ids.dtype == np.int8 and back.token_ids.dtype == np.int32  # one byte an id
    for f in ("token_ids", "doc_ids", "positions", "expert_ids", "weights"):
        assert np.array_equal(getattr(back, f), getattr(t, f)), f
    assert back.pieces == t.pieces and back.domains == t.domains and back.rank_ordered
    assert back.to_trace(docs=[2, 5]).pieces == t.select(docs=[2, 5]).pieces
    assert back.meta["prompt_lengths"] == t.meta["prompt_lengths"]
    assert back.meta["doc_checkpoints"] == t.meta["doc_checkpoints"]
    sub = back.select(docs=[3, 4])
    assert sub.meta["doc_checkpoints"] == ["main", "step5000"] and np.array_equal(
        sub.expert_ids, t.select(docs=[3, 4]).expert_ids)
    # rank order survives save/load, slicing, concatenation and the store's chunks
    t.rank_ordered = False
    t.meta["rank_order_reason"] = "grouped top-k"
    u = RoutingTrace.load(t.save(tmp_path / "trace"))  # saved again over the old one
    assert not u.rank_ordered and not u.select(docs=[0]).rank_ordered and not u.to_trace(max_tokens=50).rank_ordered
    assert not A.generated_only(u).rank_ordered
    assert not RoutingTrace.concat([t.select(docs=[0]), synthetic().select(docs=[1])]).rank_ordered
    assert all(not c.rank_ordered for c, _, _ in u.iter_chunks(100, progress=False))
    assert json.loads((tmp_path / "trace" / "manifest.json").read_text())["rank_ordered"] is False
    with pytest.raises(ValueError, match=r"repetition\(kind='first'\) reads the first choice .* not rank-ordered "
                                         r"\(grouped top-k\).*repetition\(trace, 'any'\)"):
        A.repetition(u, "first")
    assert A.repetition(u, "any", n_boot=10).n_pairs > 0
    # a directory that is not a trace is never overwritten
    (tmp_path / "other").mkdir()
    with pytest.raises(FileExistsError, match="not a saved routing trace"):
        t.save(tmp_path / "other")


def test_old_safetensors_traces_still_load(tmp_path):
    from safetensors.numpy import save_file

    t = synthetic()
    arrays = {"token_ids": t.token_ids.astype(np.int64), "doc_ids": t.doc_ids.astype(np.int64),
              "positions": t.positions.astype(np.int64), "expert_ids": t.expert_ids.astype(np.int64)}
    header = {"format_version": 1, "domains": t.domains, "layers": t.layers, "n_experts": 8, "pieces": None,
              "meta": {"engine": "vllm", "prompt_lengths": t.meta["prompt_lengths"]}}  # written by moe_lab <= 83a1713
    save_file(arrays, str(tmp_path / "old.safetensors"), metadata={"moe_lab_routing_trace": json.dumps(header)})
    old = RoutingTrace.load(tmp_path / "old.safetensors")
    assert np.array_equal(old.expert_ids, t.expert_ids) and old.expert_ids.dtype == np.uint8
    assert not old.rank_ordered  # an engine trace from before rank_ordered: order unknown


def test_writer_resumes_and_never_leaves_half_written_shards(tmp_path):
    path = tmp_path / "s"
    rng = np.random.default_rng(0)

    def doc(i, T=5):
        return RoutedDocument(token_ids=np.arange(T), expert_ids=rng.integers(0, 4, (T, 2, 1)), positions=np.arange(T),
                              prompt_length=3, domain="d", source=f"request {i}")

    with pytest.raises(RuntimeError):
        with TraceWriter(path, n_experts=4, top_k=1, layers=[0, 1], shard_tokens=10, engine="test") as w:
            for i in range(3):
                w.add(doc(i))  # 2 documents = 10 tokens -> a shard; the 3rd stays buffered
            w.flush({"lines": [0, 3]})
            w.add(doc(3))
            raise RuntimeError("killed")  # the buffered document is dropped, the store stays valid
    (path / ".tmp-crashed").mkdir()  # a shard being written when the process died
    (path / "shard-000099").mkdir()  # renamed, but the manifest never listed it
    st = open_store(path)
    assert st.n_docs == 3 and st.n_tokens == 15 and [s["info"] for s in st.manifest["shards"]] == [{}, {"lines": [0, 3]}]
    w = TraceWriter(path, n_experts=4, top_k=1, layers=[0, 1], shard_tokens=10)
    assert not (path / ".tmp-crashed").exists() and not (path / "shard-000099").exists()
    assert w.shards[-1]["info"] == {"lines": [0, 3]}  # where to resume
    w.add(doc(4))
    w.close()
    assert open_store(path).n_docs == 4
    with pytest.raises(ValueError, match="already holds a trace with top_k=1, cannot append one with top_k=2"):
        TraceWriter(path, n_experts=4, top_k=2, layers=[0, 1])
    with pytest.raises(ValueError, match=r"request 9: expert ids have shape \[5, 3, 1\], expected \[5, 2, 1\]"):
        w.add(RoutedDocument(np.arange(5), np.zeros((5, 3, 1), int), np.arange(5), 5, source="request 9"))
    with pytest.raises(ValueError, match=r"request 8: expert ids must be in \[0, 4\) or -1 \(an empty slot\), found 0..4"):
        w.add(RoutedDocument(np.arange(2), np.array([[[0], [4]]] * 2), np.arange(2), 2, source="request 8"))


def test_store_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a moe_lab trace store"):
        TraceStore(tmp_path)
    path = save_store(synthetic(), tmp_path / "s")
    f = path / "shard-000000" / "token_ids.npy"
    f.write_bytes(f.read_bytes()[:100])  # truncated column
    st = open_store(path)
    with pytest.raises(ValueError, match=r"token_ids.npy (is not a readable .npy file|has \d+ rows)"):
        st.to_trace()
    (path / "manifest.json").write_text('{"format": "other"}')
    with pytest.raises(ValueError, match="format 'other', expected 'moe_lab.routing_store'"):
        open_store(path)
    with pytest.raises(FileExistsError):
        save_store(synthetic(), tmp_path / "s2") and save_store(synthetic(), tmp_path / "s2")


def test_pandas_chunks_and_parquet(tmp_path):
    t = synthetic(n_docs=5)
    st = open_store(save_store(t, tmp_path / "s"))
    df = pd.concat(list(st.iter_pandas(chunk_tokens=20, progress=False)), ignore_index=True)
    pd.testing.assert_frame_equal(df, t.to_pandas())
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install pyarrow"):
            st.to_parquet(tmp_path / "t.parquet")
        assert not list(tmp_path.glob("*.parquet*"))
    else:
        out = st.to_parquet(tmp_path / "t.parquet", chunk_tokens=20, progress=False)
        pd.testing.assert_frame_equal(pd.read_parquet(out), t.to_pandas(), check_dtype=False)


def test_repetition_any_paths_agree_with_a_direct_count():
    """Top-k overlap through bitmasks (E <= 64), through the ids (E > 64), and with documents
    out of order (the per-layer bincount path) all equal a plain count."""
    rng = np.random.default_rng(5)
    for E in (8, 64, 100):
        N, k = 400, 3
        ids = np.stack([np.stack([rng.choice(E, k, replace=False) for _ in range(N)]) for _ in range(2)])
        ids[:, 1::2, 0] = ids[:, 0::2, 1]  # force some overlaps
        doc = np.repeat([3, 0, 2, 1], N // 4)  # documents not in ascending order
        pos = np.tile(np.arange(N // 4), 4)
        t = RoutingTrace(token_ids=np.full(N, 5), doc_ids=doc, positions=pos, expert_ids=ids, n_experts=E)
        r = A.repetition(t, "any", bos_id=None, n_boot=20, n_marginal_pairs=1000)
        ok = doc[1:] == doc[:-1]
        direct = [np.mean([len(set(ids[l, i]) & set(ids[l, i + 1])) > 0 for i in np.flatnonzero(ok)]) for l in range(2)]
        np.testing.assert_allclose(r.rate, direct)
        assert r.n_pairs == ok.sum()


def test_empty_slots_survive_save_and_load(tmp_path):
    """-1 (an empty slot: a token a capacity dropped, expert choice) is stored as -1, never as 255."""
    import numpy as np
    from moe_lab.routing.trace import RoutingTrace

    ids = np.array([[[0, 1], [2, -1], [-1, -1]]])  # [L=1, N=3, k=2]
    t = RoutingTrace(token_ids=np.array([1, 5, 6]), doc_ids=np.zeros(3, dtype=int), positions=np.arange(3),
                     expert_ids=ids, n_experts=8, layers=[0])
    t.save(tmp_path / "t")
    back = RoutingTrace.load(tmp_path / "t")
    assert np.array_equal(np.asarray(back.expert_ids), ids) and back.expert_ids.dtype == np.int8
    from moe_lab import analysis as A
    assert np.allclose(A.expert_load(back), A.expert_load(t))  # load counts skip the empty slots either way
