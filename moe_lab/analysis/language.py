"""Does routing follow the language or the content? (issue 12, item 6; issue 23, item 5)

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

**Effects on a scale from "neither" to the noise ceiling.** A usage vector is a sample of a few
dozen tokens, so even a document compared with *itself*, re-sampled, is not at similarity 1.
:func:`noise_ceiling` estimates that ceiling per document: split its tokens into alternate
halves (even and odd positions), measure the halves' similarity, and correct it to full length
(a divergence between two samples of n tokens from one distribution shrinks like 1/n, so
1 - ceiling = (1 - half-similarity) / 2; a Spearman-Brown style correction). Each effect is then
reported as (pair similarity - neither) / (ceiling - neither): 0 = no more alike than unrelated
documents, 1 = as alike as the sampling noise allows (:attr:`LanguageContent.content_effect`,
:attr:`LanguageContent.language_effect`, with bootstrap intervals).

**Token overlap.** Translations keep command names, paths, numbers and punctuation, so part of
a same-content similarity can be the *same token ids* routed alike. :func:`shared_token_mask`
leaves out, in every document, the token ids that occur in another language version of the
same paragraph (``language_vs_content(..., mask_shared_tokens=True)``); :func:`token_overlap`
measures the confound itself (cosine of token-count vectors), to be averaged by kind of pair
with :func:`compare_pairs`.

**Not a control: the hidden states.** :func:`hidden_state_control` fits routing similarity on
the cosine similarity of the documents' mean router inputs. Language identity is carried *by*
those hidden states (they are the mediator between the text and the router, not a confounder),
so comparing pair kinds on the residuals removes the language effect by construction. Use it to
ask how much of routing similarity is linear in mean-input similarity (R^2), or to demonstrate
why adjusting for a mediator is wrong; never as a control.

Similarity of two usage vectors: ``"js"`` is 1 - the Jensen-Shannon divergence in bits (1 for
identical distributions, 0 for disjoint ones); ``"cosine"`` is their cosine.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Literal, Sequence

import numpy as np
import torch

from ..corpus.prose import has_near_copies  # the corpus builder's own test of a translation
from ..devices import resolve_device
from ..hooks import StopForward
from ..routing.trace import RoutingTrace

Measure = Literal["js", "cosine"]


# --------------------------------------------------------------------------- per-document summaries

def _kept(trace: RoutingTrace, bos_id: int | None, keep) -> np.ndarray:
    """[N] bool: the tokens that count (not ``bos_id``, and ``keep`` where given)."""
    out = np.ones(trace.n_tokens, bool) if bos_id is None else trace.token_ids != bos_id
    if keep is not None:
        keep = np.asarray(keep)
        if keep.shape != (trace.n_tokens,) or keep.dtype != bool:
            raise ValueError(f"keep must be a bool array of shape ({trace.n_tokens},) (one per token of the "
                             f"trace), found {keep.dtype} {keep.shape}")
        out &= keep
    return out


def expert_usage(trace: RoutingTrace, bos_id: int | None = 1, keep: np.ndarray | None = None) -> np.ndarray:
    """[L, D, E]: for each layer and document, the share of its tokens' top-k slots that went to
    each expert (rows sum to 1). Tokens equal to ``bos_id`` are left out (every document starts
    with the same ``<s>``, which would make all documents look alike), and so are the tokens where
    ``keep`` ([N] bool, optional) is False (e.g. :func:`shared_token_mask`)."""
    kept = _kept(trace, bos_id, keep)
    L, D, E = trace.n_layers, int(trace.doc_ids.max()) + 1, trace.n_experts
    counts = np.zeros((L, D, E))
    docs = np.repeat(trace.doc_ids[kept], trace.top_k)  # [n * k]
    for layer in range(L):
        np.add.at(counts[layer], (docs, trace.expert_ids[layer][kept].reshape(-1)), 1.0)
    totals = counts.sum(-1, keepdims=True)
    if (totals == 0).any():
        empty = np.nonzero(totals[0, :, 0] == 0)[0].tolist()
        raise ValueError(f"documents {empty[:5]} have no tokens besides bos_id={bos_id}"
                         + (" and those keep leaves out" if keep is not None else ""))
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


def _rowwise_similarity(a: np.ndarray, b: np.ndarray, measure: Measure) -> np.ndarray:
    """[..., D]: similarity of row d of ``a`` with row d of ``b`` (both [..., D, E])."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if measure == "cosine":
        na, nb = np.linalg.norm(a, axis=-1).clip(1e-12), np.linalg.norm(b, axis=-1).clip(1e-12)
        return (a * b).sum(-1) / (na * nb)
    if measure == "js":
        m = (a + b) / 2
        with np.errstate(divide="ignore", invalid="ignore"):
            kl = lambda p: np.where(p > 0, p * np.log2(p / m), 0.0).sum(-1)
            return 1.0 - (kl(a) + kl(b)) / 2
    raise ValueError(f"measure must be 'js' or 'cosine', got {measure!r}")


def split_halves(trace: RoutingTrace, bos_id: int | None = 1, keep: np.ndarray | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Two [N] bool masks: each document's counted tokens (not BOS, ``keep``) split alternately,
    the 1st, 3rd, 5th ... in the first half and the 2nd, 4th ... in the second."""
    kept = _kept(trace, bos_id, keep)
    idx = np.flatnonzero(kept)
    d = trace.doc_ids[idx]
    order = np.argsort(d, kind="stable")  # token order kept within each document
    ds = d[order]
    starts = np.r_[0, np.flatnonzero(ds[1:] != ds[:-1]) + 1]
    rank_sorted = np.arange(len(ds)) - np.repeat(starts, np.diff(np.r_[starts, len(ds)]))
    rank = np.empty(len(idx), np.int64)
    rank[order] = rank_sorted
    first, second = np.zeros(trace.n_tokens, bool), np.zeros(trace.n_tokens, bool)
    first[idx[rank % 2 == 0]] = True
    second[idx[rank % 2 == 1]] = True
    return first, second


def split_half_similarity(trace: RoutingTrace, measure: Measure = "js", bos_id: int | None = 1,
                          keep: np.ndarray | None = None) -> np.ndarray:
    """[L, D]: per layer, the similarity of each document's two alternate halves
    (:func:`split_halves`): the same text, two samples of its routing of half the length."""
    first, second = split_halves(trace, bos_id, keep)
    n = np.bincount(trace.doc_ids[second], minlength=int(trace.doc_ids.max()) + 1)
    if (n == 0).any():
        raise ValueError(f"documents {np.flatnonzero(n == 0)[:5].tolist()} have fewer than 2 counted tokens: "
                         "a split-half noise ceiling needs at least 2")
    return _rowwise_similarity(expert_usage(trace, None, first), expert_usage(trace, None, second), measure)


def noise_ceiling(trace: RoutingTrace, measure: Measure = "js", bos_id: int | None = 1,
                  keep: np.ndarray | None = None) -> np.ndarray:
    """[L, D]: per layer and document, the similarity that two full-length samples of the *same*
    document's routing would have: the split-half similarity (:func:`split_half_similarity`)
    corrected to full length, 1 - (1 - half) / 2 (a divergence between two samples of n tokens
    from one distribution shrinks like 1/n; exact for the chi-square approximation of small
    divergences, approximate otherwise)."""
    return 1.0 - (1.0 - split_half_similarity(trace, measure, bos_id, keep)) / 2


def token_overlap(trace: RoutingTrace, bos_id: int | None = 1, keep: np.ndarray | None = None) -> np.ndarray:
    """[D, D]: cosine similarity of the documents' token-count vectors (how many of the same token
    ids two documents use), over the counted tokens (not ``bos_id``, ``keep``)."""
    kept = _kept(trace, bos_id, keep)
    D = int(trace.doc_ids.max()) + 1
    vocab, col = np.unique(trace.token_ids[kept], return_inverse=True)
    counts = np.zeros((D, len(vocab)))
    np.add.at(counts, (trace.doc_ids[kept], col), 1.0)
    return pairwise_similarity(counts, "cosine")


def shared_token_mask(trace: RoutingTrace, paragraphs: Sequence, languages: Sequence,
                      bos_id: int | None = 1) -> np.ndarray:
    """[N] bool, False for the tokens whose id also occurs in another language version of the
    same paragraph (names, paths, numbers, punctuation, cognates spelt alike), True elsewhere:
    with it, the two documents of a same-content pair share no token id at all.
    ``paragraphs[d]``/``languages[d]`` label document ``d``."""
    grid, _, _ = aligned_grid(paragraphs, languages)
    D = int(trace.doc_ids.max()) + 1
    if grid.size != D:
        raise ValueError(f"{grid.size} labelled documents but the trace has {D}")
    kept = _kept(trace, bos_id, None)
    ids = [set(trace.token_ids[kept & (trace.doc_ids == d)].tolist()) for d in range(D)]
    shared = [set() for _ in range(D)]
    for row in grid:
        for d in row:
            others = set().union(*(ids[o] for o in row if o != d))
            shared[d] = ids[d] & others
    out = np.ones(trace.n_tokens, bool)
    for d in range(D):
        if shared[d]:
            where = np.flatnonzero(trace.doc_ids == d)
            out[where[np.isin(trace.token_ids[where], list(shared[d]))]] = False
    return out


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
    """Per-layer means of pair similarity ([L] arrays) with bootstrap intervals ([L, 2]), and the
    effects on the scale from "neither" (0) to the split-half noise ceiling (1)."""

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
    # the noise ceiling (mean over documents, see noise_ceiling) and the normalised effects;
    # all None when compare_pairs was given no ceiling
    ceiling: np.ndarray | None = None
    ci_ceiling: np.ndarray | None = None
    content_effect: np.ndarray | None = None  # (same_content - neither) / (ceiling - neither)
    ci_content_effect: np.ndarray | None = None
    language_effect: np.ndarray | None = None  # (same_language - neither) / (ceiling - neither)
    ci_language_effect: np.ndarray | None = None
    shared_tokens_masked: bool = False  # True: tokens shared with a translation were left out
    dropped_paragraphs: list = field(default_factory=list)  # too few tokens left once masked

    def normalised(self, values) -> np.ndarray:
        """``values`` [L] (similarities on the same pairs' scale, e.g. a shuffled baseline) on the
        effect scale: 0 at ``neither``, 1 at the noise ceiling."""
        if self.ceiling is None:
            raise ValueError("this result has no noise ceiling: compute it with language_vs_content, or pass "
                             "ceiling= to compare_pairs")
        return (np.asarray(values, np.float64) - self.neither) / (self.ceiling - self.neither)


def _effect(stat, floor, top):
    """(stat - floor) / (top - floor), NaN where the band is empty (top <= floor)."""
    band = top - floor
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(band > 0, (stat - floor) / np.where(band > 0, band, 1.0), np.nan)


def compare_pairs(S: np.ndarray, grid: np.ndarray, languages: list, measure: str = "js", n_boot: int = 1000,
                  n_shuffle: int = 100, seed: int = 0, level: float = 0.95, *,
                  ceiling: np.ndarray | None = None, shared_tokens_masked: bool = False) -> LanguageContent:
    """The same-content / same-language / neither comparison for pair values ``S`` [L, D, D]
    (similarities, or any other pair statistic, e.g. :func:`token_overlap` as [1, D, D]) over
    documents arranged in ``grid`` [P, G]. ``ceiling`` [L, D] (optional, e.g. from
    :func:`noise_ceiling`): per-document noise ceilings; with it the result carries the normalised
    effects, their intervals resampling the ceiling with the same paragraphs."""
    rng = np.random.default_rng(seed)
    S = np.asarray(S, np.float64)
    L, (P, G) = S.shape[0], grid.shape
    if S.ndim != 3 or S.shape[1] != S.shape[2] or S.shape[1] != grid.size:
        raise ValueError(f"S must be [layers, {grid.size}, {grid.size}] for {P} paragraphs x {G} languages, "
                         f"found shape {S.shape}")
    if ceiling is not None:
        ceiling = np.asarray(ceiling, np.float64)
        if ceiling.shape != (L, grid.size):
            raise ValueError(f"ceiling must be [layers, documents] = ({L}, {grid.size}), found {ceiling.shape}")
    point = np.zeros((L, 3))
    boot = np.zeros((L, n_boot, 3))
    top, top_boot = np.full(L, np.nan), np.full((L, n_boot), np.nan)
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
        if ceiling is not None:
            per_par = ceiling[layer][grid].mean(1)  # [P]: mean over the paragraph's languages
            top[layer] = per_par.mean()
            top_boot[layer] = [per_par[idx].mean() for idx in boots_idx]
        # shuffled: relabel documents, recompute the same statistic
        sc = [_group_matrices(S[layer], grid[perm, np.arange(G)])[0].mean() for perm in perms_p]
        sl = [_stats_from(*_group_matrices(S[layer], np.take_along_axis(grid, perm, 1)), all_idx)[1]
              for perm in perms_g]
        shuf[layer] = np.mean(sc), np.mean(sl)
    ci = np.nanpercentile(boot, [lo, hi], axis=1)  # [2, L, 3]
    diff_ci = np.nanpercentile(boot[..., 0] - boot[..., 1], [lo, hi], axis=1).T  # [L, 2]
    extra = {}
    if ceiling is not None:
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN layers (no band): NaN intervals
            eff_boot = [_effect(boot[..., j], boot[..., 2], top_boot) for j in (0, 1)]  # [L, n_boot] each
            extra = dict(
                ceiling=top, ci_ceiling=np.nanpercentile(top_boot, [lo, hi], axis=1).T,
                content_effect=_effect(point[:, 0], point[:, 2], top),
                ci_content_effect=np.nanpercentile(eff_boot[0], [lo, hi], axis=1).T,
                language_effect=_effect(point[:, 1], point[:, 2], top),
                ci_language_effect=np.nanpercentile(eff_boot[1], [lo, hi], axis=1).T)
    return LanguageContent(
        same_content=point[:, 0], same_language=point[:, 1], neither=point[:, 2],
        shuffled_content=shuf[:, 0], shuffled_language=shuf[:, 1],
        ci_same_content=ci[:, :, 0].T, ci_same_language=ci[:, :, 1].T, ci_neither=ci[:, :, 2].T,
        content_minus_language=point[:, 0] - point[:, 1], ci_content_minus_language=diff_ci,
        n_paragraphs=P, languages=list(languages), measure=measure,
        shared_tokens_masked=shared_tokens_masked, **extra)


def language_vs_content(trace: RoutingTrace, paragraphs: Sequence, languages: Sequence, *,
                        measure: Measure = "js", bos_id: int | None = 1, mask_shared_tokens: bool = False,
                        min_tokens: int = 4, n_boot: int = 1000, n_shuffle: int = 100,
                        seed: int = 0) -> LanguageContent:
    """Per layer: is a paragraph's routing closer to its translations or to other paragraphs in
    its own language? ``paragraphs[d]``/``languages[d]`` label document ``d`` of ``trace``.
    Effects are also given between "neither" (0) and the split-half noise ceiling (1)
    (:func:`noise_ceiling`).

    ``mask_shared_tokens``: the token-overlap control. Leave out, in every document, the token
    ids that occur in another language version of the same paragraph (:func:`shared_token_mask`);
    the usage vectors and the ceilings are computed on the remaining tokens, and a paragraph
    with fewer than ``min_tokens`` tokens left in some language is dropped (all its languages;
    their names are in ``dropped_paragraphs``)."""
    grid, pars, langs = aligned_grid(paragraphs, languages)
    if grid.size != int(trace.doc_ids.max()) + 1:
        raise ValueError(f"{grid.size} labelled documents but the trace has {int(trace.doc_ids.max()) + 1}")
    keep, dropped = None, []
    if mask_shared_tokens:
        keep = shared_token_mask(trace, paragraphs, languages, bos_id)
        left = np.bincount(trace.doc_ids[_kept(trace, bos_id, keep)], minlength=grid.size)[grid]  # [P, G]
        short = left.min(1) < min_tokens
        if short.all():
            raise ValueError(f"no paragraph keeps {min_tokens} tokens in every language once shared tokens are masked")
        dropped = [pars[i] for i in np.flatnonzero(short)]
        keep = keep | np.isin(trace.doc_ids, grid[short].ravel())  # dropped documents: any tokens, never compared
        grid = grid[~short]
    docs = grid.ravel()
    S = pairwise_similarity(expert_usage(trace, bos_id, keep), measure)[:, docs][:, :, docs]
    top = noise_ceiling(trace, measure, bos_id, keep)[:, docs]
    sub = np.arange(docs.size).reshape(grid.shape)  # the grid in the numbering of the kept documents
    out = compare_pairs(S, sub, langs, measure, n_boot, n_shuffle, seed, ceiling=top,
                        shared_tokens_masked=mask_shared_tokens)
    out.dropped_paragraphs = dropped
    return out


def untranslated_paragraphs(rows: Sequence[dict], languages: Sequence[str] = ("en", "fr", "de", "es", "it"),
                            threshold: float = 0.9) -> list:
    """Ids of the aligned rows (``{"id", <language>: text}``) in which two language versions are
    near copies (``difflib`` similarity ratio >= ``threshold``): a translation that fell back to the
    source text. Such a "same content" pair is the same text, not a translation, and would make
    routing look as if it followed the content."""

    out = []
    for r in rows:
        missing = [g for g in languages if g not in r]
        if missing or "id" not in r:
            raise ValueError(f"row {r.get('id', '?')!r} lacks {missing or ['id']}")
        if has_near_copies((r[g] for g in languages), threshold):
            out.append(r["id"])
    return out


@dataclass
class HiddenControl:
    """How much of routing similarity is linear in mean-input similarity, per layer ([L] arrays).
    ``residual`` compares pair kinds after adjusting for a *mediator*: a demonstration of why that
    is wrong (the adjustment removes the language effect by construction), not a control."""

    r: np.ndarray  # Pearson correlation over all document pairs
    r2: np.ndarray
    slope: np.ndarray
    intercept: np.ndarray
    residual: LanguageContent  # pair kinds compared on the residuals: biased against "language" by construction


def hidden_state_control(trace: RoutingTrace, hidden: np.ndarray, paragraphs: Sequence, languages: Sequence, *,
                         measure: Measure = "js", bos_id: int | None = 1, n_boot: int = 1000,
                         n_shuffle: int = 100, seed: int = 0) -> HiddenControl:
    """Fit, per layer and over all pairs of documents, routing similarity = a + b * cosine
    similarity of the documents' mean router inputs (``hidden`` [L, D, dim], e.g. from
    :func:`mean_router_inputs`); report R^2 (how much of routing similarity is linear in
    mean-input similarity) and the pair comparison on the residuals.

    **This is not a control.** Language identity lives in the hidden states: same-language pairs
    have much more similar mean router inputs than same-content pairs, so subtracting
    ``a + b * cos`` removes more from same-language pairs by construction. A "content" reading on
    the residuals is an artefact of adjusting for the mediator; the residual comparison is kept
    to demonstrate that. The line is also fitted on the compared pairs themselves, and its
    uncertainty is not propagated into the intervals."""
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
