"""moe_lab.attribution: exact decompositions of router logits and output logits (fp32)."""

from __future__ import annotations

import pytest
import torch

from conftest import CONFIG_IDS, TINY_CONFIGS, make_model, random_tokens
from moe_lab import AblateExpert, StreamingMixtral, intervene, load_model, save_model
from moe_lab.attribution import logit_attribution, router_attribution


@pytest.mark.parametrize("args", TINY_CONFIGS, ids=CONFIG_IDS)
def test_router_attribution_sums_to_router_logits(args):
    model = make_model(args, seed=11)
    tokens = random_tokens(args, 1, 14, seed=5)
    L = args.n_layers - 1
    a = router_attribution(model, tokens, L)
    assert a.contributions.shape == (len(a.components), 14, args.n_experts)
    assert a.components[0] == "embed" and a.components[-1] == f"attn.{L}" and "moe.0" in a.components
    _, cache = model.run_with_cache(tokens, names_filter="router_logits")
    torch.testing.assert_close(a.router_logits, cache["router_logits", L], atol=0, rtol=0)
    torch.testing.assert_close(a.contributions.sum(0), a.router_logits, atol=1e-4, rtol=0)
    # per-expert parts replace moe.l and keep the sum; experts not chosen contribute exactly 0
    b = router_attribution(model, tokens[0], L, per_expert=True)
    assert "moe.0" not in b.components and f"moe.0.expert.{args.n_experts - 1}" in b.components
    torch.testing.assert_close(b.contributions.sum(0), a.router_logits, atol=1e-4, rtol=0)
    _, cache = model.run_with_cache(tokens, names_filter="topk_indices")
    chosen = torch.zeros(14, args.n_experts, dtype=torch.bool)
    chosen.scatter_(1, cache["topk_indices", 0], True)
    parts0 = torch.stack([b.contributions[b.components.index(f"moe.0.expert.{e}")] for e in range(args.n_experts)])
    assert (parts0.abs().sum(-1).T[~chosen] == 0).all()
    # layer 0: embedding and its own attention only
    a0 = router_attribution(model, tokens, 0)
    assert a0.components == ["embed", "attn.0"]
    assert a.table(3, 0).index[0] in a.components


@pytest.mark.parametrize("args", TINY_CONFIGS[1:3], ids=CONFIG_IDS[1:3])
def test_logit_attribution_sums_to_target_logits(args):
    model = make_model(args, seed=12)
    tokens = random_tokens(args, 1, 12, seed=6)
    a = logit_attribution(model, tokens)
    with torch.no_grad():
        logits = model(tokens)[0]
    want = logits[torch.arange(11), tokens[0, 1:]]
    torch.testing.assert_close(a.target_logits, want, atol=0, rtol=0)
    torch.testing.assert_close(a.contributions.sum(0), want, atol=1e-4, rtol=0)
    assert len(a.components) == 1 + args.n_layers * (1 + args.n_experts)
    targets = torch.full((12,), 7)
    b = logit_attribution(model, tokens, targets=targets)
    torch.testing.assert_close(b.contributions.sum(0), logits[:, 7], atol=1e-4, rtol=0)
    # under an intervention the decomposition is of the intervened model
    with intervene(model, AblateExpert(0, 1, mode="zero")):
        c = logit_attribution(model, tokens)
        with torch.no_grad():
            want = model(tokens)[0][torch.arange(11), tokens[0, 1:]]
    torch.testing.assert_close(c.contributions.sum(0), want, atol=1e-4, rtol=0)
    assert (c.contributions[c.components.index("moe.0.expert.1")] == 0).all()


def test_attribution_on_partial_and_streaming_models(tmp_path):
    args = TINY_CONFIGS[3]
    full = make_model(args, seed=13)
    path = save_model(full, tmp_path / "c")
    tokens = random_tokens(args, 1, 10, seed=7)
    part = load_model(path, layers=[1, 2])
    a = router_attribution(part, tokens, 2, per_expert=True)
    assert a.components[:2] == ["embed", "attn.1"] and a.components[-1] == "attn.2"
    torch.testing.assert_close(a.contributions.sum(0), a.router_logits, atol=1e-4, rtol=0)
    la = logit_attribution(part, tokens)
    with StreamingMixtral(path, layers=[1, 2]) as sm:
        s = router_attribution(sm, tokens, 2, per_expert=True)
        sl = logit_attribution(sm, tokens)
        assert sm.loaded_blocks() == []
    assert s.components == a.components and torch.equal(s.contributions, a.contributions)
    assert torch.equal(sl.contributions, la.contributions)
    with pytest.raises(ValueError, match=r"layer 0 is not in this model \(its layers: \[1, 2\]\)"):
        router_attribution(part, tokens, 0)
    with pytest.raises(ValueError, match="one sequence"):
        router_attribution(part, tokens.expand(2, -1), 1)


@pytest.mark.parametrize("args", [TINY_CONFIGS[0], TINY_CONFIGS[3]], ids=[CONFIG_IDS[0], CONFIG_IDS[3]])
def test_router_logits_without_a_component(args):
    """The causal cross-check of the direct parts: one component removed at one position."""
    from moe_lab.attribution import router_logits_without

    model = make_model(args, seed=12)
    tokens = random_tokens(args, 1, 12, seed=6)
    L, pos = args.n_layers - 1, 7
    a = router_attribution(model, tokens, L)
    torch.testing.assert_close(router_logits_without(model, tokens, L, pos, None), a.router_logits, atol=0, rtol=0)
    # without its own attention at pos, layer L's router reads norm(resid_pre) there; other positions unchanged
    got = router_logits_without(model, tokens, L, pos, f"attn.{L}")
    _, cache = model.run_with_cache(tokens, names_filter=f"blocks.{L}.hook_resid_pre")
    block = model.blocks[L]
    with torch.no_grad():
        want = block.moe.gate(block.ffn_norm(cache["resid_pre", L][0, pos]))
    torch.testing.assert_close(got[pos], want.float(), atol=1e-5, rtol=1e-5)
    keep = torch.arange(12) != pos
    torch.testing.assert_close(got[keep], a.router_logits[keep], atol=1e-6, rtol=0)
    # an expert's slot at pos: removing every expert chosen there equals removing moe.0 (top-1: the one chosen)
    if args.experts_per_token == 1:
        _, c = model.run_with_cache(tokens, names_filter="topk_indices")
        e = int(c["topk_indices", 0][pos, 0])
        torch.testing.assert_close(router_logits_without(model, tokens, L, pos, f"moe.0.expert.{e}"),
                                   router_logits_without(model, tokens, L, pos, "moe.0"), atol=1e-6, rtol=0)
        other = (e + 1) % args.n_experts  # an expert not chosen there: nothing changes
        torch.testing.assert_close(router_logits_without(model, tokens, L, pos, f"moe.0.expert.{other}"),
                                   a.router_logits, atol=0, rtol=0)
    # the embedding at pos matters at pos
    assert not torch.allclose(router_logits_without(model, tokens, L, pos, "embed")[pos], a.router_logits[pos])
    for bad in ("attn.9", "mlp.0", "moe.0.expert.99", "moe.0.x.1"):
        with pytest.raises(ValueError, match="unknown component"):
            router_logits_without(model, tokens, L, pos, bad)
    assert not model.blocks[0].moe._forward_hooks and not model.hook_embed._forward_hooks
