"""The MoE block: a router (``gate``), routed ``experts``, optional shared experts.

    y = sum over the experts e chosen for x of weight_e * expert_e(x)  [+ shared(x)]

``MoE.route`` computes the router logits and calls ``MoE.routing_fn`` (a rule of
``moe_lab.moe.routers``: Mixtral's ``topk_softmax_routing`` by default, or this block's
``token_choice_rule`` / ``expert_choice_rule`` for the other designs); ``MoE.forward`` runs the
chosen experts and adds the shared expert. Every option comes from ``ModelArgs`` (see
``docs/MOE_BLOCK_API.md`` and ``docs/DESIGN.md``). Interventions and tracing wrap ``routing_fn``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from ..hooks import HookPoint
from . import routers
from .experts import make_expert
from .routers import RoutingFn


class MoE(nn.Module):
    """Sparse mixture of experts: y = sum_{i in topk(x)} softmax(x Wg)_i-renormalised * E_i(x) (Mixtral),
    and the other designs of ``ModelArgs`` (see ``moe_lab.moe.routers`` for the routing rules)."""

    def __init__(self, args):
        super().__init__()
        self.n_experts, self.experts_per_token = args.n_experts, args.experts_per_token
        self.gate = nn.Linear(args.dim, args.n_experts, bias=args.router_bias)  # router logits x Wg (+ b: GPT-OSS)
        self.experts = nn.ModuleList(make_expert(args, args.hidden_dim) for _ in range(args.n_experts))
        # design options (ModelArgs fields of the same name, minus the router_ prefix)
        self.router, self.score, self.renormalise = args.router, args.router_score, args.router_renormalise
        self.softmax_after_topk, self.scale = args.router_softmax_after_topk, args.routed_scaling_factor
        self.n_group, self.topk_group = args.n_group, args.topk_group
        self.capacity_factor, self.expert_capacity = args.capacity_factor, args.expert_capacity
        self.score_on_input = args.score_on_input  # Llama 4: expert_e(weight * x) instead of weight * expert_e(x)
        self.selection_bias_rate = args.selection_bias_rate
        self.register_buffer("selection_bias", torch.zeros(args.n_experts) if args.selection_bias else None)
        n_shared = args.n_shared_experts
        shared_hidden = args.shared_hidden_dim or args.hidden_dim  # each shared expert's hidden size
        self.shared_expert = make_expert(args, n_shared * shared_hidden) if n_shared else None
        self.shared_expert_gate = nn.Linear(args.dim, 1, bias=False) if n_shared and args.shared_expert_gate else None
        self.group_size: int | None = None  # tokens per sequence of the current forward (capacity counts per sequence)
        self.routing_fn: RoutingFn = self.default_routing_fn()  # swapped by interventions
        self.fast = True  # group the expert calls with one sort (dispatch_grouped); False: the loop below
        self.hook_router_logits = HookPoint()  # (N, E)
        self.hook_router_probs = HookPoint()  # (N, E) fp32 scores over all experts (softmax or sigmoid)
        self.hook_topk_indices = HookPoint()  # (N, k) chosen experts, rank order; -1 = empty slot
        self.hook_topk_weights = HookPoint()  # (N, k) their weights (0 in an empty slot)
        self.hook_dropped = HookPoint()  # (N,) bool: the token reached no routed expert (capacity, expert choice)
        # hook_dropped's own hook dicts: "is anyone listening?" without nn.Module's attribute lookup, on every forward
        self._dropped_listeners = (self.hook_dropped._forward_hooks, self.hook_dropped._forward_pre_hooks)
        self.hook_shared_out = HookPoint() if n_shared else None  # (N, D) the shared experts' output (after their gate)

    # ---- routing

    def default_routing_fn(self) -> RoutingFn:
        """This block's rule: Mixtral's function itself for Mixtral's options, else a method that
        calls the rule of ``routers`` with this block's options (so an edit of ``routers`` applies)."""
        if self.router == "expert_choice":
            return self.expert_choice_rule
        mixtral = (self.score == "softmax" and self.renormalise and not self.softmax_after_topk and self.scale == 1.0
                   and self.selection_bias is None and self.n_group == 1 and self.capacity_factor is None
                   and self.expert_capacity is None)
        return routers.topk_softmax_routing if mixtral else self.token_choice_rule

    def token_choice_rule(self, logits: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
        """Tokens choose their k experts (``routers.token_choice``), then, with a capacity, each
        expert keeps its first ``capacity`` tokens of each sequence (``routers.drop_overflow``)."""
        scores, indices, weights = routers.token_choice(
            logits, k, score=self.score, renormalise=self.renormalise, softmax_after_topk=self.softmax_after_topk,
            selection_bias=self.selection_bias, n_group=self.n_group, topk_group=self.topk_group, scale=self.scale)
        if self.capacity_factor is not None or self.expert_capacity is not None:
            T = self.group_size or len(logits)
            capacity = routers.capacity_of(T, k, self.n_experts, self.capacity_factor, self.expert_capacity)
            indices, weights = routers.drop_overflow(indices, weights, self.n_experts, capacity, T)
        return scores, indices, weights

    def expert_choice_rule(self, logits: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
        """Experts choose their tokens (``routers.expert_choice``): each takes
        ceil(capacity_factor * T * k / E) of each sequence of T tokens (k: the average per token)."""
        T = self.group_size or len(logits)
        capacity = routers.capacity_of(T, k, self.n_experts, self.capacity_factor or 1.0, self.expert_capacity)
        return routers.expert_choice(logits, capacity, T)

    def route(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x (N, D) -> router logits (N, E), expert indices (N, k), weights (N, k) fp32."""
        logits = self.hook_router_logits(self.gate(x))  # (N, E)
        probs, indices, weights = self.routing_fn(logits, self.experts_per_token)
        self.hook_router_probs(probs)
        if any(self._dropped_listeners):  # = self.hook_dropped.active: the comparison is only computed when recorded
            self.hook_dropped((indices < 0).all(-1))
        if self.training and self.selection_bias is not None and torch.is_grad_enabled():
            self.update_selection_bias(indices)
        return logits, self.hook_topk_indices(indices), self.hook_topk_weights(weights)

    @torch.no_grad()
    def update_selection_bias(self, indices: Tensor) -> None:
        """DeepSeek-V3's auxiliary-loss-free balancing, once per training forward: each expert's
        selection bias moves by ``selection_bias_rate`` towards balance (up when it got fewer tokens
        than the mean, down when more). indices (N, k), -1 = empty slot."""
        load = torch.bincount(indices[indices >= 0], minlength=self.n_experts).float()  # (E,)
        self.selection_bias += self.selection_bias_rate * torch.sign(load.mean() - load)

    # ---- the experts

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x (B, T, D) -> output (B, T, D) and router logits (B*T, E).

        y_n = sum over the k experts e chosen for token n of weight_ne * expert_e(x_n)  [+ shared(x_n)]
        """
        shape = x.shape
        T = shape[1] if x.dim() == 3 else None  # a sequence: capacity and expert choice count in it
        if self.group_size != T:
            self.group_size = T
        x = x.reshape(-1, shape[-1])  # (N, D)
        logits, indices, weights = self.route(x)  # (N, E), (N, k), (N, k)
        weights = weights.to(x.dtype)
        if self.fast:  # the same expert calls, grouped by one sort instead of a search per expert
            out = self.dispatch_grouped(x, indices, weights)
        else:
            out = torch.zeros_like(x)  # (N, D)
            for e in range(self.n_experts):
                token, slot = torch.where(indices == e)  # the tokens that chose e, and in which of their k slots
                if len(token):
                    w = weights[token, slot, None]  # (n, 1)
                    y = self.experts[e](self.expert_input(x[token], w))
                    out.index_add_(0, token, self.weighted_output(y, w))
        if self.shared_expert is not None:
            out = out + self.hook_shared_out(self.shared(x))
        return out.view(shape), logits

    # Where a token's routing weight w applies: to the expert's output (Mixtral and most designs),
    # or to its input (Llama 4, score_on_input). x, y (n, D), w (n, 1) or a number.

    def expert_input(self, x: Tensor, w: Tensor) -> Tensor:
        """What an expert gets: its tokens x, or (Llama 4) x times their weights."""
        return x * w if self.score_on_input else x

    def weighted_output(self, y: Tensor, w: Tensor) -> Tensor:
        """What an expert adds to its tokens: its output y times their weights (Llama 4: y, the weight went in)."""
        return y if self.score_on_input else w * y

    def shared(self, x: Tensor) -> Tensor:
        """The shared experts (every token, no routing; DeepSeek's n_shared_experts are one wider
        expert), times sigmoid(x Wsg) with Qwen2-MoE's shared gate. x (N, D) -> (N, D)."""
        y = self.shared_expert(x)
        if self.shared_expert_gate is not None:
            y = torch.sigmoid(self.shared_expert_gate(x)) * y
        return y

    def dispatch_grouped(self, x: Tensor, indices: Tensor, weights: Tensor) -> Tensor:
        """``forward``'s loop with the same ``self.experts[e](rows)`` calls and less work
        around them: the (token, slot) pairs sorted by expert once, each expert's rows one slice.

        x (N, D), indices (N, k), weights (N, k) -> (N, D). Empty slots (-1) are skipped.
        """
        N, k = indices.shape
        if N == 1 and not torch.is_grad_enabled():  # one token (a decode step): its k experts in turn
            out = None
            for e, w in zip(indices.tolist()[0], weights.tolist()[0]):
                if e >= 0:  # -1: an empty slot
                    y = self.weighted_output(self.experts[e](self.expert_input(x, w)), w)  # (1, D)
                    out = y if out is None else out.add_(y)
            return torch.zeros_like(x) if out is None else out
        flat = indices.reshape(-1)  # (N*k,)
        order = flat.argsort(stable=True)  # slots grouped by expert, empty slots (-1) first
        counts = torch.bincount(flat + 1, minlength=self.n_experts + 1).tolist()  # [empty, expert 0, ...]
        if counts[0]:
            if counts[0] == N * k:  # every slot empty: no expert runs
                return torch.zeros_like(x)
            order = order[counts[0]:]  # the filled slots only
        token_of_slot = order.div(k, rounding_mode="floor")  # (n,)
        ws = weights.reshape(-1, 1)[order]  # (n, 1)
        rows = self.expert_input(x.index_select(0, token_of_slot), ws).split(counts[1:])  # rows[e]: (counts[e+1], D)
        ys = torch.cat([self.experts[e](rows[e]) for e in range(self.n_experts) if counts[e + 1]])  # (n, D)
        return torch.zeros_like(x).index_add_(0, token_of_slot, self.weighted_output(ys, ws).to(x.dtype))
