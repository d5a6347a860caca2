"""Where a model runs: the one rule every moe_lab function follows for ``device=``.

moe_lab computes where the model's weights are and never moves a model behind your back
(moving Mixtral 8x7B is 90 GB of copying; a ``StreamingMixtral`` cannot move at all). So:

* **loading** picks the device: ``load_demo_model(device="cuda")``, ``load_model(path, device=...)``,
  ``StreamingMixtral(path, device=...)``. ``device="auto"`` is the GPU when PyTorch sees one
  (``torch.cuda.is_available()``), else the CPU -- the line to write in a notebook that runs
  both on a laptop and on Colab;
* **everything else** (tracing, generation, interventions, causal experiments, attribution,
  the evaluation set, the explorer) takes ``device=None``, meaning "the model's device", and
  sends its inputs there (token lists, CPU tensors). A ``device`` that is given must be the
  model's: anything else is an error that says how to move the model, never a silent copy;
* **results** that are analyses (``RoutingTrace`` arrays, pandas tables, numpy arrays,
  attribution tensors) come back on the CPU; the tensors a model computes for you to keep
  computing with (``generate``'s tokens, ``trace_generation``'s tokens, ``token_nlls``) stay
  on the model's device, as ``model(tokens)`` does.

::

    model = moe_lab.load_demo_model(device="auto")          # cuda when there is one
    trace = moe_lab.trace_routing(model, texts, tokenizer=tok)   # runs on the model's device
    trace.expert_ids                                        # numpy, on the CPU
"""

from __future__ import annotations

import torch
from torch import nn


def default_device() -> torch.device:
    """The GPU when PyTorch can use one (CUDA), else the CPU: what ``device="auto"`` means."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def check_available(device: torch.device) -> None:
    """Raise a clear error for a device this PyTorch cannot use (before any allocation fails)."""
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device={str(device)!r}, but PyTorch sees no CUDA GPU (torch.cuda.is_available() is "
                           f"False; torch {torch.__version__}, CUDA build {torch.version.cuda}). Use device='cpu', "
                           "or device='auto' for the GPU when there is one.")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise RuntimeError(f"device={str(device)!r}, but PyTorch sees {torch.cuda.device_count()} CUDA GPU(s) "
                           f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
    if device.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise RuntimeError(f"device={str(device)!r}, but this PyTorch cannot use Apple's MPS "
                           "(torch.backends.mps.is_available() is False). Use device='cpu'.")


def pick_device(device: str | torch.device = "cpu") -> torch.device:
    """The device to load a model onto: ``"auto"`` is :func:`default_device`, anything else is
    checked to be usable here (``"cuda"`` without a GPU is a clear error, not a failed allocation)."""
    if device == "auto":
        return default_device()
    device = torch.device(device)
    check_available(device)
    return device


def model_device(model) -> torch.device:
    """Where ``model`` takes its inputs: the device of its token embedding.

    Works for a moe_lab ``Mixtral``, a ``StreamingMixtral`` (its ``.model`` holds the embedding)
    and a transformers model (``get_input_embeddings()``; with ``device_map="auto"`` the first
    layer's device, where inputs go)."""
    if hasattr(model, "get_input_embeddings"):
        emb = model.get_input_embeddings()
    else:
        emb = getattr(getattr(model, "model", model), "tok_embeddings", None)
    if isinstance(emb, nn.Module):
        return emb.weight.device
    if isinstance(model, nn.Module):
        return next(model.parameters()).device
    raise TypeError(f"cannot tell where a {type(model).__name__} runs (no token embedding, not an nn.Module)")


def same_device(a: torch.device, b: torch.device) -> bool:
    """True when ``a`` and ``b`` are one device; ``"cuda"`` (no index) matches every ``"cuda:i"``."""
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def resolve_device(model, device: str | torch.device | None = None) -> torch.device:
    """The device a computation on ``model`` runs on: the model's (``device=None``), or ``device``
    when it is the model's. A different device is an error saying how to move the model:
    moe_lab never moves a model itself (see the module docstring)."""
    have = model_device(model)
    if device is None:
        return have
    want = torch.device(device)
    if same_device(want, have):
        return have
    if want.type != "meta":
        check_available(want)
    raise ValueError(f"device={str(want)!r}, but the model is on {str(have)!r}. moe_lab runs a model where its "
                     f"weights are and never moves it for you: move it first (model.to({str(want)!r})), load it "
                     f"there (moe_lab.load_demo_model(device={str(want)!r}), load_model(path, device=...)), or "
                     "leave device=None to use the model's device.")
