"""The package's import rules (docs/architecture.md), read from the source with ``ast``: who may import whom,
no import cycles between modules, no oversized modules, no function with a page of parameters."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[2] / "quantkit"

# what the command line may import: the public API, the pipeline, the recipe, errors and small utilities
CLI_ALLOWED = ("quantkit", "quantkit.pipeline", "quantkit.recipe", "quantkit.errors", "quantkit.cli",
               "quantkit.utils", "quantkit.version", "quantkit.quote")
# (importer package, packages it must never import)
FORBIDDEN = [
    ("quantkit.quant", ("quantkit.exporter", "quantkit.engine", "quantkit.report", "quantkit.pipeline", "quantkit.cli")),
    ("quantkit.calibrate", ("quantkit.exporter", "quantkit.engine", "quantkit.report", "quantkit.pipeline",
                            "quantkit.cli", "quantkit.sensitivity")),
    ("quantkit.models", ("quantkit.quant", "quantkit.calibrate", "quantkit.exporter", "quantkit.engine",
                         "quantkit.pipeline", "quantkit.cli")),
    ("quantkit.reparam", ("quantkit.quant", "quantkit.exporter", "quantkit.pipeline", "quantkit.cli")),
    ("quantkit.exporter", ("quantkit.engine", "quantkit.report", "quantkit.pipeline", "quantkit.cli")),
    ("quantkit.engine", ("quantkit.report", "quantkit.pipeline", "quantkit.cli")),
    ("quantkit.report", ("quantkit.pipeline", "quantkit.cli")),
    ("quantkit.sensitivity", ("quantkit.exporter", "quantkit.engine", "quantkit.report", "quantkit.pipeline",
                              "quantkit.cli")),
    ("quantkit.eval", ("quantkit.exporter", "quantkit.engine", "quantkit.report", "quantkit.pipeline", "quantkit.cli")),
    ("quantkit.data", ("quantkit.quant", "quantkit.exporter", "quantkit.engine", "quantkit.pipeline", "quantkit.cli")),
    ("quantkit.state", ("quantkit",)),  # run-time imports: none (annotations only, under TYPE_CHECKING)
    ("quantkit.recipe", ("quantkit.quant", "quantkit.exporter", "quantkit.engine", "quantkit.report",
                         "quantkit.pipeline", "quantkit.cli", "quantkit.models", "quantkit.sensitivity")),
]


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, *, top_level_only: bool = False) -> set[str]:
    """Modules imported by ``path`` (absolute names), skipping ``if TYPE_CHECKING:`` blocks."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()

    def visit(node, top: bool):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            inner = top and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
            if isinstance(child, ast.Import) and (inner or not top_level_only):
                found.update(a.name for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0 and (inner or not top_level_only):
                found.add(child.module)
                found.update(f"{child.module}.{a.name}" for a in child.names)
            visit(child, inner)

    visit(tree, True)
    return {m for m in found if m == "quantkit" or m.startswith("quantkit.")}


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def test_cli_reaches_only_the_public_api_pipeline_recipe_and_errors():
    bad = {}
    for name, path in _modules().items():
        if not _within(name, "quantkit.cli"):
            continue
        wrong = sorted(m for m in _imports(path) if not any(m == a or m.startswith(a + ".") for a in CLI_ALLOWED[1:])
                       and m != "quantkit" and not m.startswith("quantkit.__"))
        if wrong:
            bad[name] = wrong
    assert not bad, f"the CLI must go through quantkit.pipeline / the public API: {bad}"


@pytest.mark.parametrize("importer,forbidden", FORBIDDEN, ids=[f[0] for f in FORBIDDEN])
def test_stage_import_rules(importer, forbidden):
    bad = {}
    for name, path in _modules().items():
        if not _within(name, importer):
            continue
        wrong = sorted(m for m in _imports(path) for f in forbidden if _within(m, f) and not _within(m, importer)
                       and not (importer == "quantkit.state" and m == "quantkit"))
        if importer == "quantkit.state":
            wrong = sorted(_imports(path))
        if wrong:
            bad[name] = wrong
    assert not bad, f"{importer} must not import {forbidden}: {bad}"


def test_no_import_cycles_between_modules():
    """Module-level imports (those that run at import time) form no cycle."""
    mods = _modules()
    graph = {}
    for name, path in mods.items():
        deps = set()
        for m in _imports(path, top_level_only=True):
            while m and m not in mods:  # `from quantkit.x import name` names a module or an attribute of one
                m = m.rpartition(".")[0]
            if m and m != name and not _within(name, m):  # a package's own __init__ is not a cycle
                deps.add(m)
        graph[name] = deps
    cycles = _cycles(graph)
    assert not cycles, f"import cycles: {cycles[:3]}"


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    state, found = {}, []

    def dfs(n, stack):
        state[n] = 1
        for d in sorted(graph.get(n, ())):
            if state.get(d) == 1:
                found.append(stack[stack.index(d):] + [d])
            elif d not in state:
                dfs(d, stack + [d])
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            dfs(n, [n])
    return found


def test_modules_stay_small_and_functions_take_few_parameters():
    long_files = {n: len(p.read_text().splitlines()) for n, p in _modules().items()
                  if len(p.read_text().splitlines()) > 420}
    assert not long_files, f"modules over ~400 lines: {long_files}"
    wide = []
    for name, path in _modules().items():
        if _within(name, "quantkit.cli") or _within(name, "quantkit.models"):
            continue  # click commands take one parameter per option; model constructors mirror their configs
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                a = node.args
                n = len(a.posonlyargs) + len(a.args) + len(a.kwonlyargs) - (1 if a.args and a.args[0].arg in ("self", "cls") else 0)
                if n > 11:
                    wide.append(f"{name}.{node.name} ({n})")
    assert not wide, f"functions with more than ~10 parameters want a dataclass: {wide}"


def test_the_rules_catch_a_planted_violation(tmp_path):
    """The checker itself: an import of the pipeline from a CLI module is seen, one under TYPE_CHECKING is not."""
    p = tmp_path / "m.py"
    p.write_text("from typing import TYPE_CHECKING\nimport quantkit.exporter.passes\n"
                 "if TYPE_CHECKING:\n    from quantkit.engine import build_here\n"
                 "def f():\n    from quantkit.report import write\n")
    assert _imports(p) == {"quantkit.exporter.passes", "quantkit.report", "quantkit.report.write"}
    assert _imports(p, top_level_only=True) == {"quantkit.exporter.passes"}
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []


# ---- package-level rules, counting imports inside functions (issue 22) -----------------------------------------

# a front end builds the network's view; it never runs a stage that comes after quantization (the ONNX route's
# orchestration is quantkit.pipeline_onnx, beside the torch route's quantkit.pipeline)
FRONT_ENDS = ("quantkit.onnxin", "quantkit.models", "quantkit.data")
POST_QUANTIZATION = ("quantkit.eval", "quantkit.engine", "quantkit.report", "quantkit.output")


def _unit(module: str) -> str:
    """The package-level unit a module belongs to: ``quantkit.calibrate.run`` -> ``quantkit.calibrate``;
    top-level modules (``quantkit.recipe``) and the root package (``quantkit``) are units of their own."""
    return ".".join(module.split(".")[:2])


def _resolved_imports(path: Path, mods: dict[str, Path]) -> set[str]:
    """Modules ``path`` imports, anywhere in the file (functions included, ``if TYPE_CHECKING:`` blocks not: they
    never run). ``from quantkit import paths`` imports the module ``quantkit.paths``; ``from quantkit import
    __version__`` imports the root package (whose public API imports the pipeline, hence every stage)."""
    found: set[str] = set()

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    def visit(node):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, ast.Import):
                found.update(filter(None, (resolve(a.name) for a in child.names if a.name.startswith("quantkit"))))
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0 \
                    and child.module.startswith("quantkit"):
                for a in child.names:
                    sub = f"{child.module}.{a.name}"
                    found.add(sub if sub in mods else resolve(child.module))
            visit(child)

    visit(ast.parse(path.read_text()))
    return found


def _package_graph(mods: dict[str, Path]) -> dict[str, dict[str, set[str]]]:
    """unit -> imported unit -> the importing modules (for the message)."""
    graph: dict[str, dict[str, set[str]]] = {}
    for name, path in mods.items():
        for m in _resolved_imports(path, mods):
            if _unit(m) != _unit(name):
                graph.setdefault(_unit(name), {}).setdefault(_unit(m), set()).add(name)
    return graph


def test_no_import_cycle_between_packages_counting_imports_inside_functions():
    """A cycle hidden in a function is still a cycle: the package graph, lazy imports included, is a DAG."""
    graph = _package_graph(_modules())
    cycles = _cycles({k: set(v) for k, v in graph.items()})
    detail = [" -> ".join(f"{a} ({', '.join(sorted(graph[a][b]))})" for a, b in zip(c, c[1:])) for c in cycles[:3]]
    assert not cycles, "package import cycles (importing modules in brackets):\n" + "\n".join(detail)


def _front_end_violations(graph) -> dict:
    bad = {fe: {s: sorted(graph[fe][s]) for s in POST_QUANTIZATION if s in graph.get(fe, {})} for fe in FRONT_ENDS}
    return {fe: v for fe, v in bad.items() if v}


def test_front_end_imports_no_stage_that_runs_after_quantization():
    bad = _front_end_violations(_package_graph(_modules()))
    assert not bad, f"front ends importing later stages: {bad}"


def test_the_package_rules_catch_planted_violations(tmp_path):
    """A cycle made only of imports inside functions is found; ``from quantkit import paths`` is the module."""
    pkg = tmp_path / "quantkit"
    for rel, text in {"__init__.py": "", "paths.py": "", "a/__init__.py": "",
                      "a/x.py": "def f():\n    from quantkit.b.y import g\n",
                      "b/__init__.py": "", "b/y.py": "from quantkit import paths\ndef g():\n    import quantkit.a.x\n",
                      "c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import quantkit.a.x\n"}.items():
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text(text)
    mods = {".".join(p.relative_to(tmp_path).with_suffix("").parts).removesuffix(".__init__"): p
            for p in sorted(pkg.rglob("*.py"))}
    graph = _package_graph(mods)
    assert graph["quantkit.b"] == {"quantkit.paths": {"quantkit.b.y"}, "quantkit.a": {"quantkit.b.y"}}
    assert "quantkit.c" not in graph  # TYPE_CHECKING imports never run
    # the front-end rule: an import inside a function of a front end is found
    (pkg / "onnxin").mkdir()
    (pkg / "onnxin" / "__init__.py").write_text("")
    (pkg / "onnxin" / "route.py").write_text("def f():\n    from quantkit.report.build import g\n")
    (pkg / "report").mkdir()
    (pkg / "report" / "__init__.py").write_text("")
    (pkg / "report" / "build.py").write_text("def g():\n    pass\n")
    mods = {".".join(p.relative_to(tmp_path).with_suffix("").parts).removesuffix(".__init__"): p
            for p in sorted(pkg.rglob("*.py"))}
    assert _front_end_violations(_package_graph(mods)) == {
        "quantkit.onnxin": {"quantkit.report": ["quantkit.onnxin.route"]}}
    assert _cycles({k: set(v) for k, v in graph.items()}) == [["quantkit.a", "quantkit.b", "quantkit.a"]]
