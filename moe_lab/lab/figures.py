"""Notebook 10's pictures and live checks: each design's routing drawn from the block that runs, the
transformers twin of a design checked on a random tiny block, and the lab's results with intervals."""

from __future__ import annotations

import importlib

import numpy as np
import torch

from ..hooks import name_hook_points, run_with_cache
from ..model import ModelArgs
from ..moe import MoE
from ..moe.designs import design_changes
from ..moe.twins import moe_from_transformers

#: design name -> ModelArgs overrides for the routing pictures (8 experts, 12 tokens)
PICTURES = {
    "Mixtral top-2 of 8": {},
    "Switch top-1, capacity 1.0": dict(experts_per_token=1, router_renormalise=False, capacity_factor=1.0),
    "V3 sigmoid + selection bias": dict(router_score="sigmoid", selection_bias=True),
    "expert choice (c = 3)": dict(router="expert_choice", capacity_factor=1.0),
    "fine-grained: top-7 of 32 + shared": dict(n_experts=32, experts_per_token=7, n_shared_experts=1, hidden_dim=4),
}


def picture_block(overrides: dict, dim: int = 16, seed: int = 0) -> MoE:
    """A tiny random ``MoE`` of a design (eval mode); DeepSeek-V3's selection bias set to push experts 0-1 up."""
    args = ModelArgs(dim=dim, n_layers=1, n_heads=1, n_kv_heads=1, head_dim=2, vocab_size=2,
                     **{"hidden_dim": 16, **overrides})
    torch.manual_seed(seed)
    moe = MoE(args).eval()
    name_hook_points(moe)
    with torch.no_grad():
        moe.gate.weight.normal_(0, 0.5)
        if moe.selection_bias is not None:
            moe.selection_bias.copy_(torch.linspace(0.3, -0.3, args.n_experts))
    return moe


def routing_matrix(moe: MoE, x: torch.Tensor) -> np.ndarray:
    """[T, E] routing weight of each token (rows, one sequence x [1, T, D]) for each expert; 0 = not sent."""
    with torch.no_grad():
        _, cache = run_with_cache(moe, x, names_filter=["hook_topk_indices", "hook_topk_weights"])
    idx, w = cache["hook_topk_indices"], cache["hook_topk_weights"]
    T, E = x.shape[1], moe.n_experts
    out = np.zeros((T, E))
    for t in range(T):
        for e, v in zip(idx[t].tolist(), w[t].tolist()):
            if e >= 0:
                out[t, e] = v
    return out


def design_pictures(T: int = 12, seed: int = 0):
    """One heat map per design: which experts each of T tokens goes to (colour: the routing weight),
    computed by moe_lab's block on the same random hidden states."""
    from plotly.subplots import make_subplots
    import plotly.graph_objects as go

    x = torch.randn(1, T, 16, generator=torch.Generator().manual_seed(seed))
    fig = make_subplots(rows=1, cols=len(PICTURES), subplot_titles=list(PICTURES), horizontal_spacing=0.03,
                        column_widths=[8, 8, 8, 8, 20])
    mats = {}
    for i, (name, over) in enumerate(PICTURES.items(), 1):
        m = routing_matrix(picture_block(over, seed=seed), x)
        mats[name] = m
        fig.add_trace(go.Heatmap(z=m, x=list(range(m.shape[1])), y=[f"t{t}" for t in range(T)], coloraxis="coloraxis",
                                 hovertemplate="token %{y}, expert %{x}: weight %{z:.2f}<extra></extra>"), 1, i)
        fig.update_xaxes(title_text="expert", row=1, col=i)
        fig.update_yaxes(autorange="reversed", showticklabels=(i == 1), row=1, col=i)
    fig.update_layout(height=380, width=1200, coloraxis=dict(colorscale="Blues", colorbar=dict(title="weight")),
                      title="Routing of the same 12 random hidden states under each design (random tiny blocks, "
                            "moe_lab's code)", font=dict(size=10))
    fig.update_annotations(font_size=10)
    return fig, mats


# --------------------------------------------------------------------------------------------
# transformers twins, on random tiny blocks

#: family -> (module, block class, config class, config kwargs), D = 16
TWIN_BLOCKS = {
    "mixtral": ("mixtral", "MixtralSparseMoeBlock", "MixtralConfig",
                dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=24)),
    "switch": ("switch_transformers", "SwitchTransformersSparseMLP", "SwitchTransformersConfig",
               dict(d_model=16, d_ff=20, num_experts=4, expert_capacity=3)),
    "deepseek_v3": ("deepseek_v3", "DeepseekV3MoE", "DeepseekV3Config",
                    dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=8, n_shared_experts=1,
                         n_group=1, topk_group=1, routed_scaling_factor=1.0, norm_topk_prob=True)),
    "qwen2_moe": ("qwen2_moe", "Qwen2MoeSparseMoeBlock", "Qwen2MoeConfig",
                  dict(num_experts=16, num_experts_per_tok=4, moe_intermediate_size=6,
                       shared_expert_intermediate_size=6, norm_topk_prob=False)),
}


def random_hf_block(family: str, seed: int = 0, *, spec: tuple | None = None, **overrides):
    """A tiny transformers MoE block of ``family`` (eval mode, width 16), every parameter and buffer
    random (weights N(0, 0.3^2), biases and buffers N(0, 0.5^2)): ``spec`` (module, block class, config
    class, config kwargs) defaults to ``TWIN_BLOCKS[family]``; ``overrides`` change config fields."""
    import transformers

    module, block_name, config_name, kwargs = spec or TWIN_BLOCKS[family]
    common = {} if family == "switch" else dict(hidden_size=16, num_attention_heads=2, num_key_value_heads=2)
    config = getattr(transformers, config_name)(**{**common, **kwargs, **overrides})
    config._experts_implementation = "eager"
    cls = getattr(importlib.import_module(f"transformers.models.{module}.modeling_{module}"), block_name)
    torch.manual_seed(seed)
    block = cls(config)
    with torch.no_grad():
        for name, p in block.named_parameters():
            p.normal_(0.0, 0.5 if "bias" in name else 0.3)
        for _, b in block.named_buffers():
            b.normal_(0.0, 0.5)
    return block.eval()


def twin_check(family: str, seed: int = 0) -> dict:
    """The transformers block of ``family`` and its moe_lab twin on the same random hidden states
    [3, 10, 16]: the max |difference| of the outputs, and the twin's design fields."""
    block = random_hf_block(family, seed)
    twin = moe_from_transformers(block).eval()
    x = torch.randn(3, 10, 16, generator=torch.Generator().manual_seed(seed + 1))
    with torch.no_grad():
        y = block(x)
        y = (y[0] if isinstance(y, tuple) else y).reshape(x.shape)
        y_twin = twin(x)[0]
    args = twin.args if hasattr(twin, "args") else None
    return {"family": family, "max_abs_diff": float((y - y_twin).abs().max()), "output_scale": float(y.abs().max()),
            "design": design_changes(args) if args is not None else {}}


# --------------------------------------------------------------------------------------------
# the lab's results


def ce_figure(table, title: str):
    """Held-out CE per recipe, the mean over seeds with its 95% interval (error bars)."""
    import plotly.graph_objects as go

    t = table.sort_values("ce")
    fig = go.Figure(go.Scatter(x=t.ce, y=t.index, mode="markers", error_x=dict(type="data", symmetric=False,
                                                                              array=t.ce_high - t.ce,
                                                                              arrayminus=t.ce - t.ce_low),
                               hovertemplate="%{y}: %{x:.4f}<extra></extra>"))
    fig.update_layout(title=dict(text=title, font=dict(size=13)), xaxis_title="held-out cross-entropy (nats/token, reduced vocabulary)",
                      yaxis=dict(autorange="reversed"), height=420, width=820)
    return fig
