"""Routing analyses: pure functions of a :class:`~moe_lab.routing.trace.RoutingTrace`.

Definitions follow the Mixtral paper (section 5) and the OLMoE paper; every rate comes with the
baselines it should be read against. Shapes: L traced layers, N tokens, k experts per token, E
experts, D documents. ``layer`` arguments are *model* layer indices (``trace.layers``).
"""

from __future__ import annotations

from dataclasses import dataclass
from math import comb
from typing import Iterator, Literal, Union

import numpy as np

from ..provenance import provenance
from ..routing.store import TraceStore
from ..routing.trace import RoutingTrace

Choice = Literal["first", "second", "either"]

#: What the analyses marked "trace or store" accept: an in-memory trace, or a trace directory
#: (:class:`~moe_lab.routing.store.TraceStore`) that they read chunk by chunk.
Source = Union[RoutingTrace, TraceStore]

#: Tokens per chunk when an analysis reads a TraceStore (whole documents; see TraceStore.iter_chunks).
CHUNK_TOKENS = 1 << 15


def _chunks(source: Source, desc: str, layers=None) -> Iterator[tuple[RoutingTrace, int, int]]:
    """``(chunk, first_doc, first_token)`` over a trace or a store. An in-memory trace is one
    chunk; a store yields chunks of whole documents with a progress bar. Every chunked analysis
    accumulates per-chunk counts with the same code for both, so results do not depend on the
    chunking (tests/test_trace_store.py checks that they are identical)."""
    if isinstance(source, TraceStore):  # (a RoutingTrace on disk: read in chunks)
        yield from source.iter_chunks(CHUNK_TOKENS, layers=layers, desc=desc)
    elif isinstance(source, RoutingTrace):
        yield (source if layers is None else source.select(layers=layers)), 0, 0
    else:
        raise TypeError(f"expected a RoutingTrace or a TraceStore, got {type(source).__name__}")


def _in_memory(source, analysis: str) -> RoutingTrace:
    """The trace itself: a saved trace (TraceStore) serves its arrays memory-mapped."""
    if not isinstance(source, RoutingTrace):
        raise TypeError(f"{analysis} expects a RoutingTrace, got {type(source).__name__}")
    return source



def _require_rank_order(trace, analysis: str, instead: str) -> None:
    """Refuse ``analysis`` (which reads column 0 as the first choice) on a trace whose top-k
    order is not known (``rank_ordered`` False: engine traces of grouped/biased routers)."""
    if not getattr(trace, "rank_ordered", True):
        trace.require_rank_order(analysis, instead)


# --------------------------------------------------------------------------------------------
# Expert load


def _choice_ids(trace: RoutingTrace, choice: Choice) -> np.ndarray:
    """[L, N, j] expert ids for the first choice, the second, or all k ("either")."""
    if choice in ("first", "second"):
        _require_rank_order(trace, f"choice={choice!r}", "choice='either' (every top-k pick)")
    if choice == "first":
        return trace.expert_ids[:, :, :1]
    if choice == "second":
        if trace.top_k < 2:
            raise ValueError("this trace has top_k = 1: there is no second choice")
        return trace.expert_ids[:, :, 1:2]
    if choice == "either":
        return trace.expert_ids
    raise ValueError(f"choice must be 'first', 'second' or 'either', got {choice!r}")


def _load_counts(trace: RoutingTrace, choice: Choice, groups: np.ndarray | None = None,
                 n_groups: int = 1) -> np.ndarray:
    """[L, E] number of (token, slot) assignments to each expert; with ``groups`` ([N] group
    index of each token, e.g. its domain), [G, L, E] per group. Empty slots (expert id -1) count for no expert."""
    ids = _choice_ids(trace, choice)  # [L, N, j]
    E = trace.n_experts
    key = ids if groups is None else groups[None, :, None] * E + ids
    counts = np.zeros((ids.shape[0], n_groups * E))
    for l in range(ids.shape[0]):
        counts[l] = np.bincount(key[l][ids[l] >= 0], minlength=n_groups * E)
    counts = counts.reshape(-1, n_groups, E).transpose(1, 0, 2)  # [G, L, E]
    return counts[0] if groups is None else counts


def _token_groups(chunk: RoutingTrace, names: list[str]) -> np.ndarray:
    """[N] index of each token's domain in ``names``."""
    code = {d: i for i, d in enumerate(names)}
    return np.array([code[d] for d in chunk.domains], dtype=np.int64)[chunk.doc_ids]


def _normalize_load(counts: np.ndarray, n_tokens: int, picks: int, normalization: str) -> np.ndarray:
    if normalization == "assignments":  # the filled slots: an empty one (-1) is no assignment
        return counts / np.maximum(counts.sum(-1, keepdims=True), 1)
    if normalization == "tokens":
        return counts / max(n_tokens, 1)
    raise ValueError(f"normalization must be 'assignments' or 'tokens', got {normalization!r}")


def expert_load(trace: Source, choice: Choice = "either",
                normalization: Literal["assignments", "tokens"] = "assignments") -> np.ndarray:
    """[L, E] load per layer and expert (trace or store).

    ``normalization="assignments"``: share of (token, slot) assignments; each row sums to 1 and
    the uniform value is 1/E (the Mixtral paper's Figure 7). ``"tokens"``: share of tokens that
    chose the expert among their picks; rows sum to the number of picks and the uniform value is
    k/E for ``choice="either"`` (OLMoE's convention).

    Empty slots (expert id -1: a token dropped by a capacity, expert choice's padding) are no
    assignment: "assignments" divides by the filled slots (rows still sum to 1), "tokens" by all
    tokens (a dropped token chose no expert, so rows sum to the mean number of filled picks).
    """
    picks = trace.top_k if choice == "either" else 1
    _normalize_load(np.zeros(1), 1, 1, normalization)  # reject a bad normalization before reading
    counts = sum(_load_counts(c, choice) for c, _, _ in _chunks(trace, "expert load"))
    return _normalize_load(counts, trace.n_tokens, picks, normalization)


def uniform_load(trace: RoutingTrace, choice: Choice = "either",
                 normalization: Literal["assignments", "tokens"] = "assignments") -> float:
    """The value every expert would have under perfectly uniform routing."""
    picks = trace.top_k if choice == "either" else 1
    return 1 / trace.n_experts if normalization == "assignments" else picks / trace.n_experts


def expert_load_by_domain(trace: Source, choice: Choice = "either",
                          normalization: Literal["assignments", "tokens"] = "assignments") -> dict[str, np.ndarray]:
    """domain -> [L, E] load (as :func:`expert_load`) over that domain's documents (trace or store)."""
    picks = trace.top_k if choice == "either" else 1
    names = trace.domain_names
    counts, tokens = 0, 0
    for c, _, _ in _chunks(trace, "load by domain"):
        groups = _token_groups(c, names)
        counts = counts + _load_counts(c, choice, groups, len(names))  # [G, L, E]
        tokens = tokens + np.bincount(groups, minlength=len(names))
    return {d: _normalize_load(counts[i], int(tokens[i]), picks, normalization) for i, d in enumerate(names)}


def domain_load_divergence(trace: RoutingTrace, choice: Choice = "either", n_perm: int = 200, seed: int = 0):
    """How different is each domain's expert load from the other domains', beyond chance?

    Per domain and layer: the total-variation distance TV = 1/2 sum_e |p_domain(e) - p_rest(e)|
    between the load of the domain's documents and that of all other documents (0 = same load,
    1 = disjoint experts), and a permutation baseline: the same distance after shuffling the
    domain labels over documents (keeping each domain's number of documents), ``n_perm`` times.
    Small samples differ by chance; a domain stands out only where ``tv`` exceeds ``null_p95``
    (``p_value`` = share of shuffles at least as far, with the +1 correction).
    Long DataFrame: domain, layer, tv, null_mean, null_p95, p_value, n_docs.
    """
    import pandas as pd

    trace = _in_memory(trace, "domain_load_divergence")
    ids = _choice_ids(trace, choice)  # [L, N, j]
    L, _, j = ids.shape
    E, D = trace.n_experts, trace.n_docs
    counts = np.zeros((D, L, E))  # assignments per document, layer, expert
    for l in range(L):
        np.add.at(counts[:, l], (np.repeat(trace.doc_ids, j), ids[l].ravel()), 1)
    labels = np.asarray(trace.domains, dtype=object)
    doms = trace.domain_names
    if len(doms) < 2:
        raise ValueError("domain_load_divergence needs documents of at least two domains")
    total = counts.sum(0)  # [L, E]

    def tv(mask):  # mask [D] -> [L]
        a = counts[mask].sum(0)
        b = total - a
        pa = a / np.maximum(a.sum(-1, keepdims=True), 1)
        pb = b / np.maximum(b.sum(-1, keepdims=True), 1)
        return 0.5 * np.abs(pa - pb).sum(-1)

    rng = np.random.default_rng(seed)
    perms = [rng.permutation(labels) for _ in range(n_perm)]
    rows = []
    for d in doms:
        obs = tv(labels == d)
        null = np.stack([tv(p == d) for p in perms]) if n_perm else np.full((1, L), np.nan)
        for li, layer in enumerate(trace.layers):
            rows.append({"domain": d, "layer": layer, "tv": obs[li], "null_mean": null[:, li].mean(),
                         "null_p95": np.quantile(null[:, li], 0.95),
                         "p_value": (1 + (null[:, li] >= obs[li] - 1e-12).sum()) / (1 + n_perm),
                         "n_docs": int((labels == d).sum())})
    return pd.DataFrame(rows)


@dataclass
class BalanceSummary:
    cv: np.ndarray  # [L] coefficient of variation of expert shares (0 = perfectly balanced)
    normalized_entropy: np.ndarray  # [L] entropy of shares / log E (1 = perfectly balanced)
    max_violation: np.ndarray  # [L] MaxVio = max share / mean share - 1


def load_balance(load: np.ndarray) -> BalanceSummary:
    """Summaries of an [L, E] (or [E]) share matrix from :func:`expert_load`."""
    load = np.atleast_2d(np.asarray(load, dtype=float))
    shares = load / load.sum(-1, keepdims=True)
    E = shares.shape[-1]
    mean = shares.mean(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = -np.where(shares > 0, shares * np.log(shares), 0.0).sum(-1) / np.log(E)
    return BalanceSummary(cv=shares.std(-1) / mean, normalized_entropy=ent, max_violation=shares.max(-1) / mean - 1)


# --------------------------------------------------------------------------------------------
# Consecutive-token repetition (Mixtral paper, Table 5 and Figure 10)


def _pair_mask(trace: RoutingTrace, bos_id: int | None) -> np.ndarray:
    """[N-1] bool: tokens i and i+1 are consecutive in the same document, and i is not BOS."""
    keep = (trace.doc_ids[:-1] == trace.doc_ids[1:]) & (trace.positions[1:] == trace.positions[:-1] + 1)
    if bos_id is not None:
        keep &= trace.token_ids[:-1] != bos_id
    return keep


def _consecutive_pairs(trace: RoutingTrace, bos_id: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Indices (i, i+1) of consecutive tokens in the same document, BOS excluded."""
    i = np.flatnonzero(_pair_mask(trace, bos_id))
    return i, i + 1


def _same(a: np.ndarray, b: np.ndarray, kind: str) -> np.ndarray:
    """a, b [..., P, k] -> [..., P] bool: same first choice, or any overlap of the top-k sets."""
    if kind == "first":
        return a[..., 0] == b[..., 0]
    if kind == "any":
        out = np.zeros(a.shape[:-1], dtype=bool)
        for i in range(a.shape[-1]):
            for j in range(b.shape[-1]):
                out |= a[..., i] == b[..., j]
        return out
    raise ValueError(f"kind must be 'first' or 'any', got {kind!r}")


def _route_keys(trace: RoutingTrace, kind: str) -> np.ndarray:
    """Token-major [N, L] keys such that two tokens are routed alike at a layer exactly when
    :func:`_alike` says so: the first choice ("first"), or the top-k set as a bitmask
    ``sum_j 2**id_j`` ("any", E <= 64); else the [N, L, k] ids themselves. Narrow dtypes and
    whole rows make gathering and comparing pairs ~10x faster than on [L, N, k] int64 ids."""
    ids = trace.expert_ids.transpose(1, 0, 2)  # [N, L, k]
    E = trace.n_experts
    if kind == "first":
        return ids[..., 0].astype(np.uint8 if E <= 256 else np.int32)
    if E <= 64:
        bits = next(t for t in (np.uint8, np.uint16, np.uint32, np.uint64) if np.iinfo(t).bits >= E)
        ids = ids.astype(bits)
        keys = np.zeros(ids.shape[:2], dtype=bits)
        for j in range(ids.shape[2]):
            keys |= bits(1) << ids[..., j]
        return keys
    return ids.astype(np.int32)


def _alike(x: np.ndarray, y: np.ndarray, kind: str) -> np.ndarray:
    """Routed alike, from keys of :func:`_route_keys` -> bool of the keys' shape (minus k)."""
    if kind == "first":
        return x == y
    if np.issubdtype(x.dtype, np.unsignedinteger):  # bitmasks of the top-k sets
        return (x & y) != 0  # the two sets share an expert
    return _same(x, y, "any")


def uniform_repetition(n_experts: int, top_k: int, kind: str) -> float:
    """Chance rate under uniform random routing: 1/E, or 1 - C(E-k, k)/C(E, k) for any overlap."""
    return 1 / n_experts if kind == "first" else 1 - comb(n_experts - top_k, top_k) / comb(n_experts, top_k)


def marginal_repetition(ids: np.ndarray, kind: str, n_experts: int, rng=None, n_pairs: int = 200_000) -> float:
    """Chance rate if consecutive tokens were independent draws from this layer's own routing
    distribution (``ids`` [N, k]): sum of squared first-choice shares, or the overlap rate of two
    random top-k sets (``n_pairs`` pairs of tokens drawn with ``rng``)."""
    if kind == "first":
        return _first_choice_chance(np.bincount(ids[:, 0], minlength=n_experts))
    rng = np.random.default_rng(0) if rng is None else rng
    a = ids[rng.integers(0, len(ids), n_pairs)]
    b = ids[rng.integers(0, len(ids), n_pairs)]
    return float(_same(a, b, "any").mean())


def _first_choice_chance(counts: np.ndarray) -> float:
    """sum_e p(e)^2 for first-choice counts: the chance that two independent tokens share it."""
    p = counts / max(counts.sum(), 1)
    return float((p**2).sum())


@dataclass
class Repetition:
    layers: list[int]
    kind: str
    rate: np.ndarray  # [L] observed share of consecutive pairs routed alike
    ci_low: np.ndarray  # [L] bootstrap CI over documents
    ci_high: np.ndarray
    uniform: float  # uniform-routing chance rate
    marginal: np.ndarray  # [L] chance rate given each layer's own expert frequencies
    shuffled: np.ndarray  # [L] rate after shuffling positions within each document
    n_pairs: int
    ids_only: bool = False  # computed from a trace without weights/logits (it needs only ids anyway)

    def to_pandas(self):
        import pandas as pd

        return pd.DataFrame({"layer": self.layers, "rate": self.rate, "ci_low": self.ci_low, "ci_high": self.ci_high,
                             "uniform": self.uniform, "marginal": self.marginal, "shuffled": self.shuffled})

    def above_marginal(self) -> np.ndarray:
        """[L] bool: the CI's lower end is above the marginal baseline."""
        return self.ci_low > self.marginal


def repetition(trace: Source, kind: Literal["first", "any"] = "first", *, bos_id: int | None = 1,
               n_boot: int = 1000, n_shuffles: int = 5, ci: float = 0.95, seed: int = 0,
               n_marginal_pairs: int = 200_000) -> Repetition:
    """Rate at which consecutive tokens of a document share their first expert ("first") or any
    of their top-k experts ("any"), per layer, with uniform, marginal and shuffled-position
    baselines and a bootstrap CI that resamples whole documents (tokens of a document are not
    independent). Trace or store.

    How it runs over millions of tokens: one pass over chunks of whole documents collects, per
    layer, each document's pairs and pairs routed alike (the bootstrap resamples those
    documents), the first-choice counts (marginal baseline, "first"), the top-k sets of
    ``n_marginal_pairs`` random token pairs drawn once with ``seed`` ("any"), and the same
    statistic after shuffling each document's tokens with keys hashed from ``(seed, shuffle,
    token index)`` (identical shuffles for every layer and every chunking). Nothing depends on
    where chunks begin, so a store and the same trace in memory give identical results.
    """
    if kind not in ("first", "any"):
        raise ValueError(f"kind must be 'first' or 'any', got {kind!r}")
    if kind == "first":
        _require_rank_order(trace, "repetition(kind='first')", "repetition(trace, 'any') (shared top-k experts)")
    rng = np.random.default_rng(seed)
    L, D, N, E = trace.n_layers, trace.n_docs, trace.n_tokens, trace.n_experts
    hits = np.zeros((L, D))  # pairs routed alike, per layer and document
    pairs = np.zeros(D)  # consecutive pairs per document
    shuf_hits, shuf_pairs = np.zeros((L, n_shuffles)), np.zeros(n_shuffles)
    first_counts = np.zeros((L, E))
    if kind == "any":  # token pairs for the marginal baseline, drawn before reading anything
        draw = rng.integers(0, max(N, 1), (2, n_marginal_pairs))
        picked: list[np.ndarray | None] = [None, None]  # [n_pairs, L(, k)] keys of the drawn tokens
    for c, d0, t0 in _chunks(trace, f"repetition ({kind})"):
        keys = _route_keys(c, kind)  # [n, L(, k)]
        keep = _pair_mask(c, bos_id)  # [n-1]: (i, i+1) counts
        pair_doc = c.doc_ids[:-1] + d0
        pairs += np.bincount(pair_doc, weights=keep, minlength=D)
        same = _alike(keys[:-1], keys[1:], kind) & keep[:, None]  # [n-1, L]
        _add_by_doc(hits, same, pair_doc)
        if kind == "first":
            for l in range(L):
                first_counts[l] += np.bincount(keys[:, l], minlength=E)[:E]
        for s in range(n_shuffles):
            perm, ok = _shuffled_order(c, bos_id, seed, s, t0)
            shuffled = keys[perm]
            shuf_pairs[s] += ok.sum()
            shuf_hits[:, s] += (_alike(shuffled[:-1], shuffled[1:], kind) & ok[:, None]).sum(0)
        if kind == "any":
            for i in range(2):
                if picked[i] is None:
                    picked[i] = np.zeros((n_marginal_pairs, *keys.shape[1:]), dtype=keys.dtype)
                inside = (draw[i] >= t0) & (draw[i] < t0 + c.n_tokens)
                picked[i][inside] = keys[draw[i, inside] - t0]
    n_pairs = int(pairs.sum())
    if n_pairs == 0:
        raise ValueError("no consecutive token pairs within documents to compare")
    rate = hits.sum(1) / n_pairs
    lo, hi = _bootstrap_ci(hits, pairs, n_boot, ci, rng)
    if kind == "first":
        marg = np.array([_first_choice_chance(first_counts[l]) for l in range(L)])
    else:
        marg = _alike(picked[0], picked[1], kind).mean(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        shuf = (shuf_hits / np.where(shuf_pairs > 0, shuf_pairs, np.nan)).mean(1)
    return Repetition(layers=list(trace.layers), kind=kind, rate=rate, ci_low=lo, ci_high=hi,
                      uniform=uniform_repetition(E, trace.top_k, kind), marginal=marg, shuffled=shuf,
                      n_pairs=n_pairs, ids_only=bool(trace.ids_only))


def _add_by_doc(out: np.ndarray, values: np.ndarray, doc: np.ndarray) -> None:
    """out[:, d] += sum of values[i, :] over the rows i with doc[i] == d (out [L, D], values
    [n, L] bool). Documents in ascending order (every store chunk, every trace moe_lab makes): one
    cumulative sum; otherwise one bincount per layer."""
    if len(doc) == 0:
        return
    if np.all(doc[1:] >= doc[:-1]):
        first, last = int(doc[0]), int(doc[-1])
        bounds = np.searchsorted(doc, np.arange(first, last + 2))
        csum = np.concatenate([np.zeros((1, values.shape[1]), np.int64), np.cumsum(values, axis=0, dtype=np.int64)])
        out[:, first:last + 1] += (csum[bounds[1:]] - csum[bounds[:-1]]).T
    else:
        for l in range(values.shape[1]):
            out[l] += np.bincount(doc, weights=values[:, l], minlength=out.shape[1])


def _bootstrap_ci(hits: np.ndarray, pairs: np.ndarray, n_boot: int, ci: float, rng) -> tuple[np.ndarray, np.ndarray]:
    """Percentile CI of hits/pairs per layer, resampling documents (those with pairs) with
    replacement; resamples are drawn in blocks so memory stays ~32 MB however many documents."""
    has = pairs > 0
    h, p = hits[:, has], pairs[has]  # [L, n], [n]
    n = len(p)
    block = max(1, min(n_boot, 4_000_000 // max(n, 1)))
    boot = np.zeros((n_boot, len(h)))
    for start in range(0, n_boot, block):
        b = min(block, n_boot - start)
        draws = rng.integers(0, n, (b, n))
        w = np.bincount((np.arange(b)[:, None] * n + draws).ravel(), minlength=b * n).reshape(b, n).astype(float)
        boot[start:start + b] = (w @ h.T) / np.maximum(w @ p, 1)[:, None]
    q = np.quantile(boot, [(1 - ci) / 2, 1 - (1 - ci) / 2], axis=0)
    return q[0], q[1]


def _hash_uniform(seed: int, stream: int, index: np.ndarray) -> np.ndarray:
    """Reproducible random uint64 keys for global token indices (splitmix64 of seed, stream and
    index): the same key for a token however the trace is chunked."""
    with np.errstate(over="ignore"):
        z = index.astype(np.uint64) + np.uint64((seed * 1_000_003 + stream + 1) * 0x9E3779B97F4A7C15 % 2**64)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _shuffled_order(trace: RoutingTrace, bos_id, seed: int, stream: int, first_token: int):
    """(perm, ok): the tokens (BOS left out) with their order permuted inside each document
    (keeps each document's expert mix, destroys adjacency), and [len(perm)-1] bool: perm[i] and
    perm[i+1] are in the same document (a pair to compare)."""
    keep = np.ones(trace.n_tokens, dtype=bool)
    if bos_id is not None:
        keep &= trace.token_ids != bos_id
    idx = np.flatnonzero(keep)
    keys = _hash_uniform(seed, stream, idx + first_token)
    perm = idx[np.lexsort((keys, trace.doc_ids[idx]))]  # shuffled within documents
    return perm, trace.doc_ids[perm[:-1]] == trace.doc_ids[perm[1:]]


# --------------------------------------------------------------------------------------------
# Co-activation, confidence, specialisation


def _pair_counts(ids: np.ndarray, E: int) -> np.ndarray:
    """[E, E] number of tokens whose top-k (ids [N, k]) holds both i and j (diagonal: i chosen).
    An empty slot (-1) holds no expert: it pairs with nothing."""
    k = ids.shape[1]
    ids = ids.astype(np.int64)  # (uint8 ids * E would wrap)
    both = np.zeros(E * E)
    for a in range(k):
        for b in range(k):
            ok = (ids[:, a] >= 0) & (ids[:, b] >= 0)
            both += np.bincount(ids[ok, a] * E + ids[ok, b], minlength=E * E)
    return both.reshape(E, E)


def coactivation(trace: Source, layer: int) -> np.ndarray:
    """[E, E] C[i, j] = N(i and j both chosen) / N(i chosen) (OLMoE); diagonal NaN. Trace or store.
    Uniform value (k-1)/(E-1), 1/7 for top-2 of 8. Empty slots (-1) choose no expert."""
    trace.layer_index(layer)
    E = trace.n_experts
    both = sum(_pair_counts(c.expert_ids[0], E) for c, _, _ in _chunks(trace, "co-activation", layers=[layer]))
    chosen = np.diag(both).copy()
    with np.errstate(divide="ignore", invalid="ignore"):
        c = both / chosen[:, None]
    np.fill_diagonal(c, np.nan)
    return c


@dataclass
class Confidence:
    entropy: np.ndarray | None  # [L, N] entropy of the full router softmax (nats); needs logits
    top1_prob: np.ndarray  # [L, N] probability of the first choice (full softmax if logits, else renormalised)
    margin: np.ndarray  # [L, N] first minus second probability


def router_confidence(trace: RoutingTrace) -> Confidence:
    """How sure the router is, per layer and token. Uses the full softmax when the trace has
    router logits, else the renormalised top-k weights (entropy then unavailable). An id-only
    trace (vLLM, SGLang, the OLMoE study) has neither: a ValueError says so."""
    trace = _in_memory(trace, "router_confidence")
    if trace.router_logits is not None:
        z = trace.router_logits - trace.router_logits.max(-1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(-1, keepdims=True)
        ent = -(p * np.log(np.clip(p, 1e-30, None))).sum(-1)
        top = -np.sort(-p, axis=-1)
        return Confidence(entropy=ent, top1_prob=top[..., 0], margin=top[..., 0] - top[..., 1])
    trace.require(("weights", "router_logits"), "router_confidence")
    w = trace.weights
    margin = w[..., 0] - w[..., 1] if trace.top_k > 1 else np.ones_like(w[..., 0])
    return Confidence(entropy=None, top1_prob=w[..., 0], margin=margin)


def _token_expert_hits(source: Source, layer: int, choice: Choice, desc: str
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(vocab [V], hits [V, E], occurrences [V]): the token ids seen, how often each was routed to
    each expert (among the ``choice`` picks) at ``layer``, and how often each occurred. An empty slot
    (-1: a token dropped by a capacity, expert choice's padding) is routed to no expert; the token's
    occurrence still counts. Counts add up chunk by chunk."""
    E = source.n_experts
    hits, seen = np.zeros((0, E)), np.zeros(0)
    for c, _, _ in _chunks(source, desc, layers=[layer]):
        ids = _choice_ids(c, choice)[0].astype(np.int64)  # [n, j]
        tok = np.asarray(c.token_ids, dtype=np.int64)
        V = int(tok.max()) + 1 if c.n_tokens else 0
        if V > len(hits):
            hits = np.concatenate([hits, np.zeros((V - len(hits), E))])
            seen = np.concatenate([seen, np.zeros(V - len(seen))])
        seen += np.bincount(tok, minlength=len(seen))
        for j in range(ids.shape[1]):
            ok = ids[:, j] >= 0
            hits += np.bincount(tok[ok] * E + ids[ok, j], minlength=len(hits) * E).reshape(-1, E)
    vocab = np.flatnonzero(seen)
    return vocab, hits[vocab], seen[vocab]


def vocabulary_specialization(trace: Source, layer: int, min_count: int = 5):
    """Per token id (seen >= min_count times): the share of its occurrences whose top-k includes
    its most frequent expert (OLMoE; chance k/E). DataFrame sorted by count. Trace or store.

    A token with fewer than k experts (empty slots, -1: dropped by a capacity, or taken by fewer
    experts under expert choice) still counts as an occurrence; it is a hit only when one of the
    experts it did get is the top expert (a fully dropped occurrence is never a hit). Chance is then
    the mean number of filled slots per token / E instead of k/E."""
    import pandas as pd

    vocab, hits, counts = _token_expert_hits(trace, layer, "either", "vocabulary specialisation")
    keep = counts >= min_count
    share = hits[keep] / counts[keep, None]
    df = pd.DataFrame({"token_id": vocab[keep], "count": counts[keep].astype(np.int64), "top_expert": share.argmax(1),
                       "specialization": share.max(1)})
    if isinstance(trace, RoutingTrace) and trace.pieces is not None:
        first = {}
        for t, p in zip(trace.token_ids.tolist(), trace.pieces):
            first.setdefault(t, p)
        df.insert(1, "piece", [first[t] for t in df.token_id])
    return df.sort_values("count", ascending=False, ignore_index=True, kind="stable")


def top_tokens_per_expert(trace: Source, layer: int, n: int = 10, min_count: int = 5,
                          choice: Choice = "first") -> dict[int, list[tuple[int, float, int]]]:
    """expert -> [(token id, share of that token's occurrences routed to it, count)] for the n
    tokens most reliably sent to the expert. Trace or store."""
    vocab, hits, counts = _token_expert_hits(trace, layer, choice, "top tokens per expert")
    counts = counts.astype(np.int64)
    share = hits / counts[:, None]
    out = {}
    for e in range(trace.n_experts):
        cand = np.flatnonzero(counts >= min_count)
        order = cand[np.lexsort((-counts[cand], -share[cand, e]))][:n]
        out[e] = [(int(vocab[i]), float(share[i, e]), int(counts[i])) for i in order]
    return out


def domain_specialization(trace: Source, layer: int) -> tuple[list[str], np.ndarray]:
    """(domains, [D, E]) share of each domain's tokens whose top-k includes the expert (OLMoE's
    N_k(expert, domain) / N(domain)); uniform k/E (25% for top-2 of 8). Trace or store."""
    trace.layer_index(layer)
    doms = trace.domain_names
    counts, tokens = 0, 0
    for c, _, _ in _chunks(trace, "domain specialisation", layers=[layer]):
        groups = _token_groups(c, doms)
        counts = counts + _load_counts(c, "either", groups, len(doms))[:, 0]  # [G, E]
        tokens = tokens + np.bincount(groups, minlength=len(doms))
    return doms, counts / np.maximum(tokens, 1)[:, None]


def router_saturation(trace: RoutingTrace, final: RoutingTrace, k: int | None = None) -> np.ndarray:
    """[L] OLMoE's router saturation: per layer, the mean over tokens of |top-k here ∩ top-k in
    ``final``| / k, between an intermediate checkpoint's trace and the final model's on the same
    tokens (the OLMoE study's ``c4_results_{step}.jsonl`` against ``c4_results.jsonl``).
    ``k``: compare the first k choices (default the traces' top-k; OLMoE reports top-1 and
    top-8). 1 = the router already routes as it will at the end; chance is about k/E."""
    if not np.array_equal(trace.token_ids, final.token_ids) or trace.layers != final.layers:
        raise ValueError(f"router_saturation needs the same tokens and layers in both traces, found "
                         f"{trace.n_tokens} / {final.n_tokens} tokens, layers {trace.layers} / {final.layers}")
    k = min(trace.top_k, final.top_k) if k is None else k
    if not 1 <= k <= min(trace.top_k, final.top_k):
        raise ValueError(f"k must be in [1, {min(trace.top_k, final.top_k)}], got {k}")
    if k < max(trace.top_k, final.top_k):  # the first k choices: rank order matters
        for t in (trace, final):
            _require_rank_order(t, f"router_saturation(k={k})", f"router_saturation(k={min(trace.top_k, final.top_k)}) "
                                "(the whole top-k sets, when both traces have the same top-k)")
    a, b = trace.expert_ids[:, :, :k], final.expert_ids[:, :, :k]  # [L, N, k]
    shared = np.zeros(a.shape[:2])
    for j in range(k):
        shared += (a[:, :, j:j + 1] == b).any(-1) & (a[:, :, j] >= 0)  # an empty slot (-1) matches nothing
    return shared.mean(1) / k


# --------------------------------------------------------------------------------------------
# Across layers


def layer_transitions(trace: RoutingTrace, from_layer: int, to_layer: int) -> np.ndarray:
    """[E, E] P(first choice at to_layer = j | first choice at from_layer = i), over the tokens with a
    first choice at both layers (an empty slot, -1, is no choice)."""
    trace = _in_memory(trace, "layer_transitions")
    _require_rank_order(trace, "layer_transitions (first choices)", "coactivation within a layer")
    a = trace.expert_ids[trace.layer_index(from_layer), :, 0].astype(np.int64)
    b = trace.expert_ids[trace.layer_index(to_layer), :, 0].astype(np.int64)
    a, b = a[(a >= 0) & (b >= 0)], b[(a >= 0) & (b >= 0)]
    E = trace.n_experts
    joint = np.zeros((E, E))
    np.add.at(joint, (a, b), 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.nan_to_num(joint / joint.sum(1, keepdims=True))


def normalized_mutual_information(a: np.ndarray, b: np.ndarray, n_classes: int) -> float:
    """NMI(a; b) = I(a; b) / sqrt(H(a) H(b)) of two label arrays (0 when either is constant)."""
    joint = np.zeros((n_classes, n_classes))
    np.add.at(joint, (a, b), 1)
    joint /= joint.sum()
    pa, pb = joint.sum(1), joint.sum(0)

    def H(p):
        p = p[p > 0]
        return float(-(p * np.log(p)).sum())

    nz = joint > 0
    mi = float((joint[nz] * np.log(joint[nz] / (pa[:, None] * pb[None, :])[nz])).sum())
    ha, hb = H(pa), H(pb)
    return mi / np.sqrt(ha * hb) if ha > 0 and hb > 0 else 0.0


def cross_layer_nmi(trace: RoutingTrace) -> np.ndarray:
    """[L, L] NMI between the first choices of every pair of traced layers (Mixtral: 0.03-0.07
    between different layers), over the tokens with a first choice at both (not -1, empty)."""
    trace = _in_memory(trace, "cross_layer_nmi")
    _require_rank_order(trace, "cross_layer_nmi (first choices)", "")
    L = trace.n_layers
    first = trace.expert_ids[:, :, 0]
    out = np.eye(L)
    for i in range(L):
        for j in range(i + 1, L):
            ok = (first[i] >= 0) & (first[j] >= 0)
            out[i, j] = out[j, i] = normalized_mutual_information(first[i][ok], first[j][ok], trace.n_experts)
    return out


# --------------------------------------------------------------------------------------------
# Expert-cache simulation (the offloading question)


def simulate_expert_cache(requests: list[list[int]] | np.ndarray, cache_size: int,
                          policy: Literal["lru", "lfu", "optimal"] = "lru") -> float:
    """Hit rate of a cache of ``cache_size`` experts serving, token after token, the experts each
    token needs (``requests[t]`` = its top-k expert ids in one layer). The experts of the current
    token are all needed at once, so they are never evicted for each other. "optimal" is Belady's
    rule (evict the expert needed furthest in the future): the ceiling for any policy.

    Memory is O(tokens x k) integers (the next-use times of "optimal"), so a layer of a
    10-million-token store fits (:func:`cache_hit_rates` reads it one layer at a time)."""
    if cache_size < 1:
        raise ValueError(f"cache_size must be >= 1, got {cache_size}")
    if policy not in ("lru", "lfu", "optimal"):
        raise ValueError(f"policy must be 'lru', 'lfu' or 'optimal', got {policy!r}")
    if isinstance(requests, np.ndarray):
        rows = requests.reshape(len(requests), -1).tolist()
    else:
        rows = [list(map(int, r)) for r in requests]
    if policy == "lru":
        return _lru_hits(rows, cache_size)
    nxt = _next_uses(rows) if policy == "optimal" else None  # [T][k] next step needing that expert
    cache: dict[int, int] = {}  # expert -> last use (LFU tie-break) or next use (optimal)
    freq: dict[int, int] = {}
    hits = total = 0
    for t, need in enumerate(rows):
        for j, e in enumerate(need):
            total += 1
            freq[e] = freq.get(e, 0) + 1
            if e in cache:
                hits += 1
            elif len(cache) >= cache_size:
                victims = [c for c in cache if c not in need] or list(cache)
                if nxt is None:  # LFU: fewest uses so far, then least recent
                    victim = min(victims, key=lambda c: (freq[c], cache[c]))
                else:  # optimal: needed furthest in the future
                    victim = max(victims, key=cache.__getitem__)
                del cache[victim]
            cache[e] = t if nxt is None else nxt[t][j]
    return hits / total if total else float("nan")


def _lru_hits(rows: list[list[int]], cache_size: int) -> float:
    """LRU with the dict's order as the recency list (oldest first): a hit moves the expert to
    the end, a miss evicts the oldest expert the current token does not need. A token's experts
    are used in rank order (so of two experts last used by the same token, the first choice is
    the older)."""
    cache: dict[int, None] = {}
    hits = total = 0
    for need in rows:
        for e in need:
            total += 1
            if e in cache:
                hits += 1
                del cache[e]
            elif len(cache) >= cache_size:
                victim = next((c for c in cache if c not in need), None)
                del cache[next(iter(cache)) if victim is None else victim]
            cache[e] = None
    return hits / total if total else float("nan")


def _next_uses(rows: list[list[int]]) -> list[list[int]]:
    """For each step t and slot j, the next step > t that needs expert rows[t][j] (a large
    number if none). Vectorised: sort the (expert, step) requests, read the next entry."""
    T = len(rows)
    if T == 0:
        return []
    ids = np.asarray(rows, dtype=np.int64).reshape(T, -1)  # [T, k]
    steps = np.repeat(np.arange(T), ids.shape[1])
    flat = ids.ravel()
    order = np.lexsort((steps, flat))
    nxt = np.full(flat.shape, np.iinfo(np.int64).max // 2, dtype=np.int64)
    same = flat[order[1:]] == flat[order[:-1]]
    nxt[order[:-1][same]] = steps[order[1:][same]]
    return nxt.reshape(T, -1).tolist()


def cache_hit_rates(trace: Source, sizes=None, policies=("lru", "lfu", "optimal"), *,
                    layers=None, generated: bool = False):
    """Long DataFrame (layer, policy, cache_size, hit_rate) over a trace or store in token order
    (use generated tokens: decoding serves one token at a time; ``generated=True`` keeps only
    them, or pass ``generated_only(trace)``). Documents are simulated one after the other with the
    cache carried over. ``layers``: model layers to simulate (default all); a store is read one
    layer at a time."""
    import pandas as pd

    sizes = list(range(1, trace.n_experts + 1)) if sizes is None else list(sizes)
    layers = list(trace.layers) if layers is None else list(layers)
    keep = None
    if generated:
        keep = trace.is_generated
        if not keep.any():
            raise ValueError("generated=True but this trace marks no token as generated (no prompt lengths)")
    rows = []
    for layer in layers:
        if isinstance(trace, TraceStore):
            reqs = trace.column("expert_ids", layer=layer, progress=False)  # [N, k] of one layer
        else:
            reqs = trace.expert_ids[trace.layer_index(layer)]
        if keep is not None:
            reqs = reqs[keep]
        for policy in policies:
            for s in sizes:
                rows.append({"layer": layer, "policy": policy, "cache_size": s,
                             "hit_rate": simulate_expert_cache(reqs, s, policy)})

    out = pd.DataFrame(rows)
    out.attrs["source"] = provenance(trace)  # "demo model", "synthetic fixture", ...: for the figure's title
    return out


def generated_only(trace: RoutingTrace) -> RoutingTrace:
    """The decode steps of a trace from :func:`moe_lab.trace_generation`: its tokens at positions
    >= the prompt length of their document (``trace.meta["prompt_lengths"]``). Feed this to
    :func:`cache_hit_rates`: the prompt is processed in one batch (every expert it needs is
    loaded once), while generated tokens are served one at a time, which is where an expert cache
    matters."""
    trace = _in_memory(trace, "generated_only (for a store: cache_hit_rates(store, generated=True))")
    lengths = trace.meta.get("prompt_lengths")
    if lengths is None:
        raise ValueError("this trace has no meta['prompt_lengths']; make it with moe_lab.trace_generation")
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) != trace.n_docs:
        raise ValueError(f"meta['prompt_lengths'] has {len(lengths)} entries for {trace.n_docs} documents")
    keep = trace.positions >= lengths[trace.doc_ids]
    return RoutingTrace(
        token_ids=trace.token_ids[keep], doc_ids=trace.doc_ids[keep], positions=trace.positions[keep],
        expert_ids=trace.expert_ids[:, keep], weights=None if trace.weights is None else trace.weights[:, keep],
        router_logits=None if trace.router_logits is None else trace.router_logits[:, keep],
        domains=list(trace.domains), layers=list(trace.layers), n_experts=trace.n_experts,
        pieces=None if trace.pieces is None else [p for p, k in zip(trace.pieces, keep) if k],
        meta={**trace.meta, "prompt_lengths": [0] * trace.n_docs, "generated_only": True},
        rank_ordered=trace.rank_ordered)
