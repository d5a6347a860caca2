"""The MoE designs of ``moe_lab/moe/`` (issue 25, item 1): each one routes by its rule, trains,
traces (hooks report its scores, choices, dropped tokens and shared-expert output), and a learner's
edit of its rule reaches every path (forward, the loss, generate, trace_routing).

The rules are checked against their definitions here; against transformers' blocks in
``tests/test_moe_from_transformers.py`` (the twins).
"""

from __future__ import annotations

import copy
import math
import warnings

import numpy as np
import pytest
import torch

import moe_lab
import moe_lab.moe.block as block_module
import moe_lab.moe.experts as experts_module
import moe_lab.moe.routers as routers
from conftest import random_tokens
from moe_lab import AblateExpert, intervene, trace_generation, trace_routing
from moe_lab.model import Mixtral, ModelArgs, count_params
from moe_lab.moe import MoE

BASE = dict(dim=32, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=16, hidden_dim=24, vocab_size=64,
            max_seq_len=64, n_experts=8, experts_per_token=2, init_std=0.05)

DESIGNS = {  # name: ModelArgs overrides (the family each one stands for)
    "mixtral": {},
    "olmoe": dict(router_renormalise=False),
    "qwen2_moe": dict(router_renormalise=False, n_shared_experts=1, shared_hidden_dim=40, shared_expert_gate=True),
    "deepseek_v3": dict(router_score="sigmoid", selection_bias=True, n_group=4, topk_group=2, experts_per_token=3,
                        routed_scaling_factor=2.5, n_shared_experts=2, shared_hidden_dim=8, hidden_dim=16,
                        first_k_dense=1, dense_hidden_dim=48),
    "gpt_oss": dict(router_bias=True, router_softmax_after_topk=True, expert_bias=True, swiglu_limit=0.05),
    "llama4": dict(experts_per_token=1, router_score="sigmoid", router_renormalise=False, score_on_input=True,
                   n_shared_experts=1),
    "switch": dict(experts_per_token=1, router_renormalise=False, capacity_factor=1.0, expert_gated=False,
                   expert_act="relu", dense_layers=[0]),
    "expert_choice": dict(router="expert_choice", capacity_factor=1.0),
}
CAUSAL = [d for d in DESIGNS if d not in ("switch", "expert_choice")]  # routing of a token ignores later tokens


def design_args(name: str, **changes) -> ModelArgs:
    return ModelArgs(**{**BASE, **DESIGNS[name], **changes})


def randomise_buffers_and_biases(model: Mixtral, seed: int = 0) -> Mixtral:
    """Biases and the selection bias away from their zero initial values (else they test nothing)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if name.endswith((".bias", "selection_bias")):
                t.copy_(0.05 * torch.randn(t.shape, generator=g))
    return model


def build(name: str, seed: int = 0, **changes) -> Mixtral:
    torch.manual_seed(seed)
    return randomise_buffers_and_biases(Mixtral(design_args(name, **changes)).eval(), seed)


def moe_layers(model) -> list[int]:
    return [i for i, b in enumerate(model.blocks) if b.moe is not None]


# --------------------------------------------------------------------------------------------
# the rules, against their definitions


def test_token_choice_with_mixtral_options_is_topk_softmax_routing():
    logits = torch.randn(50, 8, generator=torch.Generator().manual_seed(0))
    for got, ref in zip(routers.token_choice(logits, 2), routers.topk_softmax_routing(logits, 2)):
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-7)


def test_softmax_after_topk_equals_softmax_then_renormalised_topk():
    logits = 3 * torch.randn(50, 8, generator=torch.Generator().manual_seed(1))
    _, i1, w1 = routers.token_choice(logits, 3, softmax_after_topk=True)
    _, i2, w2 = routers.topk_softmax_routing(logits, 3)
    assert torch.equal(i1, i2)
    torch.testing.assert_close(w1, w2, rtol=1e-6, atol=1e-7)


def test_selection_bias_changes_the_choice_not_the_weights():
    logits = torch.randn(200, 8, generator=torch.Generator().manual_seed(2))
    bias = torch.zeros(8)
    bias[5] = 10.0  # expert 5 is always chosen...
    scores, idx, w = routers.token_choice(logits, 2, score="sigmoid", selection_bias=bias, renormalise=False)
    assert bool((idx == 5).any(-1).all())
    torch.testing.assert_close(w, logits.sigmoid().gather(-1, idx))  # ...with its unbiased sigmoid score
    torch.testing.assert_close(scores, logits.sigmoid())


def test_group_limited_routing_picks_within_the_best_groups():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(300, 16, generator=g)
    bias = 0.1 * torch.randn(16, generator=g)
    _, idx, w = routers.token_choice(logits, 4, score="sigmoid", selection_bias=bias, n_group=4, topk_group=2,
                                     scale=2.5)
    choice = (logits.sigmoid() + bias).view(300, 4, 4)
    group_score = choice.topk(2, -1).values.sum(-1)  # (N, 4): sum of each group's two best
    best = group_score.topk(2, -1).indices  # (N, 2)
    assert all(set((idx[n] // 4).tolist()) <= set(best[n].tolist()) for n in range(300))
    # inside the allowed groups, the k best by biased score
    allowed = torch.zeros(300, 4, dtype=torch.bool).scatter_(1, best, True).repeat_interleave(4, 1)
    ref = (logits.sigmoid() + bias).masked_fill(~allowed, -math.inf).topk(4, -1).indices
    assert torch.equal(idx.sort(-1).values, ref.sort(-1).values)
    torch.testing.assert_close(w.sum(-1), torch.full((300,), 2.5))  # renormalised, then scaled


def test_drop_overflow_keeps_the_first_tokens_of_each_sequence():
    E, T, B = 4, 10, 3
    g = torch.Generator().manual_seed(4)
    indices = torch.randint(0, E, (B * T, 2), generator=g)
    indices[:, 1] = (indices[:, 0] + 1 + torch.randint(0, E - 1, (B * T,), generator=g)) % E  # two distinct
    weights = torch.rand(B * T, 2, generator=g)
    kept_i, kept_w = routers.drop_overflow(indices, weights, E, capacity=3, group_size=T)
    for b in range(B):
        rows = slice(b * T, (b + 1) * T)
        i, ki = indices[rows], kept_i[rows]
        for e in range(E):
            # rank-major, then token order: first choices queue before any second choice
            queue = [(t, s) for s in range(2) for t in range(T) if i[t, s] == e]
            expect_kept = set(queue[:3])
            got_kept = {(t, s) for t in range(T) for s in range(2) if ki[t, s] == e}
            assert got_kept == expect_kept
    assert bool((kept_w[kept_i < 0] == 0).all()) and torch.equal(kept_w[kept_i >= 0], weights[kept_i >= 0])


def test_expert_choice_each_expert_takes_its_top_c_tokens_per_sequence():
    E, T, B, c = 4, 8, 2, 3
    logits = torch.randn(B * T, E, generator=torch.Generator().manual_seed(5))
    probs, idx, w = routers.expert_choice(logits, c, group_size=T)
    assert idx.shape == (B * T, E) and w.shape == (B * T, E)
    for b in range(B):
        p = probs[b * T:(b + 1) * T]
        for e in range(E):
            takers = {t for t in range(T) if (idx[b * T + t] == e).any()}
            assert takers == set(p[:, e].topk(c).indices.tolist())
    chosen = idx >= 0
    torch.testing.assert_close(w[chosen], probs.gather(-1, idx.clamp(min=0))[chosen])
    assert bool((w[~chosen] == 0).all())


def test_capacity_is_the_balanced_share_times_the_factor():
    assert routers.capacity_of(12, 1, 8, 1.0) == 2 and routers.capacity_of(12, 2, 8, 1.25) == 4
    assert routers.capacity_of(12, 2, 8, 1.25, expert_capacity=5) == 5


def test_clamped_swiglu_is_gpt_oss_formula():
    g = torch.Generator().manual_seed(6)
    gate, up = 10 * torch.randn(100, generator=g), 10 * torch.randn(100, generator=g)
    got = experts_module.clamped_swiglu(gate, up, 1.702, 7.0)
    gc, uc = gate.clamp(max=7.0), up.clamp(-7.0, 7.0)
    torch.testing.assert_close(got, (uc + 1) * (gc * torch.sigmoid(1.702 * gc)))


# --------------------------------------------------------------------------------------------
# configs: Mixtral stays the default; bad values get errors naming the field


@pytest.mark.parametrize("name", sorted(moe_lab.model.DESIGNS))
def test_named_designs_build_and_run(name):
    args = ModelArgs(**BASE).with_design(name)
    assert args.design_changes() == {k: v for k, v in moe_lab.model.DESIGNS[name].items()
                                     if k in moe_lab.model.DESIGN_FIELDS}
    model = Mixtral(args)
    tokens = random_tokens(args, 2, 8, seed=1)
    _, loss = model(tokens, tokens)
    assert torch.isfinite(loss.total)
    with pytest.raises(ValueError, match="unknown MoE design 'mixtrall'"):
        args.with_design("mixtrall")


def test_default_block_is_mixtrals():
    moe = MoE(ModelArgs(**BASE))
    assert moe.routing_fn is moe_lab.topk_softmax_routing
    assert set(moe.state_dict()) == {"gate.weight"} | {f"experts.{e}.{w}.weight" for e in range(8)
                                                       for w in ("w1", "w2", "w3")}
    assert moe_lab.model.MoE is MoE and moe_lab.model.Expert is moe_lab.moe.Expert


@pytest.mark.parametrize("changes, field", [
    (dict(capacity_factor=0.0), "capacity_factor must be > 0.*found 0.0"),
    (dict(capacity_factor=-1.0), "capacity_factor must be > 0.*found -1.0"),
    (dict(expert_capacity=0), "expert_capacity must be >= 1.*found 0"),
    (dict(experts_per_token=9), r"experts_per_token=9 must be in \[1, n_experts=8\]"),
    (dict(n_group=3), "n_group must divide n_experts=8.*found n_group=3"),
    (dict(n_group=4, topk_group=5), r"topk_group must be in \[1, n_group=4\], found 5"),
    (dict(n_group=4, topk_group=1, experts_per_token=3), "experts_per_token=3 must be <= the experts of topk_group=1"),
    (dict(n_shared_experts=1, shared_hidden_dim=0), "shared_hidden_dim must be >= 1.*n_shared_experts=1, found 0"),
    (dict(shared_expert_gate=True), "shared_expert_gate=True needs n_shared_experts >= 1, found 0"),
    (dict(router="experts"), r"router must be one of \['topk', 'expert_choice'\], found 'experts'"),
    (dict(router_score="tanh"), "router_score must be one of.*found 'tanh'"),
    (dict(expert_act="swish"), "expert_act must be one of.*found 'swish'"),
    (dict(router_softmax_after_topk=True, router_score="sigmoid"), "router_softmax_after_topk=True needs router_score"),
    (dict(router="expert_choice", selection_bias=True), "router='expert_choice' uses softmax scores"),
    (dict(swiglu_limit=0.0), "swiglu_limit must be > 0"),
    (dict(swiglu_limit=7.0, expert_gated=False), "swiglu_limit=7.0 clamps a SwiGLU"),
    (dict(first_k_dense=3), r"first_k_dense must be in \[0, n_layers=2\], found 3"),
    (dict(dense_layers=[2]), r"dense_layers must be layer numbers in \[0, n_layers=2\), found \[2\]"),
])
def test_bad_design_configs_name_the_field(changes, field):
    with pytest.raises(ValueError, match=field):
        ModelArgs(**{**BASE, **changes})


@pytest.mark.parametrize("design", list(DESIGNS) + ["dense"])
def test_count_params_matches_the_modules(design):
    args = ModelArgs(**{**BASE, "first_k_dense": 2}) if design == "dense" else design_args(design)
    model = Mixtral(args)
    weights = sum(p.numel() for n, p in model.named_parameters() if not n.endswith(".bias"))
    assert count_params(args).total == weights
    active = count_params(args).active
    if design == "dense":
        assert active == count_params(args).total


def test_mixtral_checkpoint_formats_refuse_other_designs(tmp_path):
    model = build("switch")
    with pytest.raises(ValueError, match=r"Mixtral models only.*'capacity_factor': 1.0.*torch.save"):
        moe_lab.save_model(model, tmp_path / "m")
    with pytest.raises(ValueError, match="Mixtral models only"):
        moe_lab.save_model(model, tmp_path / "m", layout="mistral")
    assert not (tmp_path / "m").exists()
    moe_lab.save_model(build("mixtral"), tmp_path / "m")  # Mixtral itself still saves


def test_dense_layers_have_an_ffn_and_no_router():
    model = build("deepseek_v3", n_layers=3, dense_layers=[2])
    assert [b.moe is None for b in model.blocks] == [True, False, True]
    assert "blocks.0.ffn.w1.weight" in model.state_dict() and model.blocks[0].ffn.w1.out_features == 48
    tokens = random_tokens(model.args, 2, 10, seed=1)
    trace = trace_routing(model, [r.tolist() for r in tokens], progress=False)
    assert trace.layers == [1]
    with intervene(model, AblateExpert(layer=1, expert=0)):
        assert not bool((model.blocks[1].moe.route(torch.randn(30, 32))[1] == 0).any())
    with pytest.raises(ValueError, match="layer 0 is not an MoE layer"):
        with intervene(model, AblateExpert(layer=0, expert=0)):
            pass
    with pytest.raises(ValueError, match="layer 0 is a dense layer"):
        trace_routing(model, [tokens[0].tolist()], layers=[0], progress=False)
    _, loss = model(tokens, tokens)
    assert torch.isfinite(loss.total)


# --------------------------------------------------------------------------------------------
# every design: its paths agree, it trains, it traces


@pytest.mark.parametrize("design", DESIGNS)
def test_grouped_dispatch_equals_the_loop(design):
    model = build(design, seed=1)
    tokens = random_tokens(model.args, 3, 12, seed=2)
    fast = model(tokens)
    loop = model.set_fast_dispatch(False)(tokens)
    torch.testing.assert_close(fast, loop, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("design", CAUSAL)
def test_cached_decoding_equals_the_full_forward(design):
    model = build(design, seed=3)
    tokens = random_tokens(model.args, 2, 14, seed=4)
    with torch.inference_mode():
        full = model(tokens)
        cache = model.new_cache(2, 16)
        steps = torch.cat([model(tokens[:, :9], cache=cache)] + [model(tokens[:, t:t + 1], cache=cache)
                                                                 for t in range(9, 14)], 1)
    torch.testing.assert_close(steps, full, rtol=1e-5, atol=1e-5)


def test_a_model_without_moe_layers_runs_and_says_there_is_nothing_to_trace():
    model = Mixtral(ModelArgs(**{**BASE, "first_k_dense": 2}))
    tokens = random_tokens(model.args, 2, 8, seed=1)
    logits, loss = model(tokens, tokens)
    assert float(loss.load_balancing) == 0.0 and torch.equal(loss.total, loss.ce)
    with pytest.raises(ValueError, match="no MoE layer"):
        trace_routing(model, [tokens[0].tolist()], progress=False)


@pytest.mark.parametrize("design", DESIGNS)
def test_each_design_trains_with_moe_lab_train(design, tmp_path):
    from moe_lab.corpus import Corpus
    from moe_lab.tokenizer import load_tokenizer
    from moe_lab.train import DataConfig, OptimConfig, TrainConfig, train
    from test_train import _docs

    domains = ["numbers", "code", "prose"]
    corpus = Corpus(train=[d for k, dom in enumerate(domains) for d in _docs(dom, 30, k)],
                    heldout=[d for k, dom in enumerate(domains) for d in _docs(dom, 6, 100 + k)], domains=domains)
    args = ModelArgs(**{**BASE, **DESIGNS[design], "vocab_size": 32000, "init_std": 0.02})
    cfg = TrainConfig(model=args, data=DataConfig(seq_len=32, eval_tokens_per_domain=128, eval_windows=2, probe_windows=1),
                      optim=OptimConfig(steps=12, batch_size=4, lr=1e-2, min_lr=1e-3, warmup_steps=2),
                      name=f"design-{design}", seed=0, num_threads=1, log_every=4, eval_every=12,
                      checkpoint_every=100, snapshot_every=12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = train(cfg, None, corpus=corpus, tokenizer=load_tokenizer(), progress=False)
    ce = [r["ce"] for r in result.log if r["type"] == "train"]
    assert len(ce) == 3 and ce[-1] < ce[0] - 1.0, ce  # from ~ln(32000) = 10.4 down
    if design == "deepseek_v3":  # the selection bias was trained by DeepSeek-V3's rule
        bias = result.model.blocks[1].moe.selection_bias
        assert bias.abs().max() > 0
        assert torch.allclose(bias / args.selection_bias_rate, (bias / args.selection_bias_rate).round(), atol=1e-3)


@pytest.mark.parametrize("fast", [True, False])
def test_a_block_whose_every_slot_is_empty_adds_only_the_shared_expert(fast):
    moe = MoE(design_args("llama4"))
    moe.fast = fast
    moe.routing_fn = lambda logits, k: (logits.sigmoid(), torch.full((len(logits), k), -1), torch.zeros(len(logits), k))
    x = torch.randn(2, 5, 32)
    y, _ = moe(x)
    torch.testing.assert_close(y, moe.shared(x.reshape(-1, 32)).view(2, 5, 32))
    with torch.no_grad():
        torch.testing.assert_close(moe(x[:1, :1])[0], moe.shared(x[0, :1]).view(1, 1, 32))


def test_selection_bias_update_is_deepseek_v3s_rule():
    model = build("deepseek_v3", seed=5)
    moe = model.blocks[1].moe
    x = torch.randn(2, 30, 32)
    before = moe.selection_bias.clone()
    with torch.no_grad():
        moe(x)  # eval mode: unchanged
    assert torch.equal(moe.selection_bias, before)
    moe.train()
    idx = moe.route(x.reshape(-1, 32))[1]
    load = torch.bincount(idx.flatten(), minlength=8).float()
    expected = before + 0.001 * torch.sign(load.mean() - load)
    torch.testing.assert_close(moe.selection_bias, expected)
    moe.eval()


@pytest.mark.parametrize("design", DESIGNS)
def test_each_design_traces(design):
    """The hooks report the design's scores, choices, dropped tokens and shared output, and
    trace_routing records them (-1 / weight 0 for empty slots)."""
    model = build(design, seed=6)
    args = model.args
    tokens = random_tokens(args, 2, 16, seed=7)
    names = ["router_logits", "router_probs", "topk_indices", "topk_weights", "dropped", "resid_mid"]
    if args.n_shared_experts:
        names.append("shared_out")
    _, cache = model.run_with_cache(tokens, names_filter=names)
    for L in moe_layers(model):
        moe = model.blocks[L].moe
        logits, probs = cache["router_logits", L], cache["router_probs", L]
        idx, w, dropped = cache["topk_indices", L], cache["topk_weights", L], cache["dropped", L]
        assert logits.shape == probs.shape == (32, 8)
        score = logits.float().sigmoid() if args.router_score == "sigmoid" else logits.float().softmax(-1)
        torch.testing.assert_close(probs, score)
        k = 8 if args.router == "expert_choice" else args.experts_per_token
        assert idx.shape == w.shape == (32, k) and dropped.shape == (32,)
        assert torch.equal(dropped, (idx < 0).all(-1)) and bool((w[idx < 0] == 0).all())
        if design == "switch":  # capacity ceil(16 / 8) = 2 per sequence: some tokens dropped
            assert 0 < int(dropped.sum()) < 32
            assert all(int((idx[b * 16:(b + 1) * 16] == e).sum()) <= 2 for b in range(2) for e in range(8))
        if design == "expert_choice":  # each expert takes ceil(1.0 * 16 * k=2 / 8) = 4 tokens of each sequence
            assert all(int((idx[b * 16:(b + 1) * 16] == e).sum()) == 4 for b in range(2) for e in range(8))
        if args.n_shared_experts:
            x = model.blocks[L].ffn_norm(cache["resid_mid", L]).reshape(-1, 32)
            torch.testing.assert_close(cache["shared_out", L], moe.shared(x))
    trace = trace_routing(model, [r.tolist() for r in tokens], progress=False)
    hook_ids = torch.stack([cache["topk_indices", L] for L in moe_layers(model)])
    assert trace.layers == moe_layers(model)
    assert torch.equal(torch.from_numpy(trace.expert_ids), hook_ids)
    assert (trace.weights[trace.expert_ids < 0] == 0).all()


@pytest.mark.parametrize("design", DESIGNS)
def test_interventions_act_on_each_design(design):
    """Interventions wrap each design's rule (``compose`` around ``MoE.routing_fn``)."""
    model = build(design, seed=12)
    docs = [r.tolist() for r in random_tokens(model.args, 2, 12, seed=13)]
    layer = moe_layers(model)[-1]
    base = trace_routing(model, docs, progress=False)
    assert (base.expert_ids == 3).any()
    with intervene(model, AblateExpert(layer=layer, expert=3)):
        ablated = trace_routing(model, docs, progress=False)
        with torch.no_grad():
            model(random_tokens(model.args, 1, 5, seed=14))
    assert not (ablated.expert_ids[ablated.layers.index(layer)] == 3).any()
    assert model.blocks[layer].moe.routing_fn == model.blocks[layer].moe.default_routing_fn()  # restored
    assert np.array_equal(trace_routing(model, docs, progress=False).expert_ids, base.expert_ids)


# --------------------------------------------------------------------------------------------
# a learner's edit of each rule reaches forward, the loss, generate and the tracer


def paths(model: Mixtral) -> dict[str, torch.Tensor]:
    args = model.args
    tokens, targets = random_tokens(args, 2, 12, seed=8), random_tokens(args, 2, 12, seed=9)
    out = {"forward": model(tokens).detach()}
    out["ce"] = model(tokens, targets, return_logits=False)[1].ce.detach()
    with torch.no_grad():
        out["no_grad"] = model(tokens)
    out["generate"] = model.generate(tokens[:1, :5], 5)
    trace = trace_routing(model, [r.tolist() for r in tokens], progress=False)
    out["trace_ids"], out["trace_w"] = torch.from_numpy(trace.expert_ids), torch.from_numpy(trace.weights)
    gen, gtrace = trace_generation(model, [tokens[0, :3].tolist(), tokens[1, :6].tolist()], 4)
    out["trace_gen_tokens"], out["trace_gen_ids"] = gen, torch.from_numpy(gtrace.expert_ids)
    return out


def negate_router(model: Mixtral) -> Mixtral:
    eq = copy.deepcopy(model)
    with torch.no_grad():
        for i in moe_layers(eq):
            for p in eq.blocks[i].moe.gate.parameters():
                p.neg_()
    return eq


def rebuilt(model: Mixtral) -> Mixtral:
    """The model built again (after an edit of the source) with the same weights."""
    new = Mixtral(model.args.replace()).eval()
    new.load_state_dict(model.state_dict())
    return new


def negated_rule(monkeypatch, design):
    """Edit the design's rule function so that it routes on the negated logits."""
    if design == "mixtral":
        rule = routers.topk_softmax_routing
        monkeypatch.setattr(routers, "topk_softmax_routing", lambda logits, k: rule(-logits, k))
    elif design == "expert_choice":
        rule = routers.expert_choice
        monkeypatch.setattr(routers, "expert_choice", lambda logits, *a, **kw: rule(-logits, *a, **kw))
    else:
        rule = routers.token_choice
        monkeypatch.setattr(routers, "token_choice", lambda logits, k, **kw: rule(-logits, k, **kw))


def assert_paths_equal(got: dict, ref: dict, plain: dict) -> None:
    assert any(not torch.equal(ref[k], plain[k]) for k in ref), "the edit must change something"
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-5, msg=lambda m: f"{k}: {m}")


@pytest.mark.parametrize("design", DESIGNS)
def test_an_edit_of_the_routing_rule_reaches_every_path(design, monkeypatch):
    base = build(design, seed=10)
    plain, ref = paths(base), paths(negate_router(base))  # the equivalent weight change: -Wg (and -b)
    negated_rule(monkeypatch, design)
    assert_paths_equal(paths(rebuilt(base)), ref, plain)


# each design's own step, edited: (design, the edit, the equivalent config change)
def _no_capacity(monkeypatch):
    monkeypatch.setattr(routers, "drop_overflow", lambda indices, weights, *a, **kw: (indices, weights))


def _no_group_limit(monkeypatch):
    monkeypatch.setattr(routers, "limit_to_groups", lambda choice, *a: choice)


def _unclamped(monkeypatch):
    monkeypatch.setattr(experts_module, "clamped_swiglu",
                        lambda gate, up, alpha, limit: (up + 1) * gate * torch.sigmoid(alpha * gate))


def _score_on_output(monkeypatch):
    monkeypatch.setattr(block_module.MoE, "expert_input", lambda self, x, w: x)
    monkeypatch.setattr(block_module.MoE, "weighted_output", lambda self, y, w: w * y)


def _ungated_shared(monkeypatch):
    monkeypatch.setattr(block_module.MoE, "shared", lambda self, x: self.shared_expert(x))


STEP_EDITS = {
    "switch: no capacity": ("switch", _no_capacity, dict(capacity_factor=None)),
    "deepseek_v3: no group limit": ("deepseek_v3", _no_group_limit, dict(n_group=1, topk_group=1)),
    "gpt_oss: unclamped swiglu": ("gpt_oss", _unclamped, dict(swiglu_limit=1e30)),
    "llama4: score on the output": ("llama4", _score_on_output, dict(score_on_input=False)),
    "qwen2_moe: ungated shared expert": ("qwen2_moe", _ungated_shared, dict(shared_expert_gate=False)),
}


@pytest.mark.parametrize("edit", STEP_EDITS)
def test_an_edit_of_a_design_step_reaches_every_path(edit, monkeypatch):
    design, apply_edit, same_as = STEP_EDITS[edit]
    base = build(design, seed=11)
    plain = paths(base)
    equivalent = Mixtral(base.args.replace(**same_as)).eval()
    equivalent.load_state_dict(base.state_dict(), strict=False)  # (without the shared gate's weight)
    ref = paths(equivalent)
    apply_edit(monkeypatch)
    assert_paths_equal(paths(rebuilt(base)), ref, plain)


def test_hook_dropped_listens_after_a_copy():
    """The block's quick "is anyone listening to hook_dropped" test follows the hook point, also in a
    deep copy (the copied block watches its own hook point, not the original's)."""
    import copy

    args = ModelArgs(dim=16, hidden_dim=32, n_experts=4, experts_per_token=1, n_layers=1, n_heads=2, n_kv_heads=2,
                     head_dim=8, vocab_size=32, capacity_factor=0.5)
    moe = MoE(args).eval()
    twin = copy.deepcopy(moe)
    seen = []
    twin.hook_dropped.register_forward_hook(lambda m, i, o: seen.append(o))
    x = torch.randn(1, 8, 16)
    moe(x)
    assert seen == []  # the original's hook point has no listener
    twin(x)
    assert len(seen) == 1 and seen[0].dtype == torch.bool and bool(seen[0].any())  # capacity 0.5 drops tokens
