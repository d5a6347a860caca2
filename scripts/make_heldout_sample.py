"""Write data/eval/heldout_sample.jsonl: held-out corpus documents that share no text with training.

Notebook 06 traces these documents. They come from the corpus the demo model was trained on
(``runs/corpus-v4``, built with ``python -m moe_lab.corpus --size full --prose DIR``) and are kept
only when

* the corpus holds them out and the split rule (:func:`moe_lab.corpus.is_heldout_document`) does too
  (so no build size puts them in training),
* their text is not the text of any training document, and
* none of their lines of 60 or more characters (stripped) occurs in any training document
  (the review of the notebooks found held-out documents of a smaller build sharing such lines with
  training: chunks of the same source file, template preambles).

Up to ``--per-domain`` documents per domain, evenly spread over the held-out set, each cut at a
line boundary to at most ``--max-chars`` characters. Run it again after a retraining on a new corpus:

    python scripts/make_heldout_sample.py --corpus runs/corpus-v4
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from moe_lab.corpus import is_heldout_document, load_corpus
from moe_lab.evalset import HELDOUT_SAMPLE, MIN_SHARED_LINE, shared_lines


def cut(text: str, max_chars: int) -> str:
    """``text`` cut at the last line break before ``max_chars`` (or at ``max_chars`` without one)."""
    if len(text) <= max_chars:
        return text
    head = text[:max_chars]
    return head[:head.rfind("\n")] if "\n" in head else head


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--corpus", default="runs/corpus-v4", help="the training corpus directory")
    p.add_argument("--out", default=str(HELDOUT_SAMPLE))
    p.add_argument("--per-domain", type=int, default=16)
    p.add_argument("--max-chars", type=int, default=3000)
    a = p.parse_args(argv)
    corpus = load_corpus(a.corpus)
    train_texts = {d.text for d in corpus.train}
    train_lines = {ln.strip() for d in corpus.train for ln in d.text.splitlines() if len(ln.strip()) >= MIN_SHARED_LINE}
    rows, report = [], {}
    for domain in corpus.domains:
        held = [d for d in corpus.heldout if d.domain == domain]
        clean = [d for d in held if is_heldout_document(d) and d.text not in train_texts
                 and not shared_lines(d.text, train_lines)]
        picked = [clean[i] for i in np.unique(np.linspace(0, len(clean) - 1, min(a.per_domain, len(clean))).round()
                                               .astype(int))] if clean else []
        rows += [{"domain": domain, "id": d.id, "text": cut(d.text, a.max_chars)} for d in picked]
        report[domain] = f"{len(picked)} of {len(clean)} clean ({len(held)} held out)"
    out = Path(a.out)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    os.chmod(tmp, 0o644)
    os.replace(tmp, out)
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
