"""Exercises of notebook 07 · Training a tiny MoE.

Each checker takes the learner's answer and the inputs the exercise gave (router logits, a number
of layers, snapshot indices), computes the reference with moe_lab's own code (the functions the
training loop calls), and says what kind of wrong an answer is (never the reference value), with a
nudge and the method as a second hint. 07.1 and 07.5 are by hand: they take the learner's function and
run it on inputs of their own, with the library function switched off.

* 07.1 :func:`check_expert_fraction`   f_e, the fraction of tokens whose top-k contains expert e

* 07.2 :func:`check_load_balancing`    one layer's load-balancing loss E * sum_e f_e * P_e
* 07.3 :func:`check_effective_coefficient`  what the per-layer *sum* does to the coefficient
* 07.4 :func:`check_z_loss`            ST-MoE's router z-loss
* 07.5 :func:`check_router_saturation` OLMoE's router saturation from router snapshots
* 07.6 :func:`check_closer_to_k` (multiple choice, from the data), 07.7 :func:`check_random_saturation` (a number): graded questions.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..model import load_balancing_loss, router_z_loss
from ..analysis.stats import router_saturation as _stats_saturation
from ..train import router_saturation
from .arrays import matches, mismatch, to_array
from .byhand import run_by_hand
from .feedback import Feedback, correct, is_todo, todo, wrong
from .questions import choice, in_range


def _fraction(router_logits: torch.Tensor, k: int) -> torch.Tensor:
    """[N, E] logits -> [E] share of tokens whose top-k holds e (the f of load_balancing_loss)."""
    E = router_logits.shape[-1]
    return F.one_hot(router_logits.float().topk(k, dim=-1).indices, E).sum(1).float().mean(0)


def check_expert_fraction(fn, router_logits: torch.Tensor, k: int) -> Feedback:
    """07.1, by hand: ``fn(router_logits, k) -> [E]``: your function; for every expert, the fraction of
    the N tokens (rows of ``router_logits`` [N, E], one layer) whose top-k experts contain it. The
    checker runs ``fn`` on router logits of its own and on ``router_logits``, with the library's loss
    functions switched off."""
    name = "Exercise 07.1 (f_e)"
    hint = "a token counts once for *each* of its k experts; f is a share of tokens."
    method = ("torch.topk(router_logits, k).indices gives each token's k experts; F.one_hot(...) turns them into "
              "0/1 rows (sum over the k slots) you can average over tokens.")
    E = router_logits.shape[-1]
    g = torch.Generator().manual_seed(7)
    fresh = torch.randn(50, E, generator=g) * 2 + torch.linspace(0, 3, E)
    for logits in (fresh, router_logits.detach()):
        answer, bad = run_by_hand(name, fn, (logits.clone(), k), forbidden=[load_balancing_loss, router_saturation],
                                  hint=hint, method=method, what="function fn(router_logits, k) -> tensor [E]")
        if bad is not None:
            return bad
        expected = _fraction(logits, k)
        problem = mismatch(expected, answer, labels=("expert",))
        if problem is None:
            continue
        got = to_array(answer)
        if got is not None and matches(expected / k, got):
            return wrong(name, "your f sums to 1: that is the share of the N*k (token, slot) assignments, f_e / k.",
                         "f_e counts a token once for every expert in its top-k, so sum_e f_e = k: divide by N, not "
                         "N*k.", method)
        if got is not None and matches(_fraction(logits, 1), got):
            return wrong(name, "you counted only each token's first choice (top-1).",
                         f"the top-k set has k = {k} experts: use topk(k).", method)
        if got is not None and matches(expected * logits.shape[0], got):
            return wrong(name, "these are counts of tokens; f is a share (divide by the number of tokens).", hint,
                         method)
        return wrong(name, problem + " (on the checker's router logits)" * (logits is fresh), hint, method)
    return correct(name, f"right on the checker's router logits and on yours; f sums to k = {k}: every token counts "
                         f"once for each of its {k} experts.")


def check_load_balancing(answer, router_logits: torch.Tensor, k: int) -> Feedback:
    """07.2: ``answer`` (a number): E * sum_e f_e * P_e for one layer's ``router_logits`` [N, E],
    with P_e the mean router probability (softmax over all E) of expert e."""
    name = "Exercise 07.2 (load-balancing loss)"
    if is_todo(answer):
        return todo(name, "you have f from 07.1; P_e is a mean probability.",
                    "P_e = mean over tokens of the softmax (over the E experts) of the router logits; then "
                    "E * sum_e f_e P_e.")
    E = router_logits.shape[-1]
    expected = load_balancing_loss([router_logits], E, k)
    problem = mismatch(expected, answer)
    if problem is None:
        return correct(name, f"{float(expected):.4f}; it would be exactly k = {k} if every f_e were k/E and "
                             f"every P_e 1/E.")
    f = _fraction(router_logits, k)
    if matches(E * (f / k * router_logits.float().softmax(-1).mean(0)).sum(), answer):
        return wrong(name, "your value is the loss divided by k: f was the share of assignments (sums to 1).",
                     "use f_e = fraction of tokens whose top-k contains e (sums to k), as in 07.1.")
    if matches(E * (f * router_logits.float().mean(0)).sum(), answer):
        return wrong(name, "P_e must be a probability: you averaged the raw logits.",
                     "softmax the logits over the E experts first, then average over tokens.")
    if matches((f * router_logits.float().softmax(-1).mean(0)).sum(), answer):
        return wrong(name, "you left out the factor E.", f"multiply by the number of experts, E = {E}.")
    return wrong(name, problem, "f from 07.1 (sums to k), P a mean probability (sums to 1), and the factor E.",
                 "P_e = mean over tokens of the softmax (over the E experts) of the router logits; then "
                 "E * sum_e f_e P_e.")


def check_effective_coefficient(answer, coef: float, n_layers: int) -> Feedback:
    """07.3: ``answer`` (a number): training with ``coef * sum over layers of each layer's loss``
    pushes on the balance as hard as transformers' ``coef_hf * pooled loss`` with which coef_hf?
    (Both losses are k at perfect balance, and the pooled loss moves like the mean of the layers'.)"""
    name = "Exercise 07.3 (effective coefficient)"
    if is_todo(answer):
        return todo(name, "the pooled loss moves like the mean of the layers' losses; what is a sum of n terms?",
                    "write the sum over layers as n_layers times the mean over layers: the coefficient in front of "
                    "the mean is then the one that compares with transformers' pooled loss.")
    expected = coef * n_layers
    problem = mismatch(expected, answer, atol=1e-9, rtol=1e-6)
    if problem is None:
        return correct(name, f"{coef:g} x {n_layers} layers = {expected:g}: the same coefficient is {n_layers} times "
                             f"stronger when the layers' losses are summed (and the summed term is k x {n_layers} "
                             f"at balance).")
    if matches(coef, answer, atol=1e-12, rtol=1e-9):
        return wrong(name, f"{coef:g} is the coefficient on each layer's term; there are {n_layers} such terms.",
                     "sum over layers = n_layers x mean over layers, and the mean behaves like the pooled loss.")
    if matches(coef / n_layers, answer, atol=1e-12, rtol=1e-9):
        return wrong(name, "you divided by the number of layers; a sum makes the pressure larger, not smaller.",
                     "sum over layers = n_layers x mean over layers.")
    return wrong(name, problem, "the pooled loss moves like the mean of the layers' losses; what is a sum of n terms?",
                 "sum over layers = n_layers x mean over layers.")


def check_z_loss(answer, router_logits: torch.Tensor) -> Feedback:
    """07.4: ``answer`` (a number): ST-MoE's router z-loss of one layer's ``router_logits`` [N, E],
    the mean over tokens of (log sum_e exp(logit_e))^2."""
    name = "Exercise 07.4 (z-loss)"
    if is_todo(answer):
        return todo(name, "one number per token (its log-sum-exp), squared, then a mean over tokens.",
                    "torch has a numerically stable log-sum-exp; reduce it over the experts axis.")
    expected = router_z_loss([router_logits])
    problem = mismatch(expected, answer)
    if problem is None:
        return correct(name, f"{float(expected):.4f}. It is small only when every token's log-sum-exp is near 0, "
                             f"so it keeps the router's logits from growing (at all-zero logits it is (ln E)^2).")
    lg = router_logits.float()
    if matches(lg.logsumexp(-1).mean(), answer):
        return wrong(name, "you forgot the square.", "square each token's log-sum-exp, then average.")
    if matches(lg.logsumexp(-1).mean() ** 2, answer):
        return wrong(name, "you squared the mean; the loss is the mean of the squares.",
                     "square each token's log-sum-exp first, then average over tokens.")
    if matches(lg.amax(-1).pow(2).mean(), answer):
        return wrong(name, "you used the largest logit, not the log-sum-exp.",
                     "torch has a numerically stable log-sum-exp; reduce it over the experts axis.")
    return wrong(name, problem, "one number per token (its log-sum-exp), squared, then a mean over tokens.",
                 "torch has a numerically stable log-sum-exp; reduce it over the experts axis.")


def _fresh_snapshots(S: int, L: int, k: int, E: int, seed: int = 7) -> np.ndarray:
    """[S, L, N, k] top-k experts of probe tokens that drift towards the last snapshot's choices."""
    rng = np.random.default_rng(seed)
    N = 30
    final = np.stack([[rng.choice(E, size=k, replace=False) for _ in range(N)] for _ in range(L)])  # [L, N, k]
    out = np.empty((S, L, N, k), dtype=np.int64)
    for s in range(S):
        for l in range(L):
            for t in range(N):
                keep = rng.random() < (s + 1) / S
                out[s, l, t] = final[l, t] if keep else rng.choice(E, size=k, replace=False)
    out[-1] = final
    return out


def check_router_saturation(fn, snapshot_indices) -> Feedback:
    """07.5, by hand: ``fn(idx) -> [S, L]``: your function; for every snapshot s and layer l, the mean
    over probe tokens of |top-k at s ∩ top-k at the last snapshot| / k, from ``idx`` [S, L, N, k]. The
    checker runs ``fn`` on snapshots of its own and on ``snapshot_indices``, with
    ``router_saturation`` switched off."""
    name = "Exercise 07.5 (router saturation)"
    hint = "every snapshot is compared with the final one, token by token, as sets of k experts."
    method = ("for each token, count how many of its final k experts (idx[-1]) are among its k experts at snapshot "
              "s (one-hot over the experts, then an AND), divide by k, average over tokens.")
    idx0 = np.asarray(snapshot_indices)
    S, L, _, k = idx0.shape
    E = max(int(idx0.max()) + 1, k + 2)
    for idx in (_fresh_snapshots(max(S, 3), L, k, E), idx0):
        answer, bad = run_by_hand(name, fn, (idx.copy(),), forbidden=[router_saturation, _stats_saturation],
                                  hint=hint, method=method, what="function fn(idx) -> array [snapshots, layers]")
        if bad is not None:
            return bad
        expected = router_saturation(idx)
        problem = mismatch(expected, answer, labels=("snapshot", "layer"))
        if problem is None:
            continue
        reverse = router_saturation(idx[::-1].copy())[::-1]
        if matches(reverse, answer):
            return wrong(name, "you compared with the first snapshot; saturation compares with the final router.",
                         "use idx[-1] (the final model) as the reference.", method)
        if matches(expected * k, answer):
            return wrong(name, "your values are counts of shared experts (up to k); divide by k.",
                         "saturation is a share: |overlap| / k.", method)
        return wrong(name, problem, hint, method)
    return correct(name, "right on the checker's snapshots and on yours; the last row is 1 by definition; the first "
                         "is near chance, k/E, for an untrained router.")


# --------------------------------------------------------------------------- 07.6-07.7: graded questions


def check_closer_to_k(answer, logits_without: torch.Tensor, logits_with: torch.Tensor, k: int) -> Feedback:
    """Exercise 07.6 (multiple choice): whose last-layer load-balancing loss is closer to the balanced
    value k: (a) the model trained with the loss, (b) the model trained without it? Worked out from the
    two logits."""
    name = "Exercise 07.6 (which is closer to k?)"
    E = logits_with.shape[-1]
    gap = [abs(float(load_balancing_loss([lg.float()], E, k)) - k) for lg in (logits_with, logits_without)]
    right = "a" if gap[0] < gap[1] else "b"
    options = {"a": "the model trained with the load-balancing loss",
               "b": "the model trained without it"}
    why = {"a": "The loss did its job on this layer: its value is near k, where every expert gets k/E of the tokens.",
           "b": "On this layer the run without the loss happens to be closer to balance: one layer and one run are "
                "not the whole story (§4's heatmaps show every layer)."}[right]
    why_not = {"a": "compute E * sum_e f_e * P_e for logits_with[-1] too (07.2's method) and compare both with k.",
               "b": "compute E * sum_e f_e * P_e for logits_with[-1] too (07.2's method) and compare both with k."}
    return choice(name, answer, options, right, {x: v for x, v in why_not.items() if x != right}, why=why,
                  hint="07.2 gave one of the two values; compute the other the same way.",
                  method="the loss is k at perfect balance and grows as the load concentrates: compare |value - k|.")


def check_random_saturation(answer, n_experts: int) -> Feedback:
    """Exercise 07.7 (a number): the router saturation a random top-1 router would score against the
    final router (the expected share of tokens whose single expert is the final one)."""
    name = "Exercise 07.7 (a random router's saturation)"
    ref = 1 / n_experts
    return in_range(name, answer, ref - 0.005, ref + 0.005,
                    diagnoses=[(lambda v: abs(v - 2 / n_experts) < 0.005, "that is the chance level of a top-2 "
                                "router; with one expert per token the overlap is smaller."),
                               (lambda v: abs(v) < 1e-9, "a random expert still matches the final one sometimes."),
                               (lambda v: v > 1, "saturation is a share, between 0 and 1.")],
                    why="Saturation curves start near chance, k/E, and climb to 1 as the router settles.",
                    hint="a random expert among E matches one given expert how often?",
                    method="for top-k the expected overlap of two random k-sets is k * k / E experts, divided by k: k/E; "
                           "here k = 1.")
