"""The transformers bridge: trace_routing / trace_generation / intervene on transformers models.

Mixtral: the bridge's trace equals moe_lab's on the same weights. Every other model the bridge
claims (``moe_lab.routing.bridge.ROUTERS``) is built from a tiny random config and its traced expert ids
are compared with the indices its experts module actually receives (a forward pre-hook on
``mlp.experts``, independent of the router hook the bridge uses).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn

from conftest import CONFIG_IDS, TINY_CONFIGS, make_pair
from moe_lab import (AblateExpert, ForceExpert, RouterTemperature, SetTopK, SteerExperts, SwapExpert, intervene,
                     trace_generation, trace_routing)
from moe_lab import bridge
from moe_lab.causal import ablation_scan

transformers = pytest.importorskip("transformers")

DOCS = [[1, 5, 9, 22, 7], [1] + list(range(40, 70)), [1, 3], [1, 8, 8, 8, 8, 8, 8, 8, 8, 9, 10]]


@pytest.fixture(scope="module", params=TINY_CONFIGS, ids=CONFIG_IDS)
def pair(request):
    model, hf = make_pair(request.param, seed=99)
    return request.param, model, hf


def test_mixtral_trace_identical_to_moe_lab(pair):
    args, model, hf = pair
    ours = trace_routing(model, DOCS, batch_size=3, progress=False, keep_logits=True)
    theirs = trace_routing(hf, DOCS, batch_size=3, progress=False, keep_logits=True)
    assert np.array_equal(ours.expert_ids, theirs.expert_ids)
    np.testing.assert_allclose(ours.weights, theirs.weights, atol=1e-5)
    np.testing.assert_allclose(ours.router_logits, theirs.router_logits, atol=1e-4)
    for name in ("token_ids", "doc_ids", "positions"):
        assert np.array_equal(getattr(ours, name), getattr(theirs, name))
    assert theirs.layers == ours.layers and theirs.n_experts == ours.n_experts
    meta = theirs.meta
    assert meta["source"] == "transformers" and meta["model_type"] == "mixtral"
    assert meta["router_class"] == "MixtralTopKRouter" and meta["model_renormalises_weights"] is True
    assert meta["config"]["num_local_experts"] == args.n_experts and "moe_lab_version" in meta


def test_mixtral_interventions_identical_to_moe_lab(pair):
    args, model, hf = pair
    E, k = args.n_experts, args.experts_per_token
    cases = [
        [AblateExpert(0, 1), ForceExpert(args.n_layers - 1, 2, positions=[1, 4])],
        [SetTopK(E)],
        [RouterTemperature(0.3, layers=[0]), SetTopK(min(k + 1, E), layers=list(range(args.n_layers)))],
        [AblateExpert(0, [0, 1], mode="zero"), SteerExperts(args.n_layers - 1, {2: 2.0, 0: -1.0})],
    ]
    for ivs in cases:
        with intervene(model, *ivs):
            ours = trace_routing(model, DOCS, progress=False)
        with intervene(hf, *ivs):
            theirs = trace_routing(hf, DOCS, progress=False)
        assert np.array_equal(ours.expert_ids, theirs.expert_ids), ivs
        np.testing.assert_allclose(ours.weights, theirs.weights, atol=1e-5)
        assert theirs.meta["interventions"] == [repr(iv) for iv in ivs]
    assert not bridge.find_routers(hf)[0]._forward_hooks  # removed on exit


def test_mixtral_zero_ablation_and_steering_logits_equal_moe_lab(pair):
    args, model, hf = pair
    tokens = torch.tensor([DOCS[1]])
    ivs = [AblateExpert(0, 1, mode="zero"), SteerExperts(args.n_layers - 1, {2: 1.5})]
    with torch.no_grad():
        with intervene(model, *ivs):
            ours = model(tokens)
        with intervene(hf, *ivs):
            theirs = hf(tokens).logits
        assert not torch.allclose(ours, model(tokens), atol=1e-3)  # the interventions did something
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
    with pytest.raises(NotImplementedError, match="fuse a layer's experts"):
        with intervene(hf, SwapExpert(0, 1, 2)):
            pass
    with pytest.raises(TypeError, match="from_hf_model"):  # the experiments need a moe_lab model
        ablation_scan(hf, {"a": [DOCS[1]]}, progress=False)
    assert not bridge.find_routers(hf)[0]._forward_hooks and not hf._forward_pre_hooks


def test_mixtral_generation(pair):
    args, model, hf = pair
    prompts = [[1, 5, 9], [1, 40, 41, 42, 43]]
    ours_tokens, ours = trace_generation(model, prompts, 6)
    with intervene(hf, AblateExpert(0, 0)), intervene(model, AblateExpert(0, 0)):
        hf_tokens, theirs = trace_generation(hf, prompts, 6)
        ablated_tokens, ablated = trace_generation(model, prompts, 6)
    assert torch.equal(hf_tokens, ablated_tokens)  # HF generate obeys the intervention like moe_lab's
    assert np.array_equal(theirs.expert_ids, ablated.expert_ids) and not (ablated.expert_ids[0] == 0).any()
    hf_tokens, theirs = trace_generation(hf, prompts, 6)
    assert torch.equal(hf_tokens, ours_tokens)
    assert np.array_equal(theirs.expert_ids, ours.expert_ids)
    assert theirs.meta["prompt_lengths"] == [3, 5]


# --------------------------------------------------------------------------------------------
# other transformers MoE models


COMMON = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
              vocab_size=128, max_position_embeddings=256, initializer_range=0.2, pad_token_id=0, eos_token_id=2,
              bos_token_id=1)
MODELS = {  # model_type -> (config class name, extra config)
    "mixtral": ("MixtralConfig", dict(num_local_experts=8, num_experts_per_tok=2)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                                         shared_expert_intermediate_size=48, mlp_only_layers=[1])),
    "qwen3_moe": ("Qwen3MoeConfig", dict(num_experts=8, num_experts_per_tok=3, moe_intermediate_size=32, head_dim=8,
                                         norm_topk_prob=True)),
    "olmoe": ("OlmoeConfig", dict(num_experts=8, num_experts_per_tok=2)),
    "flex_olmo": ("FlexOlmoConfig", dict(num_experts=8, num_experts_per_tok=2)),
    "minimax": ("MiniMaxConfig", dict(num_local_experts=8, num_experts_per_tok=2, head_dim=8,
                                      layer_types=["full_attention"] * 3)),
    "granitemoe": ("GraniteMoeConfig", dict(num_local_experts=8, num_experts_per_tok=2)),
    "gpt_oss": ("GptOssConfig", dict(num_local_experts=8, num_experts_per_tok=2, head_dim=8)),
    "jamba": ("JambaConfig", dict(num_experts=8, num_experts_per_tok=2)),
    "phimoe": ("PhimoeConfig", dict(num_local_experts=8, num_experts_per_tok=2)),
    "deepseek_v3": ("DeepseekV3Config", dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                                             n_group=2, topk_group=1, first_k_dense_replace=1, kv_lora_rank=16,
                                             q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
                                             num_key_value_heads=4)),
    "ernie4_5_moe": ("Ernie4_5_MoeConfig", dict(moe_num_experts=8, moe_k=2, moe_intermediate_size=32)),
}
SOFTMAX_TOPK = sorted(t for c, (t, rule, _) in bridge.ROUTERS.items() if rule == "softmax_topk")


def test_every_claimed_model_is_tested():
    assert set(MODELS) == set(bridge.TESTED_MODELS)


def tiny_hf(model_type: str):
    cls_name, extra = MODELS[model_type]
    cfg = getattr(transformers, cls_name)(**{**COMMON, **extra})
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        transformers.logging.set_verbosity_error()
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    return model.eval()


class DispatchRecorder:
    """What each MoE layer's experts module receives: the integer top-k index argument."""

    def __init__(self, model):
        self.seen, self.handles, self.moe_layers = {}, [], []
        for L, layer in enumerate(bridge.decoder_layers(model)):
            experts = next((m for name, m in layer.named_modules() if name.endswith("experts")
                            and not isinstance(m, nn.ModuleList)), None)
            if experts is None:
                continue
            self.moe_layers.append(L)
            self.handles.append(experts.register_forward_pre_hook(self._hook(L), with_kwargs=True))

    def _hook(self, L):
        def hook(mod, args, kwargs):
            ints = [a for a in (*args, *kwargs.values()) if torch.is_tensor(a) and not a.dtype.is_floating_point]
            self.seen.setdefault(L, []).append(ints[0].clone())
        return hook

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def dispatched(model, docs, **trace_kw):
    """(trace, {layer: dispatched indices of the real tokens, in trace order})."""
    with DispatchRecorder(model) as rec:
        trace = trace_routing(model, docs, batch_size=len(docs), progress=False, sort_by_length=False, **trace_kw)
    T = max(map(len, docs))
    real = torch.zeros(len(docs), T, dtype=torch.bool)
    for b, d in enumerate(docs):
        real[b, T - len(d):] = True
    out = {L: calls[0].reshape(len(docs), T, -1)[real].numpy() for L, calls in rec.seen.items()}
    return trace, out, rec.moe_layers


HF_DOCS = [[1, 5, 9, 22, 7, 3, 4], [1] + list(range(40, 60)), [1, 3]]


@pytest.mark.parametrize("model_type", sorted(MODELS))
def test_bridge_trace_equals_dispatched_experts(model_type):
    model = tiny_hf(model_type)
    trace, seen, moe_layers = dispatched(model, HF_DOCS)
    assert trace.layers == moe_layers  # dense layers are left out
    assert trace.n_tokens == sum(map(len, HF_DOCS)) and trace.meta["model_type"] == model_type
    for row, L in enumerate(trace.layers):
        ids = trace.expert_ids[row]
        if type(bridge.find_routers(model)[L]).__name__ in bridge.UNSORTED_ROUTERS:
            assert np.array_equal(np.sort(ids, -1), np.sort(seen[L], -1))
        else:
            assert np.array_equal(ids, seen[L])  # same experts, same rank order
    np.testing.assert_allclose(trace.weights.sum(-1), 1.0, atol=1e-3)
    if model_type in SOFTMAX_TOPK or model_type == "deepseek_v3":
        assert (np.diff(trace.weights, axis=-1) <= 1e-6).all()  # rank order = decreasing weight


@pytest.mark.parametrize("model_type", SOFTMAX_TOPK)
def test_bridge_interventions_act_on_dispatch(model_type):
    model = tiny_hf(model_type)
    base, seen0, _ = dispatched(model, HF_DOCS)
    L0, L1 = base.layers[0], base.layers[-1]
    with intervene(model, AblateExpert(L0, 3), ForceExpert(L1, 5)):
        t, seen, _ = dispatched(model, HF_DOCS)
    assert not (seen[L0] == 3).any() and not (t.expert_ids[0] == 3).any()
    assert (seen[L1][:, 0] == 5).all() and (t.expert_ids[-1][:, 0] == 5).all()
    again, seen2, _ = dispatched(model, HF_DOCS)  # removed on exit
    assert all(np.array_equal(seen0[L], seen2[L]) for L in seen0)


def test_unrenormalised_models_are_renormalised_in_the_trace():
    model = tiny_hf("olmoe")  # norm_topk_prob=False by default
    t = trace_routing(model, HF_DOCS, progress=False)
    assert t.meta["model_renormalises_weights"] is False and "weights_note" in t.meta
    np.testing.assert_allclose(t.weights.sum(-1), 1.0, atol=1e-6)


def test_interventions_refused_for_other_routing_rules():
    model = tiny_hf("deepseek_v3")
    with pytest.raises(NotImplementedError, match="DeepseekV3TopkRouter"):
        with intervene(model, AblateExpert(1, 0)):
            pass


def test_v4_names_and_non_moe_models_are_errors():
    class V4Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.block_sparse_moe = nn.Module()
            self.block_sparse_moe.gate = nn.Linear(8, 4, bias=False)

    class V4Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([V4Layer(), V4Layer()])
    with pytest.raises(NotImplementedError, match="transformers v4 module names"):
        bridge.find_routers(V4Model())
    cfg = transformers.MistralConfig(**{k: v for k, v in COMMON.items()})
    dense = transformers.MistralForCausalLM(cfg)
    with pytest.raises(TypeError, match="no top-k router"):
        trace_routing(dense, HF_DOCS, progress=False)
