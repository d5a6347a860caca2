"""Exercises of notebook 00 · Quick start (reading a routing trace, comparing two texts, an intervention).

Every checker computes the reference answer itself from the trace(s) the learner used (with
moe_lab's analysis code), never from numbers of today's demo model, and says what is wrong
(expected vs found) with a hint.
"""

from __future__ import annotations

import numpy as np

from ..analysis import expert_load
from ..routing.trace import RoutingTrace
from ..viz import routing_changes
from .arrays import to_array
from .feedback import Feedback, correct, is_todo, todo, wrong


# ---------------------------------------------------------------- 00.1: read a trace

def check_token_experts(answer, trace: RoutingTrace, position: int, layer: int) -> Feedback:
    """Exercise 00.1: the two experts (rank order: first choice first) of the token at row ``position``
    of ``trace`` (document 0; row 0 is BOS) in model layer ``layer``.

    ``answer``: a list of k expert ids. Reference: ``trace.expert_ids[trace.layer_index(layer), position]``.
    """
    name = "Exercise 00.1 (a token's experts)"
    if is_todo(answer):
        return todo(name, "trace.expert_ids has shape [layers, tokens, k]; use trace.layer_index(layer) for the row.")
    row = trace.layer_index(layer)
    expected = [int(e) for e in trace.expert_ids[row, position]]
    got = to_array(answer)
    if got is None or got.ndim != 1 or len(got) != trace.top_k:
        return wrong(name, f"expected a list of {trace.top_k} expert ids, found {answer!r}.",
                     "Convert with .tolist(): e.g. [3, 6].")
    got = [int(e) for e in got]
    if got == expected:
        return correct(name, f"correct: token {position} went to experts {expected} in layer {layer} "
                             f"(weights {[round(float(w), 3) for w in trace.weights[row, position]]}).")
    if sorted(got) == sorted(expected):
        return wrong(name, f"right experts, wrong order: expected {expected}, found {got}.",
                     "Column 0 of expert_ids is the first choice (the larger weight).")
    for other in range(trace.n_layers):
        if [int(e) for e in trace.expert_ids[other, position]] == got and other != row:
            return wrong(name, f"expected {expected}, found {got}: those are the experts of layer {trace.layers[other]}.",
                         f"Use trace.layer_index({layer}), not the layer number as a row (they can differ).")
    for p in (position - 1, position + 1):
        if 0 <= p < trace.n_tokens and [int(e) for e in trace.expert_ids[row, p]] == got:
            return wrong(name, f"expected {expected}, found {got}: those belong to the token at row {p}.",
                         "Row 0 of the trace is the BOS token <s>; the text's tokens start at row 1.")
    return wrong(name, f"expected {expected}, found {got}.",
                 "trace.expert_ids[trace.layer_index(layer), position].tolist()")


# ---------------------------------------------------------------- 00.2: is a token always routed alike?

def token_consistency(trace: RoutingTrace, token_id: int, layer: int) -> float:
    """Share of ``token_id``'s occurrences whose first choice at ``layer`` is its most common one."""
    firsts = trace.expert_ids[trace.layer_index(layer), trace.token_ids == token_id, 0]
    if len(firsts) == 0:
        raise ValueError(f"token id {token_id} does not occur in the trace")
    return float(np.bincount(firsts).max() / len(firsts))


def check_token_consistency(answer, trace: RoutingTrace, token_id: int, layer: int) -> Feedback:
    """Exercise 00.2: how consistently is one token (e.g. an indentation piece) routed?

    ``answer``: the share (0-1) of the token's occurrences whose first choice at ``layer`` is the
    expert it goes to most often. 1 means "always the same expert".
    """
    name = "Exercise 00.2 (one token, always the same expert?)"
    if is_todo(answer):
        return todo(name, "select the first choices of the rows where trace.token_ids == token_id, then np.bincount.")
    n = int((trace.token_ids == token_id).sum())
    if n == 0:
        return wrong(name, f"token id {token_id} does not occur in this trace.",
                     "Pick a token id from trace.token_ids (tokenizer.encode gives the id of a piece).")
    expected = token_consistency(trace, token_id, layer)
    got = to_array(answer)
    if got is None or got.ndim != 0:
        return wrong(name, f"expected one number between 0 and 1, found {answer!r}.")
    got = float(got)
    if np.isclose(got, expected, atol=1e-6):
        chance = 1 / trace.n_experts
        return correct(name, f"correct: {got:.0%} of its {n} occurrences go first to the same expert "
                             f"(routing that ignored the token would send about {chance:.0%} to any one expert).")
    counts = np.bincount(trace.expert_ids[trace.layer_index(layer), trace.token_ids == token_id, 0])
    if np.isclose(got, counts.max()):
        return wrong(name, f"{got:g} is a count; expected a share: {counts.max()} of {n} = {expected:.3f}.",
                     "Divide by the number of occurrences.")
    any_counts = np.bincount(trace.expert_ids[trace.layer_index(layer), trace.token_ids == token_id].ravel())
    if np.isclose(got, any_counts.max() / n):
        return wrong(name, f"expected {expected:.3f}, found {got:.3f}: that counts both slots, not the first choice.",
                     "Use column 0 of expert_ids only (the first choice).")
    return wrong(name, f"expected {expected:.3f}, found {got:.3f}.",
                 "firsts = trace.expert_ids[row, trace.token_ids == token_id, 0]; np.bincount(firsts).max() / len(firsts)")


# ---------------------------------------------------------------- 00.3: two languages, one layer

def check_first_choice_tv(answer, trace_a: RoutingTrace, trace_b: RoutingTrace, layer: int) -> Feedback:
    """Exercise 00.3: total-variation distance between the first-choice distributions of two texts.

    TV = 1/2 sum_e |p_a(e) - p_b(e)|, with p(e) the share of tokens whose first choice at ``layer``
    is e (``analysis.expert_load(trace, choice="first")``). 0: same usage; 1: disjoint experts.
    """
    name = "Exercise 00.3 (English vs French)"
    if is_todo(answer):
        return todo(name, 'p = analysis.expert_load(trace, choice="first")[row]; TV = 0.5 * abs(p_a - p_b).sum()')
    pa = expert_load(trace_a, choice="first")[trace_a.layer_index(layer)]
    pb = expert_load(trace_b, choice="first")[trace_b.layer_index(layer)]
    expected = 0.5 * float(np.abs(pa - pb).sum())
    got = to_array(answer)
    if got is None or got.ndim != 0:
        return wrong(name, f"expected one number between 0 and 1, found {answer!r}.")
    got = float(got)
    if np.isclose(got, expected, atol=1e-6):
        return correct(name, f"correct: TV = {got:.3f} at layer {layer} (0 = same experts in the same "
                             "proportions, 1 = no expert in common).")
    if np.isclose(got, 2 * expected, atol=1e-6):
        return wrong(name, f"expected {expected:.3f}, found {got:.3f} = twice as much.",
                     "TV distance has a factor 1/2, so that it lies between 0 and 1.")
    ea = expert_load(trace_a)[trace_a.layer_index(layer)]
    eb = expert_load(trace_b)[trace_b.layer_index(layer)]
    if np.isclose(got, 0.5 * np.abs(ea - eb).sum(), atol=1e-6):
        return wrong(name, f"expected {expected:.3f}, found {got:.3f}: you used both slots (choice='either').",
                     'The colours are first choices: expert_load(trace, choice="first").')
    return wrong(name, f"expected {expected:.3f}, found {got:.3f}.",
                 "Use the row of `layer` in both traces (trace.layer_index(layer)).")


# ---------------------------------------------------------------- 00.4: how far does an ablation reach?

def check_changed_share(answer, base: RoutingTrace, new: RoutingTrace) -> Feedback:
    """Exercise 00.4: for each traced layer, the share of tokens whose *set* of experts changed
    between normal routing (``base``) and the intervention (``new``).

    ``answer``: an array of length ``base.n_layers``. Reference: ``viz.routing_changes``.
    """
    name = "Exercise 00.4 (how far does an ablation reach?)"
    if is_todo(answer):
        return todo(name, "compare np.sort(base.expert_ids, -1) with np.sort(new.expert_ids, -1), token by token.")
    _, first, sets = routing_changes(base, new)
    got = to_array(answer)
    if got is None or got.shape != sets.shape:
        return wrong(name, f"expected {len(sets)} numbers (one per layer), found "
                     f"{'?' if got is None else got.shape}.", "Reduce over tokens and slots, keep the layer axis.")
    if np.allclose(got, sets, atol=1e-6):
        reached = [l for l, s in zip(base.layers, sets) if s > 0]
        return correct(name, f"correct: routing changed in layers {reached}; layers before the intervened one "
                             "cannot change.")
    if np.allclose(got, first, atol=1e-6) and not np.allclose(first, sets):
        return wrong(name, "those are shares of tokens whose *first choice* changed; the exercise asks for the set.",
                     "Sort the k experts of each token (np.sort(..., -1)) and compare the whole row.")
    if np.allclose(got, sets * base.n_tokens, atol=1e-6):
        return wrong(name, "those are counts of tokens; expected shares (divide by the number of tokens).")
    bad = int(np.argmax(~np.isclose(got, sets, atol=1e-6)))
    return wrong(name, f"layer {base.layers[bad]}: expected {sets[bad]:.3f}, found {got[bad]:.3f}.",
                 "A token counts once if any of its k experts differs (compare sorted rows, then .any(-1)).")


__all__ = ["check_token_experts", "check_token_consistency", "token_consistency", "check_first_choice_tv",
           "check_changed_share"]
