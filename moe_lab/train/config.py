"""What a training run depends on: :class:`TrainConfig` (model, data, optimiser) and the schedule."""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from ..model import PRESETS, ModelArgs

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = REPO_ROOT / "configs"
#: Files of a run directory.
LOG_NAME = "training_log.jsonl"
CKPT_NAME = "checkpoint.pt"
SNAPSHOT_NAME = "router_snapshots.npz"

@dataclass
class DataConfig:
    """Where the text comes from and how it is cut into training sequences."""

    corpus_size: str = "small"  # moe_lab.corpus.SIZES: "tiny", "small", "full"
    corpus_seed: int = 0
    corpus_dir: str | None = None  # read the corpus from here if built (else build it and write it here)
    prose_dir: str | None = None  # downloaded Debian packages of real prose (moe_lab.corpus.prose); None: v3 corpus
    domains: list[str] | None = None  # None: every domain of the corpus
    seq_len: int = 256
    domain_alpha: float = 1.0  # a domain is drawn with probability ~ weight * (its training windows) ** alpha
    domain_weights: dict[str, float] | None = None  # per-domain multipliers of that probability (default 1)
    eval_tokens_per_domain: int | None = 16384  # held-out tokens per domain kept by the run (None: all)
    eval_windows: int = 4  # held-out windows per domain (evenly spaced) for the evaluations during training
    probe_windows: int = 1  # held-out windows per domain whose routing is snapshotted


@dataclass
class OptimConfig:
    steps: int = 1000  # total optimizer steps (the schedule's length)
    batch_size: int = 8  # sequences per step
    lr: float = 3e-3
    min_lr: float = 3e-4  # cosine decays to this
    warmup_steps: int = 50
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    decay_embeddings: bool = False  # weight decay on tok_embeddings (never on norms)


@dataclass
class TrainConfig:
    """Everything a training run depends on. ``model`` holds the loss coefficients too
    (``router_aux_loss_coef``, default 0.02 as in Mixtral, and ``router_z_loss_coef``)."""

    model: ModelArgs
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    name: str = "run"
    seed: int = 0
    device: str = "cpu"
    precision: str = "fp32"  # "fp32", or "bf16": autocast matmuls to bf16 (fp32 weights/optimizer)
    num_threads: int | None = None  # torch.set_num_threads during training (None: leave as is)
    deterministic: bool = True  # torch.use_deterministic_algorithms during training
    log_every: int = 10  # steps between "train" log records (losses, expert load)
    eval_every: int = 100  # steps between held-out evaluations (and at the end)
    checkpoint_every: int = 100  # steps between checkpoints (and at the end); 0: only at the end
    snapshot_every: int = 50  # steps between router snapshots (and at 0 and the end); 0: none
    # "hf": the model's own loss, transformers' Mixtral definition: f and P over the router logits of
    #   all layers concatenated, so an expert index overloaded in one layer can be offset by the
    #   same index underloaded in another, and single layers may stay unbalanced.
    # "per_layer": E * sum_e f_e P_e computed in every layer and summed over layers (as Switch
    #   Transformer / GShard add it to each MoE layer), which balances every layer.
    load_balancing: str = "hf"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["optim"]["betas"] = list(self.optim.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        d = dict(d)
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown TrainConfig fields: {sorted(unknown)}")
        model = dict(d.pop("model", {}))
        preset = model.pop("preset", None)
        args = ModelArgs.from_name(preset, **model) if preset else ModelArgs.from_dict(model)
        data = _sub(DataConfig, d.pop("data", {}), "data")
        optim = _sub(OptimConfig, d.pop("optim", {}), "optim")
        optim.betas = tuple(optim.betas)
        cfg = cls(model=args, data=data, optim=optim, **d)
        cfg.validate()
        return cfg

    def validate(self):
        if self.load_balancing not in ("hf", "per_layer"):
            raise ValueError(f"load_balancing must be 'hf' or 'per_layer', got {self.load_balancing!r}")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32' or 'bf16', got {self.precision!r}")
        if self.data.seq_len + 1 > self.model.max_seq_len + 1 or self.data.seq_len < 2:
            raise ValueError(f"data.seq_len={self.data.seq_len} must be in [2, max_seq_len={self.model.max_seq_len}]")
        if self.optim.steps < 1 or self.optim.batch_size < 1:
            raise ValueError("optim.steps and optim.batch_size must be >= 1")
        if not 0 <= self.optim.warmup_steps <= self.optim.steps:
            raise ValueError(f"optim.warmup_steps={self.optim.warmup_steps} must be in [0, steps={self.optim.steps}]")
        for name in ("log_every", "eval_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")


def _sub(cls, d: dict, section: str):
    unknown = set(d) - {f.name for f in fields(cls)}
    if unknown:
        raise ValueError(f"unknown {section} fields: {sorted(unknown)}; known: {sorted(f.name for f in fields(cls))}")
    return cls(**d)


def load_config(config: str | os.PathLike | dict | TrainConfig) -> TrainConfig:
    """A TrainConfig from a JSON file, a name in ``configs/`` (``"tiny-mixtral"``), a ModelArgs
    preset name (default data and optimiser settings), a dict, or a TrainConfig (returned as is)."""
    if isinstance(config, TrainConfig):
        return config
    if isinstance(config, dict):
        return TrainConfig.from_dict(config)
    path = Path(config)
    if path.suffix == ".json" or path.exists():
        if not path.exists():
            raise FileNotFoundError(f"config file {path} does not exist")
        d = json.loads(path.read_text())
        d.setdefault("name", path.stem)
        return TrainConfig.from_dict(d)
    name = str(config)
    if (CONFIG_DIR / f"{name}.json").exists():
        return load_config(CONFIG_DIR / f"{name}.json")
    if name in PRESETS:
        return TrainConfig(model=ModelArgs.from_name(name), name=name)
    available = sorted(p.stem for p in CONFIG_DIR.glob("*.json")) if CONFIG_DIR.exists() else []
    raise ValueError(f"{name!r} is neither a config file, a config in {CONFIG_DIR} ({available}), "
                     f"nor a model preset ({sorted(PRESETS)})")


def lr_at(step: int, optim: OptimConfig) -> float:
    """Learning rate of update ``step`` (0-based): linear warm-up to ``lr`` over ``warmup_steps``
    updates, then a cosine from ``lr`` down to ``min_lr`` at the last step."""
    if step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    span = max(1, optim.steps - 1 - optim.warmup_steps)
    progress = min(1.0, (step - optim.warmup_steps) / span)
    return optim.min_lr + 0.5 * (optim.lr - optim.min_lr) * (1.0 + math.cos(math.pi * progress))

