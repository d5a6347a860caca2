"""moe_lab twins of transformers' MoE blocks (``moe_lab.moe_from_transformers``).

For each of the nine families: a seeded random tiny config whose every parameter and buffer is
random (biases, DeepSeek-V3's selection bias and Qwen2-MoE's shared gate included, none at its
initial value), in eval mode. The twin must return the block's output (fp32, within 1e-5), choose
the same experts with the same weights, and its hook points must report the same router logits,
scores, choices, dropped tokens (Switch) and shared-expert output.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

import moe_lab  # noqa: E402
from moe_lab.hooks import run_with_cache  # noqa: E402
from moe_lab.lab.figures import random_hf_block  # noqa: E402
from moe_lab.moe import MoE  # noqa: E402
from moe_lab.moe.twins import TWINS, activation_name, design_from_transformers, moe_from_transformers  # noqa: E402

D = 16
TOL = 1e-5

# family -> (module, block class, config class, config kwargs)
FAMILIES = {
    "mixtral": ("mixtral", "MixtralSparseMoeBlock", "MixtralConfig",
                dict(num_local_experts=6, num_experts_per_tok=2, intermediate_size=24)),
    "olmoe": ("olmoe", "OlmoeSparseMoeBlock", "OlmoeConfig",
              dict(num_experts=8, num_experts_per_tok=3, intermediate_size=12, norm_topk_prob=False)),
    "qwen2_moe": ("qwen2_moe", "Qwen2MoeSparseMoeBlock", "Qwen2MoeConfig",
                  dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=8,
                       shared_expert_intermediate_size=20, norm_topk_prob=False)),
    "qwen3_moe": ("qwen3_moe", "Qwen3MoeSparseMoeBlock", "Qwen3MoeConfig",
                  dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=8, norm_topk_prob=True)),
    "deepseek_v3": ("deepseek_v3", "DeepseekV3MoE", "DeepseekV3Config",
                    dict(n_routed_experts=8, num_experts_per_tok=3, moe_intermediate_size=8, n_shared_experts=2,
                         n_group=4, topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True)),
    "gpt_oss": ("gpt_oss", "GptOssMLP", "GptOssConfig",
                dict(num_local_experts=6, num_experts_per_tok=2, intermediate_size=12, swiglu_limit=1.0)),
    "llama4": ("llama4", "Llama4TextMoe", "Llama4TextConfig",
               dict(num_local_experts=4, num_experts_per_tok=1, intermediate_size=12)),
    "switch": ("switch_transformers", "SwitchTransformersSparseMLP", "SwitchTransformersConfig",
               dict(d_model=D, d_ff=20, num_experts=4, expert_capacity=3, router_bias=True)),
    "granitemoe": ("granitemoe", "GraniteMoeMoE", "GraniteMoeConfig",
                   dict(num_local_experts=6, num_experts_per_tok=2, intermediate_size=12)),
}

# (id, family, config overrides): every family once, and the other setting of each routing flag
CASES = [(f, f, {}) for f in FAMILIES] + [
    ("mixtral-top1", "mixtral", dict(num_experts_per_tok=1)),
    ("olmoe-renorm", "olmoe", dict(norm_topk_prob=True)),
    ("olmoe-gelu_tanh", "olmoe", dict(hidden_act="gelu_pytorch_tanh")),
    ("qwen2_moe-renorm", "qwen2_moe", dict(norm_topk_prob=True)),
    ("qwen3_moe-no-renorm", "qwen3_moe", dict(norm_topk_prob=False)),
    ("deepseek_v3-no-renorm-no-groups", "deepseek_v3",
     dict(norm_topk_prob=False, n_group=1, topk_group=1, n_shared_experts=1, routed_scaling_factor=1.7)),
    ("gpt_oss-limit7", "gpt_oss", dict(swiglu_limit=7.0, num_experts_per_tok=3)),
    ("llama4-top2", "llama4", dict(num_experts_per_tok=2)),
    ("switch-no-bias-capacity2", "switch", dict(router_bias=False, expert_capacity=2, num_experts=3)),
    ("granitemoe-top3", "granitemoe", dict(num_experts_per_tok=3)),
]
IDS = [c[0] for c in CASES]


def hf_block(family: str, seed: int = 0, **overrides):
    """A tiny transformers MoE block of ``family`` (width D = 16) in eval mode, every parameter and
    buffer drawn at random (weights N(0, 0.3^2), biases and buffers N(0, 0.5^2))."""
    return random_hf_block(family, seed, spec=FAMILIES[family], **overrides)


def hidden_states(seed: int = 1, B: int = 3, T: int = 10) -> torch.Tensor:
    return torch.randn(B, T, D, generator=torch.Generator().manual_seed(seed))


def hf_output(block, x):
    y = block(x)
    if isinstance(y, tuple):  # GPT-OSS (y, weights), Llama 4 (y flattened, router logits)
        y = y[0]
    return y.reshape(x.shape)


def hf_routing(family: str, block, x) -> dict:
    """The block's own router on x: logits (N, E), scores (N, E) or None, indices (N, k) (-1:
    dropped), weights (N, k)."""
    x2 = x.reshape(-1, D)
    if family == "llama4":
        scores, logits = block.router(x2)  # scores: sigmoid of the chosen logits, 0 elsewhere
        indices = logits.topk(block.router.top_k, dim=-1).indices
        return dict(logits=logits, scores=logits.sigmoid(), indices=indices, weights=scores.gather(1, indices))
    if family == "switch":
        kept, top_prob, logits = block.router(x)  # kept: (B, T, E) one-hot masked by the capacity
        kept, logits = kept.reshape(-1, kept.shape[-1]), logits.reshape(-1, logits.shape[-1])
        indices = torch.where(kept.sum(-1) > 0, kept.argmax(-1), -1)[:, None]
        weights = torch.where(indices >= 0, top_prob.reshape(-1, 1), 0.0)
        return dict(logits=logits, scores=logits.softmax(-1), indices=indices, weights=weights)
    router = block.router if family in ("gpt_oss", "granitemoe") else block.gate
    logits, weights, indices = router(x2)
    scores = {"deepseek_v3": logits.sigmoid(), "gpt_oss": None, "granitemoe": None}.get(family, logits.softmax(-1))
    return dict(logits=logits, scores=scores, indices=indices, weights=weights)


def hf_shared_out(family: str, block, x):
    x2 = x.reshape(-1, D)
    if family == "qwen2_moe":
        return torch.sigmoid(block.shared_expert_gate(x2)) * block.shared_expert(x2)
    if family == "deepseek_v3":
        return block.shared_experts(x2)
    if family == "llama4":
        return block.shared_expert(x2)
    return None


def rank_ordered(indices, weights, family):
    """DeepSeek-V3 returns its k choices unsorted (topk(sorted=False)): compare as sets."""
    if family != "deepseek_v3":
        return indices, weights
    order = indices.argsort(-1)
    return indices.gather(-1, order), weights.gather(-1, order)


@pytest.fixture(scope="module", params=CASES, ids=IDS)
def case(request):
    name, family, overrides = request.param
    block = hf_block(family, seed=sum(map(ord, name)), **overrides)
    return family, block, moe_from_transformers(block)


# --------------------------------------------------------------------------------------------
# the fixture is honest: every parameter and buffer is random


def test_every_parameter_and_buffer_is_random(case):
    family, block, _ = case
    tensors = dict(block.named_parameters()) | dict(block.named_buffers())
    biases = [n for n in tensors if "bias" in n]
    expected = {"deepseek_v3": ["gate.e_score_correction_bias"],
                "gpt_oss": ["router.bias", "experts.gate_up_proj_bias", "experts.down_proj_bias"]}
    for n in expected.get(family, []):
        assert n in biases
    if family == "qwen2_moe":
        assert "shared_expert_gate.weight" in tensors
    for n, t in tensors.items():
        assert (t != 0).all() and t.float().std() > 0.1, f"{family}: {n} is not random"


# --------------------------------------------------------------------------------------------
# the twin


def test_twin_is_a_moe_lab_block(case):
    family, block, twin = case
    assert isinstance(twin, MoE) and not twin.training
    assert moe_lab.moe_from_transformers is moe_from_transformers
    assert twin.args.n_experts == len(hf_routing(family, block, hidden_states())["logits"][0])
    # as many numbers as the block (Llama 4 and Mixtral store the same; Switch's experts too)
    n_block = sum(t.numel() for t in (*block.parameters(), *block.buffers()))
    n_twin = sum(t.numel() for t in (*twin.parameters(), *twin.buffers()))
    assert n_twin == n_block


@torch.no_grad()
def test_output_matches(case):
    family, block, twin = case
    x = hidden_states()
    theirs = hf_output(block, x)
    ours, logits = twin(x)
    assert ours.shape == x.shape and ours.dtype == torch.float32
    diff = (ours - theirs).abs().max().item()
    assert diff < TOL, f"{family}: max |twin - transformers| = {diff:.2e}"
    assert theirs.abs().mean() > 0.05  # not a vacuous comparison of near-zero outputs


@torch.no_grad()
def test_output_matches_slow_path_and_one_token(case):
    """The twin's per-expert loop (``fast = False``) and a single token agree too."""
    family, block, twin = case
    x = hidden_states(seed=2, B=2, T=7)
    theirs = hf_output(block, x)
    twin.fast = False
    try:
        ours = twin(x)[0]
    finally:
        twin.fast = True
    assert (ours - theirs).abs().max().item() < TOL
    one = x[:1, :1]
    assert (twin(one)[0] - hf_output(block, one)).abs().max().item() < TOL


def test_gradients_match(case):
    """Training sees the same block: gradients with respect to the input and the router weight agree."""
    family, block, twin = case
    x = hidden_states(seed=9, B=2, T=6)
    probe = torch.randn(x.shape, generator=torch.Generator().manual_seed(10))
    grads = []
    for model, run in ((block, lambda x: hf_output(block, x)), (twin, lambda x: twin(x)[0])):
        xg = x.clone().requires_grad_(True)
        model.zero_grad()
        (run(xg) * probe).sum().backward()
        router = twin.gate if model is twin else getattr(block, "router", None) or block.gate
        router = getattr(router, "classifier", router)  # Switch: router.classifier
        grads.append((xg.grad, router.weight.grad))
    assert (grads[0][0] - grads[1][0]).abs().max() < TOL
    assert (grads[0][1] - grads[1][1]).abs().max() < TOL
    top1_renormalised = twin.args.experts_per_token == 1 and twin.args.router_renormalise  # weights all 1
    if not top1_renormalised:
        assert grads[1][1].abs().max() > 1e-3  # the router is trained through the weights
    block.zero_grad(set_to_none=True)
    twin.zero_grad(set_to_none=True)


@torch.no_grad()
def test_hooks_report_the_routing(case):
    """hook_router_logits / hook_router_probs / hook_topk_indices / hook_topk_weights report the
    block's logits, scores, choices (-1: dropped by capacity) and weights; hook_shared_out its
    shared experts' output; hook_dropped the tokens no expert took."""
    family, block, twin = case
    x = hidden_states(seed=3)
    (_, logits), cache = run_with_cache(twin, x)
    ref = hf_routing(family, block, x)
    assert torch.equal(cache["hook_router_logits"], logits)
    assert (cache["hook_router_logits"] - ref["logits"]).abs().max() < TOL
    if ref["scores"] is not None:
        assert (cache["hook_router_probs"] - ref["scores"]).abs().max() < TOL
    ours_i, ours_w = rank_ordered(cache["hook_topk_indices"], cache["hook_topk_weights"], family)
    ref_i, ref_w = rank_ordered(ref["indices"], ref["weights"], family)
    assert torch.equal(ours_i, ref_i), f"{family}: different experts chosen"
    assert (ours_w - ref_w.float()).abs().max() < TOL
    dropped = (ref["indices"] < 0).all(-1)
    assert torch.equal(cache["hook_dropped"], dropped)
    shared = hf_shared_out(family, block, x)
    if shared is None:
        assert "hook_shared_out" not in cache
    else:
        assert (cache["hook_shared_out"] - shared).abs().max() < TOL


# --------------------------------------------------------------------------------------------
# the designs the fixtures exercise (else the parity above could hold vacuously)


@torch.no_grad()
def test_switch_drops_tokens_per_sequence():
    """Capacity 2 of 3 experts on sequences of 10 tokens: some tokens are dropped, their output is
    0 in both blocks; the capacity counts per sequence (each row of the batch keeps its own)."""
    block = hf_block("switch", seed=5, expert_capacity=2, num_experts=3)
    twin = moe_from_transformers(block)
    x = hidden_states(seed=4, B=3, T=10)
    (ours, _), cache = run_with_cache(twin, x)
    dropped = cache["hook_dropped"].view(3, 10)
    assert 0 < dropped.sum() < 30
    assert (ours.view(3, 10, D)[dropped] == 0).all() and (hf_output(block, x)[dropped] == 0).all()
    kept = cache["hook_topk_indices"].view(3, 10)
    for row in kept:  # at most 2 tokens per expert in every sequence, and some sequence uses the full 2
        assert torch.bincount(row[row >= 0], minlength=3).max() <= 2
    assert (ours - hf_output(block, x)).abs().max() < TOL
    # the same tokens as one flat sequence would drop more: the per-row count matters
    flat = twin(x.reshape(1, 30, D))[0]
    assert (flat.view(3, 10, D) - ours).abs().max() > 1e-3


@torch.no_grad()
def test_deepseek_selection_bias_and_groups_change_the_choice():
    block = hf_block("deepseek_v3", seed=6)
    twin = moe_from_transformers(block)
    x = hidden_states(seed=5)
    _, cache = run_with_cache(twin, x)
    chosen = cache["hook_topk_indices"].sort(-1).values
    twin.selection_bias.zero_()
    _, unbiased = run_with_cache(twin, x)
    assert (unbiased["hook_topk_indices"].sort(-1).values != chosen).any(-1).float().mean() > 0.1
    groups = chosen.div(2, rounding_mode="floor")  # 4 groups of 2: every token within 2 groups
    assert all(len(set(g.tolist())) <= 2 for g in groups)
    assert twin.args.n_shared_experts == 2 and twin.args.shared_hidden_dim == 8


@torch.no_grad()
def test_gpt_oss_clamp_is_active():
    """swiglu_limit = 1 clips some gate and up values, so the clamp is part of the parity."""
    block = hf_block("gpt_oss", seed=7)
    twin = moe_from_transformers(block)
    x = hidden_states(seed=6).reshape(-1, D)
    gate_up = x @ block.experts.gate_up_proj[0] + block.experts.gate_up_proj_bias[0]
    assert (gate_up.abs() > 1.0).float().mean() > 0.2
    assert (twin(x[None])[0][0] - hf_output(block, x[None])[0]).abs().max() < TOL
    unclamped = moe_from_transformers(block)
    for e in unclamped.experts:
        e.limit = 1e9
    assert (unclamped(x[None])[0] - twin(x[None])[0]).abs().max() > 1e-2


@torch.no_grad()
def test_llama4_score_multiplies_the_input():
    block = hf_block("llama4", seed=8)
    twin = moe_from_transformers(block)
    assert twin.score_on_input
    x = hidden_states(seed=7)
    twin.score_on_input = False  # the score on the output instead: a different block
    assert (twin(x)[0] - hf_output(block, x)).abs().max() > 1e-2


# --------------------------------------------------------------------------------------------
# bad input


def test_unsupported_block_names_itself_and_the_supported_ones():
    with pytest.raises(TypeError, match=r"torch\.nn\.modules\.linear\.Linear.*MixtralSparseMoeBlock.*GraniteMoeMoE"):
        moe_from_transformers(torch.nn.Linear(4, 4))

    class MixtralSparseMoeBlock(torch.nn.Module):  # the right name, not transformers' class
        pass

    with pytest.raises(TypeError, match="no moe_lab twin"):
        moe_from_transformers(MixtralSparseMoeBlock())
    assert len(TWINS) == 9


def test_unknown_activation_is_a_clear_error():
    from transformers.activations import ACT2FN

    assert activation_name(ACT2FN["silu"], "x") == "silu" and activation_name(ACT2FN["gelu_new"], "x") == "gelu_tanh"
    with pytest.raises(ValueError, match="GraniteMoeExperts.act_fn uses the activation QuickGELUActivation"):
        design_from_transformers(hf_block("granitemoe", hidden_act="quick_gelu"))


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")  # transformers' empty shared MLP
@torch.no_grad()
def test_deepseek_without_shared_experts():
    block = hf_block("deepseek_v3", seed=9, n_shared_experts=0)
    twin = moe_from_transformers(block)
    assert twin.shared_expert is None
    x = hidden_states(seed=8)
    assert (twin(x)[0] - hf_output(block, x)).abs().max() < TOL


def test_twin_keeps_dtype_and_mode():
    """A bf16 block gives a bf16 twin (DeepSeek-V3's selection bias stays fp32); a block in
    training mode gives a twin in training mode."""
    block = hf_block("deepseek_v3", seed=10).to(torch.bfloat16)
    twin = moe_from_transformers(block)
    assert twin.gate.weight.dtype == torch.bfloat16 and twin.experts[0].w1.weight.dtype == torch.bfloat16
    assert twin.selection_bias.dtype == torch.float32
    assert torch.equal(twin.selection_bias, block.gate.e_score_correction_bias.float())
    assert moe_from_transformers(hf_block("mixtral", seed=11).train()).training
