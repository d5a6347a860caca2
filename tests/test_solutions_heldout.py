"""The worked solutions run on the held-out text the notebooks use (issue 27, item 8): where a notebook
traces the shipped, tested held-out sample (``evalset.load_heldout_sample``), its solutions do too, and
never the held-out split of a corpus they build themselves (a different, untested set).

Notebook 10 is the exception by design: it traces no held-out text itself. Its held-out numbers are the
design-space lab's, measured by ``moe_lab.lab`` on the held-out split of the lab's own corpus (the
reduced-vocabulary models cannot read the shipped sample's Mixtral ids), and read from the committed
``data/design_space/results.jsonl``; its solutions must read those same committed rows and, like the
notebook, must not trace the held-out sample (test below)."""

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NUMBERS = [f"{i:02d}" for i in range(11)]
SAMPLE = re.compile(r"\b(load_heldout_sample|heldout_by_domain)\(")  # the sample, or notebook_utils' grouping of it


def code(path: Path) -> str:
    return "\n".join("".join(c["source"]) for c in json.loads(path.read_text(encoding="utf-8"))["cells"]
                     if c["cell_type"] == "code")


@pytest.mark.parametrize("nn", NUMBERS)
def test_solutions_use_the_notebooks_heldout_sample(nn):
    notebook = code(next((ROOT / "notebooks").glob(f"{nn}_*.ipynb")))
    solutions = code(ROOT / "notebooks" / "solutions" / f"{nn}_solutions.ipynb")
    if not SAMPLE.search(notebook):
        pytest.skip(f"notebook {nn} does not trace the held-out sample")
    ok = bool(SAMPLE.search(solutions)) and not re.search(r"\.heldout\b", solutions)
    assert ok, f"solutions {nn} trace another held-out set than notebook {nn} (use evalset.load_heldout_sample)"


def test_10_solutions_read_the_labs_committed_results():
    """Notebook 10 (full mode) and its solutions read the lab's committed rows, measured on the lab
    corpus's held-out split; neither traces the held-out sample (whose ids the lab's models cannot read)."""
    notebook = code(next((ROOT / "notebooks").glob("10_*.ipynb")))
    solutions = code(ROOT / "notebooks" / "solutions" / "10_solutions.ipynb")
    committed = re.compile(r'read_rows\([^\n]*"data" / "design_space"|read_rows\(RESULTS\)')
    assert committed.search(notebook) and re.search(r'read_rows\([^\n]*"data" / "design_space"', solutions)
    assert not SAMPLE.search(notebook) and not SAMPLE.search(solutions)
