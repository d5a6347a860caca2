"""Exercises of notebook 01 · Building blocks (RoPE, attention, the router, parameter and cache arithmetic).

Every checker computes the reference answer itself, with moe_lab's own code, from the inputs the
learner used, and says what kind of wrong an answer is (never the reference value), with a nudge
and a second-level hint (the method).

* 01.6 :func:`check_routing_orders` (multiple choice), 01.7 :func:`check_gqa_factor` (a number): graded questions.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..checkpoints.convert import half_to_interleaved
from ..model import Attention, ModelArgs, count_params, rope_cos_sin, rope_inv_freq, topk_softmax_routing
from .arrays import to_array
from .feedback import Feedback, correct, is_todo, todo, wrong
from .questions import choice, in_range


def _tensor(answer) -> torch.Tensor | None:
    """The answer as a float64 tensor, or None when it cannot be one."""
    a = to_array(answer)
    return None if a is None else torch.from_numpy(a)


# ---------------------------------------------------------------- 01.1: the inverse permutation

def check_inverse_permutation(answer, hd: int) -> Feedback:
    """Exercise 01.1: the channel order that undoes ``perm`` (interleaved -> rotate_half, section 2.2).

    ``answer``: a list (or tensor) ``inv`` of length ``hd`` such that ``x[..., perm][..., inv] == x``,
    i.e. what ``half_to_interleaved`` does to the rows of one head.
    """
    name = "Exercise 01.1 (undo the q/k permutation)"
    if is_todo(answer):
        return todo(name, "perm sends interleaved channel 2i to position i and 2i+1 to i + hd/2; undo that.",
                    "the inverse of a permutation p is the index order that sorts p: position j of the inverse "
                    "holds the place where channel j ended up in perm.")
    perm = torch.cat([torch.arange(0, hd, 2), torch.arange(1, hd, 2)])
    # moe_lab's converter applied to the row numbers of one head: where each interleaved row comes from
    expected = half_to_interleaved(torch.arange(hd, dtype=torch.float64)[:, None], 1)[:, 0].long()
    got = [int(v) for v in np.asarray(answer).ravel()] if np.asarray(answer).ndim else None
    if got is None or len(got) != hd:
        return wrong(name, f"expected a list of {hd} channel indices, found {answer!r}.",
                     "Return one index per channel, e.g. a list or torch.argsort(...).")
    if sorted(got) != list(range(hd)):
        return wrong(name, f"{got} is not a permutation of 0..{hd - 1} (an index is repeated or missing).",
                     "Every channel must appear exactly once.")
    if got == perm.tolist() and not torch.equal(perm, expected):
        return wrong(name, f"{got} is perm itself: applying it twice does not give the channels back for hd = {hd}.",
                     "You need the inverse: for each channel, the position where perm put it.",
                     "the index order that sorts perm is its inverse (argsort).")
    if got != expected.tolist():
        n_bad = sum(g != e for g, e in zip(got, expected.tolist()))
        return wrong(name, f"not the inverse: {n_bad} of {hd} positions are wrong.",
                     "Check x[..., perm][..., answer] == x on torch.arange(hd).",
                     "the index order that sorts perm is its inverse (argsort).")
    note = (" For hd = 4 perm is [0, 2, 1, 3], its own inverse: that is why the wrong direction works there."
            if hd == 4 else "")
    return correct(name, f"correct: {got} undoes perm.{note}")


# ---------------------------------------------------------------- 01.2: a window of one

def window_one_reference(x: torch.Tensor, attn: Attention, args: ModelArgs) -> torch.Tensor:
    """What moe_lab's ``Attention`` outputs for ``x`` (B, T, D) when each token sees only itself."""
    B, T, _ = x.shape
    a = args
    pos = torch.arange(T)[None].expand(B, -1)
    cos, sin = rope_cos_sin(pos, rope_inv_freq(a.head_dim, a.rope_theta), x.dtype)
    only_self = torch.eye(T, dtype=torch.bool)[None, None]  # (1, 1, T, S)
    with torch.no_grad():
        return attn(x, cos, sin, mask=only_self)


def check_window_one(answer, x: torch.Tensor, attn: Attention, args: ModelArgs) -> Feedback:
    """Exercise 01.2: the attention output with ``WINDOW = 1``, computed *without* a softmax.

    With a window of one key, each token attends only to itself with probability 1, so the output is
    its own value vector (its kv head's, shared by the query heads of the group), through ``wo``.
    ``answer``: a (B, T, D) tensor; ``x``, ``attn`` and ``args`` are those of section 3.
    """
    name = "Exercise 01.2 (a window of one)"
    if is_todo(answer):
        return todo(name, "probs is 1 on the diagonal: what does each token's output become?",
                    "each token's own value vector (its kv head's, repeated for the query heads of its group), "
                    "flattened over heads, through the output projection wo.")
    expected = window_one_reference(x, attn, args).double()
    got = _tensor(answer)
    if got is None or got.shape != expected.shape:
        return wrong(name, f"expected shape {tuple(expected.shape)}, found "
                     f"{None if got is None else tuple(got.shape)}.",
                     "v has shape (B, T, Hkv, hd): repeat each kv head for its query heads, flatten, then @ wo.T.")
    if torch.allclose(got, expected, atol=1e-4, rtol=1e-4):
        return correct(name, "correct: with one key, attention just copies each token's own value vector.")
    v = (x @ attn.wv.weight.T).double()  # (B, T, Hkv*hd)
    if got.shape == v.shape and torch.allclose(got, v, atol=1e-4):
        return wrong(name, "that is v itself: the heads' outputs still go through the output projection wo.",
                     "Repeat kv heads for their query heads (repeat_interleave), flatten, then multiply by wo.T.")
    bad = ~torch.isclose(got, expected, atol=1e-4, rtol=1e-4)
    return wrong(name, f"shape is right but {int(bad.sum())} of {bad.numel()} values differ from moe_lab's "
                       "Attention with a one-key mask.",
                 "Each query head h reads kv head h // group: use repeat_interleave(group, dim=2), not repeat.")


# ---------------------------------------------------------------- 01.3: route one token by hand

def check_route_token(answer, logits_row, k: int = 2) -> Feedback:
    """Exercise 01.3: route one token by hand: its top-k experts and their mixing weights.

    ``logits_row``: the token's E router logits (here with a tie). ``answer``: ``(experts, weights)``,
    two sequences of length k; weights must be renormalised over the k chosen experts. When logits
    tie, either order is right: experts are compared as a set, weights expert by expert.
    """
    name = "Exercise 01.3 (route one token by hand)"
    if is_todo(answer):
        return todo(name, "three steps: softmax, top-k, renormalise.",
                    "softmax over all experts, keep the k largest probabilities, divide them by their sum; with a "
                    "tie, either of the tied experts is right.")
    logits = torch.as_tensor(logits_row, dtype=torch.float32).reshape(1, -1)
    probs, idx, weights = topk_softmax_routing(logits, k)
    expected = {int(e): float(w) for e, w in zip(idx[0], weights[0])}
    try:
        experts, ws = answer
        experts = [int(e) for e in np.asarray(experts).ravel()]
        ws = [float(w) for w in np.asarray(ws, dtype=np.float64).ravel()]
    except (TypeError, ValueError):
        return wrong(name, f"expected a pair (experts, weights), found {answer!r}.",
                     "Return e.g. ([3, 5], [0.5, 0.5]).")
    if len(experts) != k or len(ws) != k:
        return wrong(name, f"expected k = {k} experts and k weights, found {len(experts)} and {len(ws)}.",
                     f"Keep the top k = {k}.")
    # the tie: every expert whose logit equals the k-th largest may be chosen
    kth = logits[0].topk(k).values[-1]
    allowed = set((logits[0] > kth).nonzero().ravel().tolist()) | set((logits[0] == kth).nonzero().ravel().tolist())
    if not set(experts) <= allowed or len(set(experts)) != k:
        return wrong(name, f"experts {experts} are not the {k} largest logits.",
                     "softmax keeps the order of the logits: the top-k probabilities are the top-k logits.")
    ref = {e: float(w) for e, w in zip(experts, torch.softmax(logits[0, experts].double(), -1))}
    if all(math.isclose(w, ref[e], abs_tol=1e-5) for e, w in zip(experts, ws)):
        return correct(name, f"correct: experts {experts}, weights {[round(w, 4) for w in ws]} (sum 1).")
    full = probs[0].double()
    if all(math.isclose(w, float(full[e]), abs_tol=1e-5) for e, w in zip(experts, ws)):
        return wrong(name, f"weights {[round(w, 4) for w in ws]} sum to {sum(ws):.4f}, not 1: these are the "
                           "softmax probabilities before renormalising.",
                     "Divide the k kept probabilities by their sum (that is what Mixtral mixes with).")
    n_bad = sum(not math.isclose(w, ref[e], abs_tol=1e-5) for e, w in zip(experts, ws))
    return wrong(name, f"the experts are right; {n_bad} of {k} weights are not.",
                 "The weights of the k chosen experts must sum to 1.",
                 "Softmax over all logits, keep the chosen experts' probabilities, divide by their sum.")


# ---------------------------------------------------------------- 01.4: parameter arithmetic

def check_param_count(answer, args: ModelArgs) -> Feedback:
    """Exercise 01.4: (total, active) parameters of ``args``, counted by hand as in section 7.

    ``answer``: a pair of integers. The reference is ``moe_lab.count_params(args)``.
    """
    name = "Exercise 01.4 (count the parameters)"
    if is_todo(answer):
        return todo(name, "reuse section 7's count with this config's numbers.",
                    "embeddings and head (2 V D), per layer: attention, 2 norms, a router (E D) and E experts of "
                    "3 D I; plus the final norm. Active: K experts per layer instead of E.")
    ref = count_params(args)
    try:
        total, active = (int(v) for v in answer)
    except (TypeError, ValueError):
        return wrong(name, f"expected a pair (total, active) of integers, found {answer!r}.")
    if (total, active) == (ref.total, ref.active):
        return correct(name, f"correct: {total:,} total, {active:,} active per token.")
    D, V, L = args.dim, args.vocab_size, args.n_layers
    expert = 3 * D * args.hidden_dim
    diagnosis = {
        ref.total - V * D: "one embedding matrix is missing: the input embedding and the output head are separate.",
        ref.total - L * args.n_experts * D: "the routers (E x D per layer) are missing.",
        ref.total - L * 2 * D - D: "the norms (2 per layer, plus the final one) are missing.",
    }
    if total != ref.total:
        return wrong(name, "total: " + diagnosis.get(total, "not equal to the reference."),
                     "List every weight matrix and vector of one block, then multiply by the number of layers.",
                     "Sum embeddings + head, attention, norms, routers and E experts of 3*D*I per layer.")
    if active == ref.total or active == ref.active + L * (args.n_experts - args.experts_per_token) * expert:
        return wrong(name, "active: you counted all E experts.",
                     f"A token runs only experts_per_token = {args.experts_per_token} experts per layer.")
    return wrong(name, "the total is right; active: not equal to the reference.",
                 "What does a token not run?",
                 "Active = total with K experts per layer instead of E (everything else is shared).")


# ---------------------------------------------------------------- 01.5: the KV cache

def check_kv_cache_bytes(answer, args: ModelArgs, bytes_per_value: int = 2) -> Feedback:
    """Exercise 01.5: bytes of KV cache per token: 2 (k and v) x layers x kv heads x head_dim x bytes.

    ``answer``: an integer (bf16: ``bytes_per_value = 2``).
    """
    name = "Exercise 01.5 (KV cache per token)"
    if is_todo(answer):
        return todo(name, "what is stored per token, per layer?",
                    "one k and one v vector of head_dim values per kv head per layer, 2 bytes per bf16 value.")
    per_head = args.n_layers * args.head_dim * bytes_per_value
    expected = 2 * args.n_kv_heads * per_head
    try:
        got = int(answer)
    except (TypeError, ValueError):
        return wrong(name, f"expected an integer number of bytes, found {answer!r}.")
    if got == expected:
        return correct(name, f"correct: {got:,} bytes per token ({got / 2**10:.0f} KiB); "
                             f"32k tokens take {expected * 32768 / 2**30:.1f} GiB.")
    if got == 2 * args.n_heads * per_head:
        return wrong(name, f"that is the cache without GQA ({args.n_heads} heads instead of {args.n_kv_heads} "
                           "kv heads).",
                     "Only the kv heads are cached; the query heads share them.")
    if got * 2 == expected:
        return wrong(name, "half the reference. Did you forget that both k and v are cached?")
    if got * bytes_per_value == expected:
        return wrong(name, "that counts values, not bytes.",
                     f"Each value takes {bytes_per_value} bytes.")
    return wrong(name, f"{got:,} bytes: not equal to the reference.",
                 "What is stored per token, per layer, and how many bytes is one bf16 value?",
                 "2 (k and v) x n_layers x n_kv_heads x head_dim x bytes per value.")


__all__ = ["check_inverse_permutation", "check_window_one", "check_route_token", "check_param_count",
           "check_kv_cache_bytes", "window_one_reference"]


# --------------------------------------------------------------------------- 01.6-01.7: graded questions


def check_routing_orders(answer) -> Feedback:
    """Exercise 01.6 (multiple choice): Hugging Face routes by softmax over all E, top-k, renormalise;
    mistral-inference by top-k on the logits, then a softmax over those k (01.3). How do they compare?"""
    name = "Exercise 01.6 (two routing orders)"
    options = {"a": "the same experts and the same weights, except where an exact tie is broken differently",
               "b": "the same experts, but different weights",
               "c": "different experts in general",
               "d": "the same only when k = 1"}
    why_not = {"b": "renormalising the softmax over the k chosen experts gives exp(l_i) / sum of exp(l_j) over the k, "
                    "which is exactly the softmax over those k logits.",
               "c": "softmax is monotonic: the k largest probabilities belong to the k largest logits.",
               "d": "the argument (monotonic softmax, renormalisation = softmax over the k) holds for every k."}
    return choice(name, answer, options, "a", why_not,
                  why="In low precision near-ties become exact ties more often, and the two code paths may break them "
                      "differently: the only case where they disagree.",
                  hint="is the softmax monotonic? and what is a softmax renormalised over a subset?",
                  method="write the renormalised weight of expert i: exp(l_i)/Z divided by the sum over the k chosen "
                         "of exp(l_j)/Z; the Z cancels.")


def check_gqa_factor(answer, args) -> Feedback:
    """Exercise 01.7 (a number): how many times larger would the KV cache per token of ``args`` be with
    one kv head per query head (no GQA)?"""
    name = "Exercise 01.7 (what GQA saves)"
    factor = args.n_heads / args.n_kv_heads
    return in_range(name, answer, factor - 1e-6, factor + 1e-6,
                    diagnoses=[(lambda v: abs(v * factor - 1) < 1e-6, "that is the inverse: how many times "
                                "*smaller* the no-GQA cache would be."),
                               (lambda v: abs(v - args.n_heads) < 1e-6 or abs(v - args.n_kv_heads) < 1e-6,
                                "that is a number of heads, not a ratio of cache sizes.")],
                    unit=" x", why="The cache stores keys and values per kv head; the query heads share them.",
                    hint="the cache size is proportional to the number of kv heads; nothing else changes.",
                    method="divide the number of query heads (args.n_heads) by the number of kv heads (args.n_kv_heads).")
