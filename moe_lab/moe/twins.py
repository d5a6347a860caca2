"""The moe_lab twin of a transformers MoE block: ``moe_from_transformers(block)``.

Nine families ship one MoE block each in transformers; each is one set of ``ModelArgs`` design
options of moe_lab's single ``MoE`` block. ``moe_from_transformers`` reads the family's options
off the block, builds ``MoE(ModelArgs(...))`` and copies the weights in (no formula is copied: the
twin's forward is moe_lab's block). Given the same hidden states [B, T, D], both return the same
output (fp32: within 1e-5, ``tests/test_twins.py``), and the twin's hook points show the routing.

==================  ===============================  =============================================
family              transformers block               moe_lab design options
==================  ===============================  =============================================
Mixtral             ``MixtralSparseMoeBlock``        the defaults (softmax, top-k, renormalised)
OLMoE               ``OlmoeSparseMoeBlock``          ``router_renormalise`` = ``norm_topk_prob``
Qwen2-MoE           ``Qwen2MoeSparseMoeBlock``       same, + a shared expert with a sigmoid gate
Qwen3-MoE           ``Qwen3MoeSparseMoeBlock``       ``router_renormalise`` = ``norm_topk_prob``
DeepSeek-V3         ``DeepseekV3MoE``                sigmoid, selection-only bias, groups, scaling,
                                                     shared experts
GPT-OSS             ``GptOssMLP``                    router bias, softmax after top-k, expert
                                                     biases, clamped SwiGLU
Llama 4             ``Llama4TextMoe``                sigmoid top-k, score on the input, a shared
                                                     expert
Switch              ``SwitchTransformersSparseMLP``  top-1, not renormalised, ``expert_capacity``
                                                     per sequence, ReLU FFN experts
GraniteMoE          ``GraniteMoeMoE``                softmax after top-k
==================  ===============================  =============================================

What the twin returns differs from some blocks: moe_lab's ``MoE`` returns ``(y [B, T, D],
router_logits [B*T, E])``; GPT-OSS returns ``(y, routing weights)``, Llama 4 ``(y [B*T, D],
router_logits)``, the others ``y``. Compared in eval mode: the training-time jitter noise of
Mixtral and Switch (``router_jitter_noise``) is not part of the twin. DeepSeek-V3's selection bias
is a buffer in both; the twin also has DeepSeek-V3's update rule (``selection_bias_rate``, applied
only in training mode), which transformers' block does not run. transformers is not imported
here: the block's class is recognised by its name.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
from torch import Tensor

from ..hooks import name_hook_points
from ..model import ModelArgs  # model.py imports moe/__init__ (block, experts, routers), never this file
from .block import MoE
from .experts import ACTIVATIONS

Converter = Callable[[nn.Module], tuple[dict, dict[str, Tensor]]]


# --------------------------------------------------------------------------------------------
# weight layouts


def _fused_experts(gate_up: Tensor, down: Tensor, transposed: bool = False,
                   interleaved: bool = False) -> dict[str, Tensor]:
    """transformers' 3-D expert weights -> ``experts.{e}.w1 / w3 / w2.weight`` (nn.Linear layout).

    gate_up (E, 2I, D) and down (E, D, I) (Mixtral, OLMoE, Qwen, DeepSeek, Granite); ``transposed``:
    gate_up (E, D, 2I), down (E, I, D) (GPT-OSS, Llama 4). The gate is the first half of 2I and
    the up projection the second, or (``interleaved``, GPT-OSS) the even and odd columns.
    """
    if transposed:
        gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)  # (E, 2I, D), (E, D, I)
    if interleaved:
        gate, up = gate_up[:, 0::2], gate_up[:, 1::2]
    else:
        gate, up = gate_up.chunk(2, dim=1)  # (E, I, D) each
    state = {}
    for e in range(gate_up.shape[0]):
        state[f"experts.{e}.w1.weight"] = gate[e]
        state[f"experts.{e}.w3.weight"] = up[e]
        state[f"experts.{e}.w2.weight"] = down[e]
    return state


def _mlp(prefix: str, mlp: nn.Module) -> dict[str, Tensor]:
    """A transformers SwiGLU MLP (``gate_proj``, ``up_proj``, ``down_proj``) -> ``{prefix}.w1/w3/w2.weight``."""
    return {f"{prefix}.w1.weight": mlp.gate_proj.weight, f"{prefix}.w3.weight": mlp.up_proj.weight,
            f"{prefix}.w2.weight": mlp.down_proj.weight}


def activation_name(fn: Callable, where: str) -> str:
    """The name in ``moe_lab.moe.ACTIVATIONS`` of the function that ``fn`` (a transformers
    activation module) computes, found by evaluating both on a grid of points."""
    x = torch.linspace(-6.0, 6.0, 97)
    with torch.no_grad():
        y = fn(x)
        for name, ours in ACTIVATIONS.items():
            if torch.allclose(ours(x), y, rtol=0, atol=1e-6):
                return name
    raise ValueError(f"moe_from_transformers: {where} uses the activation {type(fn).__name__}, which is none of "
                     f"moe_lab's {sorted(ACTIVATIONS)}")


def _same_activation(*named: tuple[Callable, str]) -> str:
    names = {where: activation_name(fn, where) for fn, where in named}
    if len(set(names.values())) > 1:
        raise ValueError(f"moe_from_transformers: the routed and shared experts use different activations {names}; "
                         "moe_lab's block has one expert_act")
    return next(iter(names.values()))


# --------------------------------------------------------------------------------------------
# one converter per family: block -> (ModelArgs design fields, MoE state dict)


def _softmax_topk(block: nn.Module) -> tuple[dict, dict[str, Tensor]]:
    """Mixtral, OLMoE, Qwen3-MoE (and the routed part of Qwen2-MoE): softmax over all experts,
    top-k, renormalised (Mixtral always; the others when ``norm_topk_prob``)."""
    gate, experts = block.gate, block.experts
    fields = dict(dim=gate.weight.shape[1], n_experts=gate.num_experts, experts_per_token=gate.top_k,
                  hidden_dim=experts.intermediate_dim, router_renormalise=getattr(gate, "norm_topk_prob", True),
                  expert_act=activation_name(experts.act_fn, f"{type(experts).__name__}.act_fn"))
    state = {"gate.weight": gate.weight, **_fused_experts(experts.gate_up_proj, experts.down_proj)}
    return fields, state


def _qwen2_moe(block: nn.Module) -> tuple[dict, dict[str, Tensor]]:
    """Qwen2-MoE: OLMoE's routing plus one shared expert times sigmoid(x . w_gate)."""
    fields, state = _softmax_topk(block)
    shared = block.shared_expert
    fields.update(n_shared_experts=1, shared_hidden_dim=shared.intermediate_size, shared_expert_gate=True,
                  expert_act=_same_activation((block.experts.act_fn, "experts.act_fn"),
                                              (shared.act_fn, "shared_expert.act_fn")))
    state.update(_mlp("shared_expert", shared), **{"shared_expert_gate.weight": block.shared_expert_gate.weight})
    return fields, state


def _deepseek_v3(block: nn.Module) -> tuple[dict, dict[str, Tensor]]:
    """DeepSeek-V3: sigmoid scores, a selection-only bias, group-limited choice, renormalised (when
    ``norm_topk_prob``), times ``routed_scaling_factor``; shared experts added (one wide MLP)."""
    gate, experts, shared = block.gate, block.experts, block.shared_experts
    n_shared = getattr(getattr(block, "config", None), "n_shared_experts", 1) or 1
    if shared.intermediate_size % n_shared:
        n_shared = 1
    if shared.intermediate_size == 0:  # n_shared_experts = 0: transformers keeps an empty MLP
        n_shared = 0
    fields = dict(dim=gate.weight.shape[1], n_experts=gate.num_experts, experts_per_token=gate.top_k,
                  hidden_dim=experts.intermediate_dim, router_score="sigmoid", router_renormalise=gate.norm_topk_prob,
                  selection_bias=True, n_group=gate.num_group, topk_group=gate.topk_group,
                  routed_scaling_factor=float(gate.routed_scaling_factor),
                  n_shared_experts=n_shared, shared_hidden_dim=shared.intermediate_size // max(n_shared, 1),
                  expert_act=_same_activation((experts.act_fn, "experts.act_fn"),
                                              (shared.act_fn, "shared_experts.act_fn")))
    state = {"gate.weight": gate.weight, "selection_bias": gate.e_score_correction_bias,
             **_fused_experts(experts.gate_up_proj, experts.down_proj)}
    if n_shared:
        state.update(_mlp("shared_expert", shared))
    return fields, state


def _gpt_oss(block: nn.Module) -> tuple[dict, dict[str, Tensor]]:
    """GPT-OSS: router with a bias, top-k on the logits then softmax over the k; experts with
    biases and the clamped SwiGLU, gate/up interleaved and stored transposed."""
    router, experts = block.router, block.experts
    fields = dict(dim=router.weight.shape[1], n_experts=router.num_experts, experts_per_token=router.top_k,
                  hidden_dim=experts.intermediate_size, router_bias=True, router_softmax_after_topk=True,
                  expert_bias=True, swiglu_limit=float(experts.limit), swiglu_alpha=float(experts.alpha))
    state = {"gate.weight": router.weight, "gate.bias": router.bias,
             **_fused_experts(experts.gate_up_proj, experts.down_proj, transposed=True, interleaved=True)}
    for e in range(router.num_experts):
        state[f"experts.{e}.w1.bias"] = experts.gate_up_proj_bias[e, 0::2]
        state[f"experts.{e}.w3.bias"] = experts.gate_up_proj_bias[e, 1::2]
        state[f"experts.{e}.w2.bias"] = experts.down_proj_bias[e]
    return fields, state


def _llama4(block: nn.Module) -> tuple[dict, dict[str, Tensor]]:
    """Llama 4: top-k of the logits, sigmoid of the chosen ones (not renormalised) multiplying the
    expert's input; one ungated shared expert."""
    router, experts, shared = block.router, block.experts, block.shared_expert
    fields = dict(dim=router.weight.shape[1], n_experts=router.num_experts, experts_per_token=router.top_k,
                  hidden_dim=experts.expert_dim, router_score="sigmoid", router_renormalise=False, score_on_input=True,
                  n_shared_experts=1, shared_hidden_dim=shared.gate_proj.out_features,
                  expert_act=_same_activation((experts.act_fn, "experts.act_fn"),
                                              (shared.activation_fn, "shared_expert.activation_fn")))
    state = {"gate.weight": router.weight, **_fused_experts(experts.gate_up_proj, experts.down_proj, transposed=True),
             **_mlp("shared_expert", shared)}
    return fields, state


def _switch(block: nn.Module) -> tuple[dict, dict[str, Tensor]]:
    """Switch Transformers: top-1 of the softmax, weight = that probability (not renormalised);
    each expert takes at most ``expert_capacity`` tokens of each sequence, in order; experts are
    T5 feed-forwards wo(relu(wi x))."""
    router = block.router
    classifier = router.classifier
    if router.dtype != torch.float32:
        raise ValueError(f"moe_from_transformers: {type(block).__name__} routes in router_dtype={router.dtype}; "
                         "the twin routes in float32 (as router_dtype='float32', the default)")
    first = block.experts["expert_0"]
    fields = dict(dim=classifier.in_features, n_experts=router.num_experts, experts_per_token=1,
                  hidden_dim=first.wi.out_features, router_renormalise=False, router_bias=classifier.bias is not None,
                  expert_capacity=int(router.expert_capacity), expert_gated=False,
                  expert_act=activation_name(first.act, "experts.expert_0.act"))
    state = {"gate.weight": classifier.weight}
    if classifier.bias is not None:
        state["gate.bias"] = classifier.bias
    for e in range(router.num_experts):
        expert = block.experts[f"expert_{e}"]
        state[f"experts.{e}.w1.weight"] = expert.wi.weight
        state[f"experts.{e}.w2.weight"] = expert.wo.weight
    return fields, state


def _granite(block: nn.Module) -> tuple[dict, dict[str, Tensor]]:
    """GraniteMoE: top-k on the logits, softmax over the k (as GPT-OSS, without biases)."""
    router, experts = block.router, block.experts
    fields = dict(dim=router.weight.shape[1], n_experts=router.num_experts, experts_per_token=router.top_k,
                  hidden_dim=experts.intermediate_dim, router_softmax_after_topk=True,
                  expert_act=activation_name(experts.act_fn, f"{type(experts).__name__}.act_fn"))
    state = {"gate.weight": router.weight, **_fused_experts(experts.gate_up_proj, experts.down_proj)}
    return fields, state


TWINS: dict[str, Converter] = {
    "MixtralSparseMoeBlock": _softmax_topk,
    "OlmoeSparseMoeBlock": _softmax_topk,
    "Qwen2MoeSparseMoeBlock": _qwen2_moe,
    "Qwen3MoeSparseMoeBlock": _softmax_topk,
    "DeepseekV3MoE": _deepseek_v3,
    "GptOssMLP": _gpt_oss,
    "Llama4TextMoe": _llama4,
    "SwitchTransformersSparseMLP": _switch,
    "GraniteMoeMoE": _granite,
}


# --------------------------------------------------------------------------------------------
# the entry point


def design_from_transformers(block: nn.Module):
    """The ``ModelArgs`` (design fields filled, attention fields minimal) and the ``MoE`` state
    dict of the twin of ``block``; ``moe_from_transformers`` builds the block from them."""
    name = type(block).__name__
    convert = TWINS.get(name)
    if convert is None or not type(block).__module__.startswith("transformers."):
        raise TypeError(f"moe_from_transformers: no moe_lab twin for {type(block).__module__}.{name}; supported "
                        f"transformers MoE blocks: {', '.join(TWINS)}")
    fields, state = convert(block)
    args = ModelArgs(n_layers=1, n_heads=1, n_kv_heads=1, head_dim=2, vocab_size=2, **fields)
    return args, state


def moe_from_transformers(block: nn.Module) -> MoE:
    """The moe_lab twin of a transformers MoE block: ``MoE(args)`` with the same weights.

    ``twin(x)`` on hidden states x [B, T, D] returns ``(y, router_logits)`` with y equal to the
    block's output (the first element of its tuple for GPT-OSS, reshaped to [B, T, D] for Llama 4).
    The twin has the block's dtype, device and train/eval mode, and its hook points are named
    (``run_with_cache(twin, x)`` records ``hook_router_logits``, ``hook_topk_indices``, ...);
    ``twin.args`` is its ``ModelArgs``.
    """
    args, state = design_from_transformers(block)
    weight = state["experts.0.w1.weight"]  # the experts' dtype (DeepSeek-V3 keeps its router in fp32)
    twin = MoE(args).to(device=weight.device, dtype=weight.dtype)
    if twin.selection_bias is not None:
        twin.selection_bias = twin.selection_bias.float()  # fp32, as DeepSeek-V3's e_score_correction_bias
    with torch.no_grad():
        twin.load_state_dict({k: v.detach() for k, v in state.items()}, strict=True)
    twin.args = args
    name_hook_points(twin)
    return twin.train(block.training)
