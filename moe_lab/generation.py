"""Autoregressive generation with a KV cache: greedy, temperature, top-k and top-p sampling."""

from __future__ import annotations

from typing import Iterator, Sequence

import torch
from torch import Tensor

from .devices import resolve_device


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
    """logits (B, V) -> next token ids (B,). temperature 0 is greedy (argmax).

    Sampling: ``top_k`` keeps the top_k most likely TOKENS (transformers' meaning; unrelated to
    experts: the model's experts per token is ``ModelArgs.experts_per_token``); ``top_p`` keeps
    the smallest set of tokens whose probability reaches top_p.
    """
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
                    eos_id: int | None = None, pad_id: int = 0, attention_mask: Tensor | None = None,
                    cache=None, device=None) -> Iterator[Tensor]:
    """Yield the next token of every row ([B] tensor) at each step, using a KV cache.

    Every step is ``model(tokens, cache=cache, last_only=True)``: the model's own forward, so
    whatever it computes (an edited expert, a hook, an intervention) is what is sampled from.

    Sampling: ``temperature`` 0 is greedy; ``top_k`` keeps the top_k most likely TOKENS
    (transformers' meaning; unrelated to experts, see ``ModelArgs.experts_per_token``), ``top_p``
    the smallest set of tokens whose probability reaches top_p. Rows that produced ``eos_id``
    yield ``pad_id`` afterwards; the stream ends when all rows are finished or after
    ``max_new_tokens`` steps. ``seed`` makes sampling reproducible. ``cache``: a
    ``model.new_cache(B, T + max_new_tokens)`` to use (and read afterwards), else a new one.

    ``device``: None (the model's device) or the model's device (anything else is an error, see
    :mod:`moe_lab.devices`); the prompt goes there and the yielded tokens live there. A seeded
    generator lives there too, so the same ``seed`` samples differently on the CPU and on a GPU.
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    device = resolve_device(model, device)
    tokens, mask = left_pad(prompt, pad_id, device)
    if attention_mask is not None:
        mask = attention_mask.to(device)
    B, T = tokens.shape
    if T + max_new_tokens > model.args.max_seq_len:
        raise ValueError(f"prompt ({T}) + max_new_tokens ({max_new_tokens}) exceeds max_seq_len={model.args.max_seq_len}")
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    if cache is None:
        cache = model.new_cache(B, T + max_new_tokens)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    logits = model(tokens, attention_mask=mask, cache=cache, last_only=True)[:, -1]  # (B, V)
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
            logits = model(nxt[:, None], cache=cache, last_only=True)[:, -1]


def generate(model, prompt, max_new_tokens: int = 32, **kw) -> Tensor:
    """The prompt (left-padded) followed by the generated tokens, [B, T + n]. Options as in
    ``generate_stream`` (sampling: ``top_k`` keeps the top_k most likely TOKENS; unrelated to experts;
    ``device``: None or the model's device). The result is on the model's device."""
    tokens, _ = left_pad(prompt, kw.get("pad_id", 0), resolve_device(model, kw.get("device")))
    new = list(generate_stream(model, prompt, max_new_tokens, **kw))
    if not new:
        return tokens
    return torch.cat([tokens, torch.stack(new, dim=1)], dim=1)
