"""The offloading what-if: which experts should stay in fast memory, and how fast would that decode?

An offloading runtime keeps some of each layer's experts in fast memory (the GPU, or RAM when the
weights live on an SSD) and serves the others over a slower link, or computes them where they
live. Three questions decide its speed, and this module answers each from a routing trace:

1. **Which experts are resident?** Per layer, a budget of ``c`` experts, managed by a *cache
   policy* (LRU, LFU, or Belady's optimum, which knows the future: the ceiling for any policy)
   or fixed by a *placement* (pin each layer's most frequent experts, as ktransformers'
   ``--kt-expert-placement-strategy frequency`` does; or experts ``0..c-1`` of every layer,
   its ``uniform``; or whole layers front to back, its ``front-loading``, which is what
   llama.cpp's ``--n-cpu-moe`` / ``-ngl`` do). :func:`simulate_layer_cache`, :func:`simulate_offload`.
2. **Can the next layer's experts be fetched before they are needed?** mixtral-offloading's
   *speculative prefetch*: apply layer l+1's router (its ``ffn_norm`` and gate, exactly as the
   model routes) to layer l's hidden state, and load the guessed experts while layer l
   computes. :func:`speculative_prefetch` measures its recall and the hit rate it gives; it needs
   hidden states, so it runs on a model, never on an id-only trace.
3. **How many tokens per second?** Decoding is memory-bound: a token reads every weight it uses
   once. :func:`decode_time` adds the resident bytes read at the fast memory's bandwidth, and
   each miss's expert bytes (at fp16 / int8 / 4-bit / 3-bit, :data:`PRECISIONS`) moved over a
   link (:data:`LINKS`: PCIe 3.0/4.0 x16, NVMe SSD, DDR4/DDR5, unified memory) with its latency.
   :func:`offload_table` tabulates it for real machines (:data:`SYSTEMS`: a device *and* its link,
   with the device's memory capacity) and says which configurations **fit** that memory;
   :func:`mixtral_calibration` sets its estimates for Mixtral 8x7B beside published
   measurements, each modelled as it was measured, with sources.

Shapes: N tokens (in decoding order), k experts per token, L layers, E experts per layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Sequence

import numpy as np
import torch
from torch import Tensor

from ..devices import resolve_device
from ..model import ModelArgs, PRESETS
from ..routing.bridge import decoder_layers, find_routers, hf_forward, is_hf_model
from ..routing.trace import RoutingTrace
from ..routing.tracing import normalise_inputs
from ..provenance import provenance

__all__ = [
    "Policy", "POLICIES", "PLACEMENTS", "LayerCacheResult",
    "simulate_layer_cache", "placement", "simulate_offload", "policy_comparison", "Prefetch", "PREFETCH_SOURCES",
    "speculative_prefetch",
    "prefetch_hit_rates", "Link", "LINKS", "MEMORIES", "PRECISIONS", "bits_per_weight", "MoeBytes",
    "moe_bytes", "decode_time", "System", "SYSTEMS", "MEMORY_CAPACITY", "resident_bytes", "max_resident_experts",
    "offload_table", "PublishedRun", "MIXTRAL_PUBLISHED", "mixtral_calibration",
]

Policy = Literal["lru", "lfu", "optimal", "static"]
#: dynamic cache policies (the cache's content changes as tokens arrive)
POLICIES = ("lru", "lfu", "optimal")
#: static placements (pinned experts; the others are served over the link, never cached)
PLACEMENTS = ("frequency", "uniform", "front_loading")


# --------------------------------------------------------------------------------------------
# 1. One layer's cache


@dataclass
class LayerCacheResult:
    """What one layer's cache did over N tokens."""
    hits: int  # needed experts found resident
    misses: int  # needed experts loaded on demand (on the critical path)
    requests: int  # N * k
    prefetched: int = 0  # experts loaded ahead of time by prefetch (overlapped with compute)
    useful_prefetches: int = 0  # prefetched experts that the token then needed
    misses_per_token: np.ndarray = field(default_factory=lambda: np.zeros(0))  # [N]

    @property
    def hit_rate(self) -> float:
        return self.hits / self.requests if self.requests else float("nan")


def _next_use_maps(reqs: list[list[int]]) -> list[dict[int, int]]:
    """For each step t, expert -> the next step > t that needs it."""
    out: list[dict[int, int]] = [dict() for _ in reqs]
    upcoming: dict[int, int] = {}
    for t in range(len(reqs) - 1, -1, -1):
        out[t] = dict(upcoming)
        for e in reqs[t]:
            upcoming[e] = t
    return out


def simulate_layer_cache(requests, cache_size: int, policy: Policy = "lru", *, pinned: Sequence[int] | None = None,
                         prefetch=None) -> LayerCacheResult:
    """Serve one layer's expert requests token after token from a cache of ``cache_size`` experts.

    ``requests[t]``: the experts token t needs in this layer (its top-k). The experts of one token
    are needed at once, so they are never evicted for each other (unless the cache is smaller
    than k). Policies:

    * ``"lru"``: evict the least recently used expert; ``"lfu"``: the least frequently requested
      (ties: least recent); ``"optimal"``: Belady's rule, the expert needed furthest in the
      future (knows the future: the ceiling for any eviction policy).
    * ``"static"``: the ``pinned`` experts stay resident, the others are fetched for the token and
      dropped (a placement, as ktransformers and llama.cpp run; nothing is ever evicted).

    For hit rates alone on long traces or stores, :func:`moe_lab.analysis.simulate_expert_cache`
    is the fast path (same policies, same hit rates for ``cache_size >= k``: tested); this one adds
    the counts per token, static placements and prefetch.

    ``prefetch[t]`` (optional): experts guessed for token t *before* it arrives (e.g. by
    :func:`speculative_prefetch`); they are loaded ahead of time (``prefetched``, overlapped
    with compute), evicting by the same policy, and count as hits if the token needs them.
    """
    if cache_size < 1:
        raise ValueError(f"cache_size must be >= 1, got {cache_size}")
    if policy not in POLICIES + ("static",):
        raise ValueError(f"policy must be one of {POLICIES + ('static',)}, got {policy!r}")
    reqs = [list(map(int, r)) for r in requests]
    guesses = None if prefetch is None else [list(map(int, g)) for g in prefetch]
    if guesses is not None and len(guesses) != len(reqs):
        raise ValueError(f"prefetch has {len(guesses)} steps for {len(reqs)} requests")
    if policy == "static":
        if pinned is None:
            raise ValueError("policy 'static' needs the pinned experts (see moe_lab.analysis.placement)")
        if len(set(pinned)) > cache_size:
            raise ValueError(f"{len(set(pinned))} pinned experts do not fit a budget of {cache_size}")
        resident = set(map(int, pinned))
        miss = np.array([sum(e not in resident for e in need) for need in reqs], dtype=np.int64)
        total = sum(len(r) for r in reqs)
        return LayerCacheResult(hits=int(total - miss.sum()), misses=int(miss.sum()), requests=total,
                                misses_per_token=miss)
    # expert -> last use; for LRU the dict's order is the recency list (oldest first, a use moves
    # the expert to the end), as in moe_lab.analysis.simulate_expert_cache, whose hit rates this
    # reproduces (tests); LFU breaks ties by last use, then by that order
    cache: dict[int, float] = {}
    freq: dict[int, int] = {}  # expert -> requests so far (LFU)
    next_use = _next_use_maps(reqs) if policy == "optimal" else None

    def make_room(t: int, keep: list[int]) -> None:
        victims = [c for c in cache if c not in keep] or list(cache)
        if policy == "lru":
            victim = victims[0]  # the least recently used
        elif policy == "lfu":
            victim = min(victims, key=lambda c: (freq.get(c, 0), cache[c]))
        else:
            # Belady: furthest next use; an expert this token needs (only when a prefetch or a cache
            # smaller than k forces it) goes last
            victim = max(victims, key=lambda c: (c not in reqs[t], next_use[t].get(c, float("inf"))))
        del cache[victim]

    hits = misses = prefetched = useful = 0
    miss = np.zeros(len(reqs), dtype=np.int64)
    for t, need in enumerate(reqs):
        fetched_now: set[int] = set()
        if guesses is not None:
            for e in guesses[t]:
                if e not in cache:
                    if len(cache) >= cache_size:
                        make_room(t, guesses[t])
                    cache[e] = t - 0.5  # loaded just before the token: the most recent so far
                    prefetched += 1
                    fetched_now.add(e)
        for e in need:
            freq[e] = freq.get(e, 0) + 1
            if e in cache:
                hits += 1
                useful += e in fetched_now
                if policy == "lru":
                    del cache[e]  # moves to the end of the recency order below
            else:
                misses += 1
                miss[t] += 1
                if len(cache) >= cache_size:
                    make_room(t, need)
            cache[e] = t  # last use
    return LayerCacheResult(hits=hits, misses=misses, requests=hits + misses, prefetched=prefetched,
                            useful_prefetches=useful, misses_per_token=miss)


# --------------------------------------------------------------------------------------------
# 2. Placement and whole-model simulation


def _budgets(budget, n_layers: int) -> list[int]:
    b = [int(budget)] * n_layers if np.isscalar(budget) else [int(x) for x in budget]
    if len(b) != n_layers:
        raise ValueError(f"budget has {len(b)} entries for {n_layers} layers")
    if min(b) < 0:
        raise ValueError(f"budgets must be >= 0, got {b}")
    return b


def placement(trace: RoutingTrace, budget, strategy: str = "frequency", *,
              profile: RoutingTrace | None = None) -> dict[int, list[int]]:
    """``{layer: pinned experts}`` for a static placement (ktransformers' strategies).

    ``budget``: experts per layer (an int, or one per traced layer). ``strategy``:

    * ``"frequency"``: each layer's ``budget`` most frequently chosen experts, counted on
      ``profile`` (default: ``trace`` itself, which is optimistic: pass a separate profiling
      trace to measure what a real deployment would get); ties go to the lower id;
    * ``"uniform"``: experts ``0..budget-1`` of every layer (frequency-blind, the same footprint
      per layer);
    * ``"front_loading"``: the same total, ``sum(budget)``, filled layer by layer from the first
      (whole layers resident, the others not: llama.cpp's ``-ngl`` / ``--n-cpu-moe``).
    """
    b = _budgets(budget, trace.n_layers)
    E = trace.n_experts
    if max(b) > E:
        raise ValueError(f"a budget of {max(b)} experts exceeds the {E} experts of a layer")
    if strategy == "frequency":
        prof = trace if profile is None else profile
        if list(prof.layers) != list(trace.layers) or prof.n_experts != E:
            raise ValueError(f"profile traces layers {prof.layers} with {prof.n_experts} experts; "
                             f"expected layers {trace.layers} with {E}")
        out = {}
        for li, layer in enumerate(trace.layers):
            counts = np.bincount(prof.expert_ids[li].ravel(), minlength=E)
            out[layer] = sorted(np.argsort(-counts, kind="stable")[: b[li]].tolist())
        return out
    if strategy == "uniform":
        return {layer: list(range(b[li])) for li, layer in enumerate(trace.layers)}
    if strategy == "front_loading":
        left = sum(b)
        out = {}
        for layer in trace.layers:
            n = min(E, left)
            out[layer], left = list(range(n)), left - n
        return out
    raise ValueError(f"strategy must be one of {PLACEMENTS}, got {strategy!r}")


def simulate_offload(trace: RoutingTrace, budget, policy: str = "lru", *, profile: RoutingTrace | None = None,
                     warmup: RoutingTrace | None = None):
    """Per-layer simulation of a whole model: DataFrame (layer, policy, budget, hits, misses,
    hit_rate, misses_per_token). ``policy``: a cache policy (:data:`POLICIES`) with ``budget``
    experts per layer (int or per layer), or a placement (:data:`PLACEMENTS`, see
    :func:`placement`). The sum of ``misses_per_token`` over layers is what
    :func:`decode_time` charges to the link.

    ``warmup``: tokens served first and not counted (e.g. the text before ``trace``), so that a
    cache starts warm, as a placement does (a placement is resident from the first token)."""
    import pandas as pd

    b = _budgets(budget, trace.n_layers)
    pins = placement(trace, b, policy, profile=profile) if policy in PLACEMENTS else None
    if warmup is not None and (list(warmup.layers) != list(trace.layers) or warmup.n_experts != trace.n_experts):
        raise ValueError(f"warmup traces layers {warmup.layers} with {warmup.n_experts} experts; "
                         f"expected layers {trace.layers} with {trace.n_experts}")
    n_warm = 0 if warmup is None else warmup.n_tokens
    rows = []
    for li, layer in enumerate(trace.layers):
        ids = trace.expert_ids[li]
        if pins is not None:
            size = max(len(pins[layer]), 1)
            r = simulate_layer_cache(ids, size, "static", pinned=pins[layer])
            hits, misses = r.hits, r.misses
        elif b[li] == 0:
            hits, misses = 0, ids.size
        else:
            reqs = ids if warmup is None else np.concatenate([warmup.expert_ids[li], ids])
            r = simulate_layer_cache(reqs, b[li], policy)
            misses = int(r.misses_per_token[n_warm:].sum())
            hits = ids.size - misses
        rows.append({"layer": layer, "policy": policy, "budget": len(pins[layer]) if pins else b[li], "hits": hits,
                     "misses": misses, "hit_rate": hits / ids.size if ids.size else float("nan"),
                     "misses_per_token": misses / max(trace.n_tokens, 1)})
    return pd.DataFrame(rows)


def policy_comparison(trace: RoutingTrace, budgets: Sequence[int] | None = None,
                      policies: Sequence[str] = POLICIES + PLACEMENTS, *, profile: RoutingTrace | None = None,
                      warmup: RoutingTrace | None = None):
    """Whole-model hit rate (all layers' hits / all requests) and misses per token (summed over
    layers) for each policy or placement and per-layer budget: DataFrame (policy, budget,
    hit_rate, misses_per_token). The input of :func:`moe_lab.viz.offload_policy_figure`.

    Caches start **cold** (empty) unless ``warmup`` tokens are served first (see
    :func:`simulate_offload`), while placements are resident from the first token: on a short
    trace without warm-up a cache pays its compulsory misses and a placement does not.
    ``attrs["source"]``: the trace's provenance (:func:`moe_lab.analysis.provenance`)."""
    import pandas as pd

    budgets = list(range(1, trace.n_experts + 1)) if budgets is None else list(budgets)
    rows = []
    for policy in policies:
        for b in budgets:
            df = simulate_offload(trace, b, policy, profile=profile, warmup=warmup)
            rows.append({"policy": policy, "budget": b, "hit_rate": df.hits.sum() / (df.hits.sum() + df.misses.sum()),
                         "misses_per_token": df.misses_per_token.sum()})
    out = pd.DataFrame(rows)
    out.attrs["source"] = provenance(trace)  # "synthetic fixture", "demo model", ...: for the figure's title
    return out


# --------------------------------------------------------------------------------------------
# 3. Speculative prefetch (needs hidden states: a model, not a trace)


@dataclass
class Prefetch:
    """Guesses of layer ``layers[i]``'s experts made from the previous layer's hidden state.

    ``guess[i]``: [N, g] experts guessed for ``layers[i]`` (g = ``n_guess``), best first;
    ``actual[i]``: [N, k] experts that layer then chose; ``source``: which hidden state."""
    layers: list[int]
    guess: np.ndarray  # [L-1, N, g]
    actual: np.ndarray  # [L-1, N, k]
    source: str
    n_tokens_per_doc: list[int]
    provenance: str = ""  # the model's source label (moe_lab.analysis.provenance): "demo model", ...

    @property
    def recall(self) -> np.ndarray:
        """[L-1] share of the chosen experts that were guessed (mixtral-offloading: >80-90%)."""
        hit = (self.actual[..., :, None] == self.guess[..., None, :]).any(-1)  # [L-1, N, k]
        return hit.mean((1, 2))

    def to_pandas(self):
        import pandas as pd

        return pd.DataFrame({"layer": self.layers, "recall": self.recall})


PREFETCH_SOURCES = ("resid_mid", "moe_input", "resid_post")


@torch.no_grad()
def speculative_prefetch(model, inputs, *, source: str = "resid_mid", n_guess: int | None = None,
                         tokenizer=None, max_len: int | None = None, batch_size: int = 8, device=None) -> Prefetch:
    """Guess every layer's experts from the previous layer's hidden state (mixtral-offloading's
    speculative expert loading) and record what the layer then chose.

    ``model``: a moe_lab ``Mixtral`` (also ``StreamingMixtral(path).model``: each guess is made
    while its layer is loaded) or a transformers MoE model (through the bridge). ``inputs``:
    token-id lists, a [B, T] tensor of ids, or texts with ``tokenizer``. No padding: consecutive
    documents of equal length go through one forward together (up to ``batch_size``), the others
    one by one (cut them to a common length with ``max_len`` to stream a checkpoint only once).
    For layer l+1 the guess is the top-``n_guess`` (default k) of layer l+1's own
    router, ``ffn_norm`` then gate, applied to layer l's hidden state ``source``:

    * ``"resid_mid"`` (default): the residual stream after layer l's attention, i.e. the input of
      layer l's MoE before its norm; the guess is ready when layer l's experts start, so loading
      overlaps with their compute;
    * ``"moe_input"``: layer l's normalised MoE input as layer l's router sees it (next gate only);
    * ``"resid_post"``: the residual stream after layer l (the input of layer l+1): exact for the
      attention-free part, but leaves only layer l+1's attention to hide the transfer.

    Models with dense layers between MoE layers (Qwen2-MoE's ``mlp_only_layers``) guess each MoE
    layer from the previous *MoE* layer. A :class:`~moe_lab.routing.trace.RoutingTrace` is refused:
    it holds expert ids, not hidden states. Runs on the model's device (``device``: None or the
    model's device, :mod:`moe_lab.devices`); the arrays are on the CPU.
    """
    if isinstance(model, RoutingTrace):
        raise TypeError("speculative_prefetch needs hidden states, and a RoutingTrace holds only expert ids "
                        "(traces imported from published data, e.g. RoutingTrace.from_olmoe, have nothing else). "
                        "Run it on the model instead: speculative_prefetch(model, docs, tokenizer=tok); "
                        "on an id-only trace use simulate_offload / cache_hit_rates, which need ids only.")
    if source not in PREFETCH_SOURCES:
        raise ValueError(f"source must be one of {PREFETCH_SOURCES}, got {source!r}")
    docs, _ = normalise_inputs(inputs, tokenizer)
    docs = [d[: max_len or None] for d in docs]
    run = _hf_prefetch_run if is_hf_model(model) else _moe_lab_prefetch_run
    device = resolve_device(model, device)
    guesses, actuals, layers = [], [], None
    i = 0
    while i < len(docs):  # runs of equal-length documents, [B, T] per forward, rows in document order
        j = i + 1
        while j < len(docs) and j - i < batch_size and len(docs[j]) == len(docs[i]):
            j += 1
        layers, g, a = run(model, torch.tensor(docs[i:j], device=device), source, n_guess)
        guesses.append(g)
        actuals.append(a)
        i = j
    return Prefetch(layers=layers, guess=np.concatenate(guesses, 1), actual=np.concatenate(actuals, 1), source=source,
                    n_tokens_per_doc=[len(d) for d in docs], provenance=provenance(model))


def _topk(logits: torch.Tensor, k: int) -> np.ndarray:
    return torch.topk(logits.float(), k, dim=-1).indices.cpu().numpy()


def _moe_lab_prefetch_run(model, tokens, source, n_guess):
    """One forward of a moe_lab Mixtral with hooks. Layer i's guess is computed in a pre-hook of
    layer i's MoE, i.e. while layer i's weights are in memory, so it also works on
    ``StreamingMixtral(...).model``, whose blocks are loaded one at a time."""
    blocks = model.blocks
    if len(blocks) < 2:
        raise ValueError("speculative prefetch guesses a layer from the one before: the model needs >= 2 layers")
    point = "hook_resid_post" if source == "resid_post" else "hook_resid_mid"
    prev_hidden: dict[int, Tensor] = {}  # block -> its hidden state (source)
    guesses: dict[int, np.ndarray] = {}
    actual: dict[int, np.ndarray] = {}

    def keep_hidden(x, hook):
        prev_hidden[int(hook.name.split(".")[1])] = x.detach()

    def keep_moe_input(mod, args, i):
        if source == "moe_input":
            prev_hidden[i] = args[0].detach()
        if i > 0:  # guess this layer from the previous one, with this layer's own norm and gate
            h = prev_hidden.pop(i - 1)
            x = h if source == "moe_input" else blocks[i].ffn_norm(h)
            logits = mod.gate(x.reshape(-1, x.shape[-1]))
            guesses[i] = _topk(logits, n_guess or logits.shape[-1])  # cut to k below when n_guess is None

    def keep_choice(x, hook):
        actual[int(hook.name.split(".")[1])] = x.detach().cpu().numpy()

    fwd_hooks = [(lambda n: n.endswith("moe.hook_topk_indices"), keep_choice)]
    if source != "moe_input":
        fwd_hooks.append((lambda n: n.endswith(point), keep_hidden))
    handles = [b.moe.register_forward_pre_hook(lambda mod, args, i=i: keep_moe_input(mod, args, i))
               for i, b in enumerate(blocks)]
    try:
        with model.hooks(fwd_hooks):
            model(tokens)
    finally:
        for h in handles:
            h.remove()
    ids = range(1, len(blocks))
    layers = [getattr(model, "layer_ids", list(range(len(blocks))))[i] for i in ids]
    g = n_guess or actual[1].shape[-1]  # default: as many guesses as the layer chooses (k)
    return layers, np.stack([guesses[i][:, :g] for i in ids]), np.stack([actual[i] for i in ids])


def _hf_prefetch_run(model, tokens, source, n_guess):
    layers = decoder_layers(model)
    routers = find_routers(model)
    ids = sorted(routers)
    norms = {}
    for l in ids:
        norm = getattr(layers[l], "post_attention_layernorm", None)
        if norm is None:
            raise NotImplementedError(f"{type(layers[l]).__name__} has no post_attention_layernorm: speculative "
                                      "prefetch needs the norm in front of the router")
        norms[l] = norm
    hidden, chosen, handles = {}, {}, []
    for l in ids:
        if source == "resid_mid":
            handles.append(norms[l].register_forward_pre_hook(lambda m, a, l=l: hidden.__setitem__(l, a[0])))
        elif source == "moe_input":
            handles.append(routers[l].register_forward_pre_hook(lambda m, a, l=l: hidden.__setitem__(l, a[0])))
        else:
            handles.append(layers[l].register_forward_hook(
                lambda m, a, out, l=l: hidden.__setitem__(l, out[0] if isinstance(out, tuple) else out)))
        handles.append(routers[l].register_forward_hook(lambda m, a, out, l=l: chosen.__setitem__(l, out[2])))
    try:
        hf_forward(model, tokens, None)
    finally:
        for h in handles:
            h.remove()
    if len(ids) < 2:
        raise ValueError(f"speculative prefetch guesses a MoE layer from the one before: {type(model).__name__} "
                         f"has {len(ids)} MoE layer(s)")
    guesses, actual, out_layers = [], [], []
    for prev, nxt in zip(ids[:-1], ids[1:]):
        h = hidden[prev].reshape(-1, hidden[prev].shape[-1])
        x = h if source == "moe_input" else norms[nxt](h.to(norms[nxt].weight.device))
        logits = routers[nxt](x.to(routers[nxt].weight.device))[0]  # the router's own (logits, weights, indices)
        k = chosen[nxt].shape[-1]
        guesses.append(_topk(logits, n_guess or k))
        actual.append(chosen[nxt].reshape(-1, k).cpu().numpy())
        out_layers.append(nxt)
    return out_layers, np.stack(guesses), np.stack(actual)


def prefetch_hit_rates(pf: Prefetch, sizes: Sequence[int], policies: Sequence[str] = ("lru",)):
    """DataFrame (layer, policy, cache_size, hit_rate, hit_rate_prefetch, recall, prefetched_per_token):
    the same cache without and with the speculative guesses loaded ahead of each token."""
    import pandas as pd

    rows = []
    rec = pf.recall
    N = pf.actual.shape[1]
    for i, layer in enumerate(pf.layers):
        for policy in policies:
            for s in sizes:
                base = simulate_layer_cache(pf.actual[i], s, policy)
                pre = simulate_layer_cache(pf.actual[i], s, policy, prefetch=pf.guess[i])
                rows.append({"layer": layer, "policy": policy, "cache_size": s, "hit_rate": base.hit_rate,
                             "hit_rate_prefetch": pre.hit_rate, "recall": rec[i],
                             "misses_per_token": base.misses / N, "misses_per_token_prefetch": pre.misses / N,
                             "prefetched_per_token": pre.prefetched / N})
    out = pd.DataFrame(rows)
    out.attrs["source"] = pf.provenance
    return out


# --------------------------------------------------------------------------------------------
# 4. Bytes -> seconds per token


@dataclass(frozen=True)
class Link:
    """A path weights travel on (or are read from) when they are not resident.

    ``bandwidth``: peak bytes/s as specified; ``efficiency``: the share reached in practice
    (large sequential copies); ``latency``: seconds per transfer (one expert's weights)."""
    name: str
    bandwidth: float
    efficiency: float = 0.8
    latency: float = 10e-6
    note: str = ""

    @property
    def effective(self) -> float:
        return self.bandwidth * self.efficiency

    def seconds(self, n_bytes: float, n_transfers: float = 1.0) -> float:
        """Time to move ``n_bytes`` in ``n_transfers`` transfers."""
        return n_transfers * self.latency + n_bytes / self.effective


#: Links between where the experts live and where they are used. Peak figures are the
#: specifications (PCIe: 0.985 GB/s per lane for 3.0, 1.969 for 4.0, x16; DDR: channels x
#: 8 bytes x MT/s); efficiencies are typical measured shares (pinned-memory copies reach ~80%
#: of PCIe; a CPU streaming weights reaches ~60-70% of DRAM peak). Replace them with your own
#: values: ``Link("my box", 20e9, 1.0, 5e-6)``.
LINKS: dict[str, Link] = {
    "pcie3_x16": Link("PCIe 3.0 x16", 15.75e9, 0.8, 10e-6, "host RAM -> GPU"),
    "pcie4_x16": Link("PCIe 4.0 x16", 31.5e9, 0.8, 10e-6, "host RAM -> GPU"),
    "nvme_ssd": Link("NVMe SSD (PCIe 4.0)", 7.0e9, 0.7, 100e-6, "SSD -> RAM, sequential reads"),
    "ddr4": Link("DDR4-3200, 2 channels", 51.2e9, 0.65, 0.1e-6, "the CPU computes the expert where it lives"),
    "ddr4_3600": Link("DDR4-3600, 2 channels", 57.6e9, 0.65, 0.1e-6, "the CPU computes the expert where it lives"),
    "ddr5": Link("DDR5-5600, 2 channels", 89.6e9, 0.65, 0.1e-6, "the CPU computes the expert where it lives"),
    "unified": Link("unified memory (Apple M2 Max)", 400e9, 0.6, 0.1e-6, "GPU and CPU share one memory"),
}

#: Fast memories that hold the resident weights (the memory-bound decode reads them once per token).
MEMORIES: dict[str, Link] = {
    "T4": Link("NVIDIA T4 (GDDR6)", 320e9, 0.7, 0.0),
    "RTX3090": Link("NVIDIA RTX 3090 (GDDR6X)", 936e9, 0.7, 0.0),
    "A5000": Link("NVIDIA RTX A5000 (GDDR6)", 768e9, 0.7, 0.0),
    "A100": Link("NVIDIA A100 40GB (HBM2)", 1555e9, 0.7, 0.0),
    "ddr4": LINKS["ddr4"],
    "ddr4_3600": LINKS["ddr4_3600"],
    "ddr5": LINKS["ddr5"],
    "unified": LINKS["unified"],
}

#: Bits per weight *including* the quantisation scales: fp16/bf16 16; int8 with one fp16 scale
#: per 32 weights 8.5 (llama.cpp Q8_0); 4-bit with one fp16 scale per 32 weights 4.5 (Q4_0);
#: 3-bit likewise 3.5; ``q4_k_m`` 4.53 = Mixtral-8x7B-v0.1.Q4_K_M.gguf's 26.44 GB x 8 / 46.70e9
#: parameters (mixed 4- and 6-bit blocks); ``hqq_2bit`` 2.5 and ``hqq_3bit`` 3.5: 2 or 3 bits with
#: HQQ's per-group scale and zero (mixtral-offloading's experts).
PRECISIONS: dict[str, float] = {"fp16": 16.0, "bf16": 16.0, "int8": 8.5, "4bit": 4.5, "3bit": 3.5,
                                "q4_k_m": 4.53, "hqq_2bit": 2.5, "hqq_3bit": 3.5}


def bits_per_weight(precision) -> float:
    """A precision name from :data:`PRECISIONS` or a number of bits per weight."""
    if isinstance(precision, (int, float)) and not isinstance(precision, bool):
        if precision <= 0:
            raise ValueError(f"bits per weight must be > 0, got {precision}")
        return float(precision)
    try:
        return PRECISIONS[precision]
    except KeyError:
        raise ValueError(f"unknown precision {precision!r}; use one of {sorted(PRECISIONS)} or bits per weight") from None


@dataclass(frozen=True)
class MoeBytes:
    """Bytes a decode step reads. ``expert``: one expert's weights; ``dense``: everything else a
    token reads (attention, norms, routers, one embedding row, the output head) over all layers.

    For what must be *stored* (does it fit?): ``embedding``, the rest of the input embedding
    matrix (resident, but a token reads only its own row), and ``kv_per_token``, the KV cache of
    one token of context over all layers (fp16)."""
    expert: float
    dense: float
    n_layers: int
    n_experts: int
    experts_per_token: int
    embedding: float = 0.0
    kv_per_token: float = 0.0

    @property
    def dense_stored(self) -> float:
        """Bytes of every non-expert weight held in memory (``dense`` + the rest of the embedding)."""
        return self.dense + self.embedding

    @property
    def active(self) -> float:
        """Bytes per token with every weight resident: dense + k experts per layer."""
        return self.dense + self.n_layers * self.experts_per_token * self.expert

    @property
    def total(self) -> float:
        return self.dense + self.n_layers * self.n_experts * self.expert


def moe_bytes(args: ModelArgs | str = "mixtral-8x7b", expert_precision="fp16", dense_precision=None) -> MoeBytes:
    """Bytes of one expert and of the dense part per token, for a moe_lab ``ModelArgs`` or preset
    name (Mixtral 8x7B: an expert is 3 x 4096 x 14336 = 176.2M weights, 352 MB at fp16)."""
    if isinstance(args, str):
        if args not in PRESETS:
            raise ValueError(f"unknown model preset {args!r}; choose one of {sorted(PRESETS)}")
        args = ModelArgs.from_name(args)
    eb = bits_per_weight(expert_precision) / 8
    db = bits_per_weight(dense_precision if dense_precision is not None else expert_precision) / 8
    D, hd = args.dim, args.head_dim
    attn = D * args.n_heads * hd * 2 + D * args.n_kv_heads * hd * 2
    per_layer = attn + 2 * D + args.n_experts * D
    dense = args.n_layers * per_layer + args.vocab_size * D + D + D  # output head read whole, one embedding row
    # experts per token: ``experts_per_token`` where ModelArgs has it, ``top_k`` before that rename
    k = getattr(args, "experts_per_token", None) or args.top_k
    kv = 2 * args.n_layers * args.n_kv_heads * hd * 2  # K and V, every layer, fp16 (Mixtral: 128 KiB)
    return MoeBytes(expert=3 * D * args.hidden_dim * eb, dense=dense * db, n_layers=args.n_layers,
                    n_experts=args.n_experts, experts_per_token=k, embedding=(args.vocab_size - 1) * D * db,
                    kv_per_token=kv)


def decode_time(sizes: MoeBytes, misses_per_token: float, link: Link | str, memory: Link | str, *,
                prefetched_per_token: float = 0.0, overlap: bool = True) -> dict:
    """Seconds per decoded token (batch 1) of an offloaded MoE, memory-bound:

    * ``resident``: the dense bytes and the experts found resident (all k per layer minus the
      misses), read once at the fast memory's effective bandwidth;
    * ``demand``: each miss moves one expert over ``link`` on the critical path (latency +
      bytes / effective bandwidth); for a DDR link that *is* the CPU computing the expert where
      it lives (llama.cpp, ktransformers, Fiddler); after a PCIe copy the GPU's own read of the
      expert (bytes / GPU bandwidth, ~30x shorter) is left out;
    * ``prefetch``: experts loaded ahead of time travel on the same link while the GPU computes;
      only the part that does not fit under the resident time costs (``overlap=False``: all of it).

    Returns the three parts, ``seconds`` and ``tokens_per_s``. An **estimate**, not a bound: no
    kernel-launch, Python, dequantisation or synchronisation overhead is modelled (optimistic), and
    the efficiencies of :data:`LINKS` / :data:`MEMORIES` are assumptions that a good system can
    beat (two rows of :func:`mixtral_calibration` run faster than predicted).
    """
    link = LINKS[link] if isinstance(link, str) else link
    memory = MEMORIES[memory] if isinstance(memory, str) else memory
    reads = sizes.n_layers * sizes.experts_per_token  # expert reads per token
    if not 0 <= misses_per_token <= reads or prefetched_per_token < 0:
        raise ValueError(f"misses per token must be in [0, {reads}] and prefetches >= 0, "
                         f"got {misses_per_token} and {prefetched_per_token}")
    resident = memory.seconds(sizes.dense + (reads - misses_per_token) * sizes.expert, 0)
    demand = link.seconds(misses_per_token * sizes.expert, misses_per_token)
    pre = link.seconds(prefetched_per_token * sizes.expert, prefetched_per_token)
    pre_cost = max(0.0, pre - resident) if overlap else pre
    seconds = resident + demand + pre_cost
    return {"resident_s": resident, "demand_s": demand, "prefetch_s": pre_cost, "seconds": seconds,
            "tokens_per_s": 1 / seconds}


# --------------------------------------------------------------------------------------------
# 5. Machines: what fits, and how fast


#: Memory capacity of the fast memories in :data:`MEMORIES` that have a fixed size (bytes, as the
#: driver reports it: a "24 GB" RTX 3090 has 24 GiB). CPU RAM has no fixed size: give it in a
#: :class:`System`. Part of it is taken by the runtime (CUDA context, buffers: a few hundred MB),
#: so a configuration that fits with less than ~1 GB to spare may still fail in practice.
GiB = 2 ** 30
MEMORY_CAPACITY: dict[str, float] = {"T4": 15 * GiB, "RTX3090": 24 * GiB, "A5000": 24 * GiB, "A100": 40 * GiB}


@dataclass(frozen=True)
class System:
    """A machine as an offloading runtime sees it: the fast ``memory`` that holds the resident
    weights (a :data:`MEMORIES` key or a :class:`Link`: its read bandwidth), how many bytes it
    holds (``capacity``), and the ``link`` the missed experts come over (a :data:`LINKS` key or a
    :class:`Link`). A device and its link come together: a GPU's misses come over its PCIe slot
    (or are computed by the host CPU from its RAM), never from another machine's memory."""
    name: str
    memory: str | Link
    capacity: float
    link: str | Link
    note: str = ""

    @property
    def memory_link(self) -> Link:
        return MEMORIES[self.memory] if isinstance(self.memory, str) else self.memory

    @property
    def miss_link(self) -> Link:
        return LINKS[self.link] if isinstance(self.link, str) else self.link


#: Realistic (device, link) pairs for Mixtral 8x7B, the default rows of :func:`offload_table`.
SYSTEMS: dict[str, System] = {
    "colab_t4": System("Colab T4 15 GiB + PCIe 3.0", "T4", MEMORY_CAPACITY["T4"], "pcie3_x16",
                       "free Colab GPU; misses copied from host RAM (mixtral-offloading's setting)"),
    "rtx3090_pcie4": System("RTX 3090 24 GiB + PCIe 4.0", "RTX3090", MEMORY_CAPACITY["RTX3090"], "pcie4_x16",
                            "expert caching: misses copied from host RAM"),
    "rtx3090_cpu": System("RTX 3090 24 GiB + CPU (DDR4-3200)", "RTX3090", MEMORY_CAPACITY["RTX3090"], "ddr4",
                          "partial offload: the CPU computes the experts that are not on the GPU (llama.cpp "
                          "--n-cpu-moe, ktransformers)"),
    "a100_pcie4": System("A100 40 GiB + PCIe 4.0", "A100", MEMORY_CAPACITY["A100"], "pcie4_x16",
                         "expert caching: misses copied from host RAM"),
    "cpu_ddr5_nvme": System("CPU, 16 GiB DDR5-5600 + NVMe SSD", "ddr5", 16 * GiB, "nvme_ssd",
                            "a laptop: resident experts in RAM, the CPU computes; misses read from the SSD"),
    "m2max_ssd": System("Apple M2 Max, 32 GiB unified + SSD", "unified", 32 * GiB, "nvme_ssd",
                        "unified memory holds the resident experts; misses read from the internal SSD "
                        "(modelled as a PCIe 4.0 NVMe drive)"),
}


def resident_bytes(sizes: MoeBytes, resident_experts: float, context_tokens: int = 4096) -> float:
    """Bytes the fast memory must hold: ``resident_experts`` experts per layer (a mean over layers
    for a placement such as whole layers) x layers x one expert's bytes, plus every dense weight
    (:attr:`MoeBytes.dense_stored`) and the KV cache of ``context_tokens`` tokens."""
    if not 0 <= resident_experts <= sizes.n_experts:
        raise ValueError(f"resident_experts must be in [0, {sizes.n_experts}] per layer, got {resident_experts}")
    return resident_experts * sizes.n_layers * sizes.expert + sizes.dense_stored + context_tokens * sizes.kv_per_token


def _check_capacity(sizes: MoeBytes, capacity: float, where: str, precision, context_tokens: int) -> None:
    need = resident_bytes(sizes, 0, context_tokens)
    if capacity < need:
        raise ValueError(f"{where}: a memory of {capacity / 1e9:.2f} GB is smaller than the dense weights and KV "
                         f"cache alone ({sizes.dense_stored / 1e9:.2f} GB of dense weights at {precision} + "
                         f"{context_tokens * sizes.kv_per_token / 1e9:.2f} GB for {context_tokens} tokens of context "
                         f"= {need / 1e9:.2f} GB): nothing can run there; use a larger memory or a lower precision")


def max_resident_experts(system: System | str, precision="4bit", *, model: ModelArgs | str = "mixtral-8x7b",
                         context_tokens: int = 4096, memory: float | None = None) -> int:
    """The largest per-layer budget of resident experts that fits ``system``'s memory (or
    ``memory`` bytes) next to the dense weights and the KV cache; at most the number of experts.
    Raises a ValueError when not even the dense weights fit."""
    sys_ = SYSTEMS[system] if isinstance(system, str) else system
    sizes = moe_bytes(model, precision)
    cap = float(memory) if memory is not None else sys_.capacity
    _check_capacity(sizes, cap, f"system {sys_.name!r}", precision, context_tokens)
    free = cap - resident_bytes(sizes, 0, context_tokens)
    return int(min(sizes.n_experts, free // (sizes.n_layers * sizes.expert)))


def _systems(systems, memory, links) -> list[System]:
    if systems is not None:
        out = []
        for s in systems:
            if isinstance(s, str):
                if s not in SYSTEMS:
                    raise ValueError(f"unknown system {s!r}; use one of {sorted(SYSTEMS)} or an A.System(...)")
                s = SYSTEMS[s]
            out.append(s)
        return out
    if links is None and not isinstance(memory, (str, Link)):
        return list(SYSTEMS.values())
    # the older call offload_table(h, memory="RTX3090", links=(...)): that memory with each link
    mem = memory if isinstance(memory, (str, Link)) else "RTX3090"
    key = mem if isinstance(mem, str) else next((k for k, v in MEMORIES.items() if v == mem), None)
    if key not in MEMORY_CAPACITY:
        raise ValueError(f"memory {mem!r} has no known capacity: pass systems=[A.System(name, memory, capacity_bytes, "
                         f"link)] (capacities are known for {sorted(MEMORY_CAPACITY)})")
    m = MEMORIES[key]
    return [System(f"{m.name.split(' (')[0]} + {(LINKS[ln] if isinstance(ln, str) else ln).name}", key,
                   MEMORY_CAPACITY[key], ln) for ln in (links or ("pcie4_x16",))]


def offload_table(hit_rates, *, resident_experts=None, memory=None, systems=None, model: ModelArgs | str = "mixtral-8x7b",
                  precisions=("fp16", "int8", "4bit", "3bit"), links=None, context_tokens: int = 4096,
                  source: str = ""):
    """Estimated tokens/s, and whether the configuration **fits**, for each (system, precision,
    scenario): DataFrame with the misses per token (``n_layers x k x (1 - hit rate)``), bytes moved
    per token, the time split, ``resident_GB`` (what the device must hold), ``capacity_GB`` and
    ``fits``.

    ``hit_rates``: ``{scenario: hit rate}`` (e.g. from :func:`policy_comparison`), or one float.
    ``resident_experts``: the experts per layer each scenario keeps resident (``{scenario: n}``,
    or one number for all; a mean over layers for whole-layer placements). ``fits`` is
    ``resident experts per layer x layers x expert bytes + dense weights + KV cache of
    context_tokens <= the device's memory``; ``None`` (unknown) where ``resident_experts`` is not
    given. Rows that do not fit describe machines that cannot exist: the figures never draw them.

    ``systems``: (device, link) pairs (:class:`System` or :data:`SYSTEMS` keys; default: all of
    :data:`SYSTEMS`). ``memory``: a number of bytes replaces every system's capacity (what if the
    card had 12 GB?); a memory that cannot hold even the dense weights and KV cache is an error.
    (The older ``memory="RTX3090", links=(...)`` pairs that memory with each link.)
    ``source``: where the hit rates come from (``"synthetic fixture"``, ``"demo model"``, ... see
    :func:`moe_lab.analysis.provenance`); kept in ``table.attrs["source"]`` for the figure titles.
    """
    import pandas as pd

    if not isinstance(hit_rates, dict):
        hit_rates = {"hit rate": float(hit_rates)}
    if resident_experts is None or isinstance(resident_experts, dict):
        resident = dict(resident_experts or {})
        unknown = set(resident) - set(hit_rates)
        if unknown:
            raise ValueError(f"resident_experts names scenarios {sorted(unknown)} that hit_rates does not have "
                             f"({sorted(hit_rates)})")
    else:
        resident = {label: float(resident_experts) for label in hit_rates}
    capacity_override = float(memory) if isinstance(memory, (int, float)) and not isinstance(memory, bool) else None
    rows = []
    for system in _systems(systems, None if capacity_override is not None else memory, links):
        cap = capacity_override if capacity_override is not None else system.capacity
        for prec in precisions:
            sizes = moe_bytes(model, prec)
            _check_capacity(sizes, cap, f"system {system.name!r}" + (" (memory=)" if capacity_override else ""),
                            prec, context_tokens)
            for label, h in hit_rates.items():
                if not 0 <= h <= 1:
                    raise ValueError(f"hit rate {label!r} = {h} is not in [0, 1]")
                misses = sizes.n_layers * sizes.experts_per_token * (1 - h)
                t = decode_time(sizes, misses, system.miss_link, system.memory_link)
                r = resident.get(label)
                need = None if r is None else resident_bytes(sizes, r, context_tokens)
                rows.append({"system": system.name, "precision": prec, "scenario": label, "hit_rate": h,
                             "resident_experts": r, "resident_GB": None if need is None else need / 1e9,
                             "capacity_GB": cap / 1e9, "fits": None if need is None else bool(need <= cap),
                             "link": system.miss_link.name, "memory": system.memory_link.name,
                             "expert_MB": sizes.expert / 1e6, "misses_per_token": misses,
                             "GB_moved_per_token": misses * sizes.expert / 1e9, **t})
    df = pd.DataFrame(rows)
    df.attrs["source"] = source
    return df


# --------------------------------------------------------------------------------------------
# 6. Calibration against published Mixtral 8x7B numbers


@dataclass(frozen=True)
class PublishedRun:
    system: str
    hardware: str
    precision: str
    tokens_per_s: float
    source: str
    # how we model it
    expert_precision: str
    dense_precision: str
    memory: str  # where resident weights are read
    link: str  # where the misses come from
    hit_rate: float  # share of expert reads served from fast memory (before any prefetch)
    assumption: str
    resident_experts: float | None = None  # experts per layer held in fast memory (for ``fits``)
    capacity: float | None = None  # bytes of that memory (None: not stated, e.g. a CPU's RAM)
    prefetch_recall: float | None = None  # speculative pre-loading: share of the misses guessed ahead
    free_parameters: str = ""  # what the row assumes that its source does not state ("" if nothing)
    configuration: str = ""  # which measured configuration of the source this row is


#: Published Mixtral 8x7B decode speeds (batch 1), as collected in the project's landscape review
#: (moe-landscape.md, section 3(c)) and the mixtral-offloading paper's Table 2 (as transcribed in
#: notebook-review-2.md, defect 8), each modelled as it was measured.
MIXTRAL_PUBLISHED: tuple[PublishedRun, ...] = (
    PublishedRun("mixtral-offloading", "free Colab T4 (16 GB), PCIe 3.0 host", "HQQ 4-bit attention, 2-bit experts",
                 2.092, "Eliseev & Mazur 2023, arXiv 2312.17238, Table 2 (full algorithm, Colab T4)",
                 "hqq_2bit", "4bit", "T4", "pcie3_x16", 0.5,
                 "LRU, 4 of 8 experts per layer on the GPU, hit rate 0.5 (the paper's 40-60%); speculative "
                 "pre-loading of the next layer's k experts, recall 0.8 (the paper's Figure 2, as summarised): "
                 "the guessed experts travel during the previous layer, wrong guesses too",
                 resident_experts=4, capacity=MEMORY_CAPACITY["T4"], prefetch_recall=0.8,
                 free_parameters="hit rate 0.5, pre-loading recall 0.8", configuration="2-bit experts, with pre-loading"),
    PublishedRun("mixtral-offloading", "free Colab T4 (16 GB), PCIe 3.0 host", "HQQ 4-bit attention, 2-bit experts",
                 1.567, "Eliseev & Mazur 2023, arXiv 2312.17238, Table 2 (w/o expert pre-loading)",
                 "hqq_2bit", "4bit", "T4", "pcie3_x16", 0.5,
                 "LRU, 4 of 8 experts per layer on the GPU, hit rate 0.5 (the paper's 40-60%); no pre-loading",
                 resident_experts=4, capacity=MEMORY_CAPACITY["T4"], free_parameters="hit rate 0.5",
                 configuration="2-bit experts, without pre-loading"),
    PublishedRun("MoE-Infinity", "RTX A5000 24 GB, PCIe 4.0", "fp16", 1.36, "EfficientMoE/MoE-Infinity README "
                 "(0.735 s/token)", "fp16", "fp16", "A5000", "pcie4_x16", 0.25,
                 "~20 GB left for experts after 3.2 GB of dense weights: ~57 of 256 experts (~1.8 per layer); "
                 "hit rate 0.25 (its activation-aware cache on ~2 of 8 experts per layer)",
                 resident_experts=57 / 32, capacity=MEMORY_CAPACITY["A5000"], free_parameters="hit rate 0.25",
                 configuration="fp16, its own cache"),
    PublishedRun("llama.cpp", "CPU only (CPU not stated)", "Q4_K_M", 5.0, "ggml-org/llama.cpp issue #4729",
                 "q4_k_m", "q4_k_m", "ddr4", "ddr4", 1.0,
                 "all weights in DDR4-3200 dual channel, read by the CPU (memory-bound)",
                 resident_experts=8, free_parameters="the CPU and its memory (assumed DDR4-3200, 2 channels)",
                 configuration="Q4_K_M, no GPU layers"),
    PublishedRun("llama.cpp", "Ryzen 9 5900X, DDR4-3600, CPU only", "Q8_0", 3.58,
                 "ggml-org/llama.cpp issue #4716 (the project's earlier notes)", "int8", "int8", "ddr4_3600", "ddr4_3600",
                 1.0, "all weights in DDR4-3600 dual channel, read by the CPU (memory-bound)", resident_experts=8,
                 configuration="Q8_0, CPU only"),
    PublishedRun("llama.cpp", "RTX 3090 24 GB, 28 of 33 layers on the GPU", "Q4_K_M", 24.0,
                 "ggml-org/llama.cpp issue #4729", "q4_k_m", "q4_k_m", "RTX3090", "ddr4", 28 / 32,
                 "front-loading: 28 of 32 blocks resident (hit rate 28/32); the other 4 blocks' experts are "
                 "computed by the CPU from DDR4 (a 'miss' reads the expert from RAM)",
                 resident_experts=8 * 28 / 32, capacity=MEMORY_CAPACITY["RTX3090"],
                 free_parameters="the CPU's memory for the 4 CPU-side blocks (assumed DDR4-3200, 2 channels)",
                 configuration="Q4_K_M, 28 of 33 layers on the GPU"),
)


def mixtral_calibration(hit_rates: dict[str, float] | None = None, *, context_tokens: int = 4096):
    """Our model's **estimate** for each published Mixtral 8x7B run beside the measurement.

    Each row is modelled as measured (its precision, device, link, resident experts and, for
    mixtral-offloading's full algorithm, speculative pre-loading). ``hit_rates``: optional
    ``{system: hit rate}`` replacing the assumed ones, e.g. LRU at the run's budget simulated on a
    real Mixtral trace. Returns a DataFrame: system, configuration, hardware, precision, published
    and predicted tok/s, ``predicted / published``, ``free_parameter`` (True where the row assumes
    something its source does not state: those rows are weaker evidence), ``fits`` (the resident
    weights and a KV cache of ``context_tokens`` fit the device; None where its memory is not
    stated) and the assumption. Sorted: rows without a free parameter first."""
    import pandas as pd

    rows = []
    for run in MIXTRAL_PUBLISHED:
        h = (hit_rates or {}).get(run.system, run.hit_rate)
        sizes = moe_bytes("mixtral-8x7b", run.expert_precision, run.dense_precision)
        misses = sizes.n_layers * sizes.experts_per_token * (1 - h)
        prefetched = 0.0
        if run.prefetch_recall is not None:  # the misses' experts are guessed and loaded a layer ahead
            prefetched, misses = misses, misses * (1 - run.prefetch_recall)
        t = decode_time(sizes, misses, run.link, run.memory, prefetched_per_token=prefetched)
        fits = None
        if run.capacity is not None and run.resident_experts is not None:
            fits = bool(resident_bytes(sizes, run.resident_experts, context_tokens) <= run.capacity)
        rows.append({"system": run.system, "configuration": run.configuration, "hardware": run.hardware,
                     "precision": run.precision, "published_tok_s": run.tokens_per_s,
                     "predicted_tok_s": t["tokens_per_s"], "predicted / published": t["tokens_per_s"] / run.tokens_per_s,
                     "hit_rate": h, "prefetch": run.prefetch_recall is not None,
                     "free_parameter": bool(run.free_parameters), "free_parameters": run.free_parameters or "none",
                     "fits": fits, "GB_moved_per_token": (misses + prefetched) * sizes.expert / 1e9,
                     "source": run.source, "assumption": run.assumption})
    df = pd.DataFrame(rows)
    return df.sort_values("free_parameter", kind="stable").reset_index(drop=True)
