"""Direct attribution: which earlier component put a number where it is.

The residual stream of a Mixtral is a sum. Before block ``L``'s MoE, the stream at a token is

    h = embed + attn_0 + moe_0 + attn_1 + moe_1 + ... + attn_L            (resid_mid of L)

and the MoE output of a layer is itself a sum over the experts the router chose,
``moe_l = sum_j w_j * E_{i_j}(x)``. The router of layer ``L`` reads ``gate(norm(h))`` with
``norm(h) = g * h / rms(h)``. Holding the RMSNorm scale ``1 / rms(h)`` at its actual value for
this token (the standard convention of direct logit attribution: the norm is the only
non-linear step left, and freezing its scale makes everything linear), each router logit
splits exactly into one part per component::

    router_logits = sum_c  W_gate (g * c / rms(h))          (one term per component c)

and the same for the output logit of a token with the final norm: :func:`logit_attribution`.
The parts are *direct* effects: how much a component writes, in the direction the router
(or the output head) reads, not what would happen without it. An exact decomposition with the
norm scale frozen is not a causal effect: removing a component also changes the norm's scale and
everything computed after it that reads it (``attn.3``'s share depends on what ``moe.0`` wrote).
For the causal effect, remove it: :func:`router_logits_without` (one component at one position)
or :mod:`moe_lab.causal`.

::

    a = router_attribution(model, tokens, layer=2)      # tokens [T] or [1, T]
    a.router_logits        # [T, E] the router's logits at layer 2
    a.contributions        # [C, T, E], sums over C to a.router_logits (fp32, within 1e-4)
    a.table(position=5, expert=3)   # components sorted by what they add to that logit

The activations are collected with hooks on the model's hook points during one ordinary
forward (it stops after the layer explained), so the decomposition is of the model as it
runs, interventions included; per-expert parts call each expert's own ``Expert.forward``
on the tokens routed to it, with its routing weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import torch
from torch import Tensor

from .devices import resolve_device
from .hooks import StopForward
from .routing.interventions import Intervention, intervene, layer_ids, unwrap

__all__ = ["RouterAttribution", "LogitAttribution", "router_attribution", "logit_attribution", "router_logits_without"]


@dataclass
class RouterAttribution:
    """Why layer ``layer``'s router gave each token its logits: ``contributions[c, t, e]`` is what
    component ``components[c]`` adds to ``router_logits[t, e]`` (RMSNorm scale held fixed)."""

    layer: int
    components: list[str]
    contributions: Tensor  # [C, T, E] fp32
    router_logits: Tensor  # [T, E] as the model computed them
    tokens: Tensor  # [T]

    def table(self, position: int, expert: int) -> pd.Series:
        """What each component adds to expert ``expert``'s logit at ``position``, largest first."""
        s = pd.Series(self.contributions[:, position, expert].numpy(), index=self.components, name="contribution")
        return s.sort_values(ascending=False)


@dataclass
class LogitAttribution:
    """What each component adds to the logit of ``targets[t]`` at position ``positions[t]``:
    ``contributions[c, t]``, summing over C to ``target_logits[t]`` (final norm scale held fixed)."""

    components: list[str]
    contributions: Tensor  # [C, T'] fp32
    target_logits: Tensor  # [T'] the model's logits of the targets
    targets: Tensor  # [T']
    positions: Tensor  # [T'] the position each logit is read at

    def table(self, index: int) -> pd.Series:
        """What each component adds to the ``index``-th target's logit, largest first."""
        s = pd.Series(self.contributions[:, index].numpy(), index=self.components, name="contribution")
        return s.sort_values(ascending=False)


# --------------------------------------------------------------------------------------------
# collecting the parts of the residual stream


def _one_sequence(tokens, device) -> Tensor:
    tokens = torch.as_tensor(tokens, device=device)
    if tokens.dim() == 2 and tokens.shape[0] == 1:
        tokens = tokens[0]
    if tokens.dim() != 1 or tokens.numel() == 0:
        raise ValueError(f"attribution explains one sequence: tokens must be [T] or [1, T], got shape "
                         f"{tuple(tokens.shape)}")
    return tokens.long()


def _expert_parts(moe, x: Tensor, indices: Tensor, weights: Tensor) -> Tensor:
    """x (N, D) normed MoE input, the routing (N, k) -> (E, N, D): w * E_e(x) where e was chosen."""
    N, D = x.shape
    parts = x.new_zeros(moe.n_experts, N, D)
    w = weights.to(x.dtype)
    for e in indices.unique().tolist():
        rows, slot = (indices == e).nonzero(as_tuple=True)
        parts[e].index_add_(0, rows, moe.experts[e](x[rows]) * w[rows, slot, None])
    return parts


def _collect(model, tokens: Tensor, last: int, per_expert: bool) -> dict:
    """One forward of ``tokens`` [T] that records, for blocks 0..last (indices into ``blocks``):
    the embedding, attention and MoE outputs, resid_mid, router logits, per-expert parts when
    asked, and the final residual stream when ``last`` is the last block. Stops after ``last``."""
    mixtral, call = unwrap(model)
    rec: dict = {"attn": {}, "moe": {}, "resid_mid": {}, "router_logits": {}, "experts": {}, "routing": {}}
    handles = []

    def keep(key, i=None):
        def hook(mod, inputs, out):
            if i is None:
                rec[key] = out[0].detach()
            else:
                rec[key][i] = out if key == "router_logits" else out[0].detach()
        return hook

    handles.append(mixtral.hook_embed.register_forward_hook(keep("embed")))
    for i in range(last + 1):
        block = mixtral.blocks[i]
        handles.append(block.hook_attn_out.register_forward_hook(keep("attn", i)))
        handles.append(block.hook_moe_out.register_forward_hook(keep("moe", i)))
        handles.append(block.hook_resid_mid.register_forward_hook(keep("resid_mid", i)))
        handles.append(block.moe.hook_router_logits.register_forward_hook(keep("router_logits", i)))
        if per_expert:
            def routing(mod, inputs, out, i=i):
                rec["routing"].setdefault(i, []).append(out)
            handles.append(block.moe.hook_topk_indices.register_forward_hook(routing))
            handles.append(block.moe.hook_topk_weights.register_forward_hook(routing))

            def experts(moe, inputs, out, i=i):  # runs while the block's weights are loaded (streaming)
                (x,) = inputs
                indices, weights = rec["routing"].pop(i)
                rec["experts"][i] = _expert_parts(moe, x.reshape(-1, x.shape[-1]), indices, weights).detach()
            handles.append(block.moe.register_forward_hook(experts))
    def router_weights(moe, inputs, out, block=mixtral.blocks[last]):  # copies: a streamed block is freed
        rec["router"] = (block.ffn_norm.weight.detach().float().clone(), block.ffn_norm.eps,
                         moe.gate.weight.detach().float().clone())
    handles.append(mixtral.blocks[last].moe.register_forward_hook(router_weights))
    if last == len(mixtral.blocks) - 1:
        handles.append(mixtral.blocks[last].hook_resid_post.register_forward_hook(keep("final")))
    else:
        def stop(mod, inputs, out):
            raise StopForward
        handles.append(mixtral.blocks[last].register_forward_hook(stop))
    try:
        with torch.no_grad():
            rec["logits"] = call(tokens[None])
    except StopForward:
        rec["logits"] = None
    finally:
        for h in handles:
            h.remove()
        if call is not mixtral:
            call.free_all()  # a StreamingMixtral stopped early keeps nothing loaded
    return rec


def _stream_parts(rec: dict, ids: list[int], upto: int, include_last_moe: bool, per_expert: bool,
                  n_experts: int) -> tuple[list[str], list[Tensor]]:
    """Names and (T, D) fp32 tensors of the components of the stream, in order."""
    names, parts = ["embed"], [rec["embed"].float()]
    for i in range(upto + 1):
        names.append(f"attn.{ids[i]}")
        parts.append(rec["attn"][i].float())
        if i == upto and not include_last_moe:
            break
        if per_expert:
            names += [f"moe.{ids[i]}.expert.{e}" for e in range(n_experts)]
            parts += list(rec["experts"][i].float())
        else:
            names.append(f"moe.{ids[i]}")
            parts.append(rec["moe"][i].float())
    return names, parts


def _held_norm(weight: Tensor, eps: float, h: Tensor) -> Tensor:
    """An RMSNorm of ``h`` as a per-token linear map with its scale held: g / rms(h), (T, D) fp32."""
    scale = torch.rsqrt(h.float().pow(2).mean(-1, keepdim=True) + eps)  # (T, 1), F.rms_norm's formula
    return weight.float() * scale


# --------------------------------------------------------------------------------------------
# public functions


@torch.no_grad()
def router_attribution(model, tokens, layer: int, per_expert: bool = False, *, device=None) -> RouterAttribution:
    """Split layer ``layer``'s router logits of one sequence into the contributions of every earlier
    component of the residual stream.

    ``tokens``: ``[T]`` or ``[1, T]`` ids. ``layer``: a layer number as in traces (``model.layer_ids``
    for a model loaded with ``layers=``). Components: ``"embed"``, ``"attn.0"``, ``"moe.0"``, ...,
    ``"attn.{layer}"`` (block ``layer``'s own attention writes before its router reads); with
    ``per_expert=True`` each ``"moe.{l}"`` is replaced by its experts' weighted outputs
    ``"moe.{l}.expert.{e}"`` (zero where the expert was not chosen), so the sum is unchanged.

    Exact with the RMSNorm scale ``1 / rms(h)`` held at its actual value per token (the direct
    attribution convention): ``contributions.sum(0)`` equals ``router_logits`` up to fp32
    rounding. Works on ``Mixtral``, models loaded with ``layers=`` and ``StreamingMixtral``, on
    the model's device (``device``: None or the model's device); the result is on the CPU.
    """
    mixtral, _ = unwrap(model)
    ids = layer_ids(mixtral)
    if layer not in ids:
        raise ValueError(f"layer {layer} is not in this model (its layers: {ids})")
    i = ids.index(layer)
    tokens = _one_sequence(tokens, resolve_device(model, device))
    rec = _collect(model, tokens, i, per_expert)
    names, parts = _stream_parts(rec, ids, i, include_last_moe=False, per_expert=per_expert,
                                 n_experts=mixtral.args.n_experts)
    norm_weight, eps, gate = rec["router"]  # block i's ffn_norm and router weights, (D,) and (E, D)
    held = _held_norm(norm_weight, eps, rec["resid_mid"][i])  # (T, D)
    contributions = torch.stack([(p * held) @ gate.T for p in parts])  # (C, T, E)
    return RouterAttribution(layer=layer, components=names, contributions=contributions.cpu(),
                             router_logits=rec["router_logits"][i].float().cpu(), tokens=tokens.cpu())


@torch.no_grad()
def logit_attribution(model, tokens, targets=None, *, device=None) -> LogitAttribution:
    """Split the output logit of a target token at each position into the contributions of the
    embedding, every attention output and every expert of every layer (its output times its
    routing weight; components ``"embed"``, ``"attn.{l}"``, ``"moe.{l}.expert.{e}"``).

    ``targets``: ``None`` (the actual next token: positions 0..T-2 explain tokens 1..T-1) or ``[T]``
    ids, one per position. Exact with the final RMSNorm's scale held at its actual value:
    ``contributions.sum(0)`` equals ``target_logits`` up to fp32 rounding. Runs on the model's
    device (``device``: None or the model's device); the result is on the CPU.
    """
    mixtral, _ = unwrap(model)
    ids = layer_ids(mixtral)
    tokens = _one_sequence(tokens, resolve_device(model, device))
    T = tokens.numel()
    if targets is None:
        if T < 2:
            raise ValueError("the next-token logit needs at least 2 tokens (or give targets=)")
        positions, targets = torch.arange(T - 1, device="cpu"), tokens[1:].cpu()
    else:
        targets = torch.as_tensor(targets, device="cpu").reshape(-1).long()
        if targets.numel() != T:
            raise ValueError(f"targets must have one id per token ({T}), got {targets.numel()}")
        positions = torch.arange(T, device="cpu")
    last = len(mixtral.blocks) - 1
    rec = _collect(model, tokens, last, per_expert=True)
    names, parts = _stream_parts(rec, ids, last, include_last_moe=True, per_expert=True,
                                 n_experts=mixtral.args.n_experts)
    held = _held_norm(mixtral.norm.weight, mixtral.norm.eps, rec["final"])[positions]  # (T', D)
    w_out = mixtral.output.weight.float()[targets.to(held.device)]  # (T', D): the rows the targets read
    contributions = torch.stack([((p[positions] * held) * w_out).sum(-1) for p in parts])  # (C, T')
    logits = rec["logits"][0].float()[positions.to(held.device), targets.to(held.device)]
    return LogitAttribution(components=names, contributions=contributions.cpu(), target_logits=logits.cpu(),
                            targets=targets, positions=positions)


# --------------------------------------------------------------------------------------------
# the causal cross-check


class _ZeroSlotAtRow(Intervention):
    """Zero-ablate ``expert`` in ``layer`` for one token row of a one-sequence forward (row = position)."""

    def __init__(self, layer: int, expert: int, row: int):
        self.layers, self.expert, self.row = (int(layer),), int(expert), int(row)

    def edit_routing(self, layer, probs, indices, weights, ctx):
        off = torch.zeros_like(indices, dtype=torch.bool)
        if self.row < indices.shape[0]:
            off[self.row] = indices[self.row] == self.expert
        return probs, indices, weights.masked_fill(off, 0.0)

    def __repr__(self):
        return f"_ZeroSlotAtRow(layer={self.layers[0]}, expert={self.expert}, row={self.row})"


@torch.no_grad()
def router_logits_without(model, tokens, layer: int, position: int, component: str | None, *,
                          device=None) -> Tensor:
    """Layer ``layer``'s router logits [T, E] of one sequence when ``component`` (a name of
    :func:`router_attribution`: ``"embed"``, ``"attn.l"``, ``"moe.l"``, ``"moe.l.expert.e"``) is
    removed at ``position`` only (its output there set to zero; an expert's slot there gets
    weight 0), and everything after it is recomputed. ``component=None``: the plain logits.
    The causal counterpart of the direct parts: compare ``plain - without`` at ``position`` with
    the component's part of the logit (they differ by the norm's scale and the indirect paths).
    """
    mixtral, call = unwrap(model)
    ids = layer_ids(mixtral)
    if layer not in ids:
        raise ValueError(f"layer {layer} is not in this model (its layers: {ids})")
    tokens = _one_sequence(tokens, resolve_device(model, device))
    T = tokens.numel()
    if not 0 <= position < T:
        raise ValueError(f"position {position} is outside the sequence (0..{T - 1})")
    i_last = ids.index(layer)
    handles, ivs = [], []

    def zero_at(mod, inputs, out):
        out = out.clone()
        out[:, position] = 0
        return out
    if component is not None:
        parts = component.split(".")
        try:
            if parts == ["embed"]:
                handles.append(mixtral.hook_embed.register_forward_hook(zero_at))
            elif parts[0] in ("attn", "moe") and len(parts) in (2, 4) and int(parts[1]) in ids:
                block = mixtral.blocks[ids.index(int(parts[1]))]
                if len(parts) == 4 and parts[0] == "moe" and parts[2] == "expert":
                    e = int(parts[3])
                    if not 0 <= e < mixtral.args.n_experts:
                        raise ValueError
                    ivs.append(_ZeroSlotAtRow(int(parts[1]), e, position))
                elif len(parts) == 2:
                    hp = block.hook_attn_out if parts[0] == "attn" else block.hook_moe_out
                    handles.append(hp.register_forward_hook(zero_at))
                else:
                    raise ValueError
            else:
                raise ValueError
        except ValueError:
            for h in handles:
                h.remove()
            raise ValueError(f"unknown component {component!r}: expected 'embed', 'attn.<layer>', 'moe.<layer>' or "
                             f"'moe.<layer>.expert.<e>' with a layer of this model ({ids}) and "
                             f"e < {mixtral.args.n_experts}") from None
    got = {}

    def grab(mod, inputs, out):
        got["logits"] = out[0].float().detach().clone() if out.dim() == 3 else out.float().detach().clone()
        raise StopForward
    handles.append(mixtral.blocks[i_last].moe.hook_router_logits.register_forward_hook(grab))
    try:
        with intervene(model, *ivs):
            call(tokens[None])
    except StopForward:
        pass
    finally:
        for h in handles:
            h.remove()
        if call is not mixtral:
            call.free_all()
    return got["logits"].reshape(T, -1).cpu()
