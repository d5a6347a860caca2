"""Exercises of notebook 04 (router hooks, traces, interventions): Mixtral's routing rule by hand,
an ablation sweep, how far a forced expert's effect travels, a routing function of your own, and a
trace of another transformers MoE.

Each checker recomputes the answer with moe_lab from the inputs the learner used, and says what kind
of wrong an answer is (never the reference value), with a nudge and the method as a second hint.
04.1 is by hand: it takes the learner's function and runs it on logits of its own with
``topk_softmax_routing`` switched off::

    from moe_lab.exercises import nb04 as ex
    ex.check_topk_by_hand(my_routing, router_logits, k=2)

* 04.6 :func:`check_unchanged_positions`, 04.7 :func:`check_more_experts`: graded questions (multiple choice).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..model import topk_softmax_routing
from ..routing.bridge import is_hf_model
from ..routing.interventions import AblateExpert, ForceExpert, intervene
from ..routing.trace import RoutingTrace
from ..routing.tracing import trace_routing
from .byhand import run_by_hand
from .feedback import Feedback, correct, is_todo, todo, wrong
from .questions import choice, in_range


def next_token_logprobs(model, ids: Sequence[int], *interventions) -> torch.Tensor:
    """log p(next token) [V] after the prompt ``ids`` (a list of token ids), under ``interventions``."""
    with intervene(model, *interventions), torch.inference_mode():
        return model(torch.tensor([list(ids)]))[0, -1].float().log_softmax(-1)


def kl(logp: torch.Tensor, logq: torch.Tensor) -> float:
    """KL(p || q) in nats, from log-probabilities (torch's ``F.kl_div``: sum_v p_v (log p_v - log q_v))."""
    return float(F.kl_div(logq, logp, log_target=True, reduction="sum"))


# --------------------------------------------------------------------------------------------
# 04.1


def check_topk_by_hand(fn, router_logits: torch.Tensor, k: int) -> Feedback:
    """Exercise 04.1: Mixtral's routing rule by hand, mistral-inference's way round. ``fn(router_logits,
    k) -> (weights, experts)``: your function; from router logits (N, E), both outputs (N, k), experts in
    rank order (largest probability first), weights renormalised over the k chosen experts. The checker
    runs ``fn`` on logits of its own and on ``router_logits``, with ``topk_softmax_routing`` switched off,
    and compares with it."""
    name = "Exercise 04.1 (Mixtral's routing rule by hand)"
    hint = "choose the k experts first; then a softmax that only sees those k."
    method = ("either order works: the k largest logits (.topk(k, dim=-1)) and a softmax over just those k; or a "
              "softmax over all E experts, .topk(k, dim=-1), and the k weights divided by their sum.")
    E = router_logits.shape[-1]
    g = torch.Generator().manual_seed(4)
    fresh = torch.randn(64, E, generator=g) * 2
    for logits in (fresh, router_logits.detach()):
        answer, bad = run_by_hand(name, fn, (logits.clone(), k), forbidden=[topk_softmax_routing], hint=hint,
                                  method=method, what="function fn(router_logits, k) -> (weights, experts)")
        if bad is not None:
            return bad
        problem = _routing_problem(answer, logits, k)
        if problem is not None:
            return wrong(name, problem, hint, method)
    return correct(name, f"experts and weights match the router's for the checker's {fresh.shape[0]} tokens and "
                         f"your {router_logits.shape[0]}.")


def _routing_problem(answer, router_logits: torch.Tensor, k: int) -> str | None:
    """None when ``answer`` = (weights, experts) is Mixtral's routing of ``router_logits``, else what
    kind of wrong it is (never the reference)."""
    if not (isinstance(answer, (tuple, list)) and len(answer) == 2):
        return f"your function should return a pair (weights, experts), found {type(answer).__name__}."
    weights, experts = (torch.as_tensor(a) for a in answer)
    probs, ref_idx, ref_w = topk_softmax_routing(router_logits.detach(), k)
    shape = tuple(ref_idx.shape)
    if tuple(experts.shape) != shape or tuple(weights.shape) != shape:
        swapped = " (did you return (experts, weights)? the order is (weights, experts))" \
            if experts.dtype.is_floating_point and not weights.dtype.is_floating_point else ""
        return (f"expected weights and experts of shape {shape} (tokens, k={k}), found "
                f"{tuple(weights.shape)} and {tuple(experts.shape)}{swapped}.")
    if experts.dtype.is_floating_point:
        return ("experts should be integer expert ids (the indices of topk), found floats "
                "(did you return (experts, weights) instead of (weights, experts)?).")
    experts, weights = experts.to(ref_idx.device).long(), weights.to(ref_w.device).float()
    if not torch.equal(experts, ref_idx):
        if torch.equal(experts.sort(-1).values, ref_idx.sort(-1).values):
            return "the right experts, in the wrong order: rank 0 must be the expert with the largest probability."
        n_bad = int((experts != ref_idx).any(-1).sum())
        return f"not equal: the experts of {n_bad} of {shape[0]} tokens differ."
    if torch.allclose(weights, ref_w, atol=1e-5):
        return None
    if torch.allclose(weights, probs.gather(-1, ref_idx), atol=1e-5):
        return ("the weights are the softmax probabilities of the chosen experts, not renormalised: they "
                f"sum to {weights.sum(-1).mean():.3f} on average instead of 1. This is the classic bug.")
    n_bad = int((~torch.isclose(weights, ref_w, atol=1e-5)).any(-1).sum())
    return f"the experts are right; the weights of {n_bad} of {shape[0]} tokens differ."


# --------------------------------------------------------------------------------------------
# 04.2


def ablation_kls(model, prompt_ids: Sequence[int], layer: int) -> np.ndarray:
    """[E] KL(normal || expert e ablated in ``layer``) of the next-token distribution after the prompt."""
    base = next_token_logprobs(model, prompt_ids)
    return np.array([kl(base, next_token_logprobs(model, prompt_ids, AblateExpert(layer, e)))
                     for e in range(model.args.n_experts)])


def check_ablation_sweep(answer, model, prompt_ids: Sequence[int], layer: int) -> Feedback:
    """Exercise 04.2: ablate (reroute) each expert of ``layer`` in turn; ``answer`` = the E values
    KL(normal model || ablated model) of the next-token distribution after ``prompt_ids``, in nats."""
    name = "Exercise 04.2 (ablate each expert in turn)"
    hint = "one ablated run per expert; compare each with the normal run, in the right direction."
    method = ("for each expert, get the next-token distribution q inside `with intervene(model, AblateExpert(layer, "
              "e)):` and compare it with the normal model's p: KL(p || q) = sum p (log p - log q).")
    if is_todo(answer):
        return todo(name, hint, method)
    try:
        values = np.asarray(answer, dtype=float).reshape(-1)
    except (TypeError, ValueError):
        return wrong(name, f"expected one number per expert, found {type(answer).__name__}.", hint)
    E = model.args.n_experts
    if values.size != E:
        return wrong(name, f"expected one KL per expert ({E} values), found {values.size}.", hint)
    ref = ablation_kls(model, prompt_ids, layer)
    if np.allclose(values, ref, rtol=1e-2, atol=1e-5):
        return correct(name, f"largest effect: expert {int(ref.argmax())} ({ref.max():.3g} nats), smallest: expert "
                             f"{int(ref.argmin())} ({ref.min():.3g} nats).")
    if (values < -1e-6).any():
        return wrong(name, f"KL is never negative, found {values.min():.3g} (expert {int(values.argmin())}).", hint)
    base = next_token_logprobs(model, prompt_ids)
    reverse = np.array([kl(next_token_logprobs(model, prompt_ids, AblateExpert(layer, e)), base) for e in range(E)])
    if np.allclose(values, reverse, rtol=1e-2, atol=1e-5):
        return wrong(name, "these are KL(ablated || normal): the normal model's distribution p goes first, "
                           "KL(p || q) = sum p log(p / q).", hint)
    for other in (l for l in range(len(model.blocks)) if l != layer):
        if np.allclose(values, ablation_kls(model, prompt_ids, other), rtol=1e-2, atol=1e-5):
            return wrong(name, f"these are the KLs of layer {other}, not of layer {layer}.", hint)
    n_bad = int((~np.isclose(values, ref, rtol=1e-2, atol=1e-5)).sum())
    return wrong(name, f"not equal: {n_bad} of {E} values differ.", hint, method)


# --------------------------------------------------------------------------------------------
# 04.3


def forced_changes(model, prompt_ids: Sequence[int], layer: int, expert: int, position: int) -> np.ndarray:
    """Sorted positions whose routing (expert ids in any layer) changes when ``expert`` is forced
    in ``layer`` at ``position`` only."""
    base = trace_routing(model, [list(prompt_ids)], progress=False)
    with intervene(model, ForceExpert(layer, expert, positions=[position])):
        forced = trace_routing(model, [list(prompt_ids)], progress=False)
    changed = (base.expert_ids != forced.expert_ids).any(axis=(0, 2))  # [T]
    return base.positions[changed]


def check_force_spread(answer, model, prompt_ids: Sequence[int], layer: int, expert: int, position: int) -> Feedback:
    """Exercise 04.3: force ``expert`` in ``layer`` at one ``position`` of the prompt
    (``ForceExpert(layer, expert, positions=[position])``); ``answer`` = the sorted list of positions
    whose routing changed in at least one layer (compare the traces' ``expert_ids``)."""
    name = "Exercise 04.3 (how far does a forced expert travel?)"
    hint = "trace the prompt twice, with and without the intervention, and compare."
    method = ("compare the two traces' expert_ids arrays ([layers, tokens, k]) and reduce over layers and ranks "
              "to one bool per token; the positions are where it is True.")
    if is_todo(answer):
        return todo(name, hint, method)
    try:
        found = sorted(int(p) for p in np.asarray(answer).reshape(-1))
    except (TypeError, ValueError):
        return wrong(name, f"expected a list of positions, found {type(answer).__name__}.", hint)
    if len(found) == len(prompt_ids) and set(found) <= {0, 1}:
        return wrong(name, "this looks like a 0/1 mask; give the positions themselves (np.flatnonzero(mask)).", hint)
    ref = forced_changes(model, prompt_ids, layer, expert, position).tolist()
    if found == ref:
        later = [p for p in ref if p > position]
        return correct(name, f"positions {ref}: the forced token itself"
                             + (f" and {len(later)} later token(s), through attention in the layers after {layer}."
                                if later else "; no later token changed its experts this time."))
    if any(p < position for p in found):
        return wrong(name, f"positions {[p for p in found if p < position]} come before position {position}: attention "
                           "is causal, so earlier tokens cannot change.", hint)
    if found == [position] and ref != [position]:
        return wrong(name, f"only position {position}? Later tokens attend to it in the layers after {layer}, "
                           "so their routing can change too: compare all layers.", hint)
    missing, extra = len(set(ref) - set(found)), len(set(found) - set(ref))
    return wrong(name, f"not equal: {missing} changed position(s) missing and {extra} that did not change.",
                 hint, method)


# --------------------------------------------------------------------------------------------
# 04.4


def check_random_routing(fn, n_experts: int = 8) -> Feedback:
    """Exercise 04.4: write ``fn(logits, k) -> (probs, indices, weights)`` (the routing contract of
    ``CustomRouting``) that sends each token to k *distinct* experts drawn at random, weighted by the
    router's own probabilities renormalised over the k drawn experts. ``probs`` is the router's
    softmax over all experts."""
    name = "Exercise 04.4 (a random router)"
    hint = "draw k *distinct* experts, each equally likely, independently of the logits."
    method = ("the k largest of E uniform random numbers are k distinct random experts (torch.randint draws with "
              "replacement); the weights are the router's probabilities of those experts (gather), renormalised.")
    if is_todo(fn):
        return todo(name, hint, method)
    if not callable(fn):
        return wrong(name, f"expected a function fn(logits, k), found {type(fn).__name__}.", hint, method)
    gen = torch.Generator().manual_seed(0)
    N, E = 512, n_experts
    logits = torch.randn(N, E, generator=gen) * 3
    for k in (2, 3):
        try:
            out = fn(logits.clone(), k)
        except Exception as e:
            return wrong(name, f"fn(logits [{N}, {E}], k={k}) raised {type(e).__name__}: {e}", hint, method)
        if out is None:  # the stub, not filled in yet
            return todo(name, hint, method)
        if not (isinstance(out, tuple) and len(out) == 3):
            return wrong(name, "fn must return a tuple (probs, indices, weights).", hint, method)
        probs, idx, w = out
        if tuple(probs.shape) != (N, E) or tuple(idx.shape) != (N, k) or tuple(w.shape) != (N, k):
            return wrong(name, f"with k={k}: expected shapes probs ({N}, {E}), indices ({N}, {k}), weights ({N}, {k}); "
                               f"found {tuple(probs.shape)}, {tuple(idx.shape)}, {tuple(w.shape)}.", hint, method)
        if idx.dtype.is_floating_point:
            return wrong(name, f"indices must be integer expert ids, found {idx.dtype}.", hint, method)
        if not torch.allclose(probs.float(), logits.float().softmax(-1), atol=1e-5):
            return wrong(name, "probs should be the router's softmax over all experts (logits.float().softmax(-1)).", hint, method)
        if idx.min() < 0 or idx.max() >= E:
            return wrong(name, f"expert ids must be in 0..{E - 1}, found {int(idx.min())}..{int(idx.max())}.", hint, method)
        dup = int((idx.sort(-1).values.diff(dim=-1) == 0).any(-1).sum())
        if dup:
            return wrong(name, f"with k={k}, {dup} of {N} tokens got the same expert twice: draw k distinct experts "
                               "(torch.randint draws with replacement).", hint, method)
        ref_w = probs.float().gather(-1, idx.long())
        ref_w = ref_w / ref_w.sum(-1, keepdim=True)
        if not torch.allclose(w.float(), ref_w, atol=1e-5):
            if torch.allclose(w.float(), torch.full_like(ref_w, 1 / k)):
                return wrong(name, f"equal weights 1/{k}: weight the drawn experts by the router's probabilities, "
                                   "renormalised over them.", hint, method)
            return wrong(name, f"weights should be probs.gather(-1, indices) divided by their sum (rows sum to "
                               f"{w.float().sum(-1).mean():.3f} on average).", hint, method)
        if torch.equal(idx.long(), logits.topk(k, dim=-1).indices):
            return wrong(name, "these are the router's own top-k experts, not random ones.", hint, method)
        counts = torch.bincount(idx.reshape(-1).long(), minlength=E)
        if (counts == 0).any():
            return wrong(name, f"expert(s) {torch.flatnonzero(counts == 0).tolist()} never drawn in {N} tokens: every "
                               "expert should be equally likely.", hint, method)
        # randomness: a uniform draw of k of E experts contains the router's own top-1 with probability
        # k/E; a router that keeps its top-1 (or samples by probability) contains it far more often.
        top1 = logits.argmax(-1, keepdim=True)
        agree = int((idx.long() == top1).any(-1).sum())
        p0 = k / E
        z = (agree - N * p0) / math.sqrt(N * p0 * (1 - p0))
        if abs(z) > 5:
            return wrong(name, f"with k={k}, {agree} of {N} tokens drew the router's own first choice; a uniform draw "
                               f"of {k} of {E} experts does so for about k/E = {p0:.0%} of tokens "
                               f"({z:+.1f} standard deviations away): the experts are not drawn uniformly.", hint, method)
        chi2 = float(((counts - N * k / E) ** 2 / (N * k / E)).sum())
        df = E - 1  # Wilson-Hilferty: chi2/df^(1/3) is about normal; z > 5 is p < 3e-7
        zc = ((chi2 / df) ** (1 / 3) - (1 - 2 / (9 * df))) / math.sqrt(2 / (9 * df))
        if zc > 5:
            return wrong(name, f"with k={k}, some experts are drawn far more often than others (chi-square {chi2:.0f} "
                               f"on {df} degrees of freedom): every expert should be equally likely.", hint, method)
    again = fn(logits.clone(), 2)[1]
    if torch.equal(again.long(), fn(logits.clone(), 2)[1].long()):
        return wrong(name, "two calls on the same logits gave the same experts: the draw should be random.", hint, method)
    return correct(name, "k distinct random experts per token, weighted by the router's renormalised probabilities.")


# --------------------------------------------------------------------------------------------
# 04.5


def check_hf_moe_trace(answer, hf_model, tokens) -> Feedback:
    """Exercise 04.5: build a tiny random transformers MoE that is *not* Mixtral (OLMoE, Qwen2-MoE,
    ...) and trace ``tokens`` through it with ``trace_routing``; ``answer`` = that trace."""
    name = "Exercise 04.5 (trace another transformers MoE)"
    hint = "transformers has several MoE configs (OLMoE, Qwen2-MoE, ...): build a tiny random one and trace it."
    method = ("transformers.OlmoeConfig (or Qwen2MoeConfig, ...) with a hidden size of 32, an intermediate size of "
              "64, 2 layers, 4 attention heads and 2 kv heads, a vocabulary of 128, 8 experts, top-2 and the "
              "pad/bos/eos ids 0/1/2 is tiny; build OlmoeForCausalLM from it in eval mode and trace the tokens "
              "with trace_routing.")
    if is_todo(answer) or is_todo(hf_model):
        return todo(name, hint, method)
    if not isinstance(answer, RoutingTrace):
        return wrong(name, f"expected a RoutingTrace (what trace_routing returns), found {type(answer).__name__}.", hint, method)
    if not is_hf_model(hf_model):
        return wrong(name, f"hf_model should be a transformers model, found {type(hf_model).__name__}.", hint, method)
    cls = type(hf_model).__name__
    if "Mixtral" in cls:
        return wrong(name, "this is Mixtral again: pick another architecture (OLMoE, Qwen2-MoE, Qwen3-MoE, ...).", hint, method)
    ref = trace_routing(hf_model, tokens, progress=False)
    if answer.meta.get("model_class") != ref.meta.get("model_class"):
        return wrong(name, f"the trace comes from {answer.meta.get('model_class')}, not from hf_model ({cls}).", hint, method)
    if answer.expert_ids.shape != ref.expert_ids.shape:
        return wrong(name, f"trace of shape [layers, tokens, k] = {list(answer.expert_ids.shape)}, expected shape "
                           f"{list(ref.expert_ids.shape)} for these tokens.", hint, method)
    if not np.array_equal(answer.expert_ids, ref.expert_ids):
        return wrong(name, "the expert ids differ from tracing hf_model on these tokens again (did the model change "
                           "after you traced it?).", hint, method)
    return correct(name, f"{cls}: {answer.n_layers} MoE layers, {answer.n_experts} experts, top-{answer.top_k}, "
                         f"{answer.n_tokens} tokens traced.")


# --------------------------------------------------------------------------- 04.6-04.7: graded questions


def check_unchanged_positions(answer) -> Feedback:
    """Exercise 04.6 (multiple choice): an expert is forced at one position (04.3). Which positions'
    routing cannot change?"""
    name = "Exercise 04.6 (which positions cannot change?)"
    options = {"a": "the positions before the forced one: attention is causal, so nothing flows backwards",
               "b": "the positions after the forced one",
               "c": "every position except the forced one",
               "d": "none: every position can change"}
    why_not = {"b": "later positions attend to the forced one (from the next layer on), so their routing can change.",
               "c": "the later positions read the forced position's changed hidden state through attention.",
               "d": "a position's hidden state depends only on itself and earlier positions."}
    return choice(name, answer, options, "a", why_not,
                  why="Whether a later position does change depends on how much attention it pays to the forced one.",
                  hint="which positions does a token attend to?",
                  method="look at 04.3's answer: the smallest changed position is never below the forced one.")


def check_more_experts(answer) -> Feedback:
    """Exercise 04.7 (multiple choice): routing each token to 3 experts instead of the 2 the model was
    trained with (``SetTopK(3)``) makes its predictions worse. Why?"""
    name = "Exercise 04.7 (why more experts make it worse)"
    options = {"a": "more experts is always better; the measurement must be wrong",
               "b": "the next layers were trained on the mix of two experts; a third output changes that mix into "
                    "one they never saw",
               "c": "the third expert is random noise",
               "d": "it uses more compute, and compute lowers accuracy"}
    why_not = {"a": "the measurement compares with yardsticks over many texts (§6.2); the effect is real.",
               "c": "every expert is trained; it is the mix, not the expert, that is new.",
               "d": "compute does not lower accuracy by itself; a model run outside its training conditions does."}
    return choice(name, answer, options, "b", why_not,
                  why="A model is trained with one k; the weights of the k experts and what later layers expect are "
                      "tuned together. More capacity at inference is not free capacity.",
                  hint="what did the later layers learn to read during training?",
                  method="compare SetTopK(1), the model's k and SetTopK(3) in §6: the trained k is the best of the three.")
