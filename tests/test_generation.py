"""Greedy and sampled generation, EOS handling, streaming and left-padded prompt lists."""

from __future__ import annotations

import pytest
import torch

from conftest import TINY_CONFIGS, make_model, random_tokens
from moe_lab.generation import generate_stream, left_pad

ARGS = TINY_CONFIGS[1]  # sliding window 16, top-2 of 8


@pytest.fixture(scope="module")
def model():
    return make_model(ARGS, seed=3)


@pytest.fixture(scope="module")
def flat_model():
    """Small init (std 0.002): nearly uniform next-token distribution, so sampling varies."""
    return make_model(ARGS.replace(init_std=0.002), seed=4)


@torch.no_grad()
def greedy_without_cache(model, prompt, n):
    """The obvious loop: full forward on the whole sequence, argmax, append."""
    seq = prompt
    for _ in range(n):
        seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return seq


def test_greedy_is_deterministic_and_matches_uncached_loop(model):
    prompt = random_tokens(ARGS, 2, 6, seed=1)
    a = model.generate(prompt, 14)
    b = model.generate(prompt, 14)
    assert a.shape == (2, 20)
    assert torch.equal(a, b)
    assert torch.equal(a[:, :6], prompt)
    assert torch.equal(a, greedy_without_cache(model, prompt, 14))  # crosses the window (16)


def test_sampling_seeded(flat_model):
    prompt = random_tokens(ARGS, 2, 4, seed=2)
    kw = dict(temperature=2.0)
    a = flat_model.generate(prompt, 12, seed=123, **kw)
    b = flat_model.generate(prompt, 12, seed=123, **kw)
    c = flat_model.generate(prompt, 12, seed=124, **kw)
    assert torch.equal(a, b)
    assert not torch.equal(a[:, 4:], c[:, 4:])
    # sampling at temperature 2 on near-flat logits is not greedy
    assert not torch.equal(a, flat_model.generate(prompt, 12))


@pytest.mark.parametrize("kw", [dict(temperature=1.0, top_k=1), dict(temperature=1.5, top_p=1e-6),
                                dict(temperature=0.7, top_k=1, top_p=0.5)])
def test_truncated_sampling_equals_greedy(model, kw):
    prompt = random_tokens(ARGS, 3, 5, seed=3)
    greedy = model.generate(prompt, 10)
    for seed in (0, 1):
        assert torch.equal(model.generate(prompt, 10, seed=seed, **kw), greedy)


def test_top_k_limits_the_support(model):
    """With top_k=3 every sampled token is among the 3 most likely of its step (and not always
    the most likely one)."""
    prompt = random_tokens(ARGS, 1, 4, seed=4)
    out = model.generate(prompt, 16, temperature=50.0, top_k=3, seed=0)
    with torch.no_grad():
        logits = model(out[:, :-1])[0, 3:]  # the logits each new token was drawn from
    top3 = logits.topk(3, dim=-1).indices
    new = out[0, 4:].tolist()
    assert all(t in top3[i].tolist() for i, t in enumerate(new))
    assert any(t != top3[i, 0] for i, t in enumerate(new))


def test_stops_at_eos_and_pads_finished_rows(model):
    prompt = random_tokens(ARGS, 3, 5, seed=5)
    free = model.generate(prompt, 12)  # no eos: 12 new tokens per row
    new = free[:, 5:]
    # pick as EOS the token row 0 produces at step 3 (first occurrence at or after that step)
    eos = int(new[0, 3])
    pad = ARGS.vocab_size - 1
    out = model.generate(prompt, 12, eos_id=eos, pad_id=pad)
    got = out[:, 5:]
    hit = [(r == eos).nonzero() for r in new]  # per row, where eos first appears in the free run
    first = [int(h[0]) if len(h) else None for h in hit]
    assert first[0] is not None and first[0] <= 3
    n_steps = max(f + 1 if f is not None else 12 for f in first)
    assert got.shape == (3, n_steps)  # stops as soon as every row is finished (or at 12)
    for b in range(3):
        f = first[b]
        if f is None:
            assert torch.equal(got[b], new[b, :n_steps])
        else:
            assert torch.equal(got[b, :f + 1], new[b, :f + 1])  # identical up to and including EOS
            assert bool((got[b, f + 1:] == pad).all())  # then padding


class EOSBias:
    """Forward hook on the output head: a large bias on ``eos`` for the given rows, in decode
    steps only (every call of the head after the prompt's: generation computes the head on the
    last position only, (B, 1, V), for the prompt too), so EOS becomes the argmax from the second
    new token on. Use one instance per generate call."""

    def __init__(self, model, eos, rows):
        self.eos, self.rows, self.calls = eos, rows, 0
        self.handle = model.output.register_forward_hook(self)

    def __call__(self, module, inputs, out):
        self.calls += 1
        if self.calls > 1:
            out = out.clone()
            out[self.rows, :, self.eos] += 1e4
            return out

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def test_eos_bias_stops_rows_and_generation(model):
    prompt = random_tokens(ARGS, 2, 5, seed=7)
    free = model.generate(prompt, 10)[:, 5:]
    eos = next(t for t in range(ARGS.vocab_size) if t not in free.flatten().tolist())
    pad = eos + 1
    with EOSBias(model, eos, rows=[0]):  # only row 0 is pushed to EOS
        out = model.generate(prompt, 10, eos_id=eos, pad_id=pad)[:, 5:]
    assert out.shape == (2, 10)  # row 1 never finishes
    assert out[0].tolist() == [int(free[0, 0]), eos] + [pad] * 8
    assert torch.equal(out[1], free[1])  # the other row is unaffected by row 0 finishing
    with EOSBias(model, eos, rows=[0, 1]):  # every row finishes at step 1: generation stops
        out = model.generate(prompt, 10, eos_id=eos, pad_id=pad)[:, 5:]
    with EOSBias(model, eos, rows=[0, 1]):
        steps = list(model.generate_stream(prompt, 10, eos_id=eos, pad_id=pad))
    assert out.tolist() == [[int(free[0, 0]), eos], [int(free[1, 0]), eos]]
    assert len(steps) == 2


def test_stream_yields_generate_tokens_one_step_at_a_time(model):
    prompt = random_tokens(ARGS, 2, 5, seed=8)
    full = model.generate(prompt, 8)
    calls = []
    handle = model.register_forward_pre_hook(lambda m, args, kwargs: calls.append(args[0].shape[1]),
                                             with_kwargs=True)
    try:
        stream = model.generate_stream(prompt, 8)
        assert calls == []  # lazy: nothing runs before the first step is asked for
        first = next(stream)
        assert first.shape == (2,) and calls == [5]  # the prefill only
        second = next(stream)
        assert calls == [5, 1]  # one decode step per yielded token
        rest = list(stream)
    finally:
        handle.remove()
    steps = [first, second] + rest
    assert len(steps) == 8 and len(calls) == 8  # no wasted forward after the last token
    assert torch.equal(torch.stack(steps, dim=1), full[:, 5:])


@pytest.mark.parametrize("cfg", [TINY_CONFIGS[1], TINY_CONFIGS[3]], ids=["w16", "w8-k1kv"])
def test_ragged_prompt_list_equals_each_alone(cfg):
    m = make_model(cfg, seed=9)
    g = torch.Generator().manual_seed(10)
    prompts = [torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist() for n in (3, 11, 7)]
    n_new = 9  # 11 + 9 = 20: past both windows
    tokens, mask = left_pad(prompts, pad_id=0)
    assert tokens.shape == (3, 11) and mask is not None and mask.sum(-1).tolist() == [3, 11, 7]
    out = m.generate(prompts, n_new)
    assert out.shape == (3, 11 + n_new)
    assert torch.equal(out[:, :11], tokens)  # the prompt comes back left-padded
    for b, p in enumerate(prompts):
        alone = m.generate(p, n_new)
        assert alone.shape == (1, len(p) + n_new)
        assert out[b, 11:].tolist() == alone[0, len(p):].tolist(), f"prompt {b} (length {len(p)})"


# --------------------------------------------------------------------------------------------
# decode steps are the model's own forward


def test_decode_steps_go_through_block_forward(monkeypatch):
    from moe_lab.model import Block

    cfg = TINY_CONFIGS[2]
    m = make_model(cfg, seed=14)
    prompt = random_tokens(cfg, 1, 6, seed=15)
    seen, forward = [], Block.forward

    def counted(self, x, ctx):
        seen.append(x.shape[1])
        return forward(self, x, ctx)

    monkeypatch.setattr(Block, "forward", counted)
    out = m.generate(prompt, 12)
    assert seen == [6] * cfg.n_layers + [1] * (cfg.n_layers * 11)  # the prompt, then every step, every layer
    assert torch.equal(out, greedy_without_cache(m, prompt, 12))


def test_hooks_and_routing_rules_set_mid_stream_take_effect():
    from moe_lab.model import topk_softmax_routing

    cfg = TINY_CONFIGS[0]
    m = make_model(cfg, seed=16)
    prompt = random_tokens(cfg, 1, 5, seed=17)
    stream = m.generate_stream(prompt, 6)
    next(stream), next(stream)
    seen, routed = [], []
    handle = m.blocks[1].moe.hook_topk_indices.register_forward_hook(lambda mod, i, o: seen.append(o.tolist()))

    def rule(logits, k):
        routed.append(k)
        return topk_softmax_routing(logits, k)

    m.blocks[0].moe.routing_fn = rule
    try:
        next(stream)  # the hook and the new rule act from the next step on
        handle.remove()
        next(stream)  # hook gone, rule still there
        m.blocks[0].moe.routing_fn = topk_softmax_routing  # back to the default
        rest = list(stream)
    finally:
        handle.remove()
        m.blocks[0].moe.routing_fn = topk_softmax_routing
    assert len(seen) == 1 and len(routed) == 2 and len(rest) == 2
