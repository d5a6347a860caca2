"""Train a small Mixtral from scratch on the multi-domain corpus, and evaluate it.

Command line::

    python -m moe_lab.train --config configs/tiny-mixtral.json --out runs/tiny-mixtral
    python -m moe_lab.train --config configs/tiny-mixtral.json --out runs/tiny-mixtral --resume
    python -m moe_lab.train export --run runs/tiny-mixtral --out data/tiny-mixtral
    python -m moe_lab.train evaluate --model data/tiny-mixtral --config configs/tiny-mixtral.json

Python::

    from moe_lab.train import load_config, train
    result = train(load_config("configs/tiny-mixtral.json"), "runs/demo", max_steps=20)

What one training run does (all of it seeded, so two runs of the same config on the CPU give
bit-identical weights, and a resumed run matches an uninterrupted one):

1. Builds the corpus (:mod:`moe_lab.corpus`) or takes one you pass in, tokenises every document
   with the real Mixtral tokenizer (BOS at each document start) and caches the token arrays under
   ``<out>/tokens/``.
2. Packs each domain's training documents (shuffled) into windows of ``seq_len + 1`` tokens, so a
   training sequence comes from one domain; held-out documents are packed the same way, per domain.
3. Draws the whole batch schedule up front (which window of which domain at which step), so that
   resuming needs nothing but the step number.
4. Optimises ``ce + router_aux_loss_coef * load_balancing (+ router_z_loss_coef * z)`` with AdamW
   (decoupled weight decay, none on norms and embeddings), linear warm-up then cosine decay,
   gradient-norm clipping, optionally bf16 autocast (weights and optimizer stay fp32).
5. Writes ``training_log.jsonl`` (one JSON object per line, ``type`` = run / train / eval):
   losses, learning rate, gradient norm, and the per-layer expert load (share of the top-k
   assignments going to each expert) of the training batches; held-out cross-entropy and expert
   load per domain at every evaluation.
6. Saves ``router_snapshots.npz``: the top-k experts chosen for a fixed set of held-out probe
   tokens at regular steps (for router-saturation plots), and ``checkpoint.pt`` (model, optimizer,
   step, RNG states) for ``--resume``.

``evaluate_model`` measures a trained model against the quality bar of the demo model (held-out
cross-entropy per domain next to a unigram baseline, greedy samples, expert load, consecutive-token
routing repetition with uniform and marginal baselines and a bootstrap interval) and
``write_model_card`` turns that report into ``MODEL_CARD.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .model import Mixtral, ModelArgs, PRESETS, count_params, load_balancing_loss

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO_ROOT / "configs"
LOG_NAME = "training_log.jsonl"
CKPT_NAME = "checkpoint.pt"
SNAPSHOT_NAME = "router_snapshots.npz"
IGNORE = -100


# --------------------------------------------------------------------------------------------
# Configuration


@dataclass
class DataConfig:
    """Where the text comes from and how it is cut into training sequences."""

    corpus_size: str = "small"  # moe_lab.corpus.SIZES: "tiny", "small", "full"
    corpus_seed: int = 0
    corpus_dir: str | None = None  # read the corpus from here if built (else build it and write it here)
    domains: list[str] | None = None  # None: every domain of the corpus
    prose_dir: str | None = None  # downloaded Debian packages of real prose (moe_lab.prose); None: the v3 corpus
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


# --------------------------------------------------------------------------------------------
# Data: tokenise, cache, pack


@dataclass
class TokenData:
    """Token ids per split and domain: ``tokens[split][domain]`` is one uint16 array of all the
    documents (each starting with BOS) in corpus order, ``starts[split][domain]`` their offsets."""

    domains: list[str]
    tokens: dict[str, dict[str, np.ndarray]]
    starts: dict[str, dict[str, np.ndarray]]
    fingerprint: str
    bos_id: int = 1

    def n_tokens(self, split: str) -> dict[str, int]:
        return {d: int(len(self.tokens[split][d])) for d in self.domains}

    def documents(self, split: str, domain: str) -> list[np.ndarray]:
        toks, starts = self.tokens[split][domain], self.starts[split][domain]
        ends = np.append(starts[1:], len(toks))
        return [toks[a:b] for a, b in zip(starts, ends)]


def corpus_fingerprint(corpus, tokenizer) -> str:
    h = hashlib.sha256(str(getattr(tokenizer, "sha256", type(tokenizer).__name__)).encode())
    for split in ("train", "heldout"):
        for doc in getattr(corpus, split):
            h.update(f"{split}\0{doc.domain}\0{doc.id}\0".encode())
            h.update(hashlib.sha1(doc.text.encode("utf-8")).digest())
    return h.hexdigest()[:16]


def tokenize_corpus(corpus, tokenizer, cache_dir: str | os.PathLike | None = None,
                    domains: Sequence[str] | None = None, progress: bool = True) -> TokenData:
    """Encode every document (BOS first, no EOS); cached as ``.npy`` files under
    ``cache_dir/<fingerprint>/`` so a resumed or repeated run skips this step."""
    from tqdm.auto import tqdm

    domains = list(domains or corpus.domains)
    missing = set(domains) - set(corpus.domains)
    if missing:
        raise ValueError(f"domains {sorted(missing)} are not in the corpus ({corpus.domains})")
    fp = corpus_fingerprint(corpus, tokenizer)
    cache = Path(cache_dir) / fp if cache_dir is not None else None
    tokens: dict = {"train": {}, "heldout": {}}
    starts: dict = {"train": {}, "heldout": {}}
    if cache is not None and all((cache / f"{s}-{d}.tokens.npy").exists() for s in tokens for d in domains):
        for s in tokens:
            for d in domains:
                tokens[s][d] = np.load(cache / f"{s}-{d}.tokens.npy")
                starts[s][d] = np.load(cache / f"{s}-{d}.starts.npy")
        return TokenData(domains, tokens, starts, fp, tokenizer.bos_id)
    if tokenizer.vocab_size > 65535:
        raise ValueError("token ids are stored as uint16; vocab_size must be <= 65535")
    n_docs = sum(1 for s in tokens for doc in getattr(corpus, s) if doc.domain in domains)
    with tqdm(total=n_docs, desc="tokenise", unit="doc", disable=not progress) as bar:
        for split in tokens:
            by_domain: dict[str, list[str]] = {d: [] for d in domains}
            for doc in getattr(corpus, split):
                if doc.domain in by_domain:
                    by_domain[doc.domain].append(doc.text)
            for d, texts in by_domain.items():
                ids: list[list[int]] = []
                for i in range(0, len(texts), 256):
                    ids.extend(tokenizer.encode_batch(texts[i:i + 256], bos=True))
                    bar.update(len(texts[i:i + 256]))
                lengths = np.array([len(x) for x in ids], dtype=np.int64)
                starts[split][d] = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64) if ids else np.zeros(0, np.int64)
                tokens[split][d] = (np.fromiter((t for x in ids for t in x), dtype=np.uint16, count=int(lengths.sum()))
                                    if ids else np.zeros(0, np.uint16))
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
        for s in tokens:
            for d in domains:
                np.save(cache / f"{s}-{d}.tokens.npy", tokens[s][d])
                np.save(cache / f"{s}-{d}.starts.npy", starts[s][d])
    return TokenData(domains, tokens, starts, fp, tokenizer.bos_id)


def pack_windows(token_data: TokenData, split: str, domain: str, seq_len: int,
                 shuffle_seed: int | None = None, max_windows: int | None = None) -> np.ndarray:
    """Documents of one domain laid end to end (shuffled when ``shuffle_seed`` is given) and cut
    into windows of ``seq_len + 1`` tokens overlapping by one, so every token is a target once.
    Returns int64 [n_windows, seq_len + 1]."""
    docs = token_data.documents(split, domain)
    if shuffle_seed is not None:
        order = np.random.default_rng([shuffle_seed, _stable_hash(domain)]).permutation(len(docs))
        docs = [docs[i] for i in order]
    stream = np.concatenate(docs).astype(np.int64) if docs else np.zeros(0, np.int64)
    n = max(0, (len(stream) - 1) // seq_len)
    if max_windows is not None:
        n = min(n, max_windows)
    idx = np.arange(n)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
    return stream[idx] if n else np.zeros((0, seq_len + 1), np.int64)


def _stable_hash(s: str) -> int:
    return int.from_bytes(hashlib.sha256(s.encode()).digest()[:4], "little")


def inputs_targets(windows: np.ndarray, bos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, T+1] windows -> tokens [B, T], targets [B, T]; BOS targets (a document start cannot be
    predicted from the previous document) are ignored."""
    w = torch.as_tensor(windows, dtype=torch.long)
    x, y = w[:, :-1], w[:, 1:].clone()
    y[y == bos_id] = IGNORE
    return x, y


def batch_schedule(n_windows: dict[str, int], steps: int, batch_size: int, seed: int,
                   alpha: float = 1.0, weights: dict[str, float] | None = None) -> np.ndarray:
    """[steps, batch_size, 2] (domain index, window index): which window each sequence of each
    step is. A domain is drawn with probability ~ weights[d] * n_windows[d] ** alpha; within a
    domain the windows come in a fresh random order each epoch. Depends only on its arguments."""
    names = list(n_windows)
    counts = np.array([n_windows[d] for d in names], dtype=np.float64)
    if (counts == 0).any():
        empty = [d for d, c in zip(names, counts) if c == 0]
        raise ValueError(f"domains {empty} have no training windows (too few tokens for seq_len)")
    unknown = set(weights or {}) - set(names)
    if unknown:
        raise ValueError(f"domain_weights names unknown domains {sorted(unknown)}; domains are {names}")
    p = counts ** alpha * np.array([(weights or {}).get(d, 1.0) for d in names])
    p = p / p.sum()
    rng = np.random.default_rng([seed, 1])
    dom = rng.choice(len(names), size=steps * batch_size, p=p)
    win = np.empty_like(dom)
    for i, d in enumerate(names):
        where = np.flatnonzero(dom == i)
        n = int(counts[i])
        epochs = -(-len(where) // n) if len(where) else 0
        drng = np.random.default_rng([seed, 2, i])
        order = np.concatenate([drng.permutation(n) for _ in range(epochs)]) if epochs else np.zeros(0, np.int64)
        win[where] = order[:len(where)]
    return np.stack([dom, win], -1).reshape(steps, batch_size, 2)


@dataclass
class Dataset:
    """Everything the loop needs: packed windows per domain and the batch schedule."""

    domains: list[str]
    train: dict[str, np.ndarray]  # domain -> [n, T+1]
    heldout: dict[str, np.ndarray]  # domain -> [n, T+1]
    schedule: np.ndarray  # [steps, B, 2]
    bos_id: int
    token_data: TokenData

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
        rows = self.schedule[step]
        w = np.stack([self.train[self.domains[d]][i] for d, i in rows])
        x, y = inputs_targets(w, self.bos_id)
        return x, y, rows[:, 0]


def prepare_data(cfg: TrainConfig, out_dir: str | os.PathLike | None, corpus=None, tokenizer=None,
                 progress: bool = True) -> Dataset:
    if tokenizer is None:
        from .tokenizer import load_tokenizer
        tokenizer = load_tokenizer()
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ValueError(f"tokenizer vocab {tokenizer.vocab_size} > model vocab_size {cfg.model.vocab_size}")
    if corpus is None:
        corpus = get_corpus(cfg.data, progress=progress)
    cache = Path(out_dir) / "tokens" if out_dir is not None else None
    td = tokenize_corpus(corpus, tokenizer, cache, cfg.data.domains, progress)
    T = cfg.data.seq_len
    train = {d: pack_windows(td, "train", d, T, shuffle_seed=cfg.seed) for d in td.domains}
    max_eval = max(1, cfg.data.eval_tokens_per_domain // T) if cfg.data.eval_tokens_per_domain else None
    heldout = {d: pack_windows(td, "heldout", d, T, max_windows=max_eval) for d in td.domains}
    empty = [d for d, w in heldout.items() if len(w) == 0]
    if empty:
        raise ValueError(f"domains {empty} have fewer than seq_len+1={T + 1} held-out tokens")
    sched = batch_schedule({d: len(w) for d, w in train.items()}, cfg.optim.steps, cfg.optim.batch_size,
                           cfg.seed, cfg.data.domain_alpha, cfg.data.domain_weights)
    return Dataset(td.domains, train, heldout, sched, tokenizer.bos_id, td)


def get_corpus(data: DataConfig, progress: bool = True):
    """The corpus named by the config: read from ``corpus_dir`` when it was built there with the
    same size and seed, otherwise built (and written to ``corpus_dir`` if given)."""
    from . import corpus as corpus_mod

    if data.corpus_dir is not None:
        d = Path(data.corpus_dir)
        if not d.is_absolute() and not d.exists():
            d = REPO_ROOT / d  # a relative corpus_dir in a config means the repository's
        stats = d / "stats.json"
        if stats.exists() and hasattr(corpus_mod, "load_corpus"):
            meta = json.loads(stats.read_text())
            m = meta.get("meta", meta)
            if (m.get("size") == data.corpus_size and m.get("seed") == data.corpus_seed
                    and bool(m.get("prose")) == (data.prose_dir is not None)):
                return corpus_mod.load_corpus(d)
        return corpus_mod.build_corpus(out_dir=d, size=data.corpus_size, seed=data.corpus_seed, progress=progress,
                                       prose=data.prose_dir)
    return corpus_mod.build_corpus(out_dir=None, size=data.corpus_size, seed=data.corpus_seed,
                                   progress=progress, prose=data.prose_dir)


# --------------------------------------------------------------------------------------------
# Routing bookkeeping


class RoutingRecorder:
    """Counts (or keeps) the experts chosen in every layer while attached to a model.

    ``counts`` [L, E] accumulates top-k assignments; with ``keep=True`` the indices of every
    forward are also kept (``indices()`` -> [L, N, k])."""

    def __init__(self, model: Mixtral, keep: bool = False):
        self.model, self.keep = model, keep
        L, E = len(model.blocks), model.args.n_experts
        self.counts = torch.zeros(L, E, dtype=torch.long)
        self.kept: list[list[torch.Tensor]] = [[] for _ in range(L)]
        self.enabled = True
        self._handles = []

    def __enter__(self):
        for i, block in enumerate(self.model.blocks):
            self._handles.append(block.moe.hook_topk_indices.register_forward_hook(self._hook(i)))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hook(self, layer: int):
        def fn(module, inputs, out):
            if not self.enabled:
                return
            idx = out.detach()
            self.counts[layer] += torch.bincount(idx.flatten().cpu(), minlength=self.counts.shape[1])
            if self.keep:
                self.kept[layer].append(idx.cpu().to(torch.uint8))
        return fn

    def shares(self) -> list[list[float]]:
        c = self.counts.double()
        return (c / c.sum(1, keepdim=True).clamp(min=1)).tolist()

    def reset(self):
        self.counts.zero_()
        self.kept = [[] for _ in self.kept]

    def indices(self) -> np.ndarray:
        return torch.stack([torch.cat(k) for k in self.kept]).numpy()  # [L, N, k]


class RouterLogits:
    """Keeps every layer's router logits (N, E) of the forwards run while attached, with their
    autograd graph, so that a per-layer auxiliary loss can be computed from them."""

    def __init__(self, model: Mixtral):
        self.model, self.logits, self._handles = model, [], []

    def __enter__(self):
        for block in self.model.blocks:
            self._handles.append(block.moe.hook_router_logits.register_forward_hook(
                lambda m, i, out: self.logits.append(out)))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()


# --------------------------------------------------------------------------------------------
# Training

LOSS_KEYS = ("total", "ce", "load_balancing", "load_balancing_per_layer", "z")


def objective(cfg: TrainConfig, loss, router_logits: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss that is minimised, and its parts as floats for the log.

    ``load_balancing`` is transformers' definition over all layers at once (the model's
    ``Loss``); ``load_balancing_per_layer`` the mean over layers of each layer's own
    ``E * sum_e f_e P_e``. Both equal top_k at perfect balance. ``cfg.load_balancing`` picks which
    one is optimised: "hf" adds ``coef * load_balancing``, "per_layer" ``coef * sum over layers``.
    """
    a = cfg.model
    per_layer = torch.stack([load_balancing_loss([lg], a.n_experts, a.top_k) for lg in router_logits])
    if cfg.load_balancing == "hf":
        total = loss.total
    else:
        total = loss.ce + a.router_aux_loss_coef * per_layer.sum()
        if a.router_z_loss_coef:
            total = total + a.router_z_loss_coef * loss.z
    parts = {"total": float(total.detach()), "ce": float(loss.ce.detach()),
             "load_balancing": float(loss.load_balancing.detach()),
             "load_balancing_per_layer": float(per_layer.detach().mean()), "z": float(loss.z.detach())}
    return total, parts


@dataclass
class TrainResult:
    model: Mixtral
    config: TrainConfig
    out_dir: Path | None
    step: int  # optimizer steps done
    tokens_seen: int
    wall_time_s: float  # training time of all sessions (resumes included)
    log: list[dict]
    final_eval: dict[str, float]  # held-out CE per domain (the evaluation windows)
    snapshots: dict  # steps [S], indices [S, L, N, k], probe tokens [N], probe domains [N]

    def records(self, type_: str) -> list[dict]:
        return [r for r in self.log if r.get("type") == type_]


@contextlib.contextmanager
def _torch_settings(cfg: TrainConfig):
    threads = torch.get_num_threads()
    det, warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(det, warn_only=warn)


def _autocast(cfg: TrainConfig, device: torch.device):
    if cfg.precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def make_optimizer(model: Mixtral, optim: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        is_embedding = name.startswith("tok_embeddings")
        if p.dim() < 2 or name.endswith("norm.weight") or (is_embedding and not optim.decay_embeddings):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kw = dict(lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps)
    try:
        return torch.optim.AdamW(groups, fused=device.type in ("cpu", "cuda"), **kw)
    except (RuntimeError, TypeError):  # older torch without a fused kernel for this device
        return torch.optim.AdamW(groups, **kw)


def _rng_state() -> dict:
    st = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict):
    torch.set_rng_state(st["torch"])
    np.random.set_state(st["numpy"])
    random.setstate(st["python"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def _atomic_torch_save(obj, path: Path):
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def spread(n: int, k: int) -> np.ndarray:
    """k indices evenly spread over range(n) (all of them when k >= n): a sample of held-out
    windows that is not just the first documents of the corpus."""
    if k >= n:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, k).round().astype(np.int64))


@torch.no_grad()
def evaluate_heldout(model: Mixtral, heldout: dict[str, np.ndarray], bos_id: int, batch_size: int = 8,
                     max_windows: int | None = None, autocast=None,
                     recorder: RoutingRecorder | None = None) -> tuple[dict[str, float], dict[str, list]]:
    """Held-out cross-entropy (nats per token) per domain, and expert load per domain [L][E]."""
    was_training = model.training
    model.eval()
    device = model.output.weight.device
    ce, load = {}, {}
    try:
        for d, windows in heldout.items():
            w = windows[spread(len(windows), max_windows)] if max_windows else windows
            total, n = 0.0, 0
            if recorder is not None:
                recorder.reset()
            for i in range(0, len(w), batch_size):
                x, y = inputs_targets(w[i:i + batch_size], bos_id)
                x, y = x.to(device), y.to(device)
                with autocast or contextlib.nullcontext():
                    logits = model(x)
                mask = y != IGNORE
                total += float(F.cross_entropy(logits.float()[mask], y[mask], reduction="sum"))
                n += int(mask.sum())
            ce[d] = total / max(n, 1)
            if recorder is not None:
                load[d] = recorder.shares()
    finally:
        model.train(was_training)
    return ce, load


@torch.no_grad()
def routing_snapshot(model: Mixtral, probe: torch.Tensor, autocast=None) -> np.ndarray:
    """Top-k experts chosen for every probe token in every layer: uint8 [L, N, k]."""
    was_training = model.training
    model.eval()
    try:
        with RoutingRecorder(model, keep=True) as rec, autocast or contextlib.nullcontext():
            model(probe.to(model.output.weight.device))
        return rec.indices()
    finally:
        model.train(was_training)


def train(config: TrainConfig | str | dict, out_dir: str | os.PathLike | None = None, *, corpus=None,
          tokenizer=None, progress: bool = True, max_steps: int | None = None, resume: bool = False,
          device: str | None = None) -> TrainResult:
    """Train (or resume) a run; see the module docstring.

    Args:
        config: a TrainConfig, or anything :func:`load_config` accepts.
        out_dir: run directory (log, checkpoint, token cache, router snapshots); None keeps
            everything in memory (no checkpoint, no resume).
        corpus: a :class:`moe_lab.corpus.Corpus` (anything with ``train``, ``heldout`` lists of
            documents with ``domain``/``id``/``text`` and ``domains``); None builds the one the
            config names.
        tokenizer: defaults to the Mixtral v1 tokenizer.
        max_steps: stop after this many optimizer steps in total (the learning-rate schedule still
            spans ``config.optim.steps``, so a later ``resume=True`` continues it exactly).
        resume: continue from ``out_dir/checkpoint.pt`` if it exists.
        device: overrides ``config.device``.
    """
    cfg = load_config(config)
    if device is not None:
        cfg = TrainConfig.from_dict({**cfg.to_dict(), "device": device})
    cfg.validate()
    dev = torch.device(cfg.device)
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    stop = min(cfg.optim.steps, max_steps) if max_steps is not None else cfg.optim.steps

    with _torch_settings(cfg):
        data = prepare_data(cfg, out, corpus, tokenizer, progress)
        torch.manual_seed(cfg.seed)
        model = Mixtral(cfg.model).to(dev).train()
        opt = make_optimizer(model, cfg.optim, dev)
        probe_np = np.concatenate([w[:cfg.data.probe_windows, :-1] for w in data.heldout.values()])
        probe = torch.as_tensor(probe_np, dtype=torch.long)
        probe_dom = np.repeat(np.arange(len(data.domains)), [min(cfg.data.probe_windows, len(w)) for w in data.heldout.values()])
        snapshots: dict[str, Any] = {"steps": [], "indices": []}
        log: list[dict] = []
        start, elapsed_before, resume_acc = 0, 0.0, None
        ckpt_path = out / CKPT_NAME if out is not None else None
        log_path = out / LOG_NAME if out is not None else None

        if resume and ckpt_path is not None and ckpt_path.exists():
            ck = torch.load(ckpt_path, map_location=dev, weights_only=False)
            if TrainConfig.from_dict(ck["config"]).to_dict() != cfg.to_dict():
                raise ValueError(f"{ckpt_path} was written with a different config; "
                                 "resume with the same config or start a new run directory")
            model.load_state_dict(ck["model"])
            opt.load_state_dict(ck["optimizer"])
            _set_rng_state(ck["rng"])
            start, elapsed_before = ck["step"], ck["elapsed_s"]
            resume_acc = (ck["log_acc"], ck["log_load_counts"])
            if log_path.exists():  # drop records written after the checkpoint
                for line in log_path.read_text().splitlines():
                    r = json.loads(line)
                    if r.get("step", 0) <= start:
                        log.append(r)
            snap_path = out / SNAPSHOT_NAME
            if snap_path.exists():
                z = np.load(snap_path)
                keep = z["steps"] <= start
                snapshots = {"steps": list(z["steps"][keep]), "indices": list(z["indices"][keep])}
            if start < stop:
                log.append({"type": "run", "event": "resume", "step": start, "time": time.time()})
        else:
            pc = count_params(cfg.model)
            log.append({"type": "run", "event": "start", "step": 0, "time": time.time(), "config": cfg.to_dict(),
                        "params_total": pc.total, "params_active": pc.active,
                        "train_tokens": data.token_data.n_tokens("train"),
                        "heldout_tokens": data.token_data.n_tokens("heldout"),
                        "train_windows": {d: len(w) for d, w in data.train.items()},
                        "heldout_windows": {d: len(w) for d, w in data.heldout.items()},
                        "corpus_fingerprint": data.token_data.fingerprint, "machine": machine_description(dev),
                        "torch": torch.__version__})
        if log_path is not None:
            log_path.write_text("".join(json.dumps(r) + "\n" for r in log))

        def write(record: dict):
            log.append(record)
            if log_path is not None:
                with log_path.open("a") as f:
                    f.write(json.dumps(record) + "\n")

        def snapshot(step: int):
            if cfg.snapshot_every <= 0 or (snapshots["steps"] and snapshots["steps"][-1] == step):
                return
            snapshots["steps"].append(step)
            snapshots["indices"].append(routing_snapshot(model, probe))  # fp32: small, and exact
            if out is not None:
                np.savez(out / SNAPSHOT_NAME, steps=np.array(snapshots["steps"]), indices=np.stack(snapshots["indices"]),
                         probe_tokens=probe_np, probe_domains=probe_dom, domains=np.array(data.domains))

        def evaluate(step: int) -> dict[str, float]:
            with RoutingRecorder(model) as rec:
                ce, load = evaluate_heldout(model, data.heldout, data.bos_id, cfg.optim.batch_size,
                                            cfg.data.eval_windows, None, rec)  # fp32
            write({"type": "eval", "step": step, "ce": ce, "ce_mean": float(np.mean(list(ce.values()))), "load": load})
            return ce

        def checkpoint(step: int, elapsed: float, acc: dict, load_counts: torch.Tensor):
            if ckpt_path is None:
                return
            # the partial averages of the current logging interval too, so a resumed run logs
            # exactly what an uninterrupted one would
            _atomic_torch_save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step,
                                "rng": _rng_state(), "config": cfg.to_dict(), "elapsed_s": elapsed,
                                "log_acc": dict(acc), "log_load_counts": load_counts.clone()}, ckpt_path)

        if start == 0:
            snapshot(0)
        tokens_per_step = cfg.optim.batch_size * cfg.data.seq_len
        from tqdm.auto import tqdm
        bar = tqdm(total=stop, initial=start, desc=cfg.name, unit="step", disable=not progress)
        t0 = time.time()
        last_ce: dict[str, float] = {}
        acc = {**{k: 0.0 for k in LOSS_KEYS}, "n": 0, "clipped": 0}
        if resume_acc is not None:
            acc = dict(resume_acc[0])
        t_log = time.time()
        try:
            with RoutingRecorder(model) as train_rec:
                if resume_acc is not None:
                    train_rec.counts.copy_(resume_acc[1])
                for step in range(start, stop):
                    lr = lr_at(step, cfg.optim)
                    for g in opt.param_groups:
                        g["lr"] = lr
                    x, y, _ = data.batch(step)
                    with _autocast(cfg, dev), RouterLogits(model) as router:
                        _, loss = model(x.to(dev), y.to(dev), return_logits=False)
                    total, parts = objective(cfg, loss, router.logits)
                    opt.zero_grad(set_to_none=True)
                    total.backward()
                    if cfg.optim.grad_clip > 0:
                        gn = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip))
                    else:
                        gn = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None])))
                    opt.step()
                    done = step + 1
                    for k in LOSS_KEYS:
                        acc[k] += parts[k]
                    acc["n"] += 1
                    acc["clipped"] += int(cfg.optim.grad_clip > 0 and gn > cfg.optim.grad_clip)
                    bar.update(1)
                    bar.set_postfix(loss=f"{parts['total']:.3f}", lr=f"{lr:.2e}", refresh=False)
                    # log at interval boundaries and at the schedule's end (not at an early stop:
                    # the partial interval is checkpointed and logged by the resumed run)
                    if done % cfg.log_every == 0 or done == cfg.optim.steps:
                        n = acc.pop("n")
                        now = time.time()
                        write({"type": "train", "step": done, "tokens": done * tokens_per_step, "lr": lr,
                               **{k: acc[k] / n for k in LOSS_KEYS},
                               "grad_norm": gn, "clipped_frac": acc["clipped"] / n,
                               "tokens_per_s": n * tokens_per_step / max(now - t_log, 1e-9),
                               "elapsed_s": elapsed_before + now - t0, "load": train_rec.shares()})
                        acc = {**{k: 0.0 for k in LOSS_KEYS}, "n": 0, "clipped": 0}
                        t_log = now
                        train_rec.reset()
                    train_rec.enabled = False  # evaluations and snapshots are not training load
                    if done % cfg.eval_every == 0 or done == stop:
                        last_ce = evaluate(done)
                        bar.set_postfix(loss=f"{parts['total']:.3f}", heldout=f"{np.mean(list(last_ce.values())):.3f}")
                    if cfg.snapshot_every > 0 and (done % cfg.snapshot_every == 0 or done == stop):
                        snapshot(done)
                    if done == stop or (cfg.checkpoint_every > 0 and done % cfg.checkpoint_every == 0):
                        checkpoint(done, elapsed_before + time.time() - t0, acc, train_rec.counts)
                    train_rec.enabled = True
        finally:
            bar.close()
        if start >= stop:  # nothing to do: the run had already reached ``stop``
            evals = [r for r in log if r.get("type") == "eval" and r["step"] == stop]
            last_ce = evals[-1]["ce"] if evals else evaluate(stop)
            elapsed = elapsed_before
        else:
            elapsed = elapsed_before + time.time() - t0
            write({"type": "run", "event": "stop", "step": stop, "time": time.time(), "elapsed_s": elapsed,
                   "tokens": stop * tokens_per_step})
    snaps = {"steps": np.array(snapshots["steps"]),
             "indices": np.stack(snapshots["indices"]) if snapshots["indices"] else np.zeros((0,)),
             "probe_tokens": probe_np, "probe_domains": probe_dom, "domains": list(data.domains)}
    model.eval()
    return TrainResult(model=model, config=cfg, out_dir=out, step=stop, tokens_seen=stop * tokens_per_step,
                       wall_time_s=elapsed, log=log, final_eval=last_ce, snapshots=snaps)


def machine_description(device: torch.device | str = "cpu") -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA)"
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{cpu}, {os.cpu_count()} logical CPUs, {torch.get_num_threads()} torch threads"


def read_log(path: str | os.PathLike) -> list[dict]:
    """The records of a ``training_log.jsonl`` (a file, or a run directory holding one)."""
    p = Path(path)
    if p.is_dir():
        p = p / LOG_NAME
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


# --------------------------------------------------------------------------------------------
# Routing analyses used by the evaluation


def router_saturation(snapshot_indices: np.ndarray) -> np.ndarray:
    """OLMoE router saturation: for every snapshot s and layer l, the mean over probe tokens of
    |topk_s ∩ topk_final| / k. ``snapshot_indices`` [S, L, N, k] -> [S, L]."""
    idx = np.asarray(snapshot_indices).astype(np.int64)
    S, L, N, k = idx.shape
    E = int(idx.max()) + 1
    onehot = np.zeros((S, L, N, E), dtype=bool)
    np.put_along_axis(onehot, idx, True, axis=-1)
    return (onehot & onehot[-1:]).sum(-1).mean(-1) / k


def load_summary(shares: np.ndarray) -> dict:
    """Summaries of expert shares [L, E] (rows sum to 1): min, max, CV, normalised entropy."""
    s = np.asarray(shares, dtype=np.float64)
    ent = -(np.where(s > 0, s * np.log(np.where(s > 0, s, 1)), 0)).sum(-1) / np.log(s.shape[-1])
    return {"min": s.min(-1).tolist(), "max": s.max(-1).tolist(),
            "cv": (s.std(-1) / s.mean(-1)).tolist(), "entropy": ent.tolist()}


def consecutive_repetition(first: np.ndarray, doc_ids: np.ndarray, n_experts: int, n_boot: int = 1000,
                           seed: int = 0, topk: np.ndarray | None = None) -> dict:
    """Same-first-expert rate of consecutive tokens within documents, with baselines.

    ``first`` [N] first-choice expert of each token (BOS already removed), ``doc_ids`` [N] in
    order (consecutive tokens of a document are adjacent). Returns the rate, the uniform baseline
    1/E, the marginal baseline sum_e p_e^2 (p_e: first-choice shares), and a document-level
    bootstrap 95% interval of the rate and of (rate - marginal). With ``topk`` [N, k] also the
    any-overlap rate (top-k sets intersect) and its uniform baseline 1 - C(E-k, k) / C(E, k).
    """
    first = np.asarray(first)
    doc_ids = np.asarray(doc_ids)
    pair = doc_ids[1:] == doc_ids[:-1]
    same = (first[1:] == first[:-1]) & pair
    docs, doc_index = np.unique(doc_ids, return_inverse=True)
    D = len(docs)
    same_d = np.bincount(doc_index[1:][pair], weights=same[pair], minlength=D)
    pairs_d = np.bincount(doc_index[1:][pair], minlength=D).astype(np.float64)
    counts_d = np.zeros((D, n_experts))
    np.add.at(counts_d, (doc_index, first), 1)
    rate = same_d.sum() / pairs_d.sum() if pairs_d.sum() else float("nan")
    shares = counts_d.sum(0) / counts_d.sum()
    marginal = float((shares ** 2).sum())
    rng = np.random.default_rng(seed)
    W = rng.multinomial(D, np.full(D, 1.0 / D), size=n_boot).astype(np.float64)  # [R, D]
    b_rate = (W @ same_d) / np.maximum(W @ pairs_d, 1)
    b_counts = W @ counts_d
    b_shares = b_counts / b_counts.sum(1, keepdims=True)
    b_diff = b_rate - (b_shares ** 2).sum(1)
    out = {"rate": float(rate), "uniform": 1.0 / n_experts, "marginal": marginal,
           "ci": np.percentile(b_rate, [2.5, 97.5]).tolist(),
           "diff_ci": np.percentile(b_diff, [2.5, 97.5]).tolist(),
           "n_pairs": int(pairs_d.sum()), "n_docs": int(D)}
    out["above_marginal"] = bool(out["diff_ci"][0] > 0)
    if topk is not None:
        k = topk.shape[1]
        a, b = topk[1:], topk[:-1]
        overlap = (a[:, :, None] == b[:, None, :]).any(-1).any(-1) & pair
        out["any_rate"] = float(overlap.sum() / pair.sum())
        out["any_uniform"] = 1.0 - math.comb(n_experts - k, k) / math.comb(n_experts, k)
    return out


# --------------------------------------------------------------------------------------------
# Evaluation of a trained model (the model card is written from this)


def unigram_baseline(token_data: TokenData, heldout: dict[str, np.ndarray], vocab_size: int) -> dict[str, float]:
    """Per domain: cross-entropy on the held-out targets of the unigram model of that domain's
    training tokens, add-one smoothed over the whole vocabulary (BOS neither counted nor scored)."""
    out = {}
    bos = token_data.bos_id
    for d, w in heldout.items():
        logp = unigram_logprobs(token_data, d, vocab_size)
        y = w[:, 1:].reshape(-1)
        y = y[y != bos]
        out[d] = float(-logp[y].mean())
    return out


def unigram_logprobs(token_data: TokenData, domain: str, vocab_size: int) -> np.ndarray:
    """[V] log-probabilities of the add-one smoothed unigram model of ``domain``'s training tokens (BOS left out)."""
    train = token_data.tokens["train"][domain].astype(np.int64)
    counts = np.bincount(train[train != token_data.bos_id], minlength=vocab_size).astype(np.float64) + 1.0
    return np.log(counts / counts.sum())


def classify_domain(ids, logprobs: dict[str, np.ndarray]) -> str:
    """The domain whose unigram model gives ``ids`` the highest likelihood (naive Bayes, equal priors):
    an objective stand-in for "a reader would recognise this text as that domain"."""
    ids = np.asarray(ids, dtype=np.int64)
    return max(logprobs, key=lambda d: float(logprobs[d][ids].sum()))


IN_DOMAIN_CHECK = ("python", "math")  # the domains whose greedy samples the quality bar checks


DEFAULT_PROMPTS = {
    "python": "def fibonacci(n):\n",
    "math": "Question: What is 17 + 25?\nAnswer:",
}


@torch.no_grad()
def greedy_samples(model: Mixtral, tokenizer, token_data: TokenData, prompt_tokens: int = 24,
                   new_tokens: int = 48, extra_prompts: dict[str, str] | None = None) -> list[dict]:
    """Greedy continuation of the start of the first held-out document of each domain (and of
    ``extra_prompts``, by default a code and a math prompt)."""
    out = []
    prompts = []
    for d in token_data.domains:
        doc = token_data.documents("heldout", d)[0]
        prompts.append((d, "held-out document start", doc[:prompt_tokens].astype(np.int64).tolist()))
    for d, text in (DEFAULT_PROMPTS if extra_prompts is None else extra_prompts).items():
        prompts.append((d, "hand-written", tokenizer.encode(text, bos=True)))
    for d, kind, ids in prompts:
        ids = ids[:model.args.max_seq_len // 2]
        n_new = min(new_tokens, model.args.max_seq_len - len(ids))
        new = model.generate([ids], max_new_tokens=n_new, temperature=0.0)[0, len(ids):].tolist()
        out.append({"domain": d, "kind": kind, "prompt": tokenizer.decode(ids), "continuation": tokenizer.decode(new),
                    "continuation_ids": new})
    return out


@torch.no_grad()
def routing_on_documents(model: Mixtral, token_data: TokenData, max_docs: int = 64, max_len: int = 256,
                         batch_size: int = 8) -> dict:
    """Top-k experts of every held-out token (documents truncated to ``max_len``, up to
    ``max_docs`` per domain spread over the held-out set), BOS removed: indices [L, N, k], doc_ids [N], domain index [N]."""
    device = model.output.weight.device
    idx_all, doc_all, dom_all, tok_all = [], [], [], []
    doc_counter = 0
    for di, d in enumerate(token_data.domains):
        all_docs = token_data.documents("heldout", d)
        docs = [all_docs[i][:max_len].astype(np.int64) for i in spread(len(all_docs), max_docs)]
        docs = [x for x in docs if len(x) >= 3]
        for i in range(0, len(docs), batch_size):
            chunk = docs[i:i + batch_size]
            T = max(len(x) for x in chunk)
            x = torch.zeros(len(chunk), T, dtype=torch.long)
            for b, doc in enumerate(chunk):
                x[b, :len(doc)] = torch.as_tensor(doc)  # right padding: causal, so real tokens never see it
            with RoutingRecorder(model, keep=True) as rec:
                model(x.to(device))
            idx = rec.indices().reshape(len(model.blocks), len(chunk), T, -1)
            for b, doc in enumerate(chunk):
                n = len(doc)
                idx_all.append(idx[:, b, 1:n])  # drop BOS
                doc_all.append(np.full(n - 1, doc_counter))
                dom_all.append(np.full(n - 1, di))
                tok_all.append(doc[1:n])
                doc_counter += 1
    return {"indices": np.concatenate(idx_all, 1), "doc_ids": np.concatenate(doc_all),
            "domains": np.concatenate(dom_all), "tokens": np.concatenate(tok_all)}


@torch.no_grad()
def evaluate_model(model: Mixtral, token_data: TokenData, tokenizer, *, seq_len: int = 256,
                   eval_tokens_per_domain: int | None = None, n_boot: int = 1000, seed: int = 0,
                   samples: bool = True, max_docs: int = 64) -> dict:
    """Everything the model card reports, as a JSON-able dict (see :func:`quality_bar`)."""
    model = model.float().eval()
    T = seq_len
    max_windows = max(1, eval_tokens_per_domain // T) if eval_tokens_per_domain else None
    heldout = {d: pack_windows(token_data, "heldout", d, T, max_windows=max_windows) for d in token_data.domains}
    ce, _ = evaluate_heldout(model, heldout, token_data.bos_id)
    uni = unigram_baseline(token_data, heldout, model.args.vocab_size)
    r = routing_on_documents(model, token_data, max_docs=max_docs, max_len=T)
    L, E = r["indices"].shape[0], model.args.n_experts
    shares = np.stack([np.bincount(r["indices"][l].reshape(-1), minlength=E) for l in range(L)]).astype(np.float64)
    shares /= shares.sum(1, keepdims=True)
    by_domain = {}
    for di, d in enumerate(token_data.domains):
        m = r["domains"] == di
        s = np.stack([np.bincount(r["indices"][l][m].reshape(-1), minlength=E) for l in range(L)]).astype(np.float64)
        by_domain[d] = (s / s.sum(1, keepdims=True)).tolist()
    rep = [consecutive_repetition(r["indices"][l][:, 0], r["doc_ids"], E, n_boot=n_boot, seed=seed + l,
                                  topk=r["indices"][l]) for l in range(L)]
    report = {
        "heldout_ce": ce, "unigram_ce": uni, "ce_ratio": {d: ce[d] / uni[d] for d in ce},
        "heldout_tokens_scored": {d: int((heldout[d][:, 1:] != token_data.bos_id).sum()) for d in heldout},
        "load": shares.tolist(), "load_by_domain": by_domain, "load_summary": load_summary(shares),
        "repetition": rep, "routing_tokens": int(r["indices"].shape[1]), "routing_docs": int(r["doc_ids"].max() + 1),
        "n_layers": L, "n_experts": E, "top_k": model.args.top_k, "n_boot": n_boot,
    }
    if samples:
        report["samples"] = greedy_samples(model, tokenizer, token_data)
        logprobs = {d: unigram_logprobs(token_data, d, model.args.vocab_size) for d in token_data.domains}
        for smp in report["samples"]:
            smp["classified_as"] = classify_domain(smp["continuation_ids"], logprobs)
    report["quality_bar"] = quality_bar(report)
    return report


def quality_bar(report: dict) -> dict:
    """The demo model's acceptance criteria, each with its verdict. Greedy samples being in-domain
    is checked with :func:`classify_domain` on the code and math samples (``IN_DOMAIN_CHECK``
    domains the corpus has); a reader of the card should still look at them."""
    ratios = report["ce_ratio"]
    shares = np.asarray(report["load"])
    above = [r["above_marginal"] for r in report["repetition"]]
    bar = {
        "ce_at_most_70pct_of_unigram": {"pass": all(v <= 0.70 for v in ratios.values()),
                                        "worst": max(ratios, key=ratios.get), "worst_ratio": max(ratios.values())},
        "load_between_2_and_40pct": {"pass": bool(shares.min() >= 0.02 and shares.max() <= 0.40),
                                     "min": float(shares.min()), "max": float(shares.max())},
        "repetition_above_marginal_in_half_the_layers": {"pass": sum(above) >= len(above) / 2,
                                                         "layers_above": [i for i, a in enumerate(above) if a]},
    }
    checked = [x for x in report.get("samples", []) if x["domain"] in IN_DOMAIN_CHECK and "classified_as" in x
               and x["domain"] in report["ce_ratio"]]
    if checked:
        bar["code_math_samples_in_domain"] = {
            "pass": all(x["classified_as"] == x["domain"] for x in checked),
            "in_domain": {d: f"{sum(x['classified_as'] == d for x in checked if x['domain'] == d)}/"
                             f"{sum(x['domain'] == d for x in checked)}" for d in dict.fromkeys(x["domain"] for x in checked)}}
    bar["all_pass"] = all(v["pass"] for v in bar.values())
    return bar


def _fmt_row(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def write_model_card(report: dict, path: str | os.PathLike, *, config: TrainConfig, command: str,
                     run_info: dict, corpus_stats: dict | None = None, files: dict | None = None) -> Path:
    """Render ``report`` (from :func:`evaluate_model`) and the run's facts as MODEL_CARD.md."""
    cfg = config
    a = cfg.model
    pc = count_params(a)
    L, E = report["n_layers"], report["n_experts"]
    lines = [
        "# tiny-mixtral", "",
        "A Mixtral-architecture sparse mixture-of-experts language model trained from scratch by moe_lab on its "
        "own multi-domain corpus, so that the routing the notebooks look at is learned, not random. "
        "It is a teaching artefact: tiny, trained for minutes on a CPU, and not useful as a language model.",
        "", "This file is generated by `python -m moe_lab.train export` (from `moe_lab.train.evaluate_model` and "
        "`write_model_card`); do not edit it by hand.", "",
        "## Reproduce", "", "```bash", command, "```", "",
        "## Architecture", "",
        f"Mixtral: {a.n_layers} layers, dim {a.dim}, {a.n_heads} query heads / {a.n_kv_heads} key-value heads "
        f"(grouped-query attention), head_dim {a.head_dim}, {a.n_experts} SwiGLU experts per layer with hidden size "
        f"{a.hidden_dim}, top-{a.top_k} routing (softmax over all experts, renormalised over the chosen), RoPE theta "
        f"{a.rope_theta:g}, RMSNorm, untied input/output embeddings, vocabulary {a.vocab_size} "
        f"(the real Mixtral v1 SentencePiece tokenizer, so token ids mean the same as in Mixtral 8x7B). "
        f"Parameters: {pc.total / 1e6:.2f} M total, {pc.active / 1e6:.2f} M active per token. "
        f"Stored in bf16, Hugging Face layout (`config.json` + `model.safetensors`).", "",
        "## Training", "",
        (f"- Objective: next-token cross-entropy + {a.router_aux_loss_coef} x load-balancing loss (transformers' "
         f"definition, over all layers' router logits at once) + {a.router_z_loss_coef} x router z-loss."
         if cfg.load_balancing == "hf" else
         f"- Objective: next-token cross-entropy + {a.router_aux_loss_coef} x the load-balancing loss "
         f"E * sum_e f_e P_e computed **per layer** and summed over the {a.n_layers} layers (as Switch Transformer "
         f"and GShard add it to each MoE layer) + {a.router_z_loss_coef} x router z-loss. Not transformers' "
         f"definition, which pools all layers' router logits before computing f and P: with it, an expert index "
         f"overloaded in one layer can be offset by the same index underloaded in another, and in a first attempt "
         f"at this run one expert of layer 2 was taking part in almost every token after 100 steps. "
         f"`config.json` still carries router_aux_loss_coef={a.router_aux_loss_coef} for transformers."),
        f"- AdamW (betas {tuple(cfg.optim.betas)}, eps {cfg.optim.eps}, weight decay {cfg.optim.weight_decay} on "
        f"matrices except the input embeddings), lr {cfg.optim.lr} with {cfg.optim.warmup_steps} warm-up steps "
        f"then cosine to {cfg.optim.min_lr}, gradient-norm clipping at {cfg.optim.grad_clip}, "
        f"precision {cfg.precision} ({'bf16 autocast, fp32 weights and optimizer state' if cfg.precision == 'bf16' else 'fp32'}).",
        f"- {run_info['steps']} steps x {cfg.optim.batch_size} sequences x {cfg.data.seq_len} tokens = "
        f"**{run_info['tokens']:,} tokens seen**; seed {cfg.seed}; each sequence comes from one domain, "
        + (("domains drawn with probabilities proportional to the weights "
            + ", ".join(f"{d} {w:g}" for d, w in cfg.data.domain_weights.items()) + ".")
           if cfg.data.domain_weights and cfg.data.domain_alpha == 0 else
           ("domains drawn uniformly." if cfg.data.domain_alpha == 0 else
            f"domains drawn with probability ~ weight x (training windows)^{cfg.data.domain_alpha} "
            f"(weights {cfg.data.domain_weights or 'all 1'}).")),
        f"- Wall time: **{run_info['wall_time_s'] / 60:.1f} min** on {run_info['machine']} "
        f"(torch {run_info.get('torch', torch.__version__)}; the machine was shared with other jobs, so "
        f"throughput, about {run_info.get('tokens_per_s', 0):.0f} tokens/s on average, varied)."
        + (" One torch thread on purpose: on the shared 2-core machine, two threads spent most of their time "
           "spin-waiting for each other and made steps several times slower." if cfg.num_threads == 1 else ""),
        "- `training_log.jsonl` holds the losses and per-layer expert load every "
        f"{cfg.log_every} steps and the held-out loss and expert load per domain every {cfg.eval_every} steps; "
        "`router_snapshots.npz` the top-k choices for fixed held-out probe tokens at regular steps.", "",
    ]
    if corpus_stats:
        lines += ["## Corpus", "",
                  f"Built by `python -m moe_lab.corpus` (size `{cfg.data.corpus_size}`, seed {cfg.data.corpus_seed}); "
                  "sources and licences are in `data/DATA_CARD.md`. Token counts with the Mixtral tokenizer:", "",
                  _fmt_row(["domain", "train docs", "train tokens", "held-out docs", "held-out tokens", "sources"]),
                  _fmt_row(["---"] * 6)]
        for d, s in corpus_stats.items():
            lines.append(_fmt_row([d, f"{s['train_docs']:,}", f"{s['train_tokens']:,}", f"{s['heldout_docs']:,}",
                                   f"{s['heldout_tokens']:,}", s.get("sources", "")]))
        lines.append("")
    lines += ["## Held-out cross-entropy", "",
              "Nats per token on the held-out documents of each domain (packed into windows of "
              f"{cfg.data.seq_len} tokens as in training; BOS targets not scored), next to the unigram baseline: "
              f"the domain's training-token frequencies with add-one smoothing over the {a.vocab_size:,}-token "
              "vocabulary, scored on the same held-out tokens.", "",
              _fmt_row(["domain", "tokens scored", "model CE", "unigram CE", "ratio", "bar (<= 0.70)"]),
              _fmt_row(["---"] * 6)]
    for d, v in report["heldout_ce"].items():
        ratio = report["ce_ratio"][d]
        lines.append(_fmt_row([d, f"{report['heldout_tokens_scored'][d]:,}", f"{v:.3f}",
                               f"{report['unigram_ce'][d]:.3f}", f"{ratio:.2f}", "pass" if ratio <= 0.70 else "**fail**"]))
    lines += ["", "## Expert load (held-out)", "",
              f"Share of the top-{report['top_k']} assignments going to each expert, per layer, over "
              f"{report['routing_tokens']:,} held-out tokens ({report['routing_docs']} documents, BOS excluded). "
              f"Uniform is {1 / E:.3f}.", "",
              _fmt_row(["layer"] + [f"e{e}" for e in range(E)] + ["min", "max", "CV", "norm. entropy"]),
              _fmt_row(["---"] * (E + 5))]
    ls = report["load_summary"]
    for l, row in enumerate(report["load"]):
        lines.append(_fmt_row([l] + [f"{x:.3f}" for x in row] + [f"{ls['min'][l]:.3f}", f"{ls['max'][l]:.3f}",
                                                                 f"{ls['cv'][l]:.2f}", f"{ls['entropy'][l]:.3f}"]))
    lines += ["", "Most-used expert per domain and layer (its share of that domain's assignments):", "",
              _fmt_row(["domain"] + [f"L{l}" for l in range(L)]), _fmt_row(["---"] * (L + 1))]
    for d, rows in report["load_by_domain"].items():
        lines.append(_fmt_row([d] + [f"e{int(np.argmax(r))} ({max(r):.2f})" for r in rows]))
    rep = report["repetition"]
    lines += ["", "## Consecutive tokens routed to the same expert", "",
              "Within documents, BOS excluded (the Mixtral paper's Table 5, computed as recommended in "
              "`mixtral-facts.md`): how often token i+1 gets the same first-choice expert as token i, against the "
              "uniform baseline 1/E and the marginal baseline sum_e p_e^2 (p_e: first-choice shares in that layer); "
              f"95% intervals from {report.get('n_boot', 1000)} bootstrap resamples of documents. 'any' is the top-2 sets overlapping "
              f"(uniform {rep[0].get('any_uniform', float('nan')):.3f}).", "",
              _fmt_row(["layer", "same first", "95% CI", "uniform", "marginal", "rate - marginal 95% CI",
                        "above marginal", "any overlap"]), _fmt_row(["---"] * 8)]
    for l, r in enumerate(rep):
        lines.append(_fmt_row([l, f"{r['rate']:.3f}", f"[{r['ci'][0]:.3f}, {r['ci'][1]:.3f}]", f"{r['uniform']:.3f}",
                               f"{r['marginal']:.3f}", f"[{r['diff_ci'][0]:+.3f}, {r['diff_ci'][1]:+.3f}]",
                               "yes" if r["above_marginal"] else "no", f"{r.get('any_rate', float('nan')):.3f}"]))
    if report.get("samples"):
        lines += ["", "## Greedy samples", "",
                  "Greedy continuations (48 new tokens) of the first 24 tokens of each domain's first held-out "
                  "document, and of two hand-written prompts. Shown verbatim (fenced).", ""]
        for s in report["samples"]:
            lines += [f"**{s['domain']}** ({s['kind']}; the continuation reads as: {s.get('classified_as', '?')}):", "",
                      "```text", s["prompt"] + "⟦" + s["continuation"] + "⟧", "```", ""]
        lines += ["(⟦ ⟧ marks the generated part. 'Reads as': the domain whose unigram model (training tokens, "
                  "add-one smoothed) gives the continuation the highest likelihood.)", ""]
    qb = report["quality_bar"]
    lines += ["## Quality bar", "",
              _fmt_row(["criterion", "result", "detail"]), _fmt_row(["---"] * 3),
              _fmt_row(["held-out CE <= 70% of the unigram CE in every domain",
                        "pass" if qb["ce_at_most_70pct_of_unigram"]["pass"] else "**fail**",
                        f"worst: {qb['ce_at_most_70pct_of_unigram']['worst']} "
                        f"({qb['ce_at_most_70pct_of_unigram']['worst_ratio']:.2f})"]),
              _fmt_row(["every expert 2%-40% of the assignments in every layer",
                        "pass" if qb["load_between_2_and_40pct"]["pass"] else "**fail**",
                        f"min {qb['load_between_2_and_40pct']['min']:.3f}, max {qb['load_between_2_and_40pct']['max']:.3f}"]),
              _fmt_row(["same-first-expert rate above marginal (CI excludes it) in >= half the layers",
                        "pass" if qb["repetition_above_marginal_in_half_the_layers"]["pass"] else "**fail**",
                        f"layers {qb['repetition_above_marginal_in_half_the_layers']['layers_above']} of {L}"])]
    c = qb.get("code_math_samples_in_domain")
    verdict = ("see the samples above", "judged by eye") if c is None else (
        "pass" if c["pass"] else "**fail**",
        ", ".join(f"{d} {v}" for d, v in c["in_domain"].items()) + " read as their own domain "
        f"(unigram classifier over the {len(report['ce_ratio'])} domains); see the samples above")
    lines += [_fmt_row(["greedy code and math continuations in-domain", *verdict]), ""]
    if files:
        lines += ["## Files", "", _fmt_row(["file", "bytes"]), _fmt_row(["---"] * 2)]
        lines += [_fmt_row([f"`{k}`", f"{v:,}"]) for k, v in files.items()]
        lines.append("")
    if run_info.get("hf_check"):
        lines += ["## Loading check", "", run_info["hf_check"], ""]
    p = Path(path)
    p.write_text("\n".join(lines))
    return p


# --------------------------------------------------------------------------------------------
# Export


def save_hf_checkpoint(model: Mixtral, path: str | os.PathLike, dtype: torch.dtype = torch.bfloat16) -> list[Path]:
    """Write ``config.json`` + ``model.safetensors`` (Hugging Face layout, ``dtype``) into ``path``,
    leaving other files there alone. Returns the files written."""
    import copy

    from .checkpoints.loading import save_model

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    m = copy.deepcopy(model).to(dtype)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        save_model(m, Path(tmp) / "ckpt", layout="hf")
        written = []
        for f in sorted((Path(tmp) / "ckpt").iterdir()):
            shutil.move(str(f), path / f.name)
            (path / f.name).chmod(0o644)  # the temporary files are private (0600)
            written.append(path / f.name)
    return written


@torch.no_grad()
def check_against_transformers(path: str | os.PathLike, tokens: torch.Tensor) -> dict:
    """Logits of ``moe_lab.load_model(path)`` vs ``transformers.MixtralForCausalLM.from_pretrained(path)``
    (both in fp32 from the bf16 file)."""
    from transformers import MixtralForCausalLM

    from .checkpoints.loading import load_model

    ours = load_model(path, dtype=torch.float32).eval()
    hf = MixtralForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    a = ours(tokens)
    b = hf(tokens).logits
    diff = float((a - b).abs().max())
    return {"max_abs_diff": diff, "max_abs_logit": float(a.abs().max()),
            "argmax_agree": float((a.argmax(-1) == b.argmax(-1)).float().mean())}


def corpus_token_stats(token_data: TokenData, corpus=None) -> dict:
    stats = {}
    for d in token_data.domains:
        row = {"train_docs": len(token_data.starts["train"][d]), "train_tokens": int(len(token_data.tokens["train"][d])),
               "heldout_docs": len(token_data.starts["heldout"][d]),
               "heldout_tokens": int(len(token_data.tokens["heldout"][d]))}
        srcs = (getattr(corpus, "meta", {}) or {}).get("sources", {}).get(d) if corpus is not None else None
        if srcs:
            names = sorted(srcs, key=lambda k: -srcs[k].get("chars", 0))  # biggest first
            shown = "; ".join(f"{k} ({srcs[k].get('license', '?')})" for k in names[:3])
            more = len(names) - 3
            row["sources"] = shown + (f"; and {more} smaller sources (see the data card)" if more > 0 else "")
        stats[d] = row
    return stats


def export_run(run_dir: str | os.PathLike, out: str | os.PathLike, *, command: str | None = None,
               n_boot: int = 1000, progress: bool = True, corpus=None, tokenizer=None,
               eval_tokens_per_domain: int | None = None, max_docs: int = 64) -> dict:
    """Checkpoint of a finished run -> HF-layout bf16 model in ``out`` with the training log, router
    snapshots, ``evaluation.json`` and ``MODEL_CARD.md`` (evaluated on the exported bf16 weights,
    on every held-out token unless ``eval_tokens_per_domain`` caps it)."""
    from .checkpoints.loading import load_model
    from .tokenizer import load_tokenizer

    run, out = Path(run_dir), Path(out)
    ck = torch.load(run / CKPT_NAME, map_location="cpu", weights_only=False)
    cfg = TrainConfig.from_dict(ck["config"])
    model = Mixtral(cfg.model)
    model.load_state_dict(ck["model"])
    out.mkdir(parents=True, exist_ok=True)
    save_hf_checkpoint(model, out)
    for name in (LOG_NAME, SNAPSHOT_NAME):
        if (run / name).exists():
            shutil.copy(run / name, out / name)
    tok = tokenizer or load_tokenizer()
    corpus = corpus if corpus is not None else get_corpus(cfg.data, progress=progress)
    td = tokenize_corpus(corpus, tok, run / "tokens", cfg.data.domains, progress)
    shipped = load_model(out, dtype=torch.float32)
    report = evaluate_model(shipped, td, tok, seq_len=cfg.data.seq_len,
                            eval_tokens_per_domain=eval_tokens_per_domain, n_boot=n_boot, seed=cfg.seed,
                            max_docs=max_docs)
    probe = torch.as_tensor(pack_windows(td, "heldout", td.domains[0], 64, max_windows=2)[:, :-1])
    hf = check_against_transformers(out, probe)
    report["transformers_check"] = hf
    log = read_log(run)
    stops = [r for r in log if r.get("type") == "run" and r.get("event") == "stop"]
    starts = [r for r in log if r.get("type") == "run" and r.get("event") == "start"]
    trains = [r for r in log if r.get("type") == "train"]
    run_info = {"steps": ck["step"], "tokens": ck["step"] * cfg.optim.batch_size * cfg.data.seq_len,
                "wall_time_s": stops[-1]["elapsed_s"] if stops else ck["elapsed_s"],
                "machine": starts[0]["machine"] if starts else machine_description(),
                "torch": starts[0].get("torch") if starts else torch.__version__,
                "tokens_per_s": (ck["step"] * cfg.optim.batch_size * cfg.data.seq_len) / max(ck["elapsed_s"], 1e-9),
                "hf_check": (f"`moe_lab.load_model` and `transformers.MixtralForCausalLM.from_pretrained` on this "
                             f"directory (fp32 compute from the bf16 file), 2 x 64 held-out tokens: max |logit "
                             f"difference| {hf['max_abs_diff']:.2e} (logits up to {hf['max_abs_logit']:.1f}); "
                             f"argmax agreement {hf['argmax_agree']:.3f}.")}
    report["run"] = run_info
    (out / "evaluation.json").write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    files = {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.name != "MODEL_CARD.md"}
    corpus_dir = cfg.data.corpus_dir or "data/corpus"
    command = command or (f"python -m moe_lab.corpus --out {corpus_dir} --size {cfg.data.corpus_size} "
                          f"--seed {cfg.data.corpus_seed}   # optional: the trainer builds it if missing\n"
                          f"python -m moe_lab.train --config configs/{cfg.name}.json --out runs/{cfg.name}\n"
                          f"python -m moe_lab.train export --run runs/{cfg.name} --out data/{cfg.name}")
    write_model_card(report, out / "MODEL_CARD.md", config=cfg, command=command, run_info=run_info,
                     corpus_stats=corpus_token_stats(td, corpus), files=files)
    return report


# --------------------------------------------------------------------------------------------
# Command line


def _train_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m moe_lab.train",
                                description="Train a Mixtral-architecture MoE on the moe_lab corpus. "
                                            "Subcommands: 'export' and 'evaluate' (see --help of each).")
    p.add_argument("--config", required=True, help="a JSON config file, a config name in configs/, or a model preset")
    p.add_argument("--out", help="run directory (default runs/<config name>)")
    p.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.pt")
    p.add_argument("--device", help="cpu (default from the config) or cuda")
    p.add_argument("--max-steps", type=int, help="stop after this many steps (the schedule keeps its length)")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    cfg = load_config(a.config)
    out = a.out or str(REPO_ROOT / "runs" / cfg.name)
    res = train(cfg, out, progress=not a.no_progress, max_steps=a.max_steps, resume=a.resume, device=a.device)
    print(json.dumps({"step": res.step, "tokens_seen": res.tokens_seen, "wall_time_s": round(res.wall_time_s, 1),
                      "heldout_ce": res.final_eval, "out": str(res.out_dir)}, indent=1))
    return 0


def _export_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m moe_lab.train export",
                                description="Write a finished run as an HF-layout bf16 model with its evaluation and model card.")
    p.add_argument("--run", required=True, help="run directory holding checkpoint.pt")
    p.add_argument("--out", required=True, help="output directory, e.g. data/tiny-mixtral")
    p.add_argument("--n-boot", type=int, default=1000)
    a = p.parse_args(argv)
    report = export_run(a.run, a.out, n_boot=a.n_boot)
    print(json.dumps({"ce_ratio": report["ce_ratio"], "quality_bar": report["quality_bar"]}, indent=1))
    return 0


def _evaluate_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m moe_lab.train evaluate",
                                description="Evaluate a saved model on the held-out corpus (JSON report on stdout).")
    p.add_argument("--model", required=True, help="checkpoint directory (any layout moe_lab.load_model reads)")
    p.add_argument("--config", required=True, help="the training config (names the corpus and seq_len)")
    p.add_argument("--cache", help="token cache directory (e.g. runs/<name>/tokens)")
    p.add_argument("--n-boot", type=int, default=1000)
    p.add_argument("--no-samples", action="store_true")
    p.add_argument("--eval-tokens", type=int, help="held-out tokens per domain to score (default: all)")
    a = p.parse_args(argv)
    from .checkpoints.loading import load_model
    from .tokenizer import load_tokenizer

    cfg = load_config(a.config)
    tok = load_tokenizer()
    td = tokenize_corpus(get_corpus(cfg.data), tok, a.cache, cfg.data.domains)
    report = evaluate_model(load_model(a.model, dtype=torch.float32), td, tok, seq_len=cfg.data.seq_len,
                            eval_tokens_per_domain=a.eval_tokens, n_boot=a.n_boot,
                            seed=cfg.seed, samples=not a.no_samples)
    print(json.dumps(report, indent=1, ensure_ascii=False))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "export":
        return _export_main(argv[1:])
    if argv and argv[0] == "evaluate":
        return _evaluate_main(argv[1:])
    if argv and argv[0] == "train":
        argv = argv[1:]
    return _train_main(argv)


if __name__ == "__main__":
    sys.exit(main())
