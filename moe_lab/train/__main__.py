"""The command line: ``python -m moe_lab.train [train] --config C --out RUN``,
``... export --run RUN --out DIR`` and ``... evaluate --model DIR --config C [--write-card]``."""

from __future__ import annotations

import argparse
import json
import sys

import torch

from ..checkpoints.loading import load_model
from ..tokenizer import load_tokenizer
from .config import REPO_ROOT, load_config
from .data import get_corpus, tokenize_corpus
from .evaluate import evaluate_model, prose_documents
from .export import export_run, run_facts, write_evaluation
from .loop import read_log, train


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
    p.add_argument("--eval-tokens", type=int,
                   help="held-out tokens per domain (and per language's real prose) to score (default: all)")
    a = p.parse_args(argv)
    report = export_run(a.run, a.out, n_boot=a.n_boot, eval_tokens_per_domain=a.eval_tokens)
    print(json.dumps({"ce_ratio": report["ce_ratio"], "quality_bar": report["quality_bar"]}, indent=1))
    return 0


def _evaluate_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m moe_lab.train evaluate",
                                description="Evaluate a saved model on the held-out corpus (JSON report on stdout); "
                                            "with --write-card, (re)write its evaluation.json and MODEL_CARD.md.")
    p.add_argument("--model", required=True, help="checkpoint directory (any layout moe_lab.load_model reads)")
    p.add_argument("--config", required=True, help="the training config (names the corpus and seq_len)")
    p.add_argument("--cache", help="token cache directory (e.g. runs/<name>/tokens)")
    p.add_argument("--n-boot", type=int, default=1000)
    p.add_argument("--no-samples", action="store_true")
    p.add_argument("--eval-tokens", type=int, help="held-out tokens per domain to score (default: all)")
    p.add_argument("--write-card", action="store_true",
                   help="an exported model directory (with its training_log.jsonl): rewrite evaluation.json and "
                        "MODEL_CARD.md there from a fresh evaluation, without retraining (needs transformers)")
    a = p.parse_args(argv)
    cfg = load_config(a.config)
    if a.write_card:
        facts = run_facts(read_log(a.model), cfg)
        report = write_evaluation(a.model, cfg, facts, n_boot=a.n_boot, token_cache=a.cache,
                                  eval_tokens_per_domain=a.eval_tokens)
        print(json.dumps({"ce_ratio": report["ce_ratio"], "quality_bar": report["quality_bar"]}, indent=1))
        return 0
    tok = load_tokenizer()
    corpus = get_corpus(cfg.data)
    td = tokenize_corpus(corpus, tok, a.cache, cfg.data.domains)
    report = evaluate_model(load_model(a.model, dtype=torch.float32), td, tok, seq_len=cfg.data.seq_len,
                            eval_tokens_per_domain=a.eval_tokens, n_boot=a.n_boot,
                            seed=cfg.seed, samples=not a.no_samples, progress=True,
                            prose_docs=prose_documents(corpus, td.domains))
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
