"""pyproject.toml and environment.yml must name the same packages; .ci/run runs the README's test command."""

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONDA_ALIASES = {"pytorch": "torch"}  # conda-forge name -> PyPI name


def _name(req: str) -> str:
    return re.split(r"[<>=!~\[; ]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def pyproject_packages() -> set[str]:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        from pip._vendor import tomli as tomllib
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    reqs = list(data["project"]["dependencies"])
    for extra in data["project"]["optional-dependencies"].values():
        reqs += extra
    return {_name(r) for r in reqs}


def environment_packages() -> set[str]:
    names = set()
    for line in (ROOT / "environment.yml").read_text().splitlines():
        m = re.match(r"^\s*-\s+([A-Za-z0-9_.\-]+)", line)
        if m and m.group(1) not in ("conda-forge", "pip:") and not line.strip().endswith(":"):
            names.add(CONDA_ALIASES.get(m.group(1).lower(), m.group(1).lower()).replace("_", "-"))
    return names - {"python", "pip"}


def test_environment_yml_mirrors_pyproject():
    py, env = pyproject_packages(), environment_packages()
    assert py == env, f"only in pyproject: {sorted(py - env)}; only in environment.yml: {sorted(env - py)}"


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    command = "bash scripts/test.sh"
    assert command in readme, "README must show the test command"
    assert command in ci, ".ci/run must run the README's test command"
