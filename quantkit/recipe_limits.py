"""Limits a recipe must respect before any work starts (issue 17): how much YAML it may expand to, how long a
value may print in a message, and the value range of each numeric field. Kept apart from ``recipe.py`` so the
checks stay additive to the recipe's dataclasses and enums.
"""

from __future__ import annotations

import reprlib
from typing import Any, Mapping

from quantkit.calibrate.methods import MIN_NUM_BINS
from quantkit.errors import UsageError

MAX_RECIPE_NODES = 10_000  # a real recipe has ~100 values; YAML aliases can expand to billions
_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxtuple, _REPR.maxdict, _REPR.maxstring, _REPR.maxother = 2, 6, 6, 6, 80, 80


def short_repr(value: Any) -> str:
    """``repr`` bounded in depth and length, for messages about values that may be huge (YAML alias bombs)."""
    text = _REPR.repr(value)
    return text if len(text) <= 200 else text[:197] + "..."


def check_size(data: Any, where: str, limit: int = MAX_RECIPE_NODES) -> None:
    """UsageError when ``data`` holds more than ``limit`` values counting repeats (aliases) — before any walk."""
    stack, seen = [data], 0
    while stack:
        item = stack.pop()
        seen += 1
        if seen > limit:
            raise UsageError(f"{where} holds more than {limit:,} values (YAML aliases expanding, or recursive): "
                             "write the recipe out plainly, without repeated & / * references")
        if isinstance(item, Mapping):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)


# (section, field): (lowest, highest, what the unit/range means). Integers and finite floats only reach here.
RANGES: dict[tuple[str, str], tuple[float, float, str]] = {
    ("model", "num_classes"): (1, 100_000, "classes"),
    ("preprocess", "pad_value"): (0, 255, "an 8-bit pixel value"),
    ("calibration", "num_bins"): (MIN_NUM_BINS, 65_536, "histogram bins"),
    ("calibration", "batch_size"): (1, 1024, "images per calibration batch"),
    ("export", "parity_min_sqnr"): (0.0, 200.0, "dB"),
    ("export", "nms_score_threshold"): (0.0, 1.0, "a score"),
    ("export", "nms_iou_threshold"): (0.0, 1.0, "an IoU"),
    ("export", "nms_top_k"): (1, 1_000_000, "boxes"),
    ("export", "nms_max_detections"): (1, 1_000_000, "boxes"),
    ("evaluation", "conf"): (0.0, 1.0, "a score"),
    ("evaluation", "iou"): (0.0, 1.0, "an IoU"),
    ("evaluation", "max_images"): (0, 10**9, "images, 0 = all"),
    ("gates", "max_drop"): (0.0, 100.0, "mAP50:95 points"),
    ("gates", "min_sqnr"): (-200.0, 200.0, "dB"),
    ("sensitivity", "num_images"): (1, 100_000, "images"),
    ("sensitivity", "sqnr_floor"): (-200.0, 200.0, "dB"),
}


def check_ranges(recipe) -> None:
    """Value ranges of numeric fields (``RANGES``, scale/std positive). UsageError naming the field and range."""
    for (section, name), (lo, hi, unit) in RANGES.items():
        value = getattr(getattr(recipe, section), name)
        if value is not None and not lo <= value <= hi:
            raise UsageError(f"{section}.{name} must be in [{lo}, {hi}] ({unit}), got {short_repr(value)}")
    p = recipe.preprocess
    if not p.scale > 0:
        raise UsageError(f"preprocess.scale must be > 0 (pixel multiplier, e.g. 0.00392 = 1/255), got {p.scale}")
    if not all(s > 0 for s in p.std):
        raise UsageError(f"preprocess.std must be > 0 per channel (it divides), got {list(p.std)}")
