"""Routing rules: which experts each token goes to, and with what weight.

Every rule has the contract of ``MoE.routing_fn`` (interventions and tracing wrap it)::

    rule(logits (N, E), k) -> scores (N, E) fp32, indices (N, k'), weights (N, k') fp32

``scores`` are the router's probabilities (softmax) or sigmoid scores over all experts (hook
``hook_router_probs``); ``indices`` the chosen experts of each token in rank order; ``weights``
what each chosen expert's output is multiplied by. An **empty slot** is index ``-1`` with weight
0: a token dropped by an expert's capacity (Switch), or the padding of expert choice, where a token
gets anywhere from 0 to E experts (then k' = E). ``RoutingTrace`` records the same -1 / 0.

The designs, one function each (``MoE`` picks one from its ``ModelArgs`` and passes the options):

==========================  ==================================================================
``topk_softmax_routing``    Mixtral: softmax over all E, keep the top k, renormalise (the default)
``token_choice``            the general token-choice rule: softmax or sigmoid scores, a
                            selection-only bias (DeepSeek-V3), group-limited choice
                            (``limit_to_groups``), renormalised or not (OLMoE, Qwen2-MoE: not),
                            softmax after top-k (GPT-OSS, Granite), a routed scaling factor
``drop_overflow``           Switch: after token choice, each expert takes at most ``capacity``
                            tokens per sequence; the rest pass through the residual only
``expert_choice``           Zhou et al. 2022: each expert takes its top-c tokens of the sequence
==========================  ==================================================================
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

RoutingFn = Callable[[Tensor, int], tuple[Tensor, Tensor, Tensor]]


def topk_softmax_routing(logits: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Mixtral's router: softmax over all E in fp32, keep the top k (experts per token), renormalise.

    logits (N, E) -> probs (N, E) fp32, indices (N, k) in rank order, weights (N, k) summing to 1.
    (Equivalent to mistral-inference's top-k on logits then softmax over the k.)
    """
    probs = F.softmax(logits.float(), dim=-1)  # (N, E)
    weights, indices = torch.topk(probs, k, dim=-1)  # (N, k)
    return probs, indices, weights / weights.sum(dim=-1, keepdim=True)


def router_scores(logits: Tensor, score: str = "softmax") -> Tensor:
    """logits (N, E) -> scores (N, E) in fp32: softmax over the experts, or each expert's sigmoid."""
    return logits.float().softmax(-1) if score == "softmax" else logits.float().sigmoid()


def token_choice(logits: Tensor, k: int, *, score: str = "softmax", renormalise: bool = True,
                 softmax_after_topk: bool = False, selection_bias: Tensor | None = None,
                 n_group: int = 1, topk_group: int = 1, scale: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """Each token picks its k experts. logits (N, E) -> scores (N, E), indices (N, k), weights (N, k).

    * ``score``: "softmax" (Mixtral, OLMoE, Qwen) or "sigmoid" (DeepSeek-V3, Llama 4);
    * ``selection_bias`` (E,): added to the scores to *choose* only; the weights are the unbiased
      scores (DeepSeek-V3's auxiliary-loss-free balancing; ``MoE.update_selection_bias`` trains it);
    * ``n_group``, ``topk_group``: choose only among the experts of the best groups (DeepSeek-V3);
    * ``renormalise``: rescale the k weights to sum to 1 (Mixtral, Qwen3, DeepSeek-V3) or keep the
      raw scores (OLMoE, Qwen2-MoE, Llama 4, Switch);
    * ``softmax_after_topk``: top-k on the logits, then a softmax over those k (GPT-OSS, Granite);
    * ``scale``: the routed scaling factor every weight is multiplied by (DeepSeek-V3).
    """
    scores = router_scores(logits, score)  # (N, E)
    if softmax_after_topk:  # GPT-OSS: the weights are a softmax over the k chosen logits
        top, indices = logits.float().topk(k, dim=-1)  # (N, k)
        return scores, indices, top.softmax(-1) * scale
    choice = scores if selection_bias is None else scores + selection_bias  # bias: choosing only
    if n_group > 1:
        choice = limit_to_groups(choice, n_group, topk_group)
    indices = choice.topk(k, dim=-1).indices  # (N, k)
    weights = scores.gather(-1, indices)  # (N, k) the unbiased scores of the chosen experts
    if renormalise:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return scores, indices, weights * scale


def limit_to_groups(choice: Tensor, n_group: int, topk_group: int) -> Tensor:
    """DeepSeek-V3's group-limited routing: the E experts form ``n_group`` groups of consecutive
    ids; a group's score is the sum of its two best scores; only the experts of each token's
    ``topk_group`` best groups stay eligible (the others get -inf). choice (N, E) -> (N, E)."""
    N, E = choice.shape
    groups = choice.view(N, n_group, E // n_group)  # (N, G, E/G)
    group_scores = groups.topk(min(2, E // n_group), dim=-1).values.sum(-1)  # (N, G)
    best = group_scores.topk(topk_group, dim=-1).indices  # (N, topk_group)
    keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)  # (N, G)
    return choice.masked_fill(~keep[:, :, None].expand_as(groups).reshape(N, E), float("-inf"))


def capacity_of(n_tokens: int, k: int, n_experts: int, capacity_factor: float | None,
                expert_capacity: int | None = None) -> int:
    """Tokens an expert may take from a group of ``n_tokens``: ``expert_capacity`` if set, else
    ceil(capacity_factor * n_tokens * k / n_experts) (1.0 = exactly the balanced share)."""
    if expert_capacity is not None:
        return expert_capacity
    return max(1, math.ceil(capacity_factor * n_tokens * k / n_experts))


def drop_overflow(indices: Tensor, weights: Tensor, n_experts: int, capacity: int,
                  group_size: int | None = None) -> tuple[Tensor, Tensor]:
    """Switch's capacity: each expert takes at most ``capacity`` tokens of each group of
    ``group_size`` consecutive tokens (one sequence; None: all N); first choices before second
    choices, then in token order (as transformers' Switch and GShard). A slot over capacity becomes
    index -1, weight 0: that token's slot adds nothing, the token passes through the residual.
    indices, weights (N, k) -> the same, with the overflow emptied."""
    N, k = indices.shape
    T = group_size or N
    taken = indices >= 0
    one_hot = F.one_hot(indices.clamp(min=0), n_experts) * taken[..., None]  # (N, k, E)
    queue = one_hot.view(N // T, T, k, n_experts).transpose(1, 2).reshape(N // T, k * T, n_experts)  # rank-major
    place = queue.cumsum(1).view(N // T, k, T, n_experts).transpose(1, 2).reshape(N, k, n_experts)
    place = (place * one_hot).sum(-1)  # (N, k): 1-based place of each slot in its expert's queue
    kept = taken & (place <= capacity)
    return indices.masked_fill(~kept, -1), weights.masked_fill(~kept, 0.0)


def expert_choice(logits: Tensor, capacity: int, group_size: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Expert choice (Zhou et al. 2022): in each group of ``group_size`` consecutive tokens (one
    sequence; None: all N), every expert takes the ``capacity`` tokens with the highest softmax
    probability for it; a token's weight for an expert is that probability. A token can get 0 to
    E experts: indices, weights (N, E) in rank order, padded with -1 / 0.

    Not causal: a token's experts depend on the other tokens of its sequence, later ones included;
    in a one-token decode step every expert takes the token (capacity >= 1).
    """
    N, E = logits.shape
    T = group_size or N
    probs = logits.float().softmax(-1)  # (N, E)
    top = probs.view(N // T, T, E).topk(min(capacity, T), dim=1).indices  # (G, c, E) each expert's tokens
    chosen = torch.zeros(N // T, T, E, dtype=torch.bool, device=logits.device).scatter_(1, top, True).view(N, E)
    chosen = chosen & (probs > 0)  # an expert with probability 0 (an ablated one: logit -inf) takes nothing
    ranked = probs.masked_fill(~chosen, -1.0).sort(-1, descending=True)  # chosen experts first, best first
    indices = ranked.indices.masked_fill(ranked.values < 0, -1)
    return probs, indices, ranked.values.clamp(min=0.0)
