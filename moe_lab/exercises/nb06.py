"""Checkers for notebook 06 (the Mixtral paper's routing analysis).

* 06.1 :func:`check_marginal_baseline`: the chance rate of "same first expert" given unequal use;
* 06.2 :func:`check_word_start_repetition`: Table 5 restricted to pairs whose second token starts a word;
* 06.3 :func:`check_expert_usage`: a document's expert-usage vector (the language-vs-content study's unit);
* 06.4 :func:`check_first_choice_divergence`: Figure 7's distance, on first choices only;
* 06.5 :func:`check_word_start_drop`: does the rate drop at word starts? (multiple choice, from the data);
* 06.6 :func:`check_baseline_reading`: what a rate above 1/E but not above the marginal says (multiple choice);
* 06.7 :func:`check_mediator_reading`: why adjusting for the hidden states is not a control (multiple choice).

Every checker computes the reference answer itself, from the trace the learner used, with the
same moe_lab code as the notebook; nothing depends on the demo model's weights. A wrong answer is
told what kind of wrong it is, never the reference value; hints come as a nudge, then the method.
06.3 is by hand: it takes the learner's function and runs it on a trace of its own with
``analysis.expert_usage`` switched off (:mod:`moe_lab.exercises.byhand`).
"""

from __future__ import annotations

import numpy as np

from ..analysis import expert_load, expert_usage
from ..routing.trace import RoutingTrace, layer_row
from .arrays import mismatch, to_number
from .byhand import fresh_trace, run_by_hand
from .feedback import Feedback, correct, is_todo, not_equal, todo, wrong
from .questions import choice


def _number(name: str, answer, hint: str = "", method: str = "") -> tuple[float | None, Feedback | None]:
    value = to_number(answer)
    if value is None:
        return None, wrong(name, f"expected one number, found {type(answer).__name__} "
                                 f"with shape {np.shape(answer)}: reduce your result to a single float.", hint, method)
    return value, None


# --------------------------------------------------------------------------- 06.1


def marginal_baseline(trace: RoutingTrace, layer: int) -> float:
    """sum_e p_e^2 with p_e the share of the trace's tokens whose first choice at ``layer`` is e."""
    p = expert_load(trace, "first")[layer_row(trace.layers, layer)]
    return float((p ** 2).sum())


def check_marginal_baseline(answer, trace: RoutingTrace, layer: int) -> Feedback:
    """Exercise 06.1: the probability that two tokens drawn independently from ``layer``'s
    first-choice frequencies share their first expert (sum_e p_e^2)."""
    name = "Exercise 06.1 (marginal baseline)"
    hint = "two independent tokens agree when both pick expert e, for some e: add up the chances of each e."
    method = ("analysis.expert_load with 'first' gives each layer's first-choice shares p (a row per layer, "
              "trace.layer_index(layer) picks it); the chance that two independent draws agree is the sum of "
              "the squared shares.")
    if is_todo(answer):
        return todo(name, hint, method)
    value, bad = _number(name, answer, hint, method)
    if bad is not None:  # a Feedback is falsy unless correct
        return bad
    ref = marginal_baseline(trace, layer)
    if np.isclose(value, ref, atol=1e-6):
        return correct(name, f"{value:.4f} (uniform use would give 1/E = {1 / trace.n_experts:.4f}).")
    if np.isclose(value, 1 / trace.n_experts, atol=1e-6):
        return wrong(name, "that is 1/E, the uniform baseline; the experts are not used equally.", hint, method)
    either = expert_load(trace, "either")[layer_row(trace.layers, layer)]
    if np.isclose(value, float((either ** 2).sum()), atol=1e-6):
        return wrong(name, "that uses the top-k load (both choices); the statistic compares first choices only.",
                     hint, method)
    if not 0 < value <= 1:
        return wrong(name, "that is not a probability (it must lie in (0, 1]).", hint, method)
    if np.isclose(value, ref, atol=5e-5):  # right to the 4 decimals a printout shows, but rounded
        return wrong(name, "that is rounded: the check compares to within 1e-6, so pass the unrounded float (the "
                           "variable, not a number copied from a printout).", hint, method)
    return not_equal(name, f"it is not sum_e p_e^2 of the first choices at layer {layer} (compared to within 1e-6)",
                     hint, method)


# --------------------------------------------------------------------------- 06.2


def same_first_rate(trace: RoutingTrace, layer: int, word_start_only: bool = False, bos_id: int = 1) -> float:
    """Share of consecutive token pairs (i, i+1) of one document, neither of them BOS, whose first
    choices at ``layer`` are equal; with ``word_start_only``, only pairs whose token i+1 is a piece
    starting with "▁" (the start of a word)."""
    first = trace.expert_ids[layer_row(trace.layers, layer), :, 0]  # [N]
    same_doc = trace.doc_ids[1:] == trace.doc_ids[:-1]
    keep = same_doc & (trace.token_ids[1:] != bos_id) & (trace.token_ids[:-1] != bos_id)
    if word_start_only:
        if trace.pieces is None:
            raise ValueError("the trace has no pieces: trace it with a tokenizer")
        keep &= np.array([p.startswith("▁") for p in trace.pieces[1:]])
    return float((first[1:] == first[:-1])[keep].mean())


def check_word_start_repetition(answer, trace: RoutingTrace, layer: int) -> Feedback:
    """Exercise 06.2: the same-first-expert rate at ``layer`` over consecutive pairs inside a
    document (BOS left out) whose second token starts a word (its piece begins with "▁")."""
    name = "Exercise 06.2 (repetition at word starts)"
    hint = "a pair is two neighbouring tokens of one document; three conditions decide whether a pair counts."
    method = ("take the first choices of the layer's row (column 0 of expert_ids); compare the slices [:-1] and "
              "[1:]; keep a pair when its doc_ids agree, neither token is BOS (id 1) and the second token's piece "
              "starts with '▁'; average the kept comparisons.")
    if is_todo(answer):
        return todo(name, hint, method)
    value, bad = _number(name, answer, hint, method)
    if bad is not None:  # a Feedback is falsy unless correct
        return bad
    ref = same_first_rate(trace, layer, word_start_only=True)
    if np.isclose(value, ref, atol=1e-6):
        return correct(name, f"{value:.3f} at word starts vs {same_first_rate(trace, layer):.3f} over all pairs.")
    if np.isclose(value, same_first_rate(trace, layer), atol=1e-6):
        return wrong(name, "that is the rate over all pairs: the word-start mask is missing.", hint, method)
    if np.isclose(value, 100 * ref, atol=1e-4):
        return wrong(name, "that is a percentage; give the rate as a fraction in [0, 1].", hint, method)
    if np.isclose(value, same_first_rate(trace, layer, True, bos_id=-1), atol=1e-6):  # BOS kept in the pairs
        return wrong(name, "the pairs that touch BOS are counted: leave out pairs where either token is id 1.",
                     hint, method)
    return not_equal(name, f"it is not the word-start rate at layer {layer} (compared to within 1e-6)", hint, method)


# --------------------------------------------------------------------------- 06.3


def check_expert_usage(fn, trace: RoutingTrace, layer: int) -> Feedback:
    """Exercise 06.3, by hand: ``fn(trace, layer) -> [documents, experts]``: your function; for each
    document, its share of top-k slots that went to each expert at model layer ``layer``, BOS tokens
    left out (rows sum to 1). The checker runs ``fn`` on a trace of its own (layer 2, whose row is 1)
    and on ``trace`` at ``layer``, with ``analysis.expert_usage`` switched off."""
    name = "Exercise 06.3 (expert-usage vectors, by hand)"
    hint = "every token adds its k experts to its document's counts; one token is in every document and says nothing."
    method = ("pick the layer's row with trace.layer_index(layer); keep tokens whose id is not 1 (BOS); count each "
              "(document, expert) pair over all k slots (np.add.at on a [documents, experts] array of zeros, with "
              "the doc ids repeated k times); divide each row by its total.")
    fresh = fresh_trace(n_experts=trace.n_experts, top_k=trace.top_k)
    for t, l in ((fresh, fresh.layers[1]), (trace, layer)):
        answer, bad = run_by_hand(name, fn, (t, l), forbidden=[expert_usage], hint=hint, method=method,
                                  what="function fn(trace, layer) -> array [documents, experts]")
        if bad is None:
            bad = _usage_problem(answer, t, l, name, hint, method)
        if bad is not None:
            return bad
    ref = expert_usage(trace)[layer_row(trace.layers, layer)]
    return correct(name, f"right on the checker's trace and on yours: {ref.shape[0]} documents x {ref.shape[1]} "
                         "experts, rows sum to 1.")


def _usage_problem(answer, trace: RoutingTrace, layer: int, name: str, hint: str, method: str) -> Feedback | None:
    row = layer_row(trace.layers, layer)
    ref = expert_usage(trace)[row]  # [D, E]
    try:
        a = np.asarray(answer, dtype=np.float64)
    except (TypeError, ValueError):
        return wrong(name, f"expected an array [documents, experts], found {type(answer).__name__}.", hint, method)
    if a.shape != ref.shape:
        return wrong(name, f"expected shape {ref.shape} (documents, experts), found {a.shape}.", hint, method)
    if np.allclose(a, ref, atol=1e-6):
        return None
    other_rows = [r for r in range(trace.n_layers) if r != row]
    if any(np.allclose(a, expert_usage(trace)[r], atol=1e-6) for r in other_rows):
        return wrong(name, f"that is another layer's usage: layer {layer} is not row {layer} of expert_ids on "
                           "every trace (the checker's trace holds layers " f"{trace.layers}).", hint, method)
    if not np.allclose(a.sum(1), 1, atol=1e-6):
        return wrong(name, "the rows should sum to 1 (shares); yours do not: divide each row by its total.", hint, method)
    if np.allclose(a, expert_usage(trace, bos_id=None)[row], atol=1e-6):
        return wrong(name, "BOS tokens are counted: every document starts with the same <s>, which makes them look "
                           "alike; leave them out.", hint, method)
    first = np.zeros_like(ref)
    keep = trace.token_ids != 1
    np.add.at(first, (trace.doc_ids[keep], trace.expert_ids[row, keep, 0]), 1.0)
    if np.allclose(a, first / first.sum(1, keepdims=True).clip(1e-12), atol=1e-6):
        return wrong(name, "only the first choice is counted: the usage vector counts all k slots.", hint, method)
    return wrong(name, mismatch(ref, a, atol=1e-6, labels=("document", "expert")), hint, method)


# --------------------------------------------------------------------------- 06.4


def first_choice_divergence(trace: RoutingTrace, domain: str, layer: int) -> float:
    """Total-variation distance between the first-choice load of ``domain``'s documents and that
    of all other documents at ``layer``."""
    docs = np.array(trace.domains)
    inside = trace.select(docs=np.flatnonzero(docs == domain))
    outside = trace.select(docs=np.flatnonzero(docs != domain))
    row = layer_row(trace.layers, layer)
    return float(0.5 * np.abs(expert_load(inside, "first")[row] - expert_load(outside, "first")[row]).sum())


def check_first_choice_divergence(answer, trace: RoutingTrace, domain: str, layer: int) -> Feedback:
    """Exercise 06.4: Figure 7's distance on first choices: TV = 1/2 sum_e |p_domain(e) - p_rest(e)|
    with p the share of first choices, for ``domain``'s documents vs all the others, at ``layer``."""
    name = "Exercise 06.4 (first-choice divergence)"
    hint = "two groups of documents, one first-choice distribution each, and a distance between them."
    method = ("trace.select(docs=...) keeps some documents (np.flatnonzero of a mask on trace.domains); "
              "analysis.expert_load(sub, 'first') gives a group's first-choice shares per layer; the total-variation "
              "distance is half the sum of the absolute differences.")
    if is_todo(answer):
        return todo(name, hint, method)
    value, bad = _number(name, answer, hint, method)
    if bad is not None:  # a Feedback is falsy unless correct
        return bad
    ref = first_choice_divergence(trace, domain, layer)
    if np.isclose(value, ref, atol=1e-6):
        return correct(name, f"TV = {value:.3f} for {domain} at layer {layer}.")
    if np.isclose(value, 2 * ref, atol=1e-6):
        return wrong(name, "that is the sum of absolute differences; TV is half of it.", hint, method)
    docs = np.array(trace.domains)
    row = layer_row(trace.layers, layer)
    either = 0.5 * np.abs(expert_load(trace.select(docs=np.flatnonzero(docs == domain)))[row]
                          - expert_load(trace.select(docs=np.flatnonzero(docs != domain)))[row]).sum()
    if np.isclose(value, either, atol=1e-6):
        return wrong(name, "that uses the top-k load (both choices); use first choices only.", hint, method)
    if not 0 <= value <= 1:
        return wrong(name, "a total-variation distance lies between 0 and 1.", hint, method)
    return not_equal(name, f"it is not the first-choice distance of {domain} vs the rest at layer {layer}", hint, method)


# --------------------------------------------------------------------------- 06.5-06.7: graded questions


def check_word_start_drop(answer, trace: RoutingTrace, layer: int) -> Feedback:
    """Exercise 06.5 (multiple choice): compared with all pairs, does the same-first-expert rate at
    word starts (06.2) (a) drop by more than 1 percentage point, (b) stay within 1 point, (c) rise by
    more than 1 point? The right letter is worked out from ``trace`` at ``layer``."""
    name = "Exercise 06.5 (does it drop at word starts?)"
    diff = same_first_rate(trace, layer, word_start_only=True) - same_first_rate(trace, layer)
    right = "a" if diff < -0.01 else "c" if diff > 0.01 else "b"
    options = {"a": "it drops by more than 1 percentage point",
               "b": "it stays within 1 percentage point",
               "c": "it rises by more than 1 percentage point"}
    why_not = {"a": "compare your 06.2 rate with the rate over all pairs printed by the checker: the difference is "
                    "not a drop of more than a point.",
               "b": "compare your 06.2 rate with the rate over all pairs printed by the checker: they differ by "
                    "more than a point.",
               "c": "compare your 06.2 rate with the rate over all pairs printed by the checker: the difference is "
                    "not a rise of more than a point."}
    why = {"a": "Pieces inside a word often share the expert of the piece before them: part of Table 5's "
                "repetition is words split into tokens, which is why it matters for caching, not for topics.",
           "b": "On this model, pieces inside a word do not share experts more than word starts do: Table 5's "
                "repetition here is not made of split words.",
           "c": "On this model, word starts repeat their neighbour's expert more than pieces inside a word: the "
                "repetition is not made of split words."}[right]
    return choice(name, answer, options, right, {k: v for k, v in why_not.items() if k != right}, why=why,
                  hint="the checker of 06.2 prints both rates once your answer is right.",
                  method="subtract the rate over all pairs from the word-start rate and compare with ±0.01.")


def check_baseline_reading(answer) -> Feedback:
    """Exercise 06.6 (multiple choice): a layer's first-choice repetition is clearly above the uniform
    1/E, but its 95% interval contains the marginal baseline sum_e p_e^2. What does it show?"""
    name = "Exercise 06.6 (reading a rate against its baselines)"
    options = {"a": "neighbouring tokens are routed alike: the rate beats chance",
               "b": "nothing beyond unequal expert use: two random tokens agree that often already",
               "c": "the experts specialise in topics",
               "d": "the router is broken: it should not beat 1/E"}
    why_not = {"a": "1/E is chance only when every expert is used equally; the chance level that accounts for "
                    "unequal use is the marginal one, and the rate does not clear it.",
               "c": "a repetition rate is about neighbouring tokens, not about topics; and this one does not even "
                    "clear the marginal baseline.",
               "d": "a router that uses some experts more than others beats 1/E by construction (sum_e p_e^2 >= 1/E)."}
    return choice(name, answer, options, "b", why_not,
                  why="A claim that neighbours route alike needs a rate above the marginal and the shuffled lines, "
                      "as in section 4's 'above marginal and shuffled' column.",
                  hint="which chance level is the right one when the experts are not used equally (exercise 06.1)?",
                  method="a rate says something about neighbours only where it clears every baseline that keeps the "
                         "expert frequencies; see the three baselines of section 4.")


def check_mediator_reading(answer) -> Feedback:
    """Exercise 06.7 (multiple choice): why is regressing routing similarity on the similarity of the
    mean router inputs (``analysis.hidden_state_control``) not a control for the language-vs-content
    question?"""
    name = "Exercise 06.7 (why not control for the hidden states?)"
    options = {"a": "the router reads the hidden states: language reaches the routing through them, so adjusting "
                    "for them removes part of the effect being measured",
               "b": "the R² is too small for the regression to remove anything",
               "c": "the hidden states are noisy, so the adjustment only adds variance",
               "d": "it is a valid control; the notebook only skips it to save time"}
    why_not = {"b": "the R² is small in some layers, but that is a second, weaker problem; the adjustment would be "
                    "wrong even with a perfect fit.",
               "c": "noise would widen the intervals; the problem is a bias in one direction (towards 'content').",
               "d": "section 9.3 shows that the adjustment moves the difference towards 'content' wherever input "
                    "similarity predicts routing similarity: a bias built into the adjustment."}
    return choice(name, answer, options, "a", why_not,
                  why="A variable on the causal path (a mediator) is not a confounder; adjusting for it biases the "
                      "comparison.",
                  hint="is the hidden state a cause of both the language and the routing, or a step between them?",
                  method="draw text -> hidden states -> router -> routing: a control adjusts for a common cause, not "
                         "for a step on the path.")
