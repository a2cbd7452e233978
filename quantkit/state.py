"""The typed state that flows between the pipeline's stages.

Low level on purpose: every stage package may import this module, and it imports no stage at run time (the
annotations name stage types for readers and type checkers only). Each dataclass is produced by one stage:

    quant.prepare            -> PreparedModel
    calibrate.calibrate      -> Calibration
    pipeline.quantize_recipe -> QuantState        (prepared model + data + calibration)
    sensitivity.analyze_and_select -> SensitivityOutcome (per-layer analysis, automatic FP16 choice)
    exporter.write_graphs    -> Graphs            (ONNX bytes, parity, lint)
    pipeline.export_state    -> ExportResult
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover - names for annotations only
    import onnx
    from torch import nn

    from quantkit.calibrate.driver import CalibrationResult
    from quantkit.data.calib import CalibrationData
    from quantkit.data.preprocess import Preprocess
    from quantkit.data.coco import CocoDataset
    from quantkit.exporter.layer_parity import LayerParity
    from quantkit.exporter.parity import ParityResult, References
    from quantkit.ptq import PtqReport
    from quantkit.quant.insert import QuantLayout
    from quantkit.recipe import Recipe
    from quantkit.sensitivity.analysis import SensitivityResult
    from quantkit.sensitivity.cost_model import CostTable
    from quantkit.sensitivity.select import Selection


@dataclass
class PreparedModel:
    """The reparameterized FP32 model, its fake-quant copy and the quantization layout.

    info: what the report says about the model (name, source, parameter counts, ...).
    """

    fp32: nn.Module
    qmodel: nn.Module
    layout: QuantLayout
    notes: list[str] = field(default_factory=list)
    info: dict = field(default_factory=dict)


@dataclass
class Calibration:
    """One calibration, applied: every method's amax per tensor, the amax chosen by the recipe's method
    (quantizer name -> amax, in the tensor's units) and where the result came from (cache key, hit, path)."""

    result: CalibrationResult
    chosen_amax: dict[str, float]
    cache: dict
    method: str | None = None  # the method key in use when a pass chose it per network (None: the recipe's)
    trt_cache: dict | None = None  # --trt-calib-cache: which tensors came from it, were kept FP16 or calibrated


@dataclass
class SensitivityOutcome:
    """Per-layer sensitivity, the T4 cost table and the automatic FP16 choice (None without a budget).
    ``section``: the report's ``sensitivity`` section."""

    section: dict
    sensitivity: SensitivityResult
    costs: CostTable
    choice: Selection | None = None


@dataclass
class QuantState:
    """Everything ``pipeline.quantize_recipe`` learned; kept on the returned module as ``qmodel.quantkit_state``.

    eval_path: evaluation data (None: no held-out evaluation). t0: ``time.perf_counter()`` at the start.
    """

    recipe: Recipe
    model: PreparedModel
    data: CalibrationData
    pp: Preprocess
    calibration: Calibration
    eval_path: str | None
    t0: float = field(default_factory=time.perf_counter)
    selection: SensitivityOutcome | None = None
    ptq: PtqReport | None = None  # what the accuracy passes (recipe.ptq) did, once they ran
    eval_dataset: CocoDataset | None = None  # the evaluation set at evaluation.max_images, opened once
    passes: dict | None = None  # the guarded PTQ steps (``ptq.guard.run_passes``): tried, kept/reverted, dB
    passes_seconds: dict | None = None  # wall time per guarded step and of the guard (run record only)


@dataclass
class Graphs:
    """The exported ONNX graphs and what was checked on them.

    refs: torch FP32 and fake-quant outputs on the parity inputs. fq_parity / fp32_parity: onnxruntime
    against torch (INT8 graph vs fake-quant, FP32 graph vs FP32). int8_vs_fp32: onnxruntime INT8 vs torch FP32.
    layers: onnxruntime vs torch fake-quant layer by layer (the per-layer table and the first disagreement).
    strong: the strongly typed graph (None when not a target) and its checks. lint: file name -> findings.
    nms: names of the ``*.nms.onnx`` graphs when written.
    """

    fp32_bytes: bytes
    int8: onnx.ModelProto
    int8_bytes: bytes
    refs: References
    fq_parity: ParityResult
    fp32_parity: ParityResult
    int8_vs_fp32: ParityResult
    strong: onnx.ModelProto | None = None
    strong_report: dict | None = None
    lint: dict = field(default_factory=dict)
    nms: dict | None = None
    layers: LayerParity | None = None

    @property
    def weak_name(self) -> str:
        """The weak graph TensorRT builds (with NMS appended when asked)."""
        return self.nms["weak"] if self.nms else "model.int8.onnx"

    @property
    def strong_name(self) -> str:
        return (self.nms or {}).get("strong") or "model.int8.strong.onnx"


@dataclass
class ExportResult:
    """What an export produced. ``report`` is the content of report.json."""

    out_dir: Path
    report: dict
    files: list[str] = field(default_factory=list)
    gate_failures: list[str] = field(default_factory=list)
