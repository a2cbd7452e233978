"""Run exported graphs in onnxruntime and compare them with the torch model they came from."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from quantkit.eval.sqnr import sqnr_db


def session(model: onnx.ModelProto | bytes, threads: int | None = None, *, literal: bool = True
            ) -> ort.InferenceSession:
    """A CPU onnxruntime session.

    ``literal`` (default): graph optimizations off, so the ops run as written (DequantizeLinear, then a float
    Conv) — the graph's meaning, which is what parity checks. With optimizations on, onnxruntime fuses Q/DQ
    into integer kernels that requantize with their own rounding (closer to a deployment runtime).
    """
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if literal:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
    data = model if isinstance(model, bytes) else model.SerializeToString()
    return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])


def run_session(sess: ort.InferenceSession, x: np.ndarray) -> list[np.ndarray]:
    """Run ``x`` (NCHW float32); a graph with a fixed batch of 1 is run one image at a time."""
    inp = sess.get_inputs()[0]
    batch_dim = inp.shape[0]
    want = np.float16 if inp.type == "tensor(float16)" else np.float32
    x = x.astype(want, copy=False)
    if isinstance(batch_dim, int) and batch_dim != x.shape[0]:
        parts = [sess.run(None, {inp.name: x[i : i + batch_dim]}) for i in range(0, x.shape[0], batch_dim)]
        return [np.concatenate([p[k] for p in parts]).astype(np.float32) for k in range(len(parts[0]))]
    return [o.astype(np.float32) for o in sess.run(None, {inp.name: x})]


def torch_outputs(model: nn.Module, x: torch.Tensor) -> list[np.ndarray]:
    with torch.no_grad():
        out = model(x)
    outs = [out] if isinstance(out, torch.Tensor) else list(out)
    return [o.detach().float().numpy() for o in outs]


@dataclass(frozen=True)
class ParityResult:
    """SQNR in dB of ``test`` against ``reference`` per output name, and over all outputs."""

    per_output: dict[str, float]
    overall: float

    @property
    def worst(self) -> float:
        return min(self.per_output.values())

    def as_dict(self) -> dict:
        def r(v):  # JSON has no infinities: identical outputs are "inf", NaN/garbage outputs "-inf"
            return ("inf" if v > 0 else "-inf") if math.isinf(v) else (None if math.isnan(v) else round(v, 3))
        return {"per_output_db": {k: r(v) for k, v in self.per_output.items()}, "overall_db": r(self.overall),
                "worst_db": r(self.worst)}


Outputs = list[list[np.ndarray]]  # per batch, the list of output arrays


def outputs(fn, batches: Iterable[torch.Tensor]) -> Outputs:
    """Run ``fn`` (batch -> list of arrays) over ``batches`` once, so several comparisons can share the result."""
    return [list(fn(b)) for b in batches]


def compare_outputs(ref: Outputs, test: Outputs, names: list[str]) -> ParityResult:
    """SQNR of ``test`` against ``ref`` per output name and over all outputs."""
    per = {n: sqnr_db([r[k] for r in ref], [t[k] for t in test]) for k, n in enumerate(names)}
    overall = sqnr_db([a for r in ref for a in r], [a for t in test for a in t])
    return ParityResult(per, overall)


def compare(reference_fn, test_fn, batches: Iterable[torch.Tensor], names: list[str]) -> ParityResult:
    """Run two callables (batch -> list of arrays) over ``batches`` and compare their outputs by SQNR."""
    batches = list(batches)
    return compare_outputs(outputs(reference_fn, batches), outputs(test_fn, batches), names)


@dataclass
class References:
    """Torch outputs on the parity batches, computed once: the FP32 model's and the fake-quant model's."""

    batches: list[torch.Tensor]
    names: list[str]
    fp32: Outputs
    fakequant: Outputs

    @classmethod
    def of(cls, fp32_model: nn.Module, qmodel: nn.Module, batches: list[torch.Tensor], names: list[str]) -> "References":
        return cls(batches, names, outputs(torch_fn(fp32_model), batches), outputs(torch_fn(qmodel), batches))

    def check(self, sess: ort.InferenceSession) -> tuple[ParityResult, ParityResult]:
        """(graph vs fake-quant, graph vs FP32) for an onnxruntime session."""
        got = outputs(onnx_fn(sess), self.batches)
        return compare_outputs(self.fakequant, got, self.names), compare_outputs(self.fp32, got, self.names)

    def quantization(self) -> ParityResult:
        """Fake-quant vs FP32 in torch: the quantization error the graphs should reproduce."""
        return compare_outputs(self.fp32, self.fakequant, self.names)


def torch_fn(model: nn.Module):
    return lambda b: torch_outputs(model, b)


def onnx_fn(sess: ort.InferenceSession):
    return lambda b: run_session(sess, b.numpy())


# Above this SQNR two float graphs differ by rounding only: "3 dB worse" means nothing there. With nothing
# quantized (--skip '*', a high sqnr_floor) torch's INT8-vs-FP32 SQNR is infinite and onnxruntime's ~100+ dB.
FLOAT_NOISE_DB = 80.0
# The strongly typed graph adds FP16 activation rounding, which alone gives ~40-70 dB on a deep net: above this
# the fake-quant model is too close to FP32 for "3 dB worse" to say anything about the FP16 graph.
FP16_NOISE_DB = 40.0
MAX_ORT_LOSS_DB = 3.0


def sqnr_shortfall(reference: dict[str, float], test: dict[str, float], ceiling: float) -> float:
    """Largest per-output ``reference - test`` SQNR (dB), each capped at ``ceiling``; +inf when one is NaN."""
    worst = -math.inf
    for n in test:
        w = min(reference[n], ceiling) - min(test[n], ceiling)
        worst = max(worst, math.inf if math.isnan(w) else w)
    return worst


def parity_problem(fq: ParityResult, ort_q: ParityResult, torch_q: ParityResult, floor: float) -> str | None:
    """Why the INT8 graph does not do what the fake-quant model does, or None when it does.

    ``fq``: onnxruntime INT8 graph vs torch fake-quant (worst output must reach ``floor`` dB); ``ort_q`` and
    ``torch_q``: INT8-vs-FP32 SQNR of each (onnxruntime may be at most 3 dB worse per output; both capped at
    ``FLOAT_NOISE_DB`` so infinite or float-noise SQNRs compare as equal).
    """
    if fq.worst >= floor and sqnr_shortfall(torch_q.per_output, ort_q.per_output, FLOAT_NOISE_DB) <= MAX_ORT_LOSS_DB:
        return None
    return (f"worst output SQNR {fq.worst:.1f} dB (floor {floor} dB); INT8-vs-FP32 SQNR onnxruntime "
            f"{ort_q.per_output} vs torch {torch_q.per_output}")
