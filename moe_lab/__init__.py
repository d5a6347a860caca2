"""moe_lab: a hands-on toolkit for learning how sparse Mixture-of-Experts models (Mixtral) work."""

__version__ = "0.1.0"

from .model import (  # noqa: F401
    HookPoint,
    KVCache,
    Loss,
    Mixtral,
    ModelArgs,
    ParamCount,
    count_params,
    load_balancing_loss,
    router_z_loss,
    topk_softmax_routing,
)
