"""Exercises of notebook 08 · Causal experiments on experts.

Each checker reruns the experiment with moe_lab's own functions (``causal.document_losses``,
``causal.contrastive_experts``, ``attribution.logit_attribution``, ``causal.alternative_routes``)
on the model and texts the learner used, and compares.

* 08.1 :func:`check_zero_ablation_delta`  the loss change of a zero-ablation on one domain
* 08.2 :func:`check_risk_difference`      SteerMoE's risk difference of one expert, by hand
* 08.3 :func:`check_top_expert_for_logit` the expert that adds most to a next-token logit
* 08.4 :func:`check_router_rank`          where the router's choice ranks among equal-compute routes
* 08.5 :func:`check_zero_vs_reroute`      is zero-ablation larger than rerouting? (multiple choice, from the data)
* 08.6 :func:`check_steering_test`        why "the in-domain loss falls" is not the test of a lever (multiple choice)
* 08.7 :func:`check_small_ablation`       what a small rerouting effect says (multiple choice)

A wrong answer is told what kind of wrong it is, never the reference value; hints come as a nudge,
then the method. 08.2 is by hand: it takes the learner's function and runs it on traces of its own
with ``causal.contrastive_experts`` switched off (:mod:`moe_lab.exercises.byhand`).
"""

from __future__ import annotations

import numpy as np

from ..attribution import logit_attribution
from ..causal import alternative_routes, contrastive_experts, document_losses
from ..routing.interventions import AblateExpert
from ..routing.trace import RoutingTrace, layer_row
from ..routing.tracing import trace_routing
from .arrays import matches, mismatch
from .byhand import fresh_trace, run_by_hand
from .feedback import Feedback, correct, is_todo, not_equal, todo, wrong
from .questions import choice


def _mean_loss(model, texts, interventions=()) -> float:
    return float(document_losses(model, texts, interventions=interventions).loss.mean())


def check_zero_ablation_delta(answer, model, texts, layer: int, expert: int) -> Feedback:
    """08.1: ``answer`` (a number): the mean over the documents ``texts`` (``{domain: [token
    lists]}``, one domain) of the loss with expert ``expert`` of layer ``layer`` zero-ablated
    (``AblateExpert(layer, expert, mode="zero")``) minus the plain model's loss."""
    name = "Exercise 08.1 (zero-ablation)"
    hint = "two runs on the same documents, one plain and one with the expert's output removed; compare them."
    method = ("causal.document_losses gives one loss per document, with or without interventions=[...]; the "
              "intervention is an AblateExpert in zero mode; subtract the plain losses from the ablated ones, then "
              "average.")
    if is_todo(answer):
        return todo(name, hint, method)
    base = _mean_loss(model, texts)
    zero = _mean_loss(model, texts, [AblateExpert(layer, expert, mode="zero")]) - base
    problem = mismatch(zero, answer, atol=1e-5, rtol=1e-4)
    if problem is None:
        return correct(name, f"{zero:+.4f} nats per token when expert {expert} of layer {layer} contributes nothing.")
    if matches(-zero, answer, atol=1e-5, rtol=1e-4):
        return wrong(name, "the sign is flipped: the change is ablated minus plain.",
                     "a positive change means the model got worse without the expert.", method)
    if matches(_mean_loss(model, texts, [AblateExpert(layer, expert)]) - base, answer, atol=1e-5, rtol=1e-4):
        return wrong(name, "that is the rerouting ablation (the default mode): the router picks another expert.",
                     "zero mode keeps the routing and removes only the expert's output.", method)
    return wrong(name, problem, f"the same documents for both losses, layer {layer} and expert {expert}.", method)


def risk_difference(trace_a: RoutingTrace, trace_b: RoutingTrace, layer: int, expert: int) -> float:
    """P(``expert`` in a token's top-k | a token of ``trace_a``) minus the same on ``trace_b``, at model
    layer ``layer``, over all tokens of each trace (pooled over its documents), as
    ``causal.contrastive_experts`` computes it (tested against it)."""
    rate = [float((t.expert_ids[layer_row(t.layers, layer)] == expert).any(-1).mean()) for t in (trace_a, trace_b)]
    return rate[0] - rate[1]


def check_risk_difference(fn, model, texts_a, texts_b, layer: int, expert: int) -> Feedback:
    """08.2, by hand: ``fn(trace_a, trace_b, layer, expert) -> float``: your function; P(expert in a
    token's top-k | a token of ``trace_a``) minus the same on ``trace_b``, at model layer ``layer``
    (token shares pooled over each trace's documents). The checker runs ``fn`` on traces of its own,
    then on ``model``'s traces of ``texts_a`` and ``texts_b``, with ``causal.contrastive_experts``
    switched off."""
    name = "Exercise 08.2 (risk difference, by hand)"
    hint = "a rate per set: the share of its tokens that used the expert in any of their k slots; then a difference."
    method = ("take the layer's row with trace.layer_index(layer); (expert_ids[row] == expert) is [tokens, k]: "
              ".any(-1) says whether each token used it; its mean over tokens is the set's rate; first set minus "
              "second.")
    fa = fresh_trace(n_experts=model.args.n_experts, top_k=model.args.experts_per_token, seed=8)
    fb_ = fresh_trace(n_experts=model.args.n_experts, top_k=model.args.experts_per_token, seed=9,
                      doc_lengths=(12, 6, 15))
    fresh_expert = int(np.bincount(fa.expert_ids[1].ravel(), minlength=fa.n_experts).argmax())
    ta = trace_routing(model, list(texts_a), progress=False)
    tb = trace_routing(model, list(texts_b), progress=False)
    for a, b, l, e in ((fa, fb_, fa.layers[1], fresh_expert), (ta, tb, layer, expert)):
        answer, bad = run_by_hand(name, fn, (a, b, l, e), forbidden=[contrastive_experts], hint=hint, method=method,
                                  what="function fn(trace_a, trace_b, layer, expert) -> float")
        if bad is not None:
            return bad
        ref = risk_difference(a, b, l, e)
        problem = mismatch(ref, answer, atol=1e-6, rtol=1e-5)
        if problem is None:
            continue
        rate_a = float((a.expert_ids[layer_row(a.layers, l)] == e).any(-1).mean())
        first = [float((t.expert_ids[layer_row(t.layers, l), :, 0] == e).mean()) for t in (a, b)]
        if matches(-ref, answer, atol=1e-6, rtol=1e-5) and abs(ref) > 1e-9:
            return wrong(name, "the sign is flipped: first set minus second.", "P(e | A) - P(e | B).", method)
        if matches(rate_a, answer, atol=1e-6, rtol=1e-5):
            return wrong(name, "that is the first set's rate alone.", "subtract the second set's rate.", method)
        if matches(first[0] - first[1], answer, atol=1e-6, rtol=1e-5):
            return wrong(name, "only the first choice is counted: a token uses the expert when any of its k slots "
                               "holds it.", hint, method)
        if any(matches(risk_difference(a, b, l2, e), answer, atol=1e-6, rtol=1e-5) for l2 in a.layers if l2 != l):
            return wrong(name, f"that is another layer's difference: layer {l} is not row {l} on every trace (the "
                               f"checker's trace holds layers {a.layers}).", hint, method)
        return wrong(name, problem, hint, method)
    table = contrastive_experts(model, texts_a, texts_b, n_boot=1, max_len=None)
    row = table[(table.layer == layer) & (table.expert == expert)].iloc[0]
    return correct(name, f"right on the checker's traces and on yours: {row.rate_a:.3f} - {row.rate_b:.3f} = "
                         f"{row.risk_diff:+.3f}: {'more' if row.risk_diff > 0 else 'less'} used on the first set "
                         "(contrastive_experts agrees).")


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
    hint = ("the attribution splits one logit into a sum of parts, one per component; only the experts' parts "
            "are candidates, and the sign matters.")
    method = ("logit_attribution(model, doc) returns an object whose table(pos) lists every component's part of the "
              "next-token logit read at pos, largest first; keep the names that contain '.expert.' and read "
              "(layer, expert) from the first such name.")
    if is_todo(answer):
        return todo(name, hint, method)
    try:
        got = (int(answer[0]), int(answer[1]))
    except (TypeError, ValueError, IndexError):
        return wrong(name, f"expected a (layer, expert) pair of integers, found {answer!r}",
                     'a component named "moe.2.expert.5" is the pair (2, 5).', method)
    names, parts = _expert_parts(model, doc, pos)
    best = names[int(parts[:, pos].argmax())]
    if got == best:
        return correct(name, f"expert {best[1]} of layer {best[0]} adds {parts[:, pos].max():+.3f} to the logit.")
    if got not in names:
        return wrong(name, f"{got} is not an expert of this model.", "layers and experts count from 0.", method)
    if got == names[int(parts[:, pos].argmin())]:
        return wrong(name, f"{got} pushes the logit *down* the most.", "the largest contribution, not the most "
                     "negative.", method)
    if got == names[int(np.abs(parts[:, pos]).argmax())]:
        return wrong(name, f"{got} has the largest contribution in size, but it is negative.",
                     "the largest signed contribution.", method)
    for off in (-1, 1):
        if 0 <= pos + off < parts.shape[1] and got == names[int(parts[:, pos + off].argmax())]:
            return wrong(name, f"{got} is the top expert at position {pos + off}, not {pos}.",
                         f"the logit of doc[{pos} + 1] is read at position {pos}.", method)
    i = names.index(got)
    n_more = int((parts[:, pos] > parts[i, pos]).sum())
    return wrong(name, f"{got} adds {parts[i, pos]:+.3f}; {n_more} other expert(s) add more.", hint, method)


def check_router_rank(answer, model, doc, layer: int, position: int) -> Feedback:
    """08.4: ``answer`` (an integer): the rank (1 = best) of the router's own choice among all
    equal-compute routes at (``layer``, ``position``) of ``doc``, scored by the log-probability
    of the actual next token (``causal.alternative_routes``)."""
    name = "Exercise 08.4 (router rank)"
    hint = ("§6 scored every route with the same number of experts at one (layer, position); one of those routes is "
            "the router's own.")
    method = ("causal.alternative_routes(model, doc, layer, position) returns one row per route, ranked best first; "
              "the router's own route is the row whose router_choice column is True: read its rank.")
    if is_todo(answer):
        return todo(name, hint, method)
    routes = alternative_routes(model, doc, layer, position)
    rank = int(routes[routes.router_choice]["rank"].iloc[0])
    n = len(routes)
    try:
        got = int(answer)
    except (TypeError, ValueError):
        return wrong(name, f"expected an integer rank, found {answer!r}", "a rank is a whole number.", method)
    if got == rank:
        return correct(name, f"rank {rank} of {n} (a random choice would be {(n + 1) / 2:.1f} on average).")
    if not 1 <= got <= n:
        return wrong(name, f"there are {n} equal-compute routes: a rank is between 1 and {n}.", hint, method)
    if got == n + 1 - rank and got != rank:
        return wrong(name, f"you counted from the worst route: rank 1 is the route with the highest "
                           "log-probability.", hint, method)
    for other_layer, other_pos in ((layer, position - 1), (layer, position + 1)):
        if 0 <= other_pos < len(doc) - 1:
            r = alternative_routes(model, doc, other_layer, other_pos)
            if got == int(r[r.router_choice]["rank"].iloc[0]):
                return wrong(name, f"that is the router's rank at position {other_pos}, not {position}.", hint, method)
    return not_equal(name, f"it is not the rank of the router's own route among the {n} routes at layer {layer}, "
                           f"position {position}", hint, method)


# --------------------------------------------------------------------------- 08.5-08.7: graded questions


def check_zero_vs_reroute(answer, model, texts, layer: int, expert: int) -> Feedback:
    """08.5 (multiple choice): for expert ``expert`` of layer ``layer`` on the documents ``texts``
    (``{domain: [token lists]}``), is the zero-ablation change of loss (a) larger than the rerouting
    change, or (b) not larger? The right letter is worked out from ``model``."""
    name = "Exercise 08.5 (zero-ablation vs rerouting)"
    base = _mean_loss(model, texts)
    zero = _mean_loss(model, texts, [AblateExpert(layer, expert, mode="zero")]) - base
    reroute = _mean_loss(model, texts, [AblateExpert(layer, expert)]) - base
    right = "a" if zero > reroute else "b"
    options = {"a": "zero-ablation costs more than rerouting",
               "b": "zero-ablation costs no more than rerouting"}
    why = {"a": "When the router cannot pick the expert, its next choice stands in for it: rerouting measures what "
                "is left once the redundancy of the other experts has helped; zeroing removes the output and "
                "shrinks the MoE output, with no stand-in.",
           "b": "Here the stand-in the router picks when the expert is disabled hurts at least as much as an empty "
                "slot: the next expert in line is a poor substitute on these documents."}[right]
    why_not = {"a": "compare your 08.1 number with the rerouting delta printed in the stub cell: zero is not the "
                    "larger one here.",
               "b": "compare your 08.1 number with the rerouting delta printed in the stub cell: zero is larger here."}
    return choice(name, answer, options, right, {k: v for k, v in why_not.items() if k != right}, why=why,
                  hint="both numbers are in front of you: 08.1's answer and second.delta.",
                  method="compare zero_delta with second.delta (both are ablated minus plain, in nats per token).")


def check_steering_test(answer) -> Feedback:
    """08.6 (multiple choice): why is "the maths loss falls when we push the maths experts" not the test
    of whether those experts are levers for maths?"""
    name = "Exercise 08.6 (what tests a lever?)"
    options = {"a": "any push moves a trained router off the choices it was tuned for on that text, so the in-domain "
                    "loss says little either way; the test is behavioural, on the other domain",
               "b": "the loss is too noisy to measure on a small model",
               "c": "a falling maths loss would prove the experts are levers; it just did not fall here",
               "d": "the loss should be measured on the training text instead"}
    why_not = {"b": "noise matters (a dip at one small dose decides nothing), but the deeper problem is a bias: the "
                    "in-domain loss is expected to move whatever the experts encode.",
               "c": "a lower loss under steering is not evidence of a lever: markers and levers both predict the same "
                    "in-domain loss curve, so it cannot tell them apart.",
               "d": "training text makes it worse (the model has seen it); the problem is the choice of test, not "
                    "the text."}
    return choice(name, answer, options, "a", why_not,
                  why="§4 asks whether english prompts steered toward the maths (or python) experts continue as that "
                      "domain more often than clean english text is classified so.",
                  hint="what would the in-domain loss do if the experts were mere markers of the domain?",
                  method="read 'Why in-domain loss is a biased test of a lever' in §4: both readings predict the same "
                         "loss curve; only a behavioural change on the other domain separates them.")


def check_small_ablation(answer) -> Feedback:
    """08.7 (multiple choice): disabling one expert by rerouting changes the held-out loss by a few
    hundredths of a nat. What follows?"""
    name = "Exercise 08.7 (a small ablation effect)"
    options = {"a": "the experts do not matter: the model would work as well without them",
               "b": "the router's next choice can stand in for the disabled expert, so rerouting measures what the "
                    "other experts cannot cover, not what the expert does",
               "c": "the expert is never chosen",
               "d": "the loss is the wrong measure: ablations never change it"}
    why_not = {"a": "disabling every expert (or the busiest ones in every layer, §7) costs far more; one expert's "
                    "small rerouting effect says the others are redundant with it, not that experts do nothing.",
               "c": "an expert that is never chosen has an effect of exactly 0 under rerouting; a small, non-zero "
                    "effect means it is chosen and its stand-in is almost as good.",
               "d": "§2's scan finds cells with effects beyond the null: ablations do change the loss."}
    return choice(name, answer, options, "b", why_not,
                  why="Zero- and mean-ablation (§3) and the per-token test (§7) ask the other questions.",
                  hint="what does the router do when its first choice is not available?",
                  method="read §3's table: rerouting lets the next expert in line take the slot, so its effect is the "
                         "part the other experts cannot cover.")
