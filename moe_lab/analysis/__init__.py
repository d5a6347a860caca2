"""Routing analyses: pure functions of a :class:`~moe_lab.RoutingTrace`, each with its baseline.

``stats.py``: load, repetition (the paper's Table 5 / Figure 10), co-activation, confidence,
specialisation, cross-layer structure, the expert-cache simulator.
``language.py``: does routing follow the language or the content (aligned paragraphs in five
languages), and how much of it hidden-state similarity explains.
``training.py``: routing over training (router saturation from a run's router snapshots).
"""

from .stats import (  # noqa: F401
    Choice,
    expert_load,
    uniform_load,
    expert_load_by_domain,
    domain_load_divergence,
    BalanceSummary,
    load_balance,
    uniform_repetition,
    marginal_repetition,
    Repetition,
    repetition,
    coactivation,
    Confidence,
    router_confidence,
    vocabulary_specialization,
    top_tokens_per_expert,
    domain_specialization,
    layer_transitions,
    normalized_mutual_information,
    cross_layer_nmi,
    simulate_expert_cache,
    cache_hit_rates,
    generated_only,
)
from .language import (  # noqa: F401
    expert_usage,
    pairwise_similarity,
    mean_router_inputs,
    aligned_grid,
    compare_pairs,
    LanguageContent,
    language_vs_content,
    HiddenControl,
    hidden_state_control,
)
from .training import router_saturation  # noqa: F401
