"""Exercises of notebook 02 · The full model (the load-balancing loss, Switch-style routing, the KV cache
with a sliding window, a custom routing function).

Every checker computes the reference answer itself, with moe_lab's own code, from the inputs the
learner used, and says what is wrong (expected vs found) with a hint.
"""

from __future__ import annotations

import math

import torch

from ..model import ModelArgs, count_params, load_balancing_loss, topk_softmax_routing
from .arrays import to_number
from .feedback import Feedback, correct, is_todo, todo, wrong


# ---------------------------------------------------------------- 02.1: the load-balancing loss by hand

def check_load_balancing(answer, router_logits, n_experts: int, k: int) -> Feedback:
    """Exercise 02.1: transformers' load-balancing loss E * sum_e f_e P_e, by hand.

    ``router_logits``: one (N, E) tensor per layer. Pool the tokens of all layers; f_e is the fraction
    of (token, layer) rows whose top-k contains e (the f_e sum to k), P_e the mean router probability.
    ``answer``: a number. The reference is ``moe_lab.load_balancing_loss``.
    """
    name = "Exercise 02.1 (load-balancing loss by hand)"
    if is_todo(answer):
        return todo(name, "cat the layers, softmax, one-hot of the top-k summed over the k slots, mean over rows.")
    got = to_number(answer)
    if got is None:
        return wrong(name, f"expected a number, found {answer!r}.")
    ref = float(load_balancing_loss(list(router_logits), n_experts, k))
    if math.isclose(got, ref, rel_tol=1e-4, abs_tol=1e-6):
        return correct(name, f"correct: {got:.5f} (balanced routing would give k = {k}).")
    per_layer = [float(load_balancing_loss([lg], n_experts, k)) for lg in router_logits]
    if math.isclose(got, ref / k, rel_tol=1e-4):
        return wrong(name, f"expected {ref:.5f}, found {got:.5f} = expected / k: your f_e sum to 1 (a share of "
                           "assignments).",
                     "transformers' f_e is the fraction of tokens whose top-k contains e: it sums to k.")
    if math.isclose(got, sum(per_layer), rel_tol=1e-4) and len(per_layer) > 1:
        return wrong(name, f"expected {ref:.5f}, found {got:.5f}: the sum of per-layer losses (balanced at k x L).",
                     "transformers pools all layers' tokens first, then computes one E * sum f_e P_e.")
    if math.isclose(got, sum(per_layer) / len(per_layer), rel_tol=1e-4) and len(per_layer) > 1:
        return wrong(name, f"expected {ref:.5f}, found {got:.5f}: the mean of per-layer losses.",
                     "transformers pools all layers' tokens first; the per-layer mean is a different (stricter) loss.")
    return wrong(name, f"expected {ref:.5f}, found {got:.5f}.",
                 "Softmax over experts in fp32; f from the top-k of the probabilities; multiply by E at the end.")


# ---------------------------------------------------------------- 02.2: Switch-style routing

def check_switch_routing(answer, args: ModelArgs) -> Feedback:
    """Exercise 02.2: for a top-1 (Switch-style) config, (active parameters, balanced load-balancing value).

    ``answer``: a pair ``(active, balanced)``; references: ``count_params(args).active`` and k.
    """
    name = "Exercise 02.2 (Switch-style routing)"
    if is_todo(answer):
        return todo(name, "count_params(args).active; and what do the f_e sum to when k = 1?")
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
        return wrong(name, f"active: {active:,} is the total; a top-1 token runs one expert per layer "
                           f"(expected {ref.active:,}).", "count_params(args).active")
    if active != ref.active:
        return wrong(name, f"active: expected {ref.active:,}, found {active:,}.", "count_params(args).active")
    if not math.isclose(balanced, args.experts_per_token, abs_tol=1e-6):
        return wrong(name, f"balanced value: expected {args.experts_per_token}, found {balanced:g}.",
                     "At balance f_e = k/E and P_e = 1/E, so E * sum_e f_e P_e = k.")
    return correct(name, f"correct: {active:,} active parameters; balanced load_balancing = 1 for top-1.")


# ---------------------------------------------------------------- 02.3: the KV cache with a sliding window

def check_sliding_window_decode(answer, model, seq: torch.Tensor, prompt_len: int) -> Feedback:
    """Exercise 02.3: the logits of a cached incremental decode of ``seq`` with a sliding-window model.

    ``answer``: a (1, T, V) tensor: prefill ``seq[:, :prompt_len]`` with a cache, then one token at a
    time. It must equal the full forward; the checker also checks the model has a window.
    """
    name = "Exercise 02.3 (sliding window and the KV cache)"
    if is_todo(answer):
        return todo(name, "copy section 4's loop with the sliding-window model and torch.cat the pieces.")
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
    return wrong(name, f"position {t} differs from the full forward by {diff[t]:.3g}.",
                 "Use one cache for the whole sequence (model.new_cache) and pass cache= on every call.")


# ---------------------------------------------------------------- 02.4: force an expert

def check_force_routing_fn(fn, expert: int = 3, n_experts: int = 8, k: int = 2, seed: int = 0) -> Feedback:
    """Exercise 02.4: a routing function ``fn(logits, k) -> (probs, indices, weights)`` that adds 100 to
    the logit of ``expert`` and then calls ``topk_softmax_routing``.

    The checker calls ``fn`` on random logits and compares with that reference.
    """
    name = "Exercise 02.4 (force an expert)"
    if is_todo(fn):
        return todo(name, "def force(logits, k): return topk_softmax_routing(logits + bonus, k)")
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
        return todo(name, "your function returns None: return topk_softmax_routing(logits + bonus, k).")
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
