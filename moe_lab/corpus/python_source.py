"""The ``python`` domain: CPython's standard library, cut at top-level statements."""

from __future__ import annotations

import ast
import functools
import os
import random
import sysconfig
import tokenize
from pathlib import Path
from typing import Iterator

from .base import PSF, Document, Item, pack_paragraphs, stable_int

_SKIP_DIRS = {"test", "tests", "idle_test", "encodings", "pydoc_data", "site-packages",
              "dist-packages", "__pycache__", "lib2to3", "turtledemo"}


@functools.lru_cache(maxsize=None)
def stdlib_files() -> tuple[tuple[str, Path], ...]:
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


def stdlib_bucket(rel: str) -> str:
    """Stdlib files feed either the code domain or (docstrings only) the English
    domain, never both, so the two domains do not share text."""
    return "prose" if stable_int(rel) % 3 == 0 else "code"


def read_source(path: Path) -> str | None:
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
    return [c for c in pack_paragraphs([p for p in pieces if p.strip()], sep="\n\n") if len(c) >= 200]


def python_docs(rng: random.Random) -> Iterator[Item]:
    files = [(rel, p) for rel, p in stdlib_files() if stdlib_bucket(rel) == "code"]
    rng.shuffle(files)
    for rel, path in files:
        source = read_source(path)
        if source is None:
            continue
        try:
            chunks = _python_chunks(source)
        except SyntaxError:
            continue
        for i, chunk in enumerate(chunks):
            yield Document("python", f"stdlib/{rel}#{i}", chunk), "cpython-stdlib", PSF

