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


# ---- the package's shape (issue 11: imports go one way, at the top of files)

def _package_imports():
    """{module: [(imported moe_lab module, inside a function?)]} for every module of moe_lab."""
    import ast
    root = Path(__file__).resolve().parent.parent / "moe_lab"
    mods = {}
    for p in root.rglob("*.py"):
        parts = p.relative_to(root.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = p
    out = {}
    for name, p in mods.items():
        tree, found = ast.parse(p.read_text()), []
        funcs = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        inner = {id(m) for f in funcs for m in ast.walk(f) if isinstance(m, (ast.Import, ast.ImportFrom))}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = name.split(".") if p.name == "__init__.py" else name.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                prefix = ".".join(base + ([node.module] if node.module else []))
                targets = [prefix] + [f"{prefix}.{a.name}" for a in node.names]
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                targets = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            else:
                continue
            for t in targets:
                if t in mods and t != name:
                    found.append((t, id(node) in inner))
        out[name] = found
    return out, mods


def test_no_import_cycles_in_the_package():
    imports, mods = _package_imports()
    graph = {m: {t for t, _ in deps if not mods[t].name == "__init__.py"} for m, deps in imports.items()}
    state, stack, cycles = {}, [], []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == "open":
                cycles.append(stack[stack.index(t):] + [t])
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_package_imports_sit_at_the_top_of_files():
    imports, _ = _package_imports()
    inside = sorted(f"{m} imports {t}" for m, deps in imports.items() for t, fn in deps if fn)
    assert not inside, f"imports of moe_lab modules inside functions: {inside}"


def test_hooks_and_the_bridge_are_leaves():
    imports, _ = _package_imports()
    assert not [t for t, _ in imports["moe_lab.hooks"]], "hooks.py must import nothing from moe_lab"
    assert not [t for t, _ in imports["moe_lab.devices"]], "devices.py must import nothing from moe_lab"
    assert {t for t, _ in imports["moe_lab.generation"]} <= {"moe_lab.devices"}, \
        "generation.py must import nothing from moe_lab but the devices leaf"
    bridge = {t for t, _ in imports["moe_lab.routing.bridge"]}
    assert not bridge & {"moe_lab.routing.interventions", "moe_lab.routing.tracing"}, bridge
