"""``python -m moe_lab.corpus --out DIR [--size small|full] [--seed 0] [--prose DIR]``: build and write the corpus."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .base import DOMAINS, SIZES
from .build import build_corpus, check_extra, write_corpus
from .prose import APT_COMMAND, MissingProseSources, load_prose


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moe_lab.corpus",
                                     description="Build a small multi-domain text corpus for training a tiny Mixtral.")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--size", choices=sorted(SIZES), default="small",
                        help="tokens per domain: small ~70k (seconds), full ~800k (about a minute)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--count-tokens", action="store_true", help="also count tokens (needs moe_lab.tokenizer)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--prose", metavar="DIR", help="directory with the Debian packages of real prose "
                        f"(`{APT_COMMAND}`), e.g. ~/.cache/moe_lab/debs; without it: the v3 corpus")
    args = parser.parse_args(argv)
    try:
        check_extra(DOMAINS)
    except ImportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    try:
        prose = load_prose(args.prose) if args.prose else None
    except MissingProseSources as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    corpus = build_corpus(None, size=args.size, seed=args.seed, progress=not args.quiet, prose=prose)
    write_corpus(corpus, args.out, count_tokens=args.count_tokens)
    stats = json.loads((Path(args.out) / "stats.json").read_text(encoding="utf-8"))["splits"]
    print(f"{'domain':<10}{'train docs':>12}{'train chars':>14}{'heldout docs':>14}{'heldout chars':>15}{'tokens':>12}")
    for dom in corpus.domains:
        tr, he = stats["train"][dom], stats["heldout"][dom]
        tokens = f"{tr['tokens'] + he['tokens']:>12,}" if "tokens" in tr else ""
        print(f"{dom:<10}{tr['documents']:>12}{tr['chars']:>14,}{he['documents']:>14}{he['chars']:>15,}{tokens}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
