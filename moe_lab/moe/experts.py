"""Experts: the feed-forward networks a router chooses between (and the dense FFN of a dense layer).

One class, ``Expert``, with the variants the MoE designs use, each a line of ``forward``:

* SwiGLU ``w2(silu(w1 x) * w3 x)`` (Mixtral, OLMoE, Qwen, DeepSeek, Llama 4; the default);
* GPT-OSS's clamped SwiGLU: gate ``g = w1 x`` clipped above at ``limit``, up ``u = w3 x`` clipped to
  ``[-limit, limit]``, then ``w2((u + 1) * g * sigmoid(alpha g))``, with biases on w1, w2, w3;
* a plain two-matrix FFN ``w2(act(w1 x))`` (Switch Transformers' T5 feed-forward, ReLU), ``gated=False``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..hooks import HookPoint



def gelu_tanh(x: Tensor) -> Tensor:
    return F.gelu(x, approximate="tanh")


ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": gelu_tanh, "relu": F.relu}


def clamped_swiglu(gate: Tensor, up: Tensor, alpha: float, limit: float) -> Tensor:
    """GPT-OSS's SwiGLU: gate clipped above at ``limit``, up clipped to [-limit, limit],
    (up + 1) * gate * sigmoid(alpha * gate)."""
    gate = gate.clamp(max=limit)
    up = up.clamp(min=-limit, max=limit)
    return (up + 1) * gate * torch.sigmoid(alpha * gate)


class Expert(nn.Module):
    """SwiGLU feed-forward: w2(silu(w1 x) * w3 x). (w1: gate, w3: up, w2: down projection.)

    Options (``ModelArgs``: ``expert_bias``, ``expert_act``, ``expert_gated``, ``swiglu_limit``,
    ``swiglu_alpha``): ``bias`` puts a bias on w1, w2, w3; ``gated=False`` drops w3
    (w2(act(w1 x))); ``swiglu_limit`` switches to GPT-OSS's clamped SwiGLU.
    """

    def __init__(self, dim: int, hidden_dim: int, *, bias: bool = False, act: str = "silu", gated: bool = True,
                 swiglu_limit: float | None = None, swiglu_alpha: float = 1.702):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=bias)
        self.w2 = nn.Linear(hidden_dim, dim, bias=bias)
        self.w3 = nn.Linear(dim, hidden_dim, bias=bias) if gated else None
        self.act, self.gated = ACTIVATIONS[act], gated
        self.limit, self.alpha = swiglu_limit, swiglu_alpha
        self.hook_out = HookPoint()  # (n, D): this expert's output, before its routing weight

    def forward(self, x: Tensor) -> Tensor:
        if not self.gated:  # plain FFN (Switch's T5 feed-forward)
            h = self.act(self.w1(x))
        elif self.limit is None:  # SwiGLU (Mixtral)
            h = self.act(self.w1(x)) * self.w3(x)
        else:  # GPT-OSS's clamped SwiGLU
            h = clamped_swiglu(self.w1(x), self.w3(x), self.alpha, self.limit)
        return self.hook_out(self.w2(h))


def make_expert(args, hidden_dim: int) -> Expert:
    """An ``Expert`` of ``hidden_dim`` with the expert options of ``args`` (a ``ModelArgs``)."""
    return Expert(args.dim, hidden_dim, bias=args.expert_bias, act=args.expert_act, gated=args.expert_gated,
                  swiglu_limit=args.swiglu_limit, swiglu_alpha=args.swiglu_alpha)
