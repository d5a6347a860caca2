"""Exercises of notebook 09 · Real MoEs and offloading.

* 09.1 :func:`check_hindsight_gap`    how much of a frequency placement's hit rate was hindsight
* 09.2 :func:`check_decode_speed`     tokens/s of Mixtral 8x7B offloaded, from bytes and bandwidths
* 09.3 :func:`check_prefetch_recall`  speculative prefetch's recall, by hand from its guesses
* 09.4 :func:`check_any_uniform`      Table 5's "any" chance level for any top-k of E
"""

from __future__ import annotations

import numpy as np

from ..analysis import decode_time, moe_bytes, policy_comparison, uniform_repetition
from .arrays import matches, mismatch
from .feedback import Feedback, correct, is_todo, todo, wrong


def _frequency_hit_rate(trace, budget: int, profile) -> float:
    pc = policy_comparison(trace, budgets=[budget], policies=("frequency",), profile=profile)
    return float(pc.hit_rate.iloc[0])


def check_hindsight_gap(answer, trace, budget: int, profile) -> Feedback:
    """09.1: ``answer`` (a number): the hit rate of the ``frequency`` placement on ``trace`` at
    ``budget`` experts per layer when its frequencies come from ``trace`` itself
    (``profile=None``: hindsight) minus the hit rate when they come from ``profile``."""
    name = "Exercise 09.1 (hindsight)"
    if is_todo(answer):
        return todo(name, "A.policy_comparison(trace, budgets=[budget], policies=['frequency'], profile=...) "
                          "once with profile=None and once with the profile trace.")
    hind, fair = _frequency_hit_rate(trace, budget, None), _frequency_hit_rate(trace, budget, profile)
    gap = hind - fair
    problem = mismatch(gap, answer, atol=1e-9, rtol=1e-6)
    if problem is None:
        return correct(name, f"{hind:.1%} with hindsight vs {fair:.1%} profiled on other text: "
                             f"{gap:+.1%} was hindsight.")
    if matches(-gap, answer, atol=1e-9, rtol=1e-6):
        return wrong(name, "the sign is flipped: hindsight minus fair.", "profile=None minus profile=profile.")
    if matches(hind, answer, atol=1e-9, rtol=1e-6) or matches(fair, answer, atol=1e-9, rtol=1e-6):
        return wrong(name, "that is one of the two hit rates, not their difference.", "subtract the fair one.")
    return wrong(name, problem, f"use budget {budget} and the 'frequency' policy for both.")


def check_decode_speed(answer, *, hit_rate: float, precision: str, link, memory) -> Feedback:
    """09.2: ``answer`` (a number): tokens per second of Mixtral 8x7B decoding at batch 1 with
    experts at ``precision``, ``hit_rate`` of the expert reads served from ``memory`` and the
    misses from ``link`` (``A.moe_bytes`` then ``A.decode_time``)."""
    name = "Exercise 09.2 (decode speed)"
    if is_todo(answer):
        return todo(name, "sizes = A.moe_bytes('mixtral-8x7b', precision); misses per token = n_layers x k x "
                          "(1 - hit rate); then A.decode_time(sizes, misses, link, memory)['tokens_per_s'].")
    sizes = moe_bytes("mixtral-8x7b", precision)
    misses = sizes.n_layers * sizes.experts_per_token * (1 - hit_rate)
    t = decode_time(sizes, misses, link, memory)
    problem = mismatch(t["tokens_per_s"], answer, atol=1e-6, rtol=1e-4)
    if problem is None:
        return correct(name, f"{t['tokens_per_s']:.2f} tokens/s: {t['resident_s'] * 1e3:.0f} ms reading resident "
                             f"weights + {t['demand_s'] * 1e3:.0f} ms fetching {misses:.1f} missed experts per token.")
    if matches(t["seconds"], answer, atol=1e-6, rtol=1e-4):
        return wrong(name, "that is seconds per token.", "tokens per second is its inverse.")
    if matches(decode_time(sizes, sizes.n_layers * sizes.experts_per_token * hit_rate, link, memory)["tokens_per_s"],
               answer, atol=1e-6, rtol=1e-4):
        return wrong(name, "you counted the hits as misses.", "misses per token = n_layers x k x (1 - hit rate).")
    if matches(decode_time(sizes, (1 - hit_rate), link, memory)["tokens_per_s"], answer, atol=1e-6, rtol=1e-4):
        return wrong(name, "misses per token must count every layer's k expert reads.",
                     f"{sizes.n_layers} layers x {sizes.experts_per_token} experts x (1 - hit rate).")
    for other in ("fp16", "4bit", "int8", "3bit"):
        if other != precision and matches(decode_time(moe_bytes("mixtral-8x7b", other), misses, link, memory)
                                          ["tokens_per_s"], answer, atol=1e-6, rtol=1e-4):
            return wrong(name, f"you used {other} weights; the exercise is {precision}.",
                         f"A.moe_bytes('mixtral-8x7b', '{precision}').")
    return wrong(name, problem, "A.decode_time(...) returns a dict: take 'tokens_per_s'.")


def check_prefetch_recall(answer, prefetch) -> Feedback:
    """09.3: ``answer`` [L-1]: per guessed layer, the share of the experts the layer actually chose
    (``prefetch.actual`` [L-1, N, k]) that were among the guesses (``prefetch.guess`` [L-1, N, g])."""
    name = "Exercise 09.3 (prefetch recall)"
    if is_todo(answer):
        return todo(name, "for every token and chosen expert: is it in that token's guesses? "
                          "(actual[..., :, None] == guess[..., None, :]).any(-1) gives [L-1, N, k].")
    expected = prefetch.recall
    problem = mismatch(expected, answer, labels=("guessed layer",))
    if problem is None:
        return correct(name, f"mean recall {expected.mean():.1%} with {prefetch.guess.shape[-1]} guesses for "
                             f"{prefetch.actual.shape[-1]} chosen experts.")
    hit = (prefetch.guess[..., :, None] == prefetch.actual[..., None, :]).any(-1)  # [L-1, N, g]
    if matches(hit.mean((1, 2)), answer):
        return wrong(name, "that is the precision: the share of guesses that were used.",
                     "recall divides by the chosen experts (k per token), not by the guesses.")
    return wrong(name, problem, "average over tokens and over the k chosen experts, one value per guessed layer.")


def check_any_uniform(answer, n_experts: int, top_k: int) -> Feedback:
    """09.4: ``answer`` (a number): the chance that two tokens routed uniformly at random (each to
    ``top_k`` distinct experts of ``n_experts``) share at least one expert (Table 5's "any" baseline:
    46.4% for top-2 of 8)."""
    name = "Exercise 09.4 (chance of any shared expert)"
    if is_todo(answer):
        return todo(name, "count the complement: how many top-k sets share *no* expert with a given one?")
    expected = uniform_repetition(n_experts, top_k, "any")
    problem = mismatch(expected, answer, atol=1e-9, rtol=1e-6)
    if problem is None:
        return correct(name, f"{expected:.1%} for top-{top_k} of {n_experts}.")
    if matches(top_k / n_experts, answer, atol=1e-9, rtol=1e-6):
        return wrong(name, "k/E is the chance that one given expert is in a random top-k set.",
                     "two sets share an expert unless the second avoids all k of the first: 1 - C(E-k, k) / C(E, k).")
    if matches(1 - (1 - top_k / n_experts) ** top_k, answer, atol=1e-9, rtol=1e-6):
        return wrong(name, "close, but the k experts of a set are drawn without replacement.",
                     "count sets: 1 - C(E-k, k) / C(E, k) (math.comb).")
    return wrong(name, problem, "1 - C(E-k, k) / C(E, k), with math.comb.")
