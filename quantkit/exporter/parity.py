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


# ------------------------------------------------------------------------------------------- judging

MAX_WORSE_DB = 3.0  # onnxruntime's INT8-vs-FP32 SQNR may be at most this much below torch's
# Two float32 computations of one network agree to ~120-150 dB; above this, SQNR measures float rounding, not
# quantization, so differences up there (including +inf against a large finite value) mean nothing.
FLOAT_AGREEMENT_DB = 120.0
# FP16 activations alone (no INT8) keep a network's outputs this close to FP32 or closer; a strong graph
# that far from FP32 or closer is accepted whatever the fake-quant model's own (possibly tiny) error.
FP16_NOISE_DB = 60.0


def _capped(v: float) -> float:
    return min(v, FLOAT_AGREEMENT_DB)


def sqnr_shortfall(reference: ParityResult, test: ParityResult) -> dict[str, float]:
    """Per output, how many dB ``test`` is below ``reference`` (both against FP32), capped at float agreement."""
    return {n: _capped(reference.per_output[n]) - _capped(test.per_output[n]) for n in reference.per_output}


def judge(layers, ort_vs_fp32: ParityResult, torch_vs_fp32: ParityResult, *,
          max_worse_db: float = MAX_WORSE_DB) -> list[str]:
    """Why model.int8.onnx does not mean what the fake-quant model means (empty list: it does).

    ``layers`` is a :class:`quantkit.exporter.layer_parity.LayerParity` (or None when it could not run): every
    structural disagreement and every layer off by more than rounding on the same input is a failure, the
    first one in execution order first. Independently, onnxruntime's INT8-vs-FP32 SQNR must be within
    ``max_worse_db`` of torch's at every output — rounding flips that cascade cost far less than that.
    """
    failures = list(layers.failures()) if layers is not None else []
    worse = sqnr_shortfall(torch_vs_fp32, ort_vs_fp32)
    bad = {n: w for n, w in worse.items() if not w <= max_worse_db}
    if bad:
        failures.append("INT8-vs-FP32 SQNR in onnxruntime is more than "
                        f"{max_worse_db:g} dB below torch's: " + ", ".join(
                            f"{n} {ort_vs_fp32.per_output[n]:.1f} vs {torch_vs_fp32.per_output[n]:.1f} dB" for n in bad))
    return failures


def _noise(db: float) -> float:
    """Relative noise power of an SQNR in dB (capped at float agreement; -inf/NaN -> inf noise)."""
    return math.inf if not db > -math.inf else 10 ** (-_capped(db) / 10)


def strong_failure(torch_vs_fp32: ParityResult, strong_vs_fp32: ParityResult, fp16_vs_fp32: ParityResult | None = None,
                   *, max_worse_db: float = MAX_WORSE_DB, fp16_noise_db: float = FP16_NOISE_DB) -> str | None:
    """Why the strong (FP16 + Q/DQ) graph is unacceptable, or None.

    FP16 activations add their own rounding to INT8's, so the strong graph is judged relative to noise: its
    error against FP32 may be at most ``max_worse_db`` above the INT8 noise (torch fake-quant vs FP32) plus
    the FP16 noise (``fp16_vs_fp32``: the FP32 graph run in FP16 by the same converter; ``fp16_noise_db``
    when not measured), noise powers adding. A graph 83.7 dB from FP32 passes beside a fake-quant model at
    107.8 dB when FP16 alone sits near 80 dB; a wrong scale or op costs tens of dB and fails.
    """
    bad = []
    for n, s_db in strong_vs_fp32.per_output.items():
        f_db = fp16_vs_fp32.per_output[n] if fp16_vs_fp32 is not None else fp16_noise_db
        allowed = _noise(torch_vs_fp32.per_output[n]) + _noise(f_db)
        allowed_db = -10 * math.log10(allowed) if 0 < allowed < math.inf else -math.inf
        if not (s_db >= allowed_db - max_worse_db):
            bad.append(f"{n} {s_db:.1f} dB from FP32, expected >= {allowed_db - max_worse_db:.1f} dB "
                       f"(fake-quant {torch_vs_fp32.per_output[n]:.1f} dB, FP16 alone {f_db:.1f} dB)")
    if not bad:
        return None
    return "model.int8.strong.onnx is further from FP32 than INT8 and FP16 noise together explain: " + "; ".join(bad)
