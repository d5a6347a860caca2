"""The README's demo-model block is what scripts/readme_model_table.py makes of the shipped evaluation."""

import importlib.util
from pathlib import Path

import pytest

from moe_lab.demo import demo_model_available

REPO = Path(__file__).resolve().parent.parent


def _script():
    spec = importlib.util.spec_from_file_location("readme_model_table", REPO / "scripts" / "readme_model_table.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_replace_block_keeps_the_rest():
    mod = _script()
    text = f"intro\n{mod.START}\nold\n{mod.END}\noutro\n"
    assert mod.replace_block(text, "new") == f"intro\n{mod.START}\nnew\n{mod.END}\noutro\n"
    with pytest.raises(ValueError, match="no block"):
        mod.replace_block("no markers", "new")


@pytest.mark.skipif(not demo_model_available(), reason="data/tiny-mixtral not present")
def test_readme_block_matches_the_shipped_evaluation():
    mod = _script()
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    block = readme.split(mod.START, 1)[1].split(mod.END, 1)[0].strip("\n")
    assert block == mod.model_block(), "README's model block is stale: run python scripts/readme_model_table.py --write"
