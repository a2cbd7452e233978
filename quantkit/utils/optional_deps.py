"""Optional dependencies, checked before any work starts.

A run that needs matplotlib (the sensitivity chart) or faster-coco-eval (mAP) must fail in the first second with
the install hint, not after a long calibration and export. :func:`check_optional_deps` decides from the recipe
which optional packages the run will import and raises one :class:`DependencyError` naming every missing one.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from quantkit.errors import DependencyError


@dataclass(frozen=True)
class OptionalDep:
    """An optional package: its import name, the pip extra that installs it, and what needs it."""

    module: str
    extra: str
    needed_for: str


MATPLOTLIB = OptionalDep("matplotlib", "plot", "the sensitivity chart")
COCO_EVAL = OptionalDep("faster_coco_eval", "eval", "mAP evaluation")


def is_installed(module: str) -> bool:
    """True when ``module`` can be imported (checked without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def needed_deps(recipe, *, evaluation: bool, plot: bool = False) -> list[OptionalDep]:
    """Optional packages a run of ``recipe`` will import.

    ``evaluation``: the run scores mAP (evaluation data resolved). ``plot``: the caller writes a chart regardless
    of the recipe (``quantkit sensitivity``). A sensitivity analysis inside export (``sensitivity.enabled``, or
    an automatic FP16 selection under a budget) writes ``sensitivity.png``.
    """
    s, g = recipe.sensitivity, recipe.gates
    sensitivity = s.enabled or (s.auto and ((g.max_drop is not None and evaluation) or s.sqnr_floor is not None))
    deps = []
    if plot or sensitivity:
        deps.append(MATPLOTLIB)
    if evaluation:
        deps.append(COCO_EVAL)
    return deps


def check_optional_deps(recipe, *, evaluation: bool, plot: bool = False) -> None:
    """Raise DependencyError (exit 2) naming every optional package this run needs and lacks, with the
    ``pip install 'quantkit[extra]'`` that installs them. Call before calibration."""
    missing = [d for d in needed_deps(recipe, evaluation=evaluation, plot=plot) if not is_installed(d.module)]
    if not missing:
        return
    what = "; ".join(f"{d.module} (for {d.needed_for})" for d in missing)
    extras = ",".join(dict.fromkeys(d.extra for d in missing))
    raise DependencyError(f"missing optional package(s): {what}. Install with `pip install 'quantkit[{extras}]'`; "
                          "nothing was done")
