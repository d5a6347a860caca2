"""Exercises of notebook 09 · Real MoEs and offloading.

* 09.1 :func:`check_hindsight_gap`    how much of a frequency placement's hit rate was hindsight
* 09.2 :func:`check_decode_speed`     tokens/s of Mixtral 8x7B offloaded, from bytes and bandwidths
* 09.3 :func:`check_prefetch_recall`  speculative prefetch's recall, by hand from its guesses
* 09.4 :func:`check_any_uniform`      Table 5's "any" chance level for any top-k of E
* 09.5 :func:`check_prefetch_cost`    what the extra recall of more guesses costs (multiple choice)
* 09.6 :func:`check_any_saturation`   what a 93% chance level does to Table 5's "any" column (multiple choice)
* 09.7 :func:`check_hindsight_reading` what a hit rate profiled on the text it serves is (multiple choice)

A wrong answer is told what kind of wrong it is, never the reference value; hints come as a nudge,
then the method. 09.3 is by hand: it takes the learner's function and runs it on guesses of its own
and on the notebook's, which carry no ``.recall`` to read.
"""

from __future__ import annotations

import numpy as np

from ..analysis import decode_time, moe_bytes, policy_comparison, uniform_repetition
from .arrays import matches, mismatch
from .byhand import run_by_hand
from .feedback import Feedback, correct, is_todo, todo, wrong
from .questions import choice


def _frequency_hit_rate(trace, budget: int, profile) -> float:
    pc = policy_comparison(trace, budgets=[budget], policies=("frequency",), profile=profile)
    return float(pc.hit_rate.iloc[0])


def check_hindsight_gap(answer, trace, budget: int, profile) -> Feedback:
    """09.1: ``answer`` (a number): the hit rate of the ``frequency`` placement on ``trace`` at
    ``budget`` experts per layer when its frequencies come from ``trace`` itself
    (``profile=None``: hindsight) minus the hit rate when they come from ``profile``."""
    name = "Exercise 09.1 (hindsight)"
    hint = ("the same placement twice: once counting the experts on the very text it serves, once on other text; "
            "the difference is what hindsight bought.")
    method = ("A.policy_comparison takes budgets, policies and a profile trace; run it for the 'frequency' policy at "
              "this budget with profile=None, then with the profile trace, and subtract the second hit rate from "
              "the first.")
    if is_todo(answer):
        return todo(name, hint, method)
    hind, fair = _frequency_hit_rate(trace, budget, None), _frequency_hit_rate(trace, budget, profile)
    gap = hind - fair
    problem = mismatch(gap, answer, atol=1e-9, rtol=1e-6)
    if problem is None:
        return correct(name, f"{hind:.1%} with hindsight vs {fair:.1%} profiled on other text: "
                             f"{gap:+.1%} was hindsight.")
    if matches(-gap, answer, atol=1e-9, rtol=1e-6) and abs(gap) > 1e-12:
        return wrong(name, "the sign is flipped: hindsight minus fair.", "profile=None minus profile=profile.", method)
    if matches(hind, answer, atol=1e-9, rtol=1e-6) or matches(fair, answer, atol=1e-9, rtol=1e-6):
        return wrong(name, "that is one of the two hit rates, not their difference.", "subtract the fair one.", method)
    if matches(100 * gap, answer, atol=1e-7, rtol=1e-6):
        return wrong(name, "that is in percentage points; give the difference of two fractions.", hint, method)
    return wrong(name, problem, f"budget {budget} and the 'frequency' policy for both.", method)


def check_decode_speed(answer, *, hit_rate: float, precision: str, link, memory) -> Feedback:
    """09.2: ``answer`` (a number): tokens per second of Mixtral 8x7B decoding at batch 1 with
    experts at ``precision``, ``hit_rate`` of the expert reads served from ``memory`` and the
    misses from ``link`` (``A.moe_bytes`` then ``A.decode_time``)."""
    name = "Exercise 09.2 (decode speed)"
    hint = ("a token's time is the resident reads at the memory's speed plus the missed experts over the link; count "
            "how many expert reads a token makes, and how many of them miss.")
    method = ("A.moe_bytes gives the model's sizes at a precision (n_layers, experts_per_token among them); the "
              "misses per token are every layer's k reads times the miss rate; A.decode_time(sizes, misses, link, "
              "memory) returns a dict with seconds and tokens_per_s.")
    if is_todo(answer):
        return todo(name, hint, method)
    sizes = moe_bytes("mixtral-8x7b", precision)
    misses = sizes.n_layers * sizes.experts_per_token * (1 - hit_rate)
    t = decode_time(sizes, misses, link, memory)
    problem = mismatch(t["tokens_per_s"], answer, atol=1e-6, rtol=1e-4)
    if problem is None:
        return correct(name, f"{t['tokens_per_s']:.2f} tokens/s: {t['resident_s'] * 1e3:.0f} ms reading resident "
                             f"weights + {t['demand_s'] * 1e3:.0f} ms fetching {misses:.1f} missed experts per token.")
    if matches(t["seconds"], answer, atol=1e-6, rtol=1e-4):
        return wrong(name, "that is seconds per token.", "tokens per second is its inverse.", method)
    if matches(decode_time(sizes, sizes.n_layers * sizes.experts_per_token * hit_rate, link, memory)["tokens_per_s"],
               answer, atol=1e-6, rtol=1e-4):
        return wrong(name, "you counted the hits as misses.", "a miss is a read the memory could not serve.", method)
    if matches(decode_time(sizes, (1 - hit_rate), link, memory)["tokens_per_s"], answer, atol=1e-6, rtol=1e-4):
        return wrong(name, "misses per token must count every layer's k expert reads.",
                     f"{sizes.n_layers} layers x {sizes.experts_per_token} experts, each missing at the miss rate.",
                     method)
    for other in ("fp16", "4bit", "int8", "3bit"):
        if other != precision and matches(decode_time(moe_bytes("mixtral-8x7b", other), misses, link, memory)
                                          ["tokens_per_s"], answer, atol=1e-6, rtol=1e-4):
            return wrong(name, f"you used {other} weights; the exercise is {precision}.", hint, method)
    return wrong(name, problem, hint, method)


def _fresh_prefetch(L: int = 3, N: int = 40, k: int = 2, g: int = 4, E: int = 8, seed: int = 9):
    """Guesses [L, N, g] and choices [L, N, k] of the checker's own (distinct experts per token; layers
    guessed well, badly and in between)."""
    rng = np.random.default_rng(seed)
    actual = np.argsort(rng.random((L, N, E)), axis=-1)[..., :k]
    guess = np.argsort(rng.random((L, N, E)), axis=-1)[..., :g]
    for layer, share in enumerate((0.8, 0.2, 0.5)[:L]):  # put the first chosen expert among the guesses
        lucky = rng.random(N) < share
        for n in np.flatnonzero(lucky):
            if actual[layer, n, 0] not in guess[layer, n]:
                guess[layer, n, -1] = actual[layer, n, 0]
    return guess, actual


def _recall(guess, actual) -> np.ndarray:
    return (np.asarray(actual)[..., :, None] == np.asarray(guess)[..., None, :]).any(-1).mean((1, 2))


def check_prefetch_recall(fn, prefetch) -> Feedback:
    """09.3, by hand: ``fn(guess, actual) -> [L-1]``: your function; per guessed layer, the share of the
    experts the layer actually chose (``actual`` [L-1, N, k]) that were among the guesses (``guess``
    [L-1, N, g]). The checker runs ``fn`` on arrays of its own, then on ``prefetch.guess`` and
    ``prefetch.actual`` (plain arrays: no ``.recall`` to read)."""
    name = "Exercise 09.3 (prefetch recall, by hand)"
    hint = "recall asks, of what the layer chose, how much was guessed; precision asks the reverse."
    method = ("compare every chosen expert with every guess of the same token (broadcast actual[..., :, None] "
              "against guess[..., None, :]); 'any' over the guesses says whether a chosen expert was guessed; "
              "average over tokens and chosen experts, one value per layer.")
    g0, a0 = _fresh_prefetch(k=prefetch.actual.shape[-1], g=prefetch.guess.shape[-1],
                             E=max(int(prefetch.actual.max()) + 1, prefetch.guess.shape[-1] + 2))
    for guess, actual in ((g0, a0), (np.array(prefetch.guess), np.array(prefetch.actual))):
        answer, bad = run_by_hand(name, fn, (guess.copy(), actual.copy()), hint=hint, method=method,
                                  what="function fn(guess, actual) -> array [guessed layers]")
        if bad is not None:
            return bad
        expected = _recall(guess, actual)
        problem = mismatch(expected, answer, labels=("guessed layer",))
        if problem is None:
            continue
        if matches(_recall(actual, guess), answer):
            return wrong(name, "that is the precision: the share of guesses that were used.",
                         "recall divides by the chosen experts (k per token), not by the guesses.", method)
        if matches((actual[..., 0, None] == guess).any(-1).mean(-1), answer):
            return wrong(name, "only the first chosen expert is counted: recall covers all k.", hint, method)
        return wrong(name, problem, hint, method)
    rec = _recall(prefetch.guess, prefetch.actual)
    return correct(name, f"right on the checker's guesses and on yours: mean recall {rec.mean():.1%} with "
                         f"{prefetch.guess.shape[-1]} guesses for {prefetch.actual.shape[-1]} chosen experts.")


def check_any_uniform(answer, n_experts: int, top_k: int) -> Feedback:
    """09.4: ``answer`` (a number): the chance that two tokens routed uniformly at random (each to
    ``top_k`` distinct experts of ``n_experts``) share at least one expert (Table 5's "any" baseline:
    46.4% for top-2 of 8)."""
    name = "Exercise 09.4 (chance of any shared expert)"
    hint = "count the complement: how many top-k sets share *no* expert with a given one?"
    method = ("the second token avoids all k experts of the first when its k experts come from the other E - k; "
              "count such sets with math.comb and divide by the number of all top-k sets; the answer is 1 minus that.")
    if is_todo(answer):
        return todo(name, hint, method)
    expected = uniform_repetition(n_experts, top_k, "any")
    problem = mismatch(expected, answer, atol=1e-9, rtol=1e-6)
    if problem is None:
        return correct(name, f"{expected:.1%} for top-{top_k} of {n_experts}.")
    if matches(top_k / n_experts, answer, atol=1e-9, rtol=1e-6):
        return wrong(name, "k/E is the chance that one given expert is in a random top-k set.",
                     "two sets share an expert unless the second avoids all k of the first.", method)
    if matches(1 - (1 - top_k / n_experts) ** top_k, answer, atol=1e-9, rtol=1e-6):
        return wrong(name, "close, but the k experts of a set are drawn without replacement.", hint, method)
    if matches(100 * expected, answer, atol=1e-7, rtol=1e-6):
        return wrong(name, "that is a percentage; give a probability in [0, 1].", hint, method)
    return wrong(name, problem, hint, method)


# --------------------------------------------------------------------------- 09.5-09.7: graded questions


def check_prefetch_cost(answer) -> Feedback:
    """09.5 (multiple choice): guessing more experts per layer (k + 2 instead of k) raises the recall
    of speculative prefetch. What does the extra recall cost?"""
    name = "Exercise 09.5 (what extra guesses cost)"
    options = {"a": "nothing: a wrong guess is simply ignored",
               "b": "every guess is an expert's bytes moved over the link ahead of time, so the traffic grows with "
                    "the number of guesses, used or not",
               "c": "the model's accuracy: wrong guesses change its output",
               "d": "only memory on the GPU, never time"}
    why_not = {"a": "a guess is acted on before the layer runs: its expert is loaded whether or not it is then chosen.",
               "c": "prefetch only loads weights early; the router still chooses, so the output is unchanged.",
               "d": "the guessed experts travel over the same link as the misses; on a slow link that is time."}
    return choice(name, answer, options, "b", why_not,
                  why="Recall divides by the chosen experts; the cost scales with the guesses: precision (the share "
                      "of guesses used) tells how much of the traffic was wasted.",
                  hint="what happens to a guessed expert before the layer runs?",
                  method="compare the recall and the precision of 09.3 for g = k and g = k + 2: the bytes moved per "
                         "token scale with g.")


def check_any_saturation(answer) -> Feedback:
    """09.6 (multiple choice): for top-8 of 32 experts, two tokens routed at random share an expert
    93% of the time (09.4). What does that do to Table 5's "any" column for such fine-grained MoEs?"""
    name = "Exercise 09.6 (the 'any' column for fine-grained MoEs)"
    options = {"a": "fine-grained MoEs route neighbouring tokens alike more often than Mixtral",
               "b": "the column saturates: chance is already near 1, so it can hardly show an effect; compare "
                    "'first' (or the overlap size) with its baselines instead",
               "c": "nothing: 'any' is comparable across MoEs of any shape",
               "d": "the column is meaningless for every MoE, Mixtral included"}
    why_not = {"a": "a high 'any' rate is expected by chance alone with 8 of 32; it says nothing until compared with "
                    "that chance level.",
               "c": "the chance level depends on k and E (46% for top-2 of 8, 93% for top-8 of 32): the same rate "
                    "means different things.",
               "d": "for top-2 of 8 the chance is 46%, which leaves room above it: the column is informative there."}
    return choice(name, answer, options, "b", why_not,
                  why="A statistic whose chance level is near its ceiling has no room to show a difference.",
                  hint="how much room is left between 93% and 100%?",
                  method="compare each rate with its own chance level (uniform, marginal, shuffled), as notebook 06 "
                         "does, and prefer statistics whose chance level is far from 1.")


def check_hindsight_reading(answer) -> Feedback:
    """09.7 (multiple choice): a placement that keeps each layer's most used experts is profiled on the
    same text it then serves. Its hit rate is..."""
    name = "Exercise 09.7 (profiled on the text it serves)"
    options = {"a": "an unbiased estimate of the hit rate on new text",
               "b": "an optimistic estimate: it knew the frequencies of the very text it serves (hindsight)",
               "c": "a pessimistic estimate: profiling on more text would have helped",
               "d": "the best any placement can reach"}
    why_not = {"a": "on new text the frequencies differ from the ones the placement was built on; 09.1 measures the "
                    "difference.",
               "c": "the profile matches the served text exactly, which is the best case for a frequency placement, "
                    "not the worst.",
               "d": "a placement that changes as the text goes (LRU, or an oracle that looks ahead) can beat a "
                    "fixed one; hindsight frequencies are optimistic, not optimal."}
    return choice(name, answer, options, "b", why_not,
                  why="Profile on other text (a held-out profile) to estimate what a deployment would see.",
                  hint="what did the placement know that a deployed one would not?",
                  method="compare profile=None with a profile from other documents, as in 09.1.")
