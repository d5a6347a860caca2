"""moe_lab: a hands-on toolkit for learning how sparse Mixture-of-Experts models (Mixtral) work.

The package, by folder (imports only go down this list; ``docs/DESIGN.md`` has the map):

* ``hooks.py``, ``model.py``, ``generation.py``, ``tokenizer.py``: the model a learner reads and
  edits, its hook points, and text in and out;
* ``checkpoints/``: loading and saving every published Mixtral layout, streaming a model larger
  than memory;
* ``routing/``: routing traces, tracing, interventions and the transformers bridge;
* ``analysis.py``, ``viz.py``, ``widgets.py``: analyses with baselines, figures, the explorer;
* ``train/``, ``corpus/``: the training loop and the corpus that made the demo model.
* ``lab/``: the design-space lab (``python -m moe_lab.lab run``): every MoE recipe trained side by side (notebook 10).
"""

import sys as _sys

from .version import __version__  # noqa: F401

from .hooks import ActivationCache, HookPoint  # noqa: F401
from .devices import default_device  # noqa: F401
from .model import (  # noqa: F401
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
from .moe.twins import moe_from_transformers  # noqa: F401 (the twin of a transformers MoE block)
from .tokenizer import Tokenizer, load_tokenizer  # noqa: F401
from .routing.trace import RoutingTrace  # noqa: F401
from .routing.store import TraceStore, TraceWriter, open_store, save_store  # noqa: F401
from .routing.interventions import (  # noqa: F401
    AblateExpert,
    CustomRouting,
    ForceExpert,
    MaskTopExperts,
    RouterTemperature,
    SetTopK,
    SteerExperts,
    SwapExpert,
    intervene,
)
from .routing.tracing import trace_generation, trace_routing  # noqa: F401
from .checkpoints.loading import CheckpointError, describe_checkpoint, load_model, save_model  # noqa: F401
from .demo import demo_model_available, demo_model_dir, load_demo_model  # noqa: F401
from .checkpoints.streaming import StreamingMixtral  # noqa: F401
from .checkpoints import convert, files, layouts, loading, streaming  # noqa: F401
from . import devices  # noqa: F401
from .routing import bridge, importers, interventions, store, trace, tracing  # noqa: F401

# The module paths of moe_lab 0.1 (``moe_lab.trace``, ``moe_lab.loading``, ...) keep working:
# each names the module that now lives in a subpackage.
for _old, _mod in {"checkpoint": files, "convert": convert, "layouts": layouts, "loading": loading,
                   "streaming": streaming, "bridge": bridge, "interventions": interventions,
                   "trace": trace, "tracing": tracing}.items():
    _sys.modules.setdefault(f"{__name__}.{_old}", _mod)
    globals().setdefault(_old, _mod)
del _old, _mod
