"""What every corpus module shares: the documents, the corpus, the budgets and small helpers.

A domain module (``python_source``, ``english``, ``mathematics``, ``languages``,
``records``, ``latex``) turns a seeded ``random.Random`` into a stream of
:data:`Item` s, ``(Document, source label, licence)``; ``build.py`` takes
documents from each stream until the domain's budget is spent.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.metadata
import importlib.util
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

from ..tokenizer import load_tokenizer

DOMAINS: tuple[str, ...] = (
    "python", "english", "math", "french", "german", "spanish", "italian", "data", "latex",
)
#: Approximate tokens per domain. Every domain is capped at the same token budget so
#: that the domains are roughly balanced for the model; "tiny" only keeps tests fast.
SIZES: dict[str, int] = {"tiny": 10_000, "small": 70_000, "full": 800_000}
#: Characters per Mixtral (v1 SentencePiece) token, measured on a full build. Used to
#: turn the token budget into a character budget without needing a tokenizer, so the
#: output does not depend on one: maths and JSON cost ~2 chars/token, prose ~4.
CHARS_PER_TOKEN: dict[str, float] = {
    "python": 3.4, "english": 4.1, "math": 1.95, "french": 2.95, "german": 2.95,
    "spanish": 3.0, "italian": 2.9, "data": 2.0, "latex": 2.35,
}
HELDOUT_PERCENT = 5
#: Documents are capped at ~1k tokens so that a short training context sees
#: whole documents and a held-out sample is never one giant file.
MAX_DOC_CHARS = 4_000
PSF = "PSF-2.0"
FILES = ("train.jsonl", "heldout.jsonl", "parallel.jsonl", "aligned.jsonl", "stats.json")
#: With real prose (``build_corpus(prose=...)``), generated template text and interface strings are
#: at most this share of a language domain.
MAX_SYNTHETIC_SHARE = 0.25


@dataclass(frozen=True)
class Document:
    domain: str
    id: str
    text: str


@dataclass
class Corpus:
    """Documents split into train / held-out, plus provenance metadata."""

    train: list[Document]
    heldout: list[Document]
    domains: list[str]
    parallel: list[dict] = field(default_factory=list)
    meta: dict = field(default_factory=dict)
    aligned: list[dict] = field(default_factory=list)  # corpus.prose.aligned_paragraphs rows

    def split(self, name: str) -> list[Document]:
        if name not in ("train", "heldout"):
            raise ValueError(f"unknown split {name!r}; expected 'train' or 'heldout'")
        return self.train if name == "train" else self.heldout

    def stats(self, count_tokens: bool = False) -> dict:
        """Documents and characters (and optionally tokens) per split and domain."""
        counter = _token_counter() if count_tokens else None
        out: dict = {}
        for split in ("train", "heldout"):
            per = {d: {"documents": 0, "chars": 0} for d in self.domains}
            for doc in self.split(split):
                row = per.setdefault(doc.domain, {"documents": 0, "chars": 0})
                row["documents"] += 1
                row["chars"] += len(doc.text)
                if counter is not None:
                    row["tokens"] = row.get("tokens", 0) + counter(doc.text)
            out[split] = per
        return out


def stable_int(text: str) -> int:
    """A hash that, unlike ``hash()``, is the same in every process."""
    return int.from_bytes(hashlib.sha1(text.encode("utf-8")).digest()[:8], "big")


def pack_paragraphs(paragraphs: Iterable[str], max_chars: int = MAX_DOC_CHARS, sep: str = "\n\n") -> list[str]:
    """Greedily pack paragraphs into chunks of at most ``max_chars`` (hard-cutting giants)."""
    out, cur = [], ""
    for p in paragraphs:
        while len(p) > max_chars:  # a single oversized paragraph: cut at a line break if possible
            cut = p.rfind("\n", 0, max_chars)
            cut = cut if cut > max_chars // 2 else max_chars
            if cur:
                out.append(cur)
                cur = ""
            out.append(p[:cut].rstrip())
            p = p[cut:].lstrip("\n")
        if cur and len(cur) + len(sep) + len(p) > max_chars:
            out.append(cur)
            cur = ""
        cur = f"{cur}{sep}{p}" if cur else p
    if cur:
        out.append(cur)
    return out


def round_robin(*iterators: Iterator) -> Iterator:
    """Interleave sources so that even a small build contains a bit of each."""
    its = [iter(i) for i in iterators]
    while its:
        for it in list(its):
            try:
                yield next(it)
            except StopIteration:
                its.remove(it)


def dist_license(dist: importlib.metadata.Distribution) -> str:
    """Best-effort licence of an installed distribution, from its metadata."""
    md = dist.metadata
    if md.get("License-Expression"):
        return md["License-Expression"]
    classifiers = [c.split("::")[-1].strip() for c in md.get_all("Classifier") or [] if c.startswith("License ::")]
    if classifiers:
        return "; ".join(classifiers)
    lic = (md.get("License") or "").strip()
    return lic.splitlines()[0][:80] if lic else "unknown"


@functools.lru_cache(maxsize=None)
def _packages_distributions() -> dict[str, list[str]]:
    return importlib.metadata.packages_distributions()


def package_dist(package: str) -> importlib.metadata.Distribution | None:
    names = _packages_distributions().get(package) or []
    for name in sorted(names):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            return importlib.metadata.distribution(name)
    return None


def package_dir(package: str) -> Path | None:
    """Directory of an installed package, located without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def rel_files(root: Path, pattern: str) -> list[Path]:
    """Sorted so that the corpus does not depend on directory listing order."""
    return sorted(root.rglob(pattern), key=lambda p: p.relative_to(root).as_posix())


# A source yields (Document, source label, licence) so the builder can record provenance.
Item = tuple[Document, str, str]


def _token_counter() -> Callable[[str], int] | None:
    """Optional: count tokens with the project tokenizer if it exists and works."""
    try:
        encode = load_tokenizer().encode
        try:  # count the text's own tokens, without the <s> the tokenizer may prepend
            encode("probe", bos=False)
            return lambda text: len(encode(text, bos=False))
        except TypeError:
            encode("probe")
            return lambda text: len(encode(text))
    except Exception as exc:  # the tokenizer's files may be missing
        print(f"token counting unavailable ({type(exc).__name__}: {exc})", file=sys.stderr)
        return None
