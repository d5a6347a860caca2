"""Key-name styles of Mixtral checkpoints and their configs (files are :mod:`moe_lab.checkpoints.files`'s).

Five styles of key names, detected from the keys themselves:

=================  ==========================================================================
``hf``             Hugging Face hub names (``model.layers.{L}.block_sparse_moe.experts.{e}.w1.weight``),
                   q/k rows in "rotate_half" order. What the hub and ``save_pretrained`` write.
``hf-fused``       transformers v5 in-memory names: ``model.layers.{L}.mlp.experts.gate_up_proj``
                   [E, 2I, H] (w1 rows then w3 rows) and ``mlp.experts.down_proj`` [E, H, I].
``mistral``        mistral-inference native (``layers.{L}.feed_forward.experts.{e}.w1.weight``),
                   interleaved RoPE row order, like moe_lab.
``mistral-stacked`` the original Dec-2023 release (``consolidated.00.pt`` .. ``.07.pt``):
                   ``layers.{L}.block_sparse_moe.w1``/``w3`` [E*I, H] stacked by expert, ``w2``
                   [E*I, H] holding each expert's down-projection transposed; no ``.weight``.
``moe_lab``        this package's own ``Mixtral.state_dict()`` names (``blocks.{L}.moe...``).
=================  ==========================================================================

The HF conversions are :func:`moe_lab.checkpoints.convert.to_hf_state_dict` / ``from_hf_state_dict``; the
Mistral ones are here. All of them work on the meta device too, which is how the loader knows
every expected key and shape before it reads a byte.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

from .convert import from_hf_state_dict, to_hf_state_dict
from ..model import Mixtral, ModelArgs

STYLES = ("hf", "hf-fused", "mistral", "mistral-stacked", "moe_lab")

LAYER_PREFIX = {"hf": "model.layers.", "hf-fused": "model.layers.", "mistral": "layers.",
                "mistral-stacked": "layers.", "moe_lab": "blocks."}

# Keys some exporters leave in state dicts that carry no weights (RoPE tables): skipped quietly.
IGNORED_KEY = re.compile(r"(^|\.)(rotary_emb\.inv_freq|rope\.freqs|inv_freq)$")


def detect_style(keys) -> str | None:
    """The key-name style of a checkpoint, or None when the keys are not a Mixtral's."""
    keys = set(keys)
    if "model.embed_tokens.weight" in keys or any(k.startswith("model.layers.") for k in keys):
        return "hf-fused" if any(k.endswith("mlp.experts.gate_up_proj") for k in keys) else "hf"
    if any(k.startswith("blocks.") for k in keys):
        return "moe_lab"
    if "tok_embeddings.weight" in keys or any(k.startswith("layers.") for k in keys):
        if any(re.fullmatch(r"layers\.\d+\.block_sparse_moe\.w[123]", k) for k in keys):
            return "mistral-stacked"
        return "mistral"
    return None


def layer_of(key: str, style: str) -> int | None:
    """The layer index a key belongs to (None for embeddings, final norm, output)."""
    m = re.match(re.escape(LAYER_PREFIX[style]) + r"(\d+)\.", key)
    return int(m.group(1)) if m else None


def rename_layer(key: str, style: str, src: int, dst: int) -> str:
    p = LAYER_PREFIX[style]
    return p + str(dst) + key[len(p) + len(str(src)):]


# --------------------------------------------------------------------------------------------
# Mistral names <-> moe_lab names

_MISTRAL_LAYER = [("attention_norm.weight", "attention_norm.weight"), ("ffn_norm.weight", "ffn_norm.weight")] + [
    (f"attention.{w}.weight", f"attn.{w}.weight") for w in ("wq", "wk", "wv", "wo")]


def to_mistral_state_dict(sd: dict[str, Tensor], args: ModelArgs, stacked: bool = False) -> dict[str, Tensor]:
    """moe_lab names -> mistral-inference native names (``stacked=True``: the Dec-2023 release).

    No RoPE permutation: Mistral and moe_lab share the interleaved convention.
    """
    args.require_mixtral_design("a mistral-inference state dict")
    out = {"tok_embeddings.weight": sd["tok_embeddings.weight"], "norm.weight": sd["norm.weight"],
           "output.weight": sd["output.weight"]}
    for L in range(args.n_layers):
        src, dst = f"blocks.{L}.", f"layers.{L}."
        for m, ours in _MISTRAL_LAYER:
            out[dst + m] = sd[src + ours]
        ex = [{w: sd[src + f"moe.experts.{e}.{w}.weight"] for w in ("w1", "w2", "w3")} for e in range(args.n_experts)]
        if stacked:
            out[dst + "block_sparse_moe.gate.weight"] = sd[src + "moe.gate.weight"]
            out[dst + "block_sparse_moe.w1"] = torch.cat([x["w1"] for x in ex])  # [E*I, H]
            out[dst + "block_sparse_moe.w2"] = torch.cat([x["w2"].t() for x in ex])  # [E*I, H], transposed
            out[dst + "block_sparse_moe.w3"] = torch.cat([x["w3"] for x in ex])
        else:
            out[dst + "feed_forward.gate.weight"] = sd[src + "moe.gate.weight"]
            for e, x in enumerate(ex):
                for w, t in x.items():
                    out[dst + f"feed_forward.experts.{e}.{w}.weight"] = t
    return out


def from_mistral_state_dict(sd: dict[str, Tensor], args: ModelArgs) -> dict[str, Tensor]:
    """mistral-inference native or Dec-2023 stacked names -> moe_lab names (views, no copies)."""
    out = {"tok_embeddings.weight": sd["tok_embeddings.weight"], "norm.weight": sd["norm.weight"],
           "output.weight": sd["output.weight"]}
    I = args.hidden_dim
    for L in range(args.n_layers):
        src, dst = f"layers.{L}.", f"blocks.{L}."
        for m, ours in _MISTRAL_LAYER:
            out[dst + ours] = sd[src + m]
        if src + "block_sparse_moe.w1" in sd:
            out[dst + "moe.gate.weight"] = sd[src + "block_sparse_moe.gate.weight"]
            w1, w2, w3 = (sd[src + f"block_sparse_moe.{w}"] for w in ("w1", "w2", "w3"))
            for e in range(args.n_experts):
                rows = slice(e * I, (e + 1) * I)
                out[dst + f"moe.experts.{e}.w1.weight"] = w1[rows]
                out[dst + f"moe.experts.{e}.w2.weight"] = w2[rows].t()  # [H, I]
                out[dst + f"moe.experts.{e}.w3.weight"] = w3[rows]
        else:
            out[dst + "moe.gate.weight"] = sd[src + "feed_forward.gate.weight"]
            for e in range(args.n_experts):
                for w in ("w1", "w2", "w3"):
                    out[dst + f"moe.experts.{e}.{w}.weight"] = sd[src + f"feed_forward.experts.{e}.{w}.weight"]
    return out


def to_style(sd: dict[str, Tensor], args: ModelArgs, style: str) -> dict[str, Tensor]:
    """moe_lab state dict -> the names (and RoPE row order) of ``style``."""
    if style in ("hf", "hf-fused"):
        return to_hf_state_dict(sd, args, fused=style == "hf-fused")
    if style in ("mistral", "mistral-stacked"):
        return to_mistral_state_dict(sd, args, stacked=style == "mistral-stacked")
    if style == "moe_lab":
        return dict(sd)
    raise ValueError(f"unknown key style {style!r}; one of {STYLES}")


def from_style(sd: dict[str, Tensor], args: ModelArgs, style: str) -> dict[str, Tensor]:
    """A state dict in ``style`` -> moe_lab names (q/k rows re-interleaved for HF styles)."""
    if style in ("hf", "hf-fused"):
        return from_hf_state_dict(sd, args)
    if style in ("mistral", "mistral-stacked"):
        return from_mistral_state_dict(sd, args)
    if style == "moe_lab":
        return dict(sd)
    raise ValueError(f"unknown key style {style!r}; one of {STYLES}")


def meta_model(args: ModelArgs) -> Mixtral:
    with torch.device("meta"):
        return Mixtral(args)


def expected_shapes(args: ModelArgs, style: str) -> dict[str, tuple[int, ...]]:
    """Every key a checkpoint of ``style`` for ``args`` must hold, with its shape (no data)."""
    sd = meta_model(args).state_dict()
    return {k: tuple(v.shape) for k, v in to_style(sd, args, style).items()}


# --------------------------------------------------------------------------------------------
# params.json (Mistral native config)


def args_from_params(params: dict, **overrides) -> ModelArgs:
    """ModelArgs from a Mistral ``params.json`` dict. ``rope_theta`` absent means 1e6 (Mixtral
    8x7B's file has none); ``moe: {num_experts, num_experts_per_tok}`` is required."""
    moe = params.get("moe")
    if not isinstance(moe, dict):
        raise ValueError("params.json has no 'moe' section: not a mixture-of-experts (Mixtral) model")
    d = dict(
        dim=params["dim"], n_layers=params["n_layers"], n_heads=params["n_heads"],
        n_kv_heads=params.get("n_kv_heads") or params["n_heads"], head_dim=params.get("head_dim"),
        hidden_dim=params["hidden_dim"], vocab_size=params["vocab_size"], norm_eps=params.get("norm_eps", 1e-5),
        rope_theta=float(params.get("rope_theta") or 1e6), sliding_window=params.get("sliding_window"),
        n_experts=moe["num_experts"], experts_per_token=moe["num_experts_per_tok"],
    )
    if params.get("max_seq_len"):
        d["max_seq_len"] = params["max_seq_len"]
    d.update(overrides)
    return ModelArgs(**d)


def params_dict(args: ModelArgs) -> dict:
    """The params.json mistral-inference reads for ``args``."""
    args.require_mixtral_design("params.json")
    p = {"dim": args.dim, "n_layers": args.n_layers, "head_dim": args.head_dim, "hidden_dim": args.hidden_dim,
         "n_heads": args.n_heads, "n_kv_heads": args.n_kv_heads, "norm_eps": args.norm_eps,
         "vocab_size": args.vocab_size, "rope_theta": args.rope_theta, "max_seq_len": args.max_seq_len,
         "moe": {"num_experts": args.n_experts, "num_experts_per_tok": args.experts_per_token}}
    if args.sliding_window is not None:
        p["sliding_window"] = args.sliding_window
    return p
