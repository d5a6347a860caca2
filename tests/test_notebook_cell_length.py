"""Cells that hold the lesson (issue 27, item 7): no code cell of a notebook (or of its worked
solutions) runs past about 40 lines unless it is on the allow-list below, each entry with the reason
a learner can see for keeping it in one piece. Plumbing a learner need not read lives in
``moe_lab.notebook_utils`` instead (tests/test_notebook_utils.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")) + \
    sorted((ROOT / "notebooks" / "solutions").glob("[0-9][0-9]_solutions.ipynb"))
MAX_LINES = 40

ALLOWED = {  # (notebook file, cell id): why the cell stays in one piece
    # 01 builds attention from scratch on purpose: projection, RoPE, GQA, the mask and the output are one
    # function the learner reads top to bottom and compares with the model's (split, it would not run).
    ("01_building_blocks.ipynb", "129d82fa"): "the from-scratch attention block",
    # 03 shows a catalogue of broken checkpoints: seven few-line "damage" functions whose errors print together.
    ("03_loading_weights.ipynb", "3885c5ea"): "the catalogue of broken checkpoints",
    # 04 defines the three effect measures (ΔNLL, KL, top-1) on one shared evaluation set; the functions
    # and the texts they read belong together.
    ("04_routing_hooks.ipynb", "ddf5e0f8"): "the evaluation set and the three effect measures",
    # 06's summary table: one row per claim of the paper, each with its source and whether it is comparable.
    ("06_paper_routing_analysis.ipynb", "334035ae"): "the summary table, one row per claim",
    # 07 computes the load-balancing loss by hand and checks it against moe_lab, transformers and the
    # training objective in one go ("Check it" comments mark each step).
    ("07_training_a_tiny_moe.ipynb", "cfe765f6"): "the load-balancing loss by hand and its checks",
}


def code_cells(path: Path):
    for cell in json.loads(path.read_text(encoding="utf-8"))["cells"]:
        if cell["cell_type"] == "code":
            yield cell.get("id"), "".join(cell["source"])


def n_lines(src: str) -> int:
    return len(src.rstrip("\n").splitlines())


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_no_code_cell_runs_past_about_40_lines(path):
    long = [(cid, n_lines(src)) for cid, src in code_cells(path)
            if n_lines(src) > MAX_LINES and (path.name, cid) not in ALLOWED]
    assert not long, (f"{path.name}: code cells over {MAX_LINES} lines {long}: split them at a step the learner can "
                      "see, move plumbing to moe_lab.notebook_utils, or add them to ALLOWED with the reason")


def test_the_allow_list_is_current():
    """Every allowed cell still exists and is still long (a stale entry would hide a new long cell)."""
    cells = {(p.name, cid): n_lines(src) for p in NOTEBOOKS for cid, src in code_cells(p)}
    stale = [k for k in ALLOWED if cells.get(k, 0) <= MAX_LINES]
    assert not stale, f"allow-list entries that are gone or no longer long: {stale}"


def test_notebook_09_measures_memory_in_one_line():
    """09's /proc plumbing lives in moe_lab.notebook_utils.peak_growth; the notebook only calls it."""
    code = "\n".join(src for _, src in code_cells(ROOT / "notebooks" / "09_real_moes.ipynb"))
    assert "/proc" not in code and "class peak_growth" not in code and "with peak_growth() as" in code
    assert "shipped_fixture(" in code and "fixtures\" /" not in code
