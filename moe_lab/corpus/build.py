"""Assemble the corpus from the domain modules, split it, write it and read it back."""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import io
import json
import os
import random
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Iterable, Iterator

from tqdm.auto import tqdm

from .base import (CHARS_PER_TOKEN, DOMAINS, HELDOUT_PERCENT, SIZES, Corpus, Document, Item, package_dist, round_robin,
                   stable_int)
from .english import english_docs
from .languages import LANGS, english_interface_items, language_docs, requires
from .latex import latex_docs
from .mathematics import math_docs
from .prose import ProseSet, aligned_paragraphs, is_heldout_page, load_prose, prose_items, split_key
from .python_source import python_docs
from .records import REQUIRES as RECORDS_REQUIRES
from .records import records_docs

#: Where each domain's documents come from: a function of a seeded ``random.Random`` that
#: yields :data:`~moe_lab.corpus.base.Item` s. Adding a domain takes a module with such a
#: function, an entry here (and in ``REQUIRES`` if it needs the ``corpus`` extra), and its name
#: in ``base.DOMAINS`` / ``base.CHARS_PER_TOKEN``. The language domains (``languages.LANGS``)
#: also collect translation pairs, so they are called with the ``parallel`` list.
SOURCES: dict[str, Callable[[random.Random], Iterator[Item]]] = {
    "python": python_docs, "english": english_docs, "math": math_docs, "data": records_docs, "latex": latex_docs,
}
#: Modules of the ``corpus`` extra (``pip install 'moe_lab[corpus]'``) each domain needs.
REQUIRES: dict[str, tuple[str, ...]] = {"data": RECORDS_REQUIRES, **{lang: requires(lang) for lang in LANGS}}
INSTALL_EXTRA = "pip install 'moe_lab[corpus]'"


#: With real prose, the English domain is this many times the common budget (its real prose alone,
#: books plus everyday text, is nearly twice the size of one domain; at 2.0 all of it fits) ...
PROSE_BUDGET_SCALE: dict[str, float] = {"english": 2.0}
#: ... and takes this many real-prose documents for each technical one (docstrings, READMEs), with
#: JupyterLab's English interface strings (menus, dialogs, error messages) interleaved as well.
ENGLISH_PROSE_PER_DOC = 3


def domain_items(domain: str, rng: random.Random, parallel: list[dict], prose: ProseSet | None = None,
                 budget: int = 0) -> Iterator[Item]:
    """The stream of documents of one domain (with ``prose``: real prose in the language domains,
    and the English prose interleaved with the English sources)."""
    if domain in LANGS:
        return language_docs(domain, rng, parallel, prose, budget)
    if domain == "english" and prose is not None:
        # ENGLISH_PROSE_PER_DOC real-prose documents for each docstring/README/reference-manual one,
        # and one interface-string document beside them while those last
        english_prose = prose_items(prose, "en")
        return round_robin(*[english_prose] * ENGLISH_PROSE_PER_DOC, english_docs(rng), english_interface_items())
    return SOURCES[domain](rng)


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def check_extra(domains: Iterable[str]) -> None:
    """Fail early, naming the install command, when a package of the ``corpus`` extra is missing
    (without it the language domains would silently lose their real text)."""
    missing = sorted({m for d in domains for m in REQUIRES.get(d, ()) if not _importable(m)})
    if missing:
        raise ImportError(f"building the corpus needs the `corpus` extra; missing modules: {', '.join(missing)}. "
                          f"Install it with: {INSTALL_EXTRA}")


def is_heldout_document(doc: Document) -> bool:
    """The split rule: held out when the document's page (real prose: the same page in every
    language) or its domain/id hashes into the held-out share. The same in every build size.
    (:func:`build_corpus` may also hold out one extra document in a domain that would otherwise
    have none.)"""
    page = split_key(doc.id)  # real prose: held out by page, the same page in every language
    if page is not None:
        return is_heldout_page(*page.split("/", 1))
    return stable_int(f"{doc.domain}/{doc.id}") % 100 < HELDOUT_PERCENT


def _split(docs: list[Document]) -> tuple[list[Document], list[Document]]:
    """Hash-based split, fixed up so every domain has at least one held-out document."""
    held = [d for d in docs if is_heldout_document(d)]
    if not held and len(docs) > 1:
        # never a prose page by itself: its translations in other domains would stay in training
        pool = [d for d in docs if split_key(d.id) is None] or docs
        held = [min(pool, key=lambda d: stable_int(f"{d.domain}/{d.id}"))]
    held_ids = {d.id for d in held}
    return [d for d in docs if d.id not in held_ids], held


def _environment(prose: ProseSet | None = None) -> dict:
    versions = {}
    for name in ["faker", "babel"] + [c["catalogue"] for c in LANGS.values()]:
        dist = package_dist(name)
        versions[name] = dist.version if dist else None
    env = {"python": sys.version.split()[0], "packages": versions}
    if prose is not None:
        env["debian_packages"] = {name: src["version"] for name, src in prose.sources.items()}
    return env


def build_corpus(out_dir: str | os.PathLike | None = None, size: str = "small", seed: int = 0,
                 progress: bool = True, domains: Iterable[str] | None = None,
                 prose: str | os.PathLike | ProseSet | None = None) -> Corpus:
    """Assemble the corpus (deterministic for a given seed and environment).

    Each domain receives the same approximate token budget (``SIZES[size]``,
    converted to characters with ``CHARS_PER_TOKEN``; with ``prose``, English gets
    ``PROSE_BUDGET_SCALE`` times it); domains
    whose sources run dry stay smaller. With ``out_dir`` the result is also
    written there (atomically); without it everything stays in memory.

    ``prose``: a directory holding the downloaded Debian packages of :mod:`moe_lab.corpus.prose`
    (or a loaded ``ProseSet``). Their real paragraphs then make up the French, German,
    Spanish and Italian domains (synthetic text at most ``MAX_SYNTHETIC_SHARE``) and join
    the English one; without it the corpus is the v3 one, from pip-installed material only.
    """
    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    domains = list(DOMAINS if domains is None else domains)
    unknown = set(domains) - set(DOMAINS)
    if unknown:
        raise ValueError(f"unknown domains: {sorted(unknown)}")
    check_extra(domains)
    scale = PROSE_BUDGET_SCALE if prose is not None else {}
    budgets = {d: int(SIZES[size] * CHARS_PER_TOKEN[d] * scale.get(d, 1.0)) for d in domains}
    if prose is not None and not isinstance(prose, ProseSet):
        prose = load_prose(prose)
    train, heldout, parallel, sources = [], [], [], {}
    with tqdm(total=sum(budgets.values()), unit="char", unit_scale=True, desc="corpus", disable=not progress) as bar:
        for domain in domains:
            budget = budgets[domain]
            bar.set_postfix_str(domain)
            rng = random.Random(f"{seed}/{domain}")  # str seeds are hashed with SHA-512: stable across runs
            docs, total, dom_parallel, seen, texts = [], 0, [], set(), set()
            for doc, label, licence in domain_items(domain, rng, dom_parallel, prose, budget):
                if total >= budget:
                    break
                if doc.id in seen:
                    raise RuntimeError(f"duplicate document id {domain}/{doc.id}")
                digest = hashlib.sha1(doc.text.encode("utf-8")).digest()
                if digest in texts:  # identical text under two ids (e.g. copied docstrings)
                    continue
                seen.add(doc.id)
                texts.add(digest)
                docs.append(doc)
                total += len(doc.text)
                src = sources.setdefault(domain, {}).setdefault(label, {"license": licence, "documents": 0, "chars": 0})
                src["documents"] += 1
                src["chars"] += len(doc.text)
                bar.update(min(len(doc.text), budget - (total - len(doc.text))))
            bar.update(max(0, budget - total))
            tr, he = _split(docs)
            held_ids = {d.id for d in he}
            parallel.extend({**p, "split": "heldout" if p["doc_id"] in held_ids else "train"}
                            for p in dom_parallel if p["doc_id"] in seen)
            train.extend(tr)
            heldout.extend(he)
    meta = {"size": size, "seed": seed, "sources": sources, "environment": _environment(prose)}
    aligned = []
    if prose is not None:
        meta["prose"] = prose.sources
        aligned = aligned_paragraphs(prose)
    corpus = Corpus(train=train, heldout=heldout, domains=domains, parallel=parallel, meta=meta, aligned=aligned)
    if out_dir is not None:
        write_corpus(corpus, out_dir)
    return corpus


def _dump_doc(doc: Document) -> str:
    return json.dumps(asdict(doc), ensure_ascii=False) + "\n"


def _atomic_write(files: dict[Path, Callable[[io.TextIOBase], None]]) -> None:
    """Write every file to a temp file first and only then rename them all into place,
    so a failure leaves the previous corpus (or nothing) instead of a half-written one."""
    temps: list[tuple[str, Path]] = []
    umask = os.umask(0)
    os.umask(umask)
    try:
        for path, writer in files.items():
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            temps.append((tmp, path))
            with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as fh:
                writer(fh)
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600 files; use the usual mode
        for tmp, path in temps:
            os.replace(tmp, path)
    except BaseException:
        for tmp, _ in temps:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        raise


def write_corpus(corpus: Corpus, out_dir: str | os.PathLike, count_tokens: bool = False) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stats = {"size": corpus.meta.get("size"), "seed": corpus.meta.get("seed"), "domains": corpus.domains,
             "splits": corpus.stats(count_tokens=count_tokens), "parallel_pairs": len(corpus.parallel),
             "aligned_paragraphs": len(corpus.aligned),
             "sources": corpus.meta.get("sources", {}), "environment": corpus.meta.get("environment", {})}
    if corpus.meta.get("prose"):
        stats["prose"] = corpus.meta["prose"]

    def lines(items: Iterable[str]) -> Callable[[io.TextIOBase], None]:
        return lambda fh: fh.writelines(items)

    _atomic_write({
        out / "train.jsonl": lines(_dump_doc(d) for d in corpus.train),
        out / "heldout.jsonl": lines(_dump_doc(d) for d in corpus.heldout),
        out / "parallel.jsonl": lines(json.dumps(p, ensure_ascii=False) + "\n" for p in corpus.parallel),
        out / "aligned.jsonl": lines(json.dumps(p, ensure_ascii=False) + "\n" for p in corpus.aligned),
        out / "stats.json": lines([json.dumps(stats, ensure_ascii=False, indent=2) + "\n"]),
    })
    return out


def load_corpus(directory: str | os.PathLike) -> Corpus:
    """Read a corpus written by :func:`build_corpus` / the command line."""
    d = Path(directory)

    def read(name: str) -> list[dict]:
        path = d / name
        if not path.exists():
            return []
        with open(path, encoding="utf-8") as fh:
            return [json.loads(line) for line in fh if line.strip()]

    if not (d / "train.jsonl").exists():
        raise FileNotFoundError(f"no corpus in {d} (expected train.jsonl); build it with "
                                f"`python -m moe_lab.corpus --out {d}`")
    meta = json.loads((d / "stats.json").read_text(encoding="utf-8")) if (d / "stats.json").exists() else {}
    train = [Document(**x) for x in read("train.jsonl")]
    heldout = [Document(**x) for x in read("heldout.jsonl")]
    present = {doc.domain for doc in train + heldout}
    domains = meta.get("domains") or [x for x in DOMAINS if x in present] + sorted(present - set(DOMAINS))
    return Corpus(train=train, heldout=heldout, domains=list(domains), parallel=read("parallel.jsonl"), meta=meta,
                  aligned=read("aligned.jsonl"))


def sample_texts(corpus: Corpus, domain: str, n: int, split: str = "heldout", seed: int = 0,
                 max_chars: int | None = None) -> list[str]:
    """Up to ``n`` texts of one domain, picked reproducibly (for notebooks)."""
    if domain not in corpus.domains:
        raise KeyError(f"domain {domain!r} not in corpus; available: {corpus.domains}")
    docs = [d for d in corpus.split(split) if d.domain == domain]
    picked = random.Random(f"{seed}/{domain}/{split}").sample(docs, min(n, len(docs)))
    return [d.text[:max_chars] if max_chars else d.text for d in picked]
