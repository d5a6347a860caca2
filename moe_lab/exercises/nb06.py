"""Checkers for notebook 06 (the Mixtral paper's routing analysis).

* 06.1 :func:`check_marginal_baseline`: the chance rate of "same first expert" given unequal use;
* 06.2 :func:`check_word_start_repetition`: Table 5 restricted to pairs whose second token starts a word;
* 06.3 :func:`check_expert_usage`: a document's expert-usage vector (the language-vs-content study's unit);
* 06.4 :func:`check_first_choice_divergence`: Figure 7's distance, on first choices only.

Every checker computes the reference answer itself, from the trace the learner used, with the
same moe_lab code as the notebook; nothing depends on the demo model's weights.
"""

from __future__ import annotations

import numpy as np

from ..analysis import expert_load, expert_usage
from ..routing.trace import RoutingTrace, layer_row
from .arrays import to_number
from .feedback import Feedback, correct, is_todo, todo, wrong


def _number(name: str, answer) -> tuple[float | None, Feedback | None]:
    value = to_number(answer)
    if value is None:
        return None, wrong(name, f"expected one number, found {type(answer).__name__} "
                                 f"with shape {np.shape(answer)}.", "reduce your result to a single float.")
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
    hint = ("p = analysis.expert_load(trace, 'first')[row] gives each expert's share of first choices; "
            "two independent tokens agree with probability sum_e p_e * p_e.")
    if is_todo(answer):
        return todo(name, hint)
    value, bad = _number(name, answer)
    if bad is not None:  # a Feedback is falsy unless correct
        return bad
    ref = marginal_baseline(trace, layer)
    if np.isclose(value, ref, atol=1e-6):
        return correct(name, f"{value:.4f} (uniform use would give 1/E = {1 / trace.n_experts:.4f}).")
    if np.isclose(value, 1 / trace.n_experts, atol=1e-6):
        return wrong(name, f"{value:.4f} is 1/E, the uniform baseline; the experts are not used equally.", hint)
    either = expert_load(trace, "either")[layer_row(trace.layers, layer)]
    if np.isclose(value, float((either ** 2).sum()), atol=1e-6):
        return wrong(name, "that uses the top-k load (both choices); the statistic compares first choices only.", hint)
    if not 0 < value <= 1:
        return wrong(name, f"{value} is not a probability.", hint)
    if np.isclose(value, ref, atol=5e-5):  # right to the 4 decimals a printout shows, but rounded
        return wrong(name, f"{value:.6g} is rounded: the check compares to within 1e-6, so pass the unrounded "
                           "float (the variable, not a number copied from a printout).", hint)
    return wrong(name, f"{value:.6g} is not sum_e p_e^2 at layer {layer} (compared to within 1e-6).", hint)


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
    hint = ("pairs are (first[:-1], first[1:]) with first = trace.expert_ids[row, :, 0]; keep a pair when "
            "doc_ids agree, neither token is BOS (id 1) and trace.pieces[i + 1] starts with '▁'.")
    if is_todo(answer):
        return todo(name, hint)
    value, bad = _number(name, answer)
    if bad is not None:  # a Feedback is falsy unless correct
        return bad
    ref = same_first_rate(trace, layer, word_start_only=True)
    if np.isclose(value, ref, atol=1e-6):
        return correct(name, f"{value:.3f} at word starts vs {same_first_rate(trace, layer):.3f} over all pairs.")
    if np.isclose(value, same_first_rate(trace, layer), atol=1e-6):
        return wrong(name, "that is the rate over all pairs: the word-start mask is missing.", hint)
    if np.isclose(value, 100 * ref, atol=1e-4):
        return wrong(name, "that is a percentage; give the rate as a fraction in [0, 1].", hint)
    return wrong(name, f"expected {ref:.4f} at layer {layer}, found {value:.4f}.", hint)


# --------------------------------------------------------------------------- 06.3


def check_expert_usage(answer, trace: RoutingTrace, layer: int) -> Feedback:
    """Exercise 06.3: the [documents, experts] matrix of each document's share of its top-k slots
    that went to each expert at ``layer``, BOS tokens left out (rows sum to 1)."""
    name = "Exercise 06.3 (expert-usage vectors)"
    hint = ("count, per document, how often each expert appears in trace.expert_ids[row] (all k slots) over "
            "tokens that are not BOS, then divide each row by its total (np.add.at is handy).")
    if is_todo(answer):
        return todo(name, hint)
    ref = expert_usage(trace)[layer_row(trace.layers, layer)]  # [D, E]
    a = np.asarray(answer, dtype=np.float64)
    if a.shape != ref.shape:
        return wrong(name, f"expected shape {ref.shape} (documents, experts), found {a.shape}.", hint)
    if np.allclose(a, ref, atol=1e-6):
        return correct(name, f"{ref.shape[0]} documents x {ref.shape[1]} experts.")
    if not np.allclose(a.sum(1), 1, atol=1e-6):
        return wrong(name, f"rows should sum to 1 (shares); row sums range {a.sum(1).min():.3g}-{a.sum(1).max():.3g}.",
                     hint)
    with_bos = expert_usage(trace, bos_id=None)[layer_row(trace.layers, layer)]
    if np.allclose(a, with_bos, atol=1e-6):
        return wrong(name, "BOS tokens are counted: every document starts with the same <s>, which makes them look "
                           "alike; leave them out.", hint)
    d, e = np.unravel_index(np.abs(a - ref).argmax(), ref.shape)
    return wrong(name, f"document {d}, expert {e}: expected {ref[d, e]:.4f}, found {a[d, e]:.4f} "
                       "(did you count only the first choice?).", hint)


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
    hint = ("trace.select(docs=...) keeps some documents; analysis.expert_load(sub, 'first') gives first-choice "
            "shares; TV is half the sum of absolute differences.")
    if is_todo(answer):
        return todo(name, hint)
    value, bad = _number(name, answer)
    if bad is not None:  # a Feedback is falsy unless correct
        return bad
    ref = first_choice_divergence(trace, domain, layer)
    if np.isclose(value, ref, atol=1e-6):
        return correct(name, f"TV = {value:.3f} for {domain} at layer {layer}.")
    if np.isclose(value, 2 * ref, atol=1e-6):
        return wrong(name, "that is the sum of absolute differences; TV is half of it.", hint)
    docs = np.array(trace.domains)
    row = layer_row(trace.layers, layer)
    either = 0.5 * np.abs(expert_load(trace.select(docs=np.flatnonzero(docs == domain)))[row]
                          - expert_load(trace.select(docs=np.flatnonzero(docs != domain)))[row]).sum()
    if np.isclose(value, either, atol=1e-6):
        return wrong(name, "that uses the top-k load (both choices); use first choices only.", hint)
    return wrong(name, f"expected {ref:.4f}, found {value:.4f}.", hint)
