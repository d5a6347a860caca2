"""Notebook 10 follows the course's notebook rules (main's tests for 00-09, applied to 10): the FAST switch
in the first code cell, run-time markers in the header, every checker of ``moe_lab.exercises.nb10`` used by
a stub cell and required by the worked solutions, relative links that land, and every number it reads
from the lab's committed results present there."""

from __future__ import annotations

import json
import re
from pathlib import Path

from moe_lab.exercises import nb10
from moe_lab.lab import RECIPES

ROOT = Path(__file__).resolve().parents[1]
NB = ROOT / "notebooks" / "10_design_space.ipynb"
SOL = ROOT / "notebooks" / "solutions" / "10_solutions.ipynb"


def cells(path: Path) -> list[dict]:
    return json.loads(path.read_text(encoding="utf-8"))["cells"]


def code(path: Path) -> str:
    return "\n".join("".join(c["source"]) for c in cells(path) if c["cell_type"] == "code")


def test_fast_switch_and_run_time_markers():
    first = "".join(next(c for c in cells(NB) if c["cell_type"] == "code")["source"])
    assert re.search(r"^FAST = fast_mode\(\)", first, re.M) and "MOE_LAB_FAST" in first
    assert len(re.findall(r"^FAST = ", code(NB), re.M)) == 1
    header = "".join(cells(NB)[1]["source"])
    for mode in ("fast", "full"):
        m = re.search(rf"<!-- run-time {mode} -->(.*?)<!-- /run-time -->", header)
        assert m and re.fullmatch(r"about \d+(\.5)? (s|min)", m.group(1)), mode


def test_every_checker_is_an_exercise_with_a_worked_solution():
    notebook, solutions = code(NB), code(SOL)
    checkers = [n for n in dir(nb10) if n.startswith("check_")]
    assert len(checkers) >= 3
    assert "exercises import nb10 as ex" in notebook and "exercises import nb10 as ex" in solutions
    assert "# YOUR CODE HERE" in notebook
    for name in checkers:
        assert f"ex.{name}(" in notebook, name
        after = solutions.split(f"ex.{name}(", 1)
        assert len(after) == 2 and ".require()" in after[1].split("\n")[0], name


def test_relative_links_land():
    for path in (NB, SOL):
        md = "\n".join("".join(c["source"]) for c in cells(path) if c["cell_type"] == "markdown")
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", md):
            if not target.startswith("http"):
                assert (path.parent / target).resolve().exists(), (path.name, target)


def test_committed_results_have_every_recipe_and_seed():
    """The full-mode notebook reads data/design_space: every recipe x 3 seeds (ok, or failed with a reason),
    the causality measurement, the logs it plots and the command that made them."""
    out = ROOT / "data" / "design_space"
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines() if line.strip()]
    for name in RECIPES:
        mine = [r for r in rows if r["recipe"] == name]
        assert sorted(r["seed"] for r in mine) == [0, 1, 2], name
        assert all(r["status"] == "ok" or r.get("reason") for r in mine), name
    for r in rows:
        if r["status"] == "ok":
            assert (out / "logs" / f"{r['recipe']}-s{r['seed']}.jsonl").exists()
    assert json.loads((out / "command.json").read_text())["command"].startswith("python -m moe_lab.lab run")
    leak = json.loads((out / "causality.json").read_text())
    assert {r["recipe"] for r in leak} >= {"expert_choice", "mixtral_aux"}
