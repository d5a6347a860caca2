"""Exercises of notebook 00 · Quick start (reading a routing trace, comparing two texts, an intervention).

Every checker computes the reference answer itself from the trace(s) the learner used (with
moe_lab's analysis code), never from numbers of today's demo model, and says what kind of wrong an
answer is (never the reference value), with a nudge and a second-level hint (the method).

* 00.5 :func:`check_ablation_reach`, 00.6 :func:`check_same_token_reason`: graded questions (multiple choice).
"""

from __future__ import annotations

import numpy as np

from ..analysis import expert_load
from ..routing.trace import RoutingTrace
from ..viz import routing_changes
from .arrays import to_array
from .feedback import Feedback, correct, is_todo, todo, wrong
from .questions import choice, in_range


# ---------------------------------------------------------------- 00.1: read a trace

def check_token_experts(answer, trace: RoutingTrace, position: int, layer: int) -> Feedback:
    """Exercise 00.1: the two experts (rank order: first choice first) of the token at row ``position``
    of ``trace`` (document 0; row 0 is BOS) in model layer ``layer``.

    ``answer``: a list of k expert ids. Reference: ``trace.expert_ids[trace.layer_index(layer), position]``.
    """
    name = "Exercise 00.1 (a token's experts)"
    if is_todo(answer):
        return todo(name, "trace.expert_ids has shape [layers, tokens, k]: three indices pick one token's experts.",
                    "the first index is the row of model layer `layer` (trace.layer_index), the second the "
                    "token's row, the third all k slots; turn the result into a list.")
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
        return wrong(name, "right experts, wrong order.",
                     "Column 0 of expert_ids is the first choice (the larger weight).")
    for other in range(trace.n_layers):
        if [int(e) for e in trace.expert_ids[other, position]] == got and other != row:
            return wrong(name, f"those are the experts of layer {trace.layers[other]}.",
                         f"Use trace.layer_index({layer}), not the layer number as a row (they can differ).")
    for p in (position - 1, position + 1):
        if 0 <= p < trace.n_tokens and [int(e) for e in trace.expert_ids[row, p]] == got:
            return wrong(name, f"those belong to the token at row {p}.",
                         "Row 0 of the trace is the BOS token <s>; the text's tokens start at row 1.")
    return wrong(name, "not equal to the token's experts in that layer.",
                 "trace.expert_ids has shape [layers, tokens, k]: three indices pick one token's experts.",
                 "the first index is the row of model layer `layer` (trace.layer_index), the second the token's "
                 "row (row 0 is BOS), the third all k slots in rank order.")


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
        return todo(name, "keep the token's occurrences (a mask on trace.token_ids) and their first choices.",
                    "count how often each expert is the first choice (np.bincount); the largest count over the "
                    "number of occurrences is the share.")
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
        return wrong(name, f"{got:g} is a count; the exercise asks for a share of the {n} occurrences.",
                     "Divide by the number of occurrences.")
    any_counts = np.bincount(trace.expert_ids[trace.layer_index(layer), trace.token_ids == token_id].ravel())
    if np.isclose(got, any_counts.max() / n):
        return wrong(name, f"found {got:.3f}: that counts both slots, not the first choice.",
                     "Use column 0 of expert_ids only (the first choice).")
    return wrong(name, f"found {got:.3f}: not equal to the reference.",
                 "keep the token's occurrences (a mask on trace.token_ids) and their first choices (column 0).",
                 "count how often each expert is the first choice (np.bincount); the largest count over the number "
                 "of occurrences is the share.")


# ---------------------------------------------------------------- 00.3: two languages, one layer

def check_first_choice_tv(answer, trace_a: RoutingTrace, trace_b: RoutingTrace, layer: int) -> Feedback:
    """Exercise 00.3: total-variation distance between the first-choice distributions of two texts.

    TV = 1/2 sum_e |p_a(e) - p_b(e)|, with p(e) the share of tokens whose first choice at ``layer``
    is e (``analysis.expert_load(trace, choice="first")``). 0: same usage; 1: disjoint experts.
    """
    name = "Exercise 00.3 (English vs French)"
    if is_todo(answer):
        return todo(name, "you need each text's share of first choices per expert at that layer.",
                    'analysis.expert_load(trace, choice="first") gives [layers, experts] shares; take the layer\'s '
                    "row in each trace; TV is half the sum of the absolute differences.")
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
        return wrong(name, f"found {got:.3f}: twice the reference.",
                     "TV distance has a factor 1/2, so that it lies between 0 and 1.")
    ea = expert_load(trace_a)[trace_a.layer_index(layer)]
    eb = expert_load(trace_b)[trace_b.layer_index(layer)]
    if np.isclose(got, 0.5 * np.abs(ea - eb).sum(), atol=1e-6):
        return wrong(name, f"found {got:.3f}: you used both slots (choice='either').",
                     'The colours are first choices: expert_load(trace, choice="first").')
    return wrong(name, f"found {got:.3f}: not equal to the reference.",
                 "Use the row of `layer` in both traces (trace.layer_index(layer)).",
                 'TV = 1/2 sum_e |p_a(e) - p_b(e)| with p from expert_load(trace, choice="first").')


# ---------------------------------------------------------------- 00.4: how far does an ablation reach?

def check_changed_share(answer, base: RoutingTrace, new: RoutingTrace) -> Feedback:
    """Exercise 00.4: for each traced layer, the share of tokens whose *set* of experts changed
    between normal routing (``base``) and the intervention (``new``).

    ``answer``: an array of length ``base.n_layers``. Reference: ``viz.routing_changes``.
    """
    name = "Exercise 00.4 (how far does an ablation reach?)"
    if is_todo(answer):
        return todo(name, "a token's *set* of experts changed when any of its k experts differs, in any order.",
                    "sort each token's k experts in both traces (np.sort along the last axis), compare, reduce over "
                    "the slots with .any and over the tokens with .mean, keeping the layer axis.")
    _, first, sets = routing_changes(base, new)
    got = to_array(answer)
    if got is None or got.shape != sets.shape:
        return wrong(name, f"expected one number per traced layer (shape {sets.shape}), found "
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
    bad = ~np.isclose(got, sets, atol=1e-6)
    return wrong(name, f"not equal: {int(bad.sum())} of {bad.size} layers differ (the first is layer "
                       f"{base.layers[int(np.argmax(bad))]}).",
                 "A token counts once if any of its k experts differs, whatever their order.",
                 "sort each token's k experts in both traces, compare, reduce over the slots with .any and over "
                 "the tokens with .mean.")


__all__ = ["check_token_experts", "check_token_consistency", "token_consistency", "check_first_choice_tv",
           "check_changed_share"]


# --------------------------------------------------------------------------- 00.5-00.6: graded questions


def check_ablation_reach(answer) -> Feedback:
    """Exercise 00.5 (multiple choice): an expert of the *first* layer is switched off (00.4). Which
    layers' routing can change?"""
    name = "Exercise 00.5 (which layers can change?)"
    options = {"a": "only the first layer, where the expert was switched off",
               "b": "the first layer and every later one: each later router reads hidden states the change has "
                    "passed through",
               "c": "every layer equally, because all experts share their weights",
               "d": "none: the router simply picks the next expert, so nothing downstream moves"}
    why_not = {"a": "the first layer's output is the input of the second layer's router, and so on: a change "
                    "travels up the residual stream.",
               "c": "experts do not share weights; and the layers after the change differ from the layers before "
                    "it (there are none before the first layer here, but there would be for a later one).",
               "d": "the next expert computes something else, so the first layer's output changes, and with it what "
                    "every later router reads; 00.4's shares show it."}
    return choice(name, answer, options, "b", why_not,
                  why="An ablation at layer l can change routing at l and after, never before: the model runs bottom "
                      "to top.",
                  hint="what does the second layer's router read?",
                  method="follow one token up the model: layer 1's router reads the residual stream after layer 0's "
                         "MoE output, which the ablation changed.")


def check_same_token_reason(answer) -> Feedback:
    """Exercise 00.6 (multiple choice): a token that occurs many times gets the same first-choice
    expert at the first layer almost every time (00.2). The most likely reason?"""
    name = "Exercise 00.6 (why the same expert for the same token?)"
    options = {"a": "that expert specialises in the token's topic",
               "b": "the first layer's router sees little besides the token's own embedding, so the same token id "
                    "is routed alike: close to a lookup on the token id",
               "c": "chance: with 8 experts, repeats are common",
               "d": "the tokenizer assigns each token to an expert"}
    why_not = {"a": "the same expert for the same token says nothing about topics: the token (a bracket, an "
                    "indentation piece) occurs in every kind of text.",
               "c": "by chance a token would land on its most frequent expert about 1/8 of the time plus a little; "
                    "'almost every time' is far above that.",
               "d": "the tokenizer only maps text to ids; the router decides, from the hidden state."}
    return choice(name, answer, options, "b", why_not,
                  why="Deeper layers mix in more context, so the same token can be routed differently there "
                      "(notebook 06 measures this as vocabulary specialisation).",
                  hint="what does the first router have to go on, besides the token itself?",
                  method="the first layer's router reads the embedding plus one attention layer's mix of the context; "
                         "compare the consistency at the first and at the last layer.")
