"""The ``english`` domain: prose from docstrings, the Python reference manual and package READMEs.

Code samples, doctests, tables and markup are removed so that what is left reads as
English text. A new prose source is one more generator of :data:`~moe_lab.corpus.base.Item`
added to the round robin in :func:`english_docs`.
"""

from __future__ import annotations

import ast
import contextlib
import io
import importlib.metadata
import random
import re
from pathlib import Path
from typing import Iterator

from pydoc_data.topics import topics as _PYDOC_TOPICS

with contextlib.redirect_stdout(io.StringIO()):  # importing `this` prints the Zen of Python
    import this

from .base import PSF, Document, Item, dist_license, pack_paragraphs, package_dir, package_dist, rel_files, round_robin
from .python_source import read_source, stdlib_bucket, stdlib_files

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
        source = read_source(path)
        if source is None:
            continue
        try:
            paragraphs = [p for d in _docstrings(source) for p in _prose_paragraphs(d)]
        except (SyntaxError, ValueError, RecursionError):
            continue
        for i, chunk in enumerate(pack_paragraphs(paragraphs)):
            if len(chunk) >= 200:
                yield Document("english", f"{prefix}/{rel}#{i}", chunk), label, licence


def _topics_docs() -> Iterator[Item]:
    """The Python reference manual rendered as plain text (``pydoc_data.topics``)."""
    for key in sorted(_PYDOC_TOPICS):
        paragraphs = _prose_paragraphs(_PYDOC_TOPICS[key])
        for i, chunk in enumerate(pack_paragraphs(paragraphs)):
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
        for i, chunk in enumerate(pack_paragraphs(_prose_paragraphs(body))):
            if len(chunk) >= 200:
                yield Document("english", f"metadata/{name}#{i}", chunk), f"pypi:{name}", dist_license(dist)


def _zen_docs() -> Iterator[Item]:
    text = "".join(this.d.get(c, c) for c in this.s)
    yield Document("english", "zen_of_python", text), "cpython-stdlib", PSF


#: Third-party packages (core dependencies) whose docstrings are rich English prose.
_DOCSTRING_PACKAGES = ("numpy", "pandas", "torch")


def english_docs(rng: random.Random) -> Iterator[Item]:
    stdlib = [(rel, p) for rel, p in stdlib_files() if stdlib_bucket(rel) == "prose"]
    rng.shuffle(stdlib)
    sources = [_zen_docs(), _topics_docs(),
               _docstring_docs(stdlib, "cpython-stdlib-docstrings", PSF, "stdlib"),
               _metadata_docs()]
    for pkg in _DOCSTRING_PACKAGES:
        root, dist = package_dir(pkg), package_dist(pkg)
        if root is None or dist is None:
            continue
        files = [(f"{pkg}/{p.relative_to(root).as_posix()}", p) for p in rel_files(root, "*.py")
                 if not {"tests", "test", "testing"}.intersection(p.relative_to(root).parts)]
        rng.shuffle(files)
        label = f"pypi:{dist.metadata['Name'].lower()}"
        sources.append(_docstring_docs(files, label, dist_license(dist), "docstrings"))
    yield from round_robin(*sources)

