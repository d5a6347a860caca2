"""Interventions: AblateExpert, ForceExpert, SetTopK, RouterTemperature, CustomRouting."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import moe_lab
from conftest import TINY_CONFIGS, make_model
from moe_lab import (AblateExpert, CustomRouting, ForceExpert, RouterTemperature, SetTopK, intervene,
                     trace_generation, trace_routing)
from moe_lab.routing.interventions import active_interventions

ARGS = TINY_CONFIGS[2].replace(n_layers=3)  # top-3 of 8
DOCS = [[1, 5, 9, 22, 7, 30, 31, 2], [1, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51], [1, 3, 3, 3]]


@pytest.fixture(scope="module")
def model():
    return make_model(ARGS, seed=21)


def trace(model, docs=DOCS, **kw):
    return trace_routing(model, docs, progress=False, keep_logits=True, **kw)


def assert_untouched(model):
    assert all(b.moe.routing_fn is moe_lab.topk_softmax_routing for b in model.blocks)
    assert not active_interventions(model)
    assert not model._forward_pre_hooks and not model._forward_hooks


def test_ablate_expert(model):
    base = trace(model)
    L = 1
    e = int(np.bincount(base.expert_ids[L].ravel()).argmax())  # the busiest expert of layer 1
    with intervene(model, AblateExpert(L, e)) as m:
        assert m is model and active_interventions(model)
        t = trace(model)
    assert_untouched(model)
    assert not (t.expert_ids[L] == e).any()
    assert np.array_equal(t.expert_ids[:L], base.expert_ids[:L])  # earlier layers unchanged
    # "the next expert takes the slot": top-k of the softmax with e's logit at -inf
    logits = torch.from_numpy(base.router_logits[L])  # layer L's input is unchanged, so are its logits
    np.testing.assert_allclose(t.router_logits[L], logits.numpy(), atol=1e-6)
    masked = logits.clone()
    masked[:, e] = float("-inf")
    top = masked.softmax(-1).topk(ARGS.experts_per_token, -1)
    assert np.array_equal(t.expert_ids[L], top.indices.numpy())
    np.testing.assert_allclose(t.weights[L], (top.values / top.values.sum(-1, keepdim=True)).numpy(), atol=1e-6)
    untouched = ~(base.expert_ids[L] == e).any(-1)  # tokens that did not use e keep their routing in layer L
    assert untouched.any() and np.array_equal(t.expert_ids[L][untouched], base.expert_ids[L][untouched])
    # several experts, several layers
    with intervene(model, AblateExpert([0, 2], [1, 2, 3])):
        t2 = trace(model)
    assert not np.isin(t2.expert_ids[[0, 2]], [1, 2, 3]).any()


def test_force_expert(model):
    base = trace(model)
    L, e = 2, 6
    with intervene(model, ForceExpert(L, e)):
        t = trace(model)
    assert (t.expert_ids[L][:, 0] == e).all()  # always chosen, in rank 0
    assert np.array_equal(t.expert_ids[:L], base.expert_ids[:L])
    # weights: the router's own probabilities of the chosen experts, renormalised
    probs = torch.from_numpy(t.router_logits[L]).softmax(-1)
    chosen = probs.gather(1, torch.from_numpy(t.expert_ids[L]))
    np.testing.assert_allclose(t.weights[L], (chosen / chosen.sum(-1, keepdim=True)).numpy(), atol=1e-6)
    # the other k-1 are the router's favourites among the rest, in rank order
    rest = probs.clone()
    rest[:, e] = -1
    assert np.array_equal(t.expert_ids[L][:, 1:], rest.topk(ARGS.experts_per_token - 1, -1).indices.numpy())


def test_force_expert_at_positions(model):
    base = trace(model)
    L, e, pos = 1, 0, [2, 5]
    with intervene(model, ForceExpert(L, e, positions=pos)):
        t = trace(model)
    at = np.isin(t.positions, pos)
    assert (t.expert_ids[L][at, 0] == e).all()
    assert np.array_equal(t.expert_ids[L][~at], base.expert_ids[L][~at])  # same input at layer 1, same routing
    assert not (base.expert_ids[L][at, 0] == e).all()  # the intervention did something


def test_set_top_k_dense_equals_hand_mixture(model):
    E = ARGS.n_experts
    moe = model.blocks[0].moe
    x = torch.randn(10, ARGS.dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        probs = F.softmax(moe.gate(x).float(), -1)  # (N, E)
        by_hand = sum(probs[:, e:e + 1] * moe.experts[e](x) for e in range(E))
        with intervene(model, SetTopK(E)):
            dense, _ = moe(x[None])
            t = trace(model)
    torch.testing.assert_close(dense[0], by_hand, atol=1e-6, rtol=1e-5)
    assert t.top_k == E
    assert (np.sort(t.expert_ids, -1) == np.arange(E)).all()
    np.testing.assert_allclose(t.weights, np.take_along_axis(
        torch.from_numpy(t.router_logits).softmax(-1).numpy(), t.expert_ids, -1), atol=1e-6)
    with intervene(model, SetTopK(1, layers=[1])), pytest.warns(UserWarning, match="pads to k=3"):
        t1 = trace(model)
    assert (t1.expert_ids[1][:, 1:] == -1).all() and (t1.weights[1][:, 0] == 1).all()


def test_router_temperature(model):
    base = trace(model)
    with intervene(model, RouterTemperature(0.5, layers=[0])):
        t = trace(model)
    assert np.array_equal(t.expert_ids[0], base.expert_ids[0])  # same choice, sharper weights
    assert (t.weights[0][:, 0] >= base.weights[0][:, 0] - 1e-6).all()
    p = torch.from_numpy(base.router_logits[0] / 0.5).softmax(-1).topk(ARGS.experts_per_token, -1).values
    np.testing.assert_allclose(t.weights[0], (p / p.sum(-1, keepdim=True)).numpy(), atol=1e-6)
    with pytest.raises(ValueError, match="t must be > 0"):
        RouterTemperature(0)


def test_custom_routing(model):
    def first_experts(logits, k):
        probs = torch.full(logits.shape, 1 / logits.shape[-1], device=logits.device)
        idx = torch.arange(k, device=logits.device).expand(logits.shape[0], k)
        return probs, idx, torch.full(idx.shape, 1 / k)
    with intervene(model, CustomRouting(first_experts, layers=[1])):
        t = trace(model)
        assert "CustomRouting(first_experts" in t.meta["interventions"][0]
    assert (t.expert_ids[1] == np.arange(ARGS.experts_per_token)).all()
    np.testing.assert_allclose(t.weights[1], 1 / ARGS.experts_per_token)

    def broken(logits, k):
        return logits, torch.zeros(3, k, dtype=torch.long), torch.zeros(3, k)
    with pytest.raises(ValueError, match="expected indices and weights of shape"):
        with intervene(model, CustomRouting(broken)):
            trace(model)
    assert_untouched(model)


def test_composition_and_nesting(model):
    E = ARGS.n_experts
    with intervene(model, AblateExpert([0, 1, 2], 3), SetTopK(E)):  # dense over the experts left: k = E - 1
        t = trace(model)
    assert t.expert_ids.shape[-1] == E - 1 and not (t.expert_ids == 3).any()
    with intervene(model, AblateExpert(1, 4)):
        with intervene(model, ForceExpert(1, 5), RouterTemperature(2.0)):
            assert len(active_interventions(model)) == 3
            t = trace(model)
        assert len(active_interventions(model)) == 1
    assert_untouched(model)
    assert (t.expert_ids[1][:, 0] == 5).all() and not (t.expert_ids[1] == 4).any()
    np.testing.assert_allclose(t.weights.sum(-1), 1.0, atol=1e-6)


def test_restored_after_exception(model):
    tokens = torch.tensor(DOCS[1])[None]
    with torch.no_grad():
        base = model(tokens)
    with pytest.raises(RuntimeError, match="inside"):
        with intervene(model, AblateExpert(0, 1), ForceExpert(1, 2, positions=[0]), SetTopK(1), RouterTemperature(3)):
            raise RuntimeError("inside")
    assert_untouched(model)
    with pytest.raises(ValueError, match="expert 8 is outside"):
        with intervene(model, AblateExpert(0, 1), ForceExpert(1, 8)):
            pass
    with pytest.raises(ValueError, match="layer 5 is not an MoE layer"):
        with intervene(model, SetTopK(2, layers=[5])):
            pass
    with pytest.raises(ValueError, match="k must be in"):
        with intervene(model, SetTopK(9)):
            pass
    with pytest.raises(ValueError, match="switch off all"):
        with intervene(model, AblateExpert(0, range(8))):
            pass
    with pytest.raises(TypeError, match="Intervention objects"):
        with intervene(model, "AblateExpert(0, 1)"):
            pass
    assert_untouched(model)
    with torch.no_grad():
        assert torch.equal(model(tokens), base)


def test_interventions_act_during_generate(model):
    prompts = [[1, 5, 9], [1, 40, 41, 42, 43]]
    n = 10
    _, base = trace_generation(model, prompts, n)
    gen = base.positions >= np.array(base.meta["prompt_lengths"])[base.doc_ids]
    e = int(np.bincount(base.expert_ids[2][gen].ravel()).argmax())
    force_pos = [6, 7]  # positions of generated tokens in both rows
    with intervene(model, AblateExpert(2, e), ForceExpert(0, 7, positions=force_pos)):
        tokens, t = trace_generation(model, prompts, n)
        assert torch.equal(tokens, model.generate(prompts, n))  # generate obeys the same interventions
    gen = t.positions >= np.array(t.meta["prompt_lengths"])[t.doc_ids]
    assert gen.sum() == 2 * n
    assert not (t.expert_ids[2] == e).any()
    at = np.isin(t.positions, force_pos)
    assert (t.expert_ids[0][at, 0] == 7).all()
    assert np.array_equal(t.expert_ids[0][~at & ~gen], base.expert_ids[0][~at & ~gen])  # the prompt is unchanged
    assert t.meta["interventions"] == [f"AblateExpert(layer=2, expert={e})", "ForceExpert(layer=0, expert=7, positions=[6, 7])"]
    assert_untouched(model)
