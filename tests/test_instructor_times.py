"""The instructor's guide's measured times (issue 27, item 3): scripts/instructor_times.py reads the
per-cell timing nbclient records in a notebook (metadata.execution) and writes per-section ("## "
headings) times into docs/INSTRUCTORS.md between markers. Tested on a small synthetic notebook, and
on the guide itself: every notebook has a block, and each block lists exactly its notebook's sections."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("instructor_times", ROOT / "scripts" / "instructor_times.py")
it = importlib.util.module_from_spec(spec)
spec.loader.exec_module(it)


def code(start: str | None, end: str | None) -> dict:
    meta = {} if start is None else {"execution": {"iopub.execute_input": start, "shell.execute_reply": end}}
    return {"cell_type": "code", "id": "x", "metadata": meta, "source": "1", "outputs": [], "execution_count": 1}


def md(text: str) -> dict:
    return {"cell_type": "markdown", "id": "m", "metadata": {}, "source": text}


SYNTH = {"cells": [
    md("# Title"), code("2026-01-01T00:00:00.000000Z", "2026-01-01T00:00:01.500000Z"),
    md("## 1. First\ntext"), code("2026-01-01T00:00:02.000000Z", "2026-01-01T00:00:12.000000Z"),
    code("2026-01-01T00:00:12.000000Z", "2026-01-01T00:02:12.000000Z"),
    md("## 2. Second"), code(None, None), code("2026-01-01T00:03:00Z", "2026-01-01T00:03:04Z"),
    md("### a subsection stays in its section"), code("2026-01-01T00:04:00Z", "2026-01-01T00:04:01Z"),
]}


def test_cell_seconds_and_sections():
    rows = it.section_times(SYNTH)
    assert [r["section"] for r in rows] == ["(title)", "1. First", "2. Second"]
    assert rows[0]["seconds"] == pytest.approx(1.5)
    assert rows[1] == {"section": "1. First", "cells": 2, "seconds": pytest.approx(130.0), "untimed": 0}
    assert rows[2]["cells"] == 3 and rows[2]["untimed"] == 1 and rows[2]["seconds"] == pytest.approx(5.0)
    assert it.cell_seconds(code(None, None)) is None
    assert it.fmt(130.0) == "2.2 min" and it.fmt(5.0, 1) == "5 s (+1 cells not timed)" and it.fmt(None) == "n/a"


def test_bad_timing_names_the_cell():
    with pytest.raises(ValueError, match="cell 'x'.*not ISO 8601"):
        it.cell_seconds(code("yesterday", "today"))


def test_render_writes_both_modes_and_reports_missing_blocks():
    fast = {"notebooks": {"synth": {"sections": it.section_times({"cells": [
        md("## 1. First"), code("2026-01-01T00:00:00Z", "2026-01-01T00:00:03Z"),
        code("2026-01-01T00:00:03Z", "2026-01-01T00:00:04Z")]})}}}
    guide = "x\n<!-- times summary -->\nold\n<!-- /times -->\n<!-- times synth -->\nold\n<!-- /times -->\n<!-- times gone -->\n<!-- /times -->\n"
    out, problems = it.render(guide, {"synth": SYNTH, "other": SYNTH}, fast)
    block = re.search(r"<!-- times synth -->\n(.*?)<!-- /times -->", out, re.S).group(1)
    assert "| 1. First | 2 | 4 s | 2.2 min |" in block
    assert "| 2. Second | 3 | n/a | 5 s (+1 cells not timed) |" in block
    assert "old" not in out
    assert any("'gone'" in p for p in problems) and any("other.ipynb" in p for p in problems)
    assert it.render(out, {"synth": SYNTH, "other": SYNTH}, fast)[0] == out  # idempotent


def test_fast_rows_of_a_changed_section_are_flagged():
    fast = {"notebooks": {"s": {"sections": [{"section": "1. First", "cells": 1, "seconds": 3.0, "untimed": 0}]}}}
    assert "(cells changed since)" in it.notebook_block("s", SYNTH, fast)


# ---------------------------------------------------------------- the guide itself

GUIDE = ROOT / "docs" / "INSTRUCTORS.md"


def blocks() -> dict[str, str]:
    return {m.group(2): m.group(3) for m in it._BLOCK.finditer(GUIDE.read_text(encoding="utf-8"))}


def test_every_notebook_has_a_times_block():
    names = set(blocks())
    assert "summary" in names
    missing = [p.stem for p in sorted((ROOT / "notebooks").glob("*.ipynb")) if p.stem not in names]
    assert not missing, f"run python scripts/instructor_times.py: no times block for {missing}"


@pytest.mark.parametrize("path", sorted((ROOT / "notebooks").glob("*.ipynb")), ids=lambda p: p.stem)
def test_the_guides_sections_match_the_notebook(path):
    nb = json.loads(path.read_text(encoding="utf-8"))
    block = blocks().get(path.stem)
    assert block is not None, f"no times block for {path.stem}"
    listed = [ln.split(" | ")[0].lstrip("| ") for ln in block.splitlines()[2:] if ln.startswith("| ") and "whole notebook" not in ln]
    expected = [r["section"].replace("|", "/") for r in it.section_times(nb) if not (r["section"] == it.TITLE and r["cells"] == 0)]
    assert listed == expected, f"the guide's sections of {path.stem} are stale: run python scripts/instructor_times.py"


def test_values_are_read_from_saved_outputs(tmp_path, monkeypatch):
    nbs = tmp_path / "notebooks"
    nbs.mkdir()
    cell = code("2026-01-01T00:00:00Z", "2026-01-01T00:00:01Z") | {"id": "c1", "outputs": [
        {"output_type": "stream", "name": "stdout", "text": ["the loss: 4.6317 (balanced: k = 2)\n"]}]}
    (nbs / "n.ipynb").write_text(json.dumps({"cells": [cell, code(None, None) | {"id": "c2"}]}))
    monkeypatch.setattr(it, "NOTEBOOKS", nbs)
    guide = ("a <!-- value n c1 /loss: ([\\d.]+)/ -->old<!-- /value --> b "
             "<!-- value n c2 /loss: ([\\d.]+)/ -->9.99<!-- /value --> <!-- times summary -->\n<!-- /times -->")
    out, problems = it.render(guide, {}, {})
    assert "-->4.6317<!--" in out and "9.99" not in out and "not in the saved outputs yet" in out
    assert any("n.ipynb cell c2" in p for p in problems)


def test_the_guides_values_are_in_the_saved_outputs():
    text = GUIDE.read_text(encoding="utf-8")
    out, problems = it.render(text, {p.stem: it.load(p) for p in sorted((ROOT / "notebooks").glob("*.ipynb"))}, {})
    values = it._VALUE.findall(out)
    assert len(values) >= 10, "the model answers quote the saved outputs through value markers"
    bad = [p for p in problems if p.startswith("value:") and "cell" in p and "no cell with that id" in p]
    assert not bad, bad


def test_the_workshop_slots_name_existing_sections():
    for slot, stem, last in it.WORKSHOP:
        path = ROOT / "notebooks" / f"{stem}.ipynb"
        assert path.exists(), f"workshop slot {slot}: {path} is missing"
        rows, label = it._through(it.section_times(it.load(path)), last)
        assert rows and label
    block = blocks().get("workshop")
    assert block is not None and "**all slots**" in block and "no section" not in block


def test_a_workshop_slot_through_a_section_sums_the_sections_above():
    rows, label = it._through(it.section_times(SYNTH), "1.")
    assert [r["section"] for r in rows] == ["(title)", "1. First"] and label == "through § 1. First"
    with pytest.raises(ValueError, match="no section starting with '9.'"):
        it._through(it.section_times(SYNTH), "9.")


def test_the_fast_run_executes_a_copy_and_records_timing(tmp_path):
    """--fast's runner on a tiny notebook: the kernel runs in fast mode, per-cell timing is recorded,
    the executed copy goes to the output folder and the original file is left as it was."""
    import nbformat

    src = tmp_path / "nbs"
    src.mkdir()
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("## 1. Sleep"),
                nbformat.v4.new_code_cell("import os, time\ntime.sleep(0.3)\nprint(os.environ['MOE_LAB_FAST'])")]
    path = src / "tiny.ipynb"
    nbformat.write(nb, path)
    before = path.read_bytes()
    out = tmp_path / "out"
    out.mkdir()
    result = it.run_fast([path], out, timeout=120)
    assert path.read_bytes() == before
    rows = {r["section"]: r for r in result["tiny"]["sections"]}
    assert rows["1. Sleep"]["cells"] == 1 and rows["1. Sleep"]["untimed"] == 0
    assert 0.3 <= rows["1. Sleep"]["seconds"] < 30
    executed = json.loads((out / "tiny.ipynb").read_text())
    assert it._text(executed["cells"][1]["outputs"][0]["text"]).strip() == "1"


def test_a_failing_notebook_in_the_fast_run_is_reported_and_skipped(tmp_path):
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("## 1. Fails"), nbformat.v4.new_code_cell("raise ValueError('boom')")]
    path = tmp_path / "bad.ipynb"
    nbformat.write(nb, path)
    failed: list[str] = []
    assert it.run_fast([path], tmp_path, timeout=120, failed=failed) == {}
    assert failed == ["bad.ipynb"]
