"""Build a small multi-domain text corpus for training a tiny Mixtral.

Why this exists: the Mixtral paper studies which expert each token is routed to
on different Pile subsets (code, English prose, DM Mathematics, other
languages, ...). To reproduce that kind of analysis on a toy model we need a
corpus whose domains are clearly distinct, that is assembled locally without
any network access, and that is byte-for-byte reproducible, so that two people
who run ``python -m moe_lab.corpus --out data/corpus --size full --seed 0``
train on the same text.

Every domain is either *read* from material that ships with Python or with the
project's pip dependencies (stdlib source, the Python reference manual text,
package docstrings and descriptions, translation catalogues, JSON files) or
*generated* from a seeded ``random.Random`` (maths questions, LaTeX documents,
JSON/CSV records, template sentences in French/German/Spanish/Italian). Nothing
is committed: the text is rebuilt on demand. See ``data/DATA_CARD.md``.

Output layout of ``build_corpus(out_dir=...)``::

    train.jsonl      one {"domain", "id", "text"} object per line
    heldout.jsonl    same, ~5% of documents (chosen by a hash of domain/id)
    parallel.jsonl   English/other-language sentence pairs from catalogues
    aligned.jsonl    the same paragraph in en/fr/de/es/it (real prose only; empty without it)
    stats.json       documents/characters per domain and split, sources, licences
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import csv
import datetime as dt
import functools
import hashlib
import importlib.metadata
import importlib.util
import io
import json
import math
import os
import random
import re
import sys
import sysconfig
import tempfile
import tokenize
from dataclasses import asdict, dataclass, field
from decimal import ROUND_HALF_UP, Decimal
from fractions import Fraction
from pathlib import Path
from typing import Callable, Iterable, Iterator

from .prose import (APT_COMMAND, LANG_DOMAINS, MissingProseSources, ProseSet, aligned_paragraphs, is_heldout_page,
                    load_prose, prose_documents, split_key)

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
#: With real prose, generated template text and interface strings are at most this share of a language domain.
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
    aligned: list[dict] = field(default_factory=list)  # moe_lab.prose.aligned_paragraphs rows

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


# --------------------------------------------------------------------------- helpers

def _stable_int(text: str) -> int:
    """A hash that, unlike ``hash()``, is the same in every process."""
    return int.from_bytes(hashlib.sha1(text.encode("utf-8")).digest()[:8], "big")


def _chunks(paragraphs: Iterable[str], max_chars: int = MAX_DOC_CHARS, sep: str = "\n\n") -> list[str]:
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


def _round_robin(*iterators: Iterator) -> Iterator:
    """Interleave sources so that even a small build contains a bit of each."""
    its = [iter(i) for i in iterators]
    while its:
        for it in list(its):
            try:
                yield next(it)
            except StopIteration:
                its.remove(it)


def _dist_license(dist: importlib.metadata.Distribution) -> str:
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


def _package_dist(package: str) -> importlib.metadata.Distribution | None:
    names = _packages_distributions().get(package) or []
    for name in sorted(names):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            return importlib.metadata.distribution(name)
    return None


def _package_dir(package: str) -> Path | None:
    """Directory of an installed package, located without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _rel_files(root: Path, pattern: str) -> list[Path]:
    """Sorted so that the corpus does not depend on directory listing order."""
    return sorted(root.rglob(pattern), key=lambda p: p.relative_to(root).as_posix())


# A source yields (Document, source label, licence) so the builder can record provenance.
Item = tuple[Document, str, str]


# --------------------------------------------------------------------------- python

_SKIP_DIRS = {"test", "tests", "idle_test", "encodings", "pydoc_data", "site-packages",
              "dist-packages", "__pycache__", "lib2to3", "turtledemo"}


@functools.lru_cache(maxsize=None)
def _stdlib_files() -> tuple[tuple[str, Path], ...]:
    """Stdlib modules, pruning test suites, codec tables and third-party packages."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS]
        for name in filenames:
            path = Path(dirpath, name)
            if name.endswith(".py") and path.stat().st_size < 400_000:
                out.append((path.relative_to(root).as_posix(), path))
    return tuple(sorted(out))


def _stdlib_bucket(rel: str) -> str:
    """Stdlib files feed either the code domain or (docstrings only) the English
    domain, never both, so the two domains do not share text."""
    return "prose" if _stable_int(rel) % 3 == 0 else "code"


def _read_source(path: Path) -> str | None:
    try:
        with tokenize.open(path) as fh:
            return fh.read()
    except (OSError, SyntaxError, UnicodeDecodeError):
        return None


def _python_chunks(source: str) -> list[str]:
    """Split a module at top-level statements (functions, classes, header) so that a
    document is a self-contained unit of code rather than an arbitrary byte range."""
    tree = ast.parse(source)
    lines = source.splitlines(keepends=True)
    start = lambda n: min([n.lineno] + [d.lineno for d in getattr(n, "decorator_list", [])]) - 1  # noqa: E731
    starts = []
    for node in tree.body:
        starts.append(start(node))
        if isinstance(node, ast.ClassDef):  # big classes may be split between methods
            starts.extend(start(m) for m in node.body[1:] if isinstance(m, (ast.FunctionDef, ast.AsyncFunctionDef)))
    if not starts:
        return []
    starts[0] = 0  # keep the licence header / module docstring with the first statement
    bounds = sorted(set(starts)) + [len(lines)]
    pieces = ["".join(lines[a:b]).rstrip() for a, b in zip(bounds, bounds[1:])]
    return [c for c in _chunks([p for p in pieces if p.strip()], sep="\n\n") if len(c) >= 200]


def _python_docs(rng: random.Random) -> Iterator[Item]:
    files = [(rel, p) for rel, p in _stdlib_files() if _stdlib_bucket(rel) == "code"]
    rng.shuffle(files)
    for rel, path in files:
        source = _read_source(path)
        if source is None:
            continue
        try:
            chunks = _python_chunks(source)
        except SyntaxError:
            continue
        for i, chunk in enumerate(chunks):
            yield Document("python", f"stdlib/{rel}#{i}", chunk), "cpython-stdlib", PSF


# --------------------------------------------------------------------------- english

_FENCE = re.compile(r"(?ms)^[ \t]*(```|~~~).*?^[ \t]*\1[^\n]*$")
_UNDERLINE = re.compile(r"\s*([=*\-~^#+`_'\"])\1{2,}\s*")
_BULLET = re.compile(r"^\s*(?:[-*+\u2022]|\d+[.)])\s+")
_SECTION = re.compile(r"\s*(Parameters|Returns?|Raises|Yields?|See Also|Notes?|Examples?|References|Attributes|"
                      r"Methods|Other Parameters|Warns|Warnings?|Args|Arguments|Keyword Arguments|Todo)\s*:?\s*")
_PARAM_LINE = re.compile(r"^\s*[\w*]+(?:,\s*[\w*]+)*\s+:\s+\S|^\s*\w+ \([^)]*\):\s")
_INLINE_SUBS = [
    (re.compile(r"!\[[^\]]*\]\([^)]*\)"), ""),                     # markdown images / badges
    (re.compile(r"\[([^\]]+)\]\([^)]*\)"), r"\1"),                 # markdown links
    (re.compile(r":[\w:.+-]+:`~?([^`<]*?)\s*(?:<[^>]*>)?`"), r"\1"),  # rst roles
    (re.compile(r"`([^`<]+?)\s*<[^>]+>`_+"), r"\1"),               # rst links
    (re.compile(r"<[^>\n]+>"), ""),                               # html tags
    (re.compile(r"https?://\S+"), ""),                            # bare urls
    (re.compile(r"(\*\*|__|``|\*|`)(\S(?:.*?\S)?)\1_?"), r"\2"),   # emphasis / inline code marks
    (re.compile(r"^#+\s*"), ""),                                  # markdown heading marks
    (re.compile(r"\s{2,}"), " "),
]


def _clean_inline(text: str) -> str:
    for pattern, repl in _INLINE_SUBS:
        text = pattern.sub(repl, text)
    return text.strip()


def _prose_paragraphs(text: str, min_words: int = 6) -> list[str]:
    """Keep the prose of a docstring / README / manual page and drop code.

    Indented blocks, doctests, tables, directives and grammar productions are
    removed; wrapped lines are joined so each paragraph is one line of text.
    """
    text = _FENCE.sub("", text.replace("\r\n", "\n").expandtabs(4))
    out = []
    for block in re.split(r"\n[ \t]*\n", text):
        lines = [ln for ln in block.split("\n")
                 if ln.strip() and not _UNDERLINE.fullmatch(ln) and not _SECTION.fullmatch(ln)]
        if not lines or lines[0][:1].isspace():
            continue  # indented: code sample, literal block or quoted output
        if any(ln.lstrip().startswith((">>>", "...", "$ ", "|", "..", "%", "+--")) for ln in lines):
            continue
        items: list[list[str]] = []
        for ln in lines:
            if _PARAM_LINE.match(ln) and not _BULLET.match(ln):
                ln = _PARAM_LINE.sub("", ln) if "(" in ln.split(":")[0] else ""
            if _BULLET.match(ln) or not items:
                items.append([])
            items[-1].append(_BULLET.sub("", ln).strip())
        for item in items:
            para = _clean_inline(" ".join(x for x in item if x))
            words = para.split()
            if len(words) < min_words or "::=" in para or "`" in para or para.endswith(":"):
                continue
            letters = sum(c.isalpha() or c.isspace() for c in para) / len(para)
            if letters < 0.85 or not para[0].isupper():
                continue
            out.append(para)
    return out


_SCOPES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def _docstrings(source: str) -> list[str]:
    """Docstrings in source order; walks statements only (much faster than ast.walk)."""
    out = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, _SCOPES):
            doc = ast.get_docstring(node, clean=True)
            if doc and len(doc) >= 80:
                out.append(doc)
        for name in ("body", "orelse", "finalbody", "handlers"):
            for child in getattr(node, name, None) or ():
                if isinstance(child, (ast.stmt, ast.excepthandler)):
                    visit(child)

    visit(ast.parse(source))
    return out


def _docstring_docs(files: list[tuple[str, Path]], label: str, licence: str, prefix: str) -> Iterator[Item]:
    for rel, path in files:
        source = _read_source(path)
        if source is None:
            continue
        try:
            paragraphs = [p for d in _docstrings(source) for p in _prose_paragraphs(d)]
        except (SyntaxError, ValueError, RecursionError):
            continue
        for i, chunk in enumerate(_chunks(paragraphs)):
            if len(chunk) >= 200:
                yield Document("english", f"{prefix}/{rel}#{i}", chunk), label, licence


def _topics_docs() -> Iterator[Item]:
    """The Python reference manual rendered as plain text (``pydoc_data.topics``)."""
    from pydoc_data.topics import topics
    for key in sorted(topics):
        paragraphs = _prose_paragraphs(topics[key])
        for i, chunk in enumerate(_chunks(paragraphs)):
            if len(chunk) >= 200:
                yield Document("english", f"pydoc_topics/{key}#{i}", chunk), "python-reference-manual", PSF


def _metadata_docs() -> Iterator[Item]:
    """Long descriptions (READMEs) of installed distributions are English prose."""
    seen: set[str] = set()
    dists = sorted(importlib.metadata.distributions(), key=lambda d: (d.metadata["Name"] or "").lower())
    for dist in dists:
        name = (dist.metadata["Name"] or "").lower()
        body = dist.metadata.get_payload() or dist.metadata.get("Description") or ""
        if not name or name in seen or not isinstance(body, str):
            continue
        seen.add(name)
        for i, chunk in enumerate(_chunks(_prose_paragraphs(body))):
            if len(chunk) >= 200:
                yield Document("english", f"metadata/{name}#{i}", chunk), f"pypi:{name}", _dist_license(dist)


def _zen_docs() -> Iterator[Item]:
    with contextlib.redirect_stdout(io.StringIO()):
        import this
    text = "".join(this.d.get(c, c) for c in this.s)
    yield Document("english", "zen_of_python", text), "cpython-stdlib", PSF


#: Third-party packages (core dependencies) whose docstrings are rich English prose.
_DOCSTRING_PACKAGES = ("numpy", "pandas", "torch")


def _english_docs(rng: random.Random) -> Iterator[Item]:
    stdlib = [(rel, p) for rel, p in _stdlib_files() if _stdlib_bucket(rel) == "prose"]
    rng.shuffle(stdlib)
    sources = [_zen_docs(), _topics_docs(),
               _docstring_docs(stdlib, "cpython-stdlib-docstrings", PSF, "stdlib"),
               _metadata_docs()]
    for pkg in _DOCSTRING_PACKAGES:
        root, dist = _package_dir(pkg), _package_dist(pkg)
        if root is None or dist is None:
            continue
        files = [(f"{pkg}/{p.relative_to(root).as_posix()}", p) for p in _rel_files(root, "*.py")
                 if not {"tests", "test", "testing"}.intersection(p.relative_to(root).parts)]
        rng.shuffle(files)
        label = f"pypi:{dist.metadata['Name'].lower()}"
        sources.append(_docstring_docs(files, label, _dist_license(dist), "docstrings"))
    yield from _round_robin(*sources)


# --------------------------------------------------------------------------- math

def _fmt(x) -> str:
    """DM-mathematics style numbers: integers plain, fractions as p/q, exact decimals."""
    if isinstance(x, Fraction):
        return str(x.numerator) if x.denominator == 1 else f"{x.numerator}/{x.denominator}"
    if isinstance(x, Decimal):
        s = format(x.normalize(), "f")
        return "0" if s in ("-0", "0") else s
    return str(x)


def _poly_str(coeffs: dict[int, int], var: str) -> str:
    """``{2: 3, 1: -1, 0: 5}`` -> ``3*x**2 - x + 5`` (Python syntax, as in DM maths)."""
    parts = []
    for power in sorted(coeffs, reverse=True):
        c = coeffs[power]
        if c == 0:
            continue
        mono = "" if power == 0 else var if power == 1 else f"{var}**{power}"
        mag = abs(c)
        body = str(mag) if not mono else (mono if mag == 1 else f"{mag}*{mono}")
        sign = "-" if c < 0 else "+"
        parts.append(f"-{body}" if not parts and c < 0 else body if not parts else f"{sign} {body}")
    return " ".join(parts) or "0"


def _linear(a: int, var: str, b: int) -> str:
    return _poly_str({1: a, 0: b}, var)


_VARS = "abcdfghjklmnpqrstuvwxyz"


def _eval_expr(expr: str) -> Fraction:
    """Exact evaluation of + - * / ( ) over integers/decimals (no ``eval``)."""
    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return Fraction(str(node.value))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            return -ev(node.operand) if isinstance(node.op, ast.USub) else ev(node.operand)
        if isinstance(node, ast.BinOp):
            a, b = ev(node.left), ev(node.right)
            ops = {ast.Add: a.__add__, ast.Sub: a.__sub__, ast.Mult: a.__mul__, ast.Div: a.__truediv__}
            if type(node.op) in ops:
                return ops[type(node.op)](b)
            if isinstance(node.op, ast.Pow):
                return a ** int(b)
        raise ValueError(f"unsupported expression: {expr}")
    return ev(ast.parse(expr, mode="eval"))


def _rand_decimal(rng: random.Random, lo: int, hi: int, places: int) -> Decimal:
    return Decimal(rng.randint(lo * 10**places, hi * 10**places)).scaleb(-places)


def _rand_number(rng: random.Random, big: bool = False) -> int | Decimal:
    if rng.random() < 0.25:
        return _rand_decimal(rng, -50 if big else -9, 500 if big else 9, rng.choice([1, 1, 2, 3]))
    return rng.randint(-(10 ** rng.randint(1, 4)), 10 ** rng.randint(1, 4)) if big else rng.randint(-30, 30)


def _q_add_sub(rng):
    a, b = _rand_number(rng, True), _rand_number(rng, True)
    form = rng.randrange(8)
    if form == 0:
        return f"What is {_fmt(a)} + {_fmt(b)}?", a + b
    if form == 1:
        return f"Calculate {_fmt(a)} - {_fmt(b)}.", a - b
    if form == 2:
        return f"Add {_fmt(a)} and {_fmt(b)}.", a + b
    if form == 3:
        return f"Subtract {_fmt(b)} from {_fmt(a)}.", a - b
    if form == 4:
        return f"What is {_fmt(a)} minus {_fmt(b)}?", a - b
    if form == 5:
        return f"Sum {_fmt(a)} and {_fmt(b)}.", a + b
    if form == 6:
        return f"What is {_fmt(b)} less than {_fmt(a)}?", a - b
    return f"Total of {_fmt(a)} and {_fmt(b)}.", a + b


def _q_mul_div(rng):
    if rng.random() < 0.5:
        a, b = _rand_number(rng), _rand_number(rng, rng.random() < 0.3)
        form = rng.randrange(4)
        text = [f"What is {_fmt(a)} * {_fmt(b)}?", f"Multiply {_fmt(a)} and {_fmt(b)}.",
                f"Calculate {_fmt(a)}*{_fmt(b)}.", f"What is the product of {_fmt(a)} and {_fmt(b)}?"][form]
        return text, a * b
    b = rng.choice([i for i in range(-25, 26) if i not in (0, 1)])
    q = rng.randint(-300, 300)
    a = b * q
    form = rng.randrange(4)
    text = [f"Divide {a} by {b}.", f"What is {a} divided by {b}?", f"Calculate {a}/{b}.",
            f"Evaluate {a}/{b}."][form]
    return text, q


def _q_mixed(rng):
    r = lambda: rng.randint(-20, 20)  # noqa: E731
    a, b, c, e = r(), r(), r(), r()
    d = rng.choice([2, 3, 4, 5, 6, 7, -2, -3, -4])
    y = r()
    x = d * rng.randint(-9, 9) + y  # (x - y) is divisible by d
    expr = rng.choice([
        f"{a} + {b} - {c}", f"{a} - ({b} - {c})", f"({a} + {b})*{c}", f"{a}*{b} + {c}",
        f"({x} - {y})/{d}", f"{a} + ({x} - {y})/{d}", f"{a}*({b} + {c}) - {e}", f"-{abs(a)} + {b}*{c}",
        f"{a} - {b} + {c} - {e}", f"({a} - {b})*({c} + {e})", f"{Fraction(a, d)} + {Fraction(b, abs(d) + 1)}",
    ])
    value = _eval_expr(expr)
    template = rng.choice(["What is {}?", "Evaluate {}.", "Calculate {}.", "What is the value of {}?", "Compute {}."])
    return template.format(expr), value


def _q_linear(rng):
    v = rng.choice(_VARS)
    s = rng.randint(-12, 12)
    a = rng.choice([i for i in range(-9, 10) if i])
    b = rng.randint(-40, 40)
    if rng.random() < 0.5:
        if rng.random() < 0.5:
            return f"Solve {_linear(a, v, b)} = {a * s + b} for {v}.", s
        return f"Solve 0 = {_linear(a, v, -a * s)} for {v}.", s
    c = rng.choice([i for i in range(-9, 10) if i not in (0, a)])
    d = (a - c) * s + b
    return f"Solve {_linear(a, v, b)} = {_linear(c, v, d)} for {v}.", s


def _q_linear_2d(rng):
    v, w = rng.sample(_VARS, 2)
    sv, sw = rng.randint(-9, 9), rng.randint(-9, 9)
    while True:
        a, b, c, d = (rng.choice([i for i in range(-6, 7) if i]) for _ in range(4))
        if a * d - b * c:
            break
    eq1 = f"{_poly_str({1: a}, v)} + {_poly_str({1: b}, w)} = {a * sv + b * sw}".replace("+ -", "- ")
    eq2 = f"{_poly_str({1: c}, v)} + {_poly_str({1: d}, w)} = {c * sv + d * sw}".replace("+ -", "- ")
    return f"Solve {eq1}, {eq2} for {v}.", sv


def _rand_poly(rng, max_degree=5) -> dict[int, int]:
    deg = rng.randint(2, max_degree)
    coeffs = {p: rng.randint(-9, 9) for p in range(deg + 1)}
    coeffs[deg] = rng.choice([i for i in range(-9, 10) if i])
    return coeffs


def _derivative(coeffs: dict[int, int], times: int = 1) -> dict[int, int]:
    for _ in range(times):
        coeffs = {p - 1: c * p for p, c in coeffs.items() if p > 0}
    return coeffs


def _q_calculus(rng):
    v = rng.choice("xyzabcdfghjklmnpqrstw")
    coeffs = _rand_poly(rng)
    poly = _poly_str(coeffs, v)
    k = rng.choice([1, 1, 1, 2, 2, 3])
    order = {1: "", 2: "second ", 3: "third "}[k]
    if k == 1 and rng.random() < 0.4:
        return f"Differentiate {poly} with respect to {v}.", _poly_str(_derivative(coeffs), v)
    if rng.random() < 0.3:
        f = rng.choice("fghjkmnpqrstuvw")
        return (f"Let {f}({v}) = {poly}. What is the {order}derivative of {f}({v}) wrt {v}?",
                _poly_str(_derivative(coeffs, k), v))
    return f"Find the {order}derivative of {poly} wrt {v}.", _poly_str(_derivative(coeffs, k), v)


def _q_evaluate(rng):
    v = rng.choice("xyzabcdfghjklmnpqrstw")
    f = rng.choice("fghjkmnpqrstuvw")
    coeffs = _rand_poly(rng, 3)
    x0 = rng.randint(-6, 6)
    value = sum(c * x0**p for p, c in coeffs.items())
    return f"Let {f}({v}) = {_poly_str(coeffs, v)}. What is {f}({x0})?", value


def _is_prime(n: int) -> bool:
    return n > 1 and all(n % p for p in range(2, math.isqrt(n) + 1))


def _q_numbers(rng):
    form = rng.randrange(9)
    if form in (0, 1):
        g = rng.randint(2, 60)
        m, n = rng.sample(range(1, 40), 2)
        a, b = g * m, g * n
        if form == 0:
            text = rng.choice(["What is the greatest common divisor of {} and {}?",
                               "Calculate the highest common factor of {} and {}.",
                               "What is the greatest common factor of {} and {}?"])
            return text.format(a, b), math.gcd(a, b)
        text = rng.choice(["What is the lowest common multiple of {} and {}?",
                           "Calculate the least common multiple of {} and {}.",
                           "What is the smallest common multiple of {} and {}?"])
        return text.format(a, b), a * b // math.gcd(a, b)
    if form == 2:
        a, b = rng.randint(10, 5000), rng.randint(2, 60)
        text = rng.choice(["What is the remainder when {} is divided by {}?",
                           "Calculate the remainder when {} is divided by {}."])
        return text.format(a, b), a % b
    if form == 3:
        n = rng.randint(2, 20000)
        if rng.random() < 0.5:
            while not _is_prime(n):
                n += 1
        return rng.choice(["Is {} a prime number?", "Is {} prime?"]).format(n), _is_prime(n)
    if form == 4:
        n = rng.randint(12, 20000)
        factors = [p for p in range(2, n + 1) if n % p == 0 and _is_prime(p)]
        if rng.random() < 0.5:
            return f"List the prime factors of {n}.", ", ".join(map(str, factors))
        return f"What is the smallest prime factor of {n}?", factors[0]
    if form == 5:
        b = rng.randint(2, 40)
        a = b * rng.randint(2, 300) + (0 if rng.random() < 0.5 else rng.randint(1, b - 1))
        text = rng.choice(["Is {a} a multiple of {b}?", "Does {b} divide {a}?", "Is {a} divisible by {b}?"])
        return text.format(a=a, b=b), a % b == 0
    if form == 6:
        n = rng.randint(1000, 9_999_999)
        place = rng.randrange(4)
        name = ["units", "tens", "hundreds", "thousands"][place]
        return f"What is the {name} digit of {n}?", (n // 10**place) % 10
    if form == 7:
        start, step = rng.randint(-50, 50), rng.choice([i for i in range(-15, 16) if i])
        if rng.random() < 0.5:
            seq = [start + step * i for i in range(5)]
            nxt = start + step * 5
        else:  # quadratic: second differences constant
            c2 = rng.choice([-3, -2, -1, 1, 2, 3])
            seq = [start + step * i + c2 * i * i for i in range(6)]
            nxt, seq = seq[5], seq[:5]
        text = rng.choice(["What is the next term in: {}?", "What comes next: {}?"])
        return text.format(", ".join(map(str, seq))), nxt
    p, q, r, s = rng.randint(1, 9), rng.randint(2, 12), rng.randint(1, 9), rng.randint(2, 12)
    op = rng.choice(["+", "-", "*"])
    value = _eval_expr(f"{p}/{q} {op} {r}/{s}")
    return f"Calculate {p}/{q} {op} {r}/{s}.", value


def _rand_comparable(rng) -> tuple[str, Fraction]:
    kind = rng.randrange(3)
    if kind == 0:
        n = rng.randint(-100, 100)
        return str(n), Fraction(n)
    if kind == 1:
        d = _rand_decimal(rng, -10, 10, rng.choice([1, 2]))
        return _fmt(d), Fraction(d)
    f = Fraction(rng.randint(-20, 20), rng.randint(2, 15))
    return _fmt(f), f


def _q_compare(rng):
    form = rng.randrange(4)
    if form == 0:
        while True:
            (sa, a), (sb, b) = _rand_comparable(rng), _rand_comparable(rng)
            if a != b:
                break
        big = rng.random() < 0.5
        word = "bigger" if big else "smaller"
        return f"Which is {word}: {sa} or {sb}?", (sa if (a > b) == big else sb)
    if form == 1:
        (sa, a), (sb, b) = _rand_comparable(rng), _rand_comparable(rng)
        rel = rng.choice(["greater than", "less than", "at least", "at most"])
        truth = {"greater than": a > b, "less than": a < b, "at least": a >= b, "at most": a <= b}[rel]
        return f"Is {sa} {rel} {sb}?", truth
    vals = {}
    while len(vals) < rng.randint(3, 5):
        s, v = _rand_comparable(rng)
        vals.setdefault(v, s)
    items = list(vals.items())
    rng.shuffle(items)
    listing = ", ".join(s for _, s in items)
    if form == 2:
        word = rng.choice(["biggest", "smallest"])
        pick = (max if word == "biggest" else min)(items)[1]
        return f"What is the {word} value in {listing}?", pick
    order = rng.choice(["increasing", "decreasing"])
    ordered = sorted(items, reverse=order == "decreasing")
    return f"Sort {listing} in {order} order.", ", ".join(s for _, s in ordered)


def _q_round(rng):
    x = _rand_decimal(rng, -5000, 5000, rng.randint(2, 5))
    form = rng.randrange(3)
    if form == 0:
        k = rng.randint(0, 2)
        target = "the nearest integer" if k == 0 else f"{k} decimal place{'s' if k > 1 else ''}"
        return f"Round {_fmt(x)} to {target}.", x.quantize(Decimal(1).scaleb(-k), rounding=ROUND_HALF_UP)
    unit = rng.choice([10, 100, 1000])
    name = {10: "ten", 100: "hundred", 1000: "thousand"}[unit]
    rounded = (x / unit).quantize(Decimal(1), rounding=ROUND_HALF_UP) * unit
    return f"What is {_fmt(x)} rounded to the nearest {name}?", rounded


_UNITS = [("minutes", "hours", 60), ("seconds", "minutes", 60), ("grams", "kilograms", 1000),
          ("millilitres", "litres", 1000), ("centimetres", "metres", 100), ("metres", "kilometres", 1000),
          ("hours", "days", 24), ("months", "years", 12), ("millimetres", "centimetres", 10)]


def _q_units(rng):
    small, big, factor = rng.choice(_UNITS)
    x = _rand_decimal(rng, 0, 30, rng.choice([0, 1, 2]))
    if rng.random() < 0.5:
        text = rng.choice(["How many {s} are there in {x} {b}?", "Convert {x} {b} to {s}."])
        return text.format(s=small, b=big, x=_fmt(x)), x * factor
    y = Decimal(rng.randint(1, 40 * factor))
    text = rng.choice(["How many {b} are there in {y} {s}?", "Convert {y} {s} to {b}."])
    value = Fraction(int(y), factor)
    terminating = all(p in (2, 5) for p in range(2, value.denominator + 1) if value.denominator % p == 0 and _is_prime(p))
    return text.format(s=small, b=big, y=y), Decimal(value.numerator) / value.denominator if terminating else value


def _q_composed(rng):
    v, w = rng.sample(_VARS, 2)
    a, b, c, d = (rng.randint(-15, 15) for _ in range(4))
    first = a - b
    if rng.random() < 0.5:
        return f"Let {v} = {a} - {b}. What is {v} * {c}?", first * c
    return f"Let {v} = {a} - {b}. Let {w} = {v} * {c}. What is {w} + {d}?", first * c + d


_MATH_KINDS = [(_q_add_sub, 3), (_q_mul_div, 3), (_q_mixed, 3), (_q_linear, 3), (_q_linear_2d, 1),
               (_q_calculus, 2), (_q_evaluate, 1), (_q_numbers, 3), (_q_compare, 2), (_q_round, 1),
               (_q_units, 1), (_q_composed, 1)]


def math_item(rng: random.Random) -> tuple[str, str]:
    """One DeepMind-Mathematics-style (question, answer) pair."""
    kinds, weights = zip(*_MATH_KINDS)
    question, answer = rng.choices(kinds, weights)[0](rng)
    return question, answer if isinstance(answer, str) else _fmt(answer)


def _math_docs(rng: random.Random) -> Iterator[Item]:
    for i in range(10**9):
        items = [math_item(rng) for _ in range(rng.randint(12, 24))]
        text = "\n\n".join(f"Question: {q}\nAnswer: {a}" for q, a in items)
        yield Document("math", f"gen/{i:06d}", text), "generated-dm-math-style", "generated (Apache-2.0, this project)"


# --------------------------------------------------------------------------- other languages
#
# Real running text in French/German/Spanish/Italian that pip installs is scarce:
# the JupyterLab language packs (BSD-3-Clause) ship human-translated UI strings,
# which are real sentences and come with their English originals (kept as
# parallel pairs). Everything else is generated from hand-written sentence
# templates whose slots are filled with localised data: person and company
# names and street addresses from Faker, and country/language names, dates,
# numbers, currency and percent formatting from Babel (Unicode CLDR data).
# Templates avoid constructions that need gender/case agreement with a slot,
# or supply the agreeing form through per-gender keys.

_LANG_CODES = ("en", "fr", "de", "es", "it", "pt", "nl", "ru", "zh", "ja", "ar", "pl", "sv",
               "el", "tr", "ko", "hi", "da", "fi", "cs", "hu", "ro", "uk", "ga", "eu", "ca")
_NOT_COUNTRIES = {"EU", "EZ", "UN", "QO", "XA", "XB", "XK", "ZZ", "AQ", "AC", "CP", "DG", "EA", "IC", "TA"}

_LANGS: dict[str, dict] = {
    "french": dict(
        code="fr", faker="fr_FR", catalogue="jupyterlab_language_pack_fr_FR", short_date="d MMMM",
        cities=["Paris", "Lyon", "Marseille", "Toulouse", "Bordeaux", "Lille", "Nantes", "Strasbourg",
                "Rennes", "Grenoble", "Montpellier", "Dijon", "Brest", "Reims", "Nancy", "Metz", "Tours",
                "Angers", "Limoges", "Amiens", "Caen", "Rouen", "Nice", "Avignon", "Bayonne"],
        topics=["le budget de l'année prochaine", "la rénovation de la gare", "le nouveau réseau de bus",
                "la sécurité des données", "l'ouverture d'une médiathèque", "la qualité de l'air",
                "le prix de l'énergie", "la formation des jeunes", "le télétravail", "la protection des forêts",
                "le tourisme local", "l'agriculture biologique", "les transports publics", "la santé des enfants",
                "l'avenir de l'industrie", "la construction de logements", "le recyclage des déchets",
                "les énergies renouvelables", "la numérisation des services publics", "le festival de musique"],
        fields=["droit", "médecine", "physique", "histoire", "informatique", "économie", "architecture",
                "biologie", "mathématiques", "philosophie", "chimie", "lettres modernes"],
        hobbies=["à la lecture", "au jardinage", "à la musique", "au football", "à la photographie",
                 "à la peinture", "au vélo", "aux échecs", "à la cuisine", "à la randonnée"],
        jobs=[("professeur", "professeure"), ("médecin", "médecin"), ("avocat", "avocate"),
              ("journaliste", "journaliste"), ("boulanger", "boulangère"), ("ingénieur", "ingénieure"),
              ("infirmier", "infirmière"), ("architecte", "architecte"), ("chercheur", "chercheuse"),
              ("musicien", "musicienne"), ("pharmacien", "pharmacienne"), ("traducteur", "traductrice")],
        gender={"m": {"il": "il", "Il": "Il", "né": "né", "le": "le", "e": "", "Cher": "Cher"},
                "f": {"il": "elle", "Il": "Elle", "né": "née", "le": "la", "e": "e", "Cher": "Chère"}},
        news_titles=["{city} : un nouveau projet sur {topic}", "{company} annonce des résultats en hausse",
                     "Débat sur {topic} à {city}", "{P} présente son rapport sur {topic}",
                     "{Topic} au cœur des discussions à {city}"],
        news=["Le {date}, {P} a présenté à {city} un projet sur {topic}.",
              "Selon {P2}, la situation devrait s'améliorer d'ici la fin de l'année.",
              "L'entreprise {company} a annoncé un chiffre d'affaires de {money}, soit une hausse de {pct} par rapport à l'année précédente.",
              "Plus de {big} personnes ont participé à la réunion, qui s'est tenue {day} dernier.",
              "Les habitants de {city} pourront donner leur avis jusqu'au {date2}.",
              "« Nous devons agir rapidement », a déclaré {P} devant les journalistes.",
              "Le projet, estimé à {money}, sera financé en partie par la région.",
              "Les pays concernés sont les suivants : {country}, {country2} et {country3}.",
              "La conférence aura lieu au {street}, à {city2}, à partir de {time}.",
              "Les travaux doivent durer {n} mois et commenceront en {month}.",
              "Une délégation de {n} experts a été invitée pour débattre sur {topic2}.",
              "Le conseil municipal se réunira de nouveau le {date2} pour prendre une décision.",
              "Les documents sont disponibles en {lang} et en {lang2}.",
              "D'après une étude récente, {pct} des personnes interrogées se disent satisfaites.",
              "Cette décision a provoqué de vives réactions parmi les commerçants du centre-ville.",
              "{Topic} reste une priorité pour le maire de {city}.",
              "Pour plus d'informations, les habitants peuvent contacter la mairie du lundi au vendredi.",
              "Il s'agit de la {n}e édition de cet événement, qui attire chaque année de nombreux visiteurs.",
              "Les critiques soulignent que les coûts ont fortement augmenté ces dernières années.",
              "Les résultats de l'enquête seront publiés en {month}.",
              "Les associations locales demandent davantage de transparence sur {topic2}.",
              "Le ministre a promis une réponse avant la fin de l'année."],
        bio=["{P} est {né} à {city} en {year}.",
             "Après des études de {field} à {city2}, {il} a travaillé pendant {n} ans chez {company}.",
             "{Il} parle couramment {lang} et {lang2}.",
             "Aujourd'hui, {il} vit à {city} avec sa famille.",
             "En {year2}, {il} a fondé sa propre entreprise, {company2}.",
             "{Il} consacre son temps libre {hobby} et {hobby2}.",
             "Son premier livre, publié en {year2}, a été traduit en {n} langues.",
             "{Il} est aujourd'hui {job} à {city2}.",
             "En {year3}, {il} a reçu un prix important pour l'ensemble de son travail.",
             "Ses collègues {le} décrivent comme une personne patiente, curieuse et fiable.",
             "{Il} s'engage également comme bénévole dans une association de {city}.",
             "Pendant ses études, {il} a passé une année entière à {city2}.",
             "{Il} écrit régulièrement des articles sur {topic}."],
        letter_open=["Bonjour {F},", "{Cher} {F},", "Madame, Monsieur,"],
        letter_first=["Je vous remercie pour votre message du {date}.",
                      "Je me permets de vous écrire au sujet de notre projet commun.",
                      "Suite à notre conversation téléphonique, voici les informations demandées."],
        letter=["Comme convenu, je vous envoie ci-joint le document concernant {topic}.",
                "Pourriez-vous me confirmer votre présence à la réunion de {day} à {time} ?",
                "Je serai à {city} du {d1} au {d2}, n'hésitez pas à m'appeler si besoin.",
                "Le montant total de la facture s'élève à {money}.",
                "Nous avons bien reçu votre commande numéro {order} et nous vous en remercions.",
                "Malheureusement, je ne pourrai pas être présent{e2} à la réunion de {day}.",
                "Vous trouverez toutes les informations utiles sur notre site internet.",
                "La livraison est prévue pour le {date2}, entre {time} et {time2}.",
                "Pourriez-vous transmettre ce message à {P} ?",
                "Le rendez-vous a été déplacé au {date2} à {time}."],
        letter_close=["Je reste à votre disposition pour toute question.\n\nCordialement,\n{P2}",
                      "Bien à vous,\n{P2}", "Merci d'avance et à bientôt,\n{P2}",
                      "Avec mes meilleures salutations,\n{P2}"],
        subject="Objet : ",
    ),
    "german": dict(
        code="de", faker="de_DE", catalogue="jupyterlab_language_pack_de_DE", short_date="d. MMMM",
        cities=["Berlin", "Hamburg", "München", "Köln", "Frankfurt", "Stuttgart", "Düsseldorf", "Leipzig",
                "Dortmund", "Essen", "Bremen", "Dresden", "Hannover", "Nürnberg", "Freiburg", "Heidelberg",
                "Münster", "Kiel", "Rostock", "Erfurt", "Mainz", "Augsburg", "Bonn", "Potsdam", "Regensburg"],
        topics=["Digitalisierung der Verwaltung", "Ausbau des Radwegenetzes", "Sanierung des Bahnhofs",
                "Energiepreise", "Luftqualität", "Wohnungsbau", "Datenschutz", "Ausbildung junger Menschen",
                "Homeoffice", "Waldschutz", "regionaler Tourismus", "ökologische Landwirtschaft",
                "öffentlicher Nahverkehr", "Kindergesundheit", "Zukunft der Industrie", "Recycling",
                "erneuerbare Energien", "Musikfestival", "Haushaltsplan", "Fachkräftemangel"],
        fields=["Medizin", "Physik", "Geschichte", "Informatik", "Wirtschaftswissenschaften", "Architektur",
                "Biologie", "Mathematik", "Philosophie", "Rechtswissenschaft", "Chemie", "Germanistik"],
        hobbies=["Lesen", "Gartenarbeit", "Musik", "Fußball", "Fotografie", "Malerei", "Radfahren",
                 "Schach", "Kochen", "Wandern"],
        jobs=[("Lehrer", "Lehrerin"), ("Arzt", "Ärztin"), ("Rechtsanwalt", "Rechtsanwältin"),
              ("Journalist", "Journalistin"), ("Bäcker", "Bäckerin"), ("Ingenieur", "Ingenieurin"),
              ("Krankenpfleger", "Krankenpflegerin"), ("Architekt", "Architektin"), ("Forscher", "Forscherin"),
              ("Musiker", "Musikerin"), ("Apotheker", "Apothekerin"), ("Programmierer", "Programmiererin")],
        gender={"m": {"er": "er", "Er": "Er", "sein": "sein", "Sein": "Sein", "seine": "seine",
                      "seiner": "seiner", "ihn": "ihn", "Liebe": "Lieber"},
                "f": {"er": "sie", "Er": "Sie", "sein": "ihr", "Sein": "Ihr", "seine": "ihre",
                      "seiner": "ihrer", "ihn": "sie", "Liebe": "Liebe"}},
        news_titles=["{city}: Neues Projekt zum Thema {topic}", "{company} meldet steigende Umsätze",
                     "Debatte über das Thema {topic} in {city}", "{P} stellt Bericht zum Thema {topic} vor",
                     "Thema {topic} bestimmt die Diskussion in {city}"],
        news=["Am {date} hat {P} in {city} ein neues Projekt zum Thema {topic} vorgestellt.",
              "Nach Angaben von {P2} soll sich die Lage bis zum Jahresende verbessern.",
              "Das Unternehmen {company} meldete einen Umsatz von {money}, das entspricht einem Plus von {pct} gegenüber dem Vorjahr.",
              "Mehr als {big} Menschen nahmen an der Versammlung teil, die am {day} stattfand.",
              "Die Bürgerinnen und Bürger von {city} können ihre Meinung bis zum {date2} abgeben.",
              "„Wir müssen jetzt handeln“, sagte {P} vor Journalisten.",
              "Das Projekt kostet voraussichtlich {money} und wird teilweise vom Land finanziert.",
              "Betroffen sind die folgenden Länder: {country}, {country2} und {country3}.",
              "Die Konferenz beginnt um {time} Uhr; Veranstaltungsort ist {street} in {city2}.",
              "Die Bauarbeiten sollen {n} Monate dauern und im {month} beginnen.",
              "Eine Delegation von {n} Fachleuten wurde eingeladen, um über das Thema {topic2} zu sprechen.",
              "Der Stadtrat wird am {date2} erneut zusammenkommen, um eine Entscheidung zu treffen.",
              "Die Unterlagen sind auf {lang} und {lang2} erhältlich.",
              "Laut einer aktuellen Umfrage sind {pct} der Befragten zufrieden.",
              "Die Entscheidung sorgte bei den Händlern in der Innenstadt für heftige Reaktionen.",
              "Der Bürgermeister von {city} betonte, dass das Thema {topic} weiterhin Vorrang habe.",
              "Weitere Informationen erhalten Interessierte montags bis freitags im Rathaus.",
              "Die Veranstaltung findet bereits zum {n}. Mal statt und zieht jedes Jahr zahlreiche Besucher an.",
              "Kritiker bemängeln, dass die Kosten in den letzten Jahren stark gestiegen sind.",
              "Die Ergebnisse der Untersuchung sollen im {month} veröffentlicht werden.",
              "Örtliche Vereine fordern mehr Transparenz beim Thema {topic2}.",
              "Die Ministerin versprach eine Antwort bis Ende {month}."],
        bio=["{P} wurde {year} in {city} geboren.",
             "Nach dem Studium der {field} in {city2} arbeitete {er} {n} Jahre lang bei {company}.",
             "{Er} spricht fließend {lang} und {lang2}.",
             "Heute lebt {er} mit {seiner} Familie in {city}.",
             "Im Jahr {year2} gründete {er} {sein} eigenes Unternehmen, {company2}.",
             "In {seiner} Freizeit beschäftigt sich {er} gern mit {hobby} und {hobby2}.",
             "{Sein} erstes Buch erschien {year2} und wurde in {n} Sprachen übersetzt.",
             "Heute arbeitet {er} als {job} in {city2}.",
             "Für {seine} Arbeit erhielt {er} im Jahr {year3} einen renommierten Preis.",
             "Kolleginnen und Kollegen beschreiben {ihn} als geduldig, neugierig und zuverlässig.",
             "{Er} engagiert sich außerdem ehrenamtlich in einem Verein in {city}.",
             "Während des Studiums verbrachte {er} ein ganzes Jahr in {city2}.",
             "{Er} schreibt regelmäßig Artikel zum Thema {topic}."],
        letter_open=["Hallo {F},", "{Liebe} {F},", "Sehr geehrte Damen und Herren,"],
        letter_first=["vielen Dank für Ihre Nachricht vom {date}.",
                      "ich schreibe Ihnen wegen unseres gemeinsamen Projekts.",
                      "wie am Telefon besprochen, sende ich Ihnen die gewünschten Informationen."],
        letter=["Wie vereinbart, sende ich Ihnen anbei die Unterlagen zum Thema {topic}.",
                "Könnten Sie mir bitte Ihre Teilnahme an der Besprechung am {day} um {time} Uhr bestätigen?",
                "Ich bin vom {d1} bis zum {d2} in {city}, rufen Sie mich gerne an.",
                "Der Gesamtbetrag der Rechnung beläuft sich auf {money}.",
                "Wir haben Ihre Bestellung mit der Nummer {order} erhalten und bedanken uns herzlich.",
                "Leider kann ich an dem Treffen am {day} nicht teilnehmen.",
                "Alle weiteren Informationen finden Sie auf unserer Internetseite.",
                "Die Lieferung ist für den {date2} zwischen {time} und {time2} Uhr geplant.",
                "Könnten Sie diese Nachricht bitte an {P} weiterleiten?",
                "Der Termin wurde auf den {date2} um {time} Uhr verschoben."],
        letter_close=["Für Rückfragen stehe ich Ihnen jederzeit gern zur Verfügung.\n\nMit freundlichen Grüßen\n{P2}",
                      "Viele Grüße\n{P2}", "Beste Grüße\n{P2}", "Herzliche Grüße\n{P2}"],
        subject="Betreff: ",
    ),
    "spanish": dict(
        code="es", faker="es_ES", catalogue="jupyterlab_language_pack_es_ES", short_date="d 'de' MMMM",
        cities=["Madrid", "Barcelona", "Valencia", "Sevilla", "Zaragoza", "Málaga", "Bilbao", "Murcia",
                "Palma", "Valladolid", "Vigo", "Gijón", "Granada", "Córdoba", "Alicante", "Salamanca",
                "Toledo", "Santander", "Pamplona", "Cádiz", "Burgos", "León", "Oviedo", "Almería", "Huelva"],
        topics=["el presupuesto del próximo año", "la renovación de la estación", "la nueva red de autobuses",
                "la seguridad de los datos", "la apertura de una biblioteca", "la calidad del aire",
                "el precio de la energía", "la formación de los jóvenes", "el teletrabajo",
                "la protección de los bosques", "el turismo local", "la agricultura ecológica",
                "el transporte público", "la salud infantil", "el futuro de la industria",
                "la construcción de viviendas", "el reciclaje de residuos", "las energías renovables",
                "la digitalización de la administración", "el festival de música"],
        fields=["derecho", "medicina", "física", "historia", "informática", "economía", "arquitectura",
                "biología", "matemáticas", "filosofía", "química", "filología"],
        hobbies=["leer", "cocinar", "viajar", "jugar al ajedrez", "montar en bicicleta", "tocar la guitarra",
                 "hacer fotografías", "pintar", "pasear por el campo", "ir al cine"],
        jobs=[("profesor", "profesora"), ("médico", "médica"), ("abogado", "abogada"),
              ("periodista", "periodista"), ("panadero", "panadera"), ("ingeniero", "ingeniera"),
              ("enfermero", "enfermera"), ("arquitecto", "arquitecta"), ("investigador", "investigadora"),
              ("músico", "música"), ("farmacéutico", "farmacéutica"), ("programador", "programadora")],
        gender={"m": {"lo": "lo", "o": "o", "Estimado": "Estimado"},
                "f": {"lo": "la", "o": "a", "Estimado": "Estimada"}},
        news_titles=["{city}: un nuevo proyecto sobre {topic}", "{company} anuncia un aumento de sus ventas",
                     "Debate sobre {topic} en {city}", "{P} presenta su informe sobre {topic}",
                     "{Topic}, en el centro del debate en {city}"],
        news=["El {date}, {P} presentó en {city} un proyecto sobre {topic}.",
              "Según {P2}, la situación debería mejorar antes de final de año.",
              "La empresa {company} anunció una facturación de {money}, lo que supone un aumento del {pct} respecto al año anterior.",
              "Más de {big} personas participaron en la reunión, que se celebró el {day}.",
              "Los vecinos de {city} podrán dar su opinión hasta el {date2}.",
              "«Tenemos que actuar con rapidez», declaró {P} ante los periodistas.",
              "El proyecto, con un coste estimado de {money}, será financiado en parte por la comunidad autónoma.",
              "Los países afectados son los siguientes: {country}, {country2} y {country3}.",
              "La conferencia tendrá lugar en {street}, en {city2}, a partir de las {time}.",
              "Las obras durarán {n} meses y comenzarán en {month}.",
              "Una delegación de {n} expertos ha sido invitada para debatir sobre {topic2}.",
              "El ayuntamiento volverá a reunirse el {date2} para tomar una decisión.",
              "Los documentos están disponibles en {lang} y en {lang2}.",
              "Según un estudio reciente, el {pct} de los encuestados se declara satisfecho.",
              "La decisión ha provocado fuertes reacciones entre los comerciantes del centro.",
              "{Topic} sigue siendo una prioridad para el alcalde de {city}.",
              "Para más información, los vecinos pueden dirigirse al ayuntamiento de lunes a viernes.",
              "Se trata de la {n}.ª edición de este evento, que atrae cada año a numerosos visitantes.",
              "Los críticos señalan que los costes han aumentado mucho en los últimos años.",
              "Los resultados del estudio se publicarán en {month}.",
              "Las asociaciones locales piden más transparencia sobre {topic2}.",
              "La ministra prometió una respuesta antes de que termine {month}."],
        bio=["{P} nació en {city} en {year}.",
             "Después de estudiar {field} en {city2}, trabajó durante {n} años en {company}.",
             "Habla con fluidez {lang} y {lang2}.",
             "Hoy vive en {city} con su familia.",
             "En {year2} fundó su propia empresa, {company2}.",
             "En su tiempo libre le gusta {hobby} y {hobby2}.",
             "Su primer libro, publicado en {year2}, fue traducido a {n} idiomas.",
             "Actualmente trabaja como {job} en {city2}.",
             "En {year3} recibió un importante premio por su trabajo.",
             "Sus colegas {lo} describen como una persona paciente, curiosa y fiable.",
             "Además, colabora como voluntari{o} en una asociación de {city}.",
             "Durante sus estudios pasó un año entero en {city2}.",
             "Escribe con regularidad artículos sobre {topic}."],
        letter_open=["Hola, {F}:", "{Estimado} {F}:", "Estimados señores:"],
        letter_first=["Le agradezco su mensaje del {date}.",
                      "Le escribo en relación con nuestro proyecto común.",
                      "Tras nuestra conversación telefónica, le envío la información solicitada."],
        letter=["Tal como acordamos, le envío adjunto el documento sobre {topic}.",
                "¿Podría confirmarme su asistencia a la reunión del {day} a las {time}?",
                "Estaré en {city} del {d1} al {d2}; no dude en llamarme si lo necesita.",
                "El importe total de la factura asciende a {money}.",
                "Hemos recibido su pedido número {order} y le damos las gracias.",
                "Lamentablemente, no podré asistir a la reunión del {day}.",
                "Encontrará toda la información necesaria en nuestra página web.",
                "La entrega está prevista para el {date2}, entre las {time} y las {time2}.",
                "¿Podría transmitir este mensaje a {P}?",
                "La cita se ha trasladado al {date2} a las {time}."],
        letter_close=["Quedo a su disposición para cualquier consulta.\n\nUn cordial saludo,\n{P2}",
                      "Atentamente,\n{P2}", "Saludos,\n{P2}", "Muchas gracias de antemano,\n{P2}"],
        subject="Asunto: ",
    ),
    "italian": dict(
        code="it", faker="it_IT", catalogue="jupyterlab_language_pack_it_IT", short_date="d MMMM",
        cities=["Roma", "Milano", "Napoli", "Torino", "Palermo", "Genova", "Bologna", "Firenze", "Bari",
                "Catania", "Venezia", "Verona", "Messina", "Padova", "Trieste", "Brescia", "Parma",
                "Modena", "Perugia", "Cagliari", "Pisa", "Lecce", "Trento", "Bergamo", "Siena"],
        topics=["il bilancio del prossimo anno", "la ristrutturazione della stazione", "la nuova rete di autobus",
                "la sicurezza dei dati", "l'apertura di una biblioteca", "la qualità dell'aria",
                "il prezzo dell'energia", "la formazione dei giovani", "il lavoro da remoto",
                "la tutela dei boschi", "il turismo locale", "l'agricoltura biologica", "il trasporto pubblico",
                "la salute dei bambini", "il futuro dell'industria", "la costruzione di alloggi",
                "il riciclo dei rifiuti", "le energie rinnovabili", "la digitalizzazione della pubblica amministrazione",
                "il festival musicale"],
        fields=["giurisprudenza", "medicina", "fisica", "storia", "informatica", "economia", "architettura",
                "biologia", "matematica", "filosofia", "chimica", "lettere"],
        hobbies=["leggere", "cucinare", "viaggiare", "giocare a scacchi", "andare in bicicletta",
                 "suonare la chitarra", "fare fotografie", "dipingere", "passeggiare in montagna", "andare al cinema"],
        jobs=[("insegnante", "insegnante"), ("medico", "medico"), ("giornalista", "giornalista"),
              ("infermiere", "infermiera"), ("panettiere", "panettiera"), ("cuoco", "cuoca"),
              ("ricercatore", "ricercatrice"), ("musicista", "musicista"), ("farmacista", "farmacista"),
              ("programmatore", "programmatrice"), ("commesso", "commessa"), ("traduttore", "traduttrice")],
        gender={"m": {"nato": "nato", "lo": "lo", "il_volontario": "il volontario", "Caro": "Caro"},
                "f": {"nato": "nata", "lo": "la", "il_volontario": "la volontaria", "Caro": "Cara"}},
        news_titles=["{city}: un nuovo progetto per {topic}", "{company} annuncia un aumento delle vendite",
                     "Dibattito a {city}: {topic}", "{P} presenta il suo rapporto",
                     "{Topic} al centro del dibattito a {city}"],
        news=["{Il_date}, {P} ha presentato a {city} un progetto per {topic}.",
              "Secondo {P2}, la situazione dovrebbe migliorare entro la fine dell'anno.",
              "L'azienda {company} ha annunciato un fatturato di {money}, con un aumento {del_pct} rispetto all'anno precedente.",
              "Più di {big} persone hanno partecipato alla riunione, che si è svolta di {day}.",
              "Gli abitanti di {city} potranno esprimere la loro opinione fino {al_date2}.",
              "«Dobbiamo agire rapidamente», ha dichiarato {P} ai giornalisti.",
              "Il progetto, con un costo stimato di {money}, sarà finanziato in parte dalla regione.",
              "I paesi interessati sono i seguenti: {country}, {country2} e {country3}.",
              "La conferenza si terrà in {street}, a {city2}, a partire dalle {time}.",
              "I lavori dureranno {n} mesi e inizieranno a {month}.",
              "Una delegazione di {n} esperti è stata invitata per discutere di temi come {topic2}.",
              "Il consiglio comunale si riunirà di nuovo {il_date2} per prendere una decisione.",
              "I documenti sono disponibili in {lang} e in {lang2}.",
              "Secondo un sondaggio recente, {il_pct} degli intervistati si dichiara soddisfatto.",
              "La decisione ha provocato forti reazioni tra i commercianti del centro.",
              "Per il sindaco di {city}, {topic} resta una priorità.",
              "Per ulteriori informazioni, i cittadini possono rivolgersi al comune dal lunedì al venerdì.",
              "Si tratta della {n}ª edizione di questo evento, che ogni anno attira numerosi visitatori.",
              "I critici sottolineano che i costi sono aumentati molto negli ultimi anni.",
              "I risultati dello studio saranno pubblicati a {month}.",
              "Le associazioni locali chiedono più trasparenza su temi come {topic2}.",
              "La ministra ha promesso una risposta entro la fine di {month}."],
        bio=["{P} è {nato} a {city} nel {year}.",
             "Dopo aver studiato {field} a {city2}, ha lavorato per {n} anni presso {company}.",
             "Parla correntemente {lang} e {lang2}.",
             "Oggi vive a {city} con la sua famiglia.",
             "Nel {year2} ha fondato la sua azienda, {company2}.",
             "Nel tempo libero ama {hobby} e {hobby2}.",
             "Il suo primo libro, pubblicato nel {year2}, è stato tradotto in {n} lingue.",
             "Attualmente lavora come {job} a {city2}.",
             "Nel {year3} ha ricevuto un importante premio per il suo lavoro.",
             "I colleghi {lo} descrivono come una persona paziente, curiosa e affidabile.",
             "Inoltre fa {il_volontario} in un'associazione di {city}.",
             "Durante gli studi ha trascorso un anno intero a {city2}.",
             "Scrive regolarmente articoli su temi come {topic}."],
        letter_open=["Ciao {F},", "{Caro} {F},", "Gentili signori,"],
        letter_first=["La ringrazio per il suo messaggio {del_date}.",
                      "Le scrivo in merito al nostro progetto comune.",
                      "Come d'accordo al telefono, le invio le informazioni richieste."],
        letter=["Come concordato, le invio in allegato il documento che riguarda {topic}.",
                "Potrebbe confermarmi la sua presenza alla riunione di {day} alle {time}?",
                "Sarò a {city} {dal_d1} {al_d2}, non esiti a chiamarmi se necessario.",
                "L'importo totale della fattura ammonta a {money}.",
                "Abbiamo ricevuto il suo ordine numero {order} e la ringraziamo.",
                "Purtroppo non potrò partecipare alla riunione di {day}.",
                "Troverà tutte le informazioni utili sul nostro sito internet.",
                "La consegna è prevista per {il_date2}, tra le {time} e le {time2}.",
                "Potrebbe inoltrare questo messaggio a {P}?",
                "L'appuntamento è stato spostato {al_date2} alle {time}."],
        letter_close=["Resto a sua disposizione per qualsiasi domanda.\n\nCordiali saluti,\n{P2}",
                      "Distinti saluti,\n{P2}", "A presto,\n{P2}", "Grazie in anticipo,\n{P2}"],
        subject="Oggetto: ",
    ),
}


def _it_art(prep: str, number: int) -> str:
    """Italian article (+preposition) before a number: 'il 3' but 'l'8', 'dell'11'."""
    elide = str(number)[0] == "8" or number in (1, 11)
    forms = {"il": ("il ", "l'"), "Il": ("Il ", "L'"), "al": ("al ", "all'"), "del": ("del ", "dell'"),
             "dal": ("dal ", "dall'")}
    return forms[prep][elide]


def _es_conjunctions(text: str) -> str:
    """Spanish 'y' becomes 'e' before an /i/ sound and 'o' becomes 'u' before /o/."""
    text = re.sub(r"\by (?=[iIíÍ]|[hH][iIíÍ](?![aAeEoO]))", "e ", text)
    return re.sub(r"\bo (?=[oOóÓ]|[hH][oOóÓ])", "u ", text)


#: French "de"/"que" elide before a vowel: "d'Angers", "études d'informatique".
_FR_ELISION = re.compile(r"\b([dD]e|[qQ]ue) (?=[aeiouyéèêàâîôûAEIOUYÉÈÊÀÂÎÔÛ])")


class _LangGen:
    """Fills one language's templates; one instance per (language, seed)."""

    def __init__(self, lang: str, rng: random.Random):
        from babel import Locale
        from faker import Faker

        self.cfg = _LANGS[lang]
        self.rng = rng
        self.code = self.cfg["code"]
        self.faker = Faker(self.cfg["faker"])
        self.faker.seed_instance(rng.randrange(2**32))
        loc = Locale.parse(self.code)
        self.countries = [loc.territories[c] for c in sorted(loc.territories)
                          if len(c) == 2 and c.isalpha() and c not in _NOT_COUNTRIES]
        self.languages = [loc.languages[c] for c in _LANG_CODES if c in loc.languages and c != self.code]
        self.days = [loc.days["format"]["wide"][i] for i in range(7)]
        self.months = [loc.months["format"]["wide"][i] for i in range(1, 13)]

    def _person(self) -> tuple[str, str, str]:
        g = self.rng.choice("mf")
        first = self.faker.first_name_male() if g == "m" else self.faker.first_name_female()
        return g, first, f"{first} {self.faker.last_name()}"

    def context(self) -> dict[str, str]:
        from babel import dates, numbers

        rng, cfg, loc = self.rng, self.cfg, self.code
        g, first, name = self._person()
        g2, first2, name2 = self._person()
        rand_date = lambda: dt.date(2015, 1, 1) + dt.timedelta(days=rng.randrange(16 * 365))  # noqa: E731
        d, d2 = rand_date(), rand_date()
        d1 = dt.date(2024, rng.randint(1, 12), rng.randint(1, 20))
        hour = rng.randint(8, 17)
        pct = rng.randint(2, 95)
        topics = rng.sample(cfg["topics"], 2)
        hobbies = rng.sample(cfg["hobbies"], 2)
        countries = rng.sample(self.countries, 3)
        langs = rng.sample(self.languages, 2)
        year = rng.randint(1950, 2000)
        ctx = {
            "P": name, "P2": name2, "F": first, "city": rng.choice(cfg["cities"]),
            "city2": rng.choice(cfg["cities"]), "company": self.faker.company(), "company2": self.faker.company(),
            "street": self.faker.street_address(), "date": dates.format_date(d, "long", locale=loc),
            "date2": dates.format_date(d2, "long", locale=loc), "day": rng.choice(self.days),
            "month": rng.choice(self.months), "year": str(year), "year2": str(year + rng.randint(22, 40)), "year3": str(year + rng.randint(25, 45)),
            "time": f"{hour}:{rng.choice(['00', '15', '30', '45'])}", "time2": f"{hour + 2}:00",
            "n": str(rng.randint(2, 30)), "big": numbers.format_decimal(rng.randint(100, 90_000), locale=loc),
            "money": numbers.format_currency(Decimal(rng.randint(1000, 50_000_000)).scaleb(-2), "EUR", locale=loc),
            "pct": numbers.format_percent(pct / 100, locale=loc),
            "country": countries[0], "country2": countries[1], "country3": countries[2],
            "lang": langs[0], "lang2": langs[1], "topic": topics[0], "topic2": topics[1],
            "Topic": topics[0][:1].upper() + topics[0][1:], "field": rng.choice(cfg["fields"]),
            "hobby": hobbies[0], "hobby2": hobbies[1], "order": str(rng.randint(100_000, 999_999)),
            "d1": dates.format_date(d1, cfg["short_date"], locale=loc),
            "d2": dates.format_date(d1 + dt.timedelta(days=rng.randint(2, 9)), cfg["short_date"], locale=loc),
            "job": rng.choice(cfg["jobs"])[g == "f"],
        }
        ctx.update(cfg["gender"][g])
        if loc == "fr":
            ctx["e2"] = cfg["gender"][g2]["e"]  # agreement with the letter's sender (P2)
        if loc == "it":
            d1b = d1 + dt.timedelta(days=1)
            ctx.update({"Il_date": _it_art("Il", d.day) + ctx["date"], "il_date2": _it_art("il", d2.day) + ctx["date2"],
                        "al_date2": _it_art("al", d2.day) + ctx["date2"], "del_date": _it_art("del", d.day) + ctx["date"],
                        "dal_d1": _it_art("dal", d1.day) + ctx["d1"], "al_d2": _it_art("al", d1b.day) + ctx["d2"],
                        "il_pct": _it_art("il", pct) + ctx["pct"], "del_pct": _it_art("del", pct) + ctx["pct"]})
        return ctx

    def _fill(self, templates: list[str], ctx: dict, k: int) -> list[str]:
        return [t.format_map(ctx) for t in self.rng.sample(templates, min(k, len(templates)))]

    def document(self) -> tuple[str, str]:
        """A short news item, biography or letter; returns (kind, text)."""
        cfg, rng = self.cfg, self.rng
        ctx = self.context()
        kind = rng.choice(["news", "news", "bio", "letter"])
        if kind == "news":
            title = rng.choice(cfg["news_titles"]).format_map(ctx)
            body = [cfg["news"][0].format_map(ctx)] + self._fill(cfg["news"][1:], ctx, rng.randint(6, 11))
            cut = rng.randint(3, len(body) - 2)
            text = f"{title}\n\n{' '.join(body[:cut])}\n\n{' '.join(body[cut:])}"
        elif kind == "bio":
            text = f"{ctx['P']}\n\n" + " ".join([cfg["bio"][0].format_map(ctx)] + self._fill(cfg["bio"][1:], ctx, rng.randint(5, 9)))
        else:
            opening = rng.choice(cfg["letter_open"]).format_map(ctx)
            first = rng.choice(cfg["letter_first"]).format_map(ctx)
            body = self._fill(cfg["letter"], ctx, rng.randint(3, 6))
            topic = rng.choice(cfg["topics"])
            subject = cfg["subject"] + topic[:1].upper() + topic[1:]
            closing = rng.choice(cfg["letter_close"]).format_map(ctx)
            text = f"{subject}\n\n{opening}\n\n{first} {' '.join(body)}\n\n{closing}"
        text = text.replace("..", ".")  # company names such as "S.A." end sentences too
        if self.code == "es":
            text = _es_conjunctions(text)
        elif self.code == "fr":
            text = _FR_ELISION.sub(lambda m: m.group(1)[0] + "'", text)
        return kind, text


def _catalogue_pairs(package: str) -> list[tuple[str, str, str]]:
    """(file, English msgid, translation) from a package's compiled gettext catalogues."""
    import gettext

    root = _package_dir(package)
    if root is None:
        return []
    pairs, seen = [], set()
    for path in _rel_files(root, "*.mo"):
        with open(path, "rb") as fh:
            catalog = gettext.GNUTranslations(fh)._catalog
        for key in sorted(catalog, key=str):
            msgid = key[0] if isinstance(key, tuple) else key
            text = catalog[key]
            msgid = msgid.split("\x04")[-1]  # drop the msgctxt prefix
            text = re.sub(r"<[^>]+>", "", text).strip()
            if not msgid or sum(w.isalpha() for w in text.split()) < 3 or text in seen:
                continue
            seen.add(text)
            pairs.append((path.stem, msgid.strip(), text))
    return pairs


def _prose_items(prose: ProseSet, code: str, limit: float = math.inf) -> Iterator[Item]:
    """Real prose documents of one language (``moe_lab.prose``), in page order, up to ``limit`` characters;
    a document whose text repeats an earlier one is skipped here (as the builder would) so callers
    can count on every yielded character."""
    total, seen = 0, set()
    for doc_id, text, source in prose_documents(prose, code):
        if total + len(text) > limit:
            return
        digest = hashlib.sha1(text.encode("utf-8")).digest()
        if digest in seen:
            continue
        seen.add(digest)
        total += len(text)
        yield Document(LANG_DOMAINS[code], doc_id, text), f"deb:{source}", prose.sources[source]["licence"]


def _capped(items: Iterator[Item], limit: float) -> Iterator[Item]:
    """Whole items while their characters stay within ``limit``."""
    total = 0
    for item in items:
        if total + len(item[0].text) > limit:
            return
        total += len(item[0].text)
        yield item


def _language_docs(lang: str, rng: random.Random, parallel: list[dict], prose: ProseSet | None = None,
                   budget: int = 0) -> Iterator[Item]:
    """Real catalogue text interleaved with template-generated documents; with ``prose``, the real
    prose first fills up to 3/4 of the budget and the synthetic text is capped at 1/3 of the prose
    used (so at most ``MAX_SYNTHETIC_SHARE`` of the domain)."""
    cfg = _LANGS[lang]
    package = cfg["catalogue"]

    def catalogue() -> Iterator[Item]:
        pairs = _catalogue_pairs(package)
        dist = _package_dist(package)
        licence = _dist_license(dist) if dist else "unknown"
        label = f"pypi:{dist.metadata['Name'].lower()}" if dist else package
        doc_no, buf, size = 0, [], 0
        for i, pair in enumerate(pairs):
            buf.append(pair)
            size += len(pair[2]) + 1
            if size >= 1500 or i == len(pairs) - 1:
                doc = Document(lang, f"catalogue/{package}/{doc_no:04d}", "\n".join(p[2] for p in buf))
                for source, en, text in buf:
                    parallel.append({"lang": cfg["code"], "doc_id": doc.id, "source": source, "en": en, "text": text})
                yield doc, label, licence
                doc_no, buf, size = doc_no + 1, [], 0

    def generated() -> Iterator[Item]:
        gen = _LangGen(lang, rng)
        for i in range(10**9):
            kind, text = gen.document()
            yield Document(lang, f"gen/{kind}/{i:06d}", text), "generated-templates+faker+babel", \
                "generated; Faker (MIT) and Babel/CLDR (BSD-3-Clause, Unicode-3.0) data"

    synthetic = _round_robin(catalogue(), generated())
    if prose is None:
        yield from synthetic
        return
    real = list(_prose_items(prose, cfg["code"], (1 - MAX_SYNTHETIC_SHARE) * budget))
    real_chars = sum(len(doc.text) for doc, _, _ in real)
    yield from _round_robin(iter(real), _capped(synthetic, real_chars * MAX_SYNTHETIC_SHARE / (1 - MAX_SYNTHETIC_SHARE)))


# --------------------------------------------------------------------------- data (JSON / CSV)

_STATUSES = ["pending", "paid", "shipped", "delivered", "cancelled", "refunded"]
_PRODUCTS = ["USB-C cable", "wireless mouse", "mechanical keyboard", "27-inch monitor", "laptop stand",
             "noise-cancelling headphones", "webcam", "desk lamp", "office chair", "external SSD 1TB",
             "coffee grinder", "water bottle", "backpack", "running shoes", "yoga mat", "notebook A5"]
_DEPARTMENTS = ["Engineering", "Sales", "Marketing", "Finance", "Support", "Operations", "Research", "Legal"]
_CURRENCIES = ["USD", "EUR", "GBP", "JPY", "CHF", "CAD"]


class _DataGen:
    """Realistic-looking structured records; values come from a seeded RNG and Faker."""

    def __init__(self, rng: random.Random):
        from faker import Faker

        self.rng = rng
        self.fk = Faker("en_US")
        self.fk.seed_instance(rng.randrange(2**32))

    def _ts(self) -> str:
        base = dt.datetime(2019, 1, 1) + dt.timedelta(seconds=self.rng.randrange(7 * 365 * 86400))
        return base.isoformat() + "Z"

    def _date(self) -> str:
        return (dt.date(2015, 1, 1) + dt.timedelta(days=self.rng.randrange(4000))).isoformat()

    def user(self) -> dict:
        r, fk = self.rng, self.fk
        return {"id": r.randint(1, 10**6), "name": fk.name(), "email": fk.email(), "age": r.randint(18, 90),
                "address": {"street": fk.street_address(), "city": fk.city(), "state": fk.state_abbr(),
                            "zip": fk.postcode()},
                "signup_date": self._date(), "is_active": r.random() < 0.8,
                "tags": r.sample(["admin", "beta", "premium", "newsletter", "trial", "staff"], r.randint(0, 3))}

    def order(self) -> dict:
        r = self.rng
        items = [{"sku": f"SKU-{r.randint(10000, 99999)}", "name": r.choice(_PRODUCTS), "quantity": r.randint(1, 5),
                  "unit_price": round(r.uniform(2, 500), 2)} for _ in range(r.randint(1, 5))]
        total = round(sum(i["quantity"] * i["unit_price"] for i in items), 2)
        return {"order_id": f"ORD-{r.randint(10**6, 10**7 - 1)}", "customer_id": r.randint(1, 10**6),
                "created_at": self._ts(), "status": r.choice(_STATUSES), "currency": r.choice(_CURRENCIES),
                "items": items, "total": total}

    def sensor(self) -> dict:
        r = self.rng
        start = dt.datetime(2023, 1, 1) + dt.timedelta(minutes=r.randrange(500_000))
        t0 = r.uniform(-5, 30)
        return {"device_id": f"sensor-{r.randint(1, 999):03d}", "firmware": f"{r.randint(1, 4)}.{r.randint(0, 12)}.{r.randint(0, 30)}",
                "location": {"lat": round(r.uniform(-60, 70), 5), "lon": round(r.uniform(-180, 180), 5)},
                "readings": [{"timestamp": (start + dt.timedelta(minutes=15 * k)).isoformat() + "Z",
                              "temperature_c": round(t0 + r.gauss(0, 0.8), 2),
                              "humidity_pct": round(r.uniform(20, 95), 1),
                              "battery": round(1 - 0.001 * k - r.random() * 0.01, 3)} for k in range(r.randint(3, 8))]}

    def config(self) -> dict:
        r = self.rng
        return {"version": f"{r.randint(1, 3)}.{r.randint(0, 9)}", "server": {"host": self.fk.ipv4_private(),
                "port": r.choice([80, 443, 8000, 8080, 5432, 6379]), "workers": r.choice([1, 2, 4, 8, 16])},
                "logging": {"level": r.choice(["DEBUG", "INFO", "WARNING", "ERROR"]), "format": "json",
                            "file": f"/var/log/{self.fk.word()}.log"},
                "features": {w: r.random() < 0.5 for w in sorted(set(self.fk.words(r.randint(2, 5))))},
                "retry": {"max_attempts": r.randint(1, 10), "backoff_seconds": round(r.uniform(0.1, 5), 2)}}

    def api_response(self) -> dict:
        r = self.rng
        data = [{"id": r.randint(1, 10**5), "title": self.fk.sentence(nb_words=r.randint(3, 7)).rstrip("."),
                 "author": self.fk.user_name(), "score": r.randint(0, 5000), "published": self._date()}
                for _ in range(r.randint(2, 6))]
        page = r.randint(1, 20)
        return {"status": 200, "data": data, "pagination": {"page": page, "per_page": len(data),
                "total": r.randint(page * len(data), 5000), "next": f"/api/v1/items?page={page + 1}"}}

    def employee_csv(self) -> list[list]:
        r = self.rng
        rows = [["employee_id", "name", "department", "job_title", "hire_date", "salary"]]
        for _ in range(r.randint(8, 40)):
            rows.append([r.randint(1000, 99999), self.fk.name(), r.choice(_DEPARTMENTS), self.fk.job(),
                         self._date(), r.randrange(35_000, 220_000, 500)])
        return rows

    def sales_csv(self) -> list[list]:
        r = self.rng
        rows = [["date", "region", "product", "units", "unit_price", "revenue"]]
        day = dt.date(2020, 1, 1) + dt.timedelta(days=r.randrange(1500))
        for k in range(r.randint(8, 40)):
            units, price = r.randint(1, 300), round(r.uniform(1, 400), 2)
            rows.append([(day + dt.timedelta(days=k // 3)).isoformat(), r.choice(["north", "south", "east", "west"]),
                         r.choice(_PRODUCTS), units, f"{price:.2f}", f"{units * price:.2f}"])
        return rows

    def weather_csv(self) -> list[list]:
        r = self.rng
        rows = [["station", "date", "t_min", "t_max", "precip_mm", "wind_kmh"]]
        station, day = self.fk.city(), dt.date(2018, 1, 1) + dt.timedelta(days=r.randrange(2500))
        for k in range(r.randint(8, 40)):
            lo = round(r.uniform(-10, 20), 1)
            rows.append([station, (day + dt.timedelta(days=k)).isoformat(), lo, round(lo + r.uniform(2, 15), 1),
                         round(max(0.0, r.gauss(1, 4)), 1), r.randint(0, 80)])
        return rows

    def experiment_csv(self) -> list[list]:
        r = self.rng
        rows = [["run", "learning_rate", "batch_size", "epoch", "train_loss", "val_loss", "val_accuracy"]]
        for run in range(r.randint(1, 4)):
            lr, bs, loss = r.choice([1e-4, 3e-4, 1e-3, 3e-3]), r.choice([16, 32, 64, 128]), r.uniform(2, 3)
            for epoch in range(1, r.randint(4, 12)):
                loss *= r.uniform(0.75, 0.97)
                rows.append([f"run-{run}", lr, bs, epoch, f"{loss:.4f}", f"{loss * r.uniform(1.0, 1.2):.4f}",
                             f"{min(0.99, 1 - loss / 3 + r.uniform(-0.02, 0.02)):.4f}"])
        return rows

    def document(self) -> tuple[str, str]:
        r = self.rng
        if r.random() < 0.55:
            kind = r.choice(["user", "order", "sensor", "config", "api_response"])
            make = getattr(self, kind)
            shape = r.choice(["object", "array", "jsonl"])
            if shape == "object":
                return kind, json.dumps(make(), indent=r.choice([2, 4]), ensure_ascii=False)
            records = [make() for _ in range(r.randint(2, 5))]
            if shape == "array":
                return kind, json.dumps(records, indent=2, ensure_ascii=False)
            return kind, "\n".join(json.dumps(x, ensure_ascii=False) for x in records)
        kind = r.choice(["employee_csv", "sales_csv", "weather_csv", "experiment_csv"])
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerows(getattr(self, kind)())
        return kind, buf.getvalue().rstrip("\n")


#: Packages whose shipped JSON files (schemas, templates) are mixed into the data domain.
_JSON_PACKAGES = ("plotly", "jsonschema_specifications", "nbformat", "jupyterlab", "jupyterlab_server", "ipywidgets")


def _shipped_json() -> Iterator[Item]:
    for pkg in _JSON_PACKAGES:
        root, dist = _package_dir(pkg), _package_dist(pkg)
        if root is None or dist is None:
            continue
        label, licence = f"pypi:{dist.metadata['Name'].lower()}", _dist_license(dist)
        for path in _rel_files(root, "*.json"):
            if not 200 <= path.stat().st_size <= 12_000:
                continue
            try:
                text = path.read_text(encoding="utf-8")
                obj = json.loads(text)
            except (OSError, UnicodeDecodeError, ValueError):
                continue
            if "\n" not in text.strip():  # minified: re-indent so it reads like a file people write
                text = json.dumps(obj, indent=2, ensure_ascii=False)
            yield Document("data", f"shipped/{pkg}/{path.relative_to(root).as_posix()}", text.strip()), label, licence


def _data_docs(rng: random.Random) -> Iterator[Item]:
    gen = _DataGen(rng)

    def generated() -> Iterator[Item]:
        for i in range(10**9):
            kind, text = gen.document()
            yield Document("data", f"gen/{kind}/{i:06d}", text), "generated-json-csv", "generated (Apache-2.0, this project)"

    # roughly one shipped file per four generated ones, until the shipped files run out
    gens = generated()
    shipped = _shipped_json()
    for item in shipped:
        yield item
        for _ in range(4):
            yield next(gens)
    yield from gens


# --------------------------------------------------------------------------- latex

def _tex_poly(coeffs: dict[int, int | Fraction], var: str = "x") -> str:
    parts = []
    for p in sorted(coeffs, reverse=True):
        c = Fraction(coeffs[p])
        if c == 0:
            continue
        mag = abs(c)
        num = str(mag) if mag.denominator == 1 else rf"\frac{{{mag.numerator}}}{{{mag.denominator}}}"
        mono = "" if p == 0 else var if p == 1 else f"{var}^{{{p}}}"
        body = num if not mono else (mono if mag == 1 else f"{num}{mono}")
        parts.append(("-" if c < 0 else "") + body if not parts else ("- " if c < 0 else "+ ") + body)
    return " ".join(parts) or "0"


def _tex_frac(f: Fraction) -> str:
    if f.denominator == 1:
        return str(f.numerator)
    sign = "-" if f < 0 else ""
    return rf"{sign}\frac{{{abs(f.numerator)}}}{{{f.denominator}}}"


def _tex_matrix(m: list[list[int]], env: str) -> str:
    rows = r" \\ ".join(" & ".join(str(v) for v in row) for row in m)
    return rf"\begin{{{env}}} {rows} \end{{{env}}}"


_TEX_TOPICS = ["Polynomials", "Linear Algebra", "Calculus", "Sequences and Series", "Number Theory",
               "Inequalities", "Quadratic Equations", "Limits", "Matrices", "Combinatorics"]


class _LatexGen:
    """Small LaTeX documents whose displayed mathematics is computed, hence correct."""

    def __init__(self, rng: random.Random):
        self.rng = rng

    def derivative(self) -> str:
        r = self.rng
        c = {p: r.randint(-9, 9) for p in range(r.randint(2, 5) + 1)}
        c[max(c)] = r.choice([1, 2, 3, -1, -2, 5])
        return (f"Let $f(x) = {_tex_poly(c)}$. Differentiating term by term gives\n"
                f"\\begin{{equation}}\n  f'(x) = {_tex_poly(_derivative(c))}.\n\\end{{equation}}\n"
                f"In particular $f'(0) = {_derivative(c).get(0, 0)}$.")

    def integral(self) -> str:
        r = self.rng
        c = {p: r.randint(-6, 6) for p in range(r.randint(1, 3) + 1)}
        a, b = sorted(r.sample(range(-3, 5), 2))
        anti = {p + 1: Fraction(v, p + 1) for p, v in c.items()}
        value = sum(v * (Fraction(b) ** p - Fraction(a) ** p) for p, v in anti.items())
        return ("We evaluate the definite integral using the fundamental theorem of calculus:\n"
                "\\begin{align*}\n"
                f"  \\int_{{{a}}}^{{{b}}} \\left({_tex_poly(c)}\\right) \\, dx\n"
                f"    &= \\left[ {_tex_poly(anti)} \\right]_{{{a}}}^{{{b}}} \\\\\n"
                f"    &= {_tex_frac(value)}.\n\\end{{align*}}")

    def series(self) -> str:
        n, k = self.rng.randint(5, 40), self.rng.choice([1, 2, 3])
        value = sum(i**k for i in range(1, n + 1))
        closed = {1: r"\frac{n(n+1)}{2}", 2: r"\frac{n(n+1)(2n+1)}{6}", 3: r"\left(\frac{n(n+1)}{2}\right)^{2}"}[k]
        power = "" if k == 1 else f"^{{{k}}}"
        return (f"\\begin{{lemma}}\nFor every integer $n \\geq 1$ we have $\\sum_{{k=1}}^{{n}} k{power} = {closed}$.\n"
                f"\\end{{lemma}}\n\\begin{{proof}}\nBy induction on $n$; the case $n = 1$ is immediate and the "
                f"inductive step follows by adding $(n+1){power}$ to both sides.\n\\end{{proof}}\n"
                f"For example, with $n = {n}$ the sum equals ${value}$.")

    def matrix(self) -> str:
        r = self.rng
        A = [[r.randint(-5, 5) for _ in range(2)] for _ in range(2)]
        B = [[r.randint(-5, 5) for _ in range(2)] for _ in range(2)]
        AB = [[sum(A[i][k] * B[k][j] for k in range(2)) for j in range(2)] for i in range(2)]
        det = A[0][0] * A[1][1] - A[0][1] * A[1][0]
        env = r.choice(["pmatrix", "bmatrix"])
        return (f"Consider the matrices $A = {_tex_matrix(A, env)}$ and $B = {_tex_matrix(B, env)}$. Then\n"
                f"\\[\n  AB = {_tex_matrix(AB, env)}, \\qquad \\det A = {det}.\n\\]\n"
                + ("Since $\\det A \\neq 0$, the matrix $A$ is invertible." if det else
                   "Since $\\det A = 0$, the matrix $A$ is singular."))

    def quadratic(self) -> str:
        r = self.rng
        p, q = r.randint(-9, 9), r.randint(-9, 9)
        b, c = -(p + q), p * q
        poly = _tex_poly({2: 1, 1: b, 0: c})
        return (f"\\begin{{example}}\nSolve ${poly} = 0$.\n\\end{{example}}\n"
                f"The discriminant is $\\Delta = b^{{2}} - 4ac = {b * b - 4 * c}$, and the polynomial factors as\n"
                f"\\begin{{equation*}}\n  {poly} = (x {'-' if p >= 0 else '+'} {abs(p)})(x {'-' if q >= 0 else '+'} {abs(q)}),\n"
                "\\end{equation*}\n" + (f"so the only solution is $x = {p}$." if p == q else
                                      f"so the solutions are $x = {min(p, q)}$ and $x = {max(p, q)}$."))

    def limit(self) -> str:
        a = self.rng.choice([i for i in range(-9, 10) if i])
        minus, plus = _tex_poly({1: 1, 0: -a}), _tex_poly({1: 1, 0: a})  # "x - a", "x + a"
        return (f"\\begin{{proposition}}\n$\\displaystyle \\lim_{{x \\to {a}}} \\frac{{x^{{2}} - {a * a}}}{{{minus}}} = {2 * a}$.\n"
                f"\\end{{proposition}}\n\\begin{{proof}}\nFor $x \\neq {a}$ the fraction simplifies to ${plus}$, "
                f"which is continuous at $x = {a}$, so the limit equals ${2 * a}$.\n\\end{{proof}}")

    def binomial(self) -> str:
        n = self.rng.randint(2, 7)
        terms = " + ".join((f"{math.comb(n, k)} " if math.comb(n, k) > 1 else "")
                           + (f"a^{{{n - k}}}" if n - k > 1 else "a" if n - k == 1 else "")
                           + (f"b^{{{k}}}" if k > 1 else "b" if k == 1 else "") for k in range(n + 1))
        return (f"By the binomial theorem, $(a + b)^{{n}} = \\sum_{{k=0}}^{{n}} \\binom{{n}}{{k}} a^{{n-k}} b^{{k}}$. "
                f"For $n = {n}$ this reads\n\\begin{{equation}}\n  (a + b)^{{{n}}} = {terms}.\n\\end{{equation}}")

    def inequality(self) -> str:
        x, y = self.rng.randint(1, 20), self.rng.randint(1, 20)
        return ("\\begin{theorem}[AM--GM]\nFor all real numbers $x, y \\geq 0$ we have "
                "$\\frac{x + y}{2} \\geq \\sqrt{xy}$, with equality if and only if $x = y$.\n\\end{theorem}\n"
                "\\begin{proof}\nThis follows from $(\\sqrt{x} - \\sqrt{y})^{2} \\geq 0$.\n\\end{proof}\n"
                f"For instance, with $x = {x}$ and $y = {y}$ we get ${_tex_frac(Fraction(x + y, 2))} \\geq \\sqrt{{{x * y}}}$.")

    def gcd(self) -> str:
        a, b = self.rng.randint(20, 500), self.rng.randint(20, 500)
        steps, (u, v) = [], (max(a, b), min(a, b))
        while v:
            steps.append(f"  {u} &= {u // v} \\cdot {v} + {u % v}")
            u, v = v, u % v
        return ("The Euclidean algorithm computes the greatest common divisor by repeated division:\n"
                "\\begin{align*}\n" + " \\\\\n".join(steps) + "\n\\end{align*}\n"
                f"Hence $\\gcd({a}, {b}) = {u}$.")

    def itemize(self) -> str:
        items = self.rng.sample([r"$f$ is continuous on $[a, b]$", r"$f$ is differentiable on $(a, b)$",
                                 r"$f(a) = f(b)$", r"the sequence $(a_n)$ is bounded",
                                 r"$\sum_{n} |a_n| < \infty$", r"$A$ is symmetric, i.e.\ $A = A^{T}$",
                                 r"$p$ is a prime number", r"$G$ is a finite group"], 3)
        body = "\n".join(f"  \\item {it};" for it in items)
        return f"Throughout this section we assume that\n\\begin{{itemize}}\n{body}\n\\end{{itemize}}"

    def document(self) -> str:
        r = self.rng
        blocks = [self.derivative, self.integral, self.series, self.matrix, self.quadratic, self.limit,
                  self.binomial, self.inequality, self.gcd, self.itemize]
        topic = r.choice(_TEX_TOPICS)
        parts = ["\\documentclass{" + r.choice(["article", "amsart", "report"]) + "}",
                 "\\usepackage{amsmath, amssymb, amsthm" + r.choice(["", ", mathtools", ", geometry"]) + "}",
                 "\\newtheorem{theorem}{Theorem}", "\\newtheorem{lemma}[theorem]{Lemma}",
                 "\\newtheorem{proposition}[theorem]{Proposition}", "\\newtheorem{example}{Example}",
                 "", f"\\title{{Exercises on {topic}}}", "\\begin{document}", "\\maketitle", ""]
        for s in range(r.randint(1, 3)):
            parts.append(f"\\section{{{r.choice(_TEX_TOPICS)}}}\n\\label{{sec:{s + 1}}}")
            parts.extend(block() + "\n" for block in r.sample(blocks, r.randint(2, 4)))
        parts.append("\\end{document}")
        return "\n".join(parts)


def _latex_docs(rng: random.Random) -> Iterator[Item]:
    gen = _LatexGen(rng)
    for i in range(10**9):
        yield Document("latex", f"gen/{i:06d}", gen.document()), "generated-latex", "generated (Apache-2.0, this project)"


# --------------------------------------------------------------------------- build

def _domain_items(domain: str, rng: random.Random, parallel: list[dict], prose: ProseSet | None = None,
                  budget: int = 0) -> Iterator[Item]:
    if domain in _LANGS:
        return _language_docs(domain, rng, parallel, prose, budget)
    if domain == "english" and prose is not None:  # the handbook's English interleaved with the docstrings
        return _round_robin(_prose_items(prose, "en"), _english_docs(rng))
    return {"python": _python_docs, "english": _english_docs, "math": _math_docs,
            "data": _data_docs, "latex": _latex_docs}[domain](rng)


def _is_heldout(doc: Document) -> bool:
    page = split_key(doc.id)  # real prose: held out by page, the same page in every language
    if page is not None:
        return is_heldout_page(*page.split("/", 1))
    return _stable_int(f"{doc.domain}/{doc.id}") % 100 < HELDOUT_PERCENT


def _split(docs: list[Document]) -> tuple[list[Document], list[Document]]:
    """Hash-based split, fixed up so every domain has at least one held-out document."""
    held = [d for d in docs if _is_heldout(d)]
    if not held and len(docs) > 1:
        # never a prose page by itself: its translations in other domains would stay in training
        pool = [d for d in docs if split_key(d.id) is None] or docs
        held = [min(pool, key=lambda d: _stable_int(f"{d.domain}/{d.id}"))]
    held_ids = {d.id for d in held}
    return [d for d in docs if d.id not in held_ids], held


def _environment(prose: ProseSet | None = None) -> dict:
    versions = {}
    for name in ["faker", "babel"] + [c["catalogue"] for c in _LANGS.values()]:
        dist = _package_dist(name)
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
    converted to characters with ``CHARS_PER_TOKEN``); domains
    whose sources run dry stay smaller. With ``out_dir`` the result is also
    written there (atomically); without it everything stays in memory.

    ``prose``: a directory holding the downloaded Debian packages of :mod:`moe_lab.prose`
    (or a loaded ``ProseSet``). Their real paragraphs then make up the French, German,
    Spanish and Italian domains (synthetic text at most ``MAX_SYNTHETIC_SHARE``) and join
    the English one; without it the corpus is the v3 one, from pip-installed material only.
    """
    from tqdm.auto import tqdm

    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    domains = list(DOMAINS if domains is None else domains)
    unknown = set(domains) - set(DOMAINS)
    if unknown:
        raise ValueError(f"unknown domains: {sorted(unknown)}")
    budgets = {d: int(SIZES[size] * CHARS_PER_TOKEN[d]) for d in domains}
    if prose is not None and not isinstance(prose, ProseSet):
        prose = load_prose(prose)
    train, heldout, parallel, sources = [], [], [], {}
    with tqdm(total=sum(budgets.values()), unit="char", unit_scale=True, desc="corpus", disable=not progress) as bar:
        for domain in domains:
            budget = budgets[domain]
            bar.set_postfix_str(domain)
            rng = random.Random(f"{seed}/{domain}")  # str seeds are hashed with SHA-512: stable across runs
            docs, total, dom_parallel, seen, texts = [], 0, [], set(), set()
            for doc, label, licence in _domain_items(domain, rng, dom_parallel, prose, budget):
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


def _token_counter() -> Callable[[str], int] | None:
    """Optional: count tokens with the project tokenizer if it exists and works."""
    try:
        from moe_lab.tokenizer import load_tokenizer  # type: ignore[import-not-found]
        encode = load_tokenizer().encode
        try:  # count the text's own tokens, without the <s> the tokenizer may prepend
            encode("probe", bos=False)
            return lambda text: len(encode(text, bos=False))
        except TypeError:
            encode("probe")
            return lambda text: len(encode(text))
    except Exception as exc:  # the tokenizer module is optional
        print(f"token counting unavailable ({type(exc).__name__}: {exc})", file=sys.stderr)
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moe_lab.corpus", description=__doc__.split("\n\n")[0])
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
