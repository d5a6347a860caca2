"""Causal experiments on experts: what happens to the loss when experts are taken away, which
experts separate two kinds of text, and how good the router's choice was among the alternatives.

Every function returns a pandas DataFrame; intervals are percentile bootstraps over documents
(the unit that varies between samples of text), never over tokens of one document.

* :func:`ablation_scan` -- per (layer, expert, domain): the change in mean next-token loss when
  the expert is ablated (``mode="reroute"``, ``"zero"`` or ``"mean"``: see
  :class:`moe_lab.AblateExpert`), and a null: a paired bootstrap of (its effect minus the largest
  other effect of its layer); :func:`scan_cells` counts the (layer, domain) cells beyond it.
* :func:`mask_top_experts` -- DeepSeekMoE's redundancy test (arXiv 2401.06066, section 4.5,
  Figure 4): each token's own r best experts masked, the top-k picked among the rest.
* :func:`disable_busiest_experts` (also ``disable_top_experts``) -- disable the busiest experts:
  the r most-routed experts of every layer switched off for every token, against r random ones,
  with a load-normalised reading.
* :func:`dose_response` -- the change in loss per domain along a dose (e.g. a steering offset).
* :func:`contrastive_experts` -- per (layer, expert): activation rate on texts A minus on texts B
  (SteerMoE's risk difference), ranked.
* :func:`document_losses` -- the loss of every document under any interventions (for the
  comparisons the functions above do not make, e.g. ``SwapExpert`` or ``SteerExperts``).
* :func:`alternative_routes` -- at one (layer, position): every equal-compute set of k experts,
  weighted by the router's own probabilities renormalised over the set, and the log-probability
  of the actual next token under each; the router's own choice is marked.

They run on a moe_lab ``Mixtral`` (also one loaded with ``layers=``) and on a
``StreamingMixtral`` (each block is then read from disk whenever it runs), on the model's device:
``device=None`` (the default) means the model's device, and any other device is an error
(:mod:`moe_lab.devices`); tables and arrays come back on the CPU.
"""

from __future__ import annotations

import itertools
import math
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from .devices import resolve_device
from .routing.interventions import (AblateExpert, Intervention, MaskTopExperts, _reference_docs, expert_mean_outputs,
                                    intervene, layer_ids, unwrap)
from .routing.tracing import normalise_inputs, trace_routing

__all__ = ["ablation_scan", "scan_cells", "paired_gap", "mask_top_experts", "disable_busiest_experts",
           "disable_top_experts", "dose_response",
           "contrastive_experts", "alternative_routes", "document_losses", "bootstrap_mean"]


# --------------------------------------------------------------------------------------------
# statistics


def bootstrap_mean(values: np.ndarray, n_boot: int = 1000, seed: int = 0, level: float = 0.95):
    """``(mean, low, high)`` of the mean of ``values`` [n_docs] with a percentile bootstrap
    interval (resampling documents with replacement)."""
    values = np.asarray(values, dtype=np.float64)
    n = len(values)
    if n == 0:
        return math.nan, math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, n, size=(n_boot, n))].mean(1)
    a = (1 - level) / 2
    return float(values.mean()), float(np.quantile(means, a)), float(np.quantile(means, 1 - a))


# --------------------------------------------------------------------------------------------
# documents -> padded batches with next-token targets


def _documents(texts_by_domain, tokenizer, max_len: int | None) -> tuple[list[list[int]], list[str]]:
    if not isinstance(texts_by_domain, Mapping):
        raise TypeError(f"texts_by_domain must be a mapping domain -> list of texts (or token lists), "
                        f"got {type(texts_by_domain).__name__}")
    docs, domains = normalise_inputs(texts_by_domain, tokenizer)
    if max_len is not None:
        docs = [d[:max_len] for d in docs]
    short = [i for i, d in enumerate(docs) if len(d) < 2]
    if short:
        raise ValueError(f"document {short[0]} ({domains[short[0]]!r}) has fewer than 2 tokens: no next token to predict")
    return docs, domains


def _batches(docs: list[list[int]], batch_size: int, device):
    """Yield ``(doc indices, tokens [B, T], attention_mask or None, targets [B, T])``: left-padded;
    ``targets[b, t]`` is the next token, -100 where there is none (padding, last position)."""
    order = sorted(range(len(docs)), key=lambda i: len(docs[i]))  # similar lengths together: less padding
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        T = max(len(docs[i]) for i in idx)
        tokens = torch.zeros(len(idx), T, dtype=torch.long, device="cpu")  # built here, sent once
        mask = torch.zeros(len(idx), T, dtype=torch.long, device="cpu")
        targets = torch.full((len(idx), T), -100, dtype=torch.long, device="cpu")
        for b, i in enumerate(idx):
            d = torch.tensor(docs[i], dtype=torch.long, device="cpu")
            tokens[b, T - len(d):] = d
            mask[b, T - len(d):] = 1
            targets[b, T - len(d):-1] = d[1:]
        yield idx, tokens.to(device), (None if bool(mask.all()) else mask.to(device)), targets.to(device)


# --------------------------------------------------------------------------------------------
# the forward in pieces: the one place that uses the model's forward API directly


class _Pieces:
    """A forward split at block boundaries, so an ablation at block i reruns blocks i.. only.

    The model's own pieces (``Mixtral.embed``, ``block(x, ctx)``, ``Mixtral.head``), called in
    the order ``Mixtral.forward`` calls them: ``prefix`` keeps each block's input, ``suffix``
    reruns ``blocks[i:]`` from block i's input, ``head_nll`` is the head and the cross-entropy
    per token. On a StreamingMixtral calling a block loads its weights (its own pre-hook), so
    the suffix re-reads blocks i.. from disk.
    """

    def __init__(self, model):
        self.mixtral, _ = unwrap(model)

    @torch.no_grad()
    def prefix(self, tokens: Tensor, mask: Tensor | None):
        """``(states, ctx)``: ``states[i]`` is block i's input (B, T, D), ``states[-1]`` the final
        residual stream; ``ctx`` the ForwardContext every block takes."""
        x, ctx = self.mixtral.embed(tokens, attention_mask=mask)
        states = [x]
        for block in self.mixtral.blocks:
            x, _ = block(x, ctx)
            states.append(x)
        return states, ctx

    @torch.no_grad()
    def suffix(self, states: list[Tensor], i: int, ctx) -> Tensor:
        """The final residual stream (B, T, D), recomputing blocks i.. from block i's input."""
        x = states[i]
        for block in self.mixtral.blocks[i:]:
            x, _ = block(x, ctx)
        return x

    @torch.no_grad()
    def head_nll(self, x: Tensor, targets: Tensor, rows: Tensor | None = None, chunk: int = 256) -> Tensor:
        """Next-token loss per position (B, T) fp32 from the final stream x (B, T, D); 0 where
        targets is -100. With ``rows`` (B, T) bool, only those positions are computed (others 0)."""
        nll = torch.zeros(targets.shape, dtype=torch.float32, device=targets.device)
        want = targets != -100 if rows is None else rows & (targets != -100)
        flat = want.reshape(-1).nonzero().squeeze(1)
        xs, ts = x.reshape(-1, x.shape[-1]), targets.reshape(-1)
        out = nll.view(-1)
        for s in range(0, len(flat), chunk):  # (chunk, V) logits at a time
            r = flat[s:s + chunk]
            logits = self.mixtral.head(xs[r][None])[0].float()  # (chunk, V)
            out[r] = F.cross_entropy(logits, ts[r], reduction="none")
        return nll


def _doc_losses(nll: Tensor, targets: Tensor) -> np.ndarray:
    """Mean next-token loss of each row (B,)."""
    n = (targets != -100).sum(-1).clamp(min=1)
    return (nll.sum(-1) / n).cpu().double().numpy()


def _block_index(mixtral, layer: int) -> int:
    ids = layer_ids(mixtral)
    if layer not in ids:
        raise ValueError(f"layer {layer} is not in this model (its layers: {ids})")
    return ids.index(layer)


# --------------------------------------------------------------------------------------------
# loss per document


@torch.no_grad()
def document_losses(model, texts_by_domain, tokenizer=None, interventions: Sequence[Intervention] = (), *,
                    batch_size: int = 8, max_len: int | None = 256, device=None) -> pd.DataFrame:
    """Mean next-token loss of every document, under ``interventions`` (any, e.g. ``SwapExpert``
    or ``SteerExperts``; none: the plain model). One row per document: ``domain``, ``doc``
    (index within the domain), ``n_targets``, ``loss``. Pair two calls by (domain, doc) and use
    :func:`bootstrap_mean` on the differences for an interval. (The forward runs in pieces,
    ``embed`` -> blocks -> ``head``, so a ``ForceExpert`` restricted to ``positions=`` cannot
    see the positions here and says so.)"""
    pieces = _Pieces(model)
    device = resolve_device(model, device)
    docs, domains = _documents(texts_by_domain, tokenizer, max_len)
    loss = np.zeros(len(docs))
    with intervene(model, *interventions):
        for idx, tokens, mask, targets in _batches(docs, batch_size, device):
            x = pieces.prefix(tokens, mask)[0][-1]
            loss[idx] = _doc_losses(pieces.head_nll(x, targets), targets)
    within = [sum(d == domains[j] for j in range(i)) for i, d in enumerate(domains)]
    return pd.DataFrame({"domain": domains, "doc": within, "n_targets": [len(d) - 1 for d in docs], "loss": loss})


# --------------------------------------------------------------------------------------------
# ablation scan


def _sources(n_sources, domains) -> dict:
    """{domain: number of independent source documents}; default: every document is its own source."""
    dom = list(dict.fromkeys(domains))
    counts = {d: int(sum(x == d for x in domains)) for d in dom}
    if n_sources is None:
        return counts
    if not isinstance(n_sources, Mapping):
        raise TypeError(f"n_sources must be a mapping domain -> number of source documents, got {type(n_sources).__name__}")
    missing = [d for d in dom if d not in n_sources]
    if missing:
        raise ValueError(f"n_sources has no entry for domain {missing[0]!r} (its domains: {list(n_sources)})")
    return {d: int(n_sources[d]) for d in dom}


@torch.no_grad()
def ablation_scan(model, texts_by_domain, tokenizer=None, layers: Sequence[int] | None = None,
                  mode: str = "reroute", *, experts: Sequence[int] | None = None, n_controls: int | None = None,
                  n_boot: int = 1000, batch_size: int = 8, max_len: int | None = 256, seed: int = 0,
                  n_sources: Mapping[str, int] | None = None, min_sources: int = 3, reference=None,
                  reuse_prefix: bool = True, progress: bool = True, device=None) -> pd.DataFrame:
    """The change in mean next-token loss per layer, expert and domain when the expert is ablated,
    and a null for "is this expert clearly the most important one of its layer for this domain?".

    ``texts_by_domain``: ``{domain: [text or token list, ...]}`` (texts need ``tokenizer``; BOS is
    added). ``mode``: ``"reroute"`` (the next expert takes the slot), ``"zero"`` (the slot's
    contribution is removed) or ``"mean"`` (the expert's output replaced by its mean output over
    ``reference``, token-id lists you name), see :class:`moe_lab.AblateExpert`. ``layers``/
    ``experts``: which to report (default all; the null needs every expert of a reported layer,
    so all of them are ablated).

    One row per (layer, expert, domain): ``base_loss`` and ``ablated_loss`` (means over the
    domain's documents of each document's mean loss), ``delta`` = ablated - base with a bootstrap
    interval over documents (``ci_low``, ``ci_high``), and the **null**: ``max_other``, the largest
    mean effect among the layer's other experts, and ``gap`` = delta - max_other with a *paired*
    bootstrap interval (``gap_low``, ``gap_high``: the same resampled documents for every expert,
    the maximum taken within each resample). ``beyond_null`` is True when ``gap_low > 0`` and the
    domain is ``counted``: this expert's effect is larger than every other expert's of the layer,
    beyond resampling noise. At most one expert per (layer, domain) cell can be beyond it, so
    count cells (:func:`scan_cells`), not rows.

    ``n_sources``: ``{domain: number of source documents}`` the documents were cut from (windows
    of one source are not independent; default: each document is its own source). A domain with
    fewer than ``min_sources`` is not ``counted`` (its intervals are too narrow): its rows keep
    their numbers, never a ``beyond_null``. ``beyond_control`` is ``beyond_null`` under its
    moe_lab 0.x name; ``n_controls`` is ignored (the null draws nothing).

    ``reuse_prefix`` (default): layers before the ablated one are computed once per batch (the
    unablated forward), and only blocks from the ablated layer on are rerun; positions whose
    final residual stream is bitwise unchanged keep their unablated loss. ``False`` runs a full
    forward per ablation (the same numbers; ``benchmarks/bench_causal.py`` compares the two).
    """
    if mode not in AblateExpert.MODES:
        raise ValueError(f"ablation_scan: unknown mode {mode!r}; choose one of {list(AblateExpert.MODES)}")
    if mode == "mean" and reference is None:
        raise ValueError("ablation_scan(mode='mean') needs reference=: token-id lists over which each expert's mean "
                         "output is taken (documents other than those scored)")
    pieces = _Pieces(model)
    mixtral = pieces.mixtral
    E, ids = mixtral.args.n_experts, layer_ids(mixtral)
    layers = list(ids) if layers is None else [int(l) for l in layers]
    for layer in layers:
        _block_index(mixtral, layer)
    experts = list(range(E)) if experts is None else [int(e) for e in experts]
    bad = [e for e in experts if not 0 <= e < E]
    if bad:
        raise ValueError(f"expert {bad[0]} is outside [0, {E}) (this model has {E} experts per layer)")
    if min_sources < 1:
        raise ValueError(f"min_sources must be >= 1, got {min_sources}")
    docs, domains = _documents(texts_by_domain, tokenizer, max_len)
    sources = _sources(n_sources, domains)
    needed = [(l, e) for l in layers for e in range(E)]  # every expert of the layer: the null needs them all
    ablations = {pair: AblateExpert(*pair, mode=mode, **({"reference": reference} if mode == "mean" else {}))
                 for pair in needed}
    if mode == "mean":  # every expert's mean output in one pass over the reference
        means = expert_mean_outputs(mixtral, unwrap(model)[1], _reference_docs(reference), set(needed))
        for iv in ablations.values():
            iv.means, iv._prepared_for = means, mixtral
    base = np.zeros(len(docs))
    ablated = {pair: np.zeros(len(docs)) for pair in needed}
    batches = list(_batches(docs, batch_size, resolve_device(model, device)))
    bar = tqdm(total=len(batches) * (len(needed) + 1), desc="ablation scan", disable=not progress)
    for idx, tokens, mask, targets in batches:
        states, ctx = pieces.prefix(tokens, mask)
        base_nll = pieces.head_nll(states[-1], targets)
        base[idx] = _doc_losses(base_nll, targets)
        bar.update()
        for layer, e in needed:
            with intervene(model, ablations[(layer, e)]):
                if reuse_prefix:
                    x = pieces.suffix(states, _block_index(mixtral, layer), ctx)
                    changed = (x != states[-1]).any(-1)  # (B, T): other positions keep their loss
                    nll = torch.where(changed, pieces.head_nll(x, targets, rows=changed), base_nll)
                else:
                    x = pieces.prefix(tokens, mask)[0][-1]  # a full forward
                    nll = pieces.head_nll(x, targets)
            ablated[(layer, e)][idx] = _doc_losses(nll, targets)
            bar.update()
    bar.close()
    dom = np.asarray(domains)
    rows = []
    for layer in layers:
        for d in dict.fromkeys(domains):
            sel = dom == d
            D = np.stack([ablated[(layer, e)][sel] - base[sel] for e in range(E)], axis=1)  # (n_docs, E)
            n = D.shape[0]
            gap, g_lo, g_hi = paired_gap(D, n_boot, seed)
            counted = sources[d] >= min_sources
            for e in experts:
                mean, lo, hi = bootstrap_mean(D[:, e], n_boot, seed)
                max_other = mean - gap[e]
                beyond = bool(counted and g_lo[e] > 0)
                rows.append({"layer": layer, "expert": e, "domain": d, "mode": mode, "n_docs": n,
                             "n_sources": sources[d], "counted": counted,
                             "base_loss": base[sel].mean(), "ablated_loss": ablated[(layer, e)][sel].mean(),
                             "delta": mean, "ci_low": lo, "ci_high": hi, "max_other": max_other,
                             "gap": float(gap[e]), "gap_low": float(g_lo[e]), "gap_high": float(g_hi[e]),
                             "beyond_null": beyond, "beyond_control": beyond})
    return pd.DataFrame(rows)


def paired_gap(effects, n_boot: int = 1000, seed: int = 0, level: float = 0.95):
    """The null of :func:`ablation_scan`: ``effects`` [n_docs, n] (the effect of each of n
    interventions on each document). For each column j: ``gap[j]`` = mean of j minus the largest
    mean of the other columns, with a *paired* percentile bootstrap interval (documents resampled
    with replacement, the same resample for every column, the maximum taken within each
    resample). Returns ``(gap, low, high)``, arrays [n]. ``low > 0``: j's effect is the largest,
    beyond resampling noise. With one column the "other" is 0 (a plain bootstrap of the mean)."""
    D = np.asarray(effects, dtype=np.float64)
    if D.ndim != 2 or D.shape[0] == 0:
        raise ValueError(f"paired_gap needs effects [n_docs >= 1, n], got shape {D.shape}")
    n, m = D.shape
    boot = D[np.random.default_rng(seed).integers(0, n, size=(n_boot, n))].mean(1)  # (n_boot, m)
    point = D.mean(0)
    gap, lo, hi = np.zeros(m), np.zeros(m), np.zeros(m)
    a = (1 - level) / 2
    for j in range(m):
        others = [x for x in range(m) if x != j]
        g_boot = boot[:, j] - (boot[:, others].max(1) if others else 0.0)
        gap[j] = point[j] - (point[others].max() if others else 0.0)
        lo[j], hi[j] = np.quantile(g_boot, [a, 1 - a])
    return gap, lo, hi


def scan_cells(scan: pd.DataFrame) -> pd.DataFrame:
    """One row per (layer, domain) cell of an :func:`ablation_scan`: the expert with the largest
    effect there, its ``delta`` and ``gap`` to the runner-up with the paired interval, and whether
    the cell is ``counted`` and ``beyond_null``. ``k of N`` is ``cells.beyond_null.sum()`` of
    ``cells.counted.sum()``."""
    need = {"layer", "expert", "domain", "delta", "gap", "gap_low", "gap_high", "counted", "beyond_null"}
    missing = sorted(need - set(scan.columns))
    if missing:
        raise ValueError(f"scan_cells needs an ablation_scan table; column {missing[0]!r} is missing")
    best = scan.sort_values("delta", ascending=False, kind="stable").groupby(["layer", "domain"], sort=False).head(1)
    cols = ["layer", "domain", "expert", "delta", "ci_low", "ci_high", "max_other", "gap", "gap_low", "gap_high",
            "n_docs", "n_sources", "counted", "beyond_null"]
    return best[[c for c in cols if c in best.columns]].sort_values(["layer", "domain"], kind="stable").reset_index(drop=True)


# --------------------------------------------------------------------------------------------
# redundancy: DeepSeekMoE's per-token test, and the global "disable the busiest experts"


class _MaskRandomExperts(Intervention):
    """Per token, ``r`` experts drawn at random (a fresh draw for every token and layer) get logit
    ``-inf``: the per-token test's control (the token loses r arbitrary experts, not its best)."""

    def __init__(self, r: int, seed: int):
        self.r, self.seed, self.layers = int(r), int(seed), None
        self._gen = {}

    def masked_per_token(self, layer):
        return self.r

    def edit_logits(self, layer, logits, ctx):
        if self.r == 0:
            return logits
        g = self._gen.setdefault(logits.device, torch.Generator(device=logits.device).manual_seed(self.seed))
        draw = torch.rand(logits.shape, generator=g, device=logits.device).topk(self.r, dim=-1).indices
        return logits.scatter(-1, draw, float("-inf"))

    def __repr__(self):
        return f"_MaskRandomExperts({self.r})"


def _paired_rows(losses: dict, base: np.ndarray, domains: list[str], n_boot: int, seed: int,
                 extra=None) -> list[dict]:
    """Rows ``{**setting, domain, loss, ci_low, ci_high, delta, delta_low, delta_high, n_docs}`` for
    ``losses`` ``{setting items (tuple): per-document loss}``; delta is paired with ``base`` by document."""
    dom = np.asarray(domains)
    rows = []
    for key, per_doc in losses.items():
        for d in dict.fromkeys(domains):
            sel = dom == d
            mean, lo, hi = bootstrap_mean(per_doc[sel], n_boot, seed)
            dm, dlo, dhi = bootstrap_mean(per_doc[sel] - base[sel], n_boot, seed)
            row = {**dict(key), "domain": d, "loss": mean, "ci_low": lo, "ci_high": hi, "delta": dm,
                   "delta_low": dlo, "delta_high": dhi, "n_docs": int(sel.sum())}
            if extra is not None:
                row.update(extra(key, sel))
            rows.append(row)
    return rows


@torch.no_grad()
def mask_top_experts(model, texts_by_domain, tokenizer=None, r_values: Sequence[int] | None = None, *,
                     random_control: bool = True, n_boot: int = 1000, batch_size: int = 8,
                     max_len: int | None = 256, seed: int = 0, progress: bool = True, device=None) -> pd.DataFrame:
    """DeepSeekMoE's redundancy test (Dai et al. 2024, arXiv 2401.06066, section 4.5, Figure 4),
    per token: in every layer, each token's own ``r`` highest-scoring experts are masked and the
    model's routing rule picks the top-k among the rest (:class:`moe_lab.MaskTopExperts`);
    r = 0..E-k. A model whose experts are redundant (the next choices can stand in) loses little.

    ``random_control``: also mask ``r`` experts drawn at random per token and layer (kind
    ``"random"``; not in the paper: it shows what losing r *arbitrary* experts costs). One row
    per (r, kind, domain): ``loss`` (mean over documents) and ``delta`` = loss - plain loss, each
    with a bootstrap interval over documents (``ci_low``/``ci_high``, ``delta_low``/``delta_high``).
    With top-k routing, ``r >= k`` replaces all of a token's experts.
    """
    mixtral, _ = unwrap(model)
    E, k = mixtral.args.n_experts, mixtral.args.experts_per_token
    r_values = list(range(E - k + 1)) if r_values is None else [int(r) for r in r_values]
    bad = [r for r in r_values if not 0 <= r <= E - k]
    if bad:
        raise ValueError(f"r={bad[0]} is outside [0, {E - k}] (r + k must be at most n_experts={E}, k={k})")
    docs, domains = _documents(texts_by_domain, tokenizer, max_len)
    device = resolve_device(model, device)
    settings = [({"r": r, "kind": "top"}, [MaskTopExperts(r)] if r else []) for r in r_values]
    if random_control:
        settings += [({"r": r, "kind": "random"}, [_MaskRandomExperts(r, seed + r)] if r else []) for r in r_values]
    pieces = _Pieces(model)
    batches = list(_batches(docs, batch_size, device))
    base = np.zeros(len(docs))
    losses = {tuple(key.items()): np.zeros(len(docs)) for key, _ in settings}
    bar = tqdm(total=len(batches) * (len(settings) + 1), desc="mask top experts", disable=not progress)
    for idx, tokens, mask, targets in batches:
        x = pieces.prefix(tokens, mask)[0][-1]
        base[idx] = _doc_losses(pieces.head_nll(x, targets), targets)
        bar.update()
        for key, ivs in settings:
            with intervene(model, *ivs):
                x = pieces.prefix(tokens, mask)[0][-1]
            losses[tuple(key.items())][idx] = _doc_losses(pieces.head_nll(x, targets), targets)
            bar.update()
    bar.close()
    return pd.DataFrame(_paired_rows(losses, base, domains, n_boot, seed))


@torch.no_grad()
def disable_top_experts(model, texts_by_domain, tokenizer=None, r_values: Sequence[int] | None = None, *,
                        select_texts=None, n_random: int = 5, n_boot: int = 1000, batch_size: int = 8,
                        max_len: int | None = 256, seed: int = 0, progress: bool = True, device=None) -> pd.DataFrame:
    """Disable the busiest experts: the ``r`` most-routed experts of *every* layer switched off for
    every token, r = 0..E-1, against ``r`` randomly drawn experts per layer (``n_random`` draws).
    Disabled experts cannot be chosen (``AblateExpert`` ``"reroute"``: the router picks its top-k
    among the others; k shrinks when fewer than k are left).

    This is *not* DeepSeekMoE's redundancy test (that one is per token: :func:`mask_top_experts`).
    Disabling a busy expert reroutes more tokens than disabling a rarely used one, even when every
    expert is equally replaceable per token, so the raw gap between the curves is mostly load.
    The load-normalised reading divides by it: ``displaced`` is the share of the scored tokens'
    (token, layer, slot) assignments that the disabled experts held in the plain routing, and
    ``delta_per_displaced`` = delta / displaced (nats per unit of displaced load; a bootstrap
    ratio of means over documents, ``dpd_low``/``dpd_high``).

    ``select_texts``: the texts (``{domain: [...]}`` or a list; token lists, or texts with
    ``tokenizer``) on which the experts are ranked by load. Give documents other than those
    scored; ``None`` ranks them on the scored texts themselves (the selection then favours the
    experts that matter most for exactly these texts). One row per (r, kind in {"top",
    "random"}, domain): ``loss`` and ``delta`` (vs the plain model, paired by document; for
    "random", each document's loss averaged over the draws first) with bootstrap intervals,
    ``displaced``, ``delta_per_displaced`` with its interval, ``selected_on``.
    """
    mixtral, _ = unwrap(model)
    E, ids = mixtral.args.n_experts, layer_ids(mixtral)
    r_values = list(range(E)) if r_values is None else [int(r) for r in r_values]
    bad = [r for r in r_values if not 0 <= r < E]
    if bad:
        raise ValueError(f"r={bad[0]} is outside [0, {E - 1}] (this model has {E} experts per layer)")
    docs, domains = _documents(texts_by_domain, tokenizer, max_len)
    device = resolve_device(model, device)
    trace = trace_routing(model, docs, batch_size=batch_size, progress=False, device=device)  # plain routing, scored docs
    if select_texts is None:
        sel_trace, selected_on = trace, "the scored texts"
    else:
        sel = select_texts if isinstance(select_texts, Mapping) else {"select": list(select_texts)}
        sel_docs, _ = _documents(sel, tokenizer, max_len)
        sel_trace, selected_on = trace_routing(model, sel_docs, batch_size=batch_size, progress=False, device=device), "other texts"
    counts = np.stack([np.bincount(sel_trace.expert_ids[i].ravel(), minlength=E) for i in range(len(ids))])  # (L, E)
    ranked = np.argsort(-counts, axis=1, kind="stable")  # most-routed first
    # per document: the share of its (token, layer, slot) assignments held by each expert of each layer
    n_doc_tokens = np.bincount(trace.doc_ids, minlength=len(docs)).astype(np.float64)  # (n_docs,)
    held = np.zeros((len(docs), len(ids), E))
    for i in range(len(ids)):
        for slot in range(trace.expert_ids.shape[-1]):
            np.add.at(held[:, i], (trace.doc_ids, trace.expert_ids[i][:, slot]), 1.0)
    held /= (n_doc_tokens * len(ids) * trace.expert_ids.shape[-1])[:, None, None]
    rng = np.random.default_rng(seed)
    settings = []  # (r, kind, draw, {layer index: experts})
    for r in r_values:
        settings.append((r, "top", 0, {i: ranked[i, :r].tolist() for i in range(len(ids))}))
        for j in range(n_random if r else 1):
            settings.append((r, "random", j, {i: rng.choice(E, size=r, replace=False).tolist() for i in range(len(ids))}))
    pieces = _Pieces(model)
    batches = list(_batches(docs, batch_size, device))
    losses = {s_[:3]: np.zeros(len(docs)) for s_ in settings}
    displaced = {s_[:3]: sum(held[:, i, es].sum(-1) for i, es in s_[3].items()) for s_ in settings}
    base = np.zeros(len(docs))
    bar = tqdm(total=len(batches) * (len(settings) + 1), desc="disable the busiest experts", disable=not progress)
    for idx, tokens, mask, targets in batches:
        x = pieces.prefix(tokens, mask)[0][-1]
        base[idx] = _doc_losses(pieces.head_nll(x, targets), targets)
        bar.update()
        for r, kind, j, off in settings:
            ivs = [AblateExpert(ids[i], es) for i, es in off.items() if es]
            with intervene(model, *ivs):
                x = pieces.prefix(tokens, mask)[0][-1]
            losses[(r, kind, j)][idx] = _doc_losses(pieces.head_nll(x, targets), targets)
            bar.update()
    bar.close()
    per_setting, disp = {}, {}
    for r in r_values:
        for kind in ("top", "random"):
            keys = [key for key in losses if key[0] == r and key[1] == kind]
            per_setting[(("r", r), ("kind", kind))] = np.mean([losses[key] for key in keys], axis=0)
            disp[(("r", r), ("kind", kind))] = np.mean([displaced[key] for key in keys], axis=0)
    rng_b = np.random.default_rng(seed)

    def normalised(key, sel):
        dl, dp = per_setting[key][sel] - base[sel], disp[key][sel]
        n = int(sel.sum())
        if dp.mean() == 0:
            return {"displaced": 0.0, "delta_per_displaced": math.nan, "dpd_low": math.nan, "dpd_high": math.nan}
        b = rng_b.integers(0, n, size=(n_boot, n))
        ratio = dl[b].mean(1) / np.maximum(dp[b].mean(1), 1e-12)
        lo, hi = np.quantile(ratio, [0.025, 0.975])
        return {"displaced": float(dp.mean()), "delta_per_displaced": float(dl.mean() / dp.mean()),
                "dpd_low": float(lo), "dpd_high": float(hi), "selected_on": selected_on}

    rows = _paired_rows(per_setting, base, domains, n_boot, seed, extra=normalised)
    for row in rows:
        row.setdefault("selected_on", selected_on)
    return pd.DataFrame(rows)


#: The same function under the name of what it does ("disable the busiest experts"); the name
#: ``disable_top_experts`` is kept for existing code.
disable_busiest_experts = disable_top_experts


# --------------------------------------------------------------------------------------------
# dose-response


@torch.no_grad()
def dose_response(model, texts_by_domain, interventions_at, doses: Sequence[float], tokenizer=None, *,
                  n_boot: int = 1000, batch_size: int = 8, max_len: int | None = 256, seed: int = 0,
                  progress: bool = True, device=None) -> pd.DataFrame:
    """The change in loss per domain as a function of a dose: for each ``dose``, the documents'
    losses under ``interventions_at(dose)`` (a list of interventions) minus their plain losses,
    paired by document, with a bootstrap interval over documents. One row per (dose, domain):
    ``loss``, ``ci_low``/``ci_high``, ``delta``, ``delta_low``/``delta_high``, ``n_docs``.
    Report the whole curve: a verdict read off one dose flips with the grid."""
    doses = [float(d) for d in doses]
    if not doses:
        raise ValueError("dose_response needs at least one dose")
    base_df = document_losses(model, texts_by_domain, tokenizer, batch_size=batch_size, max_len=max_len, device=device)
    base, domains = base_df.loss.to_numpy(), list(base_df.domain)
    losses = {}
    for dose in tqdm(doses, desc="doses", disable=not progress):
        ivs = list(interventions_at(dose))
        df = document_losses(model, texts_by_domain, tokenizer, ivs, batch_size=batch_size, max_len=max_len,
                             device=device)
        losses[(("dose", dose),)] = df.loss.to_numpy()
    return pd.DataFrame(_paired_rows(losses, base, domains, n_boot, seed))


# --------------------------------------------------------------------------------------------
# contrastive experts (SteerMoE)


def contrastive_experts(model, texts_a, texts_b, tokenizer=None, *, n_boot: int = 1000, max_len: int | None = 256,
                        batch_size: int = 8, seed: int = 0, device=None) -> pd.DataFrame:
    """SteerMoE's risk difference (Fayyaz et al. 2025): per layer and expert, the share of tokens
    of ``texts_a`` whose top-k includes the expert minus that share on ``texts_b``, with a
    bootstrap interval (documents of each set resampled). Ranked: largest difference (experts
    of A) first; the most negative rows are B's experts. Columns: ``layer``, ``expert``,
    ``rate_a``, ``rate_b``, ``risk_diff``, ``ci_low``, ``ci_high``, ``rank``.
    """
    rates, counts = [], []
    for texts in (texts_a, texts_b):
        docs, _ = normalise_inputs(list(texts), tokenizer)
        if max_len is not None:
            docs = [d[:max_len] for d in docs]
        t = trace_routing(model, docs, batch_size=batch_size, progress=False, device=device)
        E, L = t.n_experts, t.n_layers
        hit = np.zeros((L, t.n_tokens, E), dtype=np.int64)  # 1 where the token used the expert in this layer
        np.put_along_axis(hit, t.expert_ids, 1, axis=-1)
        n_docs = int(t.doc_ids.max()) + 1
        per_doc = np.zeros((n_docs, L, E), dtype=np.int64)  # tokens using e, per document
        np.add.at(per_doc, t.doc_ids, hit.transpose(1, 0, 2))
        counts.append(np.bincount(t.doc_ids, minlength=n_docs))
        rates.append(per_doc)
        layers = t.layers
    rng = np.random.default_rng(seed)

    def pooled(per_doc, n_tok, pick):
        return per_doc[pick].sum(0) / n_tok[pick].sum()  # (L, E)

    (ha, na), (hb, nb) = zip(rates, counts)
    ra, rb = pooled(ha, na, slice(None)), pooled(hb, nb, slice(None))
    boots = np.stack([pooled(ha, na, rng.integers(0, len(na), len(na))) - pooled(hb, nb, rng.integers(0, len(nb), len(nb)))
                      for _ in range(n_boot)])  # (n_boot, L, E)
    lo, hi = np.quantile(boots, [0.025, 0.975], axis=0)
    rows = [{"layer": int(layers[i]), "expert": e, "rate_a": ra[i, e], "rate_b": rb[i, e],
             "risk_diff": ra[i, e] - rb[i, e], "ci_low": lo[i, e], "ci_high": hi[i, e]}
            for i in range(ra.shape[0]) for e in range(ra.shape[1])]
    df = pd.DataFrame(rows).sort_values("risk_diff", ascending=False, kind="stable").reset_index(drop=True)
    df["rank"] = np.arange(1, len(df) + 1)
    return df


# --------------------------------------------------------------------------------------------
# alternative routes


class _RouteRows(Intervention):
    """At ``layer``, token row ``rows[j]`` (of the flattened batch) is routed to ``subsets[j]``
    with the router's own probabilities renormalised over the set; other rows keep their routing."""

    def __init__(self, layer: int, rows: Tensor, subsets: Tensor):
        self.layers = (int(layer),)
        self.rows, self.subsets = rows, subsets

    def edit_routing(self, layer, probs, indices, weights, ctx):
        idx, w = indices.clone(), weights.clone()
        p = probs.float()[self.rows].gather(1, self.subsets)  # (R, k)
        idx[self.rows] = self.subsets.to(idx.dtype)
        w[self.rows] = (p / p.sum(-1, keepdim=True)).to(w.dtype)
        return probs, idx, w

    def __repr__(self):
        return f"_RouteRows(layer={self.layers[0]}, {len(self.rows)} rows)"


@torch.no_grad()
def alternative_routes(model, tokens, layer: int, position: int, *, batch_size: int = 64,
                       device=None) -> pd.DataFrame:
    """Every equal-compute route for one token: at ``layer`` and ``position`` of one sequence
    (``tokens`` ``[T]`` or ``[1, T]``), each set of k of the E experts, weighted by the router's
    own probabilities renormalised over the set (other tokens and layers route as usual), and
    the log-probability of the actual next token ``tokens[position + 1]`` that results.

    One row per set, best first: ``experts`` (tuple), ``weights`` (tuple), ``logprob``,
    ``router_choice`` (True for the router's own top-k; its ``logprob`` equals the unmodified
    model's) and ``rank``. With 8 experts and top-2: 28 routes.
    """
    mixtral, _ = unwrap(model)
    _block_index(mixtral, layer)
    device = resolve_device(model, device)
    tokens = torch.as_tensor(tokens, device=device)
    tokens = tokens[0] if tokens.dim() == 2 and tokens.shape[0] == 1 else tokens
    if tokens.dim() != 1:
        raise ValueError(f"alternative_routes explains one sequence: tokens [T] or [1, T], got {tuple(tokens.shape)}")
    T = tokens.numel()
    if not 0 <= position < T - 1:
        raise ValueError(f"position {position} has no next token (positions 0..{T - 2} for {T} tokens)")
    E = mixtral.args.n_experts
    prefix = tokens[:position + 1].long()  # later tokens cannot change this position's prediction
    target = int(tokens[position + 1])
    # the router's own choice and probabilities at (layer, position), through the model's own rule
    own = {}
    block = mixtral.blocks[_block_index(mixtral, layer)]

    def grab_probs(mod, inputs, out):
        own["probs"] = out[-1].float()  # (N, E): the row of `position` is last

    def grab_idx(mod, inputs, out):
        own["idx"] = out[-1]
    handles = [block.moe.hook_router_probs.register_forward_hook(grab_probs),
               block.moe.hook_topk_indices.register_forward_hook(grab_idx)]
    try:
        plain = _next_logprob(model, prefix[None], target)[0]
    finally:
        for h in handles:
            h.remove()
    chosen = tuple(sorted(int(e) for e in own["idx"].tolist()))
    subsets = list(itertools.combinations(range(E), len(own["idx"])))
    out = []
    for s in range(0, len(subsets), batch_size):
        part = torch.tensor(subsets[s:s + batch_size], device=device)  # (R, k)
        R = len(part)
        rows = torch.arange(R, device=device) * (position + 1) + position  # each copy's last token
        with intervene(model, _RouteRows(layer, rows, part)):
            out.append(_next_logprob(model, prefix[None].expand(R, -1), target))
    logprob = torch.cat(out).cpu().numpy()
    p = own["probs"].cpu()
    rows = []
    for j, sub in enumerate(subsets):
        w = p[list(sub)] / p[list(sub)].sum()
        rows.append({"experts": sub, "weights": tuple(round(float(x), 6) for x in w), "logprob": float(logprob[j]),
                     "router_choice": sub == chosen})
    df = pd.DataFrame(rows).sort_values("logprob", ascending=False, kind="stable").reset_index(drop=True)
    df["rank"] = np.arange(1, len(df) + 1)
    df.attrs.update({"layer": layer, "position": position, "target": target, "plain_logprob": float(plain), "experts_per_token": len(chosen)})
    return df


def _next_logprob(model, tokens: Tensor, target: int) -> Tensor:
    """log p(target | tokens) at the last position of each row (R,)."""
    _, call = unwrap(model)
    logits = call(tokens)[:, -1].float()  # (R, V)
    return logits.log_softmax(-1)[:, target]
