"""The recipes of the design-space lab: one small model, eleven ways to spend its feed-forward budget.

Every recipe is a :class:`Recipe`: ``ModelArgs`` overrides of the shared :data:`BASE` model and, for the
upcycled recipes, how the experts are made from a dense checkpoint. Parameters are matched on the
*active* feed-forward size: a Mixtral top-2 of 8 experts of hidden ``H`` runs ``2 * H`` hidden units per
token, so dense-at-equal-active has hidden ``2H``, Switch's top-1 experts have hidden ``2H``, the
fine-grained recipe splits each expert in four (hidden ``H/4``, top-7 of 32, plus one shared expert of
``H/4``: ``7/4 H + 1/4 H = 2H``). Dense-at-equal-total has hidden ``8H``, the total of the 8 experts.

A dense feed-forward layer is written as an MoE of **one** expert chosen with weight exactly 1
(softmax over one logit), so every recipe trains through the same :func:`moe_lab.train.train`
(the loop's load-balancing objective needs router logits); its router costs ``dim`` parameters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..model import DESIGNS, ModelArgs, count_params


@dataclass(frozen=True)
class Scale:
    """The model and the token budget shared by every recipe."""

    dim: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int = 16
    hidden: int = 128  # H: hidden size of one Mixtral-recipe expert
    vocab_size: int = 4096  # the reduced vocabulary (moe_lab.lab.vocab)
    seq_len: int = 128
    batch_size: int = 16
    steps: int = 250
    lr: float = 3e-3
    warmup_steps: int = 25
    corpus_size: str = "small"
    upcycle_fraction: float = 0.5  # share of the steps the dense source of the upcycled recipes trains

    @property
    def tokens(self) -> int:
        return self.steps * self.batch_size * self.seq_len


#: The committed lab's scale, and the miniature that notebook 10's fast mode reruns.
FULL = Scale()
MINI = Scale(dim=32, hidden=64, vocab_size=1024, seq_len=64, batch_size=8, steps=24, warmup_steps=4,
             corpus_size="tiny")


@dataclass(frozen=True)
class Recipe:
    name: str
    title: str
    model: dict  # ModelArgs overrides of the base model; "hidden" multiplies Scale.hidden
    paper: str  # what the recipe follows
    hidden: float = 1.0  # each routed expert's hidden size, in units of H
    upcycle: str | None = None  # None, "copy" (Komatsuzaki et al.) or "drop" (Drop-Upcycling)
    drop_ratio: float = 0.5  # Drop-Upcycling's r: share of each expert's hidden units re-initialised
    load_balancing: str = "per_layer"
    extra: dict = field(default_factory=dict)

    @property
    def dense(self) -> bool:
        return self.model.get("n_experts") == 1


DENSE = dict(n_experts=1, experts_per_token=1, router_aux_loss_coef=0.0)
AUX = 0.02  # the balancing-loss coefficient of the Mixtral-style recipes (ModelArgs' default)

RECIPES: dict[str, Recipe] = {r.name: r for r in [
    Recipe("dense_active", "dense, equal active params", DENSE, "baseline", hidden=2.0),
    Recipe("dense_total", "dense, equal total params", DENSE, "baseline", hidden=8.0),
    Recipe("mixtral_aux", "top-2 of 8 + balancing loss", dict(router_aux_loss_coef=AUX),
           "Mixtral (Jiang et al. 2024); loss of Switch/GShard, per layer"),
    Recipe("mixtral_noaux", "top-2 of 8, no balancing", dict(router_aux_loss_coef=0.0), "ablation"),
    Recipe("switch_cf1.0", "Switch top-1, capacity 1.0",
           dict(DESIGNS["switch"], capacity_factor=1.0, expert_gated=True, expert_act="silu",
                router_aux_loss_coef=0.01), "Switch Transformer (Fedus et al. 2021)", hidden=2.0),
    Recipe("switch_cf1.25", "Switch top-1, capacity 1.25",
           dict(DESIGNS["switch"], capacity_factor=1.25, expert_gated=True, expert_act="silu",
                router_aux_loss_coef=0.01), "Switch Transformer (Fedus et al. 2021)", hidden=2.0),
    Recipe("v3_bias", "sigmoid top-2 of 8, bias balancing, no aux loss",
           dict(router_score="sigmoid", selection_bias=True, router_aux_loss_coef=0.0),
           "DeepSeek-V3 auxiliary-loss-free balancing (Wang et al. 2024)"),
    Recipe("finegrained_shared", "top-7 of 32 (H/4) + 1 shared (H/4)",
           dict(n_experts=32, experts_per_token=7, n_shared_experts=1, router_aux_loss_coef=AUX),
           "DeepSeekMoE (Dai et al. 2024)", hidden=0.25),
    Recipe("expert_choice", "expert choice, capacity 1.0 (k=2 on average)",
           dict(DESIGNS["expert-choice"], router_aux_loss_coef=0.0), "Expert choice (Zhou et al. 2022)"),
    Recipe("upcycled", "dense (H) upcycled to top-2 of 8, experts copied", dict(router_aux_loss_coef=AUX),
           "Sparse upcycling (Komatsuzaki et al. 2023)", upcycle="copy"),
    Recipe("drop_upcycled", "upcycled, 50% of each expert re-initialised", dict(router_aux_loss_coef=AUX),
           "Drop-Upcycling (Nakamura et al. 2025)", upcycle="drop"),
]}


def model_args(recipe: Recipe | str, scale: Scale = FULL) -> ModelArgs:
    """The ``ModelArgs`` of a recipe at a scale."""
    r = RECIPES[recipe] if isinstance(recipe, str) else recipe
    H = max(1, round(scale.hidden * r.hidden))
    kw = dict(dim=scale.dim, n_layers=scale.n_layers, n_heads=scale.n_heads, n_kv_heads=scale.n_kv_heads,
              head_dim=scale.head_dim, hidden_dim=H, vocab_size=scale.vocab_size, max_seq_len=scale.seq_len,
              rope_theta=1e4)
    kw.update(r.model)
    if kw.get("n_shared_experts"):
        kw["shared_hidden_dim"] = H
    return ModelArgs(**kw)


def source_args(scale: Scale = FULL) -> ModelArgs:
    """The dense model the upcycled recipes start from: one expert of hidden H (the experts' size)."""
    return model_args(Recipe("upcycle_source", "dense source of the upcycled recipes", DENSE, "upcycling"), scale)


def non_embedding_params(args: ModelArgs) -> dict[str, int]:
    """Parameters without the embeddings and output layer (which every recipe shares): active and total."""
    pc = count_params(args)
    embed = 2 * args.vocab_size * args.dim + args.dim
    return {"active": pc.active - embed, "total": pc.total - embed}


# --------------------------------------------------------------------------------------------
# Upcycling: a dense checkpoint's feed-forward copied into every expert


@torch.no_grad()
def upcycle_state(dense_state: dict, moe_model, mode: str = "copy", drop_ratio: float = 0.5,
                  seed: int = 0) -> dict:
    """The state dict of ``moe_model`` (a fresh MoE Mixtral) with everything but the routers taken from
    ``dense_state`` (a one-expert model's state dict) and the dense FFN copied into every expert.

    ``mode="copy"``: sparse upcycling, every expert an exact copy (so with renormalised top-k weights
    the upcycled model computes the dense one's function at step 0). ``mode="drop"``: Drop-Upcycling,
    in each expert a random ``drop_ratio`` of the hidden units (rows of w1 and w3, columns of w2) is
    re-initialised from a normal with the mean and std of the dense matrix, a different set per expert.
    The routers keep ``moe_model``'s fresh initialisation."""
    if mode not in ("copy", "drop"):
        raise ValueError(f"upcycle mode must be 'copy' or 'drop', found {mode!r}")
    state = moe_model.state_dict()
    g = torch.Generator().manual_seed(seed)
    for name in state:
        if ".moe.experts." in name:
            prefix, rest = name.split(".moe.experts.")
            src = f"{prefix}.moe.experts.0.{rest.split('.', 1)[1]}"
            w = dense_state[src].clone()
            if mode == "drop" and w.dim() == 2:
                e = int(rest.split(".")[0])
                hidden_axis = 1 if ".w2." in name else 0
                n = w.shape[hidden_axis]
                gi = torch.Generator().manual_seed(seed * 1000 + e)  # the same units in w1, w2, w3 of expert e
                idx = torch.randperm(n, generator=gi)[:math.ceil(drop_ratio * n)]
                fresh = torch.randn(w.shape, generator=g) * dense_state[src].std() + dense_state[src].mean()
                if hidden_axis == 0:
                    w[idx] = fresh[idx]
                else:
                    w[:, idx] = fresh[:, idx]
            state[name] = w
        elif ".moe.gate." in name or name.endswith("selection_bias"):
            continue
        elif name in dense_state and dense_state[name].shape == state[name].shape:
            state[name] = dense_state[name].clone()
    return state
