"""The run times in each notebook's header are written by scripts/execute_notebooks.py from what it
measured, never typed by hand (issue 27, item 6): the header states them between markers that the
script rewrites, and the notebooks with a shortened path show the `FAST = ...` switch in their first
code cell, its default set by MOE_LAB_FAST."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("execute_notebooks", ROOT / "scripts" / "execute_notebooks.py")
xn = importlib.util.module_from_spec(spec)
spec.loader.exec_module(xn)

NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
NO_FAST_PATH = {"00", "03"}  # the same run in both modes: a switch would do nothing


def cells(path: Path) -> list[dict]:
    return json.loads(path.read_text(encoding="utf-8"))["cells"]


def test_format_run_time():
    assert xn.format_run_time(3) == "about 5 s" and xn.format_run_time(42) == "about 40 s"
    assert xn.format_run_time(150) == "about 2.5 min" and xn.format_run_time(900) == "about 15 min"


def test_set_run_time_rewrites_only_its_mode():
    nb = {"cells": [{"cell_type": "markdown", "source": "**Run time**: <!-- run-time fast -->about 1 s<!-- /run-time"
                                                        " --> fast, <!-- run-time full -->?<!-- /run-time --> full."},
                    {"cell_type": "code", "source": "<!-- run-time fast -->x<!-- /run-time -->"}]}
    assert xn.set_run_time(nb, "full", 130) == 1
    assert xn.run_times(nb) == {"fast": "about 1 s", "full": "about 2 min"}
    assert nb["cells"][1]["source"] == "<!-- run-time fast -->x<!-- /run-time -->"  # code is never touched
    assert xn.set_run_time({"cells": []}, "fast", 1) == 0
    with pytest.raises(ValueError, match="mode"):
        xn.set_run_time(nb, "slow", 1)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_the_header_states_measured_run_times(path):
    nb = json.loads(path.read_text(encoding="utf-8"))
    times = xn.run_times(nb)
    assert set(times) == {"fast", "full"}, f"{path.name}: header lacks a run-time marker: {times}"
    for t in times.values():
        assert re.fullmatch(r"about \d+(\.5)? (s|min)", t), t
    header = "".join(nb["cells"][1]["source"])
    paragraph = re.search(r"\*\*Run time\*\*.*?(?:\n\n|$)", header, re.S).group(0)
    typed = re.sub(r"<!-- run-time \w+ -->.*?<!-- /run-time -->", "", paragraph)
    assert not re.search(r"\d+(\.\d+)? ?(s|min|minutes|seconds)\b", typed), f"{path.name}: a typed run time: {typed}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_the_fast_switch_is_in_the_first_code_cell(path):
    nn = path.name[:2]
    first = "".join(next(c for c in cells(path) if c["cell_type"] == "code")["source"])
    code = "\n".join("".join(c["source"]) for c in cells(path) if c["cell_type"] == "code")
    if nn in NO_FAST_PATH:
        assert "FAST" not in code and "fast_mode" not in code
        return
    assert re.search(r"^FAST = fast_mode\(\)", first, re.M) and "MOE_LAB_FAST" in first
    assert len(re.findall(r"^FAST = ", code, re.M)) == 1, "FAST is set once, in the first code cell"


def test_a_run_writes_what_it_measured(tmp_path):
    """run_one executes a notebook and writes its measured time into the header marker of its mode;
    --times-only writes only that into the saved file, whose outputs stay as they were."""
    pytest.importorskip("nbclient")
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_markdown_cell("# T\n\n**Run time**: <!-- run-time fast -->about 99 min<!-- /run-time --> "
                                      "fast, <!-- run-time full -->about 99 min<!-- /run-time --> full.\n"),
        nbformat.v4.new_code_cell("import time\ntime.sleep(0.2)\nprint('ran')")])
    nb.cells[1].outputs = [nbformat.v4.new_output("stream", text="saved output\n")]
    path = tmp_path / "t.ipynb"
    nbformat.write(nb, path)
    result = xn.run_one(path, execute=True, fast=True, cell_timeout=120, html="none", scale=1.0,
                        failed_dir=tmp_path, progress=False, times_only=True)
    assert result["ok"] and result["run_time_markers"] == 1, result
    saved = json.loads(path.read_text())
    assert xn.run_times(saved) == {"fast": xn.format_run_time(result["execute_s"]), "full": "about 99 min"}
    assert "".join(saved["cells"][1]["outputs"][0]["text"]) == "saved output\n"  # --times-only keeps the outputs
    result = xn.run_one(path, execute=True, fast=False, cell_timeout=120, html="none", scale=1.0,
                        failed_dir=tmp_path, progress=False)
    saved = json.loads(path.read_text())
    assert result["ok"] and xn.run_times(saved)["full"] == xn.format_run_time(result["execute_s"])
    assert "ran" in "".join(saved["cells"][1]["outputs"][0]["text"])
