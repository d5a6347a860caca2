"""A spell check of the course's prose (issue 27, item 8): codespell on the README, docs/ and data/ cards,
every notebook's markdown cells (solutions too), the package and the scripts. Words codespell must
accept (names, other languages, deliberate spellings) go in .codespell-words.txt, one a line.

codespell comes with the dev extra (``bash scripts/setup.sh --dev``); without it this test skips,
except in CI (``CI`` set), where a missing spell checker is a failure."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WORDS = ROOT / ".codespell-words.txt"


def codespell_command() -> list[str] | None:
    if importlib.util.find_spec("codespell_lib") is not None:
        return [sys.executable, "-m", "codespell_lib"]
    found = shutil.which("codespell")
    return [found] if found else None


def prose_files(out: Path) -> list[Path]:
    """The notebooks' markdown, one file per notebook (named after it), and the text files as they are."""
    files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "data").rglob("*.md"))]
    for nb in sorted((ROOT / "notebooks").rglob("*.ipynb")):
        cells = json.loads(nb.read_text(encoding="utf-8"))["cells"]
        text = "\n\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")
        dest = out / (str(nb.relative_to(ROOT)).replace("/", "__") + ".md")
        dest.write_text(text, encoding="utf-8")
        files.append(dest)
    return files


@pytest.fixture(scope="module")
def codespell():
    cmd = codespell_command()
    if cmd is None:
        if os.environ.get("CI"):
            pytest.fail("codespell is missing in CI: it comes with the dev extra (bash scripts/setup.sh --dev)")
        pytest.skip("codespell is not installed (the dev extra: bash scripts/setup.sh --dev)")
    return cmd


def run(cmd: list[str], paths: list[Path]) -> subprocess.CompletedProcess:
    return subprocess.run([*cmd, "--ignore-words", str(WORDS), "--skip", "*.json,*.jsonl,*.png,*.safetensors,*.npz",
                           *map(str, paths)], capture_output=True, text=True, cwd=ROOT)


def test_the_prose_is_spelled_right(codespell, tmp_path):
    done = run(codespell, prose_files(tmp_path) + [ROOT / "moe_lab", ROOT / "scripts"])
    report = done.stdout.replace(str(tmp_path) + os.sep, "").replace("__", "/")
    assert done.returncode == 0, ("misspelled words (fix them, or add a word codespell must accept to "
                                  f".codespell-words.txt):\n{report}{done.stderr}")


def test_the_spell_check_can_fail(codespell, tmp_path):
    (tmp_path / "typo.md").write_text("The router recieves the hidden state.\n")
    done = run(codespell, [tmp_path / "typo.md"])
    assert done.returncode != 0 and "recieves" in done.stdout


def test_the_word_list_is_sorted_out():
    words = WORDS.read_text(encoding="utf-8").split()
    assert words and len(words) == len(set(words)) and all(w == w.lower() for w in words)
