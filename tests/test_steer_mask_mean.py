"""Issue 23's interventions: MaskTopExperts (DeepSeekMoE's per-token redundancy test),
SteerExperts(activate=, deactivate=) (SteerMoE's rule), AblateExpert(mode="mean").

Each on moe_lab models, a model loaded with ``layers=``, StreamingMixtral and (where it is
supported) the transformers bridge."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn

import moe_lab
from conftest import CONFIG_IDS, TINY_CONFIGS, make_model, make_pair, random_tokens
from moe_lab import (AblateExpert, CustomRouting, MaskTopExperts, SetTopK, SteerExperts, StreamingMixtral, intervene,
                     load_model, save_model, trace_routing)
from moe_lab.routing.interventions import active_interventions


def assert_untouched(model):
    assert all(b.moe.routing_fn is moe_lab.topk_softmax_routing for b in model.blocks)
    assert not active_interventions(model)
    assert all(not b.moe._forward_hooks and not b.moe._forward_pre_hooks for b in model.blocks)


def mask_top_by_hand(r):
    """The per-token rule written out: each token's r highest logits to -inf, then Mixtral's rule."""
    def rule(logits, k):
        masked = logits.clone()
        top = logits.topk(r, dim=-1).indices
        masked.scatter_(-1, top, float("-inf"))
        probs = torch.softmax(masked.float(), -1)
        w, idx = probs.topk(k, dim=-1)
        return probs, idx, w / w.sum(-1, keepdim=True)
    rule.__name__ = f"mask_top_{r}_by_hand"
    return rule


# --------------------------------------------------------------------------------------------
# MaskTopExperts


@pytest.mark.parametrize("args", TINY_CONFIGS, ids=CONFIG_IDS)
def test_mask_top_experts_equals_the_rule_by_hand(args):
    model = make_model(args, seed=11)
    tokens = random_tokens(args, 2, 12, seed=5)
    base = trace_routing(model, tokens, progress=False, keep_logits=True)
    E, k = args.n_experts, args.experts_per_token
    for r in range(E - k + 1):
        with torch.no_grad():
            with intervene(model, MaskTopExperts(r)):
                got = model(tokens)
                t = trace_routing(model, tokens, progress=False)
            with intervene(model, CustomRouting(mask_top_by_hand(r))):
                want = model(tokens)
                t_hand = trace_routing(model, tokens, progress=False)
        assert torch.equal(got, want), r  # exact identity
        assert np.array_equal(t.expert_ids, t_hand.expert_ids) and np.array_equal(t.weights, t_hand.weights)
        if r == 0:
            assert torch.equal(got, model(tokens).detach())
        else:
            # layer 0's input is unchanged: no token keeps any of its own r best experts there
            own_best = np.argsort(-base.router_logits[0], axis=-1, kind="stable")[:, :r]
            assert not (t.expert_ids[0][:, :, None] == own_best[:, None, :]).any()
            assert not torch.allclose(got, model(tokens).detach(), atol=1e-4)
    assert_untouched(model)


def test_mask_top_experts_composes_and_errors():
    args = TINY_CONFIGS[2]  # top-3 of 8
    model = make_model(args, seed=12)
    tokens = random_tokens(args, 2, 10, seed=6)
    base = trace_routing(model, tokens, progress=False, keep_logits=True)
    # with a layer restriction, other layers are bit-identical
    with intervene(model, MaskTopExperts(2, layers=[1])):
        t = trace_routing(model, tokens, progress=False)
    assert np.array_equal(t.expert_ids[0], base.expert_ids[0]) and not np.array_equal(t.expert_ids[1], base.expert_ids[1])
    # composes with an ablation (applied first: the ablated expert is not one of the masked r) and SetTopK
    def by_hand(logits, k):
        logits = logits.clone()
        logits[:, 4] = float("-inf")
        return mask_top_by_hand(1)(logits, 2)
    with torch.no_grad():
        with intervene(model, AblateExpert(0, 4), MaskTopExperts(1, layers=0), SetTopK(2, layers=0)):
            got = model(tokens)
        with intervene(model, CustomRouting(by_hand, layers=0), SetTopK(2, layers=0)):
            want = model(tokens)
    assert torch.equal(got, want)
    # errors: r >= E at once; r + k > E when the model runs (k is known then, SetTopK included)
    with pytest.raises(ValueError, match=r"r=8 masks every expert of a token \(this model has 8 experts"):
        with intervene(model, MaskTopExperts(8)):
            pass
    with pytest.raises(ValueError, match=r"MaskTopExperts\(6\) masks 6 experts per token and the routing picks k=3: "
                                         r"r \+ k = 9 is more than the 8 experts available"):
        with intervene(model, MaskTopExperts(6)):
            model(tokens)
    with intervene(model, MaskTopExperts(6), SetTopK(2)):  # 6 + 2 = 8 is allowed
        model(tokens)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="r must be an integer >= 0"):
            MaskTopExperts(bad)
    assert_untouched(model)


def test_mask_top_and_steering_on_partial_and_streaming_models(tmp_path):
    args = TINY_CONFIGS[3]  # 3 layers, top-2 of 4
    full = make_model(args, seed=13)
    path = save_model(full, tmp_path / "c")
    part = load_model(path, layers=[1, 2])
    tokens = random_tokens(args, 2, 10, seed=7)
    ivs = [MaskTopExperts(1, layers=[1]), SteerExperts(2, activate=[3], deactivate=[0])]
    with torch.no_grad():
        with intervene(part, *ivs):
            want = part(tokens)
        assert not torch.allclose(want, part(tokens), atol=1e-4)
    with StreamingMixtral(path, layers=[1, 2]) as sm:
        with intervene(sm, *ivs):
            got = sm(tokens)
        assert torch.equal(got, want)
        assert sm.loaded_blocks() == [] and not active_interventions(sm)


# --------------------------------------------------------------------------------------------
# SteerExperts: SteerMoE's activate / deactivate


@pytest.mark.parametrize("args", TINY_CONFIGS, ids=CONFIG_IDS)
def test_activate_and_deactivate(args):
    model = make_model(args, seed=14)
    tokens = random_tokens(args, 3, 12, seed=8)
    base = trace_routing(model, tokens, progress=False)
    E, k = args.n_experts, args.experts_per_token
    L = args.n_layers - 1
    counts = np.bincount(base.expert_ids[L].ravel(), minlength=E)
    least, most = int(np.argmin(counts)), int(np.argmax(counts))
    with intervene(model, SteerExperts(L, activate=[least], deactivate=[most])):
        t = trace_routing(model, tokens, progress=False, keep_logits=True)
    assert (t.expert_ids[L] == least).any(-1).all()  # every token routes to the activated expert
    assert not (t.expert_ids[L] == most).any()  # no token to the deactivated one
    assert (t.expert_ids[L][:, 0] == least).all()  # max + margin: it ranks first
    assert np.array_equal(t.expert_ids[:L], base.expert_ids[:L])  # earlier layers untouched
    # SteerMoE's scores by hand: log-softmax, activated -> row max + margin, deactivated -> row min - margin
    s = torch.from_numpy(t.router_logits[L]).float().log_softmax(-1)
    hi, lo = s.max(-1, keepdim=True).values + 0.01, s.min(-1, keepdim=True).values - 0.01
    s[:, [least]], s[:, [most]] = hi, lo
    _, idx, w = moe_lab.topk_softmax_routing(s, k)
    assert np.array_equal(t.expert_ids[L], idx.numpy())
    np.testing.assert_allclose(t.weights[L], w.numpy(), atol=1e-6)
    if k >= 2:  # k experts activated at once: all of them, for every token
        act = list(range(k))
        with intervene(model, SteerExperts(L, activate=act)):
            t = trace_routing(model, tokens, progress=False)
        assert (np.sort(t.expert_ids[L], -1) == np.array(act)).all()
    # deactivating all but k experts leaves exactly those
    keep = [most] + [e for e in range(E) if e != most][:k - 1]
    with intervene(model, SteerExperts(L, deactivate=[e for e in range(E) if e not in keep])):
        t = trace_routing(model, tokens, progress=False)
    assert (np.sort(t.expert_ids[L], -1) == np.sort(keep)).all()
    # offsets still work as before, and combine
    with intervene(model, SteerExperts(L, {least: 0.0}, deactivate=[most])):
        t = trace_routing(model, tokens, progress=False)
    assert not (t.expert_ids[L] == most).any()
    assert_untouched(model)


def test_steer_experts_errors():
    model = make_model(TINY_CONFIGS[1], seed=15)  # 8 experts
    with pytest.raises(ValueError, match=r"expert 2 is both in activate=\[1, 2\] and deactivate=\[2\]"):
        SteerExperts(0, activate=[1, 2], deactivate=[2])
    with pytest.raises(ValueError, match="needs offsets=.* or activate=/deactivate="):
        SteerExperts(0)
    with pytest.raises(ValueError, match="non-empty dict"):
        SteerExperts(0, {})
    with pytest.raises(ValueError, match=r"activate: expert 8 is outside \[0, 8\) \(this model has 8 experts"):
        with intervene(model, SteerExperts(0, activate=[8])):
            pass
    with pytest.raises(ValueError, match=r"deactivate: expert -1 is outside \[0, 8\)"):
        with intervene(model, SteerExperts(0, deactivate=[-1])):
            pass
    with pytest.raises(ValueError, match="would deactivate all 8 experts"):
        with intervene(model, SteerExperts(0, deactivate=range(8))):
            pass
    with pytest.raises(ValueError, match="margin must be"):
        SteerExperts(0, activate=[1], margin=-1)
    assert_untouched(model)


# --------------------------------------------------------------------------------------------
# AblateExpert(mode="mean")


class _Constant(nn.Module):
    def __init__(self, vec):
        super().__init__()
        self.vec = vec

    def forward(self, x):
        return self.vec.to(x.dtype).expand(x.shape[0], -1)


@pytest.mark.parametrize("args", TINY_CONFIGS[1:3], ids=CONFIG_IDS[1:3])
def test_mean_ablation_equals_a_constant_expert(args):
    model = make_model(args, seed=16)
    reference = random_tokens(args, 4, 16, seed=9)
    tokens = random_tokens(args, 2, 12, seed=10)
    L = args.n_layers - 1
    base = trace_routing(model, tokens, progress=False)
    e = int(np.bincount(base.expert_ids[L].ravel(), minlength=args.n_experts).argmax())
    # the mean by hand: e's output over the reference tokens the router sends to e
    ref_trace = trace_routing(model, reference, progress=False)
    outs = []
    h = model.blocks[L].moe.register_forward_pre_hook(lambda m, a: outs.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        model(reference)
    h.remove()
    x = outs[0]
    rows = torch.from_numpy((ref_trace.expert_ids[L] == e).any(-1))
    assert rows.any()
    with torch.no_grad():
        mean = model.blocks[L].moe.experts[e](x[rows]).mean(0)
        constant = copy.deepcopy(model)
        constant.blocks[L].moe.experts[e] = _Constant(mean)
        want = constant(tokens)
        iv = AblateExpert(L, e, mode="mean", reference=reference)
        with intervene(model, iv):
            got = model(tokens)
            t = trace_routing(model, tokens, progress=False)
        zero = AblateExpert(L, e, mode="zero")
        with intervene(model, zero):
            zeroed = model(tokens)
    torch.testing.assert_close(iv.means[(L, e)], mean, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, zeroed, atol=1e-4) and not torch.allclose(got, model(tokens).detach(), atol=1e-4)
    assert np.array_equal(t.expert_ids, base.expert_ids)  # routing unchanged
    # reference as token lists gives the same mean; during generate too
    iv2 = AblateExpert(L, e, mode="mean", reference=reference.tolist())
    with torch.no_grad(), intervene(model, iv2):
        torch.testing.assert_close(model(tokens), got, atol=1e-6, rtol=0)
        model.generate(tokens[:1, :5], 3, temperature=0.0)
    assert_untouched(model)


def test_mean_ablation_errors(tmp_path):
    args = TINY_CONFIGS[1]
    model = make_model(args, seed=17)
    with pytest.raises(ValueError, match="mode='mean'\\) needs reference="):
        AblateExpert(0, 1, mode="mean")
    with pytest.raises(ValueError, match="reference= is only used by mode='mean', not mode='zero'"):
        AblateExpert(0, 1, mode="zero", reference=[[1, 2]])
    with pytest.raises(ValueError, match="reference= is empty"):
        AblateExpert(0, 1, mode="mean", reference=[])
    with pytest.raises(ValueError, match="token ids"):
        AblateExpert(0, 1, mode="mean", reference=torch.zeros(2, 3))
    # an expert the reference never reaches: forced out by steering (an outer intervention)
    with pytest.raises(ValueError, match="never sends a token of reference= to expert 3 of layer 0"):
        with intervene(model, SteerExperts(0, deactivate=[3])), intervene(model, AblateExpert(0, 3, mode="mean",
                                                                                             reference=[[1, 2, 3]])):
            pass
    assert_untouched(model)
    # streaming: the same numbers as the in-memory model
    path = save_model(model, tmp_path / "m")
    tokens = random_tokens(args, 1, 9, seed=11)
    ref = random_tokens(args, 3, 12, seed=12)
    with torch.no_grad(), intervene(model, AblateExpert(1, 2, mode="mean", reference=ref)):
        want = model(tokens)
    with StreamingMixtral(path) as sm, intervene(sm, AblateExpert(1, 2, mode="mean", reference=ref)):
        torch.testing.assert_close(sm(tokens), want, atol=1e-6, rtol=0)


# --------------------------------------------------------------------------------------------
# the transformers bridge


@pytest.mark.parametrize("args", TINY_CONFIGS, ids=CONFIG_IDS)
def test_bridge_mask_top_and_activate(args):
    pytest.importorskip("transformers")
    model, hf = make_pair(args, seed=18)
    tokens = random_tokens(args, 2, 11, seed=13)
    E, k, L = args.n_experts, args.experts_per_token, args.n_layers - 1
    cases = [[MaskTopExperts(E - k)], [MaskTopExperts(1, layers=[0]), SteerExperts(L, activate=[1], deactivate=[0])]]
    for ivs in cases:
        with torch.no_grad():
            with intervene(model, *ivs):
                ours = model(tokens)
                t_ours = trace_routing(model, tokens, progress=False)
            with intervene(hf, *ivs):
                theirs = hf(tokens).logits
                t_theirs = trace_routing(hf, tokens, progress=False)
        assert not torch.allclose(ours, model(tokens), atol=1e-3)
        torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
        assert np.array_equal(t_ours.expert_ids, t_theirs.expert_ids)
    with pytest.raises(ValueError, match="r \\+ k"):
        with intervene(hf, MaskTopExperts(E - k + 1)):
            hf(tokens)
    with pytest.raises(NotImplementedError, match="mean ablation"):
        with intervene(hf, AblateExpert(0, 0, mode="mean", reference=tokens)):
            pass
