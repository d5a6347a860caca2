"""The MoE block and its designs: ``block.py`` (``MoE``: router, experts, shared experts, the
forward), ``routers.py`` (the routing rules, one function per design), ``experts.py`` (``Expert``:
SwiGLU and its variants), ``designs.py`` (the design fields of ``ModelArgs``, each family's values
``DESIGNS``, the config checks). Options come from ``moe_lab.model.ModelArgs``; ``docs/MOE_BLOCK_API.md`` at the
repository root lists them."""

from .block import MoE
from .experts import ACTIVATIONS, Expert, clamped_swiglu, make_expert
from .routers import (RoutingFn, capacity_of, drop_overflow, expert_choice, limit_to_groups, router_scores,
                      token_choice, topk_softmax_routing)

__all__ = ["MoE", "Expert", "make_expert", "clamped_swiglu", "ACTIVATIONS", "RoutingFn", "topk_softmax_routing",
           "token_choice", "router_scores", "limit_to_groups", "capacity_of", "drop_overflow", "expert_choice"]
