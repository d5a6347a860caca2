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


def test_first_choice_load(trace):
    first = trace.expert_ids[:, :, 0]
    right = np.stack([np.bincount(f, minlength=8) / trace.n_tokens for f in first])
    assert ex.check_first_choice_load(right, trace)
    assert ex.check_first_choice_load(None, trace).status == "todo"
    both = np.stack([np.bincount(ids.ravel(), minlength=8) / ids.size for ids in trace.expert_ids])
    for mistake, word in [(both, "both slots"), (right * trace.n_tokens, "counts"), (right.T, "transposed"),
                          (both * 2, "rows sum to k")]:
        fb = ex.check_first_choice_load(mistake, trace)
        assert fb.status == "wrong" and word in fb.message, (word, fb)
    off = right.copy()
    off[1, 2] += 0.01
    fb = ex.check_first_choice_load(off, trace)
    assert fb.status == "wrong" and "layer row 1, expert 2" in fb.message


def test_repetition_rate(trace):
    first = trace.expert_ids[:, :, 0]
    same = first[:, :-1] == first[:, 1:]
    in_doc = trace.doc_ids[:-1] == trace.doc_ids[1:]
    not_bos = trace.token_ids[:-1] != 1
    right = same[:, in_doc & not_bos].mean(1)
    assert ex.check_repetition_rate(right, trace)
    np.testing.assert_allclose(right, analysis.repetition(trace, "first", n_boot=10).rate)
    assert ex.check_repetition_rate(None, trace).status == "todo"
    fb = ex.check_repetition_rate(same[:, not_bos].mean(1), trace)
    assert fb.status == "wrong" and "document boundaries" in fb.message
    fb = ex.check_repetition_rate(same[:, in_doc].mean(1), trace)
    assert fb.status == "wrong" and "BOS" in fb.message
    fb = ex.check_repetition_rate(right[:-1], trace)
    assert fb.status == "wrong" and "shape" in fb.message


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
    assert fb.status == "wrong" and "expected" in fb.message
