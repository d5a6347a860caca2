"""Exercises of notebook 05 (visualising experts): compute by hand what three figures draw (the
first-choice load, the repetition rate, the experts of digit tokens), and rerun the expert-cache
simulation on greedy text. A wrong answer is told what kind of wrong it is, never the reference value.
05.1 and 05.2 are by hand: they take the learner's function and run it on a trace of their own with
the analysis function switched off (:mod:`moe_lab.exercises.byhand`).

Each checker recomputes the answer with ``moe_lab.analysis`` from the trace (or model) the learner
used::

    from moe_lab.exercises import nb05 as ex
    ex.check_first_choice_load(first_choice_load, trace)

* 05.5 :func:`check_first_choice_balance` (multiple choice, from the data), 05.6 :func:`check_digit_ratio` (a number): graded questions.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..analysis.stats import (cache_hit_rates, expert_load, expert_load_by_domain, generated_only, load_balance,
                             repetition)
from ..routing.trace import RoutingTrace
from ..routing.tracing import trace_generation
from .byhand import fresh_trace, run_by_hand
from .feedback import Feedback, correct, is_todo, todo, wrong
from .questions import choice, in_range


def _array(answer, name: str, shape: tuple, what: str, hint: str, method: str = ""):
    """(array, None) or (None, wrong feedback) for an answer that should be a float array of ``shape``."""
    try:
        a = np.asarray(answer, dtype=float)
    except (TypeError, ValueError):
        return None, wrong(name, f"expected {what}, found {type(answer).__name__}.", hint, method)
    if a.shape != shape:
        extra = " (transposed?)" if a.shape == shape[::-1] and len(shape) == 2 else ""
        return None, wrong(name, f"expected {what} of shape {shape}, found {a.shape}{extra}.", hint, method)
    return a, None


# --------------------------------------------------------------------------------------------
# 05.1


def check_first_choice_load(fn, trace: RoutingTrace) -> Feedback:
    """Exercise 05.1: the first-choice load by hand. ``fn(trace) -> [layers, experts]``: your function;
    for each layer (row), the share of tokens whose *first* choice is each expert (rows sum to 1),
    from ``trace.expert_ids`` [L, N, k] with numpy. The checker runs ``fn`` on a trace of its own and
    on ``trace``, with ``analysis.expert_load`` switched off."""
    name = "Exercise 05.1 (the first-choice load by hand)"
    hint = "only column 0 of expert_ids counts; each row of the result is one layer's shares."
    method = ("column 0 of trace.expert_ids [L, N, k] is the first choice; count each expert per layer with "
              "np.bincount(..., minlength=E) and divide by the number of tokens.")
    for t in (fresh_trace(n_experts=trace.n_experts), trace):
        answer, bad = run_by_hand(name, fn, (t,), forbidden=[expert_load, expert_load_by_domain], hint=hint,
                                  method=method, what="function fn(trace) -> array [layers, experts]")
        if bad is None:
            bad = _first_choice_load_problem(answer, t, name, hint, method)
        if bad is not None:
            return bad
    ref = expert_load(trace, "first")
    spread = (ref.max(1) - ref.min(1)).max()
    return correct(name, f"right on the checker's trace and on yours; rows sum to 1; the biggest gap between an "
                         f"expert's share and another's in one layer is {spread:.1%}.")


def _first_choice_load_problem(answer, trace: RoutingTrace, name: str, hint: str, method: str) -> Feedback | None:
    L, E = trace.n_layers, trace.n_experts
    a, bad = _array(answer, name, (L, E), "an array [layers, experts]", hint)
    if bad is not None:
        return bad
    ref = expert_load(trace, "first")
    if np.allclose(a, ref, atol=1e-6):
        return None
    if np.allclose(a, expert_load(trace, "either"), atol=1e-6):
        return wrong(name, "this is the load over both slots (column 0 and column 1 of expert_ids): keep only "
                           "the first choice, column 0.", hint)
    if np.allclose(a, ref * trace.n_tokens, atol=1e-6):
        return wrong(name, "these are counts: divide each row by the number of tokens.", hint)
    if np.allclose(a, expert_load(trace, "either", "tokens"), atol=1e-6):
        return wrong(name, "rows sum to k: these are both slots counted per token. Keep only the first choice.", hint)
    n_bad = int((~np.isclose(a, ref, atol=1e-6)).sum())
    return wrong(name, f"not equal: {n_bad} of {ref.size} values differ.", hint, method)


# --------------------------------------------------------------------------------------------
# 05.2


def _same_first_rate(trace: RoutingTrace, same_doc: bool, skip_bos: bool, bos_id: int = 1) -> np.ndarray:
    first = trace.expert_ids[:, :, 0]  # [L, N]
    keep = np.ones(trace.n_tokens - 1, dtype=bool)
    if same_doc:
        keep &= trace.doc_ids[:-1] == trace.doc_ids[1:]
    if skip_bos:
        keep &= trace.token_ids[:-1] != bos_id
    return (first[:, :-1] == first[:, 1:])[:, keep].mean(1)


def check_repetition_rate(fn, trace: RoutingTrace) -> Feedback:
    """Exercise 05.2: the repetition rate of section 5 by hand. ``fn(trace) -> [layers]``: your
    function; one value per layer: the share of consecutive token pairs (i, i+1) *in the same document*,
    with token i not BOS (id 1), whose first choices are the same expert. The checker runs ``fn`` on a
    trace of its own and on ``trace``, with ``analysis.repetition`` switched off."""
    name = "Exercise 05.2 (the repetition rate by hand)"
    hint = "a pair is token i and token i+1: two shifted slices of the first choices; not every pair counts."
    method = ("compare the first choices of tokens i and i+1 (slices [:-1] and [1:]); keep only the pairs whose "
              "doc_ids agree and whose token i is not BOS (id 1); average per layer.")
    for t in (fresh_trace(n_experts=trace.n_experts), trace):
        answer, bad = run_by_hand(name, fn, (t,), forbidden=[repetition], hint=hint, method=method,
                                  what="function fn(trace) -> array [layers]")
        if bad is None:
            bad = _repetition_problem(answer, t, name, hint, method)
        if bad is not None:
            return bad
    ref = repetition(trace, "first", n_boot=10, n_shuffles=1).rate
    return correct(name, "right on the checker's trace and on yours; the same values as analysis.repetition: "
                         + ", ".join(f"{r:.1%}" for r in ref) + ".")


def _repetition_problem(answer, trace: RoutingTrace, name: str, hint: str, method: str) -> Feedback | None:
    L = trace.n_layers
    a, bad = _array(answer, name, (L,), "one rate per layer", hint)
    if bad is not None:
        return bad
    ref = repetition(trace, "first", n_boot=10, n_shuffles=1).rate
    if np.allclose(a, ref, atol=1e-6):
        return None
    if np.allclose(a, _same_first_rate(trace, same_doc=False, skip_bos=True), atol=1e-6):
        return wrong(name, "you counted pairs across document boundaries (the last token of one document and the "
                           "BOS of the next): keep pairs whose doc_ids are equal.", hint)
    if np.allclose(a, _same_first_rate(trace, same_doc=True, skip_bos=False), atol=1e-6):
        return wrong(name, "you kept the pairs that start at BOS: its routing says nothing about the text (it is "
                           "the same token in every document).", hint)
    if np.allclose(a, _same_first_rate(trace, same_doc=False, skip_bos=False), atol=1e-6):
        return wrong(name, "pairs across documents and pairs starting at BOS are both counted.", hint)
    n_bad = int((~np.isclose(a, ref, atol=1e-6)).sum())
    return wrong(name, f"not equal: {n_bad} of {L} layers differ.", hint, method)


# --------------------------------------------------------------------------------------------
# 05.3


def digit_mask(trace: RoutingTrace) -> np.ndarray:
    """[N] bool: the token is made of digits (its piece, without the word-start mark ▁, is 0-9 only)."""
    if trace.pieces is None:
        raise ValueError("this trace has no pieces: trace it with tokenizer=... to know which tokens are digits")
    return np.array([p.replace("▁", "").isdigit() for p in trace.pieces])


def digit_first_choice(trace: RoutingTrace, layer: int) -> np.ndarray:
    """[E] share of digit tokens whose first choice in ``layer`` is each expert."""
    mask = digit_mask(trace)
    first = trace.expert_ids[trace.layer_index(layer), mask, 0]
    return np.bincount(first, minlength=trace.n_experts) / max(int(mask.sum()), 1)


def check_digit_experts(answer, trace: RoutingTrace, layer: int) -> Feedback:
    """Exercise 05.3: among the digit tokens (``digit_mask(trace)``), the share whose first choice in
    ``layer`` is each expert: E values summing to 1. Compare its largest value with that expert's
    share over all tokens to see whether digits have an expert of their own."""
    name = "Exercise 05.3 (do digits get an expert of their own?)"
    hint = "digit tokens only, first choice only, one layer: shares that sum to 1 over the digit tokens."
    method = ("take the layer's row (trace.layer_index(layer)), the digit tokens (the mask) and column 0; count "
              "with np.bincount(..., minlength=E) and divide by the number of digit tokens.")
    if is_todo(answer):
        return todo(name, hint, method)
    mask = digit_mask(trace)
    if not mask.any():
        return wrong(name, "this trace has no digit tokens; trace a text with numbers in it.", hint, method)
    E = trace.n_experts
    a, bad = _array(answer, name, (E,), "one share per expert", hint, method)
    if bad is not None:
        return bad
    ref = digit_first_choice(trace, layer)
    if np.allclose(a, ref, atol=1e-6):
        e = int(ref.argmax())
        overall = expert_load(trace, "first")[trace.layer_index(layer), e]
        return correct(name, f"expert {e} takes {ref[e]:.0%} of the {int(mask.sum())} digit tokens in layer {layer}, "
                             f"against {overall:.0%} of all tokens.")
    if np.allclose(a, ref * mask.sum() / trace.n_tokens, atol=1e-6):
        return wrong(name, "you divided by all tokens; divide by the number of digit tokens so the values sum to 1.", hint, method)
    row = trace.layer_index(layer)
    both = np.bincount(trace.expert_ids[row, mask].ravel(), minlength=E) / mask.sum()
    if np.allclose(a, both, atol=1e-6) or np.allclose(a, both / trace.top_k, atol=1e-6):
        return wrong(name, "you counted both slots; the question is about the first choice (column 0).", hint, method)
    for other in trace.layers:
        if other != layer and np.allclose(a, digit_first_choice(trace, other), atol=1e-6):
            return wrong(name, f"these are the shares of layer {other}, not of layer {layer}.", hint, method)
    n_bad = int((~np.isclose(a, ref, atol=1e-6)).sum())
    return wrong(name, f"not equal: {n_bad} of {E} values differ.", hint, method)


# --------------------------------------------------------------------------------------------
# 05.4


def greedy_lru_hit_rate(model, prompts: Sequence, tokenizer, n_new: int, cache_size: int, *,
                        decode_only: bool = True) -> float:
    """Mean over layers of the LRU hit rate with ``cache_size`` experts per layer, for greedy
    generation (temperature 0) from ``prompts``; decode steps only unless ``decode_only=False``."""
    _, trace = trace_generation(model, list(prompts), max_new_tokens=n_new, tokenizer=tokenizer, temperature=0.0)
    if decode_only:
        trace = generated_only(trace)
    hits = cache_hit_rates(trace, sizes=[cache_size], policies=("lru",))
    return float(hits.hit_rate.mean())


def check_greedy_cache_hits(answer, model, prompts: Sequence, tokenizer, n_new: int, cache_size: int) -> Feedback:
    """Exercise 05.4: rerun section 9's cache simulation on *greedy* text (``temperature=0``):
    ``answer`` = the LRU hit rate with ``cache_size`` experts per layer, decode steps only,
    averaged over layers."""
    name = "Exercise 05.4 (expert cache on greedy text)"
    hint = "section 9's simulation, on a trace generated greedily; only the decode steps count."
    method = ("moe_lab.trace_generation(..., temperature=0) gives the greedy trace; analysis.generated_only keeps "
            "its decode steps; analysis.cache_hit_rates(..., sizes=[cache_size], policies=('lru',)) gives one hit "
            "rate per layer: average them.")
    if is_todo(answer):
        return todo(name, hint, method)
    try:
        value = float(np.asarray(answer, dtype=float).reshape(()))
    except (TypeError, ValueError):
        return wrong(name, "expected one number (the hit rate averaged over layers), found "
                           f"{np.shape(answer) if hasattr(answer, '__len__') else type(answer).__name__}.", hint, method)
    if not 0 <= value <= 1:
        return wrong(name, f"a hit rate is between 0 and 1, found {value:.4g}.", hint, method)
    ref = greedy_lru_hit_rate(model, prompts, tokenizer, n_new, cache_size)
    if abs(value - ref) <= 1e-6:
        return correct(name, f"LRU hit rate with {cache_size} of {model.args.n_experts} experts per layer on greedy "
                             f"text: {ref:.1%}.")
    if abs(value - greedy_lru_hit_rate(model, prompts, tokenizer, n_new, cache_size, decode_only=False)) <= 1e-6:
        return wrong(name, "this includes the prompt tokens: the prompt is processed in one batch, so keep only the "
                           "decode steps (analysis.generated_only).", hint, method)
    return wrong(name, f"found {value:.4f}: not equal to the reference (greedy: temperature=0; LRU; {cache_size} "
                       "experts per layer; mean over layers).", hint, method)


# --------------------------------------------------------------------------- 05.5-05.6: graded questions


def check_first_choice_balance(answer, trace: RoutingTrace) -> Feedback:
    """Exercise 05.5 (multiple choice): is the first choice less balanced than both slots together,
    by the coefficient of variation of the expert shares averaged over layers? The right letter is
    worked out from ``trace``."""
    name = "Exercise 05.5 (is the first choice less balanced?)"
    cv_first = float(load_balance(expert_load(trace, "first")).cv.mean())
    cv_either = float(load_balance(expert_load(trace, "either")).cv.mean())
    right = "a" if cv_first > cv_either else "b"
    options = {"a": "yes: the first choice's shares vary more from expert to expert",
               "b": "no: the first choice is at least as balanced as both slots together"}
    why = {"a": "Counting the second slot spreads the load: an expert that is rarely first is often second.",
           "b": "On this model the second slot does not even out the load: the experts that are first are also "
                "often second."}[right]
    why_not = {"a": "compare the two heatmaps (or analysis.load_balance of the two loads): the first choice is not "
                    "the less balanced one here.",
               "b": "compare the two heatmaps (or analysis.load_balance of the two loads): the first choice varies "
                    "more here."}
    return choice(name, answer, options, right, {k: v for k, v in why_not.items() if k != right}, why=why,
                  hint="draw both heatmaps (viz.load_heatmap with 'first' and without) and compare the spread.",
                  method="analysis.load_balance(analysis.expert_load(trace, choice)).cv, averaged over layers, for "
                         "'first' and 'either': the larger CV is the less balanced.")


def check_digit_ratio(answer, trace: RoutingTrace, layer: int) -> Feedback:
    """Exercise 05.6 (a number): the expert that gets the largest share of digit tokens' first choices
    at ``layer`` (05.3): how many times its share of *all* tokens' first choices is that? Accepted
    within 10% of the value on ``trace``."""
    name = "Exercise 05.6 (how much do digits prefer their expert?)"
    digits = digit_first_choice(trace, layer)
    e = int(np.argmax(digits))
    overall = expert_load(trace, "first")[trace.layer_index(layer)][e]
    ratio = float(digits[e] / overall)
    return in_range(name, answer, 0.9 * ratio, 1.1 * ratio,
                    diagnoses=[(lambda v: 0.9 / ratio <= v <= 1.1 / ratio and ratio > 1.05,
                                "that is the inverse: the share among all tokens over the share among digits."),
                               (lambda v: v > 1.5 and 0.9 * ratio <= v / 100 <= 1.1 * ratio,
                                "that looks like a ratio of percentages times 100: divide the two shares.")],
                    unit=" x", why="Near 1 means the digits' favourite is just a busy expert; well above 1, a "
                                   "preference for digits (still not a 'digit expert': compare with its other tokens).",
                    hint="two shares of the same expert: among digit tokens (05.3) and among all tokens (05.1).",
                    method="take the expert with the largest value of your 05.3 answer, and divide that value by the "
                           "same expert's first-choice share of all tokens at the same layer.")
