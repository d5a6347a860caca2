"""Exercises of notebook 07 · Training a tiny MoE.

Each checker takes the learner's answer and the inputs the exercise gave (router logits, a number
of layers, snapshot indices), computes the reference with moe_lab's own code (the functions the
training loop calls), and says what is wrong with a hint.

* 07.1 :func:`check_expert_fraction`   f_e, the fraction of tokens whose top-k contains expert e
* 07.2 :func:`check_load_balancing`    one layer's load-balancing loss E * sum_e f_e * P_e
* 07.3 :func:`check_effective_coefficient`  what the per-layer *sum* does to the coefficient
* 07.4 :func:`check_z_loss`            ST-MoE's router z-loss
* 07.5 :func:`check_router_saturation` OLMoE's router saturation from router snapshots
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..model import load_balancing_loss, router_z_loss
from ..train import router_saturation
from .arrays import matches, mismatch, to_array
from .feedback import Feedback, correct, is_todo, todo, wrong


def _fraction(router_logits: torch.Tensor, k: int) -> torch.Tensor:
    """[N, E] logits -> [E] share of tokens whose top-k holds e (the f of load_balancing_loss)."""
    E = router_logits.shape[-1]
    return F.one_hot(router_logits.float().topk(k, dim=-1).indices, E).sum(1).float().mean(0)


def check_expert_fraction(answer, router_logits: torch.Tensor, k: int) -> Feedback:
    """07.1: ``answer`` [E]: for every expert, the fraction of the N tokens (rows of
    ``router_logits`` [N, E], one layer) whose top-k experts contain it."""
    name = "Exercise 07.1 (f_e)"
    if is_todo(answer):
        return todo(name, "torch.topk(router_logits, k).indices gives each token's k experts; "
                          "F.one_hot(...) turns them into 0/1 rows you can average.")
    expected = _fraction(router_logits, k)
    problem = mismatch(expected, answer, labels=("expert",))
    if problem is None:
        return correct(name, f"f sums to {float(expected.sum()):.3g} = k: every token counts once for each of "
                             f"its {k} experts.")
    got = to_array(answer)
    if got is not None and matches(expected / k, got):
        return wrong(name, f"your f sums to 1: that is the share of the N*k (token, slot) assignments, f_e / k.",
                     "f_e counts a token once for every expert in its top-k, so sum_e f_e = k: divide by N, not N*k.")
    if got is not None and matches(_fraction(router_logits, 1), got):
        return wrong(name, "you counted only each token's first choice (top-1).",
                     f"the top-k set has k = {k} experts: use topk(k).")
    return wrong(name, problem, "one row per token: which experts are in its top-k (0/1), then the mean over tokens.")


def check_load_balancing(answer, router_logits: torch.Tensor, k: int) -> Feedback:
    """07.2: ``answer`` (a number): E * sum_e f_e * P_e for one layer's ``router_logits`` [N, E],
    with P_e the mean router probability (softmax over all E) of expert e."""
    name = "Exercise 07.2 (load-balancing loss)"
    if is_todo(answer):
        return todo(name, "P = router_logits.softmax(-1).mean(0); combine it with your f from 07.1.")
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
    return wrong(name, problem, "E * (f * P).sum() with f from 07.1 and P the mean softmax probability.")


def check_effective_coefficient(answer, coef: float, n_layers: int) -> Feedback:
    """07.3: ``answer`` (a number): training with ``coef * sum over layers of each layer's loss``
    pushes on the balance as hard as transformers' ``coef_hf * pooled loss`` with which coef_hf?
    (Both losses are k at perfect balance, and the pooled loss moves like the mean of the layers'.)"""
    name = "Exercise 07.3 (effective coefficient)"
    if is_todo(answer):
        return todo(name, "write the sum over layers as n_layers times the mean over layers.")
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
    return wrong(name, problem, "sum over layers = n_layers x mean over layers.")


def check_z_loss(answer, router_logits: torch.Tensor) -> Feedback:
    """07.4: ``answer`` (a number): ST-MoE's router z-loss of one layer's ``router_logits`` [N, E],
    the mean over tokens of (log sum_e exp(logit_e))^2."""
    name = "Exercise 07.4 (z-loss)"
    if is_todo(answer):
        return todo(name, "torch.logsumexp(router_logits, dim=-1) gives one number per token.")
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
        return wrong(name, "you used the largest logit, not the log-sum-exp.", "torch.logsumexp(logits, dim=-1).")
    return wrong(name, problem, "(torch.logsumexp(router_logits, -1) ** 2).mean().")


def check_router_saturation(answer, snapshot_indices) -> Feedback:
    """07.5: ``answer`` [S, L]: for every snapshot s and layer l, the mean over probe tokens of
    |top-k at s ∩ top-k at the last snapshot| / k, from ``snapshot_indices`` [S, L, N, k]."""
    name = "Exercise 07.5 (router saturation)"
    if is_todo(answer):
        return todo(name, "compare every snapshot with the last one, idx[-1]: for each token, how many of its "
                          "final k experts are among its k experts at snapshot s?")
    idx = np.asarray(snapshot_indices)
    expected = router_saturation(idx)
    problem = mismatch(expected, answer, labels=("snapshot", "layer"))
    if problem is None:
        return correct(name, "the last row is 1 by definition; the first is near chance, k/E, for an untrained router.")
    k = idx.shape[-1]
    reverse = router_saturation(idx[::-1].copy())[::-1]
    if matches(reverse, answer):
        return wrong(name, "you compared with the first snapshot; saturation compares with the final router.",
                     "use idx[-1] (the final model) as the reference.")
    if matches(expected * k, answer):
        return wrong(name, "your values are counts of shared experts (up to k); divide by k.",
                     "saturation is a share: |overlap| / k.")
    return wrong(name, problem, "saturation[s, l] = mean over tokens of |set(idx[s, l, t]) & set(idx[-1, l, t])| / k.")
