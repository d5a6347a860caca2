"""Notebooks 00-02 and their solutions follow the course layout (issue 16): the Colab cell first, a
header with objectives / prerequisites / run time / glossary, diagrams embedded as attachments that
match docs/images, an exercise stub + checker per exercise, and solutions that call every checker."""

import base64
import json
import re
from pathlib import Path

import pytest

from moe_lab.exercises import nb00, nb01, nb02

ROOT = Path(__file__).resolve().parents[1]
NB = ROOT / "notebooks"
COLAB_URL = "https://github.com/moe-lab/moe_lab"
NOTEBOOKS = {"00_quickstart": nb00, "01_building_blocks": nb01, "02_full_model": nb02}
DIAGRAMS = {"00_quickstart": ["moe_block.png"], "01_building_blocks": ["moe_block.png", "router_path.png"]}


def cells(path: Path) -> list[dict]:
    return json.loads(path.read_text())["cells"]


def text(cell: dict) -> str:
    return "".join(cell["source"])


def checkers(module) -> set[str]:
    return {n for n in dir(module) if n.startswith("check_")}


@pytest.mark.parametrize("name", [*NOTEBOOKS, *(f"solutions/{n[:2]}_solutions" for n in NOTEBOOKS)])
def test_colab_cell_first(name):
    first = cells(NB / f"{name}.ipynb")[0]
    assert first["cell_type"] == "code"
    src = text(first)
    assert src.startswith("# On Google Colab only") and COLAB_URL in src and '"google.colab" in sys.modules' in src


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_header(name):
    header = text(cells(NB / f"{name}.ipynb")[1])
    assert header.startswith(f"# {name[:2]} · ")
    for part in ("**You will learn**", "**Prerequisites**", "**Run time**", "](../docs/GLOSSARY.md)"):
        assert part in header, f"{name}: header lacks {part}"
    assert "RUNTIME" not in header


@pytest.mark.parametrize("name", DIAGRAMS)
def test_diagrams_are_embedded_and_current(name):
    md = [c for c in cells(NB / f"{name}.ipynb") if c["cell_type"] == "markdown"]
    for png in DIAGRAMS[name]:
        holders = [c for c in md if f"](attachment:{png})" in text(c)]
        assert holders, f"{name} does not show {png}"
        for c in holders:
            data = base64.b64decode(c["attachments"][png]["image/png"])
            assert data == (ROOT / "docs" / "images" / png).read_bytes(), \
                f"{name}: {png} is stale; run python docs/images/draw_diagrams.py --embed"


@pytest.mark.parametrize("name,module", NOTEBOOKS.items())
def test_every_checker_has_an_exercise_and_a_solution(name, module):
    nb_code = "\n".join(text(c) for c in cells(NB / f"{name}.ipynb") if c["cell_type"] == "code")
    sol_code = "\n".join(text(c) for c in cells(NB / "solutions" / f"{name[:2]}_solutions.ipynb")
                         if c["cell_type"] == "code")
    names = checkers(module)
    assert len(names) >= 3
    for check in names:
        assert f"ex.{check}(" in nb_code, f"{name} never calls {check}"
        assert re.search(rf"ex\.{check}\([^\n]*\)\.require\(\)", sol_code), f"solutions never require {check}"
    stubs = re.findall(r"answer = None  # YOUR CODE HERE|return None  # YOUR CODE HERE", nb_code)
    assert len(stubs) == len(names), f"{name}: {len(stubs)} stubs for {len(names)} checkers"
    assert "Try this" not in "".join(text(c) for c in cells(NB / f"{name}.ipynb"))
