"""``device=``: every moe_lab function runs where the model is (``moe_lab/devices.py``), on the CPU.

No GPU is needed here. Two stand-ins make the checks meaningful on a CPU-only machine:

* the **meta device** plays "a device other than the model's": loading with ``device="meta"``
  must put every parameter there, and asking a CPU model to run on "meta" must fail with the
  rule's message, before any work;
* **strict devices**: the key paths run on a CPU model with PyTorch's default device set to
  "meta" and a mode that fails any op mixing a meta tensor with a real one. A tensor made
  without ``device=`` then lands on meta and fails (mixed with the model's tensors, read with
  ``.item()``/``.numpy()``, or copied out), which is exactly the mistake that fails on CUDA
  (a CPU tensor meeting the model's CUDA tensors). ``test_strict_devices_catches`` shows that
  the guard catches each pattern, including one that plain meta tensors let through silently.

``tests/test_cuda.py`` runs the key paths on a real GPU (skipped without one).
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

import moe_lab
from moe_lab import causal, attribution, devices, evalset
from moe_lab.analysis import language, offload
from moe_lab.model import Mixtral, ModelArgs
from moe_lab.tokenizer import load_tokenizer

ARGS = ModelArgs(dim=32, n_layers=3, n_heads=2, n_kv_heads=1, head_dim=16, hidden_dim=48, vocab_size=32000,
                 max_seq_len=128, n_experts=4, experts_per_token=2, init_std=0.2)
TEXTS = {"a": ["hello world it is", "the cat sat"], "b": ["def f(x): return x", "import os"]}


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Mixtral(ARGS).eval()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, model):
    return moe_lab.save_model(model, tmp_path_factory.mktemp("ckpt") / "tiny")


# --------------------------------------------------------------------------------------------
# the rule


def test_model_device_of_each_kind(model, checkpoint):
    assert devices.model_device(model) == torch.device("cpu")
    with torch.device("meta"):
        meta = Mixtral(ARGS.replace(vocab_size=100))
    assert devices.model_device(meta) == torch.device("meta")
    with moe_lab.StreamingMixtral(checkpoint) as sm:
        assert devices.model_device(sm) == torch.device("cpu")
    pytest.importorskip("transformers")
    from moe_lab.checkpoints.convert import to_hf_model

    assert devices.model_device(to_hf_model(model)) == torch.device("cpu")
    with pytest.raises(TypeError, match="cannot tell where"):
        devices.model_device(object())


def test_resolve_device(model):
    assert devices.resolve_device(model) == torch.device("cpu")
    assert devices.resolve_device(model, "cpu") == torch.device("cpu")
    assert devices.resolve_device(model, torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(ValueError, match=r"device='meta', but the model is on 'cpu'.*model\.to\('meta'\)"):
        devices.resolve_device(model, "meta")
    assert devices.same_device(torch.device("cuda"), torch.device("cuda:1"))
    assert not devices.same_device(torch.device("cuda:0"), torch.device("cuda:1"))
    assert not devices.same_device(torch.device("cpu"), torch.device("cuda"))


def test_loading_honours_device(checkpoint):
    m = moe_lab.load_model(checkpoint, device="meta")
    assert {p.device.type for p in m.parameters()} == {"meta"}
    with moe_lab.StreamingMixtral(checkpoint, device="meta") as sm:
        assert sm.device == torch.device("meta") and sm.model.tok_embeddings.weight.device.type == "meta"
    demo = moe_lab.load_demo_model(device="meta", random_if_missing=True)  # the file or the random model
    assert {p.device.type for p in demo.parameters()} == {"meta"}


def test_cuda_without_a_gpu_is_a_clear_error(monkeypatch, model, checkpoint):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert devices.pick_device("auto") == torch.device("cpu") == moe_lab.default_device()
    for call in (lambda: devices.pick_device("cuda"), lambda: moe_lab.load_model(checkpoint, device="cuda"),
                 lambda: moe_lab.load_demo_model(device="cuda:0", random_if_missing=True),
                 lambda: moe_lab.StreamingMixtral(checkpoint, device="cuda"),
                 lambda: moe_lab.trace_routing(model, [[1, 2]], device="cuda", progress=False)):
        with pytest.raises(RuntimeError, match=r"PyTorch sees no CUDA GPU.*device='cpu'"):
            call()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert devices.pick_device("auto") == torch.device("cuda")  # nothing allocated: no GPU needed


def _entry_points(model, tok):
    """Every public function that runs a model, called with ``device=`` (name -> call(device))."""
    from moe_lab.widgets import RoutingExplorer, explore, intervention_effect

    ids = tok.encode("hello there you")
    return {
        "trace_routing": lambda d: moe_lab.trace_routing(model, TEXTS, tokenizer=tok, progress=False, device=d),
        "trace_generation": lambda d: moe_lab.trace_generation(model, "hi", 2, tokenizer=tok, device=d),
        "generate": lambda d: model.generate([[1, 2, 3]], 2, device=d),
        "generate_stream": lambda d: next(moe_lab.generation.generate_stream(model, [[1, 2, 3]], 2, device=d)),
        "document_losses": lambda d: causal.document_losses(model, TEXTS, tok, device=d),
        "ablation_scan": lambda d: causal.ablation_scan(model, TEXTS, tok, layers=[1], experts=[0], n_controls=2,
                                                        n_boot=10, progress=False, device=d),
        "disable_top_experts": lambda d: causal.disable_top_experts(model, TEXTS, tok, r_values=[0, 1], n_random=1,
                                                                    n_boot=10, progress=False, device=d),
        "contrastive_experts": lambda d: causal.contrastive_experts(model, TEXTS["a"], TEXTS["b"], tok, n_boot=10,
                                                                    device=d),
        "alternative_routes": lambda d: causal.alternative_routes(model, [1, 5, 6, 7, 8], 1, 2, device=d),
        "router_attribution": lambda d: attribution.router_attribution(model, [1, 5, 6, 7], 1, per_expert=True,
                                                                       device=d),
        "logit_attribution": lambda d: attribution.logit_attribution(model, [1, 5, 6, 7], device=d),
        "sentence_nll": lambda d: evalset.sentence_nll(model, tok, {"en": ["hello world", "a cat"]}, device=d),
        "mean_router_inputs": lambda d: language.mean_router_inputs(model, [[1, 5, 6], [1, 7, 8, 9]], device=d),
        "speculative_prefetch": lambda d: offload.speculative_prefetch(model, [[1, 5, 6], [1, 7, 8], [3, 4]],
                                                                       device=d),
        "intervention_effect": lambda d: intervention_effect(model, ids, "steer", 1, 2, offset=3.0, device=d),
        "explorer": lambda d: RoutingExplorer(model, tok, text="hello world", device=d).apply_intervention("ablate", 1),
        "explore": lambda d: explore(model, tok, text="hello world", device=d, static=True),
    }


ENTRY_POINTS = ["trace_routing", "trace_generation", "generate", "generate_stream", "document_losses",
                "ablation_scan", "disable_top_experts", "contrastive_experts", "alternative_routes",
                "router_attribution", "logit_attribution", "sentence_nll", "mean_router_inputs",
                "speculative_prefetch", "intervention_effect", "explorer", "explore"]


def test_entry_point_list_is_complete(model, tok):
    assert ENTRY_POINTS == list(_entry_points(model, tok))


@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_entry_point_refuses_another_device(name, model, tok):
    """device= other than the model's fails with the rule's message, and the model stays put."""
    if name.startswith("explor"):
        pytest.importorskip("ipywidgets")
    call = _entry_points(model, tok)[name]
    with pytest.raises(ValueError, match="never moves it for you"):
        call("meta")
    assert {p.device.type for p in model.parameters()} == {"cpu"}


def test_explicit_model_device_gives_the_same_results(model, tok):
    a = moe_lab.trace_routing(model, TEXTS, tokenizer=tok, progress=False)
    b = moe_lab.trace_routing(model, TEXTS, tokenizer=tok, progress=False, device="cpu")
    np.testing.assert_array_equal(a.expert_ids, b.expert_ids)
    np.testing.assert_array_equal(a.weights, b.weights)
    torch.testing.assert_close(model.generate([[1, 2, 3]], 4), model.generate([[1, 2, 3]], 4, device="cpu"),
                               rtol=0, atol=0)


def test_hf_model_refuses_another_device(model):
    pytest.importorskip("transformers")
    from moe_lab.checkpoints.convert import to_hf_model

    hf = to_hf_model(model)
    with pytest.raises(ValueError, match="never moves it for you"):
        moe_lab.trace_routing(hf, [[1, 2, 3]], progress=False, device="meta")
    trace = moe_lab.trace_routing(hf, [[1, 2, 3]], progress=False, device="cpu")
    assert trace.n_tokens == 3


# --------------------------------------------------------------------------------------------
# strict devices: no tensor made without device=


class _NoMixing(TorchFunctionMode):
    """Fail any op whose tensor arguments mix the meta device with a real one."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        kinds = {t.device.type for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        if "meta" in kinds and len(kinds) > 1:
            raise RuntimeError(f"{getattr(func, '__name__', func)} mixes devices {sorted(kinds)}: a tensor was "
                               "made without device= (it landed on the default device, meta here)")
        return func(*args, **kwargs)


@contextlib.contextmanager
def strict_devices():
    """Tensors made without ``device=`` go to "meta", and meeting a real tensor fails."""
    with torch.device("meta"), _NoMixing():
        yield


def test_strict_devices_catches(model):
    w = model.output.weight.detach()  # a model tensor (CPU)
    patterns = {
        "mixed in an op": lambda: w[:3, 0] + torch.ones(3),
        "index-assigned into a model tensor": lambda: w.clone()[[0, 1], 0].copy_(torch.tensor([1.0, 2.0])),
        "put with advanced indexing": lambda: w[:4, 0].clone().index_put_((torch.tensor([0, 1], device="cpu"),),
                                                                          torch.tensor([1.0, 2.0])),
        "read on the host": lambda: torch.zeros(3).numpy(),
        "staged then sent": lambda: torch.zeros(3).to("cpu"),
    }
    for what, call in patterns.items():
        with pytest.raises((RuntimeError, NotImplementedError, TypeError)), strict_devices():
            call()
    # the guard is needed for the silent case: plain meta values put into a CPU tensor are dropped
    x = torch.zeros(4)
    x[[0, 1]] = torch.tensor([1.0, 2.0], device="meta")
    assert x.sum() == 0
    with strict_devices():  # explicit devices pass
        (w[:3, 0] + torch.ones(3, device=w.device)).sum().item()


@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_entry_point_makes_no_tensor_without_device(name, model, tok):
    if name.startswith("explor"):
        pytest.importorskip("ipywidgets")
    call = _entry_points(model, tok)[name]
    with strict_devices():
        call(None)


def test_interventions_make_no_tensor_without_device(model):
    ivs = [moe_lab.SteerExperts(1, {0: 2.0, 3: -1.0}), moe_lab.AblateExpert(0, [1, 2]), moe_lab.SwapExpert(2, 0, 1),
           moe_lab.ForceExpert(1, 3, positions=[1, 2]), moe_lab.SetTopK(1, layers=[2]),
           moe_lab.RouterTemperature(2.0, layers=[0])]
    tokens = torch.tensor([[1, 5, 6, 7]], device="cpu")
    with torch.no_grad():
        for iv in ivs:
            with moe_lab.intervene(model, iv):
                want = model(tokens)
                with strict_devices():
                    got = model(tokens)
            torch.testing.assert_close(got, want, rtol=0, atol=0)  # the guard changes nothing it lets through
