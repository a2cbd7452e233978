"""Limits a recipe must respect before any work starts (issue 17): how much YAML it may expand to, how long a
value may print in a message, and the value range of each numeric field. Kept apart from ``recipe.py`` so the
checks stay additive to the recipe's dataclasses and enums.
"""

from __future__ import annotations

import reprlib
from typing import Any, Mapping

import yaml

from quantkit.calib_methods import MIN_NUM_BINS
from quantkit.errors import UsageError

MAX_RECIPE_NODES = 10_000  # a real recipe has ~100 values; YAML aliases can expand to billions
# An integer wider than a float64 can hold (2**1024 ~ 1.8e308, 309 digits) is no setting of any recipe field. Such a
# literal is kept as an OversizedNumber, so the field it was given for is named (Python refuses to even print
# decimal integers past 4300 digits, and hex literals have no such limit on parsing).
MAX_INT_BITS = 1024


class OversizedNumber:
    """An integer literal too large to be any recipe value (``literal``: as written, without sign)."""

    def __init__(self, text: str) -> None:
        self.literal = text.strip().lstrip("+-").replace("_", "")

    def __repr__(self) -> str:  # hex, octal, binary or sexagesimal (1:20) literals are not counted in digits
        unit = "digits" if self.literal.isdigit() else "characters"
        return f"<an integer literal of {len(self.literal):,} {unit}>"

    __str__ = __repr__


class _Repr(reprlib.Repr):
    def repr_int(self, x: int, level: int) -> str:  # str() of a huge int raises ValueError (int digit limit)
        if x.bit_length() > MAX_INT_BITS:
            return f"<an integer of about {int(x.bit_length() * 0.30103) + 1:,} digits>"
        return super().repr_int(x, level)


_REPR = _Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxtuple, _REPR.maxdict, _REPR.maxstring, _REPR.maxother = 2, 6, 6, 6, 80, 80


def short_repr(value: Any) -> str:
    """``repr`` bounded in depth and length, for messages about values that may be huge (YAML alias bombs)."""
    text = _REPR.repr(value)
    return text if len(text) <= 200 else text[:197] + "..."


class _Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` whose integers past ``MAX_INT_BITS`` (or Python's digit limit) become OversizedNumber."""


def _construct_int(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
    try:
        value = yaml.SafeLoader.construct_yaml_int(loader, node)
    except ValueError:  # "Exceeds the limit (4300 digits) for integer string conversion", or !!int on a non-number
        if not str(node.value).strip().lstrip("+-").replace("_", "").isdigit():
            raise
        return OversizedNumber(str(node.value))
    return OversizedNumber(str(node.value)) if value.bit_length() > MAX_INT_BITS else value


_Loader.add_constructor("tag:yaml.org,2002:int", _construct_int)
# What PyYAML's constructors raise on values such as ``!!int abc``, ``!!float x`` or ``!!timestamp 2001-13-45``
YAML_VALUE_ERRORS = (yaml.YAMLError, RecursionError, ValueError, TypeError, AttributeError, OverflowError)


def load_yaml(text: str) -> Any:
    """``yaml.safe_load`` of ``text``, with oversized integers as OversizedNumber. Raises YAML_VALUE_ERRORS."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a yaml.SafeLoader


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
    ("calibration", "clip_margin_db"): (0.0, 100.0, "dB"),
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
    # absurd values (issue 21): counts no data set reaches, loops that would run for days, pixel sizes past memory
    ("calibration", "max_images"): (0, 10**9, "images, 0 = all"),
    ("sensitivity", "eval_images"): (0, 10**9, "images, 0 = all"),
    ("ptq", "num_images"): (1, 100_000, "images"),
    ("ptq", "range_choice_images"): (1, 100_000, "images"),
    ("ptq", "adaround_iterations"): (0, 1_000_000, "optimizer steps per layer"),
    ("ptq", "adaround_seconds"): (0.0, 86_400.0, "seconds per layer, 0 = no cap"),
    ("preprocess", "scale"): (0.0, 1e4, "pixel multiplier"),
}
MAX_INPUT_SIDE = 16_384  # pixels: one 16384x16384 RGB float32 image is already 3 GiB
MAX_ABS_MEAN_STD = 1e6  # preprocess.mean / std bounds; real values are 0..255


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
    if not all(1e-6 <= s <= MAX_ABS_MEAN_STD for s in p.std) or not all(abs(m) <= MAX_ABS_MEAN_STD for m in p.mean):
        raise UsageError(f"preprocess.std must be in [1e-06, {MAX_ABS_MEAN_STD:g}] and |preprocess.mean| <= "
                         f"{MAX_ABS_MEAN_STD:g} (pixel units), got mean {short_repr(list(p.mean))}, "
                         f"std {short_repr(list(p.std))}")
    size = recipe.input.size
    if size is not None and any(s > MAX_INPUT_SIDE for s in size):
        raise UsageError(f"input.size must be at most {MAX_INPUT_SIDE} pixels a side, got {short_repr(list(size))}")
