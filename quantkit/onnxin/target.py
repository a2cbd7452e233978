"""``OnnxTarget``: the ONNX route's network as the PTQ passes and their guard see it.

The torch route's passes work on the prepared ``state.QuantState`` (a fake-quant torch module); on the ONNX route
the same registered passes (``ptq.passes``), run by the same guard (``ptq.guard.run_passes``), work on this: the
cleaned FP32 graph, its placement (``layout``: which nodes are INT8, and why the others are not), the activation
scales and the per-channel weight scales, run in onnxruntime as the float Q/DQ twin (``onnxin.qdq.simulate_qdq``).

What a pass may read and change (the guard snapshots and restores exactly these):

- ``graph``: the FP32 graph the quantized graphs are built from (bias correction swaps in one with new biases;
  model.onnx stays the cleaned graph). Assign a changed copy: the snapshot keeps a reference, so a graph edited in
  place could not be restored;
- ``layout.int8`` / ``layout.reasons``: the INT8 nodes, and why a node was taken out of them;
- ``settings`` / ``amax`` / ``act_scales``: the calibration rule and, per activation tensor, its amax and scale
  (``set_amax`` keeps the two consistent).

``capabilities`` is ``("onnx",)``: a pass that needs ``"torch"`` or ``"autograd"`` (learned rounding) is refused
before calibration, naming what is missing (``ptq.passes.refuse_unrunnable``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx

from quantkit.calib_methods import MethodSettings
from quantkit.onnxin.measure import MEASURE


@dataclass
class OnnxTarget:
    """See the module docstring. ``fp32``: the cleaned graph (the FP32 reference, never changed); ``calib``: the one
    calibration pass's histograms (every method's amax comes from it); ``needed``: the INT8 activation tensors
    when calibrated; ``data``: the calibration data (the guard points it at the fit rows while a pass runs);
    ``threads``: onnxruntime threads (1 when deterministic)."""

    recipe: object
    fp32: onnx.ModelProto
    graph: onnx.ModelProto
    layout: object  # onnxin.placement.OnnxLayout
    wscales: dict
    calib: object  # calibrate.driver.CalibrationResult
    needed: list[str]
    settings: MethodSettings
    amax: dict[str, float]
    act_scales: dict[str, float]
    data: object
    threads: int | None = None
    progress: bool = True
    choice: object = None  # the FP16 choice's analysis (onnxin.fp16_choice.Fp16Choice), kept even when reverted
    passes: dict | None = None  # set by the guard
    passes_seconds: dict = field(default_factory=dict)
    _ops: list | None = None

    kind = "onnx"
    capabilities = ("onnx",)
    route_name = "the ONNX route (no torch module: a graph run in onnxruntime)"
    measure_text = MEASURE

    def set_amax(self, settings: MethodSettings, amax: dict[str, float]) -> None:
        """Use calibration rule ``settings`` and its ``amax`` per tensor (the scales follow)."""
        from quantkit.onnxin.qdq import activation_scale

        self.settings, self.amax = settings, dict(amax)
        self.act_scales = {t: float(activation_scale(a)) for t, a in amax.items()}

    def twin(self, int8: list[str] | None = None, *, weight_cache: dict | None = None) -> onnx.ModelProto:
        """The float Q/DQ twin of ``graph`` as placed now (or with only ``int8`` nodes INT8)."""
        import copy

        from quantkit.onnxin.qdq import simulate_qdq

        lay = self.layout
        if int8 is not None:
            lay = copy.copy(self.layout)
            lay.int8 = list(int8)
        return simulate_qdq(self.graph, lay, self.act_scales, self.wscales, check=False, weight_cache=weight_cache)

    @property
    def ops(self):
        """The weighted ops of the FP32 graph with their MACs (``exporter.coverage.graph_coverage``), read once."""
        if self._ops is None:
            from quantkit.exporter.coverage import graph_coverage

            self._ops = graph_coverage(self.fp32).ops
        return self._ops

    @property
    def macs(self) -> dict[str, float]:
        """Weighted node -> its multiply-accumulates per sample, in graph order."""
        return {op.node: float(op.macs) for op in self.ops}

    def fit_arrays(self, fit) -> list:
        """The fit images a pass runs its graphs on: ``fit`` (the guard's fit rows), at most
        ``onnxin.fp16_choice.fit_image_count`` of them spread over the rows, as float32 arrays."""
        from quantkit.onnxin.fp16_choice import fit_image_count

        return [b.numpy() for b in fit.batches(limit=fit_image_count(self.macs, self.recipe), spread=True)]

    # --- what the guard needs (ptq.guard.guard_ops) ---------------------------------------------------------------
    def checker(self, rows: list[int]):
        """The worst output's judged SQNR (dB) of the twin as placed now against FP32 on calibration ``rows``."""
        from quantkit.onnxin.measure import CheckImages

        return _Checker(self, CheckImages(self.fp32, self.data, self.threads, rows=rows))

    def snapshot(self) -> dict:
        return {"graph": self.graph, "int8": list(self.layout.int8), "reasons": dict(self.layout.reasons),
                "settings": self.settings, "amax": dict(self.amax), "act_scales": dict(self.act_scales)}

    def restore(self, snap: dict) -> None:
        self.graph, self.settings = snap["graph"], snap["settings"]
        self.layout.int8, self.layout.reasons = snap["int8"], snap["reasons"]
        self.amax, self.act_scales = snap["amax"], snap["act_scales"]


class _Checker:
    def __init__(self, target: OnnxTarget, images) -> None:
        self.target, self.images, self.count = target, images, 0

    def __call__(self) -> float:
        self.count += 1
        return self.images.worst_db(self.target.twin())

    def raw(self) -> float:
        """The worst output's raw SQNR (no sigmoid output judged on its logit: the torch route's measure)."""
        self.count += 1
        return self.images.worst_raw_db(self.target.twin())


__all__ = ["OnnxTarget"]
