"""The .devcontainer (issue 27, item 8) opens the course with the README's setup: its post-create
command is the README's first command's setup, and the editor uses the environment it makes."""

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def devcontainer() -> dict:
    text = (ROOT / ".devcontainer" / "devcontainer.json").read_text(encoding="utf-8")
    return json.loads(re.sub(r"^\s*//.*$", "", text, flags=re.M))  # JSON with // comment lines


def test_devcontainer_runs_the_readmes_setup():
    cfg = devcontainer()
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    first = re.search(r"```bash\n(.+?)\n```", readme).group(1)
    setup = first.split("&&")[0].strip()
    assert setup == "bash scripts/setup.sh" and cfg["postCreateCommand"] == setup
    assert cfg["customizations"]["vscode"]["settings"]["python.defaultInterpreterPath"].endswith("/.venv/bin/python")
    assert "python" in cfg["image"] and "3.1" in cfg["image"]  # Python >= 3.10, as pyproject requires
