"""Every notebook has an "Open in Colab" badge in the README, pointing at the one repository address."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("colab_badges", ROOT / "scripts" / "colab_badges.py")
cb = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cb)

NOTEBOOKS = cb.notebooks()
BADGE_LINK = re.compile(r"\[!\[Open In Colab\]\([^)]*\)\]\((https://colab\.research\.google\.com/[^)]+)\)")


def test_the_ten_notebooks_are_found():
    assert len(NOTEBOOKS) >= 10 and NOTEBOOKS[0].startswith("00_") and any(n.startswith("09_") for n in NOTEBOOKS)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_every_notebook_has_a_colab_badge_in_the_readme(name):
    links = BADGE_LINK.findall((ROOT / "README.md").read_text())
    expected = f"https://colab.research.google.com/github/moe-lab/moe_lab/blob/main/notebooks/{name}"
    assert cb.colab_url(name) == expected
    assert expected in links, f"README.md has no Colab badge for {name}: run python scripts/colab_badges.py"


def test_readme_table_is_the_generated_one():
    text = (ROOT / "README.md").read_text()
    assert cb.updated_readme(text, NOTEBOOKS) == text, "README's Colab table is out of date: run python scripts/colab_badges.py"
    links = BADGE_LINK.findall(text)
    assert len(links) == len(set(links)) == len(NOTEBOOKS), "one badge per notebook, no stale ones"


def test_missing_markers_are_a_clear_error():
    with pytest.raises(ValueError, match="expected the markers"):
        cb.updated_readme("# no table here\n", NOTEBOOKS)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_the_colab_cell_clones_the_same_repository(name):
    """Where a notebook has its Colab set-up cell, it clones the repository the badge opens."""
    cells = json.loads((ROOT / "notebooks" / name).read_text())["cells"]
    clones = [u for c in cells if c["cell_type"] == "code"
              for u in re.findall(r"https://github\.com/[\w.-]+/[\w.-]+", "".join(c["source"]))
              if "google.colab" in "".join(c["source"])]
    if not clones:
        pytest.skip(f"{name} has no Colab cell yet")
    assert set(clones) == {cb.REPO_URL}, f"{name}'s Colab cell clones {clones}, the badge opens {cb.REPO_URL}"
