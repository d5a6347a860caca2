"""Notebook 05's exercise checkers: the right answer passes, None is todo, typical mistakes are named."""

import numpy as np
import pytest
import torch

from moe_lab import Mixtral, ModelArgs, analysis, load_tokenizer, trace_generation, trace_routing
from moe_lab.exercises import nb05 as ex

TEXTS = {"numbers": ["12 + 30 = 42, 7 * 6 = 42 and 1999 - 1000 = 999", "3.14159 2.71828 1.41421"],
         "english": ["The cat sat on the mat and looked out of the window.", "It was a bright cold day in April."]}


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Mixtral(ModelArgs.from_name("tiny", n_layers=3, init_std=0.1)).eval()


@pytest.fixture(scope="module")
def trace(model, tok):
    return trace_routing(model, TEXTS, tokenizer=tok, progress=False)


def first_load(t):
    return np.stack([np.bincount(f, minlength=t.n_experts) / t.n_tokens for f in t.expert_ids[:, :, 0]])


def both_slots(t):
    return np.stack([np.bincount(ids.ravel(), minlength=t.n_experts) / ids.size for ids in t.expert_ids])


def test_first_choice_load(trace):
    assert ex.check_first_choice_load(first_load, trace)
    assert ex.check_first_choice_load(None, trace).status == "todo"
    assert ex.check_first_choice_load(lambda t: None, trace).status == "todo"
    for mistake, word in [(both_slots, "both slots"), (lambda t: first_load(t) * t.n_tokens, "counts"),
                          (lambda t: first_load(t).T, "transposed"), (lambda t: both_slots(t) * 2, "rows sum to k")]:
        fb = ex.check_first_choice_load(mistake, trace)
        assert fb.status == "wrong" and word in fb.message, (word, fb)

    def off(t):
        out = first_load(t)
        out[1, 2] += 0.01
        return out
    fb = ex.check_first_choice_load(off, trace)
    assert fb.status == "wrong" and "1 of 24 values differ" in fb.message
    # by hand: the library call is switched off, and a pasted value is not accepted
    fb = ex.check_first_choice_load(lambda t: analysis.expert_load(t, "first"), trace)
    assert fb.status == "wrong" and "calls the library" in fb.message
    assert "takes your function" in ex.check_first_choice_load(analysis.expert_load(trace, "first"), trace).message


def rate(t, in_doc=True, not_bos=True):
    first = t.expert_ids[:, :, 0]
    keep = np.ones(t.n_tokens - 1, bool)
    keep &= (t.doc_ids[:-1] == t.doc_ids[1:]) if in_doc else True
    keep &= (t.token_ids[:-1] != 1) if not_bos else True
    return (first[:, :-1] == first[:, 1:])[:, keep].mean(1)


def test_repetition_rate(trace):
    assert ex.check_repetition_rate(rate, trace)
    np.testing.assert_allclose(rate(trace), analysis.repetition(trace, "first", n_boot=10).rate)
    assert ex.check_repetition_rate(None, trace).status == "todo"
    fb = ex.check_repetition_rate(lambda t: rate(t, in_doc=False), trace)
    assert fb.status == "wrong" and "document boundaries" in fb.message
    fb = ex.check_repetition_rate(lambda t: rate(t, not_bos=False), trace)
    assert fb.status == "wrong" and "BOS" in fb.message
    fb = ex.check_repetition_rate(lambda t: rate(t)[:-1], trace)
    assert fb.status == "wrong" and "shape" in fb.message
    fb = ex.check_repetition_rate(lambda t: analysis.repetition(t, "first", n_boot=10).rate, trace)
    assert fb.status == "wrong" and "calls the library" in fb.message


def test_digit_experts(trace):
    mask = ex.digit_mask(trace)
    assert mask.sum() >= 10 and not mask[trace.token_ids == 1].any()
    assert all(trace.pieces[i].replace("▁", "").isdigit() for i in np.flatnonzero(mask))
    layer = trace.layers[1]
    first = trace.expert_ids[1, mask, 0]
    right = np.bincount(first, minlength=8) / mask.sum()
    assert ex.check_digit_experts(right, trace, layer)
    assert ex.check_digit_experts(None, trace, layer).status == "todo"
    fb = ex.check_digit_experts(np.bincount(first, minlength=8) / trace.n_tokens, trace, layer)
    assert fb.status == "wrong" and "all tokens" in fb.message
    fb = ex.check_digit_experts(np.bincount(trace.expert_ids[1, mask].ravel(), minlength=8) / mask.sum(), trace, layer)
    assert fb.status == "wrong" and "both slots" in fb.message
    fb = ex.check_digit_experts(np.bincount(trace.expert_ids[0, mask, 0], minlength=8) / mask.sum(), trace, layer)
    assert fb.status == "wrong" and f"layer {trace.layers[0]}" in fb.message
    english = trace.select(domain="english")
    if not ex.digit_mask(english).any():
        assert "no digit" in ex.check_digit_experts(right, english, layer).message


def test_greedy_cache_hits(model, tok):
    prompts, n_new, size = ["def f(x):", "Once upon a time"], 12, 4
    _, tr = trace_generation(model, prompts, max_new_tokens=n_new, tokenizer=tok, temperature=0)
    decode = analysis.generated_only(tr)
    assert decode.n_tokens == len(prompts) * n_new
    right = analysis.cache_hit_rates(decode, sizes=[size], policies=("lru",)).hit_rate.mean()
    assert ex.check_greedy_cache_hits(right, model, prompts, tok, n_new, size)
    assert ex.check_greedy_cache_hits(None, model, prompts, tok, n_new, size).status == "todo"
    with_prompt = analysis.cache_hit_rates(tr, sizes=[size], policies=("lru",)).hit_rate.mean()
    if abs(with_prompt - right) > 1e-6:
        fb = ex.check_greedy_cache_hits(with_prompt, model, prompts, tok, n_new, size)
        assert fb.status == "wrong" and "prompt tokens" in fb.message
    fb = ex.check_greedy_cache_hits([right, right], model, prompts, tok, n_new, size)
    assert fb.status == "wrong" and "one number" in fb.message
    fb = ex.check_greedy_cache_hits(1.5, model, prompts, tok, n_new, size)
    assert fb.status == "wrong" and "between 0 and 1" in fb.message
    fb = ex.check_greedy_cache_hits(min(right + 0.05, 1.0) if right < 0.95 else right - 0.05, model, prompts, tok,
                                    n_new, size)
    assert fb.status == "wrong" and "not equal" in fb.message
