"""Named hook points: names, run_with_cache, hooks(), handles, reset_hooks, cleanup."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import TINY_CONFIGS, left_padded_batch, make_model, random_tokens
from moe_lab.hooks import ActivationCache, HookHandle, hook_dict, parse_name

ARGS = TINY_CONFIGS[1]  # top-2 of 8, GQA, sliding window


@pytest.fixture(scope="module")
def model():
    return make_model(ARGS, seed=3)


@pytest.fixture
def tokens():
    return random_tokens(ARGS, 2, 12, seed=5)


def n_attached(model) -> int:
    return sum(len(hp._forward_hooks) + len(hp._forward_pre_hooks) for hp in hook_dict(model).values())


def test_issue_hook_names_exist(model):
    names = set(model.hook_points())
    for L in range(ARGS.n_layers):
        for kind in ("router_logits", "router_probs", "topk_indices", "topk_weights"):
            assert f"blocks.{L}.moe.hook_{kind}" in names
        for e in range(ARGS.n_experts):
            assert f"blocks.{L}.moe.experts.{e}.hook_out" in names
        assert f"blocks.{L}.hook_resid_post" in names
        assert f"blocks.{L}.attn.hook_pattern" in names
    assert all(hp.name == name for name, hp in model.hook_dict.items())
    assert parse_name("blocks.1.moe.experts.5.hook_out") == ("expert_out", 1, 5)
    assert parse_name("blocks.1.moe.hook_router_logits") == ("router_logits", 1, None)
    assert parse_name("hook_embed") == ("embed", None, None)


@torch.no_grad()
def test_hook_point_is_identity_without_hooks(model):
    x = torch.randn(3, 4)
    hp = model.blocks[0].moe.hook_router_logits
    assert hp(x) is x and not hp.active


@torch.no_grad()
def test_run_with_cache_indexing(model, tokens):
    logits, cache = model.run_with_cache(tokens, names_filter=["router_logits", "topk_indices", "topk_weights",
                                                              "router_probs", "resid_mid"])
    assert isinstance(cache, ActivationCache)
    assert torch.equal(logits, model(tokens))  # caching changes nothing
    N = tokens.numel()
    for L in range(ARGS.n_layers):
        assert cache["router_logits", L] is cache[f"blocks.{L}.moe.hook_router_logits"]
        assert cache["hook_router_logits", L] is cache["router_logits", L]
        assert cache["router_logits", L].shape == (N, ARGS.n_experts)
        # the cached values are what the router computes
        block = model.blocks[L]
        expected = block.moe.gate(block.ffn_norm(cache["resid_mid", L])).reshape(N, -1)
        torch.testing.assert_close(cache["router_logits", L], expected)
        probs = cache["router_probs", L]
        assert probs.dtype == torch.float32
        torch.testing.assert_close(probs, F.softmax(expected.float(), -1))
        top = probs.topk(ARGS.experts_per_token, -1)
        assert torch.equal(cache["topk_indices", L], top.indices)
        torch.testing.assert_close(cache["topk_weights", L], top.values / top.values.sum(-1, keepdim=True))
    assert cache.layers("router_logits") == list(range(ARGS.n_layers))
    assert cache.stack("topk_indices").shape == (ARGS.n_layers, N, ARGS.experts_per_token)
    assert ("router_logits", 0) in cache and ("pattern", 0) not in cache
    with pytest.raises(KeyError, match="not in this cache"):
        cache["pattern", 0]
    assert n_attached(model) == 0


@torch.no_grad()
def test_names_filter_forms(model, tokens):
    full = "blocks.1.moe.hook_router_logits"
    for flt, expected in [
        (full, {full}),
        ("router_logits", {f"blocks.{L}.moe.hook_router_logits" for L in range(ARGS.n_layers)}),
        ("hook_topk_weights", {f"blocks.{L}.moe.hook_topk_weights" for L in range(ARGS.n_layers)}),
        ("experts.3.hook_out", {f"blocks.{L}.moe.experts.3.hook_out" for L in range(ARGS.n_layers)}),
        ([full, "embed"], {full, "hook_embed"}),
        (lambda name: name.startswith("blocks.0.hook_"), {f"blocks.0.hook_{k}" for k in
                                                           ("resid_pre", "attn_out", "resid_mid", "moe_out", "resid_post")}),
    ]:
        _, cache = model.run_with_cache(tokens, names_filter=flt)
        assert set(cache) == expected, flt
    _, cache = model.run_with_cache(tokens)  # None: everything
    assert set(model.hook_points()) - set(cache) <= {n for n in model.hook_points() if "experts" in n}
    with pytest.raises(KeyError, match="no hook point matches 'router_logit'"):
        model.run_with_cache(tokens, names_filter="router_logit")
    assert n_attached(model) == 0


@torch.no_grad()
def test_pattern_computed_only_when_requested(model, tokens, monkeypatch):
    calls = []
    attn_cls = type(model.blocks[0].attn)
    original = attn_cls._explicit_attention

    def counting(self, *a, **k):
        calls.append(1)
        return original(self, *a, **k)
    monkeypatch.setattr(attn_cls, "_explicit_attention", counting)
    model(tokens)
    model.run_with_cache(tokens, names_filter="router_logits")
    assert not calls
    logits, cache = model.run_with_cache(tokens, names_filter="blocks.0.attn.hook_pattern")
    assert len(calls) == 1  # only the hooked layer takes the explicit path
    p = cache["pattern", 0]
    B, T = tokens.shape
    assert p.shape == (B, ARGS.n_heads, T, T)
    torch.testing.assert_close(p.sum(-1), torch.ones(B, ARGS.n_heads, T))
    assert (p.triu(1) == 0).all()  # causal
    torch.testing.assert_close(logits, model(tokens), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("fast", [True, False], ids=["grouped", "reference"])
@torch.no_grad()
def test_expert_out_rows_are_the_routed_tokens(fast, tokens):
    model = make_model(ARGS, seed=3).set_fast_dispatch(fast)
    _, cache = model.run_with_cache(tokens, names_filter=["expert_out", "resid_mid", "topk_indices"])
    L = 1
    x = model.blocks[L].ffn_norm(cache["resid_mid", L]).reshape(tokens.numel(), -1)
    idx = cache["topk_indices", L]
    for e in range(ARGS.n_experts):
        rows = (idx == e).any(-1).nonzero()[:, 0]
        if len(rows) == 0:
            assert ("expert_out", L, e) not in cache
            continue
        torch.testing.assert_close(cache["expert_out", L, e], model.blocks[L].moe.experts[e](x[rows]))


@torch.no_grad()
def test_hooks_context_replaces_and_cleans_up(model, tokens):
    base = model(tokens)
    seen = []

    def zero_moe(x, hook):
        seen.append(hook.name)
        return torch.zeros_like(x)
    with model.hooks(fwd_hooks=[("blocks.1.hook_moe_out", zero_moe)]) as m:
        assert m is model
        out = model(tokens)
    assert seen == ["blocks.1.hook_moe_out"]
    assert not torch.allclose(out, base)
    # by hand: the second block's MoE output removed from the residual stream
    _, cache = model.run_with_cache(tokens, names_filter="resid_mid")
    x = cache["resid_mid", 1]
    expected = model.output(model.norm(x))
    torch.testing.assert_close(out, expected)
    assert n_attached(model) == 0
    torch.testing.assert_close(model(tokens), base, atol=0, rtol=0)


@torch.no_grad()
def test_hooks_removed_when_body_raises(model, tokens):
    with pytest.raises(RuntimeError, match="boom"):
        with model.hooks(fwd_hooks=[("router_logits", lambda x, hook: None), ("pattern", lambda x, hook: None)]):
            assert n_attached(model) == 2 * ARGS.n_layers
            raise RuntimeError("boom")
    assert n_attached(model) == 0
    # run_with_cache also cleans up when the forward fails
    bad = tokens.clone()
    bad[0, 0] = ARGS.vocab_size
    with pytest.raises(ValueError, match="outside"):
        model.run_with_cache(bad)
    assert n_attached(model) == 0


@torch.no_grad()
def test_handles_and_reset_keep_user_hooks(model, tokens):
    user_calls = []
    user_hp = model.blocks[0].moe.hook_topk_indices.register_forward_hook(lambda m, i, o: user_calls.append("hp"))
    user_lin = model.blocks[0].moe.gate.register_forward_hook(lambda m, i, o: user_calls.append("gate"))
    try:
        h1 = model.add_hook("topk_indices", lambda x, hook: None)
        h2 = model.add_hook("blocks.0.moe.hook_router_logits", lambda x, hook: None)
        assert isinstance(h1, HookHandle) and len(h1) == ARGS.n_layers and len(h2) == 1
        h2.remove()
        h2.remove()  # idempotent
        assert model.reset_hooks() == ARGS.n_layers
        assert model.reset_hooks() == 0
        # the user's own PyTorch hooks are untouched
        assert len(model.blocks[0].moe.hook_topk_indices._forward_hooks) == 1
        model(tokens)
        assert user_calls == ["gate", "hp"]
        with model.add_hook("router_logits", lambda x, hook: None):
            assert n_attached(model) == ARGS.n_layers + 1
        assert n_attached(model) == 1
    finally:
        user_hp.remove()
        user_lin.remove()
    assert n_attached(model) == 0


@torch.no_grad()
def test_run_with_cache_padded_batch_and_targets(model):
    tokens, mask, _ = left_padded_batch(ARGS, [5, 9], seed=2)
    targets = torch.roll(tokens, -1, 1)
    (logits, loss), cache = model.run_with_cache(tokens, targets, attention_mask=mask, names_filter="topk_indices")
    ref_logits, ref_loss = model(tokens, targets, attention_mask=mask)
    assert torch.equal(logits, ref_logits) and torch.equal(loss.total, ref_loss.total)
    assert cache["topk_indices", 0].shape == (tokens.numel(), ARGS.experts_per_token)
