"""The design-space lab (issue 26): the same small model trained under each MoE recipe, side by side.

    python -m moe_lab.lab run --out data/design_space      # every recipe x 3 seeds; resumable
    python -m moe_lab.lab measure --out data/design_space  # measures again from the final checkpoints, no training

``recipes.py``  the scale, the recipes (matched active parameters), upcycling
``vocab.py``    the reduced vocabulary (Mixtral ids -> the most frequent few thousand)
``run.py``      training (moe_lab.train.train), measures (moe_lab.analysis), results rows, resume
``summary.py``  intervals over seeds, the comparisons of notebook 10, expert choice's causality leak
"""

from .recipes import FULL, MINI, RECIPES, Recipe, Scale, model_args, non_embedding_params, source_args, upcycle_state  # noqa: F401
from .run import RESULTS, SEEDS, Lab, run_lab, train_config  # noqa: F401
from .vocab import ReducedTokenizer, reduced_tokenizer  # noqa: F401
