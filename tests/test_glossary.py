"""docs/GLOSSARY.md: every index link lands on a heading (GitHub's anchors), the course's terms are
there, each says where it is taught, and notebooks 00-02 link to it."""

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GLOSSARY = ROOT / "docs" / "GLOSSARY.md"

# the terms the issue lists, by the heading that defines them
REQUIRED = ["Router", "Gate and gating weights", "Expert", "Top-k", "Logits", "Softmax", "Load balancing",
            "Auxiliary loss", "Router z-loss", "Capacity", "Token", "BOS", "RoPE", "GQA", "KV cache", "SwiGLU",
            "RMSNorm", "Routing trace", "First choice", "Repetition rate", "Entropy", "Ablation", "Steering",
            "Offloading", "Perplexity and NLL", "Held-out", "Unigram baseline", "Bootstrap CI"]


def github_anchor(heading: str) -> str:
    """The id GitHub gives a markdown heading: lower case, punctuation dropped, spaces -> hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def headings(text: str) -> dict[str, str]:
    return {github_anchor(h): h for h in re.findall(r"^###\s+(.+)$", text, flags=re.M)}


def test_anchor_rule():
    assert github_anchor("Belady's optimal cache") == "beladys-optimal-cache"
    assert github_anchor("Baselines: uniform, marginal, shuffled") == "baselines-uniform-marginal-shuffled"
    assert github_anchor("q/k permutation") == "qk-permutation"


def test_every_link_lands_and_every_term_is_indexed():
    text = GLOSSARY.read_text()
    anchors = headings(text)
    links = set(re.findall(r"\]\(#([^)]+)\)", text))
    assert links, "the glossary has no internal links"
    missing = sorted(links - set(anchors))
    assert not missing, f"links to no heading: {missing}"
    unindexed = sorted(set(anchors) - links)
    assert not unindexed, f"terms missing from the index: {unindexed}"
    for term in REQUIRED:
        assert github_anchor(term) in anchors, f"glossary lacks {term!r}"


def test_each_term_has_a_definition_and_where_it_is_taught():
    text = GLOSSARY.read_text()
    blocks = re.split(r"^###\s+", text, flags=re.M)[1:]
    for block in blocks:
        title, body = block.split("\n", 1)
        body = body.split("\n## ")[0].strip()
        assert len(body.split()) >= 25, f"{title}: definition too short"
        assert re.search(r"Taught in|not computed in\s+the\s+notebooks", body), f"{title}: says not where it is taught"


def test_notebook_links_resolve():
    text = GLOSSARY.read_text()
    for target in set(re.findall(r"\]\((\.\./notebooks/[^)]+)\)", text)):
        assert (GLOSSARY.parent / target).resolve().is_file(), target


def test_notebooks_00_to_02_link_the_glossary():
    for name in ("00_quickstart", "01_building_blocks", "02_full_model"):
        nb = json.loads((ROOT / "notebooks" / f"{name}.ipynb").read_text())
        md = "".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "markdown")
        assert "../docs/GLOSSARY.md" in md, name
        for anchor in re.findall(r"GLOSSARY\.md#([\w\-]+)", md):
            assert anchor in headings(GLOSSARY.read_text()), f"{name} links to missing #{anchor}"
