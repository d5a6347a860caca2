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


def _pyproject() -> dict:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        from pip._vendor import tomli as tomllib
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_runtime_install_is_small_and_the_corpus_builder_is_an_extra():
    project = _pyproject()["project"]
    runtime = {_name(r) for r in project["dependencies"]}
    assert runtime == {"torch", "numpy", "safetensors", "sentencepiece", "mistral-common", "plotly",
                       "ipywidgets", "tqdm", "pandas"}
    corpus = {_name(r) for r in project["optional-dependencies"]["corpus"]}
    assert {"faker", "babel"} <= corpus
    assert {f"jupyterlab-language-pack-{x}" for x in ("fr-fr", "de-de", "es-es", "it-it")} <= corpus
    setup = (ROOT / "scripts" / "setup.sh").read_text()  # the test command installs what tests need
    assert re.search(r'--dev" \] && extras="[a-z,]*\bcorpus\b', setup), "setup.sh --dev must install the corpus extra"


def test_language_templates_ship_as_package_data():
    globs = _pyproject()["tool"]["setuptools"]["package-data"]["moe_lab.corpus"]
    templates = sorted((ROOT / "moe_lab" / "corpus" / "templates").glob("*.json"))
    assert templates, "no template files"
    for path in templates:
        rel = path.relative_to(ROOT / "moe_lab" / "corpus")
        assert any(rel.match(g) for g in globs), f"{rel} is not package data ({globs})"
