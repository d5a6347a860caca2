"""The held-out documents notebook 06 traces (data/eval/heldout_sample.jsonl) were not in training.

Checked three ways: by the split rule (every build size holds them out), against the training
split of the small corpus build (everywhere the corpus extra is installed), and against the
corpus the demo model was trained on when it is on disk (``runs/corpus-v4``, or the directory in
``MOE_LAB_TRAIN_CORPUS``): same ids held out, no identical text, no shared line of 60+ characters.
"""

from __future__ import annotations

import json
import re
import os
from collections import Counter
from pathlib import Path

import pytest

from moe_lab.corpus import Document, is_heldout_document, load_corpus
from moe_lab.evalset import MIN_SHARED_LINE, load_heldout_sample, shared_lines

REPO = Path(__file__).resolve().parent.parent
TRAIN_CORPUS = Path(os.environ.get("MOE_LAB_TRAIN_CORPUS", REPO / "runs" / "corpus-v4"))


@pytest.fixture(scope="module")
def sample() -> list[dict]:
    return load_heldout_sample()


def _lines(docs) -> set[str]:
    return {ln.strip() for d in docs for ln in d.text.splitlines() if len(ln.strip()) >= MIN_SHARED_LINE}


def test_shared_lines_finds_long_lines_only():
    train = {"x" * 60, "short line"}
    assert shared_lines("a\n  " + "x" * 60 + "  \nshort line", train) == ["x" * 60]
    assert shared_lines("y" * 60, train) == []


def test_sample_covers_every_domain_and_is_held_out_by_the_rule(sample):
    counts = Counter(r["domain"] for r in sample)
    assert set(counts) == {"python", "english", "math", "french", "german", "spanish", "italian", "data", "latex"}
    assert len({(r["domain"], r["id"]) for r in sample}) == len(sample), "duplicate documents"
    not_held = [r["id"] for r in sample if not is_heldout_document(Document(r["domain"], r["id"], r["text"]))]
    assert not_held == [], f"documents the split rule puts in training: {not_held}"


def test_sample_shares_no_text_with_the_small_builds_training_split(sample):
    from moe_lab.corpus import build_corpus, check_extra

    try:
        check_extra(["french"])
    except ImportError as e:
        pytest.skip(str(e))
    small = build_corpus(size="small", progress=False)
    texts, lines = {d.text for d in small.train}, _lines(small.train)
    leaks = {r["id"]: shared_lines(r["text"], lines)[:2] for r in sample
             if r["text"] in texts or shared_lines(r["text"], lines)}
    assert leaks == {}, f"held-out sample documents share text with training: {leaks}"


@pytest.mark.skipif(not (TRAIN_CORPUS / "train.jsonl").exists(),
                    reason=f"the demo model's training corpus is not at {TRAIN_CORPUS} (set MOE_LAB_TRAIN_CORPUS)")
def test_sample_was_not_in_the_demo_models_training_corpus(sample):
    corpus = load_corpus(TRAIN_CORPUS)
    held = {(d.domain, d.id): d.text for d in corpus.heldout}
    train_ids = {(d.domain, d.id) for d in corpus.train}
    texts, lines = {d.text for d in corpus.train}, _lines(corpus.train)
    for r in sample:
        key = (r["domain"], r["id"])
        assert key in held and key not in train_ids, f"{key} is not held out in {TRAIN_CORPUS}"
        assert held[key].startswith(r["text"]), f"{key}: the sample's text is not the held-out document's"
        assert r["text"] not in texts and not shared_lines(r["text"], lines), f"{key} shares text with training"


def test_notebook_06_traces_the_sample():
    nb = json.loads((REPO / "notebooks" / "06_paper_routing_analysis.ipynb").read_text(encoding="utf-8"))
    code = "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")
    assert "load_heldout_sample(" in code and "build_corpus(" not in code


def test_notebooks_trace_only_the_shipped_heldout_sample():
    """The notebooks that trace held-out text take it from load_heldout_sample(), not from the held-out
    split of a small corpus build (which can differ from the full build the model trained on)."""
    for name in ("05_visualising_experts", "06_paper_routing_analysis", "08_causal_experiments", "09_real_moes"):
        nb = json.loads((REPO / "notebooks" / f"{name}.ipynb").read_text(encoding="utf-8"))
        code = "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")
        # load_heldout_sample, or moe_lab.notebook_utils.heldout_by_domain (the same sample grouped by domain)
        assert re.search(r"\b(load_heldout_sample|heldout_by_domain)\(", code), \
            f"{name} does not trace the shipped held-out sample"
        assert ".heldout" not in code, f"{name} still reads a corpus build's held-out split"
