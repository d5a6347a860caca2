"""Interventions on the router: small objects applied for one block of code.

::

    with moe_lab.intervene(model, AblateExpert(layer=3, expert=5), SetTopK(1, layers=[0, 1])):
        logits = model(tokens)          # or model.generate(...), trace_routing(model, ...)
    # the model routes normally again here, also if the block raised

How they act (in this order, for every layer an intervention applies to):

1. **router logits** are edited: :class:`AblateExpert` sets the ablated experts' logits to
   ``-inf`` (so the next expert in line takes the slot and the softmax renormalises over the
   others); :class:`RouterTemperature` divides the logits by ``t`` (the choice of experts is
   unchanged, only the weights get sharper, t < 1, or flatter, t > 1); :class:`SteerExperts`
   adds an offset to some experts' logits, or forces experts in / out of every token's top-k
   (SteerMoE's ``activate``/``deactivate``); :class:`MaskTopExperts` sets each token's own r
   highest logits to ``-inf`` (DeepSeekMoE's redundancy test);
2. **k** is set: :class:`SetTopK` (``k = n_experts`` is the dense mixture);
3. **the routing rule** runs: the model's own (softmax in fp32, top-k, renormalise) or the
   one given to :class:`CustomRouting` ``fn(logits, top_k) -> (probs, indices, weights)``;
4. **the selection** is edited: :class:`ForceExpert` puts its expert in rank 0 of every token
   (at the given positions) and drops the last of the others if it was not chosen already.
   Design decision: the selection is forced, the *weight* is the router's own probability of
   that expert, and the weights of the chosen experts are renormalised to sum to 1 (so a
   forced expert the router dislikes gets a small weight; with ``top_k = 1`` it gets 1).
   ``AblateExpert(..., mode="zero")`` sets the weight of the expert's slot to 0 here (the
   routing is unchanged, the other slots keep their weights); ``mode="mean"`` does the same
   and then adds the slot's weight times the expert's mean output to the MoE output;
5. **the experts** are edited: :class:`SwapExpert` makes the MoE call another expert's module
   for an expert's slots (only during that MoE's forward: a pre-hook swaps the module in the
   ``ModuleList``, a forward hook that also runs on errors puts it back).

Three ablations, three questions:

=====================================  =============================================================
``AblateExpert(l, e)`` (``"reroute"``)  what if the router could not pick e? (the next best expert
                                        takes the slot; the model stays a top-k MoE)
``AblateExpert(l, e, mode="zero")``     what does e's contribution add? (the same as zeroing its
                                        ``w2``; tokens keep their routing, their slot is just empty;
                                        this removes e's content *and* shrinks the MoE output by the
                                        slot's weight: an off-distribution magnitude change)
``AblateExpert(l, e, mode="mean",       what does e's token-specific content add? (e's output
reference=docs)``                       replaced by its mean output over ``docs``: the magnitude
                                        stays about right, only the content is removed; the
                                        interpretability standard)
``SwapExpert(l, e, replacement=r)``     does e's *function* matter, or only that some expert fills
                                        the slot? (the same as copying r's weights into e)
=====================================  =============================================================

Interventions of the same stage apply in the order given. Indices and weights always stay
consistent (weights are the chosen experts' probabilities, renormalised). An ablated expert
is never chosen: if ``k`` exceeds the number of experts left in a layer, ``k`` shrinks.

They compose by wrapping ``MoE.routing_fn`` of the layers concerned (other layers are not
touched, so they stay bit-identical); ``intervene`` contexts may be nested. On a transformers
model with a Mixtral-style router the composed routing functions are handed to
:func:`moe_lab.routing.bridge.replace_router_outputs`, which replaces each router's output
through a forward hook (the bridge is an adapter: it knows nothing of interventions).
:class:`SwapExpert` needs one module per expert and is refused there (transformers fuses the
experts of a layer into one module).

``ForceExpert(..., positions=[...])`` needs the positions of the tokens in each forward
(position 0 = first real token, as in a :class:`~moe_lab.routing.trace.RoutingTrace`); ``intervene``
works them out from the forward's arguments (``attention_mask``, ``cache``), so it also
acts on the right tokens during ``generate``.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from ..model import topk_softmax_routing
from . import bridge

RoutingFn = Callable[[Tensor, int], "tuple[Tensor, Tensor, Tensor]"]

_ACTIVE_ATTR = "_moe_lab_interventions"


def _layer_tuple(layers, name: str) -> tuple[int, ...] | None:
    if layers is None:
        return None
    if isinstance(layers, int):
        return (int(layers),)
    out = tuple(int(x) for x in layers)
    if not out:
        raise ValueError(f"{name}: layers is empty (use None for every layer)")
    return out


class _Context:
    """Per-forward information shared by the interventions of one ``intervene`` block."""

    def __init__(self):
        self.positions: Tensor | None = None  # (B, T) of the current forward
        self.slot_weights: dict = {}  # (id(intervention), layer) -> (N, n) weights (AblateExpert "mean")


class Intervention:
    """Base class. Subclasses override one or more stages (see the module docstring)."""

    layers: tuple[int, ...] | None = None  # None = every MoE layer
    needs_positions: bool = False
    rule: RoutingFn | None = None  # replaces the routing rule (CustomRouting)

    def applies(self, layer: int) -> bool:
        return self.layers is None or layer in self.layers

    def check(self, n_layers: int, n_experts: int, moe_layers: Sequence[int]) -> None:
        for layer in self.layers or ():
            if layer not in moe_layers:
                raise ValueError(f"{self!r}: layer {layer} is not an MoE layer of this model "
                                 f"({n_layers} layers; MoE layers: {list(moe_layers)})")

    def check_expert(self, e: int, n_experts: int, what: str = "expert") -> None:
        if not 0 <= e < n_experts:
            raise ValueError(f"{self!r}: {what} {e} is outside [0, {n_experts}) (this model has "
                             f"{n_experts} experts per layer)")

    def swaps(self, layer: int) -> list[tuple[int, int]]:
        """``[(expert, replacement), ...]``: slots of ``expert`` computed by ``replacement``'s module."""
        return []

    def edit_logits(self, layer: int, logits: Tensor, ctx: _Context) -> Tensor:
        return logits

    def edit_top_k(self, layer: int, k: int) -> int:
        return k

    def ablated(self, layer: int) -> set[int]:
        return set()

    def edit_routing(self, layer: int, probs: Tensor, indices: Tensor, weights: Tensor,
                     ctx: _Context) -> tuple[Tensor, Tensor, Tensor]:
        return probs, indices, weights

    def masked_per_token(self, layer: int) -> int:
        """How many experts of every token this intervention takes out of the choice (besides
        :meth:`ablated`); the composition checks that k of the rest are left."""
        return 0

    def prepare(self, mixtral, call) -> None:
        """Called by ``intervene`` (moe_lab models) before anything is installed: compute what
        the intervention needs from the model (``AblateExpert(..., mode="mean")``'s mean outputs)."""

    def edits_output(self, layer: int) -> bool:
        return False

    def edit_output(self, layer: int, out: Tensor, ctx: _Context) -> Tensor:
        """The MoE output (N, D) of ``layer``, after the experts ran (moe_lab models only)."""
        return out


class AblateExpert(Intervention):
    """Switch expert(s) off in one layer (or several). Three meanings (``mode``):

    * ``"reroute"`` (default): router logit ``-inf``, so the expert cannot be chosen: the next
      expert in line takes the slot and the weights renormalise over the experts chosen;
    * ``"zero"``: the routing is unchanged (same experts, in a trace too) and the expert's slot
      gets weight 0; the other slots keep their weights (no renormalisation). The MoE output is
      exactly what zeroing the expert's ``w2`` would give: its contribution is removed. This
      mixes two things: the expert's *content* is gone, and the MoE output also *shrinks* by
      the slot's weight (an output magnitude the next layers never saw in training). (A
      ``RoutingTrace`` shows the slot with weight 0; its weights always sum to 1, so the other
      slots appear renormalised there.)
    * ``"mean"``: like ``"zero"``, and the slot's weight times the expert's **mean output** is
      added back: ``weight * mean_{x in reference, routed to e} expert_e(x)`` instead of
      ``weight * expert_e(x)``. The magnitude stays about right; only what is specific to the
      token is removed (mean ablation, the interpretability standard). ``reference`` names the
      tokens the mean is taken over: token-id lists (or a LongTensor [B, T]), run through the
      model when the ``intervene`` block starts (outer interventions active); the mean is over
      the tokens the router sends to the expert there. Required for ``"mean"``, refused for the
      other modes. moe_lab models only (transformers models fuse their experts).
    """

    MODES = ("reroute", "zero", "mean")

    def __init__(self, layer: int | Iterable[int], expert: int | Iterable[int], mode: str = "reroute", *,
                 reference=None):
        self.layers = _layer_tuple(layer, "AblateExpert")
        self.experts = (int(expert),) if isinstance(expert, int) else tuple(int(e) for e in expert)
        if not self.experts:
            raise ValueError("AblateExpert needs at least one expert")
        if mode not in self.MODES:
            raise ValueError(f"AblateExpert: unknown mode {mode!r}; choose one of {list(self.MODES)}")
        self.mode = mode
        if mode == "mean":
            if reference is None:
                raise ValueError("AblateExpert(..., mode='mean') needs reference=: the token-id lists (or a "
                                 "LongTensor [B, T]) over which the expert's mean output is taken, e.g. held-out "
                                 "documents other than those you score")
            self.reference = _reference_docs(reference)
        elif reference is not None:
            raise ValueError(f"AblateExpert: reference= is only used by mode='mean', not mode={mode!r}")
        else:
            self.reference = None
        self.means: dict[tuple[int, int], Tensor] = {}  # (layer, expert) -> mean output (D,) fp32 (mode "mean")
        self._prepared_for = None

    def check(self, n_layers, n_experts, moe_layers):
        super().check(n_layers, n_experts, moe_layers)
        for e in self.experts:
            self.check_expert(e, n_experts)
        if self.mode == "reroute" and len(set(self.experts)) >= n_experts:
            raise ValueError(f"{self!r} would switch off all {n_experts} experts")

    def edit_logits(self, layer, logits, ctx):
        if self.mode != "reroute":
            return logits
        idx = torch.tensor(self.experts, device=logits.device)
        return logits.index_fill(-1, idx, float("-inf"))

    def ablated(self, layer):
        return set(self.experts) if self.mode == "reroute" else set()

    def edit_routing(self, layer, probs, indices, weights, ctx):
        if self.mode == "reroute":
            return probs, indices, weights
        ids = torch.tensor(self.experts, device=indices.device)
        off = torch.isin(indices, ids)  # (N, k)
        if self.mode == "mean":  # the weight each ablated expert had, per token: (N, n_ablated)
            ctx.slot_weights[(id(self), layer)] = ((indices[:, :, None] == ids).to(weights.dtype)
                                                   * weights[:, :, None]).sum(1)
        return probs, indices, weights.masked_fill(off, 0.0)

    # mode "mean"
    def prepare(self, mixtral, call):
        if self.mode != "mean" or self._prepared_for is mixtral:
            return
        self.means = expert_mean_outputs(mixtral, call, self.reference,
                                         {(layer, e) for layer in self.layers for e in self.experts})
        self._prepared_for = mixtral

    def edits_output(self, layer):
        return self.mode == "mean"

    def edit_output(self, layer, out, ctx):
        w = ctx.slot_weights.pop((id(self), layer), None)
        if w is None:
            return out
        means = torch.stack([self.means[(layer, e)] for e in self.experts]).to(out.device)  # (n_ablated, D)
        return out + (w.float() @ means).to(out.dtype)

    def __repr__(self):
        e = self.experts[0] if len(self.experts) == 1 else list(self.experts)
        layer = self.layers[0] if len(self.layers) == 1 else list(self.layers)
        mode = "" if self.mode == "reroute" else f", mode={self.mode!r}"
        return f"AblateExpert(layer={layer}, expert={e}{mode})"


def _reference_docs(reference) -> list[Tensor]:
    if isinstance(reference, Tensor):
        if reference.dim() != 2 or reference.dtype.is_floating_point:
            raise ValueError(f"AblateExpert: reference= as a tensor must be token ids [B, T], got "
                             f"{tuple(reference.shape)} {reference.dtype}")
        docs = [row for row in reference.long().cpu()]
    else:
        try:
            docs = [torch.as_tensor(list(d), dtype=torch.long) for d in reference]
        except (TypeError, ValueError) as err:
            raise ValueError("AblateExpert: reference= must be token-id lists (tokenize texts first), got "
                             f"{type(reference).__name__}: {err}") from None
    docs = [d for d in docs if d.numel()]
    if not docs:
        raise ValueError("AblateExpert: reference= is empty (no tokens to take the expert's mean output over)")
    return docs


@torch.no_grad()
def expert_mean_outputs(mixtral, call, docs: Sequence[Tensor], pairs) -> dict[tuple[int, int], Tensor]:
    """``{(layer, expert): mean output (D,) fp32}``: each expert's output averaged over the tokens
    of ``docs`` (token-id tensors, one forward each) that the router sends to it. ``call`` runs
    the forward (the model, or a StreamingMixtral)."""
    ids = layer_ids(mixtral)
    sums, counts, handles = {}, {}, []
    for layer, e in sorted(pairs):
        module = mixtral.blocks[ids.index(layer)].moe.experts[e]

        def grab(mod, args, out, key=(layer, e)):
            y = out.detach().float().reshape(-1, out.shape[-1])
            sums[key] = sums.get(key, 0) + y.sum(0)
            counts[key] = counts.get(key, 0) + y.shape[0]
        handles.append(module.register_forward_hook(grab))
    device = next(mixtral.parameters()).device
    try:
        for d in docs:
            call(d.to(device)[None])
    finally:
        for h in handles:
            h.remove()
    missing = sorted(set(pairs) - set(counts))
    if missing:
        layer, e = missing[0]
        raise ValueError(f"AblateExpert(..., mode='mean'): the router never sends a token of reference= to expert "
                         f"{e} of layer {layer} ({sum(len(d) for d in docs)} tokens), so it has no mean output; "
                         "use a larger or more varied reference set")
    return {key: (sums[key] / counts[key]).cpu() for key in counts}


class SwapExpert(Intervention):
    """Wherever the router picked ``expert`` in ``layer``, compute the slot with expert
    ``replacement`` (same weight, same routing): exactly what copying ``replacement``'s weights
    into ``expert`` would give, without touching any weight. Only for moe_lab models (one module
    per expert); several swaps apply in the order given, like copying weights one after another."""

    def __init__(self, layer: int | Iterable[int], expert: int, replacement: int):
        self.layers = _layer_tuple(layer, "SwapExpert")
        self.expert, self.replacement = int(expert), int(replacement)
        if self.expert == self.replacement:
            raise ValueError(f"SwapExpert: replacement={self.replacement} is the expert itself "
                             "(swapping an expert for itself changes nothing)")

    def check(self, n_layers, n_experts, moe_layers):
        super().check(n_layers, n_experts, moe_layers)
        self.check_expert(self.expert, n_experts)
        self.check_expert(self.replacement, n_experts, "replacement")

    def swaps(self, layer):
        return [(self.expert, self.replacement)]

    def __repr__(self):
        layer = self.layers[0] if len(self.layers) == 1 else list(self.layers)
        return f"SwapExpert(layer={layer}, expert={self.expert}, replacement={self.replacement})"


class SteerExperts(Intervention):
    """Steer the router of ``layer`` toward or away from experts, before the routing rule.

    * ``offsets={e: d}``: add ``d`` to expert e's router logit (the logits are log-probabilities
      up to a constant, so +d multiplies e's unnormalised probability by exp(d)). Offset 0
      changes nothing (bit for bit); a large positive offset puts the expert in every token's
      top-k, a large negative one keeps it out. A graded dose.
    * ``activate=[...]`` / ``deactivate=[...]``: SteerMoE's rule (Fayyaz et al. 2025, arXiv
      2509.09660): the router's scores become log-softmax scores ``s``; the experts to activate
      get ``max(s) + margin`` and those to deactivate ``min(s) - margin`` (the row's max and min
      over all experts, per token). So every token routes to each activated expert (as long as
      no more than k are activated; beyond k, the tie between them is broken by the top-k) and
      no token routes to a deactivated one. Not a dose: a forced (de)activation.

    Offsets apply first, then (de)activation. An expert in both sets is an error.
    """

    def __init__(self, layer: int | Iterable[int], offsets: dict[int, float] | None = None, *,
                 activate: Iterable[int] = (), deactivate: Iterable[int] = (), margin: float = 0.01):
        self.layers = _layer_tuple(layer, "SteerExperts")
        self.activate = tuple(dict.fromkeys(int(e) for e in activate))
        self.deactivate = tuple(dict.fromkeys(int(e) for e in deactivate))
        if offsets is None and not (self.activate or self.deactivate):
            raise ValueError("SteerExperts needs offsets={expert: offset} or activate=/deactivate= expert lists")
        if offsets is not None and (not isinstance(offsets, dict) or not offsets):
            raise ValueError(f"SteerExperts needs offsets as a non-empty dict {{expert: offset}}, got {offsets!r}")
        self.offsets = {int(e): float(d) for e, d in (offsets or {}).items()}
        if any(math.isnan(d) for d in self.offsets.values()):
            raise ValueError(f"SteerExperts: offsets must be numbers, got {offsets!r}")
        both = sorted(set(self.activate) & set(self.deactivate))
        if both:
            raise ValueError(f"SteerExperts: expert {both[0]} is both in activate={list(self.activate)} and "
                             f"deactivate={list(self.deactivate)}")
        if not (margin >= 0 and math.isfinite(margin)):
            raise ValueError(f"SteerExperts: margin must be a finite number >= 0, got {margin}")
        self.margin = float(margin)

    def check(self, n_layers, n_experts, moe_layers):
        super().check(n_layers, n_experts, moe_layers)
        for e in self.offsets:
            self.check_expert(e, n_experts, "offsets for expert")
        for e in self.activate:
            self.check_expert(e, n_experts, "activate: expert")
        for e in self.deactivate:
            self.check_expert(e, n_experts, "deactivate: expert")
        if len(self.deactivate) >= n_experts:
            raise ValueError(f"{self!r} would deactivate all {n_experts} experts")

    def edit_logits(self, layer, logits, ctx):
        if self.offsets:
            shift = torch.zeros(logits.shape[-1], dtype=logits.dtype, device=logits.device)  # (E,)
            shift[list(self.offsets)] = torch.tensor(list(self.offsets.values()), dtype=logits.dtype, device=logits.device)
            logits = logits + shift
        if not (self.activate or self.deactivate):
            return logits
        s = logits.float().log_softmax(-1)  # (N, E) SteerMoE's scores (the same softmax as the logits)
        hi = s.max(-1, keepdim=True).values + self.margin
        lo = s.min(-1, keepdim=True).values - self.margin
        if self.activate:
            s[:, list(self.activate)] = hi
        if self.deactivate:
            s[:, list(self.deactivate)] = lo
        return s

    def __repr__(self):
        layer = self.layers[0] if len(self.layers) == 1 else list(self.layers)
        parts = [f"offsets={self.offsets}"] if self.offsets else []
        parts += [f"activate={list(self.activate)}"] if self.activate else []
        parts += [f"deactivate={list(self.deactivate)}"] if self.deactivate else []
        return f"SteerExperts(layer={layer}, {', '.join(parts)})"


class MaskTopExperts(Intervention):
    """DeepSeekMoE's redundancy test (Dai et al. 2024, arXiv 2401.06066, section 4.5, Figure 4):
    for each token, mask its own ``r`` highest-scoring experts (router logits ``-inf``), then the
    model's own routing rule picks the top-k among the rest (Mixtral: the softmax over the k
    chosen logits). Per token, not per layer: every token loses *its* best r experts. ``r = 0``
    changes nothing; ``r + k`` more than the number of experts is an error."""

    def __init__(self, r: int, layers: int | Iterable[int] | None = None):
        if isinstance(r, bool) or not isinstance(r, (int, np.integer)) or r < 0:
            raise ValueError(f"MaskTopExperts: r must be an integer >= 0 (experts masked per token), got {r!r}")
        self.r = int(r)
        self.layers = _layer_tuple(layers, "MaskTopExperts")

    def check(self, n_layers, n_experts, moe_layers):
        super().check(n_layers, n_experts, moe_layers)
        if self.r >= n_experts:
            raise ValueError(f"{self!r}: r={self.r} masks every expert of a token (this model has {n_experts} "
                             f"experts per layer; r + k must be at most {n_experts})")

    def masked_per_token(self, layer):
        return self.r

    def edit_logits(self, layer, logits, ctx):
        if self.r == 0:
            return logits
        top = logits.topk(self.r, dim=-1).indices  # (N, r) each token's own best experts
        return logits.scatter(-1, top, float("-inf"))

    def __repr__(self):
        return f"MaskTopExperts({self.r}" + ("" if self.layers is None else f", layers={list(self.layers)}") + ")"


class ForceExpert(Intervention):
    """Always choose ``expert`` in ``layer`` (at ``positions`` only, when given): it takes rank 0
    and the weights are the router's probabilities of the chosen experts, renormalised."""

    def __init__(self, layer: int | Iterable[int], expert: int, positions: Iterable[int] | None = None):
        self.layers = _layer_tuple(layer, "ForceExpert")
        self.expert = int(expert)
        self.positions = None if positions is None else tuple(int(p) for p in positions)
        self.needs_positions = self.positions is not None

    def check(self, n_layers, n_experts, moe_layers):
        super().check(n_layers, n_experts, moe_layers)
        self.check_expert(self.expert, n_experts)

    def edit_routing(self, layer, probs, indices, weights, ctx):
        N, k = indices.shape
        e = self.expert
        # candidates: e first, then the chosen experts in rank order without e; keep k of them
        cand = torch.cat([torch.full((N, 1), e, dtype=indices.dtype, device=indices.device), indices], dim=1)
        key = torch.cat([torch.zeros((N, 1), dtype=torch.int8, device=indices.device),
                         (indices == e).to(torch.int8)], dim=1)
        forced = cand.gather(1, torch.argsort(key, dim=1, stable=True))[:, :k]  # (N, k)
        w = probs.gather(1, forced).float()
        w = w / w.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        if self.positions is None:
            return probs, forced, w.to(weights.dtype)
        pos = ctx.positions
        if pos is None or pos.numel() != N:
            raise RuntimeError(f"{self!r} needs the positions of the tokens in this forward, which "
                               "intervene could not work out (call the model with tokens [B, T] and "
                               "attention_mask/cache as keywords)")
        rows = torch.isin(pos.reshape(-1), torch.tensor(self.positions, device=pos.device))[:, None]  # (N, 1)
        return probs, torch.where(rows, forced, indices), torch.where(rows, w.to(weights.dtype), weights)

    def __repr__(self):
        layer = self.layers[0] if len(self.layers) == 1 else list(self.layers)
        pos = "" if self.positions is None else f", positions={list(self.positions)}"
        return f"ForceExpert(layer={layer}, expert={self.expert}{pos})"


class SetTopK(Intervention):
    """Set the experts per token (``ModelArgs.experts_per_token``, the paper's K): route every
    token to ``k`` experts (``layers=None``: all layers). ``k = n_experts`` gives the dense
    mixture: every expert, weighted by the full softmax. (The name is kept from moe_lab 0.1;
    unrelated to the sampling ``top_k`` of ``generate``.)"""

    def __init__(self, k: int, layers: int | Iterable[int] | None = None):
        self.k = int(k)
        self.layers = _layer_tuple(layers, "SetTopK")

    def check(self, n_layers, n_experts, moe_layers):
        super().check(n_layers, n_experts, moe_layers)
        if not 1 <= self.k <= n_experts:
            raise ValueError(f"{self!r}: k must be in [1, n_experts={n_experts}]")

    def edit_top_k(self, layer, k):
        return self.k

    def __repr__(self):
        return f"SetTopK({self.k}" + ("" if self.layers is None else f", layers={list(self.layers)}") + ")"


class RouterTemperature(Intervention):
    """Divide router logits by ``t`` before the softmax: same experts chosen, weights sharper
    (t < 1) or flatter (t > 1)."""

    def __init__(self, t: float, layers: int | Iterable[int] | None = None):
        if not t > 0:
            raise ValueError(f"RouterTemperature: t must be > 0, got {t}")
        self.t = float(t)
        self.layers = _layer_tuple(layers, "RouterTemperature")

    def edit_logits(self, layer, logits, ctx):
        return logits.float() / self.t

    def __repr__(self):
        return f"RouterTemperature({self.t}" + ("" if self.layers is None else f", layers={list(self.layers)}") + ")"


class CustomRouting(Intervention):
    """Replace the routing rule with ``fn(logits (N, E), top_k) -> (probs (N, E), indices (N, k),
    weights (N, k))`` (the contract of ``MoE.routing_fn``; weights should sum to 1).

    Example, random routing::

        def random_routing(logits, k):
            probs = torch.full_like(logits, 1 / logits.shape[-1], dtype=torch.float)
            idx = torch.rand_like(probs).topk(k, dim=-1).indices
            return probs, idx, torch.full(idx.shape, 1 / k, device=idx.device)
    """

    def __init__(self, fn: RoutingFn, layers: int | Iterable[int] | None = None, name: str | None = None):
        if not callable(fn):
            raise TypeError(f"CustomRouting needs a callable fn(logits, top_k), got {fn!r}")
        self.rule = self._checked(fn)
        self.fn = fn
        self.name = name or getattr(fn, "__name__", "fn")
        self.layers = _layer_tuple(layers, "CustomRouting")

    def _checked(self, fn):
        def rule(logits, top_k):
            out = fn(logits, top_k)
            if not (isinstance(out, tuple) and len(out) == 3):
                raise TypeError(f"{self!r}: the routing function must return (probs, indices, weights)")
            probs, indices, weights = out
            N = logits.shape[0]
            if indices.dim() != 2 or indices.shape[0] != N or tuple(weights.shape) != tuple(indices.shape):
                raise ValueError(f"{self!r}: expected indices and weights of shape (N={N}, k), got "
                                 f"{tuple(indices.shape)} and {tuple(weights.shape)}")
            if indices.dtype.is_floating_point:
                raise TypeError(f"{self!r}: indices must be integer expert ids, got {indices.dtype}")
            return probs, indices, weights
        return rule

    def __repr__(self):
        return f"CustomRouting({self.name}" + ("" if self.layers is None else f", layers={list(self.layers)}") + ")"


# --------------------------------------------------------------------------------------------
# composition


def compose(layer: int, base: RoutingFn, interventions: Sequence[Intervention], ctx: _Context,
            n_experts: int) -> RoutingFn:
    """The routing function of ``layer`` with ``interventions`` (those that apply) around ``base``."""
    ivs = [iv for iv in interventions if iv.applies(layer)]
    if not ivs:
        return base
    n_left = n_experts - len(set().union(*(iv.ablated(layer) for iv in ivs)))
    n_masked = sum(iv.masked_per_token(layer) for iv in ivs)
    rule = base
    for iv in ivs:
        if iv.rule is not None:
            rule = iv.rule

    def routing_fn(logits: Tensor, top_k: int):
        for iv in ivs:
            logits = iv.edit_logits(layer, logits, ctx)
        k = top_k
        for iv in ivs:
            k = iv.edit_top_k(layer, k)
        if n_masked and k + n_masked > n_left:
            masking = [iv for iv in ivs if iv.masked_per_token(layer)]
            raise ValueError(f"layer {layer}: {', '.join(map(repr, masking))} masks {n_masked} experts per token and "
                             f"the routing picks k={k}: r + k = {n_masked + k} is more than the {n_left} experts "
                             f"available (n_experts={n_experts})")
        probs, indices, weights = rule(logits, min(k, n_left))
        for iv in ivs:
            probs, indices, weights = iv.edit_routing(layer, probs, indices, weights, ctx)
        return probs, indices, weights

    routing_fn.interventions = ivs  # for inspection
    return routing_fn


def unwrap(model):
    """``(mixtral, call)``: the moe_lab ``Mixtral`` that holds the MoE modules and what to call
    for a forward -- the model itself, or for a ``StreamingMixtral`` its ``.model`` and itself."""
    inner = getattr(model, "model", None)
    if inner is not None and hasattr(model, "iter_layers") and hasattr(inner, "blocks"):
        return inner, model
    if hasattr(model, "blocks") and hasattr(model, "args"):
        return model, model
    hint = ("; convert a transformers model with moe_lab.checkpoints.convert.from_hf_model(model)"
            if bridge.is_hf_model(model) else "")
    raise TypeError(f"expected a moe_lab Mixtral (or StreamingMixtral), got {type(model).__name__}{hint}")


def layer_ids(mixtral) -> list[int]:
    """The layer number of each block: ``model.layer_ids`` for a model loaded with ``layers=``
    (checkpoint numbering), else 0..n_layers-1. Traces and interventions use these numbers."""
    ids = getattr(mixtral, "layer_ids", None)
    return [int(i) for i in ids] if ids is not None else list(range(len(mixtral.blocks)))


def active_interventions(model) -> list[Intervention]:
    """Interventions currently applied to ``model`` (outermost first)."""
    inner = getattr(model, "model", None)
    if inner is not None and hasattr(model, "iter_layers"):
        model = inner
    return list(model.__dict__.get(_ACTIVE_ATTR, ()))


def _moe_lab_positions(args, kwargs) -> Tensor | None:
    """RoPE positions of a moe_lab forward (what ``Mixtral._positions_and_mask`` computes)."""
    tokens = args[0] if args else kwargs.get("tokens")
    if not isinstance(tokens, Tensor) or tokens.dim() != 2:
        return None
    B, T = tokens.shape
    mask, cache = kwargs.get("attention_mask"), kwargs.get("cache")
    if mask is not None and not bool(mask.all()):
        return (mask.long().cumsum(-1) - 1).clamp(min=0)
    base = torch.arange(T, device=tokens.device)[None]
    return base + cache.positions[:, None] if cache is not None else base.expand(B, T)


@contextmanager
def intervene(model, *interventions: Intervention) -> Iterator:
    """Apply ``interventions`` to ``model`` for the block; everything is restored on exit, also
    when the block raises. Works on moe_lab models (``Mixtral``, one loaded with ``layers=``,
    ``StreamingMixtral``) and on transformers models with Mixtral-style routers (see
    :mod:`moe_lab.routing.bridge`). Yields the model."""
    for iv in interventions:
        if not isinstance(iv, Intervention):
            raise TypeError(f"intervene takes Intervention objects (AblateExpert, SwapExpert, SteerExperts, "
                            f"MaskTopExperts, ForceExpert, SetTopK, RouterTemperature, CustomRouting), got {iv!r}")
    apply = _hf_intervene if bridge.is_hf_model(model) else _moe_lab_intervene
    with apply(model, interventions):
        yield model


def _bookkeeping(model, interventions):
    """Record the interventions as active on ``model`` (see :func:`active_interventions`)."""
    previous = model.__dict__.get(_ACTIVE_ATTR, [])
    object.__setattr__(model, _ACTIVE_ATTR, previous + list(interventions))
    return previous


@contextmanager
def _moe_lab_intervene(outer, interventions):
    model, _ = unwrap(outer)
    moes = {lid: block.moe for lid, block in zip(layer_ids(model), model.blocks) if block.moe is not None}
    n_experts = model.args.n_experts
    for iv in interventions:
        iv.check(len(model.blocks), n_experts, list(moes))
    _, call = unwrap(outer)
    for iv in interventions:
        iv.prepare(model, call)
    ctx = _Context()
    saved: list[tuple[object, RoutingFn]] = []
    handles = []
    previous = model.__dict__.get(_ACTIVE_ATTR, [])
    try:
        if any(iv.needs_positions for iv in interventions):
            def set_positions(module, args, kwargs):
                ctx.positions = _moe_lab_positions(args, kwargs)
            handles.append(model.register_forward_pre_hook(set_positions, with_kwargs=True))
        for layer, moe in moes.items():
            fn = compose(layer, moe.routing_fn, interventions, ctx, n_experts)
            if fn is not moe.routing_fn:
                saved.append((moe, moe.routing_fn))
                moe.routing_fn = fn
            swaps = [sw for iv in interventions if iv.applies(layer) for sw in iv.swaps(layer)]
            if swaps:
                handles.extend(_swap_during_forward(moe, swaps))
            editors = [iv for iv in interventions if iv.applies(layer) and iv.edits_output(layer)]
            if editors:
                handles.append(_edit_output_after_forward(moe, layer, editors, ctx))
        _bookkeeping(model, interventions)
        yield outer
    finally:
        for moe, fn in reversed(saved):
            moe.routing_fn = fn
        for h in reversed(handles):
            h.remove()
        object.__setattr__(model, _ACTIVE_ATTR, previous)


def _swap_during_forward(moe, swaps: list[tuple[int, int]]):
    """Hooks on ``moe`` that, during its forward only, put ``experts[replacement]``'s module in
    slot ``expert`` (in order) and put the originals back afterwards, also when the forward raises.
    Only during the forward, so a StreamingMixtral still loads each expert's own weights."""
    originals: list = []

    def swap_in(module, args):
        experts = module.experts._modules
        originals.append(dict(experts))
        for e, r in swaps:
            experts[str(e)] = experts[str(r)]

    def swap_back(module, args, output):
        if originals:
            module.experts._modules.update(originals.pop())

    return [moe.register_forward_pre_hook(swap_in), moe.register_forward_hook(swap_back, prepend=True, always_call=True)]  # nested: inner first


def _edit_output_after_forward(moe, layer, editors, ctx):
    """A forward hook on ``moe`` that passes its output (N, D) through each editor's ``edit_output``."""

    def hook(module, args, output):
        y = output[0] if isinstance(output, tuple) else output
        flat = y.reshape(-1, y.shape[-1])
        for iv in editors:
            flat = iv.edit_output(layer, flat, ctx)
        y = flat.view(y.shape)
        return (y, *output[1:]) if isinstance(output, tuple) else y

    return moe.register_forward_hook(hook)


@contextmanager
def _hf_intervene(model, interventions):
    """Interventions on a transformers model: the composed routing function of each layer goes
    to the bridge, which replaces the router's output with it."""
    routers = bridge.replaceable_routers(model)
    n_experts = bridge.n_experts_of(next(iter(routers.values())))
    n_layers = len(bridge.decoder_layers(model))
    for iv in interventions:
        iv.check(n_layers, n_experts, list(routers))
        if any(iv.edits_output(layer) for layer in routers if iv.applies(layer)):
            raise NotImplementedError(f"{iv!r}: mean ablation replaces an expert's output, which needs one module per "
                                      f"expert; transformers models ({type(model).__name__}) fuse a layer's experts "
                                      "into one module. Convert the model (moe_lab.checkpoints.convert.from_hf_model) "
                                      "or use AblateExpert(..., mode='zero') / 'reroute'")
        if any(iv.swaps(layer) for layer in routers if iv.applies(layer)):
            raise NotImplementedError(f"{iv!r}: swapping experts needs one module per expert; transformers "
                                      f"models ({type(model).__name__}) fuse a layer's experts into one module. "
                                      "Convert the model (moe_lab.checkpoints.convert.from_hf_model) or use "
                                      "AblateExpert(..., mode='zero') / SteerExperts, which the bridge supports")
    ctx = _Context()
    fns = {}
    for layer, router in routers.items():
        base = bridge.base_rule(router)
        fn = compose(layer, base, interventions, ctx, n_experts)
        if fn is not base:
            fns[layer] = fn
    on_positions = None
    if any(iv.needs_positions for iv in interventions):
        def on_positions(positions):
            ctx.positions = positions
    previous = model.__dict__.get(_ACTIVE_ATTR, [])
    try:
        with bridge.replace_router_outputs(model, fns, on_positions=on_positions):
            _bookkeeping(model, interventions)
            yield model
    finally:
        object.__setattr__(model, _ACTIVE_ATTR, previous)


__all__ = ["Intervention", "AblateExpert", "SwapExpert", "SteerExperts", "MaskTopExperts", "ForceExpert", "SetTopK", "RouterTemperature", "CustomRouting",
           "intervene", "active_interventions", "compose", "expert_mean_outputs", "topk_softmax_routing"]
