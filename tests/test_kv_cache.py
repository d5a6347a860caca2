"""Incremental decoding with a KVCache must reproduce the full forward pass."""

from __future__ import annotations

import pytest
import torch

from conftest import CONFIG_IDS, TINY_CONFIGS, left_padded_batch, make_model, random_tokens

T = 40  # longer than both sliding windows in TINY_CONFIGS (16 and 8)
TOL = 1e-5


@pytest.fixture(scope="module", params=TINY_CONFIGS, ids=CONFIG_IDS)
def model(request):
    return make_model(request.param, seed=7)


def run_chunks(model, tokens, sizes, cache=None):
    """Feed tokens through a cache in consecutive chunks of the given sizes; concat the logits."""
    cache = cache or model.new_cache(tokens.shape[0], tokens.shape[1])
    outs, start = [], 0
    for n in sizes:
        outs.append(model(tokens[:, start:start + n], cache=cache))
        start += n
    assert start == tokens.shape[1] and cache.length == start
    return torch.cat(outs, dim=1)


def schedules(T):
    """(name, chunk sizes): chunked prefill then one token at a time, and fixed chunk sizes."""
    out = []
    for prefill in (1, 5, 16, 33):
        out.append((f"prefill{prefill}+1s", [prefill] + [1] * (T - prefill)))
    for c in (3, 8, 16):
        out.append((f"chunks{c}", [c] * (T // c) + ([T % c] if T % c else [])))
    return out


@torch.no_grad()
@pytest.mark.parametrize("name,sizes", schedules(T), ids=[s[0] for s in schedules(T)])
def test_incremental_equals_full(model, name, sizes):
    tokens = random_tokens(model.args, 2, T, seed=11)
    full = model(tokens)
    inc = run_chunks(model, tokens, sizes)
    diff = (inc - full).abs().max().item()
    assert diff <= TOL, f"{name}: max diff {diff:.3g}"


@torch.no_grad()
def test_incremental_with_explicit_attention(model):
    """With an attention-pattern hook attached the explicit (non-SDPA) path runs; it must agree too."""
    tokens = random_tokens(model.args, 2, T, seed=12)
    full = model(tokens)
    seen = []
    handle = model.blocks[0].attn.hook_pattern.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    try:
        inc = run_chunks(model, tokens, [7, 9] + [1] * (T - 16))
        full_hooked = model(tokens)
    finally:
        handle.remove()
    assert seen and seen[0][-2:] == (7, 7) and seen[1][-2:] == (9, 16) and seen[2][-2:] == (1, 17)
    assert (inc - full).abs().max().item() <= TOL
    assert (full_hooked - full).abs().max().item() <= TOL


WINDOWED = [a for a in TINY_CONFIGS if a.sliding_window is not None]


@torch.no_grad()
@pytest.mark.parametrize("args", WINDOWED, ids=[f"w{a.sliding_window}" for a in WINDOWED])
def test_sliding_window_matters(args):
    """Guard against a vacuous window test: past the window, dropping the window changes logits."""
    model = make_model(args.replace(), seed=7)  # own copy of args: we toggle the window below
    W = model.args.sliding_window
    tokens = random_tokens(model.args, 1, T, seed=13)
    windowed = model(tokens)
    model.args.sliding_window = None
    try:
        dense = model(tokens)
    finally:
        model.args.sliding_window = W
    assert (windowed[:, :W] - dense[:, :W]).abs().max() <= TOL  # inside the window: identical
    assert (windowed[:, W:] - dense[:, W:]).abs().max() > 1e-3  # beyond it: different


@torch.no_grad()
def test_padded_prefill_then_decode_equals_single_rows(model):
    lengths = [12, 7, 3]
    prompt, mask, rows = left_padded_batch(model.args, lengths, seed=14)
    n_new = 18  # the longest row reaches 30 tokens, past both windows
    new = random_tokens(model.args, len(lengths), n_new, seed=15)
    cache = model.new_cache(len(lengths), prompt.shape[1] + n_new)
    outs = [model(prompt, attention_mask=mask, cache=cache)]
    outs.append(model(new[:, :3], cache=cache))  # an unpadded multi-token chunk after the padded one
    for t in range(3, n_new):
        outs.append(model(new[:, t:t + 1], cache=cache))
    batched = torch.cat(outs, dim=1)
    real = torch.cat([mask.bool(), torch.ones(len(lengths), n_new, dtype=torch.bool)], dim=1)
    for b, row in enumerate(rows):
        alone = model(torch.cat([row, new[b]])[None])[0]
        got = batched[b, real[b]]
        assert got.shape == alone.shape
        diff = (got - alone).abs().max().item()
        assert diff <= TOL, f"row {b} (length {lengths[b]}): {diff:.3g}"


@torch.no_grad()
def test_cache_overflow_raises_and_leaves_cache_usable():
    model = make_model(TINY_CONFIGS[0], seed=7)
    tokens = random_tokens(model.args, 1, 10, seed=16)
    cache = model.new_cache(1, 10)
    model(tokens[:, :8], cache=cache)
    with pytest.raises(ValueError, match=r"cache holds 8 tokens; adding 3 exceeds its max_len=10"):
        model(torch.cat([tokens[:, 8:], tokens[:, :1]], dim=1), cache=cache)
    assert cache.length == 8  # the failed call wrote nothing
    last = model(tokens[:, 8:], cache=cache)
    assert (last - model(tokens)[:, 8:]).abs().max() <= TOL
    with pytest.raises(ValueError, match="exceeds its max_len=10"):
        model(tokens[:, :1], cache=cache)


@torch.no_grad()
def test_cache_reset_reuses_buffers():
    model = make_model(TINY_CONFIGS[1], seed=7)
    a, b = random_tokens(model.args, 1, 20, seed=17), random_tokens(model.args, 1, 20, seed=18)
    cache = model.new_cache(1, 20)
    run_chunks(model, a, [5] + [1] * 15, cache)
    cache.reset()
    assert cache.length == 0
    out = run_chunks(model, b, [4] * 5, cache)
    assert (out - model(b)).abs().max() <= TOL
