"""Recipes: the whole configuration of one export, as frozen dataclasses validated once.

A recipe is YAML (loaded with ``yaml.safe_load``) whose sections mirror the dataclasses below. Every field has
a default, so an empty recipe is valid. ``--set section.key=value`` overrides any field; values are parsed as
YAML scalars (``--set calibration.method=entropy``, ``--set quantization.skip=[head.*]``). Unknown sections or
keys, and values of the wrong type, raise :class:`~quantkit.errors.UsageError` listing what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import math
import typing
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Mapping

import yaml

from quantkit.calib_methods import CalibMethod  # noqa: F401  (re-exported)
from quantkit.errors import UsageError
from quantkit.recipe_limits import MAX_INT_BITS, YAML_VALUE_ERRORS, OversizedNumber, check_ranges, check_size, load_yaml, short_repr


from quantkit.recipe_specs import (  # noqa: F401  (re-exported: the recipe is where sections are imported from)
    ExportTarget,
    Fp16Overflow,
    NmsFlavor,
    ModelSpec,
    InputSpec,
    PreprocessSpec,
    CalibrationSpec,
    QuantizationSpec,
    ExportSpec,
    EvaluationSpec,
    GateSpec,
    SensitivitySpec,
    PtqSpec,
    RuntimeSpec,
)


@dataclass(frozen=True)
class Recipe:
    """One export's configuration. Build with :func:`load_recipe`; never mutate (use :func:`apply_overrides`)."""

    model: ModelSpec = field(default_factory=ModelSpec)
    input: InputSpec = field(default_factory=InputSpec)
    preprocess: PreprocessSpec = field(default_factory=PreprocessSpec)
    calibration: CalibrationSpec = field(default_factory=CalibrationSpec)
    quantization: QuantizationSpec = field(default_factory=QuantizationSpec)
    export: ExportSpec = field(default_factory=ExportSpec)
    evaluation: EvaluationSpec = field(default_factory=EvaluationSpec)
    gates: GateSpec = field(default_factory=GateSpec)
    sensitivity: SensitivitySpec = field(default_factory=SensitivitySpec)
    runtime: RuntimeSpec = field(default_factory=RuntimeSpec)
    ptq: PtqSpec = field(default_factory=PtqSpec)

    def as_dict(self) -> dict:
        """Plain-data form (lists instead of tuples), as written to ``recipe.resolved.yaml``."""
        return _to_plain(dataclasses.asdict(self))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.as_dict(), sort_keys=True, default_flow_style=False)


def _to_plain(obj: Any) -> Any:
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v) for v in obj]
    return obj


def _suggest(name: str, allowed: list[str]) -> str:
    close = difflib.get_close_matches(name, allowed, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Check ``value`` against the type hint of a field; convert lists to tuples. Raises UsageError."""
    if isinstance(value, OversizedNumber) or (isinstance(value, int) and value.bit_length() > MAX_INT_BITS):
        shown = value if isinstance(value, OversizedNumber) else short_repr(value)
        raise UsageError(f"{where}: {shown} is beyond any sensible value of this setting: give a plain number")
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Union or origin is getattr(__import__("types"), "UnionType", None):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where)
    if origin is tuple:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise UsageError(f"{where}: expected a list, got {short_repr(value)}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], where) for v in value)
        if len(value) != len(args):
            raise UsageError(f"{where}: expected {len(args)} values, got {len(value)} ({short_repr(value)})")
        return tuple(_coerce(v, a, where) for v, a in zip(value, args))
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        allowed = [m.value for m in hint]
        if isinstance(value, hint):
            return value
        if isinstance(value, str) and value in allowed:
            return hint(value)
        raise UsageError(f"{where} {short_repr(value)} is not one of: {', '.join(allowed)}")
    if hint is bool:
        if not isinstance(value, bool):
            raise UsageError(f"{where}: expected true or false, got {short_repr(value)}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UsageError(f"{where}: expected an integer, got {short_repr(value)}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UsageError(f"{where}: expected a number, got {short_repr(value)}")
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
        if not math.isfinite(number):
            raise UsageError(f"{where}: expected a finite number, got {short_repr(value)}")
        return number
    if hint is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        if not isinstance(value, str):
            raise UsageError(f"{where}: expected a string, got {short_repr(value)}")
        return value
    return value


def _build_section(cls: type, data: Mapping[str, Any], section: str) -> Any:
    if not isinstance(data, Mapping):
        raise UsageError(f"recipe section '{section}' must be a mapping, got {short_repr(data)}")
    hints = typing.get_type_hints(cls)
    allowed = [f.name for f in fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in allowed:
            raise UsageError(
                f"unknown recipe key '{section}.{key}'{_suggest(str(key), allowed)}; "
                f"valid keys of '{section}': {', '.join(allowed)}"
            )
        kwargs[key] = _coerce(value, hints[key], f"{section}.{key}")
    return cls(**kwargs)


def recipe_from_dict(data: Mapping[str, Any] | None) -> Recipe:
    """Build and validate a Recipe from plain data (as loaded from YAML)."""
    check_size(data, "recipe")
    data = dict(data or {})
    sections = {f.name: f for f in fields(Recipe)}
    hints = typing.get_type_hints(Recipe)
    kwargs = {}
    for key, value in data.items():
        if key not in sections:
            raise UsageError(
                f"unknown recipe section '{key}'{_suggest(str(key), list(sections))}; "
                f"valid sections: {', '.join(sections)}"
            )
        kwargs[key] = _build_section(hints[key], value or {}, key)
    return validate(Recipe(**kwargs))


def validate(recipe: Recipe) -> Recipe:
    """Check value ranges and cross-field rules. Raises UsageError naming the field and the allowed values."""
    c = recipe.calibration
    try:
        c.settings  # the calibrator's own bounds, checked once here at the edge
    except UsageError as exc:
        raise UsageError(f"calibration: {exc}") from None
    if c.batch_size < 1 or c.max_images < 0:
        raise UsageError("calibration.batch_size must be >= 1 and calibration.max_images >= 0")
    if ExportTarget.WEAK not in recipe.export.targets:
        raise UsageError("export.targets must include 'weak' (the strong variant is derived from it)")
    if recipe.export.opset not in (17, 18, 19, 20, 21):
        raise UsageError(f"export.opset must be 17..21, got {recipe.export.opset}")
    if recipe.input.size is not None and any(s < 32 or s % 32 for s in recipe.input.size):
        raise UsageError(f"input.size must be multiples of 32 (>= 32), got {list(recipe.input.size)}")
    parse_batch(recipe.input.batch)
    if recipe.sensitivity.num_images < 1 or recipe.sensitivity.eval_images < 0:
        raise UsageError("sensitivity.num_images must be >= 1 and sensitivity.eval_images >= 0 (0: all)")
    dev = recipe.runtime.device.strip().lower()
    if not (dev == "cpu" or dev == "cuda" or (dev.startswith("cuda:") and dev[5:].isdigit())):
        raise UsageError(f"runtime.device must be cpu, cuda or cuda:N, got {recipe.runtime.device!r}")
    for where, split in (("calibration.split", c.split), ("evaluation.split", recipe.evaluation.split)):
        if split not in ("train", "val", "test"):
            raise UsageError(f"{where} must be train, val or test (a split of the dataset YAML), got {split!r}")
    if c.trt_cache_missing not in ("fp16", "calibrate"):
        raise UsageError("calibration.trt_cache_missing must be fp16 (keep layers without a cache scale FP16) or "
                         f"calibrate (calibrate them from --calib), got {c.trt_cache_missing!r}")
    if recipe.evaluation.annotations is not None and recipe.evaluation.data is None:
        raise UsageError("evaluation.annotations needs evaluation.data (the images folder): pass --eval IMAGES "
                         "with --eval-annotations FILE.json")
    p = recipe.ptq
    if p.num_images < 1 or p.range_choice_images < 1 or p.adaround_iterations < 0 or p.adaround_seconds < 0:
        raise UsageError("ptq.num_images and ptq.range_choice_images must be >= 1, ptq.adaround_iterations and "
                         "ptq.adaround_seconds >= 0")
    share = recipe.sensitivity.min_int8_share
    if share is not None and not 0.0 <= share <= 1.0:
        raise UsageError(f"sensitivity.min_int8_share must be in [0, 1] (share of conv/linear MACs), got {share}")
    if recipe.gates.max_drop is not None and recipe.gates.max_drop < 0:
        raise UsageError("gates.max_drop must be >= 0 (mAP50:95 points)")
    check_ranges(recipe)
    return recipe


MAX_BATCH = 65_536  # images per inference batch; larger is no TensorRT profile anyone builds


def parse_batch(text: str) -> tuple[int, int, int]:
    """``"4"`` -> (4, 4, 4); ``"1:8:32"`` -> (1, 8, 32). Raises UsageError on malformed or unordered values."""
    parts = str(text).split(":")
    try:
        nums = [int(p) for p in parts]  # a 5000-digit part raises ValueError too (int digit limit)
    except ValueError:
        raise UsageError(f"batch {short_repr(str(text))} must be an integer or min:opt:max, e.g. 1:8:32") from None
    if len(nums) == 1:
        nums = nums * 3
    if len(nums) != 3 or not (1 <= nums[0] <= nums[1] <= nums[2] <= MAX_BATCH):
        raise UsageError(f"batch {short_repr(str(text))} must be N or min:opt:max with 1 <= min <= opt <= max <= "
                         f"{MAX_BATCH:,}, e.g. 1:8:32")
    return nums[0], nums[1], nums[2]


def apply_overrides(recipe: Recipe, overrides: list[str] | tuple[str, ...]) -> Recipe:
    """Apply ``section.key=value`` strings (value parsed as YAML) and re-validate."""
    data = recipe.as_dict()
    for item in overrides:
        if "=" not in item:
            raise UsageError(f"--set '{item}' must look like section.key=value, e.g. calibration.method=mse")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) != 2:
            raise UsageError(f"--set key '{key}' must be section.key, e.g. calibration.method; sections: "
                             f"{', '.join(f.name for f in fields(Recipe))}")
        section, name = parts
        if section not in data:
            raise UsageError(f"--set: unknown section '{section}'{_suggest(section, list(data))}; "
                             f"valid sections: {', '.join(data)}")
        try:
            value = load_yaml(raw) if raw.strip() else None
        except YAML_VALUE_ERRORS as exc:
            raise UsageError(f"--set {key}: cannot parse value {short_repr(raw)}: {short_repr(str(exc))}") from None
        check_size(value, f"--set {key}")
        data[section][name] = value  # an unknown key is reported, with the valid ones, by recipe_from_dict
    return recipe_from_dict(data)


def load_recipe(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Load a YAML recipe (or the defaults when ``path`` is None), apply ``--set`` overrides, validate.

    ``path``: a YAML file, or the name of a shipped recipe (``trees``, ``yolo_nas_s``; ``quantkit recipes``
    lists them). An existing file wins over a shipped name."""
    if path is None:
        recipe = Recipe()
    else:
        from quantkit.recipe_library import resolve_recipe

        p = resolve_recipe(path)
        try:
            text = p.read_bytes().decode("utf-8")
        except UnicodeDecodeError as exc:
            raise UsageError(f"recipe {p} is not UTF-8 text (byte {exc.start}): save it as UTF-8 YAML") from None
        try:
            data = load_yaml(text)
        except YAML_VALUE_ERRORS as exc:
            raise UsageError(f"recipe {p} is not valid YAML: {short_repr(str(exc))}") from None
        check_size(data, f"recipe {p}")
        if data is not None and not isinstance(data, Mapping):
            raise UsageError(f"recipe {p} must be a YAML mapping of sections")
        try:
            recipe = recipe_from_dict(data)
        except UsageError as exc:  # name the file: the key alone does not say which recipe holds it
            raise UsageError(f"recipe {p}: {exc}") from None
    return apply_overrides(recipe, overrides) if overrides else recipe


def check_option_conflicts(user_sets, option_sets, flags: dict[str, str]) -> None:
    """UsageError when a command-line option and a ``--set`` give one recipe key different values.

    Options become ``--set`` strings applied after the user's own, so without this check ``--method mse`` would
    silently beat ``--set calibration.method=entropy``. ``flags``: recipe key -> the option(s) that set it, for
    the message. Equal values (``0.3`` and ``0.30``) agree; a ``--set`` value that does not parse is left to
    the recipe loader, which names it."""
    def parsed(raw: str):
        return load_yaml(raw) if raw.strip() else None

    given = {}
    for item in option_sets:
        key, _, raw = item.partition("=")
        given[key.strip()] = raw
    for item in user_sets:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or key not in given:
            continue
        try:
            mine, theirs = parsed(raw), parsed(given[key])
        except YAML_VALUE_ERRORS:
            continue
        if mine != theirs:
            option = flags.get(key, "a command-line option")
            shown = item if len(item) <= 120 else item[:117] + "..."
            raise UsageError(f"{option} and --set {shown} disagree ({option} gives {key} = {short_repr(theirs)}): "
                             "give the setting once")


def recipe_list() -> str:
    """The shipped recipes, one per line with their description (``quantkit recipes``)."""
    from quantkit.recipe_library import format_recipe_list

    return format_recipe_list()


__all__ = ["recipe_list", "check_option_conflicts", "Recipe", "load_recipe", "apply_overrides", "recipe_from_dict",
           "parse_batch", "replace", "CalibMethod", "ExportTarget", "Fp16Overflow", "NmsFlavor"]
