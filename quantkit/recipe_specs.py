"""The sections of a recipe: frozen dataclasses with their defaults and units, and the enums the edge parses
strings into. ``quantkit.recipe`` builds, validates and re-exports them; import them from there."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from quantkit.calib_methods import DEFAULT_NUM_BINS, DEFAULT_PERCENTILE, CalibMethod, MethodSettings


class ExportTarget(str, enum.Enum):
    """Which Q/DQ graphs an export writes."""

    WEAK = "weak"  # FP32 tensors + Q/DQ, opset 17: TensorRT --int8 --fp16 (8.6 .. 10.x)
    STRONG = "strong"  # FP16 tensors + Q/DQ, opset 19: strongly typed builds (TensorRT >= 10.12, 11)


class Fp16Overflow(str, enum.Enum):
    """What the strongly typed graph does with a float constant outside FP16 range (|x| > 65504)."""

    KEEP_FP32 = "keep_fp32"  # keep the constant float32; the ops reading it run FP32 behind Casts (exact)
    CLAMP = "clamp"  # clip to +-65504, with a report line (changes what the op computes)
    ERROR = "error"  # no strong graph (reported; exit 3 with gates.require_strong)


class NmsFlavor(str, enum.Enum):
    """How post-processing is appended to the ``*.nms.onnx`` graphs."""

    ONNX = "onnx"  # ONNX NonMaxSuppression (TensorRT >= 10 builds it as INMSLayer)
    EFFICIENT_NMS_TRT = "efficient_nms_trt"  # the TensorRT 8.6 plugin (deprecated since 10.12)


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
    """Post-training calibration. ``data``: a folder of images (sub-folders included), a float32 NCHW ``.npy``, or
    an Ultralytics dataset YAML (its ``split`` images, ``train`` by default) (null: the bundled calibration set of
    the bundled model). ``method``: auto | max | percentile | entropy | mse; ``auto`` (default) starts from mse
    and keeps, per network, the rule with the best output SQNR on held-out calibration images. ``max_images``: how many
    images/rows to use (0: all). ``cache``: calibration cache file (null: ``$QUANTKIT_CACHE_DIR`` or
    ``~/.cache/quantkit/calibration/<key>.json``). ``deterministic``: run the calibration pass on one CPU thread
    so the amax (and the INT8 ONNX bytes) do not depend on the machine's core count (slower on many cores).
    ``trt_cache``: a TensorRT calibration cache (text, ``TRT-<version>-EntropyCalibration2``) whose scales are
    used instead of calibrating (ONNX route; ``data``, when given, still serves parity and evaluation).
    ``trt_cache_missing``: what becomes of a quantizable tensor the cache has no scale for (a hybrid export's
    cache lists only its INT8 layers' tensors): ``fp16`` (default) keeps the node that reads it FP16, as the
    source did; ``calibrate`` calibrates it from ``data`` (required then). The report lists which.
    ``clip_margin_db``: with ``method: auto``, a clipping rule (percentile, entropy, mse) replaces max only when its
    output SQNR on the held-out check images beats max's by at least this many dB (0: the best check SQNR wins).
    The check images come from the calibration set, so they flatter a rule fitted to its tails; max clips nothing
    and holds up best on data unlike the calibration set (measured in benchmarks/RESULTS.md, real-networks)."""

    data: str | None = None
    method: CalibMethod = CalibMethod.AUTO
    percentile: float = DEFAULT_PERCENTILE
    num_bins: int = DEFAULT_NUM_BINS
    batch_size: int = 8
    max_images: int = 0
    cache: str | None = None
    use_cache: bool = True
    deterministic: bool = True
    split: str = "train"
    trt_cache: str | None = None
    trt_cache_missing: str = "fp16"
    clip_margin_db: float = 1.0

    @property
    def settings(self) -> MethodSettings:
        """The amax rule this section selects (validated when the recipe is built); for ``auto``, the rule the
        per-network choice starts from (max: a clipping rule must beat it by ``clip_margin_db``), which is also what
        is used when too few images can be held out to choose."""
        method = CalibMethod.MAX if self.method is CalibMethod.AUTO else self.method
        return MethodSettings(method=method, percentile=self.percentile, num_bins=self.num_bins)


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
    (FP16 + Q/DQ, opset 19, strongly typed builds). Parity is judged layer by layer
    (``quantkit.exporter.layer_parity``): the export fails when a quantized layer's Q/DQ structure, scales or weight
    axis differ from the torch model's, or when, run on the same input, its output differs by more than rounding;
    and when onnxruntime's INT8-vs-FP32 SQNR is more than 3 dB below torch's. Rounding flips that cascade to the
    outputs (a deep detector's sigmoid scores can end 30-40 dB apart) are not refused. ``parity_min_sqnr``:
    minimum torch-vs-onnxruntime output SQNR in dB, applied only when no quantized layer could be located. ``engine``: build a TensorRT engine (needs TensorRT and a GPU).
    ``nms``: also write ``*.nms.onnx`` graphs with post-processing appended (``nms_flavor``: ``onnx`` =
    NonMaxSuppression, built by TensorRT >= 10; ``efficient_nms_trt`` = the TensorRT 8.6 plugin), which
    build_engine.sh then builds. ``fp16_overflow``: float constants outside FP16 range in the strong graph (a
    BatchNorm after a ReLU with running_var > 65504): ``keep_fp32`` (default: the ops that read them run FP32, so
    the graph computes what the weak one does), ``clamp`` (clip to +-65504) or ``error`` (no strong graph). A
    strong graph that fails its check is not written; the weak graph and everything else are, and report.json's
    ``strong`` section says why (``gates.require_strong`` turns that into exit 3). ``backend``: the deployment
    backend that writes the build scripts and builds with ``engine`` (``tensorrt``; others registered with
    ``quantkit.engine.backend.register_backend``)."""

    opset: int = 17
    targets: tuple[ExportTarget, ...] = (ExportTarget.WEAK, ExportTarget.STRONG)
    parity_min_sqnr: float = 30.0
    engine: bool = False
    target: str = "t4"
    nms: bool = False
    nms_flavor: NmsFlavor = NmsFlavor.ONNX
    nms_score_threshold: float = 0.25
    nms_iou_threshold: float = 0.7
    nms_top_k: int = 1000
    nms_max_detections: int = 300
    fp16_overflow: Fp16Overflow = Fp16Overflow.KEEP_FP32
    backend: str = "tensorrt"


@dataclass(frozen=True)
class EvaluationSpec:
    """Task evaluation. ``data``: a COCO-format folder (``annotations.json`` + ``images/``), an images folder with
    ``annotations`` (a COCO JSON file anywhere), or an Ultralytics dataset YAML with YOLO txt labels (its ``split``
    split, ``val`` by default); null: none, or the bundled held-out set when the bundled model is used.
    ``conf``/``iou``: NMS thresholds for mAP."""

    data: str | None = None
    annotations: str | None = None
    split: str = "val"
    conf: float = 0.001
    iou: float = 0.7
    max_images: int = 0


@dataclass(frozen=True)
class GateSpec:
    """CI gates, checked after the report is written. ``max_drop``: largest allowed FP32->INT8 drop in
    mAP50:95 points (needs evaluation data). ``min_sqnr``: smallest allowed INT8-vs-FP32 output SQNR in dB.
    ``require_strong``: fail (exit 3, artifacts written) when the strongly typed graph was asked for and failed."""

    max_drop: float | None = None
    min_sqnr: float | None = None
    require_strong: bool = False


DEFAULT_MIN_INT8_SHARE = 0.95  # the default export keeps >= 95 % of conv/linear MACs INT8 (issue 14)


@dataclass(frozen=True)
class SensitivitySpec:
    """Per-layer sensitivity analysis. ``enabled``: run it inside export and add it to the report.
    ``num_images``: calibration images (spread over the set) for the SQNR sensitivities; 8 by default, which keeps
    the default export within 3x the time of a plain calibration (``benchmarks/RESULTS.md``, default-export-time).
    ``eval_images``: evaluation images for the per-layer mAP sensitivities (0: all; the selection's check and the
    final mAP always use the whole evaluation set). ``auto`` (default true): when a budget is set —
    ``gates.max_drop`` with evaluation data, or ``sqnr_floor`` (dB) — keep layers FP16 automatically so
    the measured result meets it, at the lowest estimated T4 latency; false: the budget only gates.
    ``min_int8_share`` (default 0.95): keep at least this share (0..1) of the conv/linear MACs in INT8 and spend
    the rest on the FP16 layers with the most measured SQNR gain per MAC
    (``sensitivity.select.choose_for_int8_share``); it drives the automatic choice when no accuracy budget
    (``gates.max_drop`` with evaluation data, ``sqnr_floor``) is given. null (or ``auto: false``): no automatic
    FP16 layers without an accuracy budget. A residual Add kept FP16 spends the MAC-equivalent of the conv+add
    fusion it breaks, and a layer is kept only if it recovers >= 0.05 dB (``sensitivity.select.MIN_RECOVERY_DB``)."""

    enabled: bool = False
    num_images: int = 8
    eval_images: int = 8
    auto: bool = True
    sqnr_floor: float | None = None
    min_int8_share: float | None = DEFAULT_MIN_INT8_SHARE


@dataclass(frozen=True)
class PtqSpec:
    """Accuracy methods beyond calibration (``quantkit.ptq``), each switchable. ``equalize``: cross-layer
    equalization of conv -> ReLU-like -> conv pairs (exact FP32 rescale; ReLU6 becomes a per-channel clip),
    before calibration. ``range_choice``: per activation, the amax among the histogram methods and a grid
    that minimises the consuming layer's output error (``range_choice_images`` images). ``adaround``: learned
    weight rounding per layer, ``adaround_iterations`` steps each (deterministic), optionally capped at
    ``adaround_seconds`` per layer (0: no cap; a cap makes results machine-dependent). ``bias_correction``:
    empirical per-channel bias correction with quantized inputs (on by default). ``num_images``: calibration
    images the passes use (one batch, spread over the set)."""

    equalize: bool = False
    range_choice: bool = False
    range_choice_images: int = 8
    adaround: bool = False
    adaround_iterations: int = 300
    adaround_seconds: float = 0.0
    bias_correction: bool = True
    num_images: int = 16


@dataclass(frozen=True)
class RuntimeSpec:
    """Where the torch passes run. ``device``: ``cpu`` (default) or ``cuda`` / ``cuda:N`` for calibration,
    sensitivity analysis and the FP32 torch evaluation; ONNX export, parity and onnxruntime evaluation always run
    on the CPU. ``cuda`` where CUDA is not available is an error before any work starts."""

    device: str = "cpu"
