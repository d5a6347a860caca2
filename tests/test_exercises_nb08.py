"""Notebook 08's exercise checkers on a seeded random tiny model: the right answer passes, None is
todo, and the typical mistakes (sign, the default reroute mode, the most negative component, an
off-by-one position, counting ranks from the bottom) are named."""

import numpy as np
import pytest
import torch

import moe_lab
from moe_lab import AblateExpert, causal
from moe_lab.attribution import logit_attribution
from moe_lab.exercises import nb08 as ex


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return moe_lab.Mixtral(moe_lab.ModelArgs.from_name("tiny")).eval()


@pytest.fixture(scope="module")
def docs():
    g = torch.Generator().manual_seed(1)
    return [[1] + torch.randint(2, 500, (15,), generator=g).tolist() for _ in range(4)]


def test_zero_ablation_delta(model, docs):
    texts = {"x": docs[:3]}
    base = causal.document_losses(model, texts).loss
    zero = causal.document_losses(model, texts, interventions=[AblateExpert(1, 2, mode="zero")]).loss
    right = float((zero - base).mean())
    assert ex.check_zero_ablation_delta(right, model, texts, 1, 2)
    assert ex.check_zero_ablation_delta(None, model, texts, 1, 2).status == "todo"
    assert "sign" in ex.check_zero_ablation_delta(-right, model, texts, 1, 2).message
    reroute = causal.document_losses(model, texts, interventions=[AblateExpert(1, 2)]).loss
    fb = ex.check_zero_ablation_delta(float((reroute - base).mean()), model, texts, 1, 2)
    assert not fb and "rerouting" in fb.message and "mode" in fb.hint
    assert not ex.check_zero_ablation_delta(right + 0.5, model, texts, 1, 2)


def _rate(tr, layer, expert, first_only=False):
    ids = tr.expert_ids[tr.layer_index(layer)]
    return float(((ids[:, :1] if first_only else ids) == expert).any(-1).mean())


def test_risk_difference(model, docs):
    a, b = docs[:2], docs[2:]
    layer, expert = 2, 3

    def right(ta, tb, l, e):
        return _rate(ta, l, e) - _rate(tb, l, e)

    assert ex.check_risk_difference(right, model, a, b, layer, expert)
    assert ex.check_risk_difference(None, model, a, b, layer, expert).status == "todo"
    ta, tb = (moe_lab.trace_routing(model, x, progress=False) for x in (a, b))
    fb = ex.check_risk_difference(right(ta, tb, layer, expert), model, a, b, layer, expert)  # pasted
    assert fb.status == "wrong" and "takes your function" in fb.message
    lib = lambda ta, tb, l, e: float(causal.contrastive_experts(model, a, b, n_boot=1).risk_diff.iloc[0])  # noqa: E731
    assert "calls the library" in ex.check_risk_difference(lib, model, a, b, layer, expert).message
    assert "sign" in ex.check_risk_difference(lambda ta, tb, l, e: -right(ta, tb, l, e), model, a, b, layer,
                                              expert).message
    assert "alone" in ex.check_risk_difference(lambda ta, tb, l, e: _rate(ta, l, e), model, a, b, layer, expert).message
    fb = ex.check_risk_difference(lambda ta, tb, l, e: _rate(ta, l, e, True) - _rate(tb, l, e, True), model, a, b,
                                  layer, expert)
    assert not fb and "first choice" in fb.message
    assert not ex.check_risk_difference(lambda *x: right(*x) + 0.3, model, a, b, layer, expert)


def test_risk_difference_is_contrastive_experts(model, docs):
    """The checker's reference is the library's risk difference (one formula, tested against the other)."""
    a, b = docs[:2], docs[2:]
    table = causal.contrastive_experts(model, a, b, n_boot=1, max_len=None)
    ta, tb = (moe_lab.trace_routing(model, x, progress=False) for x in (a, b))
    for row in table.itertuples():
        assert np.isclose(ex.risk_difference(ta, tb, row.layer, row.expert), row.risk_diff, atol=1e-12)


def test_graded_questions(model, docs):
    texts = {"x": docs[:3]}
    letters = [x for x in "ab" if ex.check_zero_vs_reroute(x, model, texts, 1, 2)]
    base = causal.document_losses(model, texts).loss.mean()
    zero = causal.document_losses(model, texts, interventions=[AblateExpert(1, 2, mode="zero")]).loss.mean() - base
    reroute = causal.document_losses(model, texts, interventions=[AblateExpert(1, 2)]).loss.mean() - base
    assert letters == ["a" if zero > reroute else "b"]
    for check, right in ((ex.check_steering_test, "a"), (ex.check_small_ablation, "b")):
        assert check(right) and check(None).status == "todo"
        for other in "abcd".replace(right, ""):
            fb = check(other)
            assert fb.status == "wrong" and f"({right})" not in str(fb)


def test_top_expert_for_logit(model, docs):
    doc, pos = docs[0], 5
    att = logit_attribution(model, doc)
    experts = att.table(pos)[[c for c in att.table(pos).index if ".expert." in c]]
    top, bottom = experts.index[0], experts.index[-1]
    pair = lambda c: (int(c.split(".")[1]), int(c.split(".")[3]))  # noqa: E731
    assert ex.check_top_expert_for_logit(pair(top), model, doc, pos)
    assert ex.check_top_expert_for_logit(None, model, doc, pos).status == "todo"
    assert "down" in ex.check_top_expert_for_logit(pair(bottom), model, doc, pos).message
    assert "pair" in ex.check_top_expert_for_logit("moe.1.expert.2", model, doc, pos).message
    assert "not an expert" in ex.check_top_expert_for_logit((9, 0), model, doc, pos).message
    other = pair(experts.index[1])
    assert not ex.check_top_expert_for_logit(other, model, doc, pos)


def test_router_rank(model, docs):
    doc, layer, pos = docs[0], 1, 6
    routes = causal.alternative_routes(model, doc, layer, pos)
    rank, n = int(routes[routes.router_choice]["rank"].iloc[0]), len(routes)
    assert n == 28
    assert ex.check_router_rank(rank, model, doc, layer, pos)
    assert ex.check_router_rank(np.int64(rank), model, doc, layer, pos)
    assert ex.check_router_rank(None, model, doc, layer, pos).status == "todo"
    if rank != n + 1 - rank:
        assert "worst" in ex.check_router_rank(n + 1 - rank, model, doc, layer, pos).message
    assert "integer" in ex.check_router_rank("first", model, doc, layer, pos).message
