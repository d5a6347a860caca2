"""Autoregressive generation with a KV cache: greedy, temperature, top-k and top-p sampling."""

from __future__ import annotations

from typing import Iterator, Sequence

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary


def left_pad(prompt, pad_id: int = 0, device=None) -> tuple[Tensor, Tensor | None]:
    """A [B, T] tensor, a [T] tensor, a list of ints or a list of lists -> (tokens [B, T], mask or None).

    Rows of different lengths are left-padded with ``pad_id`` so every row ends at the last column,
    where generation continues.
    """
    if isinstance(prompt, Tensor):
        tokens = prompt[None] if prompt.dim() == 1 else prompt
        return tokens.to(device) if device is not None else tokens, None
    if not isinstance(prompt, Sequence) or len(prompt) == 0:
        raise ValueError("prompt must be a non-empty tensor, list of token ids, or list of such lists")
    rows = [list(prompt)] if isinstance(prompt[0], int) else [list(r) for r in prompt]
    if any(len(r) == 0 for r in rows):
        raise ValueError("every prompt needs at least one token")
    T = max(len(r) for r in rows)
    tokens = torch.tensor([[pad_id] * (T - len(r)) + r for r in rows], dtype=torch.long, device=device)
    if all(len(r) == T for r in rows):
        return tokens, None
    mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows], dtype=torch.long, device=device)
    return tokens, mask


def sample_next(logits: Tensor, temperature: float = 0.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> Tensor:
    """logits (B, V) -> next token ids (B,). temperature 0 is greedy (argmax)."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # keep the smallest prefix reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


@torch.inference_mode()
def generate_stream(model, prompt, max_new_tokens: int = 32, *, temperature: float = 0.0,
                    top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                    eos_id: int | None = None, pad_id: int = 0,
                    attention_mask: Tensor | None = None) -> Iterator[Tensor]:
    """Yield the next token of every row ([B] tensor) at each step, using a KV cache.

    Rows that produced ``eos_id`` yield ``pad_id`` afterwards; the stream ends when all rows
    are finished or after ``max_new_tokens`` steps. ``seed`` makes sampling reproducible.
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    device = model.output.weight.device
    tokens, mask = left_pad(prompt, pad_id, device)
    if attention_mask is not None:
        mask = attention_mask.to(device)
    B, T = tokens.shape
    if T + max_new_tokens > model.args.max_seq_len:
        raise ValueError(f"prompt ({T}) + max_new_tokens ({max_new_tokens}) exceeds max_seq_len={model.args.max_seq_len}")
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    cache = model.new_cache(B, T + max_new_tokens)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    last_logits = _LastLogits(model)
    logits = last_logits(tokens, cache, mask, check=True)  # (B, V)
    for step in range(max_new_tokens):
        nxt = sample_next(logits, temperature, top_k, top_p, generator)
        if eos_id is not None:
            nxt = nxt.masked_fill(finished, pad_id)
        yield nxt
        if eos_id is not None:
            finished |= nxt == eos_id
            if bool(finished.all()):
                return
        if step + 1 < max_new_tokens:
            logits = last_logits(nxt[:, None], cache)


_HEAD_T = WeakIdKeyDictionary()  # output weight -> (its identity and version, transposed copy)


class _LastLogits:
    """``model(tokens, attention_mask=mask, cache=cache)[:, -1]`` for the generation loop.

    When nothing can tell the difference (a plain ``Mixtral``: no hooks on the model itself or on
    its output head), it runs the steps of ``Mixtral.forward`` with less work: the input checks
    only for the prompt (later steps feed back the model's own tokens), and the final norm and the
    head on the last position only. Hooks on blocks, experts and hook points inside still fire;
    anything else falls back to ``model(...)``. Keep the steps in sync with ``Mixtral.forward``.
    One-token steps of a single sequence with nothing hooked anywhere use ``Block.decode_step``.

    For a small fp32 model on CPU the head also goes through a transposed copy of its weight,
    [D, V] (cached until the weight changes): CPU BLAS multiplies one row by that layout about 2x
    faster than by [V, D] when D <= 1024 (the gain fades for wider models, and bf16 is slower).
    """

    def __init__(self, model):
        from .model import Mixtral, _rope_tables, rope_cos_sin, topk_softmax_routing

        self.rope_cos_sin, self.rope_tables, self.default_routing = rope_cos_sin, _rope_tables, topk_softmax_routing
        glob = torch.nn.modules.module
        head = model.output
        self.model = model
        self.fast = (type(model).forward is Mixtral.forward
                     and not (model._forward_hooks or model._forward_pre_hooks)
                     and type(head) is torch.nn.Linear and head.bias is None
                     and not (head._forward_hooks or head._forward_pre_hooks)
                     and not (glob._global_forward_hooks or glob._global_forward_pre_hooks))
        # Decode steps of one sequence go through ``Block.decode_step`` while every block is plain:
        # the exact classes, bias-free linears, the default routing rule and no hooks. The classes
        # are checked here, the hooks and routing rules at every step (hooks may come and go
        # between the tokens of a stream): their dicts are gathered once, ``any`` over them is cheap.
        self.moes = [b.moe for b in model.blocks] if self.fast and _plain_blocks(model) else None
        if self.moes is not None:
            self.hook_dicts = [d for mod in model.blocks.modules() for d in (mod._forward_hooks, mod._forward_pre_hooks)]
        w = head.weight
        self.head_t = None
        if (self.fast and w.device.type == "cpu" and w.dtype == torch.float32 and w.shape[1] <= 1024
                and not w.is_inference()):  # (inference tensors have no version to check the cache with)
            key = (w.data_ptr(), w._version, tuple(w.shape))
            cached = _HEAD_T.get(w)
            if cached is None or cached[0] != key:
                cached = (key, w.detach().t().contiguous())
                _HEAD_T[w] = cached
            self.head_t = cached[1]

    def __call__(self, tokens: Tensor, cache, attention_mask: Tensor | None = None, check: bool = False) -> Tensor:
        m = self.model
        if not self.fast:
            return m(tokens, attention_mask=attention_mask, cache=cache)[:, -1]
        if check:
            m._check_inputs(tokens, None, attention_mask, cache)
            if tokens.dtype not in (torch.long, torch.int):
                tokens = tokens.long()
        B, T = tokens.shape
        positions, mask = m._positions_and_mask(B, T, attention_mask, cache, tokens.device)
        x = m.hook_embed(m.tok_embeddings(tokens))  # (B, T, D)
        cos, sin = self.rope_cos_sin(positions, m.inv_freq(tokens.device), x.dtype)
        if B == T == 1 and mask is None and self._plain_now():
            cos2, sin2 = self.rope_tables(cos, sin)
            for block in m.blocks:
                x = block.decode_step(x, cos2, sin2, cache)
        else:
            for block in m.blocks:
                x, _ = block(x, cos, sin, mask, cache)
        cache.length += T
        h = m.norm(x[:, -1])  # (B, D)
        return h @ self.head_t if self.head_t is not None else m.output(h)  # (B, V)

    def _plain_now(self) -> bool:
        return (self.moes is not None and not any(self.hook_dicts)
                and all(moe.routing_fn is self.default_routing for moe in self.moes))


def _plain_blocks(model) -> bool:
    """Every block is made of exactly moe_lab's classes, with bias-free linears (what
    ``Block.decode_step`` computes with)."""
    from .model import Attention, Block, Expert, HookPoint, MoE, RMSNorm

    allowed = (Block, Attention, MoE, Expert, RMSNorm, HookPoint, torch.nn.Linear, torch.nn.ModuleList)
    return all(type(b) is Block and type(b.attn) is Attention and type(b.moe) is MoE
               and type(b.attention_norm) is RMSNorm and type(b.ffn_norm) is RMSNorm
               and all(type(m) in allowed and getattr(m, "bias", None) is None for m in b.modules())
               for b in model.blocks)


def generate(model, prompt, max_new_tokens: int = 32, **kw) -> Tensor:
    """The prompt (left-padded) followed by the generated tokens, [B, T + n]."""
    tokens, _ = left_pad(prompt, kw.get("pad_id", 0), model.output.weight.device)
    new = list(generate_stream(model, prompt, max_new_tokens, **kw))
    if not new:
        return tokens
    return torch.cat([tokens, torch.stack(new, dim=1)], dim=1)
