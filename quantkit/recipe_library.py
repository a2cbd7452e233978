"""The recipes shipped with quantkit (the repository's ``recipes/`` folder, bundled into the wheel).

``--recipe NAME`` takes a shipped recipe by name (``trees``, ``yolo_nas_s``, ...); a file path wins when that
file exists. ``quantkit recipes`` lists them with the first line of each file's leading comment.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from quantkit import paths
from quantkit.errors import UsageError

SUFFIX = ".yaml"


@dataclass(frozen=True)
class ShippedRecipe:
    """One shipped recipe: ``name`` (what ``--recipe`` takes), its file, and a one-line description."""

    name: str
    path: Path
    description: str


def _description(path: Path) -> str:
    for line in path.read_text(encoding="utf-8").splitlines():
        text = line.strip()
        if not text:
            continue
        return text.lstrip("#").strip() if text.startswith("#") else ""
    return ""


def shipped_recipes() -> list[ShippedRecipe]:
    """The shipped recipes, sorted by name (empty when the bundle has no ``recipes/`` folder)."""
    folder = paths.BUNDLED_RECIPES
    if not folder.is_dir():
        return []
    return [ShippedRecipe(p.stem, p, _description(p)) for p in sorted(folder.glob(f"*{SUFFIX}"))]


def resolve_recipe(spec: str | Path) -> Path:
    """The file for ``--recipe SPEC``: an existing file as given, else the shipped recipe named ``SPEC``
    (``trees`` or ``trees.yaml``). Raises UsageError listing the shipped names otherwise."""
    p = Path(spec)
    if p.is_file():
        return p
    text = str(spec)
    name = text[: -len(SUFFIX)] if text.endswith(SUFFIX) else text
    shipped = {r.name: r.path for r in shipped_recipes()}
    if "/" not in name and "\\" not in name and name in shipped:
        return shipped[name]
    names = ", ".join(shipped) or "none found"
    raise UsageError(f"recipe {text} is neither an existing YAML file nor a shipped recipe: pass a file path or "
                     f"one of the shipped names ({names}; `quantkit recipes` lists them)")


def format_recipe_list(recipes: list[ShippedRecipe] | None = None) -> str:
    """The text ``quantkit recipes`` prints: one ``name  description`` row per shipped recipe."""
    recipes = shipped_recipes() if recipes is None else recipes
    if not recipes:
        return "no shipped recipes found (the bundle's recipes/ folder is missing: reinstall quantkit)"
    width = max(len(r.name) for r in recipes)
    rows = [f"{r.name:<{width}}  {r.description}" for r in recipes]
    return "\n".join(rows + ["", "use one with --recipe NAME; a file path works too (--recipe my.yaml)"])
