"""Exercises of notebook 02 · The full model (the load-balancing loss, Switch-style routing, the KV cache
with a sliding window, a custom routing function).

Every checker computes the reference answer itself, with moe_lab's own code, from the inputs the
learner used, and says what kind of wrong an answer is (never the reference value), with a nudge
and a second-level hint (the method). 02.1 is done by hand: it takes the learner's function and runs it
on inputs of its own with ``load_balancing_loss`` switched off (:mod:`moe_lab.exercises.byhand`).

* 02.5 :func:`check_window_cache`, 02.6 :func:`check_forced_expert_effect`: graded questions (multiple choice).
"""

from __future__ import annotations

import math

import torch

from ..model import ModelArgs, count_params, load_balancing_loss, topk_softmax_routing
from .arrays import to_number
from .byhand import run_by_hand
from .feedback import Feedback, correct, is_todo, todo, wrong
from .questions import choice, in_range


# ---------------------------------------------------------------- 02.1: the load-balancing loss by hand

def _fresh_router_logits(n_experts: int, seed: int = 27) -> list[torch.Tensor]:
    """Router logits the learner never saw: 3 layers of (40, E), uneven so the loss is far from k."""
    g = torch.Generator().manual_seed(seed)
    skew = torch.linspace(0, 2, n_experts)
    return [torch.randn(40, n_experts, generator=g) * 1.5 + skew * (layer + 1) / 3 for layer in range(3)]


def check_load_balancing(fn, router_logits, n_experts: int, k: int) -> Feedback:
    """Exercise 02.1: transformers' load-balancing loss E * sum_e f_e P_e, by hand.

    ``fn(router_logits, n_experts, k) -> number``: your function. ``router_logits`` is one (N, E)
    tensor per layer; pool the rows of all layers; f_e is the fraction of rows whose top-k contains e
    (the f_e sum to k), P_e the mean router probability. The checker runs ``fn`` on router logits of
    its own (and on the notebook's), with ``moe_lab.load_balancing_loss`` switched off; the reference is
    ``moe_lab.load_balancing_loss``.
    """
    name = "Exercise 02.1 (load-balancing loss by hand)"
    hint = "pool the layers' rows first; f counts a row once for each expert in its top-k."
    method = ("torch.cat the layers; softmax in fp32; f_e = mean over rows of a 0/1 'e is in the row's top-k' "
              "(one-hot of the top-k indices, summed over the k slots); P_e = mean probability; E * sum f_e P_e.")
    for logits in (_fresh_router_logits(n_experts), list(router_logits)):
        got, bad = run_by_hand(name, fn, (logits, n_experts, k), forbidden=[load_balancing_loss], hint=hint,
                               method=method, what="function fn(router_logits, n_experts, k) -> number")
        if bad is not None:
            return bad
        got = to_number(got)
        if got is None:
            return wrong(name, "your function should return one number (a float or a 0-d tensor).", hint, method)
        ref = float(load_balancing_loss(list(logits), n_experts, k))
        if math.isclose(got, ref, rel_tol=1e-4, abs_tol=1e-6):
            continue
        per_layer = [float(load_balancing_loss([lg], n_experts, k)) for lg in logits]
        if math.isclose(got, ref / k, rel_tol=1e-4):
            return wrong(name, "your value is the reference divided by k: your f_e sum to 1 (a share of "
                               "assignments).",
                         "transformers' f_e is the fraction of tokens whose top-k contains e: it sums to k.", method)
        if math.isclose(got, sum(per_layer), rel_tol=1e-4):
            return wrong(name, "that is the sum of per-layer losses (balanced at k x L).",
                         "transformers pools all layers' tokens first, then computes one E * sum f_e P_e.", method)
        if math.isclose(got, sum(per_layer) / len(per_layer), rel_tol=1e-4):
            return wrong(name, "that is the mean of per-layer losses.",
                         "transformers pools all layers' tokens first; the per-layer mean is a different (stricter) "
                         "loss.", method)
        return wrong(name, "not equal to the reference on the checker's router logits.", hint, method)
    return correct(name, f"correct on the checker's router logits and on yours: "
                         f"{float(load_balancing_loss(list(router_logits), n_experts, k)):.5f} here (balanced routing "
                         f"would give k = {k}).")


# ---------------------------------------------------------------- 02.2: Switch-style routing

def check_switch_routing(answer, args: ModelArgs) -> Feedback:
    """Exercise 02.2: for a top-1 (Switch-style) config, (active parameters, balanced load-balancing value).

    ``answer``: a pair ``(active, balanced)``; references: ``count_params(args).active`` and k.
    """
    name = "Exercise 02.2 (Switch-style routing)"
    if is_todo(answer):
        return todo(name, "moe_lab has a parameter counter; and what do the f_e sum to when k = 1?",
                    "at perfect balance every f_e is k/E and every P_e is 1/E: put those into E * sum_e f_e P_e.")
    if args.experts_per_token != 1:
        return wrong(name, f"args has experts_per_token = {args.experts_per_token}; the exercise is about top-1.",
                     'ModelArgs.from_name("tiny", experts_per_token=1)')
    try:
        active, balanced = answer
        active, balanced = int(active), float(balanced)
    except (TypeError, ValueError):
        return wrong(name, f"expected a pair (active, balanced value), found {answer!r}.")
    ref = count_params(args)
    if active == ref.total:
        return wrong(name, f"active: {active:,} is the total; a top-1 token runs one expert per layer.",
                     "count_params returns both a total and an active count.")
    if active != ref.active:
        return wrong(name, "active: not equal to the reference.", "count the parameters of args_top1, not of args.",
                     "count_params returns both a total and an active count.")
    if not math.isclose(balanced, args.experts_per_token, abs_tol=1e-6):
        return wrong(name, "balanced value: not equal to the reference.", "what do the f_e sum to?",
                     "at perfect balance every f_e is k/E and every P_e is 1/E: put those into E * sum_e f_e P_e.")
    return correct(name, f"correct: {active:,} active parameters; balanced load_balancing = 1 for top-1.")


# ---------------------------------------------------------------- 02.3: the KV cache with a sliding window

def check_sliding_window_decode(answer, model, seq: torch.Tensor, prompt_len: int) -> Feedback:
    """Exercise 02.3: the logits of a cached incremental decode of ``seq`` with a sliding-window model.

    ``answer``: a (1, T, V) tensor: prefill ``seq[:, :prompt_len]`` with a cache, then one token at a
    time. It must equal the full forward; the checker also checks the model has a window.
    """
    name = "Exercise 02.3 (sliding window and the KV cache)"
    if is_todo(answer):
        return todo(name, "section 4's cached loop works for any model: what changes with a window?",
                    "copy section 4's loop with the sliding-window model and torch.cat the pieces along dim 1.")
    if model.args.sliding_window is None:
        return wrong(name, "this model has no sliding window (args.sliding_window is None).",
                     'Build it with ModelArgs.from_name("tiny", sliding_window=4).')
    if not torch.is_tensor(answer):
        return wrong(name, f"expected a tensor of logits, found {type(answer).__name__}.")
    with torch.no_grad():
        full = model(seq)  # (1, T, V)
    if tuple(answer.shape) != tuple(full.shape):
        return wrong(name, f"expected shape {tuple(full.shape)}, found {tuple(answer.shape)}.",
                     "Concatenate the prefill's logits and every step's logits along dim 1.")
    diff = (answer.detach().float() - full.float()).abs().amax(dim=(0, 2))  # (T,)
    if diff.max() <= 1e-4:
        return correct(name, "correct: the cached decode with a sliding window equals the full forward.")
    t = int((diff > 1e-4).nonzero()[0])
    return wrong(name, f"{int((diff > 1e-4).sum())} of {len(diff)} positions differ from the full forward "
                       f"(the first is position {t}).",
                 "Use one cache for the whole sequence (model.new_cache) and pass cache= on every call.")


# ---------------------------------------------------------------- 02.4: force an expert

def check_force_routing_fn(fn, expert: int = 3, n_experts: int = 8, k: int = 2, seed: int = 0) -> Feedback:
    """Exercise 02.4: a routing function ``fn(logits, k) -> (probs, indices, weights)`` that adds 100 to
    the logit of ``expert`` and then calls ``topk_softmax_routing``.

    The checker calls ``fn`` on random logits and compares with that reference.
    """
    name = "Exercise 02.4 (force an expert)"
    if is_todo(fn):
        return todo(name, "a big bonus on one column of the logits makes that expert win every time.",
                    "build a bonus vector that is 100 at `expert` and 0 elsewhere, add it (without changing the "
                    "logits in place), and route the result with topk_softmax_routing.")
    if not callable(fn):
        return wrong(name, f"expected a function fn(logits, k), found {type(fn).__name__}.")
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(16, n_experts, generator=g)
    bonus = torch.zeros(n_experts)
    bonus[expert] = 100.0
    _, ref_idx, ref_w = topk_softmax_routing(logits + bonus, k)
    before = logits.clone()
    try:
        out = fn(logits, k)
    except Exception as exc:  # the learner's code: report, never raise
        return wrong(name, f"calling fn(logits, k) raised {type(exc).__name__}: {exc}.")
    if not torch.equal(logits, before):
        return wrong(name, "fn changed the logits tensor it was given in place.",
                     "Build a new tensor (logits + bonus) instead of logits[:, e] += 100.")
    if out is None:
        return todo(name, "your function returns None: return what topk_softmax_routing returns.")
    if not isinstance(out, tuple) or len(out) != 3:
        return wrong(name, "fn must return (probs, indices, weights), like topk_softmax_routing.")
    probs, idx, w = out
    if tuple(idx.shape) != (16, k):
        return wrong(name, f"indices: expected shape (16, {k}), found {tuple(idx.shape)}.")
    if not (idx[:, 0] == expert).all():
        return wrong(name, f"expert {expert} is not every token's first choice "
                           f"({int((idx[:, 0] == expert).sum())} of 16 tokens).",
                     f"Add 100 to column {expert} of the logits before routing.")
    if not torch.equal(idx, ref_idx) or not torch.allclose(w, ref_w, atol=1e-6):
        return wrong(name, "expert choices or weights differ from topk_softmax_routing(logits + 100 on the expert).",
                     "Call topk_softmax_routing on the modified logits and return its three outputs.")
    return correct(name, f"correct: expert {expert} is always first, with weight ~1 (the second slot gets ~e^-100).")


__all__ = ["check_load_balancing", "check_switch_routing", "check_sliding_window_decode", "check_force_routing_fn"]


# --------------------------------------------------------------------------- 02.5-02.6: graded questions


def check_window_cache(answer) -> Feedback:
    """Exercise 02.5 (multiple choice): with a sliding window of W keys, what does decoding a long
    text need to keep in the KV cache of each layer (02.3)?"""
    name = "Exercise 02.5 (a sliding window and the cache)"
    options = {"a": "every position since the start, as without a window",
               "b": "only the last W positions: older keys can never be attended to again (a rolling buffer)",
               "c": "nothing: the window makes the cache unnecessary",
               "d": "the last W positions of the first layer only"}
    why_not = {"a": "a key older than W positions is outside every later query's window, in every layer: keeping it "
                    "costs memory and is never read.",
               "c": "within the window the keys and values of earlier tokens are still needed at every step.",
               "d": "every layer attends with the same window, so every layer keeps its own last W positions."}
    return choice(name, answer, options, "b", why_not,
                  why="That is why Mistral 7B's memory for the cache stays bounded however long the text.",
                  hint="which keys can a query at position t still attend to?",
                  method="with window W, query t reads keys t-W+1 .. t (02.3's check): count what must be kept.")


def check_forced_expert_effect(answer) -> Feedback:
    """Exercise 02.6 (multiple choice): every token of layer 0 is forced to expert 3 (02.4's routing
    function installed in block 0). What changes?"""
    name = "Exercise 02.6 (what forcing an expert does)"
    options = {"a": "only layer 0's routing; the later layers and the logits stay the same",
               "b": "layer 0 sends every token to expert 3 (in one of its k slots), and the later layers' routing "
                    "and the logits change too, because their inputs changed",
               "c": "nothing: expert 3 computes the same as the expert it replaces",
               "d": "every layer sends every token to expert 3"}
    why_not = {"a": "layer 0's output is what layer 1 reads: a different mix of experts changes it, and the change "
                    "travels up.",
               "c": "each expert has its own weights; replacing one changes the layer's output.",
               "d": "only block 0's routing function was replaced; the later routers still choose, from changed "
                    "inputs."}
    return choice(name, answer, options, "b", why_not,
                  why="moe_lab.intervene(model, ForceExpert(...)) does the same with clean-up.",
                  hint="what do the later routers read?",
                  method="redraw the routing picture with the forced copy and compare layer by layer.")
