"""The package's import rules (docs/architecture.md), read from the source with ``ast``: who may import whom,
no import cycles between modules, no oversized modules, no function with a page of parameters."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[2] / "quantkit"

# what the command line may import: the public API, the pipeline, the recipe, errors and small utilities
CLI_ALLOWED = ("quantkit", "quantkit.pipeline", "quantkit.recipe", "quantkit.errors", "quantkit.cli",
               "quantkit.utils")
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
