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
    chosen = probs.gather(1, torch.from_numpy(t.expert_ids[L].astype(np.int64)))
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


# --------------------------------------------------------------------------------------------
# the three ablation semantics and steering (issue 13)

import copy  # noqa: E402

from conftest import CONFIG_IDS, TINY_CONFIGS as CONFIGS, random_tokens  # noqa: E402
from moe_lab import StreamingMixtral, SteerExperts, SwapExpert, load_model, save_model  # noqa: E402


def busiest(t, L):
    return int(np.bincount(t.expert_ids[L].ravel()).argmax())


@pytest.mark.parametrize("args", CONFIGS, ids=CONFIG_IDS)
def test_zero_ablation_equals_zeroed_w2(args):
    model = make_model(args, seed=3)
    tokens = random_tokens(args, 2, 12, seed=1)
    base = trace_routing(model, tokens, progress=False)
    L = args.n_layers - 1
    e = busiest(base, L)
    zeroed = copy.deepcopy(model)
    with torch.no_grad():
        zeroed.blocks[L].moe.experts[e].w2.weight.zero_()
        want = zeroed(tokens)
        with intervene(model, AblateExpert(L, e, mode="zero")):
            got = model(tokens)
            t = trace_routing(model, tokens, progress=False)
    assert not torch.allclose(got, model(tokens).detach(), atol=1e-4)  # it did something
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    assert np.array_equal(t.expert_ids[L], base.expert_ids[L])  # routing unchanged in the trace
    hit = t.expert_ids[L] == e
    assert hit.any() and (t.weights[L][hit] == 0).all()  # (a trace's weights are renormalised over the k)
    with intervene(model, AblateExpert(L, e, mode="zero")):  # the training path (autograd) too
        torch.testing.assert_close(model(tokens), zeroed(tokens), atol=1e-6, rtol=0)


@pytest.mark.parametrize("args", CONFIGS, ids=CONFIG_IDS)
def test_swap_equals_copied_weights(args):
    model = make_model(args, seed=4)
    tokens = random_tokens(args, 2, 12, seed=2)
    base = trace_routing(model, tokens, progress=False)
    L = 0
    e = busiest(base, L)
    r, x = [i for i in range(args.n_experts) if i != e][-2:]
    copied = copy.deepcopy(model)
    copied.blocks[L].moe.experts[e].load_state_dict(model.blocks[L].moe.experts[r].state_dict())
    with torch.no_grad():
        with intervene(model, SwapExpert(L, e, replacement=r)):
            got = model(tokens)
            t = trace_routing(model, tokens, progress=False)
        assert torch.equal(got, copied(tokens))
        assert not torch.allclose(got, model(tokens), atol=1e-4)
    assert np.array_equal(t.expert_ids[L], base.expert_ids[L]) and np.array_equal(t.weights[L], base.weights[L])
    assert [int(k) for k in model.blocks[L].moe.experts._modules] == list(range(args.n_experts))
    assert model.blocks[L].moe.experts[e] is not model.blocks[L].moe.experts[r]
    # two swaps apply in order, like copying weights one after the other; nesting restores in order
    copied.blocks[L].moe.experts[r].load_state_dict(model.blocks[L].moe.experts[x].state_dict())
    with torch.no_grad(), intervene(model, SwapExpert(L, e, r)):
        with intervene(model, SwapExpert(L, r, x)):
            assert torch.equal(model(tokens), copied(tokens))
        assert torch.equal(model(tokens), got)
    assert_untouched(model)


def test_steering():
    args = CONFIGS[1]  # top-2 of 8
    model = make_model(args, seed=5)
    tokens = random_tokens(args, 2, 12, seed=3)
    base = trace_routing(model, tokens, progress=False, keep_logits=True)
    with torch.no_grad():
        ref = model(tokens)
        with intervene(model, SteerExperts(0, {3: 0.0, 5: 0.0})):
            assert torch.equal(model(tokens), ref)  # offset 0: bit for bit
    e = int(np.argmin(np.bincount(base.expert_ids[0].ravel(), minlength=args.n_experts)))  # least used
    with intervene(model, SteerExperts(0, {e: 1e4})):
        t = trace_routing(model, tokens, progress=False, keep_logits=True)
    assert (t.expert_ids[0] == e).any(-1).all()  # in every token's top-k
    np.testing.assert_array_equal(t.router_logits[0], base.router_logits[0])  # the trace keeps the raw logits
    # a moderate offset: the routing is the rule applied to the shifted logits
    with intervene(model, SteerExperts(1, {e: 1.5, 0: -2.0})):
        t = trace_routing(model, tokens, progress=False, keep_logits=True)
    shifted = torch.from_numpy(t.router_logits[1]).clone()
    shifted[:, e] += 1.5
    shifted[:, 0] -= 2.0
    _, idx, w = moe_lab.topk_softmax_routing(shifted, args.experts_per_token)
    assert np.array_equal(t.expert_ids[1], idx.numpy())
    np.testing.assert_allclose(t.weights[1], w.numpy(), atol=1e-6)
    # composes: steering toward e, then zero-ablating e keeps the slot but empties it
    with intervene(model, SteerExperts(0, {e: 1e4}), AblateExpert(0, e, mode="zero")):
        t = trace_routing(model, tokens, progress=False)
    assert (t.weights[0][t.expert_ids[0] == e] == 0).all()
    assert_untouched(model)


def test_new_interventions_errors_and_restoring(model):
    with pytest.raises(ValueError, match="unknown mode 'erase'"):
        AblateExpert(0, 1, mode="erase")
    with pytest.raises(ValueError, match="is the expert itself"):
        SwapExpert(0, 2, replacement=2)
    with pytest.raises(ValueError, match=r"offsets for expert 9 is outside \[0, 8\) \(this model has 8 experts"):
        with intervene(model, SteerExperts(0, {9: 1.0})):
            pass
    with pytest.raises(ValueError, match=r"replacement 8 is outside \[0, 8\)"):
        with intervene(model, SwapExpert(0, 1, 8)):
            pass
    with pytest.raises(ValueError, match=r"layer 7 is not an MoE layer of this model \(3 layers"):
        with intervene(model, AblateExpert(7, 1, mode="zero")):
            pass
    with pytest.raises(ValueError, match="non-empty dict"):
        SteerExperts(0, {})
    assert_untouched(model)
    # an error inside the swapped forward: the experts are put back
    experts = list(model.blocks[1].moe.experts)
    h = model.blocks[1].moe.experts[4].w1.register_forward_hook(lambda *a: 1 / 0)
    try:
        with pytest.raises(ZeroDivisionError):
            with intervene(model, SwapExpert(1, 2, 4), AblateExpert(1, 3, mode="zero"), SteerExperts(1, {4: 50.0})):
                model(torch.tensor(DOCS[1])[None])
    finally:
        h.remove()
    assert list(model.blocks[1].moe.experts) == experts
    assert all(not b.moe._forward_hooks and not b.moe._forward_pre_hooks for b in model.blocks)
    assert_untouched(model)


def test_new_interventions_on_partial_and_streaming_models(tmp_path):
    args = CONFIGS[3]  # 3 layers, top-2 of 4
    full = make_model(args, seed=6)
    path = save_model(full, tmp_path / "c")
    part = load_model(path, layers=[1, 2])  # checkpoint layer numbers
    tokens = random_tokens(args, 2, 10, seed=4)
    ivs = [SwapExpert(2, 0, 3), AblateExpert(1, 1, mode="zero"), SteerExperts(2, {2: 1.0})]
    with torch.no_grad(), intervene(part, *ivs):
        want = part(tokens)
    assert_untouched(part)
    with StreamingMixtral(path, layers=[1, 2]) as sm:
        with intervene(sm, *ivs):
            got = sm(tokens)
        assert torch.equal(got, want)
        assert sm.loaded_blocks() == [] and not active_interventions(sm)
        with pytest.raises(ValueError, match="layer 0 is not an MoE layer"):
            with intervene(sm, SwapExpert(0, 0, 1)):
                pass
