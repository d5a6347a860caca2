"""Run the lab: every recipe x seed trained by :func:`moe_lab.train.train`, measured, one JSON row each.

Layout: ``<work>/`` (checkpoints, git-ignored) holds one run directory per recipe and seed and the
shared token cache; ``<out>/results.jsonl`` one row per finished run (``status`` "ok" or "failed" with
the ``reason``), ``<out>/logs/<recipe>-s<seed>.jsonl`` each run's training log, ``<out>/command.json``
the command and the scale. Rerunning the same command skips the rows already written and resumes a run
from its last checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..analysis import domain_load_divergence, expert_load, load_balance, vocabulary_specialization
from ..model import Mixtral
from ..train import DataConfig, OptimConfig, TrainConfig, train
from ..train.config import CKPT_NAME
from ..train.data import get_corpus, prepare_data
from ..train.evaluate import evaluate_heldout, router_saturation, trace_windows
from ..train.loop import _fresh_acc, _rng_state, make_optimizer
from .recipes import FULL, RECIPES, Recipe, Scale, model_args, non_embedding_params, source_args, upcycle_state
from .vocab import reduced_tokenizer

RESULTS = "results.jsonl"
SEEDS = (0, 1, 2)


class Diverged(RuntimeError):
    pass


def snapshot_ids(indices: np.ndarray, n_experts: int) -> np.ndarray:
    """Router snapshot ids as int16 with -1 for an empty slot. Snapshots written before
    ``routing_snapshot`` kept -1 stored it as 255 (uint8); with fewer than 255 experts, 255 can only be
    that empty slot."""
    ids = np.asarray(indices)
    if ids.dtype == np.uint8 and n_experts < 255:
        ids = np.where(ids == 255, -1, ids.astype(np.int16)).astype(np.int16)
    return ids


def train_config(args, scale: Scale, seed: int, name: str, load_balancing: str = "per_layer") -> TrainConfig:
    data = DataConfig(corpus_size=scale.corpus_size, seq_len=scale.seq_len, eval_tokens_per_domain=None,
                      eval_windows=2, probe_windows=2)
    optim = OptimConfig(steps=scale.steps, batch_size=scale.batch_size, lr=scale.lr, min_lr=scale.lr / 10,
                        warmup_steps=scale.warmup_steps)
    return TrainConfig(model=args, data=data, optim=optim, name=name, seed=seed, num_threads=None,
                       log_every=max(1, scale.steps // 20), eval_every=scale.steps, checkpoint_every=max(1, scale.steps // 6),
                       snapshot_every=max(1, scale.steps // 4), load_balancing=load_balancing)


class Lab:
    """The corpus, the reduced tokenizer and the directories of one lab."""

    def __init__(self, out: str | os.PathLike, work: str | os.PathLike, scale: Scale = FULL, progress: bool = True):
        self.out, self.work, self.scale, self.progress = Path(out), Path(work), scale, progress
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "logs").mkdir(exist_ok=True)
        self.work.mkdir(parents=True, exist_ok=True)
        self.corpus = get_corpus(DataConfig(corpus_size=scale.corpus_size, corpus_dir=str(self.work / "corpus")),
                                 progress=False)
        self.tokenizer = reduced_tokenizer(self.corpus, scale.vocab_size)

    # ---- results

    def rows(self) -> list[dict]:
        p = self.out / RESULTS
        return [json.loads(l) for l in p.read_text().splitlines() if l.strip()] if p.exists() else []

    def done(self) -> set[tuple[str, int]]:
        return {(r["recipe"], r["seed"]) for r in self.rows()}

    def write_row(self, row: dict) -> None:
        with (self.out / RESULTS).open("a") as f:
            f.write(json.dumps(row) + "\n")

    # ---- one run

    def run_dir(self, name: str, seed: int) -> Path:
        d = self.work / f"{name}-s{seed}"
        d.mkdir(parents=True, exist_ok=True)
        shared = self.work / "tokens"
        shared.mkdir(exist_ok=True)
        link = d / "tokens"
        if not link.exists():
            link.symlink_to(shared.resolve(), target_is_directory=True)
        return d

    def _train(self, cfg: TrainConfig, d: Path, max_steps: int | None = None):
        return train(cfg, d, corpus=self.corpus, tokenizer=self.tokenizer, progress=False, resume=True,
                     max_steps=max_steps)

    def upcycle_source(self, seed: int) -> Path:
        """The dense source of the upcycled recipes, trained for ``upcycle_fraction`` of the schedule."""
        d = self.run_dir("upcycle_source", seed)
        cfg = train_config(source_args(self.scale), self.scale, seed, "upcycle_source")
        self._train(cfg, d, max_steps=self.upcycle_steps)
        return d

    @property
    def upcycle_steps(self) -> int:
        return max(1, round(self.scale.upcycle_fraction * self.scale.steps))

    def start_upcycled(self, recipe: Recipe, cfg: TrainConfig, d: Path, seed: int) -> None:
        """Write ``d/checkpoint.pt`` at the dense source's step: the upcycled weights, a fresh optimiser,
        so that :func:`train` resumes the schedule from there."""
        if (d / CKPT_NAME).exists():
            return
        src = torch.load(self.upcycle_source(seed) / CKPT_NAME, map_location="cpu", weights_only=False)
        torch.manual_seed(seed)
        model = Mixtral(cfg.model)
        model.load_state_dict(upcycle_state(src["model"], model, recipe.upcycle, recipe.drop_ratio, seed))
        opt = make_optimizer(model, cfg.optim, torch.device("cpu"))
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": src["step"], "rng": _rng_state(),
                    "config": cfg.to_dict(), "elapsed_s": 0.0, "log_acc": _fresh_acc(),
                    "log_load_counts": torch.zeros(len(cfg.model.moe_layers), cfg.model.n_experts, dtype=torch.long)},
                   d / CKPT_NAME)

    def run_one(self, name: str, seed: int) -> dict:
        recipe = RECIPES[name]
        cfg = train_config(model_args(recipe, self.scale), self.scale, seed, name, recipe.load_balancing)
        d = self.run_dir(name, seed)
        if recipe.upcycle:
            self.start_upcycled(recipe, cfg, d, seed)
        t0 = time.time()
        res = self._train(cfg, d)
        row = self.measure(recipe, seed, res)
        row["wall_s"] = round(time.time() - t0, 1)
        shutil.copy(d / "training_log.jsonl", self.out / "logs" / f"{name}-s{seed}.jsonl")
        return row

    def measure(self, recipe: Recipe, seed: int, res) -> dict:
        """Every measure of one trained run (see the module docstring of ``moe_lab.lab``)."""
        model, cfg = res.model.eval(), res.config
        data = prepare_data(cfg, res.out_dir, self.corpus, self.tokenizer, progress=False)
        ce, _ = evaluate_heldout(model, data.heldout, data.bos_id, cfg.optim.batch_size)
        ce_mean = float(np.mean(list(ce.values())))
        if not math.isfinite(ce_mean) or ce_mean > math.log(cfg.model.vocab_size) + 1:
            raise Diverged(f"held-out CE {ce_mean:.3f} (uniform prediction: {math.log(cfg.model.vocab_size):.3f})")
        trains = res.records("train")
        tps = [r["tokens_per_s"] for r in trains][1:] or [r["tokens_per_s"] for r in trains]
        a = cfg.model
        row = {"recipe": recipe.name, "seed": seed, "status": "ok", "title": recipe.title, "paper": recipe.paper,
               "ce": ce_mean, "ce_per_domain": ce, "train_ce_last": trains[-1]["ce"] if trains else None,
               "tokens_per_s": float(np.median(tps)) if tps else None, "train_time_s": res.wall_time_s,
               "tokens": res.tokens_seen, "steps": res.step, "n_experts": a.n_experts, "k": a.experts_per_token,
               "params": non_embedding_params(a), "upcycle": recipe.upcycle}
        if recipe.upcycle:
            row["upcycle_dense_steps"] = self.upcycle_steps
        if recipe.dense:
            return row
        trace = trace_windows(model, data.heldout, cfg.optim.batch_size)
        ids = trace.expert_ids  # [L, N, k'], -1 = empty slot
        bal = load_balance(expert_load(trace))
        row.update({"max_violation": float(bal.max_violation.mean()), "max_violation_per_layer": bal.max_violation.tolist(),
                    "cv": float(bal.cv.mean()), "dropped_share": float((ids < 0).all(-1).mean()),
                    "experts_per_token": float((ids >= 0).sum(-1).mean())})
        last = [r["load"] for r in trains[-max(1, len(trains) // 5):]]
        train_bal = load_balance(np.mean(np.array(last), 0))
        row["max_violation_train"] = float(train_bal.max_violation.mean())
        # specialisation (notebook 06's statistics) against their baselines
        div = domain_load_divergence(trace, n_perm=50, seed=seed)
        row["domain_tv"], row["domain_tv_null"] = float(div.tv.mean()), float(div.null_mean.mean())
        row["domain_tv_above_p95"] = float((div.tv > div.null_p95).mean())
        # an empty slot (-1) is no expert in both statistics; a token with fewer than k experts still
        # counts, so their chance levels use the filled slots (experts_per_token), not k
        spec = [vocabulary_specialization(trace, l) for l in trace.layers]
        row["vocab_specialization"] = float(np.mean([np.average(s.specialization, weights=s["count"]) for s in spec]))
        row["vocab_specialization_chance"] = row["experts_per_token"] / a.n_experts
        snaps = snapshot_ids(res.snapshots["indices"], a.n_experts)
        if len(snaps) >= 3:
            sat = router_saturation(snaps)  # [S, L], the last is the final model
            mid = int(np.argmin(np.abs(np.array(res.snapshots["steps"]) - res.step / 2)))
            filled = (snaps >= 0).mean(axis=(1, 2, 3))  # [S] share of filled slots
            row["router_saturation_mid"] = float(sat[mid].mean())
            row["router_saturation_final"] = float(sat[-1].mean())  # the ceiling: 1 less the empty slots
            # independent uniform choices filling these shares of the k' slots: k'/E * f_mid * f_final
            # (k/E when no slot is empty; k' = 8 slots for expert choice, where a token can get all experts)
            row["router_saturation_chance"] = snaps.shape[-1] / a.n_experts * float(filled[mid] * filled[-1])
        return row

    def remeasure(self, name: str, seed: int) -> dict:
        """Every measure of a finished run again, from its saved final checkpoint: no optimiser step.
        The run is restored as ``run`` would resume it (model, log, router snapshots), and
        :meth:`measure` runs on it. Raises when the checkpoint is missing or not at the schedule's end."""
        recipe = RECIPES[name]
        cfg = train_config(model_args(recipe, self.scale), self.scale, seed, name, recipe.load_balancing)
        ckpt = self.work / f"{name}-s{seed}" / CKPT_NAME
        if not ckpt.exists():
            raise FileNotFoundError(f"{ckpt}: no checkpoint of {name} seed {seed} (measure never trains; "
                                    "run `python -m moe_lab.lab run` first)")
        step = torch.load(ckpt, map_location="cpu", weights_only=False)["step"]
        if step != cfg.optim.steps:
            raise ValueError(f"{ckpt}: checkpoint at step {step}, expected the final step {cfg.optim.steps} "
                             "(measure never trains; finish the run with `python -m moe_lab.lab run`)")
        return self.measure(recipe, seed, self._train(cfg, self.run_dir(name, seed)))

    def measure_again(self, recipes=None, seeds=SEEDS, check=("ce", "dropped_share", "experts_per_token", "domain_tv"),
                      ) -> list[dict]:
        """Recompute the measures of the finished ("ok") runs of ``recipes`` (default: every routed
        recipe) from their final checkpoints and rewrite their rows of ``results.jsonl`` in place
        (``wall_s`` and ``train_time_s`` kept as recorded, ``remeasured`` added). The measures in ``check`` must come out as recorded
        (the same model on the same tokens), else nothing is written."""
        names = list(recipes or [n for n, r in RECIPES.items() if not r.dense])
        unknown = set(names) - set(RECIPES)
        if unknown:
            raise ValueError(f"unknown recipes {sorted(unknown)}; known: {list(RECIPES)}")
        rows = self.rows()
        todo = [i for i, r in enumerate(rows) if r["recipe"] in names and r["seed"] in seeds and r.get("status") == "ok"]
        for i in tqdm(todo, desc="measure again", unit="run", disable=not self.progress):
            old = rows[i]
            new = self.remeasure(old["recipe"], old["seed"])
            for key in check:
                if key in old and not math.isclose(old[key], new[key], rel_tol=1e-5, abs_tol=1e-9):
                    raise RuntimeError(f"{old['recipe']} seed {old['seed']}: {key} recorded {old[key]}, measured "
                                       f"again {new[key]}: not the same model or tokens; results.jsonl left as it was")
            rows[i] = {**new, "wall_s": old.get("wall_s"), "train_time_s": old.get("train_time_s", new["train_time_s"]),
                       "remeasured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        tmp = self.out / (RESULTS + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        tmp.replace(self.out / RESULTS)
        return rows

    # ---- everything

    def run(self, recipes=None, seeds=SEEDS) -> list[dict]:
        names = list(recipes or RECIPES)
        unknown = set(names) - set(RECIPES)
        if unknown:
            raise ValueError(f"unknown recipes {sorted(unknown)}; known: {list(RECIPES)}")
        todo = [(n, s) for s in seeds for n in names if (n, s) not in self.done()]
        for name, seed in tqdm(todo, desc="design-space lab", unit="run", disable=not self.progress):
            t0 = time.time()
            try:
                row = self.run_one(name, seed)
            except (Diverged, MemoryError, RuntimeError, ValueError, FloatingPointError) as e:
                row = {"recipe": name, "seed": seed, "status": "failed", "reason": f"{type(e).__name__}: {e}",
                       "traceback": traceback.format_exc(limit=3), "wall_s": round(time.time() - t0, 1)}
            self.write_row(row)
            if self.progress:
                tqdm.write(f"{name} seed {seed}: {row['status']} " +
                           (f"ce {row['ce']:.4f} ({row['wall_s']} s)" if row["status"] == "ok" else row["reason"]))
        return self.rows()


def write_command(out: Path, argv: list[str], scale: Scale) -> None:
    (out / "command.json").write_text(json.dumps({"command": "python -m moe_lab.lab " + " ".join(argv),
                                                  "scale": asdict(scale), "seeds": list(SEEDS),
                                                  "torch": torch.__version__, "threads": torch.get_num_threads(),
                                                  "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
                                                 indent=1) + "\n")


def run_lab(out, work, scale: Scale = FULL, recipes=None, seeds=SEEDS, progress: bool = True) -> list[dict]:
    return Lab(out, work, scale, progress).run(recipes, seeds)
