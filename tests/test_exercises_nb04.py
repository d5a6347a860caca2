"""Notebook 04's exercise checkers: the right answer passes, None is todo, typical mistakes are named."""

import numpy as np
import pytest
import torch
import transformers

from moe_lab import AblateExpert, ForceExpert, Mixtral, ModelArgs, intervene, topk_softmax_routing, trace_routing
from moe_lab.exercises import nb04 as ex

PROMPT = [1, 17, 52, 9, 33, 81, 40, 12, 66, 7]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Mixtral(ModelArgs.from_name("tiny", n_layers=3, vocab_size=128, init_std=0.1)).eval()


def test_topk_by_hand():
    logits = torch.randn(20, 8, generator=torch.Generator().manual_seed(1))

    def hf_order(lg, k):  # softmax over all, top-k, renormalise
        w, idx = lg.softmax(-1).topk(k, dim=-1)
        return w / w.sum(-1, keepdim=True), idx

    def mistral_order(lg, k):  # mistral-inference's order: top-k logits, softmax over k
        w, idx = lg.topk(k, dim=-1)
        return w.softmax(-1), idx

    assert ex.check_topk_by_hand(hf_order, logits, k=2)
    assert ex.check_topk_by_hand(mistral_order, logits, k=2)
    assert ex.check_topk_by_hand(None, logits, k=2).status == "todo"
    fb = ex.check_topk_by_hand(lambda lg, k: lg.softmax(-1).topk(k, dim=-1), logits, k=2)  # forgot to renormalise
    assert fb.status == "wrong" and "not renormalised" in fb.message and fb.hint
    fb = ex.check_topk_by_hand(lambda lg, k: tuple(x.flip(-1) for x in hf_order(lg, k)), logits, k=2)
    assert fb.status == "wrong" and "wrong order" in fb.message
    fb = ex.check_topk_by_hand(lambda lg, k: hf_order(lg, k)[::-1], logits, k=2)
    assert fb.status == "wrong" and "(weights, experts)" in fb.message
    fb = ex.check_topk_by_hand(lambda lg, k: hf_order(lg, 3), logits, k=2)
    assert fb.status == "wrong" and "shape" in fb.message
    fb = ex.check_topk_by_hand(lambda lg, k: (hf_order(lg, k)[0], (-lg).topk(k, dim=-1).indices), logits, k=2)
    assert fb.status == "wrong" and "experts of 64 of 64 tokens differ" in fb.message
    # by hand: the library's own routing is switched off, and a pasted value is not accepted
    fb = ex.check_topk_by_hand(lambda lg, k: topk_softmax_routing(lg, k)[:0:-1], logits, k=2)
    assert fb.status == "wrong" and "calls the library" in fb.message
    assert "takes your function" in ex.check_topk_by_hand(hf_order(logits, 2), logits, k=2).message


def test_ablation_sweep(model):
    def kls(layer, reverse=False):
        out = []
        with torch.inference_mode():
            p = model(torch.tensor([PROMPT]))[0, -1].log_softmax(-1)
            for e in range(8):
                with intervene(model, AblateExpert(layer, e)):
                    q = model(torch.tensor([PROMPT]))[0, -1].log_softmax(-1)
                a, b = (q, p) if reverse else (p, q)
                out.append(float((a.exp() * (a - b)).sum()))
        return out

    right = kls(2)
    assert max(right) > 0
    assert ex.check_ablation_sweep(right, model, PROMPT, layer=2)
    assert ex.check_ablation_sweep(None, model, PROMPT, layer=2).status == "todo"
    fb = ex.check_ablation_sweep(kls(2, reverse=True), model, PROMPT, layer=2)
    assert fb.status == "wrong" and "KL(ablated || normal)" in fb.message
    fb = ex.check_ablation_sweep(kls(1), model, PROMPT, layer=2)
    assert fb.status == "wrong" and "layer 1" in fb.message
    fb = ex.check_ablation_sweep(right[:7], model, PROMPT, layer=2)
    assert fb.status == "wrong" and "8 values" in fb.message
    fb = ex.check_ablation_sweep([-x for x in right], model, PROMPT, layer=2)
    assert fb.status == "wrong" and "never negative" in fb.message


def test_force_spread(model):
    base = trace_routing(model, [PROMPT], progress=False)
    layer, pos = 0, 3
    expert = next(e for e in range(8) if e not in base.expert_ids[0, pos])  # an expert the token did not choose
    with intervene(model, ForceExpert(layer, expert, positions=[pos])):
        forced = trace_routing(model, [PROMPT], progress=False)
    changed = (base.expert_ids != forced.expert_ids).any(axis=(0, 2))
    right = np.flatnonzero(changed).tolist()
    assert pos in right and min(right) == pos
    assert ex.check_force_spread(right, model, PROMPT, layer, expert, pos)
    assert ex.check_force_spread(None, model, PROMPT, layer, expert, pos).status == "todo"
    fb = ex.check_force_spread([0] + right, model, PROMPT, layer, expert, pos)
    assert fb.status == "wrong" and "causal" in fb.message
    fb = ex.check_force_spread(changed.astype(int), model, PROMPT, layer, expert, pos)
    assert fb.status == "wrong" and "mask" in fb.message
    if len(right) > 1:
        fb = ex.check_force_spread([pos], model, PROMPT, layer, expert, pos)
        assert fb.status == "wrong" and "Later tokens" in fb.message
    fb = ex.check_force_spread(right + [len(PROMPT) + 5], model, PROMPT, layer, expert, pos)
    assert fb.status == "wrong" and "changed position(s) missing" in fb.message


def test_random_routing():
    def right(logits, k):
        probs = logits.float().softmax(-1)
        idx = torch.rand_like(probs).topk(k, dim=-1).indices
        w = probs.gather(-1, idx)
        return probs, idx, w / w.sum(-1, keepdim=True)

    assert ex.check_random_routing(right)
    assert ex.check_random_routing(None).status == "todo"

    def with_replacement(logits, k):
        probs = logits.float().softmax(-1)
        idx = torch.randint(0, logits.shape[-1], (logits.shape[0], k))
        w = probs.gather(-1, idx)
        return probs, idx, w / w.sum(-1, keepdim=True)

    def equal_weights(logits, k):
        probs, idx, _ = right(logits, k)
        return probs, idx, torch.full(idx.shape, 1 / k)

    def not_renormalised(logits, k):
        probs, idx, _ = right(logits, k)
        return probs, idx, probs.gather(-1, idx)

    def top_k(logits, k):
        probs = logits.float().softmax(-1)
        w, idx = probs.topk(k, dim=-1)
        return probs, idx, w / w.sum(-1, keepdim=True)

    def top1_plus_random(logits, k):  # keeps the router's own first choice: not random
        probs = logits.float().softmax(-1)
        first = logits.argmax(-1, keepdim=True)
        noise = torch.rand_like(probs).scatter(-1, first, -1.0)  # any expert but the first
        idx = torch.cat([first, noise.topk(k - 1, dim=-1).indices], -1)
        w = probs.gather(-1, idx)
        return probs, idx, w / w.sum(-1, keepdim=True)

    def by_probability(logits, k):  # samples by the router's probabilities, not uniformly
        probs = logits.float().softmax(-1)
        idx = torch.multinomial(probs, k)
        w = probs.gather(-1, idx)
        return probs, idx, w / w.sum(-1, keepdim=True)

    for fn, word in [(with_replacement, "same expert twice"), (equal_weights, "equal weights"),
                     (top1_plus_random, "router's own first choice"), (by_probability, "not drawn uniformly"),
                     (not_renormalised, "divided by their sum"), (top_k, "own top-k"),
                     (lambda logits, k: right(logits, k)[1], "tuple"),
                     (lambda logits, k: (logits, *right(logits, k)[1:]), "softmax")]:
        fb = ex.check_random_routing(fn)
        assert fb.status == "wrong" and word in fb.message, (fn, fb)


def test_hf_moe_trace(model):
    cfg = transformers.OlmoeConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=128, num_experts=8, num_experts_per_tok=2,
                                   pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    hf = transformers.OlmoeForCausalLM(cfg).eval()
    tokens = torch.tensor([PROMPT])
    trace = trace_routing(hf, tokens, progress=False)
    assert ex.check_hf_moe_trace(trace, hf, tokens)
    assert ex.check_hf_moe_trace(None, hf, tokens).status == "todo"
    assert ex.check_hf_moe_trace(trace, None, tokens).status == "todo"
    fb = ex.check_hf_moe_trace(trace.expert_ids, hf, tokens)
    assert fb.status == "wrong" and "RoutingTrace" in fb.message
    fb = ex.check_hf_moe_trace(trace_routing(model, tokens, progress=False), hf, tokens)
    assert fb.status == "wrong" and "not from hf_model" in fb.message
    fb = ex.check_hf_moe_trace(trace_routing(hf, torch.tensor([PROMPT[:5]]), progress=False), hf, tokens)
    assert fb.status == "wrong" and "shape" in fb.message
    mixtral = transformers.MixtralForCausalLM(transformers.MixtralConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=128)).eval()
    fb = ex.check_hf_moe_trace(trace_routing(mixtral, tokens, progress=False), mixtral, tokens)
    assert fb.status == "wrong" and "Mixtral again" in fb.message


def test_function_stubs_are_todo():
    assert ex.check_random_routing(lambda logits, k: None).status == "todo"
