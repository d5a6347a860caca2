"""The training loop (steps 4-6 of the package docstring).

:func:`train` reads as the list of what a run does: prepare the data, build the model and
optimiser (or restore them from a checkpoint), then step; at interval boundaries it logs, evaluates
on held-out windows, snapshots the router's choices for fixed probe tokens and checkpoints.
Routing during training is read from the forward itself (the router logits and chosen experts at
the model's hook points); the evaluations trace it with :func:`moe_lab.trace_routing`.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..model import Mixtral, count_params, load_balancing_loss
from .config import CKPT_NAME, LOG_NAME, SNAPSHOT_NAME, OptimConfig, TrainConfig, load_config, lr_at
from .data import Dataset, prepare_data
from .evaluate import evaluate_heldout, routing_snapshot

LOSS_KEYS = ("total", "ce", "load_balancing", "load_balancing_per_layer", "z")


def objective(cfg: TrainConfig, loss, router_logits: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss that is minimised, and its parts as floats for the log.

    ``load_balancing`` is transformers' definition over all layers at once (the model's
    ``Loss``); ``load_balancing_per_layer`` the mean over layers of each layer's own
    ``E * sum_e f_e P_e``. Both equal top_k at perfect balance. ``cfg.load_balancing`` picks which
    one is optimised: "hf" adds ``coef * load_balancing``, "per_layer" ``coef * sum over layers``.
    """
    a = cfg.model
    per_layer = torch.stack([load_balancing_loss([lg], a.n_experts, a.experts_per_token) for lg in router_logits])
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
    """Threads and deterministic algorithms as the config asks, restored afterwards."""
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
    """AdamW with decoupled weight decay on the matrices (not on norms, nor on the input embeddings
    unless ``optim.decay_embeddings``)."""
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


def training_step(model: Mixtral, opt: torch.optim.Optimizer, cfg: TrainConfig, x: torch.Tensor,
                  y: torch.Tensor, lr: float) -> tuple[dict[str, float], float, torch.Tensor]:
    """One optimiser update on the batch ``x``, ``y`` [B, T]. Returns the loss parts, the gradient
    norm (before clipping) and the expert choices of the batch counted per layer [L, E]."""
    for g in opt.param_groups:
        g["lr"] = lr
    with _autocast(cfg, x.device):
        # the router logits keep their graph: the per-layer load-balancing loss is computed from them
        (_, loss), cache = model.run_with_cache(x, y, names_filter=["router_logits", "topk_indices"],
                                                detach=False, return_logits=False)
    total, parts = objective(cfg, loss, [cache["router_logits", l] for l in cache.layers("router_logits")])
    opt.zero_grad(set_to_none=True)
    total.backward()
    if cfg.optim.grad_clip > 0:
        gn = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip))
    else:
        gn = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None])))
    opt.step()
    E = cfg.model.n_experts
    chosen = [cache["topk_indices", l].flatten().cpu() for l in cache.layers("topk_indices")]  # MoE layers
    counts = torch.stack([torch.bincount(c[c >= 0], minlength=E) for c in chosen])  # [L, E]; -1: empty slot
    return parts, gn, counts


def _fresh_acc() -> dict:
    return {**{k: 0.0 for k in LOSS_KEYS}, "n": 0, "clipped": 0}


class _Run:
    """One run's state (model, optimiser, log, snapshots, the running averages of the current
    logging interval) and what it does at interval boundaries."""

    def __init__(self, cfg: TrainConfig, data: Dataset, out: Path | None, device: torch.device):
        self.cfg, self.data, self.out, self.device = cfg, data, out, device
        torch.manual_seed(cfg.seed)
        self.model = Mixtral(cfg.model).to(device).train()
        self.opt = make_optimizer(self.model, cfg.optim, device)
        pw = cfg.data.probe_windows
        self.probe_np = np.concatenate([w[:pw, :-1] for w in data.heldout.values()])  # [P, T]
        self.probe_domains = np.repeat(np.arange(len(data.domains)), [min(pw, len(w)) for w in data.heldout.values()])
        self.snapshots: dict[str, list] = {"steps": [], "indices": []}
        self.log: list[dict] = []
        self.start, self.elapsed_before = 0, 0.0
        self.acc = _fresh_acc()
        self.load_counts = torch.zeros(len(cfg.model.moe_layers), cfg.model.n_experts, dtype=torch.long)
        self.ckpt_path = out / CKPT_NAME if out is not None else None
        self.log_path = out / LOG_NAME if out is not None else None
        self.tokens_per_step = cfg.optim.batch_size * cfg.data.seq_len

    # ---- starting or resuming

    def begin(self, resume: bool, stop: int) -> None:
        if resume and self.ckpt_path is not None and self.ckpt_path.exists():
            self.restore(stop)
        else:
            self.log.append(self.start_record())
        if self.log_path is not None:
            self.log_path.write_text("".join(json.dumps(r) + "\n" for r in self.log))

    def start_record(self) -> dict:
        cfg, data = self.cfg, self.data
        pc = count_params(cfg.model)
        return {"type": "run", "event": "start", "step": 0, "time": time.time(), "config": cfg.to_dict(),
                "params_total": pc.total, "params_active": pc.active,
                "train_tokens": data.token_data.n_tokens("train"),
                "heldout_tokens": data.token_data.n_tokens("heldout"),
                "train_windows": {d: len(w) for d, w in data.train.items()},
                "heldout_windows": {d: len(w) for d, w in data.heldout.items()},
                "corpus_fingerprint": data.token_data.fingerprint, "machine": machine_description(self.device),
                "torch": torch.__version__}

    def restore(self, stop: int) -> None:
        """Model, optimiser, RNGs, the log and snapshots up to the checkpoint's step."""
        ck = torch.load(self.ckpt_path, map_location=self.device, weights_only=False)
        if TrainConfig.from_dict(ck["config"]).to_dict() != self.cfg.to_dict():
            raise ValueError(f"{self.ckpt_path} was written with a different config; "
                             "resume with the same config or start a new run directory")
        self.model.load_state_dict(ck["model"])
        self.opt.load_state_dict(ck["optimizer"])
        _set_rng_state(ck["rng"])
        self.start, self.elapsed_before = ck["step"], ck["elapsed_s"]
        self.acc, self.load_counts = dict(ck["log_acc"]), ck["log_load_counts"].clone()
        if self.log_path.exists():  # drop records written after the checkpoint
            self.log = [r for r in map(json.loads, self.log_path.read_text().splitlines())
                        if r.get("step", 0) <= self.start]
        snap_path = self.out / SNAPSHOT_NAME
        if snap_path.exists():
            z = np.load(snap_path)
            keep = z["steps"] <= self.start
            self.snapshots = {"steps": list(z["steps"][keep]), "indices": list(z["indices"][keep])}
        if self.start < stop:
            self.log.append({"type": "run", "event": "resume", "step": self.start, "time": time.time()})

    # ---- what happens at interval boundaries

    def write(self, record: dict) -> None:
        self.log.append(record)
        if self.log_path is not None:
            with self.log_path.open("a") as f:
                f.write(json.dumps(record) + "\n")

    def log_interval(self, done: int, lr: float, gn: float, seconds: float, elapsed: float) -> None:
        """The "train" record: losses averaged over the interval, and the interval's expert load."""
        n = self.acc.pop("n")
        c = self.load_counts.double()
        self.write({"type": "train", "step": done, "tokens": done * self.tokens_per_step, "lr": lr,
                    **{k: self.acc[k] / n for k in LOSS_KEYS},
                    "grad_norm": gn, "clipped_frac": self.acc["clipped"] / n,
                    "tokens_per_s": n * self.tokens_per_step / max(seconds, 1e-9), "elapsed_s": elapsed,
                    "load": (c / c.sum(1, keepdim=True).clamp(min=1)).tolist()})
        self.acc = _fresh_acc()
        self.load_counts.zero_()

    def evaluate(self, step: int) -> dict[str, float]:
        """The "eval" record: held-out CE and expert load per domain on the evaluation windows (fp32)."""
        ce, load = evaluate_heldout(self.model, self.data.heldout, self.data.bos_id, self.cfg.optim.batch_size,
                                    self.cfg.data.eval_windows, None, routing=True)
        self.write({"type": "eval", "step": step, "ce": ce, "ce_mean": float(np.mean(list(ce.values()))), "load": load})
        return ce

    def snapshot(self, step: int) -> None:
        """The top-k experts of the probe tokens, appended to ``router_snapshots.npz``."""
        if self.cfg.snapshot_every <= 0 or (self.snapshots["steps"] and self.snapshots["steps"][-1] == step):
            return
        self.snapshots["steps"].append(step)
        self.snapshots["indices"].append(routing_snapshot(self.model, torch.as_tensor(self.probe_np, dtype=torch.long)))
        if self.out is not None:
            np.savez(self.out / SNAPSHOT_NAME, steps=np.array(self.snapshots["steps"]),
                     indices=np.stack(self.snapshots["indices"]), probe_tokens=self.probe_np,
                     probe_domains=self.probe_domains, domains=np.array(self.data.domains))

    def checkpoint(self, step: int, elapsed: float) -> None:
        if self.ckpt_path is None:
            return
        # the partial averages of the current logging interval too, so a resumed run logs
        # exactly what an uninterrupted one would
        _atomic_torch_save({"model": self.model.state_dict(), "optimizer": self.opt.state_dict(), "step": step,
                            "rng": _rng_state(), "config": self.cfg.to_dict(), "elapsed_s": elapsed,
                            "log_acc": dict(self.acc), "log_load_counts": self.load_counts.clone()}, self.ckpt_path)

    # ---- the loop

    def steps(self, stop: int, progress: bool) -> tuple[dict[str, float], float]:
        """Optimiser steps ``start`` .. ``stop``; returns the last held-out CE and the training time."""
        cfg = self.cfg
        if self.start == 0:
            self.snapshot(0)
        bar = tqdm(total=stop, initial=self.start, desc=cfg.name, unit="step", disable=not progress)
        t0 = t_log = time.time()
        last_ce: dict[str, float] = {}
        try:
            for step in range(self.start, stop):
                lr = lr_at(step, cfg.optim)
                x, y, _ = self.data.batch(step)
                parts, gn, counts = training_step(self.model, self.opt, cfg, x.to(self.device), y.to(self.device), lr)
                done = step + 1
                for k in LOSS_KEYS:
                    self.acc[k] += parts[k]
                self.acc["n"] += 1
                self.acc["clipped"] += int(cfg.optim.grad_clip > 0 and gn > cfg.optim.grad_clip)
                self.load_counts += counts
                bar.update(1)
                bar.set_postfix(loss=f"{parts['total']:.3f}", lr=f"{lr:.2e}", refresh=False)
                # log at interval boundaries and at the schedule's end (not at an early stop:
                # the partial interval is checkpointed and logged by the resumed run)
                if done % cfg.log_every == 0 or done == cfg.optim.steps:
                    now = time.time()
                    self.log_interval(done, lr, gn, now - t_log, self.elapsed_before + now - t0)
                    t_log = now
                if done % cfg.eval_every == 0 or done == stop:
                    last_ce = self.evaluate(done)
                    bar.set_postfix(loss=f"{parts['total']:.3f}", heldout=f"{np.mean(list(last_ce.values())):.3f}")
                if cfg.snapshot_every > 0 and (done % cfg.snapshot_every == 0 or done == stop):
                    self.snapshot(done)
                if done == stop or (cfg.checkpoint_every > 0 and done % cfg.checkpoint_every == 0):
                    self.checkpoint(done, self.elapsed_before + time.time() - t0)
        finally:
            bar.close()
        if self.start >= stop:  # nothing to do: the run had already reached ``stop``
            evals = [r for r in self.log if r.get("type") == "eval" and r["step"] == stop]
            return (evals[-1]["ce"] if evals else self.evaluate(stop)), self.elapsed_before
        elapsed = self.elapsed_before + time.time() - t0
        self.write({"type": "run", "event": "stop", "step": stop, "time": time.time(), "elapsed_s": elapsed,
                    "tokens": stop * self.tokens_per_step})
        return last_ce, elapsed

    def result(self, stop: int, last_ce: dict[str, float], elapsed: float) -> "TrainResult":
        snaps = {"steps": np.array(self.snapshots["steps"]),
                 "indices": np.stack(self.snapshots["indices"]) if self.snapshots["indices"] else np.zeros((0,)),
                 "probe_tokens": self.probe_np, "probe_domains": self.probe_domains, "domains": list(self.data.domains)}
        self.model.eval()
        return TrainResult(model=self.model, config=self.cfg, out_dir=self.out, step=stop,
                           tokens_seen=stop * self.tokens_per_step, wall_time_s=elapsed, log=self.log,
                           final_eval=last_ce, snapshots=snaps)


def train(config: TrainConfig | str | dict, out_dir: str | os.PathLike | None = None, *, corpus=None,
          tokenizer=None, progress: bool = True, max_steps: int | None = None, resume: bool = False,
          device: str | None = None) -> TrainResult:
    """Train (or resume) a run; see the package docstring.

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
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    stop = min(cfg.optim.steps, max_steps) if max_steps is not None else cfg.optim.steps
    with _torch_settings(cfg):
        data = prepare_data(cfg, out, corpus, tokenizer, progress)      # 1-3: tokens, windows, schedule
        run = _Run(cfg, data, out, torch.device(cfg.device))            # model and optimiser
        run.begin(resume, stop)                                         # or restored from the checkpoint
        last_ce, elapsed = run.steps(stop, progress)                    # 4-6: optimise, log, evaluate, save
    return run.result(stop, last_ce, elapsed)


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

