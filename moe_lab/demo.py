"""The demo model: a small Mixtral trained by this project, shipped in ``data/tiny-mixtral``.

``load_demo_model()`` is how notebooks, courses and scripts get it, so no one needs to know where
the repository keeps it::

    model = moe_lab.load_demo_model()                  # fp32 on the CPU
    model = moe_lab.load_demo_model(device="cuda")     # on a GPU, when you have one
    model = moe_lab.load_demo_model(device="auto")     # the GPU when there is one, else the CPU

The model is looked up next to the package (a clone or an editable install of the repository,
which is also what the notebooks' Colab cell makes). It is never downloaded: when it is missing,
the error says how to get it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .checkpoints.loading import load_model
from .devices import pick_device
from .model import Mixtral, ModelArgs

DEMO_NAME = "tiny-mixtral"
DEMO_DTYPE = torch.float32  # one dtype for the demo model everywhere: exact on every CPU, fast enough


def demo_model_dir() -> Path:
    """Where the demo model lives: ``data/tiny-mixtral`` in the repository that holds this package."""
    return Path(__file__).resolve().parent.parent / "data" / DEMO_NAME


def demo_model_available() -> bool:
    """True when the demo model's weights are on disk (see :func:`demo_model_dir`)."""
    d = demo_model_dir()
    return (d / "config.json").is_file() and (d / "model.safetensors").is_file()


def load_demo_model(*, device: str | torch.device = "cpu", dtype=DEMO_DTYPE,
                    random_if_missing: bool = False, seed: int = 0) -> Mixtral:
    """Load the demo model (``data/tiny-mixtral``) in eval mode.

    Args:
        device: "cpu" (default), "cuda", "cuda:1", ..., or "auto" (the GPU when PyTorch sees one,
            else the CPU). Every moe_lab function then runs on the model's device
            (:mod:`moe_lab.devices`).
        dtype: fp32 by default, the one dtype the notebooks use (the file stores bf16; fp32 holds
            every bf16 value exactly).
        random_if_missing: when the demo model is not on disk, return a randomly initialised model of
            the same shape (arbitrary routing; ``model.is_demo`` is False) instead of raising.
        seed: the seed of that random model.

    The returned model has ``model.is_demo`` (True for the trained weights) and ``model.name``
    (for titles and printouts).
    """
    d = demo_model_dir()
    device = pick_device(device)
    if demo_model_available():
        model = load_model(d, dtype=dtype, device=device)
        model.is_demo, model.name = True, f"demo model (data/{DEMO_NAME})"
        return model.eval()
    if not random_if_missing:
        raise FileNotFoundError(
            f"the demo model is not at {d} (expected config.json and model.safetensors there).\n"
            "It ships with the repository: clone it (git clone <repository> && pip install -e <clone>),\n"
            "or rebuild it with\n"
            "  python -m moe_lab.train --config configs/tiny-mixtral-v4.json --out runs/tiny-mixtral-v4\n"
            "  python -m moe_lab.train export --run runs/tiny-mixtral-v4 --out data/tiny-mixtral\n"
            "or pass random_if_missing=True for a random model of the same shape.")
    torch.manual_seed(seed)
    model = Mixtral(ModelArgs.from_name("tiny")).to(device=device, dtype=dtype)
    model.is_demo, model.name = False, "random tiny model (demo model not found)"
    return model.eval()
