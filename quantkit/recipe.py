"""Recipes: the whole configuration of one export, as frozen dataclasses validated once.

A recipe is YAML (loaded with ``yaml.safe_load``) whose sections mirror the dataclasses below. Every field has
a default, so an empty recipe is valid. ``--set section.key=value`` overrides any field; values are parsed as
YAML scalars (``--set calibration.method=entropy``, ``--set quantization.skip=[head.*]``). Unknown sections or
keys, and values of the wrong type, raise :class:`~quantkit.errors.UsageError` listing what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Mapping

import yaml

from quantkit.errors import UsageError

CALIB_METHODS = ("max", "percentile", "entropy", "mse")
EXPORT_TARGETS = ("weak", "strong")


@dataclass(frozen=True)
class ModelSpec:
    """Which model to quantize. ``name``: a registered name (``quantkit models``) or ``path.py:factory``."""

    name: str = "trees"
    weights: str | None = None
    num_classes: int | None = None


@dataclass(frozen=True)
class InputSpec:
    """Model input. ``size``: [height, width] in pixels (null: the model's default, or the .npy's shape).
    ``batch``: a fixed batch size (``"1"``) or a dynamic range ``"min:opt:max"`` (``"1:8:32"``)."""

    size: tuple[int, int] | None = None
    batch: str = "1"


@dataclass(frozen=True)
class PreprocessSpec:
    """Image preprocessing for image folders: letterbox (YOLO style, pad 114), ``x*scale``, then ``(x-mean)/std``."""

    letterbox: bool = True
    pad_value: int = 114
    scale: float = 1.0 / 255.0
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)


@dataclass(frozen=True)
class CalibrationSpec:
    """Post-training calibration. ``data``: a folder of images or a float32 NCHW ``.npy`` (null: the bundled
    calibration set of the bundled model). ``method``: max | percentile | entropy | mse. ``max_images``: how many
    images/rows to use (0: all). ``cache``: calibration cache file (null: ``$QUANTKIT_CACHE_DIR`` or
    ``~/.cache/quantkit/calibration/<key>.json``). ``deterministic``: run the calibration pass on one CPU thread
    so the amax (and the INT8 ONNX bytes) do not depend on the machine's core count (slower on many cores)."""

    data: str | None = None
    method: str = "entropy"
    percentile: float = 99.99
    num_bins: int = 2048
    batch_size: int = 8
    max_images: int = 0
    cache: str | None = None
    use_cache: bool = True
    deterministic: bool = True


@dataclass(frozen=True)
class QuantizationSpec:
    """Which layers get INT8. ``quantize``/``skip``: glob patterns over module names or type names
    (``head.*.cls_pred``, ``type:Linear``); ``skip`` wins. A pattern that matches nothing is an error.
    ``residual_add``: quantize the skip input of residual Adds (TensorRT fuses them into the conv)."""

    quantize: tuple[str, ...] = ("*",)
    skip: tuple[str, ...] = ()
    residual_add: bool = True


@dataclass(frozen=True)
class ExportSpec:
    """ONNX export. ``targets``: ``weak`` (FP32 + Q/DQ, opset 17, TensorRT ``--int8 --fp16``) and/or ``strong``
    (FP16 + Q/DQ, opset 19, strongly typed builds). ``parity_min_sqnr``: minimum torch-vs-onnxruntime SQNR in dB
    (worst output) below which the export fails. Two exact INT8 emulations still differ where float noise
    moves a value across a rounding boundary, and a deep detector amplifies those rare flips: 30-40 dB on
    sigmoid scores is normal, a wrong scale or axis gives < 15 dB. The export also fails when onnxruntime's
    INT8-vs-FP32 SQNR is more than 3 dB below torch's (the graph would be less accurate than calibrated). ``engine``: build a TensorRT engine (needs TensorRT and a GPU).
    ``nms``: also write ``*.nms.onnx`` graphs with post-processing appended (``nms_flavor``: ``onnx`` =
    NonMaxSuppression, built by TensorRT >= 10; ``efficient_nms_trt`` = the TensorRT 8.6 plugin), which
    build_engine.sh then builds."""

    opset: int = 17
    targets: tuple[str, ...] = ("weak", "strong")
    parity_min_sqnr: float = 30.0
    engine: bool = False
    target: str = "t4"
    nms: bool = False
    nms_flavor: str = "onnx"
    nms_score_threshold: float = 0.25
    nms_iou_threshold: float = 0.7
    nms_top_k: int = 1000
    nms_max_detections: int = 300


@dataclass(frozen=True)
class EvaluationSpec:
    """Task evaluation. ``data``: a COCO-format folder (``annotations.json`` + ``images/``); null: none, or the
    bundled held-out set when the bundled model is used. ``conf``/``iou``: NMS thresholds for mAP."""

    data: str | None = None
    conf: float = 0.001
    iou: float = 0.7
    max_images: int = 0


@dataclass(frozen=True)
class GateSpec:
    """CI gates, checked after the report is written. ``max_drop``: largest allowed FP32->INT8 drop in
    mAP50:95 points (needs evaluation data). ``min_sqnr``: smallest allowed INT8-vs-FP32 output SQNR in dB."""

    max_drop: float | None = None
    min_sqnr: float | None = None


@dataclass(frozen=True)
class SensitivitySpec:
    """Per-layer sensitivity analysis. ``enabled``: run it inside export and add it to the report.
    ``num_images``: calibration images for the SQNR sensitivities. ``auto`` (default true): when a budget is
    set — ``gates.max_drop`` with evaluation data, or ``sqnr_floor`` (dB) — keep layers FP16 automatically so
    the measured result meets it, at the lowest estimated T4 latency; false: the budget only gates.
    ``min_int8_share``: keep at least this share (0..1) of the conv/linear MACs in INT8 and spend the rest on
    the FP16 layers with the most measured SQNR gain per MAC (``sensitivity.select.choose_for_int8_share``)."""

    enabled: bool = False
    num_images: int = 16
    auto: bool = True
    sqnr_floor: float | None = None
    min_int8_share: float | None = None


@dataclass(frozen=True)
class PtqSpec:
    """Accuracy methods beyond calibration (``quantkit.ptq``), each switchable. ``equalize``: cross-layer
    equalization of conv -> ReLU-like -> conv pairs (exact FP32 rescale; ReLU6 becomes a per-channel clip),
    before calibration. ``range_choice``: per activation, the amax among the histogram methods and a grid
    that minimises the consuming layer's output error (``range_choice_images`` images). ``adaround``: learned
    weight rounding per layer, ``adaround_iterations`` steps each (deterministic), optionally capped at
    ``adaround_seconds`` per layer (0: no cap; a cap makes results machine-dependent). ``bias_correction``:
    empirical per-channel bias correction with quantized inputs. ``num_images``: calibration images the passes
    use (one batch)."""

    equalize: bool = False
    range_choice: bool = False
    range_choice_images: int = 8
    adaround: bool = False
    adaround_iterations: int = 300
    adaround_seconds: float = 0.0
    bias_correction: bool = False
    num_images: int = 16


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
    ptq: PtqSpec = field(default_factory=PtqSpec)

    def as_dict(self) -> dict:
        """Plain-data form (lists instead of tuples), as written to ``recipe.resolved.yaml``."""
        return _to_plain(dataclasses.asdict(self))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.as_dict(), sort_keys=True, default_flow_style=False)


def _to_plain(obj: Any) -> Any:
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
            raise UsageError(f"{where}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], where) for v in value)
        if len(value) != len(args):
            raise UsageError(f"{where}: expected {len(args)} values, got {len(value)} ({value!r})")
        return tuple(_coerce(v, a, where) for v, a in zip(value, args))
    if hint is bool:
        if not isinstance(value, bool):
            raise UsageError(f"{where}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UsageError(f"{where}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UsageError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        if not isinstance(value, str):
            raise UsageError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def _build_section(cls: type, data: Mapping[str, Any], section: str) -> Any:
    if not isinstance(data, Mapping):
        raise UsageError(f"recipe section '{section}' must be a mapping, got {data!r}")
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
    if c.method not in CALIB_METHODS:
        raise UsageError(f"calibration.method '{c.method}' is not one of: {', '.join(CALIB_METHODS)}")
    if not 0.0 < c.percentile <= 100.0:
        raise UsageError(f"calibration.percentile must be in (0, 100], got {c.percentile}")
    if c.num_bins < 128:
        raise UsageError(f"calibration.num_bins must be >= 128, got {c.num_bins}")
    if c.batch_size < 1 or c.max_images < 0:
        raise UsageError("calibration.batch_size must be >= 1 and calibration.max_images >= 0")
    for t in recipe.export.targets:
        if t not in EXPORT_TARGETS:
            raise UsageError(f"export.targets entry '{t}' is not one of: {', '.join(EXPORT_TARGETS)}")
    if "weak" not in recipe.export.targets:
        raise UsageError("export.targets must include 'weak' (the strong variant is derived from it)")
    if recipe.export.nms_flavor not in ("onnx", "efficient_nms_trt"):
        raise UsageError(f"export.nms_flavor must be onnx or efficient_nms_trt, got {recipe.export.nms_flavor!r}")
    if recipe.export.opset not in (17, 18, 19, 20, 21):
        raise UsageError(f"export.opset must be 17..21, got {recipe.export.opset}")
    if recipe.input.size is not None and any(s < 32 or s % 32 for s in recipe.input.size):
        raise UsageError(f"input.size must be multiples of 32 (>= 32), got {list(recipe.input.size)}")
    parse_batch(recipe.input.batch)
    p = recipe.ptq
    if p.num_images < 1 or p.range_choice_images < 1 or p.adaround_iterations < 0 or p.adaround_seconds < 0:
        raise UsageError("ptq.num_images and ptq.range_choice_images must be >= 1, ptq.adaround_iterations and "
                         "ptq.adaround_seconds >= 0")
    share = recipe.sensitivity.min_int8_share
    if share is not None and not 0.0 <= share <= 1.0:
        raise UsageError(f"sensitivity.min_int8_share must be in [0, 1] (share of conv/linear MACs), got {share}")
    if share is not None and recipe.sensitivity.sqnr_floor is not None:
        raise UsageError("give one selection budget: sensitivity.min_int8_share or sensitivity.sqnr_floor, not both")
    if recipe.gates.max_drop is not None and recipe.gates.max_drop < 0:
        raise UsageError("gates.max_drop must be >= 0 (mAP50:95 points)")
    return recipe


def parse_batch(text: str) -> tuple[int, int, int]:
    """``"4"`` -> (4, 4, 4); ``"1:8:32"`` -> (1, 8, 32). Raises UsageError on malformed or unordered values."""
    parts = str(text).split(":")
    try:
        nums = [int(p) for p in parts]
    except ValueError:
        raise UsageError(f"batch '{text}' must be an integer or min:opt:max, e.g. 1:8:32") from None
    if len(nums) == 1:
        nums = nums * 3
    if len(nums) != 3 or not (1 <= nums[0] <= nums[1] <= nums[2]):
        raise UsageError(f"batch '{text}' must be N or min:opt:max with 1 <= min <= opt <= max, e.g. 1:8:32")
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
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as exc:
            raise UsageError(f"--set {key}: cannot parse value {raw!r}: {exc}") from None
        data[section][name] = value  # an unknown key is reported, with the valid ones, by recipe_from_dict
    return recipe_from_dict(data)


def load_recipe(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Load a YAML recipe (or the defaults when ``path`` is None), apply ``--set`` overrides, validate."""
    if path is None:
        recipe = Recipe()
    else:
        p = Path(path)
        if not p.is_file():
            raise UsageError(f"recipe file {p} does not exist: pass an existing YAML file (see recipes/)")
        try:
            data = yaml.safe_load(p.read_text())
        except yaml.YAMLError as exc:
            raise UsageError(f"recipe {p} is not valid YAML: {exc}") from None
        if data is not None and not isinstance(data, Mapping):
            raise UsageError(f"recipe {p} must be a YAML mapping of sections")
        recipe = recipe_from_dict(data)
    return apply_overrides(recipe, overrides) if overrides else recipe


__all__ = ["Recipe", "load_recipe", "apply_overrides", "recipe_from_dict", "parse_batch", "replace"]
