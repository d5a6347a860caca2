"""Routing analyses: pure functions of a :class:`~moe_lab.RoutingTrace`, each with its baseline.

``stats.py``: load, repetition (the paper's Table 5 / Figure 10), co-activation, confidence,
specialisation, cross-layer structure, the expert-cache simulator (hit rates; fast enough for a
store). Analyses documented "trace or store" also take a :class:`~moe_lab.TraceStore` (a trace on
disk) and read it in chunks.
``offload.py``: the offloading what-if: per-layer caches with counts, placements and prefetch,
speculative prefetch, bytes -> tokens/s, calibration against published Mixtral 8x7B numbers.
``sources.py``: where a number comes from (a real model or trace, the demo model, a synthetic
fixture), carried with the data so that titles and captions say so.
``language.py``: does routing follow the language or the content (aligned paragraphs in five
languages), and how much of it hidden-state similarity explains.
"""

from .stats import (  # noqa: F401
    Choice,
    Source,
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
    router_saturation,
    layer_transitions,
    normalized_mutual_information,
    cross_layer_nmi,
    simulate_expert_cache,
    cache_hit_rates,
    generated_only,
)
from .offload import (  # noqa: F401
    Policy,
    POLICIES,
    PLACEMENTS,
    LayerCacheResult,
    simulate_layer_cache,
    placement,
    simulate_offload,
    policy_comparison,
    Prefetch,
    PREFETCH_SOURCES,
    speculative_prefetch,
    prefetch_hit_rates,
    Link,
    LINKS,
    MEMORIES,
    PRECISIONS,
    bits_per_weight,
    MoeBytes,
    moe_bytes,
    decode_time,
    System,
    SYSTEMS,
    MEMORY_CAPACITY,
    resident_bytes,
    max_resident_experts,
    offload_table,
    PublishedRun,
    MIXTRAL_PUBLISHED,
    mixtral_calibration,
)
from ..provenance import (  # noqa: F401
    SYNTHETIC_FIXTURE,
    DEMO_MODEL,
    RANDOM_MODEL,
    STAND_INS,
    provenance,
    mark,
    is_stand_in,
    headline,
)
from .language import (  # noqa: F401
    expert_usage,
    pairwise_similarity,
    split_halves,
    split_half_similarity,
    noise_ceiling,
    token_overlap,
    shared_token_mask,
    untranslated_paragraphs,
    mean_router_inputs,
    aligned_grid,
    compare_pairs,
    LanguageContent,
    language_vs_content,
    HiddenControl,
    hidden_state_control,
)
