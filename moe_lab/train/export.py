"""A finished run -> a shipped model directory: bf16 weights in the Hugging Face layout, the
training log and router snapshots, ``evaluation.json`` and ``MODEL_CARD.md``."""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from ..checkpoints.loading import load_model, save_model
from ..corpus import Corpus
from ..model import Mixtral
from ..tokenizer import load_tokenizer
from .card import write_model_card
from .config import CKPT_NAME, LOG_NAME, SNAPSHOT_NAME, TrainConfig
from .data import TokenData, batch_schedule_probabilities, get_corpus, pack_windows, tokenize_corpus
from .evaluate import evaluate_model, prose_documents, quality_bar
from .loop import machine_description, read_log

EVALUATION_NAME = "evaluation.json"
CARD_NAME = "MODEL_CARD.md"


def export_run(run_dir: str | os.PathLike, out: str | os.PathLike, *, command: str | None = None,
               n_boot: int = 1000, progress: bool = True, corpus=None, tokenizer=None,
               eval_tokens_per_domain: int | None = None, max_docs: int = 64) -> dict:
    """Checkpoint of a finished run -> HF-layout bf16 model in ``out`` with the training log, router
    snapshots, ``evaluation.json`` and ``MODEL_CARD.md`` (evaluated on the exported bf16 weights,
    on every held-out token unless ``eval_tokens_per_domain`` caps it)."""
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
    facts = run_facts(read_log(run), cfg, steps=ck["step"], elapsed_s=ck["elapsed_s"])
    return write_evaluation(out, cfg, facts, command=command, n_boot=n_boot, progress=progress, corpus=corpus,
                            tokenizer=tokenizer, token_cache=run / "tokens",
                            eval_tokens_per_domain=eval_tokens_per_domain, max_docs=max_docs)


def run_facts(log: list[dict], cfg: TrainConfig, steps: int | None = None, elapsed_s: float | None = None) -> dict:
    """Steps, tokens, wall time, machine and throughput of a training run, from its log (``steps`` and
    ``elapsed_s`` from the checkpoint when there is one)."""
    stops = [r for r in log if r.get("type") == "run" and r.get("event") == "stop"]
    starts = [r for r in log if r.get("type") == "run" and r.get("event") == "start"]
    if steps is None or elapsed_s is None:
        if not stops:
            raise ValueError("the training log has no 'stop' record: the run did not finish")
        steps, elapsed_s = stops[-1]["step"], stops[-1]["elapsed_s"]
    tokens = steps * cfg.optim.batch_size * cfg.data.seq_len
    return {"steps": steps, "tokens": tokens,
            "wall_time_s": stops[-1]["elapsed_s"] if stops else elapsed_s,
            "machine": starts[0]["machine"] if starts else machine_description(),
            "torch": starts[0].get("torch") if starts else torch.__version__,
            "tokens_per_s": tokens / max(elapsed_s, 1e-9)}


def write_evaluation(model_dir: str | os.PathLike, cfg: TrainConfig, facts: dict, *, command: str | None = None,
                     n_boot: int = 1000, progress: bool = True, corpus: Corpus | None = None, tokenizer=None,
                     token_cache: str | os.PathLike | None = None, eval_tokens_per_domain: int | None = None,
                     max_docs: int = 64) -> dict:
    """Evaluate the model stored in ``model_dir`` (its bf16 weights, computed in fp32) on the corpus
    ``cfg`` names and (re)write ``evaluation.json`` and ``MODEL_CARD.md`` there. Returns the report."""
    out = Path(model_dir)
    tok = tokenizer or load_tokenizer()
    corpus = corpus if corpus is not None else get_corpus(cfg.data, progress=progress)
    td = tokenize_corpus(corpus, tok, token_cache, cfg.data.domains, progress)
    report = evaluate_model(load_model(out, dtype=torch.float32), td, tok, seq_len=cfg.data.seq_len,
                            eval_tokens_per_domain=eval_tokens_per_domain, n_boot=n_boot, seed=cfg.seed,
                            max_docs=max_docs, progress=progress, prose_docs=prose_documents(corpus, td.domains))
    report["training_data"] = training_data_facts(cfg, getattr(corpus, "meta", {}) or {}, td)
    report["quality_bar"] = quality_bar(report)
    probe = torch.as_tensor(pack_windows(td, "heldout", td.domains[0], 64, max_windows=2)[:, :-1])
    hf = check_against_transformers(out, probe)
    report["transformers_check"] = hf
    report["run"] = {**facts, "hf_check": (
        f"`moe_lab.load_model` and `transformers.MixtralForCausalLM.from_pretrained` on this "
        f"directory (fp32 compute from the bf16 file), 2 x 64 held-out tokens: max |logit "
        f"difference| {hf['max_abs_diff']:.2e} (logits up to {hf['max_abs_logit']:.1f}); "
        f"argmax agreement {hf['argmax_agree']:.3f}.")}
    _atomic_write_text(out / EVALUATION_NAME, json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    files = {p.name: p.stat().st_size for p in sorted(out.iterdir())
             if p.name != CARD_NAME and not p.name.startswith(".")}
    write_model_card(report, out / CARD_NAME, config=cfg, command=command or reproduce_command(cfg),
                     run_info=report["run"], corpus_stats=corpus_token_stats(td, corpus), files=files)
    return report


def training_data_facts(cfg: TrainConfig, corpus_meta: dict, token_data: TokenData) -> dict:
    """What the model was trained on, for the card and the README: every real-prose source (Debian
    package, version, licence, from the corpus' ``stats.json``) and the domain mix (sampling weight
    and probability of each domain, its training tokens and its share of real prose, by characters)."""
    prose = corpus_meta.get("prose") or {}
    sources = [{"package": name, "version": src.get("version"), "licence": src.get("licence") or src.get("license"),
                "title": src.get("title"), "file": src.get("file")} for name, src in prose.items()]
    windows = {d: max(0, (int(len(token_data.tokens["train"][d])) - 1) // cfg.data.seq_len) for d in token_data.domains}
    probs = batch_schedule_probabilities(windows, cfg.data.domain_alpha, cfg.data.domain_weights)
    mix = {}
    for d in token_data.domains:
        by_label = (corpus_meta.get("sources") or {}).get(d, {})
        chars = sum(v.get("chars", 0) for v in by_label.values())
        deb = sum(v.get("chars", 0) for k, v in by_label.items() if k.startswith("deb:"))
        mix[d] = {"weight": (cfg.data.domain_weights or {}).get(d, 1.0), "probability": probs[d],
                  "train_tokens": int(len(token_data.tokens["train"][d])),
                  "prose_share": deb / chars if chars else 0.0}
    return {"prose_sources": sources, "domain_mix": mix, "corpus_size": cfg.data.corpus_size,
            "corpus_seed": cfg.data.corpus_seed}


def reproduce_command(cfg: TrainConfig) -> str:
    corpus_dir = cfg.data.corpus_dir or "data/corpus"
    return (f"python -m moe_lab.corpus --out {corpus_dir} --size {cfg.data.corpus_size} "
            f"--seed {cfg.data.corpus_seed}   # optional: the trainer builds it if missing\n"
            f"python -m moe_lab.train --config configs/{cfg.name}.json --out runs/{cfg.name}\n"
            f"python -m moe_lab.train export --run runs/{cfg.name} --out data/{cfg.name}")


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def save_hf_checkpoint(model: Mixtral, path: str | os.PathLike, dtype: torch.dtype = torch.bfloat16) -> list[Path]:
    """Write ``config.json`` + ``model.safetensors`` (Hugging Face layout, ``dtype``) into ``path``,
    leaving other files there alone. Returns the files written."""
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
    from transformers import MixtralForCausalLM  # a dev dependency, needed only for this check

    ours = load_model(path, dtype=torch.float32).eval()
    hf = MixtralForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    a = ours(tokens)
    b = hf(tokens).logits
    diff = float((a - b).abs().max())
    return {"max_abs_diff": diff, "max_abs_logit": float(a.abs().max()),
            "argmax_agree": float((a.argmax(-1) == b.argmax(-1)).float().mean())}


def corpus_token_stats(token_data: TokenData, corpus=None) -> dict:
    """Documents and tokens per domain and split, and the biggest sources (for the card's corpus table)."""
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
