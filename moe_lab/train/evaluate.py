"""Measuring a model on the held-out corpus: what the training log and the model card report.

* cross-entropy per domain, next to a unigram baseline of that domain's training tokens;
* routing: the experts chosen for held-out tokens, traced with :func:`moe_lab.trace_routing` and
  summarised with :mod:`moe_lab.analysis` -- the same calls as notebook 06, so the card and the
  notebook cannot disagree about what "load" or "repetition" means;
* greedy samples, and the quality bar the demo model has to pass.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.nn.functional as F

from ..analysis import expert_load, expert_load_by_domain, load_balance, repetition
from ..model import Mixtral
from ..routing.trace import RoutingTrace
from ..routing.tracing import trace_routing
from .data import IGNORE, TokenData, inputs_targets, pack_windows, spread

# --------------------------------------------------------------------------------------------
# Cross-entropy


@torch.no_grad()
def heldout_ce(model: Mixtral, heldout: dict[str, np.ndarray], bos_id: int, batch_size: int = 8,
               autocast=None) -> dict[str, float]:
    """Held-out cross-entropy (nats per token) per domain over windows [n, T+1]; BOS targets not scored."""
    was_training = model.training
    model.eval()
    device = model.output.weight.device
    ce = {}
    try:
        for d, w in heldout.items():
            total, n = 0.0, 0
            for i in range(0, len(w), batch_size):
                x, y = inputs_targets(w[i:i + batch_size], bos_id)
                x, y = x.to(device), y.to(device)
                with autocast or contextlib.nullcontext():
                    logits = model(x)  # (B, T, V)
                mask = y != IGNORE
                total += float(F.cross_entropy(logits.float()[mask], y[mask], reduction="sum"))
                n += int(mask.sum())
            ce[d] = total / max(n, 1)
    finally:
        model.train(was_training)
    return ce


# --------------------------------------------------------------------------------------------
# Routing: traced with trace_routing, summarised with moe_lab.analysis


def trace_windows(model: Mixtral, windows: dict[str, np.ndarray], batch_size: int = 8) -> RoutingTrace:
    """Routing of the model inputs of windows [n, T+1] (each window one document of its domain)."""
    docs = {d: list(w[:, :-1]) for d, w in windows.items() if len(w)}
    return trace_routing(model, docs, batch_size=batch_size, progress=False)


def evaluate_heldout(model: Mixtral, heldout: dict[str, np.ndarray], bos_id: int, batch_size: int = 8,
                     max_windows: int | None = None, autocast=None,
                     routing: bool = False) -> tuple[dict[str, float], dict[str, list]]:
    """Held-out cross-entropy per domain on ``max_windows`` windows per domain (evenly spread; all
    when None) and, with ``routing``, the expert load per domain [L][E] on the same windows
    (:func:`moe_lab.analysis.expert_load_by_domain`)."""
    windows = {d: w[spread(len(w), max_windows)] if max_windows else w for d, w in heldout.items()}
    ce = heldout_ce(model, windows, bos_id, batch_size, autocast)
    if not routing:
        return ce, {}
    by_domain = expert_load_by_domain(trace_windows(model, windows, batch_size))
    return ce, {d: by_domain[d].tolist() for d in windows}


def routing_snapshot(model: Mixtral, probe: torch.Tensor) -> np.ndarray:
    """Top-k experts chosen for every probe token [P, T] in every layer: uint8 [L, P*T, k]."""
    trace = trace_routing(model, probe, batch_size=len(probe), progress=False)
    return trace.expert_ids.astype(np.uint8)


def load_summary(shares: np.ndarray) -> dict:
    """min, max, CV and normalised entropy of expert shares [..., E] (each row sums to 1), row by
    row: :func:`moe_lab.analysis.load_balance` plus the extremes."""
    s = np.asarray(shares, dtype=np.float64)
    bal = load_balance(s)
    out = {"min": s.min(-1), "max": s.max(-1), "cv": bal.cv, "entropy": bal.normalized_entropy}
    return {k: (v.reshape(s.shape[:-1]) if s.ndim > 1 else v.reshape(())).tolist() for k, v in out.items()}


def heldout_documents(token_data: TokenData, max_docs: int = 64, max_len: int = 256) -> dict[str, list[np.ndarray]]:
    """Per domain, up to ``max_docs`` held-out documents (BOS first) spread over the held-out set,
    truncated to ``max_len`` tokens; documents shorter than 3 tokens are left out."""
    out = {}
    for d in token_data.domains:
        docs = token_data.documents("heldout", d)
        picked = [docs[i][:max_len].astype(np.int64) for i in spread(len(docs), max_docs)]
        out[d] = [x for x in picked if len(x) >= 3]
    return out


def routing_report(trace: RoutingTrace, bos_id: int, n_boot: int = 1000, seed: int = 0) -> dict:
    """The card's routing numbers, computed from ``trace`` exactly as notebook 06 does: expert load
    (:func:`~moe_lab.analysis.expert_load`, BOS tokens included as the model routes them) and
    consecutive-token repetition (:func:`~moe_lab.analysis.repetition`, pairs starting at BOS
    left out) of the first choice and of any of the top-k, with their baselines."""
    load = expert_load(trace)  # [L, E]
    first = repetition(trace, "first", bos_id=bos_id, n_boot=n_boot, seed=seed)
    anyk = repetition(trace, "any", bos_id=bos_id, n_boot=n_boot, seed=seed)
    rep = [{"layer": layer, "rate": float(first.rate[i]), "ci": [float(first.ci_low[i]), float(first.ci_high[i])],
            "uniform": float(first.uniform), "marginal": float(first.marginal[i]),
            "shuffled": float(first.shuffled[i]), "above_marginal": bool(first.above_marginal()[i]),
            "any_rate": float(anyk.rate[i]), "any_ci": [float(anyk.ci_low[i]), float(anyk.ci_high[i])],
            "any_uniform": float(anyk.uniform), "any_marginal": float(anyk.marginal[i]), "n_pairs": int(first.n_pairs)}
           for i, layer in enumerate(first.layers)]
    return {"load": load.tolist(), "load_by_domain": {d: v.tolist() for d, v in expert_load_by_domain(trace).items()},
            "load_summary": load_summary(load), "repetition": rep,
            "routing_tokens": trace.n_tokens, "routing_docs": trace.n_docs}


# --------------------------------------------------------------------------------------------
# Baselines and samples


def unigram_baseline(token_data: TokenData, heldout: dict[str, np.ndarray], vocab_size: int) -> dict[str, float]:
    """Per domain: cross-entropy on the held-out targets of the unigram model of that domain's
    training tokens, add-one smoothed over the whole vocabulary (BOS neither counted nor scored)."""
    out = {}
    bos = token_data.bos_id
    for d, w in heldout.items():
        logp = unigram_logprobs(token_data, d, vocab_size)
        y = w[:, 1:].reshape(-1)
        y = y[y != bos]
        out[d] = float(-logp[y].mean())
    return out


def unigram_logprobs(token_data: TokenData, domain: str, vocab_size: int) -> np.ndarray:
    """[V] log-probabilities of the add-one smoothed unigram model of ``domain``'s training tokens (BOS left out)."""
    train = token_data.tokens["train"][domain].astype(np.int64)
    counts = np.bincount(train[train != token_data.bos_id], minlength=vocab_size).astype(np.float64) + 1.0
    return np.log(counts / counts.sum())


def classify_domain(ids, logprobs: dict[str, np.ndarray]) -> str:
    """The domain whose unigram model gives ``ids`` the highest likelihood (naive Bayes, equal priors):
    an objective stand-in for "a reader would recognise this text as that domain"."""
    ids = np.asarray(ids, dtype=np.int64)
    return max(logprobs, key=lambda d: float(logprobs[d][ids].sum()))


IN_DOMAIN_CHECK = ("python", "math")  # the domains whose greedy samples the quality bar checks


DEFAULT_PROMPTS = {
    "python": "def fibonacci(n):\n",
    "math": "Question: What is 17 + 25?\nAnswer:",
}


@torch.no_grad()
def greedy_samples(model: Mixtral, tokenizer, token_data: TokenData, prompt_tokens: int = 24,
                   new_tokens: int = 48, extra_prompts: dict[str, str] | None = None) -> list[dict]:
    """Greedy continuation of the start of the first held-out document of each domain (and of
    ``extra_prompts``, by default a code and a math prompt)."""
    out = []
    prompts = []
    for d in token_data.domains:
        doc = token_data.documents("heldout", d)[0]
        prompts.append((d, "held-out document start", doc[:prompt_tokens].astype(np.int64).tolist()))
    for d, text in (DEFAULT_PROMPTS if extra_prompts is None else extra_prompts).items():
        prompts.append((d, "hand-written", tokenizer.encode(text, bos=True)))
    for d, kind, ids in prompts:
        ids = ids[:model.args.max_seq_len // 2]
        n_new = min(new_tokens, model.args.max_seq_len - len(ids))
        new = model.generate([ids], max_new_tokens=n_new, temperature=0.0)[0, len(ids):].tolist()
        out.append({"domain": d, "kind": kind, "prompt": tokenizer.decode(ids), "continuation": tokenizer.decode(new),
                    "continuation_ids": new})
    return out


@torch.no_grad()
def evaluate_model(model: Mixtral, token_data: TokenData, tokenizer, *, seq_len: int = 256,
                   eval_tokens_per_domain: int | None = None, n_boot: int = 1000, seed: int = 0,
                   samples: bool = True, max_docs: int = 64) -> dict:
    """Everything the model card reports, as a JSON-able dict (see :func:`quality_bar`)."""
    model = model.float().eval()
    report = cross_entropy_report(model, token_data, seq_len, eval_tokens_per_domain)
    trace = trace_routing(model, heldout_documents(token_data, max_docs, seq_len), batch_size=8, progress=False)
    report.update(routing_report(trace, token_data.bos_id, n_boot, seed))
    report.update(n_layers=trace.n_layers, n_experts=model.args.n_experts, top_k=model.args.top_k, n_boot=n_boot,
                  routing_max_len=seq_len)
    if samples:
        report["samples"] = classified_samples(model, tokenizer, token_data)
    report["quality_bar"] = quality_bar(report)
    return report


def cross_entropy_report(model: Mixtral, token_data: TokenData, seq_len: int,
                         eval_tokens_per_domain: int | None = None) -> dict:
    """Held-out CE per domain (windows of ``seq_len`` as in training), the unigram CE and their ratio."""
    max_windows = max(1, eval_tokens_per_domain // seq_len) if eval_tokens_per_domain else None
    heldout = {d: pack_windows(token_data, "heldout", d, seq_len, max_windows=max_windows) for d in token_data.domains}
    ce = heldout_ce(model, heldout, token_data.bos_id)
    uni = unigram_baseline(token_data, heldout, model.args.vocab_size)
    return {"heldout_ce": ce, "unigram_ce": uni, "ce_ratio": {d: ce[d] / uni[d] for d in ce},
            "heldout_tokens_scored": {d: int((heldout[d][:, 1:] != token_data.bos_id).sum()) for d in heldout}}


def classified_samples(model: Mixtral, tokenizer, token_data: TokenData) -> list[dict]:
    """:func:`greedy_samples`, each with the domain its continuation reads as (:func:`classify_domain`)."""
    samples = greedy_samples(model, tokenizer, token_data)
    logprobs = {d: unigram_logprobs(token_data, d, model.args.vocab_size) for d in token_data.domains}
    for smp in samples:
        smp["classified_as"] = classify_domain(smp["continuation_ids"], logprobs)
    return samples


def quality_bar(report: dict) -> dict:
    """The demo model's acceptance criteria, each with its verdict. Greedy samples being in-domain
    is checked with :func:`classify_domain` on the code and math samples (``IN_DOMAIN_CHECK``
    domains the corpus has); a reader of the card should still look at them."""
    ratios = report["ce_ratio"]
    shares = np.asarray(report["load"])
    above = [r["above_marginal"] for r in report["repetition"]]
    bar = {
        "ce_at_most_70pct_of_unigram": {"pass": all(v <= 0.70 for v in ratios.values()),
                                        "worst": max(ratios, key=ratios.get), "worst_ratio": max(ratios.values())},
        "load_between_2_and_40pct": {"pass": bool(shares.min() >= 0.02 and shares.max() <= 0.40),
                                     "min": float(shares.min()), "max": float(shares.max())},
        "repetition_above_marginal_in_half_the_layers": {"pass": sum(above) >= len(above) / 2,
                                                         "layers_above": [i for i, a in enumerate(above) if a]},
    }
    checked = [x for x in report.get("samples", []) if x["domain"] in IN_DOMAIN_CHECK and "classified_as" in x
               and x["domain"] in report["ce_ratio"]]
    if checked:
        bar["code_math_samples_in_domain"] = {
            "pass": all(x["classified_as"] == x["domain"] for x in checked),
            "in_domain": {d: f"{sum(x['classified_as'] == d for x in checked if x['domain'] == d)}/"
                             f"{sum(x['domain'] == d for x in checked)}" for d in dict.fromkeys(x["domain"] for x in checked)}}
    bar["all_pass"] = all(v["pass"] for v in bar.values())
    return bar

