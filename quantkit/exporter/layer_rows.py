"""The rows of a layer-by-layer parity check (``quantkit.exporter.layer_parity``): one per quantized layer
call, and the verdict over all of them."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

MAX_FRACTION_OVER_STEP = 0.01  # more than 1 % of a layer's outputs off by > 1 step: not rounding


@dataclass
class LayerRow:
    """One call of one quantized layer.

    layer: module name (``name#k`` for the k-th further call of a module called more than once).
    node: the ONNX node whose output is the layer's output. int8: torch quantizes the layer.
    replay_db: SQNR of the torch module run on onnxruntime's input against onnxruntime's output (dB).
    over_step: fraction of output elements that differ by more than one quantization step (max|y|/127) there.
    run_db: SQNR of onnxruntime's layer output against the torch fake-quant model's, both run on the images
        (includes rounding flips cascading from earlier layers).
    int8_vs_fp32_db: SQNR of onnxruntime's layer output against the torch FP32 model's on the same images.
    problems: structural disagreements (missing/extra Q/DQ, wrong scale, wrong axis, per-tensor weight).
    """

    layer: str
    op: str
    node: str
    int8: bool
    replay_db: float = math.nan
    over_step: float = 0.0
    run_db: float = math.nan
    int8_vs_fp32_db: float = math.nan
    problems: list[str] = field(default_factory=list)

    @property
    def disagrees(self) -> bool:
        return bool(self.problems) or self.over_step > MAX_FRACTION_OVER_STEP

    def reason(self) -> str:
        if self.problems:
            return "; ".join(self.problems)
        return (f"{100 * self.over_step:.1f} % of outputs differ by more than one quantization step when run on "
                f"the same input (replay SQNR {self.replay_db:.1f} dB): the graph computes something else")

    def as_dict(self) -> dict:
        return {"layer": self.layer, "op": self.op, "node": self.node, "int8": self.int8,
                "torch_vs_ort_replay_db": _r(self.replay_db), "over_one_step": round(self.over_step, 6),
                "torch_vs_ort_run_db": _r(self.run_db), "int8_vs_fp32_db": _r(self.int8_vs_fp32_db),
                "problems": list(self.problems)}


def _r(v: float):
    """JSON-safe dB: infinities as strings, NaN (not measured) as None."""
    if math.isnan(v):
        return None
    return ("inf" if v > 0 else "-inf") if math.isinf(v) else round(v, 3)


@dataclass
class LayerParity:
    """Per-layer rows in execution order, and the quantized layer calls that matched no graph node."""

    rows: list[LayerRow]
    unmatched: list[str]
    unclaimed: list[str] = field(default_factory=list)  # graph Conv/Gemm/MatMul/ConvTranspose nodes no call matched

    def first_disagreement(self) -> LayerRow | None:
        return next((r for r in self.rows if r.disagrees), None)

    def failures(self) -> list[str]:
        """Human-readable refusals: every disagreeing layer (first one first) and every unmatched call."""
        out = [f"layer {r.layer} ({r.node}): {r.reason()}" for r in self.rows if r.disagrees]
        if self.unclaimed:  # a call without a node is harmless when its output was unused (exporter removed it)
            out += [f"layer {n}: no matching node in the graph (the layer is missing or was renamed; unclaimed "
                    f"graph nodes: {', '.join(self.unclaimed[:3])})" for n in self.unmatched]
        return out

    def table(self) -> list[dict]:
        """Rows for report.json/report.md: layer, op, node, int8, SQNRs (dB), problems."""
        return [r.as_dict() for r in self.rows]

    def as_dict(self) -> dict:
        first = self.first_disagreement()
        return {"layers": self.table(), "unmatched": list(self.unmatched), "unclaimed": list(self.unclaimed),
                "first_disagreement": first.layer if first else None,
                "criterion": f"structure (Q/DQ presence, scales, weight axis) and, on the same input, no more than "
                             f"{100 * MAX_FRACTION_OVER_STEP:g} % of outputs off by more than one step"}
