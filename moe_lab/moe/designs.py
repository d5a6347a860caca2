"""The MoE designs as ``ModelArgs`` fields: which fields make a design, each family's values, and
the checks that give a bad combination a clear error (the field, what it must be, what it is).
The fields themselves are documented on ``moe_lab.model.ModelArgs`` and in ``docs/MOE_BLOCK_API.md``."""

from __future__ import annotations

from dataclasses import MISSING, fields

from .experts import ACTIVATIONS

DESIGN_FIELDS = ("router", "router_score", "router_renormalise", "router_softmax_after_topk", "router_bias",
                 "selection_bias", "n_group", "topk_group", "routed_scaling_factor", "score_on_input",
                 "capacity_factor", "expert_capacity", "n_shared_experts", "shared_hidden_dim", "shared_expert_gate",
                 "expert_bias", "expert_act", "expert_gated", "swiglu_limit", "first_k_dense", "dense_layers",
                 "dense_hidden_dim")  # the fields that change the MoE block (selection_bias_rate, swiglu_alpha: only with them)


# The MoE design of each family as ModelArgs fields (sizes stay the caller's: n_experts, hidden_dim,
# n_group, shared_hidden_dim, first_k_dense ...). ModelArgs.with_design(name) applies one.
DESIGNS: dict[str, dict] = {
    "mixtral": {},  # softmax, top-k, renormalised (also Qwen3-MoE's released checkpoints)
    "olmoe": dict(router_renormalise=False),  # (also Qwen3-MoE's config default)
    "qwen2-moe": dict(router_renormalise=False, n_shared_experts=1, shared_expert_gate=True),
    "deepseek-v3": dict(router_score="sigmoid", selection_bias=True, routed_scaling_factor=2.5, n_shared_experts=1,
                        router_aux_loss_coef=0.0),  # balanced by the selection bias, not a loss
    "gpt-oss": dict(router_bias=True, router_softmax_after_topk=True, expert_bias=True, swiglu_limit=7.0),
    "granite-moe": dict(router_softmax_after_topk=True),
    "llama4": dict(experts_per_token=1, router_score="sigmoid", router_renormalise=False, score_on_input=True,
                   n_shared_experts=1),
    "switch": dict(experts_per_token=1, router_renormalise=False, capacity_factor=1.25, expert_gated=False,
                   expert_act="relu"),
    "expert-choice": dict(router="expert_choice", capacity_factor=1.0),
}


def design_changes(args) -> dict:
    """The MoE design fields of ``args`` whose values differ from Mixtral's ({} for a Mixtral)."""
    default = {f.name: f.default if f.default is not MISSING else f.default_factory() for f in fields(args)
               if f.name in DESIGN_FIELDS}
    return {name: getattr(args, name) for name in DESIGN_FIELDS if getattr(args, name) != default[name]}


def require_mixtral_design(args, what: str) -> None:
    """A clear error for ``what`` (a Mixtral-only file format or conversion) on another design."""
    changes = design_changes(args)
    if changes:
        raise ValueError(f"{what} holds Mixtral models only; this model's MoE design differs from Mixtral's in "
                         f"{changes}. Keep it with torch.save({{'args': model.args.to_dict(), "
                         f"'state_dict': model.state_dict()}}, path)")


def check_design(args) -> None:
    """Clear errors for MoE design options that cannot work: the field, what it must be, what it is."""
    E, k = args.n_experts, args.experts_per_token
    one_of = lambda name, options: (getattr(args, name) in options,  # noqa: E731
                                    f"{name} must be one of {list(options)}, found {getattr(args, name)!r}")
    checks = [
        one_of("router", ("topk", "expert_choice")),
        one_of("router_score", ("softmax", "sigmoid")),
        one_of("expert_act", tuple(ACTIVATIONS)),
        (args.capacity_factor is None or args.capacity_factor > 0,
         f"capacity_factor must be > 0 (or None: no capacity), found {args.capacity_factor}"),
        (args.expert_capacity is None or args.expert_capacity >= 1,
         f"expert_capacity must be >= 1 (or None), found {args.expert_capacity}"),
        (args.n_group >= 1 and E % args.n_group == 0,
         f"n_group must divide n_experts={E} into groups of equal size, found n_group={args.n_group}"),
        (1 <= args.topk_group <= args.n_group,
         f"topk_group must be in [1, n_group={args.n_group}], found {args.topk_group}"),
        (args.router == "expert_choice" or k <= args.topk_group * (E // max(args.n_group, 1)),
         f"experts_per_token={k} must be <= the experts of topk_group={args.topk_group} groups of "
         f"{E // max(args.n_group, 1)}, found {args.topk_group * (E // max(args.n_group, 1))} eligible"),
        (args.routed_scaling_factor > 0, f"routed_scaling_factor must be > 0, found {args.routed_scaling_factor}"),
        (args.selection_bias_rate >= 0, f"selection_bias_rate must be >= 0, found {args.selection_bias_rate}"),
        (not (args.router_softmax_after_topk and args.router_score != "softmax"),
         f"router_softmax_after_topk=True needs router_score='softmax', found {args.router_score!r}"),
        (not (args.router_softmax_after_topk and (args.selection_bias or args.n_group > 1)),
         "router_softmax_after_topk=True chooses on the logits: it cannot be combined with selection_bias or "
         f"n_group > 1, found selection_bias={args.selection_bias}, n_group={args.n_group}"),
        (args.router == "topk" or (args.router_score == "softmax" and not args.selection_bias and args.n_group == 1
                                   and not args.router_softmax_after_topk),
         "router='expert_choice' uses softmax scores, no selection bias, no groups, no softmax after top-k; found "
         f"router_score={args.router_score!r}, selection_bias={args.selection_bias}, n_group={args.n_group}, "
         f"router_softmax_after_topk={args.router_softmax_after_topk}"),
        (args.n_shared_experts >= 0, f"n_shared_experts must be >= 0, found {args.n_shared_experts}"),
        (args.shared_hidden_dim is None or args.shared_hidden_dim >= 1 or not args.n_shared_experts,
         f"shared_hidden_dim must be >= 1 (or None: hidden_dim={args.hidden_dim}) when n_shared_experts="
         f"{args.n_shared_experts}, found {args.shared_hidden_dim}"),
        (not args.shared_expert_gate or args.n_shared_experts > 0,
         f"shared_expert_gate=True needs n_shared_experts >= 1, found {args.n_shared_experts}"),
        (args.swiglu_limit is None or args.swiglu_limit > 0, f"swiglu_limit must be > 0 (or None), found {args.swiglu_limit}"),
        (args.swiglu_limit is None or args.expert_gated,
         f"swiglu_limit={args.swiglu_limit} clamps a SwiGLU: it needs expert_gated=True, found False"),
        (0 <= args.first_k_dense <= args.n_layers,
         f"first_k_dense must be in [0, n_layers={args.n_layers}], found {args.first_k_dense}"),
        (all(0 <= i < args.n_layers for i in args.dense_layers),
         f"dense_layers must be layer numbers in [0, n_layers={args.n_layers}), found {list(args.dense_layers)}"),
        (args.hidden_dim >= 1, f"hidden_dim must be >= 1, found {args.hidden_dim}"),
        (args.dense_hidden_dim is None or args.dense_hidden_dim >= 1,
         f"dense_hidden_dim must be >= 1 (or None: hidden_dim), found {args.dense_hidden_dim}"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ValueError(f"ModelArgs: {msg}")
