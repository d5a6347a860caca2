"""The first thing a learner does: type a sentence of their own. How well does the model know it?

``data/eval/everyday_sentences.json`` holds the same 12 sentences in English, French, German,
Spanish and Italian, written by hand for moe_lab (an error message, a server update, walking to
the station in the rain, ...) and appearing in no corpus source. :func:`sentence_nll` scores
them: the mean negative log-likelihood, in nats per token, of each language's tokens given the
tokens before them (every sentence starts after ``<s>``, as every training document does).
A uniform guess over the 32,000-token vocabulary scores ln(32000) = 10.37.

    model, tok = moe_lab.load_model("data/tiny-mixtral"), moe_lab.load_tokenizer()
    sentence_nll(model, tok)            # {"en": 5.9, "fr": 7.8, ...}

``data/eval/aligned_heldout.jsonl`` (:func:`load_aligned_sample`) holds 61 paragraphs of the
corpus' aligned set in all five languages (each translated: no two versions near copies), all from held-out pages (never trained on, in any
language), so the language-vs-content study (:mod:`moe_lab.analysis.language`) runs without the
Debian packages. Their text is from *The Debian Administrator's Handbook* (Raphaël Hertzog,
Roland Mas; GPL-2.0-or-later or CC-BY-SA-3.0) and GNOME Help (the GNOME Documentation Project;
CC-BY-SA-3.0), unchanged.

``data/eval/heldout_sample.jsonl`` (:func:`load_heldout_sample`) holds held-out documents of every
domain of the demo model's corpus that share no text with its training split (no identical
document, no line of 60 or more characters in common): what notebook 06 traces. It is written by
``scripts/make_heldout_sample.py`` from the training corpus.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from .devices import resolve_device

EVAL_SENTENCES = Path(__file__).resolve().parent.parent / "data" / "eval" / "everyday_sentences.json"
EVAL_LANGS: tuple[str, ...] = ("en", "fr", "de", "es", "it")
LANGUAGE_NAMES = {"en": "english", "fr": "french", "de": "german", "es": "spanish", "it": "italian"}  # corpus domains
ALIGNED_SAMPLE = EVAL_SENTENCES.parent / "aligned_heldout.jsonl"
HELDOUT_SAMPLE = EVAL_SENTENCES.parent / "heldout_sample.jsonl"
MIN_SHARED_LINE = 60  # a line this long (stripped) found in training text counts as shared text


def load_eval_sentences(path: str | os.PathLike | None = None) -> dict[str, list[str]]:
    """{language: [sentence, ...]} from the evaluation file (the same order in every language)."""
    path = Path(path) if path is not None else EVAL_SENTENCES
    if not path.exists():
        raise FileNotFoundError(f"evaluation sentences not found: {path}")
    rows = json.loads(path.read_text(encoding="utf-8")).get("sentences")
    if not isinstance(rows, list) or not rows:
        raise ValueError(f"{path}: expected a non-empty list under 'sentences', found {type(rows).__name__}")
    out: dict[str, list[str]] = {}
    for i, row in enumerate(rows):
        for lang in EVAL_LANGS:
            if not isinstance(row.get(lang), str) or not row[lang].strip():
                raise ValueError(f"{path}: sentence {i} ({row.get('id')!r}) has no {lang!r} text")
            out.setdefault(lang, []).append(row[lang])
    return out


def load_aligned_sample(path: str | os.PathLike | None = None) -> list[dict]:
    """Rows ``{"id", "source", "page", "index", "split", "en", "fr", "de", "es", "it"}`` of the
    shipped aligned sample (or of a corpus' ``aligned.jsonl``)."""
    path = Path(path) if path is not None else ALIGNED_SAMPLE
    if not path.exists():
        raise FileNotFoundError(f"aligned paragraphs not found: {path}")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    for i, row in enumerate(rows):
        missing = [k for k in ("id", *EVAL_LANGS) if not row.get(k)]
        if missing:
            raise ValueError(f"{path}: line {i + 1} lacks {missing}")
    return rows


def load_heldout_sample(path: str | os.PathLike | None = None) -> list[dict]:
    """Rows ``{"domain", "id", "text"}`` of the shipped held-out sample (see the module docstring)."""
    path = Path(path) if path is not None else HELDOUT_SAMPLE
    if not path.exists():
        raise FileNotFoundError(f"held-out sample not found: {path} (write it with scripts/make_heldout_sample.py)")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    for i, row in enumerate(rows):
        missing = [k for k in ("domain", "id", "text") if not row.get(k)]
        if missing:
            raise ValueError(f"{path}: line {i + 1} lacks {missing}")
    return rows


def shared_lines(text: str, training_lines: set[str], min_chars: int = MIN_SHARED_LINE) -> list[str]:
    """The lines of ``text`` (stripped, at least ``min_chars`` long) that occur in ``training_lines``."""
    return [ln.strip() for ln in text.splitlines() if len(ln.strip()) >= min_chars and ln.strip() in training_lines]


@torch.no_grad()
def token_nlls(model, tokenizer, text: str, *, device=None) -> torch.Tensor:
    """NLL (nats) of each token of ``text`` given ``<s>`` and the tokens before it. [n_tokens], on
    the model's device (``device``: None or the model's device, :mod:`moe_lab.devices`)."""
    ids = torch.tensor([tokenizer.encode(text, bos=True)], device=resolve_device(model, device))  # [1, 1+n]
    logits = model(ids[:, :-1]).float()  # [1, n, V]
    return F.cross_entropy(logits[0], ids[0, 1:], reduction="none")  # [n]


def sentence_nll(model, tokenizer, sentences: dict[str, list[str]] | None = None,
                 per_sentence: bool = False, *, device=None) -> dict:
    """Mean NLL per token for each language: all its sentences' token NLLs pooled (so a long
    sentence weighs more than a short one). ``per_sentence=True`` returns
    ``{lang: {"mean": ..., "tokens": n, "sentences": [mean NLL of each sentence]}}`` instead.
    Runs on the model's device (``device``: None or the model's device); returns Python floats."""
    sentences = load_eval_sentences() if sentences is None else sentences
    was_training = model.training
    model.eval()
    try:
        out = {}
        for lang, texts in sentences.items():
            nlls = [token_nlls(model, tokenizer, t, device=device) for t in texts]
            total, n = sum(float(x.sum()) for x in nlls), sum(len(x) for x in nlls)
            mean = total / n if n else math.nan
            out[lang] = ({"mean": mean, "tokens": n, "sentences": [float(x.mean()) for x in nlls]}
                         if per_sentence else mean)
    finally:
        model.train(was_training)
    return out
