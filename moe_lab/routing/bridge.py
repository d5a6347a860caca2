"""The transformers bridge: routing traces and interventions on ``transformers`` MoE models.

``moe_lab.trace_routing(hf_model, ...)`` and ``moe_lab.intervene(hf_model, ...)`` accept a
transformers model and give the same :class:`~moe_lab.routing.trace.RoutingTrace` and the same
interventions as on a moe_lab ``Mixtral``. This is how a user who runs real Mixtral through
transformers gets the same analyses and figures. Written for ``device_map="auto"`` too (inputs
go to the embedding's device, each hook works on its router's device, captured tensors are
gathered on the CPU at the end of each batch) -- but tested on CPU only.

How: transformers v5 gives every MoE layer a router module (``model.layers[L].mlp.gate``, a
``MixtralTopKRouter``) whose forward returns ``(router_logits (N, E), top_k_weights (N, k),
top_k_index (N, k))`` and whose output the experts then use. A forward hook on the router
records these three tensors; the intervention hook replaces them.

Tested with transformers 5.x (``tests/test_bridge.py``: tiny random configs; the traced expert
ids are compared with the indices the model's experts module actually receives, through a
forward pre-hook independent of the router hook; Mixtral is also compared with moe_lab on the
same weights, traces, interventions and generation):

================  ============================  ===========  =================================
model             router class                  tracing      interventions
================  ============================  ===========  =================================
Mixtral           ``MixtralTopKRouter``         yes          yes (identical to moe_lab's)
Qwen2-MoE         ``Qwen2MoeTopKRouter``        yes          yes
Qwen3-MoE         ``Qwen3MoeTopKRouter``        yes          yes
OLMoE             ``OlmoeTopKRouter``           yes          yes
FlexOlmo          ``FlexOlmoTopKRouter``        yes          yes
MiniMax           ``MiniMaxTopKRouter``         yes          yes
Granite-MoE       ``GraniteMoeTopKRouter``      yes          yes
GPT-OSS           ``GptOssTopKRouter``          yes          yes
Jamba             ``JambaTopKRouter``           yes          yes
PhiMoE            ``PhimoeTopKRouter``          yes          no (sparsemixer routing)
DeepSeek-V3       ``DeepseekV3TopkRouter``      yes          no (grouped sigmoid routing)
ERNIE-4.5-MoE     ``Ernie4_5_MoeTopKRouter``    yes          no (bias-corrected choice)
================  ============================  ===========  =================================

``ROUTERS`` below is that list. Other transformers models whose router module returns the same
``(logits, weights, indices)`` triple are *detected* and traced, with a warning that they are
untested; interventions refuse routers whose rule moe_lab cannot recompute. Interventions
recompute the routing from the router logits (softmax in fp32, top-k, renormalised when the
model renormalises) and replace the router's output through a forward hook, so the experts
receive the intervened indices and weights (also inside ``generate``). Everything that acts on
the routing works (``AblateExpert`` in both modes, ``SteerExperts``, ``ForceExpert``,
``SetTopK``, ``RouterTemperature``, ``CustomRouting``); ``SwapExpert`` does not (transformers
fuses a layer's experts into one module) and says so.

This module is an adapter: it knows transformers' modules and calling conventions and nothing
about interventions or traces (it imports neither); :mod:`moe_lab.routing.interventions` and
:mod:`moe_lab.routing.tracing` call it.

Notes:

* Weights in a trace are always renormalised over the top-k (the ``RoutingTrace`` contract).
  Models with ``norm_topk_prob=False`` (Qwen2-MoE, Qwen3-MoE, OLMoE defaults; Jamba) *apply*
  the unrenormalised top-k probabilities (DeepSeek-V3 scales them);
  ``trace.meta["model_renormalises_weights"]`` says which.
* Rank order: the order the router returns (sorted by probability for the softmax routers,
  first then second choice for PhiMoE); DeepSeek-V3's unsorted top-k is sorted by weight.
* Layers without a router (Qwen2-MoE's ``mlp_only_layers`` / ``decoder_sparse_step``) are
  left out of the trace; ``trace.layers`` lists the model layer of each row.
* transformers **v4** module names (``block_sparse_moe.gate`` as a plain ``nn.Linear``,
  routing done inside the MoE block) are **not supported** (v4 is not installed here, so it
  is untested): ``moe_lab.checkpoints.convert.from_hf_model`` converts any Mixtral checkpoint (v4 names
  included) into a moe_lab model instead.
"""

from __future__ import annotations

import json
import re
import warnings
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..devices import model_device
from ..hooks import StopForward

# Router classes the tests check: class name -> (model_type, rule). rule "softmax_topk": softmax
# over all experts, top-k, renormalised when ``renormalise`` (None: the router's norm_topk_prob)
# -- interventions can recompute it; "own": another rule (sparsemixer, grouped sigmoid with a
# bias, ...) -- traced as the model routes, but interventions are refused.
ROUTERS: dict[str, tuple[str, str, bool | None]] = {
    "MixtralTopKRouter": ("mixtral", "softmax_topk", True),
    "Qwen2MoeTopKRouter": ("qwen2_moe", "softmax_topk", None),
    "Qwen3MoeTopKRouter": ("qwen3_moe", "softmax_topk", None),
    "OlmoeTopKRouter": ("olmoe", "softmax_topk", None),
    "FlexOlmoTopKRouter": ("flex_olmo", "softmax_topk", None),
    "MiniMaxTopKRouter": ("minimax", "softmax_topk", True),
    "GraniteMoeTopKRouter": ("granitemoe", "softmax_topk", True),  # top-k of logits, softmax over k: same
    "GptOssTopKRouter": ("gpt_oss", "softmax_topk", True),  # idem (logits include the router bias)
    "JambaTopKRouter": ("jamba", "softmax_topk", False),
    "PhimoeTopKRouter": ("phimoe", "own", None),  # sparsemixer (rank order kept: 1st choice, then 2nd)
    "DeepseekV3TopkRouter": ("deepseek_v3", "own", None),  # sigmoid, group-limited, biased; unsorted top-k
    "Ernie4_5_MoeTopKRouter": ("ernie4_5_moe", "own", None),  # choice by bias-corrected probabilities
}
# routers whose top-k comes back unsorted: the trace sorts their experts by weight
UNSORTED_ROUTERS = {"DeepseekV3TopkRouter"}
TESTED_MODELS: dict[str, str] = {model_type: cls for cls, (model_type, _, _) in ROUTERS.items()}
_ROUTER_NAME = re.compile(r"(?i)(top_?k_?router|router)$")


def is_hf_model(model) -> bool:
    """True for a ``transformers`` model (checked by class module, without importing transformers)."""
    return any(c.__module__.startswith("transformers.") for c in type(model).__mro__)


def decoder_layers(model) -> nn.ModuleList:
    """The list of decoder layers (``model.model.layers`` for a ``*ForCausalLM``)."""
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and name.split(".")[-1] == "layers" and len(mod):
            return mod
    raise TypeError(f"cannot find the decoder layers (a ModuleList named 'layers') in {type(model).__name__}")


def find_routers(model, warn: bool = True) -> dict[int, nn.Module]:
    """``{layer: router module}`` for every decoder layer with a top-k router."""
    layers = decoder_layers(model)
    routers: dict[int, nn.Module] = {}
    for i, layer in enumerate(layers):
        for name, mod in layer.named_modules():
            if (_ROUTER_NAME.search(type(mod).__name__) and type(mod) is not nn.Linear
                    and isinstance(getattr(mod, "weight", None), Tensor) and hasattr(mod, "top_k")):
                routers[i] = mod
                break
    if not routers:
        v4 = any(type(getattr(getattr(l, "block_sparse_moe", None), "gate", None)) is nn.Linear for l in layers)
        if v4:
            raise NotImplementedError(
                f"{type(model).__name__} uses transformers v4 module names (block_sparse_moe.gate is a plain "
                "Linear); the bridge supports transformers v5 routers only. Convert the weights with "
                "moe_lab.checkpoints.convert.from_hf_model(model) and trace the moe_lab model instead.")
        raise TypeError(f"{type(model).__name__} has no top-k router modules the bridge recognises "
                        f"(tested models: {sorted(TESTED_MODELS)})")
    cls = type(next(iter(routers.values()))).__name__
    if warn and cls not in ROUTERS:
        warnings.warn(f"{cls} ({type(model).__name__}) is not among the routers tested with the bridge "
                      f"({sorted(TESTED_MODELS)}); its (logits, weights, indices) output is recorded as it is",
                      stacklevel=3)
    return routers


def n_experts_of(router: nn.Module) -> int:
    return int(getattr(router, "num_experts", None) or router.weight.shape[0])


def renormalises(router: nn.Module) -> bool | None:
    """Whether the model applies top-k weights that sum to 1 (False for norm_topk_prob=False;
    None when unknown)."""
    _, rule, renorm = ROUTERS.get(type(router).__name__, (None, "own", None))
    if renorm is None and hasattr(router, "norm_topk_prob"):
        return bool(router.norm_topk_prob)
    return renorm


def hf_meta(model) -> dict:
    import transformers

    cfg = getattr(model, "config", None)
    config = json.loads(cfg.to_json_string(use_diff=False)) if cfg is not None else {}
    routers = find_routers(model, warn=False)
    p = next(model.parameters())
    return {"source": "transformers", "model_class": type(model).__name__,
            "model_type": getattr(cfg, "model_type", None), "config": config, "dtype": str(p.dtype).replace("torch.", ""),
            "transformers_version": transformers.__version__,
            "router_class": type(next(iter(routers.values()))).__name__,
            "model_renormalises_weights": renormalises(next(iter(routers.values())))}


def input_device(model) -> torch.device:
    """Where the model's inputs go: its token embedding's device (:func:`moe_lab.devices.model_device`)."""
    return model_device(model)


def _check_router_output(router, out) -> None:
    if not (isinstance(out, tuple) and len(out) == 3 and isinstance(out[2], Tensor)
            and not out[2].dtype.is_floating_point and out[0].dim() == 2):
        raise TypeError(f"{type(router).__name__} returned {type(out).__name__}; the bridge expects "
                        "(router_logits (N, E), top_k_weights (N, k), top_k_index (N, k))")


class RouterRecorder:
    """Context manager recording every router call of a transformers model.

    ``records[layer]`` is a list of ``(indices, weights, logits or None)`` per forward, tensors
    as the model made them (no copy, no device sync)."""

    def __init__(self, model, layers=None, keep_logits: bool = False):
        routers = find_routers(model)
        wanted = list(routers) if layers is None else list(layers)
        missing = [l for l in wanted if l not in routers]
        if missing:
            raise ValueError(f"layer(s) {missing} have no router; MoE layers are {list(routers)}")
        self.routers = {l: routers[l] for l in wanted}
        self.layers = wanted
        self.keep_logits = keep_logits
        self.records: dict[int, list] = {l: [] for l in wanted}
        self._handles = []

    def __enter__(self):
        for layer, router in self.routers.items():
            rec, keep = self.records[layer], self.keep_logits

            def hook(mod, inputs, out, rec=rec, keep=keep):
                _check_router_output(mod, out)
                rec.append((out[2], out[1], out[0] if keep else None))
            self._handles.append(router.register_forward_hook(hook))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def take(self) -> dict[int, list]:
        out = {l: list(calls) for l, calls in self.records.items()}
        for calls in self.records.values():  # cleared in place: the hooks hold these lists
            calls.clear()
        return out


def hf_forward(model, tokens: Tensor, attention_mask: Tensor | None, stop_after: nn.Module | None = None):
    """One forward of the decoder on ``tokens`` [B, T] (left-padded, positions restarting at 0 on
    the first real token like moe_lab's), without the LM head; stops after ``stop_after``."""
    device = input_device(model)
    tokens = tokens.to(device)
    kw = {"use_cache": False}
    if attention_mask is not None:
        attention_mask = attention_mask.to(device)
        kw["attention_mask"] = attention_mask
        kw["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    base = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    base = base if isinstance(base, nn.Module) else model
    handle = None
    if stop_after is not None:
        def stop(mod, inputs, out):
            raise StopForward
        handle = stop_after.register_forward_hook(stop)
    try:
        base(input_ids=tokens, **kw)
    except StopForward:
        pass
    finally:
        if handle is not None:
            handle.remove()


# --------------------------------------------------------------------------------------------
# replacing router outputs (what ``moe_lab.intervene`` calls on a transformers model)
#
# The bridge is an adapter: it knows transformers' module names and call conventions, and
# nothing about interventions. ``moe_lab.routing.interventions`` composes its rules into one
# routing function per layer and hands them to :func:`replace_router_outputs`.


def softmax_topk_rule(renormalise: bool):
    """The routing rule of the softmax top-k routers: ``fn(logits (N, E), top_k) -> (probs (N, E)
    fp32, indices (N, k), weights (N, k))``, weights renormalised over the k when ``renormalise``."""
    def rule(logits: Tensor, top_k: int):
        probs = F.softmax(logits.float(), dim=-1)
        weights, indices = torch.topk(probs, top_k, dim=-1)
        if renormalise:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return probs, indices, weights
    return rule


def replaceable_routers(model) -> dict[int, nn.Module]:
    """``{layer: router}`` of a model whose routers' rule moe_lab can recompute (softmax, top-k);
    ``NotImplementedError`` naming the router class otherwise."""
    routers = find_routers(model)
    ok = sorted(c for c, (_, rule, _) in ROUTERS.items() if rule == "softmax_topk")
    bad = {type(r).__name__ for r in routers.values()} - set(ok)
    if bad:
        raise NotImplementedError(f"interventions need a router whose rule moe_lab can recompute (softmax, top-k); "
                                  f"{sorted(bad)} route differently (supported: {ok})")
    return routers


def base_rule(router: nn.Module):
    """The routing rule ``router`` applies, as a function of its logits (see :func:`softmax_topk_rule`)."""
    return softmax_topk_rule(bool(renormalises(router)))


def hf_positions(args, kwargs) -> Tensor | None:
    """RoPE positions (B, T) of a transformers forward, from its arguments (position 0 = first real
    token, as moe_lab counts them)."""
    pid = kwargs.get("position_ids")
    if pid is not None:
        return pid
    ids = kwargs.get("input_ids", args[0] if args else None)
    if not isinstance(ids, Tensor):
        return None
    B, T = ids.shape
    mask = kwargs.get("attention_mask")
    if isinstance(mask, Tensor) and mask.dim() == 2:
        return (mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
    cp = kwargs.get("cache_position")
    if cp is not None:
        return cp[None].expand(B, T)
    return torch.arange(T, device=ids.device)[None].expand(B, T)


@contextmanager
def replace_router_outputs(model, routing_fns: dict, on_positions=None):
    """For the block, layer ``L``'s router returns ``routing_fns[L](logits, top_k)``'s indices and
    weights instead of its own (its logits are kept), through forward hooks; removed on exit, also
    when the block raises. ``on_positions(positions (B, T))``, when given, is called before every
    forward with the tokens' positions (for interventions that act at some positions only)."""
    routers = replaceable_routers(model)
    missing = sorted(set(routing_fns) - set(routers))
    if missing:
        raise ValueError(f"layer(s) {missing} have no router; MoE layers are {list(routers)}")
    handles = []
    try:
        if on_positions is not None:
            def set_positions(module, args, kwargs):
                on_positions(hf_positions(args, kwargs))
            handles.append(model.register_forward_pre_hook(set_positions, with_kwargs=True))
            base = decoder_layers(model)  # the CausalLM wrapper passes position_ids down: record them there too
            parent = next((m for m in model.modules() if any(c is base for c in m.children())), None)
            if parent is not None and parent is not model:
                handles.append(parent.register_forward_pre_hook(set_positions, with_kwargs=True))
        for layer, fn in routing_fns.items():
            def hook(mod, inputs, out, fn=fn):
                _check_router_output(mod, out)
                logits, scores = out[0], out[1]
                _, indices, weights = fn(logits, mod.top_k)
                return logits, weights.to(scores.dtype), indices
            handles.append(routers[layer].register_forward_hook(hook))
        yield model
    finally:
        for h in reversed(handles):
            h.remove()
