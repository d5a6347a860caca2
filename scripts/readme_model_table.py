"""The README's demo-model summary, generated from data/tiny-mixtral (config.json, evaluation.json).

After exporting a new demo model, refresh the README block between the ``model-table`` markers:

    python scripts/readme_model_table.py --write     # rewrites README.md in place
    python scripts/readme_model_table.py             # prints the block

``tests/test_readme_model_table.py`` fails when the README block and the shipped evaluation differ.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
START, END = "<!-- model-table:start (scripts/readme_model_table.py) -->", "<!-- model-table:end -->"
LANGS = {"en": "english", "fr": "french", "de": "german", "es": "spanish", "it": "italian"}


def model_block(model_dir: Path = REPO / "data" / "tiny-mixtral") -> str:
    cfg = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    ev = json.loads((model_dir / "evaluation.json").read_text(encoding="utf-8"))
    run = ev.get("run", {})
    size_mb = (model_dir / "model.safetensors").stat().st_size / 1e6
    lines = [
        f"`data/tiny-mixtral/` is a Mixtral-architecture model ({cfg['num_hidden_layers']} layers, dim "
        f"{cfg['hidden_size']}, {cfg['num_local_experts']} experts, top-{cfg['num_experts_per_tok']}, grouped-query "
        f"attention ({cfg['num_attention_heads']} query / {cfg['num_key_value_heads']} key-value heads), the real "
        f"{cfg['vocab_size']:,}-token Mixtral vocabulary; {size_mb:.0f} MB in bf16, Hugging Face layout), trained by "
        f"this project on a CPU ({run.get('steps', '?'):,} steps, {run.get('tokens', 0) / 1e6:.1f}M tokens, "
        f"{run.get('wall_time_s', 0) / 60:.0f} minutes) on its nine-domain corpus.",
        ""]
    sources = (ev.get("training_data") or {}).get("prose_sources") or []
    if sources:
        lines += ["Its language domains are mostly real prose, from Debian packages: "
                  + "; ".join(f"`{s['package']}` {s['version']} ({s['licence']})" for s in sources)
                  + ". The rest is Python source and documentation, generated maths, data and LaTeX, and at most "
                  "25% template text per language; `data/DATA_CARD.md` lists every source.", ""]
    every = ev.get("everyday_nll") or {}
    prose = ev.get("prose_ce_ratio") or {}
    uni = ev.get("everyday_uniform_nll")
    lines += ["How well it knows each language (from `data/tiny-mixtral/evaluation.json`): the mean NLL of "
              "everyday sentences written for moe_lab (`data/eval/everyday_sentences.json`; lower is better, "
              + (f"a uniform guess scores {uni:.2f}, " if uni else "")
              + "target <= 5.5), and the held-out cross-entropy over the unigram baseline on the language's held-out "
              "pages of real prose and on its whole held-out domain (target <= 0.70).", "",
              "| language | everyday NLL (nats/token) | held-out ratio, real prose | held-out ratio, whole domain |",
              "| --- | --- | --- | --- |"]
    def num(x) -> str:
        return "n/a" if x is None else f"{x:.2f}"

    def num(x):  # 3 decimals near a threshold would show 0.70 for 0.7013: ratios get 3
        return "n/a" if x is None else f"{x:.3f}" if abs(x - 0.70) < 0.005 else f"{x:.2f}"

    for lang, dom in LANGS.items():
        lines.append(f"| {dom} | {num(every.get(lang, {}).get('mean'))} | {num(prose.get(dom))} | "
                     f"{num(ev['ce_ratio'].get(dom))} |")
    others = {d: r for d, r in ev["ce_ratio"].items() if d not in LANGS.values()}
    qb = ev.get("quality_bar", {})
    lines += ["", "Other domains' held-out ratios: " + ", ".join(f"{d} {r:.2f}" for d, r in others.items())
              + ". Quality bar (`MODEL_CARD.md`): "
              + (("all pass" if qb.get("all_pass") else "**not met** on " + "; ".join(
                  k.replace("_", " ") for k, v in qb.items() if k != "all_pass" and not v["pass"])) if every else
                 "not measured against the everyday-sentence and real-prose criteria (re-export the model)") + "."]
    return "\n".join(lines)


def replace_block(readme: str, block: str) -> str:
    if START not in readme or END not in readme:
        raise ValueError(f"README.md has no block between {START!r} and {END!r}")
    head, rest = readme.split(START, 1)
    return head + START + "\n" + block + "\n" + END + rest.split(END, 1)[1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--write", action="store_true", help="rewrite README.md's block in place")
    a = p.parse_args(argv)
    block = model_block()
    if not a.write:
        print(block)
        return 0
    path = REPO / "README.md"
    text = replace_block(path.read_text(encoding="utf-8"), block)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".README.md.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    print(f"updated {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
