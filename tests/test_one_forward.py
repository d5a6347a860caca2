"""One forward per concept: an edit to a formula in ``moe_lab/model.py`` reaches every path.

A learner changes ``Expert.forward``, ``Attention.forward``, ``MoE.forward``, ``Block.forward`` or
the routing rule (here: a monkeypatched method, as an edit of the source would be). Each edit has
an equivalent *weight* change (doubling an expert's output = doubling its ``w2``; routing to the
least likely experts = negating the router's weights), exact in floating point. Every path must
then give the edited model's numbers: the forward with and without autograd, the training loss,
a padded batch, every decode step of ``generate`` / ``generate_stream``, ``trace_routing``,
``trace_generation`` and ``StreamingMixtral``. A fast path that computed a formula itself
instead of calling the edited method fails here.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch

import moe_lab.moe.routers as routers_module  # where the routing rules live (moe_lab/moe/routers.py)
from conftest import TINY_CONFIGS, left_padded_batch, make_model, random_tokens
from moe_lab import StreamingMixtral, save_model, trace_generation, trace_routing
from moe_lab.model import (Attention, Block, Expert, ForwardContext, KVCache, Mixtral, ModelArgs, MoE, apply_rope,
                           rope_cos_sin, rope_inv_freq, sliding_window_mask, topk_softmax_routing)

ARGS = TINY_CONFIGS[1]  # GQA 2, top-2 of 8, sliding window 16
N_NEW = 6


def all_paths(model: Mixtral, checkpoint) -> dict[str, torch.Tensor]:
    """Every way moe_lab runs a model, on fixed inputs; results as tensors."""
    tokens = random_tokens(ARGS, 2, 20, seed=1)  # longer than the window: the mask is used
    targets = random_tokens(ARGS, 2, 20, seed=2)
    padded, mask, _ = left_padded_batch(ARGS, [9, 5], seed=3)
    prompt = random_tokens(ARGS, 1, 7, seed=4)
    docs = [r.tolist() for r in random_tokens(ARGS, 3, 11, seed=5)]
    out = {"grad": model(tokens).detach(),
           # the cross-entropy (the load-balancing loss is transformers' function of the router
           # logits, which the routing edit below negates: it is not compared)
           "train_ce": model(tokens, targets, return_logits=False)[1].ce.detach()}
    with torch.no_grad():
        out["no_grad"] = model(tokens)
        out["padded"] = model(padded, attention_mask=mask)
    with torch.inference_mode():
        out["inference"] = model(tokens)
        cache = model.new_cache(2, 24)
        out["cached"] = torch.cat([model(tokens[:, :13], cache=cache), model(tokens[:, 13:17], cache=cache),
                                   model(tokens[:, 17:18], cache=cache), model(tokens[:, 18:], cache=cache)], 1)
    out["generate"] = model.generate(prompt, N_NEW)
    out["generate_batch"] = model.generate([docs[0][:4], docs[1]], N_NEW)  # left-padded rows
    out["stream"] = torch.stack(list(model.generate_stream(prompt, N_NEW)), 1)
    trace = trace_routing(model, docs, progress=False)
    out["trace_ids"], out["trace_w"] = torch.from_numpy(trace.expert_ids), torch.from_numpy(trace.weights)
    gen, gtrace = trace_generation(model, [docs[0][:3], docs[2][:6]], N_NEW)
    out["trace_gen_tokens"] = gen
    out["trace_gen_ids"], out["trace_gen_w"] = torch.from_numpy(gtrace.expert_ids), torch.from_numpy(gtrace.weights)
    sm = StreamingMixtral(checkpoint)
    out["streaming"] = sm(padded, attention_mask=mask)
    out["streaming_trace_ids"] = torch.from_numpy(trace_routing(sm, docs, progress=False).expert_ids)
    sm.close()
    return out


def assert_same(got: dict, ref: dict, base: dict) -> None:
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-6, atol=1e-6, msg=lambda m: f"{name}: {m}")
    # the edit changed the numbers (otherwise this test would prove nothing)
    assert not torch.allclose(got["no_grad"], base["no_grad"])


def scaled(model: Mixtral, names: tuple[str, ...], factor: float) -> Mixtral:
    """A copy of ``model`` with every parameter whose name ends with one of ``names`` scaled."""
    other = copy.deepcopy(model)
    with torch.no_grad():
        for n, p in other.named_parameters():
            if n.endswith(names):
                p.mul_(factor)
    return other


def _double_expert(monkeypatch, calls):
    forward = Expert.forward

    def edited(self, x):
        calls.append(x.shape[0])
        return 2 * forward(self, x)
    monkeypatch.setattr(Expert, "forward", edited)


def _double_attention(monkeypatch, calls):
    forward = Attention.forward

    def edited(self, x, *a, **kw):
        calls.append(x.shape[1])
        return 2 * forward(self, x, *a, **kw)
    monkeypatch.setattr(Attention, "forward", edited)


def _double_moe(monkeypatch, calls):
    forward = MoE.forward

    def edited(self, x):
        calls.append(x.shape[1])
        y, logits = forward(self, x)
        return 2 * y, logits
    monkeypatch.setattr(MoE, "forward", edited)


def _double_attention_branch(monkeypatch, calls):
    def edited(self, x, ctx):  # Block.forward rewritten by a learner: attention counts twice
        calls.append(x.shape[1])
        h = x + 2 * self.attn(self.attention_norm(x), ctx.cos, ctx.sin, ctx.mask, ctx.cache)
        moe_out, router_logits = self.moe(self.ffn_norm(h))
        return h + moe_out, router_logits
    monkeypatch.setattr(Block, "forward", edited)


def _least_likely_experts(monkeypatch, calls):
    def edited(logits, k):  # route each token to the experts the router likes least
        calls.append(logits.shape[0])
        return topk_softmax_routing(-logits, k)
    monkeypatch.setattr(routers_module, "topk_softmax_routing", edited)


EDITS = {  # name: (edit, equivalent weight change: parameter names, factor)
    "Expert.forward x2": (_double_expert, ("w2.weight",), 2.0),
    "Attention.forward x2": (_double_attention, ("wo.weight",), 2.0),
    "MoE.forward x2": (_double_moe, ("w2.weight",), 2.0),
    "Block.forward attention x2": (_double_attention_branch, ("wo.weight",), 2.0),
    "routing rule: least likely experts": (_least_likely_experts, ("gate.weight",), -1.0),
}


@pytest.mark.parametrize("fast", [True, False], ids=["grouped", "loop"])
@pytest.mark.parametrize("edit", list(EDITS))
def test_an_edit_reaches_every_path(edit, fast, tmp_path, monkeypatch):
    apply_edit, names, factor = EDITS[edit]
    base = make_model(ARGS, seed=21).set_fast_dispatch(fast)
    equivalent = scaled(base, names, factor)
    ref = all_paths(equivalent, save_model(equivalent, tmp_path / "equivalent"))
    plain = all_paths(base, save_model(base, tmp_path / "base"))
    calls: list[int] = []
    apply_edit(monkeypatch, calls)
    edited = make_model(ARGS, seed=21).set_fast_dispatch(fast)  # built after the edit, as after editing the source
    got = all_paths(edited, tmp_path / "base")
    assert_same(got, ref, plain)
    assert 1 in calls  # the one-token decode steps went through the edited code


def test_a_routing_rule_set_on_a_built_model_reaches_every_path(tmp_path):
    """``MoE.routing_fn`` (what interventions swap) is what every path routes with."""
    base = make_model(ARGS, seed=22)
    equivalent = scaled(base, ("gate.weight",), -1.0)
    ref = all_paths(equivalent, save_model(equivalent, tmp_path / "equivalent"))
    for block in base.blocks:
        block.moe.routing_fn = lambda logits, k: topk_softmax_routing(-logits, k)
    got = {k: v for k, v in all_paths(base, save_model(base, tmp_path / "base")).items()
           if not k.startswith("streaming")}  # a StreamingMixtral builds its own blocks
    for name in got:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-6, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_a_subclassed_expert_is_called_in_decode_steps():
    class Loud(Expert):
        calls = 0

        def forward(self, x):
            Loud.calls += 1
            return 3 * super().forward(x)

    model = make_model(ARGS, seed=23)
    equivalent = scaled(model, ("blocks.1.moe.experts.2.w2.weight",), 3.0)
    swapped = Loud(ARGS.dim, ARGS.hidden_dim)
    swapped.load_state_dict(model.blocks[1].moe.experts[2].state_dict())
    model.blocks[1].moe.experts[2] = swapped
    prompt = random_tokens(ARGS, 1, 9, seed=24)
    assert torch.equal(model.generate(prompt, 12), equivalent.generate(prompt, 12))
    assert Loud.calls > 1


def test_set_fast_dispatch_false_is_honoured_in_decode_steps(monkeypatch):
    grouped, model = [], make_model(ARGS, seed=25)
    dispatch = MoE.dispatch_grouped
    monkeypatch.setattr(MoE, "dispatch_grouped", lambda self, *a: grouped.append(1) or dispatch(self, *a))
    prompt = random_tokens(ARGS, 1, 5, seed=26)
    fast = model.generate(prompt, 8)
    assert len(grouped) == 8 * ARGS.n_layers
    grouped.clear()
    assert torch.equal(model.set_fast_dispatch(False).generate(prompt, 8), fast)
    assert grouped == []


# --------------------------------------------------------------------------------------------
# the pieces: RoPE, the mask, the cache, embed -> blocks -> head


def test_apply_rope_is_rotation_by_pos_times_inv_freq():
    hd, theta = 16, 1e4
    pos = torch.tensor([[0, 1, 5, 100]])  # (B, T)
    x = torch.randn(1, 4, 3, hd, dtype=torch.float64)  # (B, T, heads, hd)
    inv_freq = rope_inv_freq(hd, theta).double()
    cos, sin = rope_cos_sin(pos, inv_freq, torch.float64)
    got = apply_rope(x, cos, sin)
    for t in range(4):
        for i in range(hd // 2):
            a = pos[0, t].item() * inv_freq[i].item()
            R = torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]], dtype=torch.float64)
            pair = x[0, t, :, 2 * i:2 * i + 2]  # (heads, 2)
            torch.testing.assert_close(got[0, t, :, 2 * i:2 * i + 2], pair @ R.T)


def test_sliding_window_mask_is_causal_and_windowed():
    # 3 new queries after 4 cached keys, window 3: query at slot q sees keys q-2..q
    mask = sliding_window_mask(4, 3, 3)[0, 0]
    want = torch.tensor([[s <= q and s > q - 3 for s in range(7)] for q in range(4, 7)])
    assert torch.equal(mask, want)
    assert sliding_window_mask(0, 5, None) is None and sliding_window_mask(9, 1, None) is None
    key_mask = torch.tensor([[False, True, True]])  # a padding key is hidden, except from itself
    m = sliding_window_mask(0, 3, None, key_mask)[0, 0]
    assert torch.equal(m, torch.tensor([[True, False, False], [False, True, False], [False, True, True]]))


def test_kv_cache_update_and_advance():
    cache = KVCache(ARGS, batch_size=2, max_len=8)
    k, v = torch.randn(2, ARGS.n_kv_heads, 3, ARGS.head_dim), torch.randn(2, ARGS.n_kv_heads, 3, ARGS.head_dim)
    keys, values = cache.update(1, k, v)
    assert torch.equal(keys, k) and torch.equal(values, v) and cache.length == 0
    cache.advance(3)
    k2 = torch.randn(2, ARGS.n_kv_heads, 1, ARGS.head_dim)
    keys, _ = cache.update(1, k2, k2)
    assert torch.equal(keys, torch.cat([k, k2], 2)) and not cache.k[0].any()


def test_embed_blocks_head_is_forward():
    model = make_model(ARGS, seed=27)
    tokens, mask, _ = left_padded_batch(ARGS, [12, 7], seed=28)
    with torch.no_grad():
        x, ctx = model.embed(tokens, mask)
        assert isinstance(ctx, ForwardContext) and ctx.positions.shape == tokens.shape
        for block in model.blocks:
            x, _ = block(x, ctx)
        assert torch.equal(model.head(x), model(tokens, attention_mask=mask))
        assert torch.equal(model.head(x[:, [-1]]), model(tokens, attention_mask=mask, last_only=True))


# --------------------------------------------------------------------------------------------
# names: experts_per_token (the model's K) vs top_k (generation's sampling cut-off)


def test_top_k_is_a_deprecated_name_of_experts_per_token():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new name warns about nothing
        args = ModelArgs(n_experts=4, experts_per_token=3)
        assert args.replace(dim=64).experts_per_token == 3 and "top_k" not in args.to_dict()
    with pytest.warns(DeprecationWarning, match="experts_per_token"):
        old = ModelArgs(n_experts=4, top_k=3)
    assert old == args
    with pytest.warns(DeprecationWarning, match="experts_per_token"):
        assert ModelArgs.from_dict({"n_experts": 4, "top_k": 1}).experts_per_token == 1
    with pytest.warns(DeprecationWarning, match="experts_per_token"):
        assert args.top_k == 3
    with pytest.raises(ValueError, match="experts_per_token=5 must be in"):
        ModelArgs(n_experts=4, experts_per_token=5)
    moe = MoE(args)
    with pytest.warns(DeprecationWarning, match="experts_per_token"):
        moe.top_k = 1
    assert moe.experts_per_token == 1
    _, indices, _ = moe.route(torch.randn(5, args.dim))
    assert indices.shape == (5, 1)


def test_the_one_position_head_follows_the_output_weight():
    """``Mixtral.head`` on one position (decode steps) uses a [D, V] copy of the output weight:
    it must follow in-place edits, a replaced parameter, hooks and subclasses of the output."""
    model = make_model(ARGS, seed=29)
    x = torch.randn(2, 1, ARGS.dim)
    with torch.no_grad():
        def plain():
            return model.norm(x) @ model.output.weight.T
        torch.testing.assert_close(model.head(x), plain())
        model.output.weight.mul_(2)  # in place
        torch.testing.assert_close(model.head(x), plain())
        model.output.weight = torch.nn.Parameter(torch.randn_like(model.output.weight))  # replaced
        torch.testing.assert_close(model.head(x), plain())
        with model.output.register_forward_hook(lambda mod, i, out: out + 1):  # hooked: the module runs
            torch.testing.assert_close(model.head(x), plain() + 1)
        model.output = torch.nn.Linear(ARGS.dim, ARGS.vocab_size, bias=True)  # a bias: the module runs
        torch.testing.assert_close(model.head(x), model.output(model.norm(x)))
