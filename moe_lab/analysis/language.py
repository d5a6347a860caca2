"""Does routing follow the language or the content? (issue 12, item 6)

The corpus' aligned set holds the *same paragraph* in English, French, German, Spanish and
Italian. Trace each (paragraph, language) as one document and summarise its routing per layer
by an **expert-usage vector**: the share of its tokens' top-k slots that went to each expert.
Then compare, per layer, the similarity of

* the same paragraph in two different languages (**same content**),
* two different paragraphs in the same language (**same language**),
* two different paragraphs in two different languages (**neither**: the floor).

If routing followed the language, same-language pairs would be the most similar; if it
followed the content, same-content pairs would. Two shuffled baselines say what "no effect"
looks like: paragraph labels permuted within each language (the "same content" pairs become
random cross-language pairs) and language labels permuted within each paragraph. Intervals
come from a bootstrap over *paragraphs* (the unit that was sampled), never over pairs, which
are far from independent.

The control (as in recent work on multilingual MoE routing): the router is a linear map of
the hidden state, so documents with similar mean hidden states must get similar routing.
:func:`hidden_state_control` measures how much of the routing similarity across all pairs of
documents the hidden-state cosine similarity explains (R^2 of a straight-line fit, per layer),
and repeats the comparison above on what is left (the residuals): a same-content advantage
that survives says more than "similar inputs, similar routing".

Similarity of two usage vectors: ``"js"`` is 1 - the Jensen-Shannon divergence in bits (1 for
identical distributions, 0 for disjoint ones); ``"cosine"`` is their cosine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np
import torch

from ..devices import resolve_device
from ..hooks import StopForward
from ..routing.trace import RoutingTrace

Measure = Literal["js", "cosine"]


# --------------------------------------------------------------------------- per-document summaries

def expert_usage(trace: RoutingTrace, bos_id: int | None = 1) -> np.ndarray:
    """[L, D, E]: for each layer and document, the share of its tokens' top-k slots that went to
    each expert (rows sum to 1). Tokens equal to ``bos_id`` are left out (every document starts
    with the same ``<s>``, which would make all documents look alike)."""
    keep = np.ones(trace.n_tokens, bool) if bos_id is None else trace.token_ids != bos_id
    L, D, E = trace.n_layers, int(trace.doc_ids.max()) + 1, trace.n_experts
    counts = np.zeros((L, D, E))
    docs = np.repeat(trace.doc_ids[keep], trace.top_k)  # [n * k]
    for layer in range(L):
        np.add.at(counts[layer], (docs, trace.expert_ids[layer][keep].reshape(-1)), 1.0)
    totals = counts.sum(-1, keepdims=True)
    if (totals == 0).any():
        empty = np.nonzero(totals[0, :, 0] == 0)[0].tolist()
        raise ValueError(f"documents {empty[:5]} have no tokens besides bos_id={bos_id}")
    return counts / totals


def pairwise_similarity(vectors: np.ndarray, measure: Measure = "js") -> np.ndarray:
    """[..., D, D] similarity of every pair of rows of ``vectors`` [..., D, E]."""
    v = np.asarray(vectors, dtype=np.float64)
    if measure == "cosine":
        u = v / np.linalg.norm(v, axis=-1, keepdims=True).clip(1e-12)
        return u @ np.swapaxes(u, -1, -2)
    if measure == "js":
        def kl(a, b):  # sum a log2(a/b) with 0 log 0 = 0 (b > 0 wherever a > 0, since b = mean)
            with np.errstate(divide="ignore", invalid="ignore"):
                return np.where(a > 0, a * np.log2(a / b), 0.0).sum(-1)

        out = np.empty(v.shape[:-1] + v.shape[-2:-1])  # [..., D, D]
        for i in range(0, v.shape[-2], 128):  # 128 rows at a time: memory [..., 128, D, E]
            p, q = v[..., i:i + 128, None, :], v[..., None, :, :]  # [..., b, 1, E], [..., 1, D, E]
            m = (p + q) / 2
            out[..., i:i + 128, :] = 1.0 - (kl(p, m) + kl(q, m)) / 2
        return out
    raise ValueError(f"measure must be 'js' or 'cosine', got {measure!r}")


@torch.no_grad()
def mean_router_inputs(model, token_lists: Sequence[Sequence[int]], bos_id: int | None = 1, *,
                       device=None) -> np.ndarray:
    """[L, D, dim]: per layer, each document's mean *router input*, ``ffn_norm(h)`` where ``h`` is
    the residual stream after attention (``blocks.i.hook_resid_mid``), over its tokens other than
    ``bos_id``. This is exactly what the router's linear map sees. The forward stops after the last
    block's ``hook_resid_mid`` (:class:`~moe_lab.hooks.StopForward`): the last MoE and the output
    head are not needed. Runs on the model's device (``device``: None or the
    model's device); the array is on the CPU."""
    names = [f"blocks.{i}.hook_resid_mid" for i in range(len(model.blocks))]
    device = resolve_device(model, device)
    out = np.zeros((len(model.blocks), len(token_lists), model.args.dim))
    was_training = model.training
    model.eval()
    try:
        for d, ids in enumerate(token_lists):
            x = torch.tensor([list(ids)], device=device)
            keep = x[0] != bos_id if bos_id is not None else torch.ones_like(x[0], dtype=torch.bool)

            def record(h, hook, d=d, keep=keep):  # h: [1, T, dim], the residual stream after attention
                i = names.index(hook.name)
                router_in = model.blocks[i].ffn_norm(h[0])  # [T, dim]
                out[i, d] = router_in[keep].float().mean(0).cpu().numpy()
                if i == len(names) - 1:
                    raise StopForward

            with torch.no_grad(), model.hooks(fwd_hooks=[(n, record) for n in names]):
                try:
                    model(x)
                except StopForward:
                    pass
    finally:
        model.train(was_training)
    return out


# --------------------------------------------------------------------------- the comparison

def aligned_grid(paragraphs: Sequence, languages: Sequence) -> tuple[np.ndarray, list, list]:
    """(index [P, G] of document numbers, paragraph names, language names) for documents labelled
    by paragraph and language; every paragraph must occur exactly once in every language."""
    if len(paragraphs) != len(languages):
        raise ValueError(f"{len(paragraphs)} paragraph labels but {len(languages)} language labels")
    pars = sorted(set(paragraphs), key=str)
    langs = sorted(set(languages), key=str)
    if len(pars) < 2 or len(langs) < 2:
        raise ValueError(f"need at least 2 paragraphs and 2 languages, found {len(pars)} and {len(langs)}")
    grid = np.full((len(pars), len(langs)), -1)
    pi, li = {p: i for i, p in enumerate(pars)}, {g: i for i, g in enumerate(langs)}
    for d, (p, g) in enumerate(zip(paragraphs, languages)):
        if grid[pi[p], li[g]] != -1:
            raise ValueError(f"paragraph {p!r} appears twice in language {g!r}")
        grid[pi[p], li[g]] = d
    missing = np.argwhere(grid < 0)
    if len(missing):
        p, g = missing[0]
        raise ValueError(f"paragraph {pars[p]!r} is missing in language {langs[g]!r} "
                         f"({len(missing)} (paragraph, language) cells missing); use aligned paragraphs only")
    return grid, pars, langs


def _group_matrices(S: np.ndarray, grid: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """From pair similarities S [D, D] and the grid [P, G]:
    content[p]    mean over language pairs g != h of S[(p, g), (p, h)]        [P]
    language[p,q] mean over g of S[(p, g), (q, g)]                              [P, P]
    neither[p,q]  mean over g != h of S[(p, g), (q, h)]                          [P, P]"""
    P, G = grid.shape
    T = S[grid[:, :, None, None], grid[None, None, :, :]]  # [P, G, P, G]
    same_g = np.einsum("pgqg->pqg", T)  # [P, P, G]: the diagonal over languages
    language = same_g.mean(-1)
    all_g = T.sum(axis=(1, 3))  # [P, P]
    neither = (all_g - same_g.sum(-1)) / (G * (G - 1))
    content = np.diagonal(neither).copy()
    return content, language, neither


def _stats_from(content, language, neither, idx: np.ndarray) -> tuple[float, float, float]:
    """Means over the paragraphs ``idx`` (with repeats, for the bootstrap); pairs of a paragraph
    with itself (the same index drawn twice) are not 'different paragraphs'."""
    c = content[idx].mean()
    different = idx[:, None] != idx[None, :]
    if not different.any():  # a bootstrap draw of one paragraph, repeated: no pairs to compare
        return c, np.nan, np.nan
    sub_l, sub_n = language[np.ix_(idx, idx)], neither[np.ix_(idx, idx)]
    return c, sub_l[different].mean(), sub_n[different].mean()


@dataclass
class LanguageContent:
    """Per-layer means of pair similarity ([L] arrays) with bootstrap intervals ([L, 2])."""

    same_content: np.ndarray  # same paragraph, different languages
    same_language: np.ndarray  # different paragraphs, same language
    neither: np.ndarray  # different paragraphs, different languages
    shuffled_content: np.ndarray  # same_content with paragraph labels permuted within each language
    shuffled_language: np.ndarray  # same_language with language labels permuted within each paragraph
    ci_same_content: np.ndarray
    ci_same_language: np.ndarray
    ci_neither: np.ndarray
    content_minus_language: np.ndarray  # same_content - same_language: > 0 means routing follows content
    ci_content_minus_language: np.ndarray
    n_paragraphs: int
    languages: list
    measure: str


def compare_pairs(S: np.ndarray, grid: np.ndarray, languages: list, measure: str = "js", n_boot: int = 1000,
                  n_shuffle: int = 100, seed: int = 0, level: float = 0.95) -> LanguageContent:
    """The same-content / same-language / neither comparison for pair values ``S`` [L, D, D]
    (similarities, or residuals of similarities) over documents arranged in ``grid`` [P, G]."""
    rng = np.random.default_rng(seed)
    L, (P, G) = S.shape[0], grid.shape
    point = np.zeros((L, 3))
    boot = np.zeros((L, n_boot, 3))
    shuf = np.zeros((L, 2))
    lo, hi = (1 - level) / 2 * 100, (1 + level) / 2 * 100
    boots_idx = [rng.integers(0, P, P) for _ in range(n_boot)]
    perms_p = [np.stack([rng.permutation(P) for _ in range(G)], 1) for _ in range(n_shuffle)]  # [P, G] each
    perms_g = [np.stack([rng.permutation(G) for _ in range(P)], 0) for _ in range(n_shuffle)]  # [P, G] each
    all_idx = np.arange(P)
    for layer in range(L):
        mats = _group_matrices(S[layer], grid)
        point[layer] = _stats_from(*mats, all_idx)
        for b, idx in enumerate(boots_idx):
            boot[layer, b] = _stats_from(*mats, idx)
        # shuffled: relabel documents, recompute the same statistic
        sc = [_group_matrices(S[layer], grid[perm, np.arange(G)])[0].mean() for perm in perms_p]
        sl = [_stats_from(*_group_matrices(S[layer], np.take_along_axis(grid, perm, 1)), all_idx)[1]
              for perm in perms_g]
        shuf[layer] = np.mean(sc), np.mean(sl)
    ci = np.nanpercentile(boot, [lo, hi], axis=1)  # [2, L, 3]
    diff_ci = np.nanpercentile(boot[..., 0] - boot[..., 1], [lo, hi], axis=1).T  # [L, 2]
    return LanguageContent(
        same_content=point[:, 0], same_language=point[:, 1], neither=point[:, 2],
        shuffled_content=shuf[:, 0], shuffled_language=shuf[:, 1],
        ci_same_content=ci[:, :, 0].T, ci_same_language=ci[:, :, 1].T, ci_neither=ci[:, :, 2].T,
        content_minus_language=point[:, 0] - point[:, 1], ci_content_minus_language=diff_ci,
        n_paragraphs=P, languages=list(languages), measure=measure)


def language_vs_content(trace: RoutingTrace, paragraphs: Sequence, languages: Sequence, *,
                        measure: Measure = "js", bos_id: int | None = 1, n_boot: int = 1000,
                        n_shuffle: int = 100, seed: int = 0) -> LanguageContent:
    """Per layer: is a paragraph's routing closer to its translations or to other paragraphs in
    its own language? ``paragraphs[d]``/``languages[d]`` label document ``d`` of ``trace``."""
    grid, _, langs = aligned_grid(paragraphs, languages)
    if grid.size != int(trace.doc_ids.max()) + 1:
        raise ValueError(f"{grid.size} labelled documents but the trace has {int(trace.doc_ids.max()) + 1}")
    S = pairwise_similarity(expert_usage(trace, bos_id), measure)
    return compare_pairs(S, grid, langs, measure, n_boot, n_shuffle, seed)


@dataclass
class HiddenControl:
    """How much of routing similarity hidden-state similarity explains, per layer ([L] arrays)."""

    r: np.ndarray  # Pearson correlation over all document pairs
    r2: np.ndarray
    slope: np.ndarray
    intercept: np.ndarray
    residual: LanguageContent  # the language/content comparison on the residuals of the fit


def hidden_state_control(trace: RoutingTrace, hidden: np.ndarray, paragraphs: Sequence, languages: Sequence, *,
                         measure: Measure = "js", bos_id: int | None = 1, n_boot: int = 1000,
                         n_shuffle: int = 100, seed: int = 0) -> HiddenControl:
    """Fit, per layer and over all pairs of documents, routing similarity = a + b * cosine
    similarity of the documents' mean router inputs (``hidden`` [L, D, dim], e.g. from
    :func:`mean_router_inputs`); report R^2 and compare same content vs same language on
    the residuals."""
    grid, _, langs = aligned_grid(paragraphs, languages)
    S = pairwise_similarity(expert_usage(trace, bos_id), measure)  # [L, D, D]
    H = pairwise_similarity(hidden, "cosine")  # [L, D, D]
    if H.shape != S.shape:
        raise ValueError(f"hidden gives {H.shape[0]} layers x {H.shape[1]} documents, the trace "
                         f"{S.shape[0]} x {S.shape[1]}")
    iu = np.triu_indices(S.shape[1], 1)
    L = S.shape[0]
    r, slope, icpt = np.zeros(L), np.zeros(L), np.zeros(L)
    R = np.zeros_like(S)
    for layer in range(L):
        x, y = H[layer][iu], S[layer][iu]
        slope[layer], icpt[layer] = np.polyfit(x, y, 1) if x.std() > 0 else (0.0, y.mean())
        r[layer] = np.corrcoef(x, y)[0, 1] if x.std() > 0 and y.std() > 0 else 0.0
        R[layer] = S[layer] - (icpt[layer] + slope[layer] * H[layer])
    residual = compare_pairs(R, grid, langs, measure, n_boot, n_shuffle, seed)
    return HiddenControl(r=r, r2=r ** 2, slope=slope, intercept=icpt, residual=residual)
