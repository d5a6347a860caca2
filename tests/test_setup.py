"""The README's first command sets up everything a learner needs to run every notebook (issue 27,
item 5), and the test command proves it: scripts/test.sh runs the notebooks in an environment built
exactly as that command builds it. These checks are static and quick; the proof is test.sh's first
stage (a notebook that imports a dev-only package, or builds the corpus without its extra, fails there).
"""

from __future__ import annotations

import ast
import json
import re
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SETUP = (ROOT / "scripts" / "setup.sh").read_text()
TEST = (ROOT / "scripts" / "test.sh").read_text()
README = (ROOT / "README.md").read_text()


def extras(dev: bool) -> set[str]:
    plain = re.search(r'^extras="([^"]+)"', SETUP, re.M).group(1)
    dev_extras = re.search(r'--dev" \] && extras="([^"]+)"', SETUP).group(1)
    return set((dev_extras if dev else plain).split(","))


def _name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[(]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def requirements(names: set[str]) -> set[str]:
    """The distributions the project requires with these extras (not their dependencies)."""
    pyproject = (ROOT / "pyproject.toml").read_text()
    import tomllib

    project = tomllib.loads(pyproject)["project"]
    out = {_name(r) for r in project["dependencies"]}
    for extra in names:
        out |= {_name(r) for r in project["optional-dependencies"][extra]}
    return out


def closure(dists: set[str]) -> set[str]:
    """``dists`` and everything they require (as installed here), without their extras."""
    seen, todo = set(), list(dists)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            reqs = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        todo += [_name(r) for r in reqs if "extra ==" not in r]
    return seen


def notebook_imports() -> dict[str, set[str]]:
    """Top-level modules each notebook (and worked solution) imports, by notebook."""
    out = {}
    for nb in sorted((ROOT / "notebooks").rglob("*.ipynb")):
        code = "\n".join("".join(c["source"]) for c in json.loads(nb.read_text(encoding="utf-8"))["cells"]
                         if c["cell_type"] == "code")
        code = "\n".join(line for line in code.splitlines() if not line.lstrip().startswith(("%", "!")))
        mods = set()
        for node in ast.walk(ast.parse(code)):
            if isinstance(node, ast.Import):
                mods |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                mods.add(node.module.split(".")[0])
        out[str(nb.relative_to(ROOT))] = mods
    return out


def test_the_readme_setup_installs_the_notebooks_and_the_corpus_builder():
    assert "bash scripts/setup.sh && .venv/bin/jupyter lab" in README
    assert extras(dev=False) == {"notebooks", "corpus"}
    assert extras(dev=True) >= extras(dev=False) | {"dev"}


def test_the_test_command_runs_the_notebooks_in_the_learners_environment():
    lines = [ln.strip() for ln in TEST.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    build = lines.index("MOE_LAB_VENV=.venv-learner bash scripts/setup.sh")
    runners = lines[build + 1]
    assert re.fullmatch(r'\.venv-learner/bin/python -m pip install -q "pytest>=[\d.]+" "nbval>=[\d.]+"', runners)
    assert lines[build + 2].startswith(".venv-learner/bin/python -m pytest") and " notebooks" in lines[build + 2]
    assert "--nbval-lax" in lines[build + 3]
    dev = lines.index("bash scripts/setup.sh --dev")
    assert dev > build and lines[dev + 1].startswith(".venv/bin/python -m pytest") and " tests " in lines[dev + 1]
    assert "notebooks" not in lines[dev + 1]  # the notebooks run once, in the learner's environment
    assert (ROOT / ".ci" / "run").read_text().strip().endswith("bash scripts/test.sh")


def test_every_module_a_notebook_imports_comes_with_the_readme_setup():
    provided = closure(requirements(extras(dev=False))) | {"moe-lab"}
    dev_only = closure(requirements(extras(dev=True))) - provided
    assert {"matplotlib", "pytest", "kaleido"} <= dev_only  # what this check would catch
    by_module = metadata.packages_distributions()
    missing = {}
    for nb, mods in notebook_imports().items():
        for mod in sorted(mods):
            dists = {_name(d) for d in by_module.get(mod, [])}
            if dists and not dists & provided:
                missing.setdefault(nb, []).append(f"{mod} ({', '.join(sorted(dists))}"
                                                  f"{': dev extras only' if dists & dev_only else ''})")
    assert not missing, f"imported by notebooks but not installed by `bash scripts/setup.sh`: {missing}"


def test_the_corpus_builders_modules_come_with_the_readme_setup():
    from moe_lab.corpus.build import REQUIRES

    provided = closure(requirements(extras(dev=False)))
    by_module = metadata.packages_distributions()
    for domain, mods in REQUIRES.items():
        for mod in mods:
            dists = {_name(d) for d in by_module.get(mod.split(".")[0], [])}
            if not dists:
                pytest.fail(f"{mod} (needed to build the {domain} domain) is not installed in this environment")
            assert dists & provided, f"{mod} ({dists}) for the {domain} domain is not installed by the README's setup"
