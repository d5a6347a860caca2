"""Exercises of notebook 04 (router hooks, traces, interventions): Mixtral's routing rule by hand,
an ablation sweep, how far a forced expert's effect travels, a routing function of your own, and a
trace of another transformers MoE.

Each checker recomputes the answer with moe_lab from the inputs the learner used::

    from moe_lab.exercises import nb04 as ex
    ex.check_topk_by_hand(answer, router_logits, k=2)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..model import topk_softmax_routing
from ..routing.bridge import is_hf_model
from ..routing.interventions import AblateExpert, ForceExpert, intervene
from ..routing.trace import RoutingTrace
from ..routing.tracing import trace_routing
from .feedback import Feedback, correct, is_todo, todo, wrong


def next_token_logprobs(model, ids: Sequence[int], *interventions) -> torch.Tensor:
    """log p(next token) [V] after the prompt ``ids`` (a list of token ids), under ``interventions``."""
    with intervene(model, *interventions), torch.inference_mode():
        return model(torch.tensor([list(ids)]))[0, -1].float().log_softmax(-1)


def kl(logp: torch.Tensor, logq: torch.Tensor) -> float:
    """KL(p || q) in nats, from log-probabilities (torch's ``F.kl_div``: sum_v p_v (log p_v - log q_v))."""
    return float(F.kl_div(logq, logp, log_target=True, reduction="sum"))


# --------------------------------------------------------------------------------------------
# 04.1


def check_topk_by_hand(answer, router_logits: torch.Tensor, k: int) -> Feedback:
    """Exercise 04.1: from router logits (N, E), compute Mixtral's routing by hand: ``answer`` =
    ``(weights, experts)``, both (N, k), experts in rank order (largest probability first), weights
    renormalised over the k chosen experts."""
    name = "Exercise 04.1 (Mixtral's routing rule by hand)"
    hint = ("either order works: the k largest logits (.topk(k, dim=-1)) and a softmax over just those k; or a "
            "softmax over all E experts, .topk(k, dim=-1), and the k weights divided by their sum.")
    if is_todo(answer):
        return todo(name, hint)
    if not (isinstance(answer, (tuple, list)) and len(answer) == 2):
        return wrong(name, f"expected a pair (weights, experts), found {type(answer).__name__}.", hint)
    weights, experts = (torch.as_tensor(a) for a in answer)
    probs, ref_idx, ref_w = topk_softmax_routing(router_logits.detach(), k)
    shape = tuple(ref_idx.shape)
    if tuple(experts.shape) != shape or tuple(weights.shape) != shape:
        swapped = " (did you return (experts, weights)? the order is (weights, experts))" \
            if experts.dtype.is_floating_point and not weights.dtype.is_floating_point else ""
        return wrong(name, f"expected weights and experts of shape {shape} (tokens, k={k}), found "
                           f"{tuple(weights.shape)} and {tuple(experts.shape)}{swapped}.", hint)
    if experts.dtype.is_floating_point:
        return wrong(name, "experts should be integer expert ids (the indices of topk), found floats "
                           "(did you return (experts, weights) instead of (weights, experts)?).", hint)
    experts, weights = experts.to(ref_idx.device).long(), weights.to(ref_w.device).float()
    if not torch.equal(experts, ref_idx):
        if torch.equal(experts.sort(-1).values, ref_idx.sort(-1).values):
            return wrong(name, "the right experts, in the wrong order: rank 0 must be the expert with the largest "
                               "probability.", hint)
        bad = int((experts != ref_idx).any(-1).float().argmax())
        return wrong(name, f"token {bad}: experts {experts[bad].tolist()}, expected {ref_idx[bad].tolist()}.", hint)
    if torch.allclose(weights, ref_w, atol=1e-5):
        return correct(name, f"experts and weights match the router's for all {shape[0]} tokens.")
    if torch.allclose(weights, probs.gather(-1, ref_idx), atol=1e-5):
        return wrong(name, "the weights are the softmax probabilities of the chosen experts, not renormalised: they "
                           f"sum to {weights.sum(-1).mean():.3f} on average instead of 1. This is the classic bug.", hint)
    bad = int((weights - ref_w).abs().max(-1).values.argmax())
    return wrong(name, f"token {bad}: weights {[round(w, 4) for w in weights[bad].tolist()]}, expected "
                       f"{[round(w, 4) for w in ref_w[bad].tolist()]}.", hint)


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
    hint = ("for each expert, get the next-token distribution q inside `with intervene(model, AblateExpert(layer, "
            "e)):` and compare it with the normal model's p: KL(p || q) = sum p (log p - log q).")
    if is_todo(answer):
        return todo(name, hint)
    try:
        values = np.asarray(answer, dtype=float).reshape(-1)
    except (TypeError, ValueError):
        return wrong(name, f"expected {model.args.n_experts} numbers, found {type(answer).__name__}.", hint)
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
    bad = int(np.abs(values - ref).argmax())
    return wrong(name, f"expert {bad}: found {values[bad]:.4g} nats, expected {ref[bad]:.4g}.", hint)


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
    hint = ("trace the prompt with and without the intervention; compare the two expert_ids arrays "
            "([layers, tokens, k]) and reduce over layers and ranks to one bool per token.")
    if is_todo(answer):
        return todo(name, hint)
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
    return wrong(name, f"expected positions {ref}, found {found}.", hint)


# --------------------------------------------------------------------------------------------
# 04.4


def check_random_routing(fn, n_experts: int = 8) -> Feedback:
    """Exercise 04.4: write ``fn(logits, k) -> (probs, indices, weights)`` (the routing contract of
    ``CustomRouting``) that sends each token to k *distinct* experts drawn at random, weighted by the
    router's own probabilities renormalised over the k drawn experts. ``probs`` is the router's
    softmax over all experts."""
    name = "Exercise 04.4 (a random router)"
    hint = ("the k largest of E uniform random numbers are k distinct random experts (torch.randint draws with "
            "replacement); the weights are the router's probabilities of those experts (gather), renormalised.")
    if is_todo(fn):
        return todo(name, hint)
    if not callable(fn):
        return wrong(name, f"expected a function fn(logits, k), found {type(fn).__name__}.", hint)
    gen = torch.Generator().manual_seed(0)
    N, E = 512, n_experts
    logits = torch.randn(N, E, generator=gen) * 3
    for k in (2, 3):
        try:
            out = fn(logits.clone(), k)
        except Exception as e:
            return wrong(name, f"fn(logits [{N}, {E}], k={k}) raised {type(e).__name__}: {e}", hint)
        if out is None:  # the stub, not filled in yet
            return todo(name, hint)
        if not (isinstance(out, tuple) and len(out) == 3):
            return wrong(name, "fn must return a tuple (probs, indices, weights).", hint)
        probs, idx, w = out
        if tuple(probs.shape) != (N, E) or tuple(idx.shape) != (N, k) or tuple(w.shape) != (N, k):
            return wrong(name, f"with k={k}: expected shapes probs ({N}, {E}), indices ({N}, {k}), weights ({N}, {k}); "
                               f"found {tuple(probs.shape)}, {tuple(idx.shape)}, {tuple(w.shape)}.", hint)
        if idx.dtype.is_floating_point:
            return wrong(name, f"indices must be integer expert ids, found {idx.dtype}.", hint)
        if not torch.allclose(probs.float(), logits.float().softmax(-1), atol=1e-5):
            return wrong(name, "probs should be the router's softmax over all experts (logits.float().softmax(-1)).", hint)
        if idx.min() < 0 or idx.max() >= E:
            return wrong(name, f"expert ids must be in 0..{E - 1}, found {int(idx.min())}..{int(idx.max())}.", hint)
        dup = int((idx.sort(-1).values.diff(dim=-1) == 0).any(-1).sum())
        if dup:
            return wrong(name, f"with k={k}, {dup} of {N} tokens got the same expert twice: draw k distinct experts "
                               "(torch.randint draws with replacement).", hint)
        ref_w = probs.float().gather(-1, idx.long())
        ref_w = ref_w / ref_w.sum(-1, keepdim=True)
        if not torch.allclose(w.float(), ref_w, atol=1e-5):
            if torch.allclose(w.float(), torch.full_like(ref_w, 1 / k)):
                return wrong(name, f"equal weights 1/{k}: weight the drawn experts by the router's probabilities, "
                                   "renormalised over them.", hint)
            return wrong(name, f"weights should be probs.gather(-1, indices) divided by their sum (rows sum to "
                               f"{w.float().sum(-1).mean():.3f} on average).", hint)
        if torch.equal(idx.long(), logits.topk(k, dim=-1).indices):
            return wrong(name, "these are the router's own top-k experts, not random ones.", hint)
        counts = torch.bincount(idx.reshape(-1).long(), minlength=E)
        if (counts == 0).any():
            return wrong(name, f"expert(s) {torch.flatnonzero(counts == 0).tolist()} never drawn in {N} tokens: every "
                               "expert should be equally likely.", hint)
    again = fn(logits.clone(), 2)[1]
    if torch.equal(again.long(), fn(logits.clone(), 2)[1].long()):
        return wrong(name, "two calls on the same logits gave the same experts: the draw should be random.", hint)
    return correct(name, "k distinct random experts per token, weighted by the router's renormalised probabilities.")


# --------------------------------------------------------------------------------------------
# 04.5


def check_hf_moe_trace(answer, hf_model, tokens) -> Feedback:
    """Exercise 04.5: build a tiny random transformers MoE that is *not* Mixtral (OLMoE, Qwen2-MoE,
    ...) and trace ``tokens`` through it with ``trace_routing``; ``answer`` = that trace."""
    name = "Exercise 04.5 (trace another transformers MoE)"
    hint = ("e.g. cfg = transformers.OlmoeConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, "
            "num_attention_heads=4, num_key_value_heads=2, vocab_size=128, num_experts=8, num_experts_per_tok=2, "
            "pad_token_id=0, bos_token_id=1, eos_token_id=2); "
            "hf = transformers.OlmoeForCausalLM(cfg).eval(); trace = trace_routing(hf, tokens, progress=False).")
    if is_todo(answer) or is_todo(hf_model):
        return todo(name, hint)
    if not isinstance(answer, RoutingTrace):
        return wrong(name, f"expected a RoutingTrace (what trace_routing returns), found {type(answer).__name__}.", hint)
    if not is_hf_model(hf_model):
        return wrong(name, f"hf_model should be a transformers model, found {type(hf_model).__name__}.", hint)
    cls = type(hf_model).__name__
    if "Mixtral" in cls:
        return wrong(name, "this is Mixtral again: pick another architecture (OLMoE, Qwen2-MoE, Qwen3-MoE, ...).", hint)
    ref = trace_routing(hf_model, tokens, progress=False)
    if answer.meta.get("model_class") != ref.meta.get("model_class"):
        return wrong(name, f"the trace comes from {answer.meta.get('model_class')}, not from hf_model ({cls}).", hint)
    if answer.expert_ids.shape != ref.expert_ids.shape:
        return wrong(name, f"trace of shape [layers, tokens, k] = {list(answer.expert_ids.shape)}, expected "
                           f"{list(ref.expert_ids.shape)} for these tokens.", hint)
    if not np.array_equal(answer.expert_ids, ref.expert_ids):
        return wrong(name, "the expert ids differ from tracing hf_model on these tokens again (did the model change "
                           "after you traced it?).", hint)
    return correct(name, f"{cls}: {answer.n_layers} MoE layers, {answer.n_experts} experts, top-{answer.top_k}, "
                         f"{answer.n_tokens} tokens traced.")
