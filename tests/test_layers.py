"""The layers of docs/architecture.md hold in the imports: core imports nothing of ratebench above it,
envs → core, algorithms → core + envs, analysis → core, the harness on top; and no two modules import
each other, directly or round a loop, counting imports inside functions. Read from the source (every
`import` statement anywhere in a module, and `importlib.import_module("ratebench...")` literals), then
checked again at run time: importing a lower layer loads no module of a higher one."""
from __future__ import annotations

import ast
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# The user-facing API of the analysis (`from ratebench import analysis`) and its CLI module stand on top
# with the harness: `check` composes an experiment's configs and runs it (ratebench.experiments).
TOP_IN_ANALYSIS = {"ratebench.analysis", "ratebench.analysis.commands"}

ALLOWED = {  # layer -> the layers it may import
    "core": {"core"},
    "envs": {"core", "envs"},
    "algorithms": {"core", "envs", "algorithms"},
    "analysis": {"core", "analysis"},
    "harness": {"core", "envs", "algorithms", "analysis", "harness"},
}


def package_dirs() -> dict[str, Path]:
    """Import name -> folder, as pyproject.toml maps them."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    return {name: ROOT / folder for name, folder in config["package-dir"].items()}


def modules() -> dict[str, Path]:
    out = {}
    for package, folder in package_dirs().items():
        for path in folder.glob("*.py"):
            out[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return out


def layer(module: str) -> str:
    if module in TOP_IN_ANALYSIS:
        return "harness"
    for name in ("core", "envs", "algorithms", "analysis"):
        if module == f"ratebench.{name}" or module.startswith(f"ratebench.{name}."):
            return name
    if module in ("ratebench", "ratebench.conf"):  # the package root and the config data: import nothing
        return "core"
    return "harness"


def imports(module: str, path: Path, known: set[str]) -> set[str]:
    """The ratebench modules `module` imports anywhere in its source (function bodies included)."""
    is_package = path.stem == "__init__"
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join(parts + ([base] if base else []))
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None))
              == "import_module" and node.args and isinstance(node.args[0], ast.Constant)):
            names = [str(node.args[0].value)]
        else:
            continue
        for name in names:
            while name and name not in known and "." in name:  # `import ratebench.envs.exact.x` -> the module
                name = name.rsplit(".", 1)[0]
            if name in known and name != module:
                out.add(name)
    return out


def graph() -> dict[str, set[str]]:
    found = modules()
    return {m: imports(m, p, set(found)) for m, p in found.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_the_source_map_covers_every_package():
    found = modules()
    for name in ("ratebench.core.errors", "ratebench.envs.sampling", "ratebench.algorithms.bilevel",
                 "ratebench.analysis.fit", "ratebench.runner", "ratebench.cli"):
        assert name in found
    assert {layer(m) for m in found} == set(ALLOWED)


def test_no_module_imports_a_layer_above_its_own():
    edges = graph()
    upward = sorted(f"{m} ({layer(m)}) imports {t} ({layer(t)})" for m, targets in edges.items() for t in targets
                    if layer(t) not in ALLOWED[layer(m)])
    assert upward == []


def test_the_package_root_imports_nothing_of_ratebench():
    """Importing ratebench.core runs harness/__init__.py first: it must not pull the harness in."""
    assert graph()["ratebench"] == set()


def test_no_import_cycles_between_modules():
    assert cycles(graph()) == []


def test_the_cycle_finder_finds_a_loop_and_an_upward_import_is_named(tmp_path):
    """The checks above can fail: a loop of three and a two-module loop are found, a chain is not."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": {"a"}}) == [["a", "b"]]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []
    assert layer("ratebench.runner") == "harness" and "harness" not in ALLOWED["algorithms"]
    source = "def f():\n    from ratebench.runner import resolve\n"
    (tmp_path / "x.py").write_text(source)
    assert imports("ratebench.algorithms.x", tmp_path / "x.py", {"ratebench.runner", "ratebench.algorithms.x"}) == {
        "ratebench.runner"}


@pytest.mark.parametrize("lower", ["core", "envs", "algorithms", "analysis"])
def test_importing_a_layer_loads_nothing_above_it(lower):
    """At run time, in a fresh interpreter: every module of the layer (and the analysis API's pure
    submodules) imports without loading a module of a layer it may not import."""
    names = sorted(m for m in modules() if layer(m) == lower)
    code = ("import importlib, json, sys\n"
            f"for n in {names!r}: importlib.import_module(n)\n"
            "print(json.dumps(sorted(m for m in sys.modules if m == 'ratebench' or m.startswith('ratebench.'))))")
    loaded = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                       cwd=ROOT / "tests").stdout)
    above = [m for m in loaded if layer(m) not in ALLOWED[lower] and m != "ratebench.analysis"]  # the parent package
    if lower == "analysis":  # whose __init__ (the API) defers its harness imports to the calls that need them
        assert "ratebench.analysis" in loaded
    assert above == []
