"""trace_routing and trace_generation on moe_lab models (transformers models: test_bridge.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import moe_lab
from conftest import TINY_CONFIGS, left_padded_batch, make_model, random_tokens
from moe_lab import RoutingTrace, trace_generation, trace_routing
from moe_lab.routing.tracing import RoutingRecorder

ARGS = TINY_CONFIGS[1]  # top-2 of 8, sliding window 16


class CharTokenizer:
    """Stand-in for moe_lab's tokenizer: one id per character (ids fit the tiny vocabularies)."""

    def encode(self, text, bos=True, eos=False):
        return ([1] if bos else []) + [3 + ord(c) % 200 for c in text]

    def pieces(self, ids):
        return ["<s>" if i == 1 else chr(i - 3) for i in ids]


@pytest.fixture(scope="module")
def model():
    return make_model(ARGS, seed=11)


def routing_alone(model, doc: list[int]):
    """Expert ids [L, T, k] and weights of one document run on its own (no padding, no batch)."""
    _, cache = model.run_with_cache(torch.tensor([doc]), names_filter=["topk_indices", "topk_weights"])
    return cache.stack("topk_indices").numpy(), cache.stack("topk_weights").numpy()


DOCS = [[1, 5, 9, 22, 7], [1, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58],
        [1, 3], [1, 8, 8, 8, 8, 8, 8, 8, 8]]


@torch.no_grad()
def test_list_of_token_lists_matches_each_document_alone(model):
    trace = trace_routing(model, DOCS, batch_size=3, progress=False, keep_logits=True)
    assert isinstance(trace, RoutingTrace)
    N = sum(map(len, DOCS))
    L, k, E = ARGS.n_layers, ARGS.experts_per_token, ARGS.n_experts
    assert trace.expert_ids.shape == (L, N, k) and trace.weights.shape == (L, N, k)
    assert trace.router_logits.shape == (L, N, E) and trace.router_logits.dtype == np.float32
    assert trace.token_ids.tolist() == [t for d in DOCS for t in d]
    assert trace.doc_ids.tolist() == [i for i, d in enumerate(DOCS) for _ in d]
    assert trace.positions.tolist() == [p for d in DOCS for p in range(len(d))]
    assert trace.layers == list(range(L)) and trace.n_experts == E
    np.testing.assert_allclose(trace.weights.sum(-1), 1.0, atol=1e-6)
    for i, doc in enumerate(DOCS):  # padding is excluded and does not change the routing
        ids, ws = routing_alone(model, doc)
        assert np.array_equal(trace.expert_ids[:, trace.doc_ids == i], ids)
        np.testing.assert_allclose(trace.weights[:, trace.doc_ids == i], ws, atol=1e-6)
    # router logits agree with the recorded choice
    top = torch.from_numpy(trace.router_logits).softmax(-1).topk(k, -1).indices.numpy()
    assert np.array_equal(top, trace.expert_ids)
    meta = trace.meta
    assert meta["moe_lab_version"] == moe_lab.__version__ and meta["dtype"] == "float32"
    assert meta["config"] == ARGS.to_dict() and meta["source"] == "moe_lab" and meta["interventions"] == []


@torch.no_grad()
def test_batching_does_not_change_the_trace(model):
    a = trace_routing(model, DOCS, batch_size=1, progress=False)
    b = trace_routing(model, DOCS, batch_size=8, progress=False, sort_by_length=False)
    c = trace_routing(model, DOCS, batch_size=2, progress=False)
    for t in (b, c):
        assert np.array_equal(a.expert_ids, t.expert_ids)
        np.testing.assert_allclose(a.weights, t.weights, atol=1e-6)
        assert np.array_equal(a.token_ids, t.token_ids) and np.array_equal(a.positions, t.positions)


@torch.no_grad()
def test_tensor_inputs(model):
    tokens = random_tokens(ARGS, 3, 7, seed=1)
    t = trace_routing(model, tokens, progress=False)
    assert t.n_docs == 3 and t.n_tokens == 21
    _, cache = model.run_with_cache(tokens, names_filter="topk_indices")
    assert np.array_equal(t.expert_ids, cache.stack("topk_indices").numpy())
    t1 = trace_routing(model, tokens[0], progress=False)  # a single [T] row
    assert np.array_equal(t1.expert_ids, t.expert_ids[:, :7])
    padded, mask, rows = left_padded_batch(ARGS, [3, 7], seed=4)
    tp = trace_routing(model, padded, attention_mask=mask, progress=False)
    assert tp.token_ids.tolist() == torch.cat(rows).tolist()
    tl = trace_routing(model, [r.tolist() for r in rows], progress=False)
    assert np.array_equal(tp.expert_ids, tl.expert_ids)


@torch.no_grad()
def test_texts_and_domains(model, capsys):
    tok = CharTokenizer()
    corpus = {"code": ["def f(x): return x", "for i in range(3): pass"], "prose": ["Once upon a time"]}
    t = trace_routing(model, corpus, tokenizer=tok, progress=True)
    assert t.domains == ["code", "code", "prose"]
    assert t.pieces[:4] == ["<s>", "d", "e", "f"]
    assert t.token_ids.tolist() == [i for texts in corpus.values() for s in texts for i in tok.encode(s)]
    assert "tracing routing" in capsys.readouterr().err  # the tqdm bar
    sub = t.select(domain="prose")
    assert sub.n_docs == 1 and sub.pieces[1] == "O"
    df = t.to_pandas()
    assert len(df) == t.n_tokens * ARGS.n_layers * ARGS.experts_per_token
    assert set(df["domain"]) == {"code", "prose"}
    t2 = trace_routing(model, ["abc", "de"], tokenizer=tok, domain="x", add_bos=False, progress=False)
    assert t2.domains == ["x", "x"] and t2.token_ids[0] == tok.encode("abc", bos=False)[0]
    t3 = trace_routing(model, ["abc", "de"], tokenizer=tok, domain=["a", "b"], progress=False)
    assert t3.domains == ["a", "b"]


@torch.no_grad()
def test_save_load_and_layers_subset(model, tmp_path):
    t = trace_routing(model, DOCS, progress=False, keep_logits=True)
    path = t.save(tmp_path / "trace.safetensors")
    back = RoutingTrace.load(path)
    assert np.array_equal(back.expert_ids, t.expert_ids) and back.meta["config"] == t.meta["config"]
    assert np.array_equal(back.router_logits, t.router_logits)
    sub = trace_routing(model, DOCS, progress=False, layers=[1])
    assert sub.layers == [1] and np.array_equal(sub.expert_ids[0], t.expert_ids[1])


@torch.no_grad()
def test_errors_name_the_problem(model):
    with pytest.raises(ValueError, match="tokenizer"):
        trace_routing(model, ["some text"], progress=False)
    with pytest.raises(ValueError, match="document 1 is empty"):
        trace_routing(model, [[1, 2], []], progress=False)
    with pytest.raises(ValueError, match="document 0 has 200 tokens"):
        trace_routing(model, [[1] * 200], progress=False)
    t = trace_routing(model, [[1] * 200], progress=False, max_len=50)
    assert t.n_tokens == 50
    with pytest.raises(ValueError, match="layer 7 is not in this model"):
        trace_routing(model, DOCS, layers=[7], progress=False)
    with pytest.raises(TypeError, match="trace_routing needs"):
        trace_routing(torch.nn.Linear(2, 2), DOCS, progress=False)


@torch.no_grad()
def test_capture_is_bit_identical_and_cleans_up(model):
    tokens = random_tokens(ARGS, 2, 24, seed=9)
    base = model(tokens)
    _, cache = model.run_with_cache(tokens, names_filter=["topk_indices", "topk_weights"])
    with RoutingRecorder(model) as rec:
        out = model(tokens)
        records = rec.take()
    assert torch.equal(out, base)
    for L in range(ARGS.n_layers):
        (idx, w, logits), = records[L]
        assert logits is None
        assert torch.equal(idx, cache["topk_indices", L]) and torch.equal(w, cache["topk_weights", L])
    assert all(b.moe.routing_fn is moe_lab.topk_softmax_routing for b in model.blocks)


@torch.no_grad()
def test_bf16_model_records_fp32(model):
    m16 = make_model(ARGS, seed=11).to(torch.bfloat16)
    t = trace_routing(m16, DOCS[:2], progress=False, keep_logits=True)
    assert t.meta["dtype"] == "bfloat16" and t.router_logits.dtype == np.float32 and t.weights.dtype == np.float32
    np.testing.assert_allclose(t.weights.sum(-1), 1.0, atol=1e-6)


# ---- generation


@pytest.mark.parametrize("sampling", [dict(), dict(temperature=0.8, top_k=50, seed=3)], ids=["greedy", "sampled"])
@torch.no_grad()
def test_trace_generation_matches_full_forward(model, sampling):
    prompts = [[1, 5, 9], [1, 40, 41, 42, 43, 44]]
    tokens, trace = trace_generation(model, prompts, 8, keep_logits=True, **sampling)
    assert torch.equal(tokens, model.generate(prompts, 8, **sampling))  # same tokens as generate
    assert trace.meta["generated"] and trace.meta["prompt_lengths"] == [3, 6]
    final = [p + tokens[b, -8:].tolist() for b, p in enumerate(prompts)]
    full = trace_routing(model, final, progress=False, keep_logits=True)
    assert np.array_equal(trace.token_ids, full.token_ids) and np.array_equal(trace.positions, full.positions)
    # decode-step routing (KV cache, one token at a time) = routing of one forward over the result
    assert np.array_equal(trace.expert_ids, full.expert_ids)
    np.testing.assert_allclose(trace.weights, full.weights, atol=1e-5)
    np.testing.assert_allclose(trace.router_logits, full.router_logits, atol=1e-4)
    generated = trace.positions >= np.array(trace.meta["prompt_lengths"])[trace.doc_ids]
    assert generated.sum() == 16


@torch.no_grad()
def test_trace_generation_stops_at_eos(model):
    prompts = [[1, 5, 9], [1, 40, 41, 42]]
    free = model.generate(prompts, 6)  # [2, 4 + 6]: prompts left-padded to 4
    gen0 = free[0, 4:].tolist()
    eos = gen0[1]  # row 0's second generated token becomes the EOS
    tokens, trace = trace_generation(model, prompts, 6, eos_id=eos, tokenizer=CharTokenizer(), add_bos=False)
    assert torch.equal(tokens, model.generate(prompts, 6, eos_id=eos))
    row0 = trace.token_ids[trace.doc_ids == 0]
    assert row0.tolist() == prompts[0] + gen0[:gen0.index(eos) + 1]  # ends with the EOS, no padding after it
    assert len(trace.pieces) == trace.n_tokens
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        trace_generation(model, prompts, ARGS.max_seq_len)


# ---- the streaming layer-by-layer forward and partly loaded models


@torch.no_grad()
def test_streaming_model_and_layer_subsets(model, tmp_path):
    from moe_lab import AblateExpert, StreamingMixtral, intervene, load_model, save_model

    save_model(model, tmp_path / "ckpt")
    ref = trace_routing(model, DOCS, progress=False, keep_logits=True)
    with StreamingMixtral(tmp_path / "ckpt") as sm:
        got = trace_routing(sm, DOCS, progress=False, keep_logits=True, batch_size=2)
        assert np.array_equal(got.expert_ids, ref.expert_ids)
        np.testing.assert_allclose(got.router_logits, ref.router_logits, atol=1e-5)
        assert got.meta["model_class"] == "StreamingMixtral" and not sm.loaded_blocks()
        first = trace_routing(sm, DOCS, progress=False, layers=[0])  # stops after block 0
        assert np.array_equal(first.expert_ids[0], ref.expert_ids[0])
        with intervene(sm, AblateExpert(1, 2)):
            ablated = trace_routing(sm, DOCS, progress=False)
        with intervene(model, AblateExpert(1, 2)):
            assert np.array_equal(ablated.expert_ids, trace_routing(model, DOCS, progress=False).expert_ids)
        assert not (ablated.expert_ids[1] == 2).any()
        with pytest.raises(TypeError, match="held in memory"):
            trace_generation(sm, [[1, 2]], 2)
    # a model loaded with some layers only: traces and interventions use the checkpoint's numbers
    part = load_model(tmp_path / "ckpt", layers=[1])
    t = trace_routing(part, DOCS, progress=False)
    assert t.layers == [1]
    with intervene(part, AblateExpert(1, 0)):
        assert not (trace_routing(part, DOCS, progress=False).expert_ids == 0).any()
