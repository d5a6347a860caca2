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
from .tokenizer import Tokenizer, load_tokenizer  # noqa: F401
from .trace import RoutingTrace  # noqa: F401
from .hooks import ActivationCache  # noqa: F401
from .interventions import (  # noqa: F401
    AblateExpert,
    CustomRouting,
    ForceExpert,
    RouterTemperature,
    SetTopK,
    intervene,
)
from .tracing import trace_generation, trace_routing  # noqa: F401
from .loading import CheckpointError, describe_checkpoint, load_model, save_model  # noqa: F401
from .streaming import StreamingMixtral  # noqa: F401
