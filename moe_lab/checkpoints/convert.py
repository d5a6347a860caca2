"""Key names and RoPE row order between moe_lab and the published Mixtral layouts.

moe_lab's own names follow mistral-inference (``tok_embeddings``, ``attention.wq``, ...) except
that layers are ``blocks.{L}`` with ``attn`` and ``moe`` inside. Three other layouts exist:
Hugging Face hub files (v4 names, also written by transformers v5's ``save_pretrained``),
transformers v5 in-memory names (fused experts), and Mistral's native ``consolidated`` files.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..model import Mixtral, ModelArgs


# --------------------------------------------------------------------------------------------
# RoPE row order


def interleaved_to_half(w: Tensor, n_heads: int) -> Tensor:
    """Mistral -> HF: reorder each head's rows so that "rotate_half" RoPE gives the same scores.

    Rows (2i, 2i+1) are a rotated pair in Mistral's convention; HF pairs rows i and i + hd/2.
    """
    out_dim, dim = w.shape
    hd = out_dim // n_heads
    return w.view(n_heads, hd // 2, 2, dim).transpose(1, 2).reshape(out_dim, dim)


def half_to_interleaved(w: Tensor, n_heads: int) -> Tensor:
    """HF -> Mistral: the inverse of :func:`interleaved_to_half`."""
    out_dim, dim = w.shape
    hd = out_dim // n_heads
    return w.view(n_heads, 2, hd // 2, dim).transpose(1, 2).reshape(out_dim, dim)


# --------------------------------------------------------------------------------------------
# configs


def hf_config_dict(args: ModelArgs) -> dict:
    """A transformers ``MixtralConfig`` as a plain dict (the contents of config.json)."""
    args.require_mixtral_design("a transformers MixtralConfig")
    return {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "hidden_size": args.dim,
        "intermediate_size": args.hidden_dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "head_dim": args.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": args.max_seq_len,
        "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": args.rope_theta},
        "sliding_window": args.sliding_window,
        "num_local_experts": args.n_experts,
        "num_experts_per_tok": args.experts_per_token,
        "router_aux_loss_coef": args.router_aux_loss_coef,
        "output_router_logits": False,
        "vocab_size": args.vocab_size,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "initializer_range": args.init_std,
        "attention_dropout": 0.0,
        "router_jitter_noise": 0.0,
        "torch_dtype": "float32",
    }


def args_from_hf_config(cfg: dict, **overrides) -> ModelArgs:
    """ModelArgs from a config.json dict: rope_theta at top level (v4) or in rope_parameters (v5);
    head_dim may be null."""
    theta = cfg.get("rope_theta")
    rp = cfg.get("rope_parameters") or {}
    if theta is None:
        theta = rp.get("rope_theta", 1e6)
    if rp.get("rope_type", "default") != "default":
        raise ValueError(f"rope_type {rp.get('rope_type')!r} is not supported (only 'default' RoPE)")
    if cfg.get("tie_word_embeddings", False):
        raise ValueError("tie_word_embeddings=True is not a Mixtral configuration (embeddings are untied)")
    d = dict(
        dim=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"], n_heads=cfg["num_attention_heads"],
        n_kv_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"], head_dim=cfg.get("head_dim"),
        hidden_dim=cfg["intermediate_size"], vocab_size=cfg["vocab_size"], norm_eps=cfg.get("rms_norm_eps", 1e-5),
        rope_theta=float(theta), max_seq_len=cfg.get("max_position_embeddings", 32768),
        sliding_window=cfg.get("sliding_window"), n_experts=cfg["num_local_experts"],
        experts_per_token=cfg["num_experts_per_tok"], router_aux_loss_coef=cfg.get("router_aux_loss_coef", 0.02),
        init_std=cfg.get("initializer_range", 0.02),
    )
    d.update(overrides)
    return ModelArgs(**d)


# --------------------------------------------------------------------------------------------
# state dicts


def to_hf_state_dict(sd: dict[str, Tensor], args: ModelArgs, fused: bool = False) -> dict[str, Tensor]:
    """moe_lab names -> HF hub names (``fused=False``) or transformers v5 in-memory names."""
    args.require_mixtral_design("a Hugging Face Mixtral state dict")
    out = {"model.embed_tokens.weight": sd["tok_embeddings.weight"], "model.norm.weight": sd["norm.weight"],
           "lm_head.weight": sd["output.weight"]}
    moe_name = "mlp" if fused else "block_sparse_moe"
    for L in range(args.n_layers):
        src, dst = f"blocks.{L}.", f"model.layers.{L}."
        out[dst + "input_layernorm.weight"] = sd[src + "attention_norm.weight"]
        out[dst + "post_attention_layernorm.weight"] = sd[src + "ffn_norm.weight"]
        out[dst + "self_attn.q_proj.weight"] = interleaved_to_half(sd[src + "attn.wq.weight"], args.n_heads)
        out[dst + "self_attn.k_proj.weight"] = interleaved_to_half(sd[src + "attn.wk.weight"], args.n_kv_heads)
        out[dst + "self_attn.v_proj.weight"] = sd[src + "attn.wv.weight"]
        out[dst + "self_attn.o_proj.weight"] = sd[src + "attn.wo.weight"]
        out[dst + f"{moe_name}.gate.weight"] = sd[src + "moe.gate.weight"]
        ex = [{w: sd[src + f"moe.experts.{e}.{w}.weight"] for w in ("w1", "w2", "w3")} for e in range(args.n_experts)]
        if fused:
            out[dst + "mlp.experts.gate_up_proj"] = torch.stack([torch.cat([x["w1"], x["w3"]]) for x in ex])
            out[dst + "mlp.experts.down_proj"] = torch.stack([x["w2"] for x in ex])
        else:
            for e, x in enumerate(ex):
                for w, t in x.items():
                    out[dst + f"block_sparse_moe.experts.{e}.{w}.weight"] = t
    return out


def from_hf_state_dict(sd: dict[str, Tensor], args: ModelArgs) -> dict[str, Tensor]:
    """HF hub names or transformers v5 in-memory names -> moe_lab names (q/k rows re-interleaved)."""
    out = {"tok_embeddings.weight": sd["model.embed_tokens.weight"], "norm.weight": sd["model.norm.weight"],
           "output.weight": sd["lm_head.weight"]}
    I = args.hidden_dim
    for L in range(args.n_layers):
        src, dst = f"model.layers.{L}.", f"blocks.{L}."
        out[dst + "attention_norm.weight"] = sd[src + "input_layernorm.weight"]
        out[dst + "ffn_norm.weight"] = sd[src + "post_attention_layernorm.weight"]
        out[dst + "attn.wq.weight"] = half_to_interleaved(sd[src + "self_attn.q_proj.weight"], args.n_heads)
        out[dst + "attn.wk.weight"] = half_to_interleaved(sd[src + "self_attn.k_proj.weight"], args.n_kv_heads)
        out[dst + "attn.wv.weight"] = sd[src + "self_attn.v_proj.weight"]
        out[dst + "attn.wo.weight"] = sd[src + "self_attn.o_proj.weight"]
        if src + "mlp.experts.gate_up_proj" in sd:
            gate_up, down = sd[src + "mlp.experts.gate_up_proj"], sd[src + "mlp.experts.down_proj"]
            out[dst + "moe.gate.weight"] = sd[src + "mlp.gate.weight"]
            for e in range(args.n_experts):
                out[dst + f"moe.experts.{e}.w1.weight"] = gate_up[e, :I]
                out[dst + f"moe.experts.{e}.w3.weight"] = gate_up[e, I:]
                out[dst + f"moe.experts.{e}.w2.weight"] = down[e]
        else:
            out[dst + "moe.gate.weight"] = sd[src + "block_sparse_moe.gate.weight"]
            for e in range(args.n_experts):
                for w in ("w1", "w2", "w3"):
                    out[dst + f"moe.experts.{e}.{w}.weight"] = sd[src + f"block_sparse_moe.experts.{e}.{w}.weight"]
    return out


def to_hf_model(model, dtype=None):
    """A transformers ``MixtralForCausalLM`` holding the same weights (needs transformers)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = hf_config_dict(model.args)
    for k in ("architectures", "model_type", "torch_dtype", "rope_theta"):
        cfg.pop(k)
    hf = MixtralForCausalLM(MixtralConfig(**cfg))
    sd = to_hf_state_dict(model.state_dict(), model.args, fused=True)
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    if unexpected or [m for m in missing if "rotary" not in m]:
        raise RuntimeError(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
    hf.eval()
    return hf.to(dtype) if dtype is not None else hf


def from_hf_model(hf_model):
    """A moe_lab ``Mixtral`` with the weights of a transformers ``MixtralForCausalLM``."""

    cfg = hf_model.config.to_dict()
    args = args_from_hf_config(cfg)
    with torch.device("meta"):
        model = Mixtral(args)
    model.load_state_dict(from_hf_state_dict(hf_model.state_dict(), args), assign=True)
    return model.eval()
