"""Wrong inputs fail early with a message that says what is wrong."""

from __future__ import annotations

import re

import pytest
import torch

from conftest import TINY_CONFIGS, make_model
from moe_lab.generation import left_pad, sample_next
from moe_lab.model import ModelArgs

ARGS = TINY_CONFIGS[0]  # vocab 300, max_seq_len 128


@pytest.fixture(scope="module")
def model():
    return make_model(ARGS, seed=0)


def ok_tokens(B=2, T=5):
    return torch.randint(0, ARGS.vocab_size, (B, T))


# ---- tokens


@pytest.mark.parametrize("bad", [-1, ARGS.vocab_size, ARGS.vocab_size + 17])
def test_token_id_out_of_range(model, bad):
    tokens = ok_tokens()
    tokens[1, 3] = bad
    with pytest.raises(ValueError, match=rf"token id {bad} is outside \[0, vocab_size={ARGS.vocab_size}\)"):
        model(tokens)


def test_float_tokens(model):
    with pytest.raises(TypeError, match="integer token ids.*float32"):
        model(ok_tokens().float())


def test_bool_tokens(model):
    with pytest.raises(TypeError, match="integer token ids"):
        model(ok_tokens() > 3)


def test_non_tensor_tokens(model):
    with pytest.raises(TypeError, match=r"torch.Tensor of shape \[B, T\], got list"):
        model([[1, 2, 3]])


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8])
def test_small_integer_dtypes_accepted(model, dtype):
    tokens = ok_tokens() % 128  # representable in every dtype tested
    torch.testing.assert_close(model(tokens.to(dtype)), model(tokens), rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(5,), (1, 2, 5)])
def test_wrong_rank(model, shape):
    with pytest.raises(ValueError, match=re.escape(f"tokens must have shape [B, T] (rank 2), got shape {shape}")):
        model(torch.zeros(shape, dtype=torch.long))


def test_empty_sequence(model):
    with pytest.raises(ValueError, match=r"empty \(T = 0\)"):
        model(torch.zeros(1, 0, dtype=torch.long))


def test_too_long(model):
    with pytest.raises(ValueError, match=f"sequence length {ARGS.max_seq_len + 1} exceeds max_seq_len={ARGS.max_seq_len}"):
        model(torch.zeros(1, ARGS.max_seq_len + 1, dtype=torch.long))


# ---- cache


def test_cache_too_short(model):
    cache = model.new_cache(2, 4)
    with pytest.raises(ValueError, match="cache holds 0 tokens; adding 5 exceeds its max_len=4"):
        model(ok_tokens(2, 5), cache=cache)


def test_cache_batch_mismatch(model):
    cache = model.new_cache(3, 16)
    with pytest.raises(ValueError, match="cache was made for batch size 3, tokens have batch size 2"):
        model(ok_tokens(2, 5), cache=cache)


def test_cache_longer_than_max_seq_len(model):
    with pytest.raises(ValueError, match=f"max_len={ARGS.max_seq_len + 1} exceeds max_seq_len={ARGS.max_seq_len}"):
        model.new_cache(1, ARGS.max_seq_len + 1)


def test_padding_after_first_chunk(model):
    cache = model.new_cache(2, 16)
    model(ok_tokens(2, 4), cache=cache)
    with pytest.raises(ValueError, match="padding is only allowed in the first chunk"):
        model(ok_tokens(2, 3), attention_mask=torch.tensor([[0, 1, 1], [1, 1, 1]]), cache=cache)


# ---- masks and targets


@pytest.mark.parametrize("shape", [(2, 4), (1, 5), (2, 5, 1)])
def test_attention_mask_wrong_shape(model, shape):
    with pytest.raises(ValueError, match=r"attention_mask must have the tokens' shape \(2, 5\)"):
        model(ok_tokens(2, 5), attention_mask=torch.ones(shape, dtype=torch.long))


@pytest.mark.parametrize("mask", [[[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], [[0, 1, 0, 1, 1], [1, 1, 1, 1, 1]]])
def test_right_or_middle_padding_rejected(model, mask):
    with pytest.raises(ValueError, match="attention_mask must be left-padded"):
        model(ok_tokens(2, 5), attention_mask=torch.tensor(mask))


@pytest.mark.parametrize("shape", [(2, 4), (2, 5, 1), (1, 5)])
def test_targets_wrong_shape(model, shape):
    with pytest.raises(ValueError, match=r"targets must have the tokens' shape \(2, 5\)"):
        model(ok_tokens(2, 5), torch.zeros(shape, dtype=torch.long))


# ---- config


@pytest.mark.parametrize("kw,msg", [
    (dict(n_heads=6, n_kv_heads=4, head_dim=8), "n_heads=6 must be a multiple of n_kv_heads=4"),
    (dict(head_dim=7), "head_dim=7 must be even for RoPE"),
    (dict(n_experts=4, experts_per_token=5), r"experts_per_token=5 must be in \[1, n_experts=4\]"),
    (dict(n_experts=4, experts_per_token=0), r"experts_per_token=0 must be in \[1, n_experts=4\]"),
    (dict(dim=30, n_heads=4, head_dim=None), "dim=30 is not divisible by n_heads=4; set head_dim"),
    (dict(sliding_window=0), "sliding_window=0 must be >= 1 or None"),
])
def test_invalid_model_args(kw, msg):
    base = dict(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=8, hidden_dim=16, vocab_size=10)
    with pytest.raises(ValueError, match=msg):
        ModelArgs(**{**base, **kw})


def test_unknown_preset():
    with pytest.raises(ValueError, match=r"unknown preset 'mixtral-9x9b'; choose one of \[.*'mixtral-8x7b'"):
        ModelArgs.from_name("mixtral-9x9b")


def test_from_dict_unknown_field():
    with pytest.raises(ValueError, match=r"unknown ModelArgs fields: \['n_expert'\]"):
        ModelArgs.from_dict({**ARGS.to_dict(), "n_expert": 3})


# ---- generation


def test_generate_past_max_seq_len(model):
    prompt = ok_tokens(1, 100)
    with pytest.raises(ValueError, match=f"prompt \\(100\\) \\+ max_new_tokens \\(29\\) exceeds max_seq_len={ARGS.max_seq_len}"):
        model.generate(prompt, 29)
    assert model.generate(prompt, 28).shape == (1, 128)  # exactly at the limit is fine


def test_generate_stream_checks_before_running(model):
    with pytest.raises(ValueError, match="max_new_tokens must be >= 0, got -1"):
        next(model.generate_stream(ok_tokens(1, 3), -1))


@pytest.mark.parametrize("prompt,msg", [([], "non-empty"), ([[1, 2], []], "every prompt needs at least one token")])
def test_bad_prompts(prompt, msg):
    with pytest.raises(ValueError, match=msg):
        left_pad(prompt)


@pytest.mark.parametrize("kw,msg", [
    (dict(temperature=-1.0), "temperature must be >= 0, got -1.0"),
    (dict(temperature=1.0, top_p=0.0), r"top_p must be in \(0, 1\], got 0.0"),
    (dict(temperature=1.0, top_p=1.5), r"top_p must be in \(0, 1\], got 1.5"),
    (dict(temperature=1.0, top_k=0), "top_k must be >= 1, got 0"),
])
def test_bad_sampling_options(kw, msg):
    with pytest.raises(ValueError, match=msg):
        sample_next(torch.zeros(1, 10), **kw)
