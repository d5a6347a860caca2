"""Mixtral in one readable file.

Bottom-up, as nanoGPT: config -> norm / RoPE -> KV cache -> mask and attention -> transformer
block -> model (``embed`` -> blocks -> ``head``). The MoE block (router, experts, and every design
``ModelArgs`` can ask for: Switch, DeepSeek, GPT-OSS, Llama 4, expert choice, ...) is in
``moe_lab/moe/``; ``MoE``, ``Expert`` and ``topk_softmax_routing`` import from here too.

Shapes are commented as B (batch), T (new tokens), S (keys in view, cache included), D (dim),
H (query heads), Hkv (kv heads), hd (head dim), E (experts), k (experts per token), N (tokens
flattened), V (vocab).

RoPE uses Mistral's convention (interleaved pairs (2i, 2i+1)); Hugging Face checkpoints store
wq/wk with permuted rows for their "rotate_half" convention, and the loader undoes that.

Hook points (``blocks.{L}.moe.hook_router_logits`` and friends) are identity modules that cost
nothing until a hook is attached; ``moe_lab.hooks`` attaches and removes them.

Every path (``forward`` with or without autograd, ``generate``, the tracers, ``StreamingMixtral``)
runs these classes' ``forward`` methods: edit a formula here and every output changes. The few
speed-ups are chosen by one visible line where they apply (``if self.fast:`` in ``MoE.forward``,
the one-position branch of ``Mixtral.head``) and call the same methods.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import InitVar, asdict, dataclass, field, fields
from typing import Iterator, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .generation import generate, generate_stream
from .hooks import HookedMixin, HookPoint, name_hook_points
from .moe import Expert, MoE, RoutingFn, make_expert, topk_softmax_routing  # noqa: F401 (moe_lab.model.MoE ...)
from .moe.designs import DESIGN_FIELDS, DESIGNS, check_design, design_changes, require_mixtral_design  # noqa: F401


# --------------------------------------------------------------------------------------------
# Config


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 8
    head_dim: int | None = None  # None -> dim // n_heads; Mixtral allows any value
    hidden_dim: int = 14336  # expert intermediate size
    vocab_size: int = 32000
    norm_eps: float = 1e-5
    rope_theta: float = 1e6
    max_seq_len: int = 32768
    sliding_window: int | None = None  # W keys including self; None = dense causal
    n_experts: int = 8
    experts_per_token: int = 2  # K, the experts each token is routed to (the paper's top-2)
    router_aux_loss_coef: float = 0.02  # load-balancing loss coefficient (HF's definition)
    router_z_loss_coef: float = 0.0  # ST-MoE z-loss; 0 disables it
    init_std: float = 0.02
    # ---- the MoE design (moe_lab/moe/; docs/MOE_BLOCK_API.md). The defaults are Mixtral's.
    router: str = "topk"  # "topk": each token chooses its experts; "expert_choice": each expert its tokens
    router_score: str = "softmax"  # "softmax" over the experts, or each expert's "sigmoid" (DeepSeek-V3, Llama 4)
    router_renormalise: bool = True  # rescale the k weights to sum to 1 (False: OLMoE, Qwen2-MoE, Switch, Llama 4)
    router_softmax_after_topk: bool = False  # top-k on the logits, softmax over the k (GPT-OSS, Granite)
    router_bias: bool = False  # a learned bias on the router logits, moe.gate.bias (GPT-OSS)
    selection_bias: bool = False  # DeepSeek-V3: buffer moe.selection_bias added to the scores to choose only
    selection_bias_rate: float = 0.001  # its update per training forward: += rate * sign(mean load - load)
    n_group: int = 1  # group-limited routing (DeepSeek-V3): experts in n_group groups of consecutive ids,
    topk_group: int = 1  # each token chooses among the experts of its topk_group best groups
    routed_scaling_factor: float = 1.0  # every routing weight times this (DeepSeek-V3)
    score_on_input: bool = False  # expert(weight * x) instead of weight * expert(x) (Llama 4)
    capacity_factor: float | None = None  # each expert takes <= ceil(cf * T * k / E) tokens per sequence (Switch;
    expert_capacity: int | None = None  # or exactly this many); overflow passes through the residual
    n_shared_experts: int = 0  # experts every token goes through, no routing (DeepSeekMoE, Qwen2-MoE, Llama 4)
    shared_hidden_dim: int | None = None  # hidden size of each shared expert; None = hidden_dim
    shared_expert_gate: bool = False  # shared output times sigmoid(x Wsg), moe.shared_expert_gate (Qwen2-MoE)
    expert_bias: bool = False  # biases on w1, w2, w3 (GPT-OSS)
    expert_act: str = "silu"  # the activation: "silu", "gelu", "gelu_tanh", "relu"
    expert_gated: bool = True  # SwiGLU w2(act(w1 x) * w3 x); False: w2(act(w1 x)), no w3 (Switch)
    swiglu_limit: float | None = None  # GPT-OSS's clamped SwiGLU (clip at limit, (up + 1) * g * sigmoid(alpha g))
    swiglu_alpha: float = 1.702
    first_k_dense: int = 0  # layers 0..first_k_dense-1 are dense (DeepSeek-V3)
    dense_layers: list[int] = field(default_factory=list)  # and these layers too (e.g. every other layer)
    dense_hidden_dim: int | None = None  # hidden size of a dense layer's FFN; None = hidden_dim
    top_k: InitVar[int | None] = None  # deprecated name of experts_per_token (still accepted)

    def __post_init__(self, top_k: int | None = None):
        if top_k is not None:
            _warn_top_k("ModelArgs(top_k=...)", stacklevel=4)
            self.experts_per_token = top_k
        if self.head_dim is None:
            if self.dim % self.n_heads:
                raise ValueError(f"dim={self.dim} is not divisible by n_heads={self.n_heads}; set head_dim")
            self.head_dim = self.dim // self.n_heads
        checks = [
            (self.n_heads % self.n_kv_heads == 0, f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}"),
            (self.head_dim % 2 == 0, f"head_dim={self.head_dim} must be even for RoPE"),
            (1 <= self.experts_per_token <= self.n_experts,
             f"experts_per_token={self.experts_per_token} must be in [1, n_experts={self.n_experts}]"),
            (self.sliding_window is None or self.sliding_window >= 1, f"sliding_window={self.sliding_window} must be >= 1 or None"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)
        self.dense_layers = sorted({int(i) for i in self.dense_layers})
        check_design(self)  # clear errors for design options that cannot work (moe_lab/moe/designs.py)

    def design_changes(self) -> dict:
        """The MoE design fields whose values differ from Mixtral's ({} for a Mixtral)."""
        return design_changes(self)

    def require_mixtral_design(self, what: str) -> None:
        """A clear error for ``what`` (a Mixtral-only file format or conversion) on another design."""
        require_mixtral_design(self, what)

    def is_moe_layer(self, layer: int) -> bool:
        """Layer ``layer`` has an MoE block (else a dense FFN: ``first_k_dense``, ``dense_layers``)."""
        return layer >= self.first_k_dense and layer not in self.dense_layers

    @property
    def moe_layers(self) -> list[int]:
        return [i for i in range(self.n_layers) if self.is_moe_layer(i)]

    @classmethod
    def from_name(cls, name: str, **overrides) -> "ModelArgs":
        """A named preset (see ``PRESETS``), optionally with fields overridden."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def with_design(self, name: str, **overrides) -> "ModelArgs":
        """These args with the MoE design of a family (see ``DESIGNS``), then ``overrides``."""
        if name not in DESIGNS:
            raise ValueError(f"unknown MoE design {name!r}; choose one of {sorted(DESIGNS)}")
        return self.replace(**{**DESIGNS[name], **overrides})

    def replace(self, **changes) -> "ModelArgs":
        return type(self)(**{**self.to_dict(), **changes})

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelArgs":
        known = {f.name for f in fields(cls)} | {"top_k"}  # top_k: the old name, with a warning
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown ModelArgs fields: {sorted(unknown)}")
        return cls(**d)


def _warn_top_k(what: str, stacklevel: int = 3) -> None:
    warnings.warn(f"{what}: `top_k` is now called `experts_per_token` (the number of experts each token is routed "
                  "to); `top_k` stays the sampling cut-off of generate()", DeprecationWarning, stacklevel=stacklevel)


def _top_k_get(self) -> int:
    _warn_top_k(f"{type(self).__name__}.top_k")
    return self.experts_per_token


def _top_k_set(self, k: int) -> None:
    _warn_top_k(f"{type(self).__name__}.top_k")
    self.experts_per_token = k


ModelArgs.top_k = property(_top_k_get, _top_k_set, doc="Deprecated: ``experts_per_token``.")

PRESETS: dict[str, dict] = {
    "mixtral-8x7b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128, hidden_dim=14336,
                         vocab_size=32000, max_seq_len=32768, router_aux_loss_coef=0.02),
    "mixtral-8x22b": dict(dim=6144, n_layers=56, n_heads=48, n_kv_heads=8, head_dim=128, hidden_dim=16384,
                          vocab_size=32000, max_seq_len=65536, router_aux_loss_coef=0.001),
    # Fast on a laptop CPU; same vocabulary as Mixtral so the real tokenizer applies.
    "tiny": dict(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=32, hidden_dim=256,
                 vocab_size=32000, max_seq_len=1024),
    # The demo model shipped in data/tiny-mixtral (configs/tiny-mixtral.json trains it on a CPU).
    "tiny-mixtral": dict(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=32, hidden_dim=384,
                         vocab_size=32000, max_seq_len=1024, router_aux_loss_coef=0.02, router_z_loss_coef=0.001),
}


class ParamCount(NamedTuple):
    total: int
    active: int  # with experts_per_token experts per token instead of all of them


def count_params(args: ModelArgs) -> ParamCount:
    """Parameter counts from the config alone (both embedding matrices counted, no biases).

    An MoE layer: router, E experts (k active), shared experts; a dense layer: its FFN."""
    D, hd, E = args.dim, args.head_dim, args.n_experts
    ffn = lambda hidden: (3 if args.expert_gated else 2) * D * hidden  # noqa: E731
    attn = D * args.n_heads * hd + 2 * D * args.n_kv_heads * hd + args.n_heads * hd * D
    common = attn + 2 * D  # attention, two norms
    shared = ffn(args.n_shared_experts * (args.shared_hidden_dim or args.hidden_dim)) if args.n_shared_experts else 0
    shared += D if args.shared_expert_gate else 0
    moe = common + E * D + shared  # + router
    dense = common + ffn(args.dense_hidden_dim or args.hidden_dim)
    n_moe = len(args.moe_layers)
    n_dense = args.n_layers - n_moe
    embed = 2 * args.vocab_size * D + D  # embeddings, output head, final norm
    return ParamCount(total=n_moe * (moe + E * ffn(args.hidden_dim)) + n_dense * dense + embed,
                      active=n_moe * (moe + args.experts_per_token * ffn(args.hidden_dim)) + n_dense * dense + embed)


# --------------------------------------------------------------------------------------------
# Norm and RoPE


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # x / sqrt(mean(x^2) + eps) in fp32, cast back, then scale (the order the references use);
        # F.rms_norm without a weight is that formula, bit for bit, in one kernel
        return self.weight * F.rms_norm(x.float(), self.weight.shape, eps=self.eps).to(x.dtype)


def rope_inv_freq(head_dim: int, theta: float, device=None) -> Tensor:
    """inv_freq[i] = theta^(-2i/hd), computed in fp32 exactly like the references."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float, device=device) / head_dim))


def rope_cos_sin(positions: Tensor, inv_freq: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """positions (B, T) -> cos, sin (B, T, 1, hd), the tables ``apply_rope`` multiplies by.

    Pair i of a head, channels (2i, 2i+1), turns by the angle pos * inv_freq[i]; the tables hold
    each pair's cosine twice (c0 c0 c1 c1 ...) and its sine with the rotation's signs
    (-s0 s0 -s1 s1 ...). Angles in fp32, tables in the activations' dtype. Computed once per
    forward (``Mixtral.embed``) and shared by every layer and every head (the 1).
    """
    angles = positions[..., None].float() * inv_freq  # (B, T, hd/2)
    cos, sin = angles.cos(), angles.sin()
    cos = torch.stack((cos, cos), dim=-1).flatten(-2)  # (B, T, hd)  c0 c0 c1 c1 ...
    sin = torch.stack((-sin, sin), dim=-1).flatten(-2)  # (B, T, hd) -s0 s0 -s1 s1 ...
    return cos.to(dtype)[:, :, None], sin.to(dtype)[:, :, None]


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) by angle pos * inv_freq[i].  x: (B, T, nh, hd).

    (x0, x1) -> (x0 c - x1 s, x1 c + x0 s), i.e. x * (c, c) + (x1, x0) * (-s, s) on whole rows.
    """
    swapped = x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)  # (x1, x0, x3, x2, ...)
    return x * cos + swapped * sin


# --------------------------------------------------------------------------------------------
# KV cache


class KVCache:
    """Preallocated keys and values for every layer, plus which slots hold real tokens.

    ``length`` counts the slots filled so far; a forward with T new tokens writes slots
    [length, length + T) (``update``, once per layer) and then moves on (``advance``).
    ``key_mask[b, s]`` is False for left-padding; ``positions[b]`` is row b's next RoPE position.
    """

    def __init__(self, args: ModelArgs, batch_size: int, max_len: int, dtype=torch.float32, device="cpu"):
        if max_len > args.max_seq_len:
            raise ValueError(f"cache max_len={max_len} exceeds max_seq_len={args.max_seq_len}")
        shape = (args.n_layers, batch_size, args.n_kv_heads, max_len, args.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.key_mask = torch.ones(batch_size, max_len, dtype=torch.bool, device=device)
        self.positions = torch.zeros(batch_size, dtype=torch.long, device=device)  # next RoPE position
        self.batch_size, self.max_len, self.length = batch_size, max_len, 0
        self.has_padding = False

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write this forward's keys and values k, v (B, Hkv, T, hd) of ``layer`` after the cached
        ones; return all of that layer's keys and values so far, (B, Hkv, S, hd)."""
        end = self.length + k.shape[2]
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, T: int) -> None:
        """The T new tokens of this forward are now cached (every layer has called ``update``)."""
        self.length += T

    def add_tokens(self, T: int, real: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """Positions (B, T) of T new tokens and the key mask (B, S) (None: every key is real).

        ``real`` (B, T) bool marks real tokens (False = left padding; None: all real). Their
        positions continue the row's count; padding may only come in the first chunk.
        """
        S = self.length + T
        if real is not None:
            positions = self.positions[:, None] + (real.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)
            self.key_mask[:, self.length:S] = real
            self.has_padding = True
        elif T == 1:  # a decode step
            positions = self.positions[:, None]  # (B, 1)
        else:
            positions = self.positions[:, None] + torch.arange(T, device=self.positions.device)  # (B, T)
        self.positions = positions[:, -1] + 1
        return positions, (self.key_mask[:, :S] if self.has_padding else None)

    def reset(self):
        self.length, self.has_padding = 0, False
        self.key_mask.fill_(True)
        self.positions.zero_()

    def __repr__(self):
        return f"KVCache(batch_size={self.batch_size}, length={self.length}, max_len={self.max_len})"


# --------------------------------------------------------------------------------------------
# Attention


def positions_from_mask(attention_mask: Tensor) -> Tensor:
    """attention_mask (B, T), 1 real / 0 left padding -> RoPE positions (B, T): 0 at each row's
    first real token (padding gets 0 too; nothing attends to it)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def sliding_window_mask(start: int, T: int, window: int | None, key_mask: Tensor | None = None,
                        device=None) -> Tensor | None:
    """Which keys each of T new queries may attend to: (B or 1, 1, T, S) bool, or None when
    that is plain causal attention (SDPA's fast path).

    Queries sit at slots [start, start + T) of a sequence of S = start + T keys. Query q sees
    key s when s <= q (causal) and s > q - window (Mistral's sliding window: the last
    ``window`` keys, itself included). ``key_mask`` (B, S) hides left padding; a padding query
    still sees itself so that its softmax is defined.
    """
    S = start + T
    if key_mask is None and (window is None or S <= window) and (start == 0 or T == 1):
        return None  # causal over T == S, or one query that sees every key
    q_idx = torch.arange(start, S, device=device)[:, None]  # (T, 1)
    k_idx = torch.arange(S, device=device)[None, :]  # (1, S)
    allowed = k_idx <= q_idx
    if window is not None:
        allowed = allowed & (k_idx > q_idx - window)
    mask = allowed[None, None]  # (1, 1, T, S)
    if key_mask is not None:
        mask = (mask & key_mask[:, None, None, :]) | (k_idx == q_idx)[None, None]  # (B, 1, T, S)
    return mask


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int = 0):
        super().__init__()
        self.layer = layer  # which of the cache's layers this attention writes
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        self.hook_pattern = HookPoint()  # (B, H, T, S); computed only when a hook is attached

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None = None,
                cache: KVCache | None = None) -> Tensor:
        """x (B, T, D) -> (B, T, D). cos, sin: ``rope_cos_sin`` tables; mask: ``sliding_window_mask``."""
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)  # (B, T, H, hd)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, Hkv, hd)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, hd)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # (B, Hkv, S, hd): the cached keys, then these
        if self.hook_pattern.active:
            y = self._explicit_attention(q, k, v, mask)
        else:
            # mask None means plain causal over T == S, or one decode query that sees everything
            causal = mask is None and q.shape[2] > 1
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                               enable_gqa=self.n_heads != self.n_kv_heads)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, H*hd)
        return self.wo(y)

    def _explicit_attention(self, q, k, v, mask):
        """softmax(q k^T / sqrt(hd)) v written out, so the pattern can be hooked."""
        rep = self.n_heads // self.n_kv_heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # (B, H, S, hd)
        scores = (q @ k.transpose(-2, -1)) * self.head_dim ** -0.5  # (B, H, T, S)
        if mask is None:
            T, S = scores.shape[-2:]
            mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
        scores = scores.masked_fill(~mask, float("-inf"))
        pattern = self.hook_pattern(scores.float().softmax(-1).to(q.dtype))
        return pattern @ v


# --------------------------------------------------------------------------------------------
# Experts, router and the sparse MoE block


# The block lives in moe_lab/moe/ (block.py: MoE; routers.py: the routing rules; experts.py: Expert),
# with every design of ModelArgs; its names stay importable from here.

MoE.top_k = property(_top_k_get, _top_k_set, doc="Deprecated: ``experts_per_token``.")


# --------------------------------------------------------------------------------------------
# Transformer block and model


@dataclass
class ForwardContext:
    """What every block needs besides the residual stream; ``Mixtral.embed`` makes it once per forward."""

    positions: Tensor  # (B, T) RoPE position of each new token
    cos: Tensor  # (B, T, 1, hd) RoPE tables (``rope_cos_sin``)
    sin: Tensor
    mask: Tensor | None  # (B or 1, 1, T, S) bool (``sliding_window_mask``); None = plain causal
    cache: KVCache | None = None


class Block(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.layer = layer
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attn = Attention(args, layer)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        moe = args.is_moe_layer(layer)
        self.moe = MoE(args) if moe else None  # the sparse MoE block, or a dense layer's FFN:
        self.ffn = None if moe else make_expert(args, args.dense_hidden_dim or args.hidden_dim)
        self.hook_resid_pre = HookPoint()  # (B, T, D)
        self.hook_attn_out = HookPoint()
        self.hook_resid_mid = HookPoint()
        self.hook_moe_out = HookPoint()
        self.hook_resid_post = HookPoint()

    def forward(self, x: Tensor, ctx: ForwardContext) -> tuple[Tensor, Tensor]:
        """x (B, T, D) -> x (B, T, D) and this layer's router logits (B*T, E) (None: a dense layer)."""
        x = self.hook_resid_pre(x)
        attn_out = self.attn(self.attention_norm(x), ctx.cos, ctx.sin, ctx.mask, ctx.cache)
        h = self.hook_resid_mid(x + self.hook_attn_out(attn_out))
        if self.moe is not None:
            moe_out, router_logits = self.moe(self.ffn_norm(h))
        else:  # a dense layer
            moe_out, router_logits = self.ffn(self.ffn_norm(h)), None
        return self.hook_resid_post(h + self.hook_moe_out(moe_out)), router_logits


@dataclass
class Loss:
    """Training loss and its parts. ``total = ce + aux_coef * load_balancing + z_coef * z``."""

    total: Tensor
    ce: Tensor
    load_balancing: Tensor
    z: Tensor

    def item(self) -> dict[str, float]:
        # not asdict(): it deep-copies, which fails on tensors that carry a graph
        return {f.name: float(getattr(self, f.name).detach()) for f in fields(self)}


def load_balancing_loss(router_logits: list[Tensor], n_experts: int, k: int,
                        token_mask: Tensor | None = None) -> Tensor:
    """transformers' Mixtral auxiliary loss over all layers: E * sum_e f_e * P_e (= k at balance).

    f_e: fraction of (token, layer) rows whose top-k contains expert e (the f_e sum to k, so balanced
    routing gives k); P_e: mean router probability. All layers' rows are pooled (transformers'
    convention). Padding (token_mask False) is left out of both means.
    """
    logits = torch.cat(router_logits).float()  # (L*N, E)
    probs = logits.softmax(-1)
    chosen = F.one_hot(probs.topk(k, dim=-1).indices, n_experts).sum(1).float()  # (L*N, E)
    if token_mask is None:
        f, p = chosen.mean(0), probs.mean(0)
    else:
        m = token_mask.reshape(-1).float().repeat(len(router_logits))[:, None]  # (L*N, 1)
        f, p = (chosen * m).sum(0) / m.sum(), (probs * m).sum(0) / m.sum()
    return n_experts * (f * p).sum()


def router_z_loss(router_logits: list[Tensor], token_mask: Tensor | None = None) -> Tensor:
    """ST-MoE z-loss: mean over tokens of logsumexp(logits)^2, averaged over layers."""
    z = torch.stack([l.float().logsumexp(-1).pow(2) for l in router_logits])  # (L, N)
    if token_mask is None:
        return z.mean()
    m = token_mask.reshape(1, -1).float()
    return (z * m).sum() / (m.sum() * len(router_logits))


class _LinearCrossEntropy(torch.autograd.Function):
    """mean cross-entropy of ``h @ weight.T`` without materialising the (N, V) logits.

    Rows are processed in chunks; for each, the logits, their log-sum-exp and the gradient
    (softmax - one_hot) / n are computed at once (as Liger-Kernel's fused linear cross-entropy
    does), so the backward pass only scales the stored gradients. Cross-entropy in fp32.
    """

    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, targets: Tensor, chunk: int) -> Tensor:
        N = h.shape[0]
        valid = targets != -100
        n = valid.sum()
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for s in range(0, N, chunk):
            hc, tc, vc = h[s:s + chunk], targets[s:s + chunk], valid[s:s + chunk]
            logits = (hc @ weight.t()).float()  # (c, V)
            rows, tgt, w = torch.arange(len(tc), device=h.device), tc.clamp(min=0), vc.float()
            target_logit = logits[rows, tgt]  # (c,)
            top = logits.amax(-1, keepdim=True)  # (c, 1)
            e = logits.sub_(top).exp_()  # in place: one (c, V) buffer for logits, exp and gradient
            sum_e = e.sum(-1)  # (c,)
            total += ((top.squeeze(1) + sum_e.log() - target_logit) * w).sum()  # log-sum-exp - target
            if need_h or need_w:
                w = w / n.clamp(min=1)  # d(mean)/d(row loss); 0 for ignored rows
                g = e.mul_((w / sum_e)[:, None])  # softmax * w
                g[rows, tgt] -= w
                g = g.to(h.dtype)
                if need_h:
                    torch.mm(g, weight, out=grad_h[s:s + chunk])
                if need_w:  # accumulated in fp32 whatever the compute dtype
                    if g.dtype == torch.float32:
                        grad_w.addmm_(g.t(), hc)
                    else:
                        grad_w += (g.t() @ hc).float()
        ctx.save_for_backward(grad_h, grad_w)
        return total / n  # n = 0 gives nan, as F.cross_entropy does

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
        gw = grad_w * grad_out if grad_w is not None else None
        return gh, gw, None, None


def linear_cross_entropy(h: Tensor, weight: Tensor, targets: Tensor, chunk: int | None = None) -> Tensor:
    """``F.cross_entropy(h @ weight.T, targets, ignore_index=-100)`` in chunks (h (N, D), weight
    (V, D), targets (N,)): the (N, V) logits never exist at once, which on a CPU saves most of the
    time the output layer's softmax and its backward take. Follows autocast like ``F.linear``."""
    if chunk is None:
        chunk = max(64, (1 << 23) // weight.shape[0])  # about 32 MB of fp32 logits per chunk
    dtype = torch.get_autocast_dtype(h.device.type) if torch.is_autocast_enabled(h.device.type) else h.dtype
    with torch.autocast(h.device.type, enabled=False):
        return _LinearCrossEntropy.apply(h.to(dtype), weight.to(dtype), targets, chunk)


_GLOBAL_HOOKS = nn.modules.module  # where nn.Module keeps hooks registered for every module


class Mixtral(HookedMixin, nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.blocks = nn.ModuleList(Block(args, i) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.hook_embed = HookPoint()  # (B, T, D)
        self._inv_freq: dict = {}
        self._head_t: tuple | None = None  # (output weight, its address and version, [D, V] copy), see head()
        name_hook_points(self)
        self.reset_parameters()

    # ---- set-up

    @torch.no_grad()
    def reset_parameters(self):
        """Init for training from scratch: N(0, std) everywhere, residual projections scaled
        by 1/sqrt(2 * n_layers) (GPT-2), norms at one. A no-op on the meta device."""
        std = self.args.init_std
        for name, p in self.named_parameters():
            if p.device.type == "meta":
                continue
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):  # router and expert biases (GPT-OSS) start at zero
                p.zero_()
            elif name.endswith(("wo.weight", "w2.weight")):
                p.normal_(0.0, std / math.sqrt(2 * self.args.n_layers))
            else:
                p.normal_(0.0, std)

    def set_fast_dispatch(self, fast: bool = True) -> "Mixtral":
        for block in self.blocks:
            if block.moe is not None:
                block.moe.fast = fast
        return self

    def new_cache(self, batch_size: int = 1, max_len: int | None = None) -> KVCache:
        p = self.output.weight
        return KVCache(self.args, batch_size, max_len or self.args.max_seq_len, p.dtype, p.device)

    def inv_freq(self, device) -> Tensor:
        key = str(device)
        if key not in self._inv_freq:  # not a buffer: survives meta-device construction + assign
            self._inv_freq[key] = rope_inv_freq(self.args.head_dim, self.args.rope_theta, device)
        return self._inv_freq[key]

    # ---- forward: embed -> blocks -> head

    def embed(self, tokens: Tensor, attention_mask: Tensor | None = None, cache: KVCache | None = None,
              *, check_inputs: bool = True) -> tuple[Tensor, ForwardContext]:
        """tokens (B, T) -> residual stream x (B, T, D) (after ``hook_embed``) and the
        ``ForwardContext`` every block takes: RoPE positions and tables, attention mask, cache.

        Then ``x, router_logits = block(x, ctx)`` for each block, ``cache.advance(T)`` when there
        is a cache, and ``logits = model.head(x)``. ``check_inputs=False`` skips the input
        checks (token ids in range, shapes) for tokens the model itself produced.
        """
        if check_inputs:
            self._check_inputs(tokens, None, attention_mask, cache)
        if tokens.dtype not in (torch.long, torch.int):
            tokens = tokens.long()  # nn.Embedding takes only int64 / int32 indices
        B, T = tokens.shape
        start = 0 if cache is None else cache.length
        if start + T > self.args.max_seq_len:  # every position is <= its slot index
            raise ValueError(f"position {start + T - 1} exceeds max_seq_len={self.args.max_seq_len}")
        padded = attention_mask is not None and not bool(attention_mask.all())
        real = attention_mask.bool() if padded else None  # (B, T) or None
        if cache is not None:
            positions, key_mask = cache.add_tokens(T, real)
        else:
            positions = positions_from_mask(real) if padded else torch.arange(T, device=tokens.device).expand(B, T)
            key_mask = real
        mask = sliding_window_mask(start, T, self.args.sliding_window, key_mask, tokens.device)
        x = self.hook_embed(self.tok_embeddings(tokens))  # (B, T, D)
        cos, sin = rope_cos_sin(positions, self.inv_freq(tokens.device), x.dtype)  # (B, T, 1, hd)
        return x, ForwardContext(positions, cos, sin, mask, cache)

    def head(self, x: Tensor) -> Tensor:
        """Final norm and output layer: x (B, T, D) -> logits (B, T, V). ``head(x[:, [-1]])`` for
        the last position only (what generation needs)."""
        x = self.norm(x)  # (B, T, D)
        if x.shape[1] == 1 and self._plain_small_head(x):  # one position of a small fp32 model on CPU:
            return x @ self._output_weight_t()  # the same x W^T, W stored [D, V]: ~2x faster CPU BLAS
        return self.output(x)  # (B, T, V)

    def _plain_small_head(self, x: Tensor) -> bool:
        """``self.output`` is a plain bias-free ``nn.Linear`` nobody hooks and nothing needs its
        gradient, and x is fp32 on CPU with D <= 1024 (where the [D, V] layout pays)."""
        out = self.output
        return (type(out) is nn.Linear and out.bias is None and not (out._forward_hooks or out._forward_pre_hooks)
                and not (_GLOBAL_HOOKS._global_forward_hooks or _GLOBAL_HOOKS._global_forward_pre_hooks)
                and not torch.is_grad_enabled() and x.device.type == "cpu" and x.dtype == torch.float32
                and out.weight.dtype == torch.float32 and x.shape[-1] <= 1024 and not out.weight.is_inference())

    def _output_weight_t(self) -> Tensor:
        """A [D, V] copy of the output weight, made again whenever the weight changes."""
        w = self.output.weight
        key = (w.data_ptr(), w._version, tuple(w.shape))
        if self._head_t is None or self._head_t[0] is not w or self._head_t[1] != key:  # (holding w: its id stays its own)
            self._head_t = (w, key, w.detach().t().contiguous())
        return self._head_t[2]

    def forward(self, tokens: Tensor, targets: Tensor | None = None, *,
                attention_mask: Tensor | None = None, cache: KVCache | None = None,
                return_logits: bool = True, last_only: bool = False):
        """tokens (B, T) int -> logits (B, T, V); with targets (B, T) ``(logits, Loss)``.

        ``targets[b, t]`` is the token that should follow ``tokens[b, t]`` (already shifted);
        -100 is ignored. ``attention_mask`` (B, T) marks real tokens (1) and left padding (0).
        With a ``cache``, tokens continue the cached sequence. ``last_only=True`` gives the
        logits of the last position only, (B, 1, V) (generation). ``return_logits=False`` (with
        targets; for training) returns ``(None, Loss)`` and computes the cross-entropy in chunks
        without ever holding the (B, T, V) logits: same loss and gradients, less time and memory.
        """
        if not return_logits and targets is None:
            raise ValueError("return_logits=False needs targets: without them the logits are the only output")
        if targets is not None and last_only:
            raise ValueError("last_only=True gives no loss: the targets need every position's logits")
        self._check_inputs(tokens, targets, attention_mask, cache)
        x, ctx = self.embed(tokens, attention_mask, cache, check_inputs=False)  # (B, T, D)
        router_logits = []
        for block in self.blocks:
            x, logits = block(x, ctx)
            router_logits.append(logits)
        if cache is not None:
            cache.advance(tokens.shape[1])
        if not return_logits:  # training: the head's matmul fused with the cross-entropy, in chunks
            ce = linear_cross_entropy(self.norm(x).flatten(0, 1), self.output.weight, targets.flatten())
            return None, self.router_losses(ce, router_logits, attention_mask)
        logits = self.head(x[:, -1:] if last_only else x)  # (B, T or 1, V)
        if targets is None:
            return logits
        return logits, self.loss(logits, targets, router_logits, attention_mask)

    def loss(self, logits, targets, router_logits, attention_mask=None) -> Loss:
        ce = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)
        return self.router_losses(ce, router_logits, attention_mask)

    def router_losses(self, ce: Tensor, router_logits, attention_mask=None) -> Loss:
        """The full ``Loss``: ``ce`` plus the load-balancing and z-losses of ``router_logits``
        (dense layers, None, have none; a model without MoE layers gets 0 for both)."""
        router_logits = [lg for lg in router_logits if lg is not None]
        if not router_logits:
            zero = ce.new_zeros(())
            return Loss(total=ce, ce=ce, load_balancing=zero, z=zero)
        lb = load_balancing_loss(router_logits, self.args.n_experts, self.args.experts_per_token, attention_mask)
        total = ce + self.args.router_aux_loss_coef * lb
        z = router_z_loss(router_logits, attention_mask)
        if self.args.router_z_loss_coef:
            total = total + self.args.router_z_loss_coef * z
        return Loss(total=total, ce=ce, load_balancing=lb, z=z)

    def _check_inputs(self, tokens, targets, attention_mask, cache) -> tuple[int, int]:
        if not isinstance(tokens, Tensor):
            raise TypeError(f"tokens must be a torch.Tensor of shape [B, T], got {type(tokens).__name__}")
        if tokens.dim() != 2:
            raise ValueError(f"tokens must have shape [B, T] (rank 2), got shape {tuple(tokens.shape)}")
        if tokens.dtype not in (torch.long, torch.int, torch.int16, torch.uint8, torch.int8):
            raise TypeError(f"tokens must be integer token ids, got dtype {tokens.dtype}")
        B, T = tokens.shape
        if T == 0:
            raise ValueError("tokens is empty (T = 0)")
        lo, hi = (int(t) for t in torch.aminmax(tokens))  # one pass over the ids
        if lo < 0 or hi >= self.args.vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(f"token id {bad} is outside [0, vocab_size={self.args.vocab_size})")
        if cache is None:
            if T > self.args.max_seq_len:
                raise ValueError(f"sequence length {T} exceeds max_seq_len={self.args.max_seq_len}")
        else:
            if cache.batch_size != B:
                raise ValueError(f"cache was made for batch size {cache.batch_size}, tokens have batch size {B}")
            if cache.length + T > cache.max_len:
                raise ValueError(f"cache holds {cache.length} tokens; adding {T} exceeds its max_len={cache.max_len}")
        if targets is not None and tuple(targets.shape) != (B, T):
            raise ValueError(f"targets must have the tokens' shape {(B, T)}, got {tuple(targets.shape)}")
        if attention_mask is not None:
            if tuple(attention_mask.shape) != (B, T):
                raise ValueError(f"attention_mask must have the tokens' shape {(B, T)}, got {tuple(attention_mask.shape)}")
            m = attention_mask.bool()
            # left padding only: once a row has started, it stays real
            if bool((m[:, :-1] & ~m[:, 1:]).any()):
                raise ValueError("attention_mask must be left-padded (zeros only before the first real token)")
            if cache is not None and cache.length > 0 and not bool(m.all()):
                raise ValueError("padding is only allowed in the first chunk given to a cache")
        return B, T

    # ---- generation

    @torch.inference_mode()
    def generate(self, prompt, max_new_tokens: int = 32, **kw) -> Tensor:
        """Continue ``prompt`` ([B, T] tensor, list of ints, or list of lists of varying lengths,
        left-padded here). Returns the prompt (padded) followed by the new tokens, [B, T + n]
        where n <= max_new_tokens (fewer when every row hit ``eos_id``; finished rows are filled
        with ``pad_id``). Sampling options as in :func:`moe_lab.generation.generate_stream`
        (``top_k`` keeps the top_k most likely TOKENS; unrelated to experts, see ``experts_per_token``).
        Every step is this model's own ``forward`` (with a KV cache, the head on the last position).
        """
        return generate(self, prompt, max_new_tokens, **kw)

    def generate_stream(self, prompt, max_new_tokens: int = 32, **kw) -> Iterator[Tensor]:
        """Like ``generate`` but yields each step's new tokens ([B] tensor) as soon as they exist."""
        return generate_stream(self, prompt, max_new_tokens, **kw)
