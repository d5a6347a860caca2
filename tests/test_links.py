"""Internal links of the course (issue 27, item 8): every relative link in the README, docs/*.md and the
notebooks' markdown (solutions too) points to a file that exists, and every #anchor (a glossary term,
a section of a notebook or a document) to a heading or an explicit anchor there. No network: web
links are only checked to be well formed."""

from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "notebooks").glob("*.ipynb"),
                  *(ROOT / "notebooks" / "solutions").glob("*.ipynb"), *(ROOT / "data").glob("*.md"),
                  *(ROOT / "data").glob("*/*.md")])

# [text](target) and [text](target "title"), not images of a data: URL; <a href="...">; ![..](..)
_MD_LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_HREF = re.compile(r"""<a\s[^>]*href=["']([^"']+)["']""", re.I)
_CODE = re.compile(r"```.*?```|`[^`\n]*`", re.S)


def github_anchor(heading: str) -> str:
    """The id GitHub (and JupyterLab) give a markdown heading: lower case, markup and punctuation
    dropped, spaces -> hyphens."""
    text = re.sub(r"<[^>]+>", "", heading)                      # inline html
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)        # links -> their text
    text = text.replace("`", "").replace("*", "").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def markdown_of(path: Path) -> str:
    if path.suffix == ".ipynb":
        cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
        return "\n\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")
    return path.read_text(encoding="utf-8")


@lru_cache(maxsize=None)
def anchors_of(path: Path) -> frozenset[str]:
    """Heading ids (GitHub's rule; a repeated heading gets -1, -2, ...) and explicit id/name anchors."""
    text = _CODE.sub("", markdown_of(path)) if path.suffix == ".md" else markdown_of(path)
    seen: dict[str, int] = {}
    out = set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, flags=re.M):
        slug = github_anchor(heading)
        n = seen.get(slug, 0)
        out.add(slug if n == 0 else f"{slug}-{n}")
        seen[slug] = n + 1
    out |= set(re.findall(r"""<a\s[^>]*(?:id|name)=["']([^"']+)["']""", text, flags=re.I))
    return frozenset(out)


def links_of(path: Path) -> list[str]:
    text = _CODE.sub("", markdown_of(path))
    return _MD_LINK.findall(text) + _HREF.findall(text)


def _rel(p: Path) -> str:
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p)


def problems(path: Path) -> list[str]:
    out = []
    for target in links_of(path):
        if re.match(r"^(https?:|mailto:|attachment:|data:)", target):
            if target.startswith("http") and " " in target:
                out.append(f"{target!r}: a web link with a space")
            continue
        file_part, _, anchor = target.partition("#")
        dest = path if not file_part else (path.parent / unquote(file_part)).resolve()
        if not dest.exists():
            out.append(f"{target!r}: no such file ({_rel(dest)})")
            continue
        if anchor and dest.suffix in (".md", ".ipynb") and unquote(anchor) not in anchors_of(dest):
            out.append(f"{target!r}: no heading or anchor #{anchor} in {_rel(dest)}")
    return out


def test_the_anchor_rule():
    assert github_anchor("Belady's optimal cache") == "beladys-optimal-cache"
    assert github_anchor("3. The `router` and **top-k**") == "3-the-router-and-top-k"
    assert github_anchor("q/k permutation") == "qk-permutation"


def test_the_checker_finds_broken_links(tmp_path):
    (tmp_path / "a.md").write_text("# Title\n\n## A section\n\n[ok](#a-section) [ok](b.md#there) "
                                   "[bad](#nowhere) [bad](missing.md) [bad](b.md#gone) `[code](ignored.md)` "
                                   "[web](https://example.org/x)\n")
    (tmp_path / "b.md").write_text("<a id=\"there\"></a>\n# B\n")
    found = problems(tmp_path / "a.md")
    assert len(found) == 3 and any("#nowhere" in p for p in found) and any("missing.md" in p for p in found) \
        and any("#gone" in p for p in found), found


@pytest.mark.parametrize("path", SOURCES, ids=[str(p.relative_to(ROOT)) for p in SOURCES])
def test_internal_links_and_anchors_resolve(path):
    found = problems(path)
    assert not found, f"{path.relative_to(ROOT)}: broken links:\n" + "\n".join(found)


def test_glossary_links_from_the_notebooks_land_on_a_term():
    glossary = anchors_of((ROOT / "docs" / "GLOSSARY.md").resolve())
    used = {a for p in SOURCES for t in links_of(p) if "GLOSSARY.md#" in t for a in [t.split("#", 1)[1]]}
    assert not sorted(used - glossary), sorted(used - glossary)
