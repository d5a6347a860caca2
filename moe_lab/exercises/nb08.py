"""Exercises of notebook 08 · Causal experiments on experts.

Each checker reruns the experiment with moe_lab's own functions (``causal.document_losses``,
``causal.contrastive_experts``, ``attribution.logit_attribution``, ``causal.alternative_routes``)
on the model and texts the learner used, and compares.

* 08.1 :func:`check_zero_ablation_delta`  the loss change of a zero-ablation on one domain
* 08.2 :func:`check_risk_difference`      SteerMoE's risk difference of one expert, by hand
* 08.3 :func:`check_top_expert_for_logit` the expert that adds most to a next-token logit
* 08.4 :func:`check_router_rank`          where the router's choice ranks among equal-compute routes
"""

from __future__ import annotations

import numpy as np

from ..attribution import logit_attribution
from ..causal import alternative_routes, contrastive_experts, document_losses
from ..routing.interventions import AblateExpert
from .arrays import matches, mismatch
from .feedback import Feedback, correct, is_todo, todo, wrong


def _mean_loss(model, texts, interventions=()) -> float:
    return float(document_losses(model, texts, interventions=interventions).loss.mean())


def check_zero_ablation_delta(answer, model, texts, layer: int, expert: int) -> Feedback:
    """08.1: ``answer`` (a number): the mean over the documents ``texts`` (``{domain: [token
    lists]}``, one domain) of the loss with expert ``expert`` of layer ``layer`` zero-ablated
    (``AblateExpert(layer, expert, mode="zero")``) minus the plain model's loss."""
    name = "Exercise 08.1 (zero-ablation)"
    if is_todo(answer):
        return todo(name, "causal.document_losses(model, texts, interventions=[...]) gives one loss per "
                          "document; subtract the plain losses and average.")
    base = _mean_loss(model, texts)
    zero = _mean_loss(model, texts, [AblateExpert(layer, expert, mode="zero")]) - base
    problem = mismatch(zero, answer, atol=1e-5, rtol=1e-4)
    if problem is None:
        return correct(name, f"{zero:+.4f} nats per token when expert {expert} of layer {layer} contributes nothing.")
    if matches(-zero, answer, atol=1e-5, rtol=1e-4):
        return wrong(name, "the sign is flipped: the change is ablated minus plain.",
                     "a positive change means the model got worse without the expert.")
    if matches(_mean_loss(model, texts, [AblateExpert(layer, expert)]) - base, answer, atol=1e-5, rtol=1e-4):
        return wrong(name, "that is the rerouting ablation (the default mode): the router picks another expert.",
                     'pass mode="zero": routing unchanged, the expert\'s slot adds nothing.')
    return wrong(name, problem, f'AblateExpert({layer}, {expert}, mode="zero"), and the same documents for both losses.')


def check_risk_difference(answer, model, texts_a, texts_b, layer: int, expert: int) -> Feedback:
    """08.2: ``answer`` (a number): P(expert in the top-k | a token of ``texts_a``) minus the
    same on ``texts_b``, at ``layer`` (token shares pooled over each set's documents)."""
    name = "Exercise 08.2 (risk difference)"
    if is_todo(answer):
        return todo(name, "trace both sets with moe_lab.trace_routing; trace.expert_ids[layer index] holds every "
                          "token's k experts: how often is `expert` among them?")
    table = contrastive_experts(model, texts_a, texts_b, n_boot=1, max_len=None)
    row = table[(table.layer == layer) & (table.expert == expert)].iloc[0]
    problem = mismatch(row.risk_diff, answer, atol=1e-6, rtol=1e-5)
    if problem is None:
        return correct(name, f"{row.rate_a:.3f} - {row.rate_b:.3f} = {row.risk_diff:+.3f}: "
                             f"{'more' if row.risk_diff > 0 else 'less'} used on the first set.")
    if matches(-row.risk_diff, answer, atol=1e-6, rtol=1e-5):
        return wrong(name, "the sign is flipped: first set minus second.", "P(e | A) - P(e | B).")
    if matches(row.rate_a, answer, atol=1e-6, rtol=1e-5):
        return wrong(name, "that is the first set's rate alone.", "subtract the second set's rate.")
    return wrong(name, problem, "count every token whose top-k contains the expert (any slot, not only the first), "
                                "divide by the number of tokens of that set, then subtract.")


def _expert_parts(model, doc, pos: int) -> tuple[list[tuple[int, int]], np.ndarray]:
    att = logit_attribution(model, doc)
    keep = [i for i, c in enumerate(att.components) if ".expert." in c]
    names = [(int(att.components[i].split(".")[1]), int(att.components[i].split(".")[3])) for i in keep]
    return names, att.contributions[keep].numpy()  # [(layer, expert)], [n_experts_total, T-1]


def check_top_expert_for_logit(answer, model, doc, pos: int) -> Feedback:
    """08.3: ``answer`` a ``(layer, expert)`` pair: the expert whose contribution to the logit of
    the actual next token ``doc[pos + 1]``, read at position ``pos``, is the largest
    (``attribution.logit_attribution``; components ``moe.{layer}.expert.{e}``)."""
    name = "Exercise 08.3 (logit attribution)"
    if is_todo(answer):
        return todo(name, "att = logit_attribution(model, doc); att.table(pos) lists every component's contribution "
                          "to the next-token logit at pos, largest first; keep the moe.*.expert.* ones.")
    try:
        got = (int(answer[0]), int(answer[1]))
    except (TypeError, ValueError, IndexError):
        return wrong(name, f"expected a (layer, expert) pair of integers, found {answer!r}",
                     'a component named "moe.2.expert.5" is the pair (2, 5).')
    names, parts = _expert_parts(model, doc, pos)
    best = names[int(parts[:, pos].argmax())]
    if got == best:
        return correct(name, f"expert {best[1]} of layer {best[0]} adds {parts[:, pos].max():+.3f} to the logit.")
    if got not in names:
        return wrong(name, f"{got} is not an expert of this model.", "layers and experts count from 0.")
    if got == names[int(parts[:, pos].argmin())]:
        return wrong(name, f"{got} pushes the logit *down* the most.", "the largest contribution, not the most negative.")
    if got == names[int(np.abs(parts[:, pos]).argmax())]:
        return wrong(name, f"{got} has the largest contribution in size, but it is negative.",
                     "the largest signed contribution.")
    for off in (-1, 1):
        if 0 <= pos + off < parts.shape[1] and got == names[int(parts[:, pos + off].argmax())]:
            return wrong(name, f"{got} is the top expert at position {pos + off}, not {pos}.",
                         f"the logit of doc[{pos} + 1] is read at position {pos}: att.table({pos}).")
    i = names.index(got)
    return wrong(name, f"expected ({best[0]}, {best[1]}) with {parts[:, pos].max():+.3f}; yours adds "
                       f"{parts[i, pos]:+.3f}.", "sort the expert components of att.table(pos) and take the first.")


def check_router_rank(answer, model, doc, layer: int, position: int) -> Feedback:
    """08.4: ``answer`` (an integer): the rank (1 = best) of the router's own choice among all
    equal-compute routes at (``layer``, ``position``) of ``doc``, scored by the log-probability
    of the actual next token (``causal.alternative_routes``)."""
    name = "Exercise 08.4 (router rank)"
    if is_todo(answer):
        return todo(name, "routes = causal.alternative_routes(model, doc, layer, position); the row with "
                          "router_choice True has the rank.")
    routes = alternative_routes(model, doc, layer, position)
    rank = int(routes[routes.router_choice]["rank"].iloc[0])
    n = len(routes)
    try:
        got = int(answer)
    except (TypeError, ValueError):
        return wrong(name, f"expected an integer rank, found {answer!r}", "int(row['rank']).")
    if got == rank:
        return correct(name, f"rank {rank} of {n} (a random choice would be {(n + 1) / 2:.1f} on average).")
    if got == n + 1 - rank:
        return wrong(name, f"you counted from the worst route: rank {got} of {n} from the bottom.",
                     "rank 1 is the route with the highest log-probability.")
    return wrong(name, f"expected rank {rank} of {n}, found {got}.",
                 f"did you use layer {layer} and position {position}? alternative_routes ranks best first.")
