"""Consent before running model code named in an output folder.

``model.name`` may be ``path/to/file.py:factory`` or ``package.module:function``: building the model imports
that code and runs it. An output folder (its ``recipe.resolved.yaml``) is data that people pass around, so
commands that read one (``quantkit eval``, and ``export`` / ``sensitivity`` given an output folder's recipe with
``--recipe``) never import the code it names on their own: the user names the same model again on the command
line (``--model``), or passes ``--trust-recipe`` to accept the recorded one.
Registered model names and ``.onnx`` files run no user code and need no consent.
"""

from __future__ import annotations

import os
from pathlib import Path

from quantkit.errors import UsageError

TRUST_FLAG = "--trust-recipe"


def runs_code(spec: str | None) -> bool:
    """True when building ``spec`` imports user code (``file.py:factory`` or ``package.module:function``)."""
    return bool(spec) and ":" in spec and not spec.lower().endswith(".onnx")


def _same_model(recorded: str, named: str) -> bool:
    """``named`` is the recorded model: the same factory in the same file (the same file when the recorded
    path exists here, else a file of the same name), or the same ``package.module:function``."""
    r_mod, _, r_attr = recorded.rpartition(":")
    n_mod, _, n_attr = named.rpartition(":")
    if r_attr != n_attr:
        return False
    if not (r_mod.endswith(".py") and n_mod.endswith(".py")):
        return r_mod == n_mod
    r, n = Path(r_mod), Path(n_mod)
    if r.is_file() and n.is_file():
        return os.path.samefile(r, n)
    return r.name == n.name  # the folder came from another machine: its path means nothing here


def consented_model(recorded: str | None, named: str | None, trust: bool, source: str | os.PathLike) -> str | None:
    """The model spec to build for a recipe read from ``source`` (an output folder's recipe file).

    ``named``: the model the user gave on the command line (None: none); ``trust``: ``--trust-recipe``.
    Raises UsageError, before anything is imported, when the recorded model runs code the user did not name.
    """
    if named:
        same = _same_model(recorded, named) if runs_code(recorded) and runs_code(named) else named == recorded
        if same:
            return named  # the user's own path to the same file: that is the code they agreed to run
        raise UsageError(f"--model {named} is not the model recorded in {source} ({recorded}): name the recorded "
                         f"model's file and factory, e.g. --model {recorded}")
    if runs_code(recorded) and not trust:
        raise UsageError(f"{source} names the model {recorded}, and building it would import and run that code: "
                         "quantkit never runs code named in an output folder on its own. If you trust it, name it "
                         f"again with --model {recorded} (or pass {TRUST_FLAG})")
    return recorded


def check_recipe_file(recipe_path: str | os.PathLike | None, model: str | None, named: bool, trust: bool) -> None:
    """UsageError when ``--recipe`` is an output folder's recipe (``recipe.resolved.yaml``, or a recipe with a
    ``manifest.json`` beside it) whose ``model`` runs code, and the user neither named a model on the command
    line (``named``: ``--model`` / MODEL / ``--set model.name``) nor passed ``--trust-recipe``."""
    if not recipe_path or named or trust or not runs_code(model):
        return
    p = Path(recipe_path)
    if not p.is_file():  # a shipped recipe's name
        return
    if p.name != "recipe.resolved.yaml" and not (p.parent / "manifest.json").is_file():
        return  # the user's own recipe file: naming it is naming its model
    raise UsageError(f"--recipe {p} comes from an output folder and names the model {model}: building it would "
                     "import and run that code, and quantkit never runs code named in an output folder on its own. "
                     f"If you trust it, name it again with --model {model} (or pass {TRUST_FLAG})")


__all__ = ["runs_code", "consented_model", "check_recipe_file", "TRUST_FLAG"]
