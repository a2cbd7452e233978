"""Consent before running model code named in an output folder.

``model.name`` may be ``path/to/file.py:factory`` or ``package.module:function``: building the model imports
that code and runs it. An output folder (its ``recipe.resolved.yaml``) is data that people pass around, so
commands that read one (``quantkit eval``) never import the code it names on their own: the user names the same
model again on the command line (``--model``), or passes ``--trust-recipe`` to accept the recorded one.
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


__all__ = ["runs_code", "consented_model", "TRUST_FLAG"]
