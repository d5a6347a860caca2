"""Routing analyses: pure functions of a :class:`~moe_lab.routing.trace.RoutingTrace`.

Definitions follow the Mixtral paper (section 5) and the OLMoE paper; every rate comes with the
baselines it should be read against. Shapes: L traced layers, N tokens, k experts per token, E
experts, D documents. ``layer`` arguments are *model* layer indices (``trace.layers``).
"""

from __future__ import annotations

from dataclasses import dataclass
from math import comb
from typing import Literal

import numpy as np

from ..routing.trace import RoutingTrace
from .offload import cache_hit_rates, simulate_expert_cache  # noqa: F401  (moved; old import path kept)

Choice = Literal["first", "second", "either"]


# --------------------------------------------------------------------------------------------
# Expert load


def _choice_ids(trace: RoutingTrace, choice: Choice) -> np.ndarray:
    """[L, N, j] expert ids for the first choice, the second, or all k ("either")."""
    if choice == "first":
        return trace.expert_ids[:, :, :1]
    if choice == "second":
        if trace.top_k < 2:
            raise ValueError("this trace has top_k = 1: there is no second choice")
        return trace.expert_ids[:, :, 1:2]
    if choice == "either":
        return trace.expert_ids
    raise ValueError(f"choice must be 'first', 'second' or 'either', got {choice!r}")


def expert_load(trace: RoutingTrace, choice: Choice = "either",
                normalization: Literal["assignments", "tokens"] = "assignments") -> np.ndarray:
    """[L, E] load per layer and expert.

    ``normalization="assignments"``: share of (token, slot) assignments; each row sums to 1 and
    the uniform value is 1/E (the Mixtral paper's Figure 7). ``"tokens"``: share of tokens that
    chose the expert among their picks; rows sum to the number of picks and the uniform value is
    k/E for ``choice="either"`` (OLMoE's convention).
    """
    ids = _choice_ids(trace, choice)
    L, N, j = ids.shape
    counts = np.zeros((L, trace.n_experts))
    for l in range(L):
        counts[l] = np.bincount(ids[l].ravel(), minlength=trace.n_experts)[: trace.n_experts]
    if normalization == "assignments":
        return counts / max(N * j, 1)
    if normalization == "tokens":
        return counts / max(N, 1)
    raise ValueError(f"normalization must be 'assignments' or 'tokens', got {normalization!r}")


def uniform_load(trace: RoutingTrace, choice: Choice = "either",
                 normalization: Literal["assignments", "tokens"] = "assignments") -> float:
    """The value every expert would have under perfectly uniform routing."""
    picks = trace.top_k if choice == "either" else 1
    return 1 / trace.n_experts if normalization == "assignments" else picks / trace.n_experts


def expert_load_by_domain(trace: RoutingTrace, choice: Choice = "either",
                          normalization: Literal["assignments", "tokens"] = "assignments") -> dict[str, np.ndarray]:
    """domain -> [L, E] load (as :func:`expert_load`) over that domain's documents."""
    return {d: expert_load(trace.select(domain=d), choice, normalization) for d in trace.domain_names}


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


def _consecutive_pairs(trace: RoutingTrace, bos_id: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Indices (i, i+1) of consecutive tokens in the same document, BOS excluded."""
    i = np.arange(trace.n_tokens - 1)
    same_doc = trace.doc_ids[:-1] == trace.doc_ids[1:]
    adjacent = trace.positions[1:] == trace.positions[:-1] + 1
    keep = same_doc & adjacent
    if bos_id is not None:
        keep &= trace.token_ids[:-1] != bos_id
    return i[keep], i[keep] + 1


def _same(a: np.ndarray, b: np.ndarray, kind: str) -> np.ndarray:
    """a, b [P, k] -> [P] bool: same first choice, or any overlap of the top-k sets."""
    if kind == "first":
        return a[:, 0] == b[:, 0]
    if kind == "any":
        return (a[:, :, None] == b[:, None, :]).any((1, 2))
    raise ValueError(f"kind must be 'first' or 'any', got {kind!r}")


def uniform_repetition(n_experts: int, top_k: int, kind: str) -> float:
    """Chance rate under uniform random routing: 1/E, or 1 - C(E-k, k)/C(E, k) for any overlap."""
    return 1 / n_experts if kind == "first" else 1 - comb(n_experts - top_k, top_k) / comb(n_experts, top_k)


def marginal_repetition(ids: np.ndarray, kind: str, n_experts: int, rng=None, n_pairs: int = 200_000) -> float:
    """Chance rate if consecutive tokens were independent draws from this layer's own routing
    distribution: sum of squared first-choice shares, or the overlap rate of two random top-k sets."""
    if kind == "first":
        p = np.bincount(ids[:, 0], minlength=n_experts) / len(ids)
        return float((p**2).sum())
    rng = np.random.default_rng(0) if rng is None else rng
    a = ids[rng.integers(0, len(ids), n_pairs)]
    b = ids[rng.integers(0, len(ids), n_pairs)]
    return float(_same(a, b, "any").mean())


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

    def to_pandas(self):
        import pandas as pd

        return pd.DataFrame({"layer": self.layers, "rate": self.rate, "ci_low": self.ci_low, "ci_high": self.ci_high,
                             "uniform": self.uniform, "marginal": self.marginal, "shuffled": self.shuffled})

    def above_marginal(self) -> np.ndarray:
        """[L] bool: the CI's lower end is above the marginal baseline."""
        return self.ci_low > self.marginal


def repetition(trace: RoutingTrace, kind: Literal["first", "any"] = "first", *, bos_id: int | None = 1,
               n_boot: int = 1000, n_shuffles: int = 5, ci: float = 0.95, seed: int = 0) -> Repetition:
    """Rate at which consecutive tokens of a document share their first expert ("first") or any
    of their top-k experts ("any"), per layer, with uniform, marginal and shuffled-position
    baselines and a bootstrap CI that resamples whole documents (tokens of a document are not
    independent)."""
    rng = np.random.default_rng(seed)
    a, b = _consecutive_pairs(trace, bos_id)
    if len(a) == 0:
        raise ValueError("no consecutive token pairs within documents to compare")
    pair_doc = trace.doc_ids[a]
    docs, doc_index = np.unique(pair_doc, return_inverse=True)
    n_docs = len(docs)
    L = trace.n_layers
    rate, lo, hi, marg, shuf = (np.zeros(L) for _ in range(5))
    boots = rng.integers(0, n_docs, (n_boot, n_docs))
    weights = np.stack([np.bincount(bt, minlength=n_docs) for bt in boots])  # [n_boot, D] resampling counts
    pairs_per_doc = np.bincount(doc_index, minlength=n_docs)
    for l in range(L):
        ids = trace.expert_ids[l]
        same = _same(ids[a], ids[b], kind)
        rate[l] = same.mean()
        hits_per_doc = np.bincount(doc_index, weights=same, minlength=n_docs)
        boot = (weights @ hits_per_doc) / np.maximum(weights @ pairs_per_doc, 1)
        lo[l], hi[l] = np.quantile(boot, [(1 - ci) / 2, 1 - (1 - ci) / 2])
        marg[l] = marginal_repetition(ids, kind, trace.n_experts, rng)
        shuf[l] = np.mean([_shuffled_rate(trace, ids, kind, bos_id, rng) for _ in range(n_shuffles)])
    return Repetition(layers=list(trace.layers), kind=kind, rate=rate, ci_low=lo, ci_high=hi,
                      uniform=uniform_repetition(trace.n_experts, trace.top_k, kind), marginal=marg,
                      shuffled=shuf, n_pairs=len(a))


def _shuffled_rate(trace, ids, kind, bos_id, rng) -> float:
    """Same statistic after permuting token order inside each document (keeps each document's
    expert mix, destroys adjacency)."""
    keep = np.ones(trace.n_tokens, dtype=bool)
    if bos_id is not None:
        keep &= trace.token_ids != bos_id
    idx = np.flatnonzero(keep)
    perm = idx[np.lexsort((rng.random(len(idx)), trace.doc_ids[idx]))]  # shuffled within documents
    same_doc = trace.doc_ids[perm[:-1]] == trace.doc_ids[perm[1:]]
    x, y = perm[:-1][same_doc], perm[1:][same_doc]
    return float(_same(ids[x], ids[y], kind).mean()) if len(x) else float("nan")


# --------------------------------------------------------------------------------------------
# Co-activation, confidence, specialisation


def coactivation(trace: RoutingTrace, layer: int) -> np.ndarray:
    """[E, E] C[i, j] = N(i and j both chosen) / N(i chosen) (OLMoE); diagonal NaN.
    Uniform value (k-1)/(E-1), 1/7 for top-2 of 8."""
    ids = trace.expert_ids[trace.layer_index(layer)]
    E = trace.n_experts
    onehot = np.zeros((len(ids), E))
    np.put_along_axis(onehot, ids, 1.0, axis=1)
    both = onehot.T @ onehot  # [E, E]
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
    router logits, else the renormalised top-k weights (entropy then unavailable)."""
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


def vocabulary_specialization(trace: RoutingTrace, layer: int, min_count: int = 5):
    """Per token id (seen >= min_count times): the share of its occurrences whose top-k includes
    its most frequent expert (OLMoE; chance k/E). DataFrame sorted by count."""
    import pandas as pd

    ids = trace.expert_ids[trace.layer_index(layer)]
    E = trace.n_experts
    vocab, inv, counts = np.unique(trace.token_ids, return_inverse=True, return_counts=True)
    hits = np.zeros((len(vocab), E))
    for j in range(trace.top_k):
        np.add.at(hits, (inv, ids[:, j]), 1)
    keep = counts >= min_count
    share = hits[keep] / counts[keep, None]
    df = pd.DataFrame({"token_id": vocab[keep], "count": counts[keep], "top_expert": share.argmax(1),
                       "specialization": share.max(1)})
    if trace.pieces is not None:
        first = {}
        for t, p in zip(trace.token_ids.tolist(), trace.pieces):
            first.setdefault(t, p)
        df.insert(1, "piece", [first[t] for t in df.token_id])
    return df.sort_values("count", ascending=False, ignore_index=True)


def top_tokens_per_expert(trace: RoutingTrace, layer: int, n: int = 10, min_count: int = 5,
                          choice: Choice = "first") -> dict[int, list[tuple[int, float, int]]]:
    """expert -> [(token id, share of that token's occurrences routed to it, count)] for the n
    tokens most reliably sent to the expert."""
    ids = _choice_ids(trace, choice)[trace.layer_index(layer)]
    vocab, inv, counts = np.unique(trace.token_ids, return_inverse=True, return_counts=True)
    hits = np.zeros((len(vocab), trace.n_experts))
    for j in range(ids.shape[1]):
        np.add.at(hits, (inv, ids[:, j]), 1)
    share = hits / counts[:, None]
    out = {}
    for e in range(trace.n_experts):
        cand = np.flatnonzero(counts >= min_count)
        order = cand[np.lexsort((-counts[cand], -share[cand, e]))][:n]
        out[e] = [(int(vocab[i]), float(share[i, e]), int(counts[i])) for i in order]
    return out


def domain_specialization(trace: RoutingTrace, layer: int) -> tuple[list[str], np.ndarray]:
    """(domains, [D, E]) share of each domain's tokens whose top-k includes the expert (OLMoE's
    N_k(expert, domain) / N(domain)); uniform k/E (25% for top-2 of 8)."""
    ids = trace.expert_ids[trace.layer_index(layer)]
    doms = trace.domain_names
    tok_dom = trace.token_domains
    out = np.zeros((len(doms), trace.n_experts))
    for i, d in enumerate(doms):
        sel = ids[tok_dom == d]
        out[i] = np.bincount(sel.ravel(), minlength=trace.n_experts) / max(len(sel), 1)
    return doms, out


# --------------------------------------------------------------------------------------------
# Across layers


def layer_transitions(trace: RoutingTrace, from_layer: int, to_layer: int) -> np.ndarray:
    """[E, E] P(first choice at to_layer = j | first choice at from_layer = i)."""
    a = trace.expert_ids[trace.layer_index(from_layer), :, 0]
    b = trace.expert_ids[trace.layer_index(to_layer), :, 0]
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
    between different layers)."""
    L = trace.n_layers
    first = trace.expert_ids[:, :, 0]
    out = np.eye(L)
    for i in range(L):
        for j in range(i + 1, L):
            out[i, j] = out[j, i] = normalized_mutual_information(first[i], first[j], trace.n_experts)
    return out


# --------------------------------------------------------------------------------------------
# Expert-cache simulation: moved to offload.py (the names stay importable from here)


def generated_only(trace: RoutingTrace) -> RoutingTrace:
    """The decode steps of a trace from :func:`moe_lab.trace_generation`: its tokens at positions
    >= the prompt length of their document (``trace.meta["prompt_lengths"]``). Feed this to
    :func:`cache_hit_rates`: the prompt is processed in one batch (every expert it needs is
    loaded once), while generated tokens are served one at a time, which is where an expert cache
    matters."""
    lengths = trace.meta.get("prompt_lengths")
    if lengths is None:
        raise ValueError("this trace has no meta['prompt_lengths']; make it with moe_lab.trace_generation")
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) != trace.n_docs:
        raise ValueError(f"meta['prompt_lengths'] has {len(lengths)} entries for {trace.n_docs} documents")
    keep = trace.positions >= lengths[trace.doc_ids]
    return RoutingTrace(
        token_ids=trace.token_ids[keep], doc_ids=trace.doc_ids[keep], positions=trace.positions[keep],
        expert_ids=trace.expert_ids[:, keep], weights=trace.weights[:, keep],
        router_logits=None if trace.router_logits is None else trace.router_logits[:, keep],
        domains=list(trace.domains), layers=list(trace.layers), n_experts=trace.n_experts,
        pieces=None if trace.pieces is None else [p for p, k in zip(trace.pieces, keep) if k],
        meta={**trace.meta, "prompt_lengths": [0] * trace.n_docs, "generated_only": True})
