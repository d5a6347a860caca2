"""Every exercise checker of every notebook is used: a stub cell in the notebook calls it, and the
worked solutions notebook requires it to pass (``.require()``), which CI runs."""

import importlib
import json
from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
NUMBERS = [f"{i:02d}" for i in range(11)]


def _code(path: Path) -> str:
    return "\n".join("".join(c["source"]) for c in json.loads(path.read_text(encoding="utf-8"))["cells"]
                     if c["cell_type"] == "code")


@pytest.mark.parametrize("nn", NUMBERS)
def test_every_checker_is_an_exercise_with_a_worked_solution(nn):
    ex = importlib.import_module(f"moe_lab.exercises.nb{nn}")
    notebook = _code(next(NOTEBOOKS.glob(f"{nn}_*.ipynb")))
    solutions = _code(NOTEBOOKS / "solutions" / f"{nn}_solutions.ipynb")
    checkers = [name for name in dir(ex) if name.startswith("check_")]
    assert len(checkers) >= 3, f"notebook {nn} has {len(checkers)} graded exercises (at least 3)"
    assert f"exercises import nb{nn} as ex" in notebook and f"exercises import nb{nn} as ex" in solutions
    assert "# YOUR CODE HERE" in notebook, f"notebook {nn} has no stub for the learner to fill in"
    for name in checkers:
        assert f"ex.{name}(" in notebook, f"notebook {nn} has no stub cell calling ex.{name}"
        after = solutions.split(f"ex.{name}(", 1)
        assert len(after) == 2 and ".require()" in after[1].split("\n")[0], \
            f"solutions {nn} do not require ex.{name}(...) to pass"
