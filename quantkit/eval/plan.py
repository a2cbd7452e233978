"""Which evaluation data an export uses, decided before any work starts, and why when there is none.

The bundled model is scored on the bundled held-out set by default. When that folder is missing (a broken
install) or faster-coco-eval is absent, the export still runs, but never silently: :func:`plan_evaluation`
logs a warning and returns a note that goes into report.json's ``notes``. Evaluation data the user asked for
(``--eval`` / ``evaluation.data``) is never skipped: a missing package is an error before calibration.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from quantkit import paths
from quantkit.utils.optional_deps import COCO_EVAL, is_installed

log = logging.getLogger("quantkit")


@dataclass(frozen=True)
class EvalPlan:
    """``path``: evaluation data to score on (None: no evaluation). ``explicit``: the recipe named it.
    ``note``: why the bundled default is not used (for the report and the log), else None."""

    path: str | None
    explicit: bool
    note: str | None = None


def plan_evaluation(recipe) -> EvalPlan:
    """The evaluation data of ``recipe``: its ``evaluation.data``, else the bundled held-out set for the bundled
    model (when present and faster-coco-eval is installed), else none. Logs a warning when the bundled default
    had to be dropped."""
    if recipe.evaluation.data:
        return EvalPlan(recipe.evaluation.data, explicit=True)
    if recipe.model.name != paths.BUNDLED_MODEL:
        return EvalPlan(None, explicit=False)
    bundled = paths.BUNDLED_EVAL
    note = None
    if not (bundled / "annotations.json").is_file():
        note = (f"held-out evaluation skipped: the bundled evaluation data ({paths.display_path(bundled)}) is "
                "missing from this installation; reinstall quantkit or pass --eval DIR")
    elif not is_installed(COCO_EVAL.module):
        note = (f"held-out evaluation skipped: {COCO_EVAL.module} is not installed; "
                f"`pip install 'quantkit[{COCO_EVAL.extra}]'` to score mAP on the bundled held-out set")
    if note:
        log.warning("%s", note)
        return EvalPlan(None, explicit=False, note=note)
    return EvalPlan(str(bundled), explicit=False)


def open_evaluation(recipe, path, max_images: int = 0):
    """The evaluation data set at ``path`` as ``recipe.evaluation`` describes it: a COCO folder, an images folder
    + ``evaluation.annotations``, or a dataset YAML (its ``evaluation.split``), capped at ``max_images`` (0: all).
    Both routes open it before calibrating, so bad labels or a YAML without the split are exit 2 before any
    work (DataError naming the fix)."""
    from quantkit.data.sources import open_eval_dataset

    ev = recipe.evaluation
    return open_eval_dataset(path, annotations=ev.annotations, split=ev.split, max_images=max_images or None)
