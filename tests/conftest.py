"""Shared fixtures and helpers for moe_lab's tests.

Everything here is tiny on purpose: the test machine has 2 CPU cores shared with other jobs.
We pin torch to one thread: with tiny matrices, threading costs more than it gains and
oversubscribing the shared cores makes timings erratic.
"""

from __future__ import annotations

import pytest
import torch

from moe_lab.model import Mixtral, ModelArgs

torch.set_num_threads(1)

# At least one config for each axis the parity tests care about:
#   n_experts 4 / 8, experts_per_token 1 / 2 / 3, GQA ratio 1 / 2 / 4, head_dim != dim / n_heads,
#   rope_theta 1e4 / 1e6, sliding window on / off.
# init_std is larger than the training default so that router logits and attention are far
# from uniform (otherwise near-ties would make the routing checks meaningless).
TINY_CONFIGS: list[ModelArgs] = [
    # GQA 1, head_dim == dim / n_heads, top-1 of 4, theta 1e4, dense causal
    ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=4, head_dim=16, hidden_dim=96, vocab_size=300,
              max_seq_len=128, sliding_window=None, n_experts=4, experts_per_token=1, rope_theta=1e4, init_std=0.05),
    # GQA 2, head_dim 24 != 12, top-2 of 8, theta 1e6, sliding window 16
    ModelArgs(dim=48, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=24, hidden_dim=80, vocab_size=384,
              max_seq_len=128, sliding_window=16, n_experts=8, experts_per_token=2, rope_theta=1e6, init_std=0.05),
    # GQA 4, head_dim 12 != 8, top-3 of 8, theta 1e4, dense causal
    ModelArgs(dim=64, n_layers=2, n_heads=8, n_kv_heads=2, head_dim=12, hidden_dim=64, vocab_size=512,
              max_seq_len=128, sliding_window=None, n_experts=8, experts_per_token=3, rope_theta=1e4, init_std=0.05),
    # GQA 4 with a single kv head, head_dim 16 != 8, top-2 of 4, theta 1e6, sliding window 8
    ModelArgs(dim=32, n_layers=3, n_heads=4, n_kv_heads=1, head_dim=16, hidden_dim=48, vocab_size=320,
              max_seq_len=128, sliding_window=8, n_experts=4, experts_per_token=2, rope_theta=1e6, init_std=0.05),
]


def config_id(args: ModelArgs) -> str:
    sw = f"w{args.sliding_window}" if args.sliding_window else "dense"
    return (f"E{args.n_experts}k{args.experts_per_token}-gqa{args.n_heads // args.n_kv_heads}-hd{args.head_dim}"
            f"-theta{args.rope_theta:.0e}-{sw}")


CONFIG_IDS = [config_id(a) for a in TINY_CONFIGS]


def make_model(args: ModelArgs, seed: int = 0) -> Mixtral:
    """A seeded moe_lab Mixtral in eval mode (with its own copy of ``args``)."""
    torch.manual_seed(seed)
    return Mixtral(args.replace()).eval()


def make_pair(args: ModelArgs, seed: int = 0, dtype: torch.dtype | None = None):
    """(moe_lab Mixtral, transformers MixtralForCausalLM) holding identical weights.

    Built from the seed alone, so two calls with the same seed give the same weights.
    ``dtype`` casts both models (e.g. torch.bfloat16).
    """
    pytest.importorskip("transformers")
    from moe_lab.checkpoints.convert import to_hf_model

    model = make_model(args, seed)
    hf = to_hf_model(model)
    # greedy generation must never stop early on HF's side; moe_lab's tests pass eos_id=None too
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    if dtype is not None:
        model, hf = model.to(dtype), hf.to(dtype)
    return model, hf


def random_tokens(args: ModelArgs, B: int, T: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, args.vocab_size, (B, T), generator=g)


def left_padded_batch(args: ModelArgs, lengths: list[int], seed: int = 0, pad_id: int = 0):
    """Random rows of the given lengths, left-padded: (tokens [B, T], mask [B, T], rows)."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    rows = [torch.randint(0, args.vocab_size, (n,), generator=g) for n in lengths]
    tokens = torch.full((len(lengths), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for b, r in enumerate(rows):
        tokens[b, T - len(r):] = r
        mask[b, T - len(r):] = 1
    return tokens, mask, rows


def hf_position_ids(mask: torch.Tensor) -> torch.Tensor:
    """Positions restarting at 0 on the first real token (what HF's generate computes)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


@pytest.fixture(params=TINY_CONFIGS, ids=CONFIG_IDS)
def tiny_args(request) -> ModelArgs:
    return request.param


@pytest.fixture(scope="session")
def small_args() -> ModelArgs:
    """One small config for tests that need a model but not the whole config sweep."""
    return TINY_CONFIGS[1]
