"""The key paths on a GPU: the same results as on the CPU, inputs sent to the model's device,
analyses back on the CPU (the rule of ``moe_lab/devices.py``). Skipped, with the reason, when
PyTorch sees no CUDA GPU.

``MOE_LAB_TEST_DEVICE`` picks the device (default ``cuda``; ``cuda:1``, ``mps``, ...);
``MOE_LAB_TEST_DEVICE=cpu`` runs the module on the CPU, a dry run of the tests themselves in
which every comparison is trivially exact.

Tolerances: fp32 on both sides (PyTorch keeps TF32 off for fp32 matmuls by default), so logits
agree to ~1e-5; routing is compared as the share of identical choices (a near-tie may flip).
"""

from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch

import moe_lab
from moe_lab import attribution, causal, devices, evalset
from moe_lab.analysis import language, offload
from moe_lab.model import Mixtral, ModelArgs
from moe_lab.tokenizer import load_tokenizer

DEVICE = torch.device(os.environ.get("MOE_LAB_TEST_DEVICE", "cuda"))


def _unavailable() -> str | None:
    try:
        devices.check_available(DEVICE)
    except RuntimeError as e:
        return str(e)
    return None


pytestmark = pytest.mark.skipif(_unavailable() is not None, reason=f"no GPU for these tests: {_unavailable()}")

ARGS = ModelArgs(dim=32, n_layers=3, n_heads=2, n_kv_heads=1, head_dim=16, hidden_dim=48, vocab_size=32000,
                 max_seq_len=128, n_experts=4, experts_per_token=2, init_std=0.2, sliding_window=8)
TEXTS = {"a": ["hello world it is a fine day", "the cat sat"], "b": ["def f(x): return x", "import os"]}
ATOL = 1e-4


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.fixture(scope="module")
def cpu_model():
    torch.manual_seed(0)
    return Mixtral(ARGS).eval()


@pytest.fixture(scope="module")
def model(cpu_model):
    return copy.deepcopy(cpu_model).to(DEVICE)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, cpu_model):
    return moe_lab.save_model(cpu_model, tmp_path_factory.mktemp("ckpt") / "tiny")


def on_device(t: torch.Tensor) -> bool:
    return devices.same_device(t.device, DEVICE)


def same_choices(a: np.ndarray, b: np.ndarray) -> float:
    return float((a == b).mean())


def test_loading_puts_every_weight_on_the_device(checkpoint, cpu_model):
    m = moe_lab.load_model(checkpoint, device=DEVICE)
    assert all(on_device(p) for p in m.parameters())
    demo = moe_lab.load_demo_model(device=DEVICE, random_if_missing=True)
    assert all(on_device(p) for p in demo.parameters())
    if DEVICE.type == "cuda":
        assert devices.pick_device("auto").type == "cuda"
    tokens = torch.tensor([[1, 5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(m(tokens.to(DEVICE)).cpu(), cpu_model(tokens), rtol=0, atol=ATOL)


def test_forward_with_padding_and_cache_matches_cpu(model, cpu_model):
    tokens = torch.tensor([[0, 0, 1, 5, 6, 7, 8, 9, 10, 11, 12, 13], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]])
    mask = torch.tensor([[0, 0] + [1] * 10, [1] * 12])
    with torch.no_grad():
        want = cpu_model(tokens, attention_mask=mask)
        got = model(tokens.to(DEVICE), attention_mask=mask.to(DEVICE))
    assert on_device(got)
    torch.testing.assert_close(got.cpu(), want, rtol=0, atol=ATOL)


def test_trace_routing_runs_on_the_device_and_returns_numpy(model, cpu_model, tok, checkpoint):
    want = moe_lab.trace_routing(cpu_model, TEXTS, tokenizer=tok, progress=False, keep_logits=True)
    got = moe_lab.trace_routing(model, TEXTS, tokenizer=tok, progress=False, keep_logits=True, device=DEVICE)
    assert isinstance(got.expert_ids, np.ndarray) and isinstance(got.router_logits, np.ndarray)
    np.testing.assert_allclose(got.router_logits, want.router_logits, atol=ATOL)
    assert same_choices(got.expert_ids, want.expert_ids) >= 0.99
    with moe_lab.StreamingMixtral(checkpoint, device=DEVICE) as sm:
        streamed = moe_lab.trace_routing(sm, TEXTS, tokenizer=tok, progress=False)
    assert same_choices(streamed.expert_ids, got.expert_ids) >= 0.99


def test_generation_on_the_device(model, cpu_model, tok):
    prompt = [[1, 5, 6, 7], [1, 9]]
    out = model.generate(prompt, 5)
    assert on_device(out)
    torch.testing.assert_close(out.cpu(), cpu_model.generate(prompt, 5), rtol=0, atol=0)  # greedy: same tokens
    tokens, trace = moe_lab.trace_generation(model, prompt, 5)
    assert on_device(tokens) and isinstance(trace.expert_ids, np.ndarray)
    torch.testing.assert_close(tokens.cpu(), out.cpu(), rtol=0, atol=0)
    a = model.generate(prompt, 5, temperature=1.0, top_p=0.9, seed=3)
    b = model.generate(prompt, 5, temperature=1.0, top_p=0.9, seed=3)
    torch.testing.assert_close(a, b, rtol=0, atol=0)  # a seeded generator on the device


@pytest.mark.parametrize("iv", [moe_lab.AblateExpert(1, 2), moe_lab.AblateExpert(0, [1, 3], mode="zero"),
                                moe_lab.SwapExpert(2, 0, 1), moe_lab.SteerExperts(1, {0: 2.0, 3: -1.0}),
                                moe_lab.ForceExpert(1, 3, positions=[1, 2]), moe_lab.SetTopK(1),
                                moe_lab.RouterTemperature(2.0), moe_lab.MaskTopExperts(1),
                                moe_lab.SteerExperts(1, activate=[2], deactivate=[0]),
                                moe_lab.AblateExpert(1, 2, mode="mean", reference=[[1, 5, 6, 7, 8, 9, 10, 11, 12]])],
                         ids=repr)
def test_interventions_on_the_device(model, cpu_model, iv):
    tokens = torch.tensor([[1, 5, 6, 7, 8, 9]])
    with torch.no_grad():
        with moe_lab.intervene(cpu_model, iv):
            want = cpu_model(tokens)
        with moe_lab.intervene(model, iv):
            got = model(tokens.to(DEVICE))
    torch.testing.assert_close(got.cpu(), want, rtol=0, atol=ATOL)


def test_causal_experiments_on_the_device(model, cpu_model, tok):
    ivs = [moe_lab.SwapExpert(1, 0, 2)]
    want = causal.document_losses(cpu_model, TEXTS, tok, ivs)
    got = causal.document_losses(model, TEXTS, tok, ivs, device=DEVICE)
    np.testing.assert_allclose(got["loss"], want["loss"], atol=ATOL)
    scan = causal.ablation_scan(model, TEXTS, tok, layers=[1], experts=[0, 1], n_controls=2, n_boot=20,
                                progress=False)
    base = causal.document_losses(cpu_model, TEXTS, tok).groupby("domain")["loss"].mean()
    np.testing.assert_allclose(scan.groupby("domain")["base_loss"].first().loc[base.index], base, atol=ATOL)
    top = causal.disable_top_experts(model, TEXTS, tok, r_values=[0, 1], n_random=1, n_boot=20, progress=False)
    assert np.isfinite(top["loss"]).all()
    routes, routes_cpu = (causal.alternative_routes(m, [1, 5, 6, 7, 8], 1, 2) for m in (model, cpu_model))
    assert routes.attrs["plain_logprob"] == pytest.approx(routes_cpu.attrs["plain_logprob"], abs=ATOL)
    diff = causal.contrastive_experts(model, TEXTS["a"], TEXTS["b"], tok, n_boot=20)
    assert diff["risk_diff"].between(-1, 1).all()


def test_redundancy_dose_and_cross_check_on_the_device(model, cpu_model, tok):
    for m in (model, cpu_model):  # the per-token masking and its random control run where the model is
        df = causal.mask_top_experts(m, TEXTS, tok, r_values=[0, 1], n_boot=20, progress=False)
        assert np.isfinite(df["loss"]).all()
    want, got = (causal.mask_top_experts(m, TEXTS, tok, r_values=[1], random_control=False, n_boot=20, progress=False)
                 for m in (cpu_model, model))
    np.testing.assert_allclose(got["loss"], want["loss"], atol=ATOL)
    steer = lambda d: [moe_lab.SteerExperts(1, {0: d})]  # noqa: E731
    want, got = (causal.dose_response(m, TEXTS, steer, [0.0, 1.0], tok, n_boot=20, progress=False)
                 for m in (cpu_model, model))
    np.testing.assert_allclose(got["delta"], want["delta"], atol=ATOL)
    tokens = [1, 5, 6, 7, 8, 9]
    want, got = (attribution.router_logits_without(m, tokens, 2, 3, "moe.0.expert.1") for m in (cpu_model, model))
    assert got.device.type == "cpu"
    torch.testing.assert_close(got, want, rtol=0, atol=ATOL)


def test_attribution_on_the_device(model, cpu_model):
    tokens = [1, 5, 6, 7, 8]
    got, want = (attribution.router_attribution(m, tokens, 1, per_expert=True) for m in (model, cpu_model))
    assert got.contributions.device.type == "cpu"
    torch.testing.assert_close(got.contributions, want.contributions, rtol=0, atol=ATOL)
    torch.testing.assert_close(got.contributions.sum(0), got.router_logits, rtol=0, atol=ATOL)
    got, want = (attribution.logit_attribution(m, tokens) for m in (model, cpu_model))
    assert got.contributions.device.type == "cpu"
    torch.testing.assert_close(got.target_logits, want.target_logits, rtol=0, atol=ATOL)


def test_evalset_language_and_prefetch_on_the_device(model, cpu_model, tok):
    sentences = {"en": ["hello world", "a cat sat on the mat"]}
    nll = evalset.token_nlls(model, tok, "hello world")
    assert on_device(nll)
    assert evalset.sentence_nll(model, tok, sentences)["en"] == pytest.approx(
        evalset.sentence_nll(cpu_model, tok, sentences)["en"], abs=ATOL)
    docs = [[1, 5, 6], [1, 7, 8, 9]]
    np.testing.assert_allclose(language.mean_router_inputs(model, docs), language.mean_router_inputs(cpu_model, docs),
                               atol=ATOL)
    pf = offload.speculative_prefetch(model, [[1, 5, 6, 7], [1, 7, 8, 9]])
    assert isinstance(pf.guess, np.ndarray) and pf.guess.shape[:2] == pf.actual.shape[:2]


def test_explorer_on_the_device(model, cpu_model, tok):
    pytest.importorskip("ipywidgets")
    from moe_lab.widgets import RoutingExplorer

    ex, ex_cpu = (RoutingExplorer(m, tok, text="The cat sat on the mat.", device=d)
                  for m, d in ((model, DEVICE), (cpu_model, None)))
    np.testing.assert_allclose(ex.next_probs, ex_cpu.next_probs, atol=ATOL)
    effect = ex.apply_intervention("steer", 1, layer=1, offset=3.0)
    assert isinstance(effect.new_probs, np.ndarray) and np.isfinite(effect.kl)
    ex.set_text("def f(x): return x")
    assert len(ex.table) > 0


def test_another_device_is_an_error(cpu_model):
    if devices.same_device(DEVICE, torch.device("cpu")):
        pytest.skip("the test device is the CPU")
    with pytest.raises(ValueError, match="never moves it for you"):
        moe_lab.trace_routing(cpu_model, [[1, 2, 3]], progress=False, device=DEVICE)
    assert all(p.device.type == "cpu" for p in cpu_model.parameters())


def test_transformers_model_on_the_device(model, cpu_model):
    pytest.importorskip("transformers")
    from moe_lab.checkpoints.convert import to_hf_model

    hf = to_hf_model(cpu_model).to(DEVICE)
    hf.generation_config.eos_token_id, hf.generation_config.pad_token_id = None, 0
    docs = [[1, 5, 6, 7], [1, 9, 10]]
    got = moe_lab.trace_routing(hf, docs, progress=False, device=DEVICE)
    want = moe_lab.trace_routing(model, docs, progress=False)
    assert same_choices(got.expert_ids, want.expert_ids) >= 0.99
    tokens, trace = moe_lab.trace_generation(hf, docs, 3)
    assert on_device(tokens) and trace.n_tokens == sum(len(d) + 3 for d in docs)
