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

from quantkit.data.inputs import ort_feeds
from quantkit.sqnr import sqnr_db


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
    """Run ``x`` (float32 (N, ...); packed (N, F) for a graph with several inputs); a graph with a fixed batch
    of 1 is run one sample at a time."""
    inp = sess.get_inputs()[0]
    batch_dim = inp.shape[0]
    inputs = sess.get_inputs()  # several: x is packed (N, F), see quantkit.data.inputs
    if isinstance(batch_dim, int) and batch_dim != x.shape[0]:
        parts = [sess.run(None, ort_feeds(inputs, x[i : i + batch_dim])) for i in range(0, x.shape[0], batch_dim)]
        return [np.concatenate([p[k] for p in parts]).astype(np.float32) for k in range(len(parts[0]))]
    return [o.astype(np.float32) for o in sess.run(None, ort_feeds(inputs, x))]


def torch_outputs(model: nn.Module, x: torch.Tensor) -> list[np.ndarray]:
    with torch.no_grad():
        out = model(x)
    outs = [out] if isinstance(out, torch.Tensor) else list(out)
    return [o.detach().float().numpy() for o in outs]


@dataclass(frozen=True)
class ParityResult:
    """SQNR in dB of ``test`` against ``reference`` per output name, and over all outputs.

    ``logit_db``: for sigmoid outputs, the SQNR of their saturation-clipped logits (see ``judged_db``)."""

    per_output: dict[str, float]
    overall: float
    logit_db: dict[str, float] | None = None

    @property
    def worst(self) -> float:
        return min(self.per_output.values())

    def judged_db(self, name: str) -> float:
        """The SQNR the parity rules judge: a sigmoid output's clipped-logit SQNR, else the output's.

        A sigmoid output's SQNR is set by the few values in its transition band (a mask's edge pixels): a slope
        of up to 1/4 turns each rounding flip upstream into a large error there, while the saturated bulk adds
        signal and no error, so one such figure over 16 inputs moves by tens of dB with which values happen to
        flip in one runtime and not in another. Its logit, clipped to p in [1e-3, 1 - 1e-3] (the decisions beyond
        that are the same), carries the same rounding noise spread evenly over every value.
        """
        if self.logit_db and name in self.logit_db:
            return self.logit_db[name]
        return self.per_output[name]

    def as_dict(self) -> dict:
        def r(v):  # JSON has no infinities: identical outputs are "inf", NaN/garbage outputs "-inf"
            return ("inf" if v > 0 else "-inf") if math.isinf(v) else (None if math.isnan(v) else round(v, 3))
        out = {"per_output_db": {k: r(v) for k, v in self.per_output.items()}, "overall_db": r(self.overall),
               "worst_db": r(self.worst)}
        if self.logit_db:
            out["sigmoid_logit_db"] = {k: r(v) for k, v in self.logit_db.items()}
        return out


SATURATED = 1e-3  # a sigmoid probability within this of 0 or 1 counts as saturated (logit clipped at +-6.9)


def _logit(a: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(a, np.float64), SATURATED, 1.0 - SATURATED)
    return np.log(p) - np.log1p(-p)


def sigmoid_outputs(model: onnx.ModelProto) -> frozenset[str]:
    """Graph outputs computed by a Sigmoid (through Cast/Identity): judged on their clipped logits."""
    producer = {o: n for n in model.graph.node for o in n.output}
    found = set()
    for out in model.graph.output:
        node = producer.get(out.name)
        while node is not None and node.op_type in ("Cast", "Identity"):
            node = producer.get(node.input[0])
        if node is not None and node.op_type == "Sigmoid":
            found.add(out.name)
    return frozenset(found)


Outputs = list[list[np.ndarray]]  # per batch, the list of output arrays


def outputs(fn, batches: Iterable[torch.Tensor]) -> Outputs:
    """Run ``fn`` (batch -> list of arrays) over ``batches`` once, so several comparisons can share the result."""
    return [list(fn(b)) for b in batches]


def compare_outputs(ref: Outputs, test: Outputs, names: list[str], sigmoid: frozenset[str] = frozenset()
                    ) -> ParityResult:
    """SQNR of ``test`` against ``ref`` per output name and over all outputs; for the ``sigmoid`` outputs also
    the SQNR of their clipped logits (``ParityResult.judged_db``)."""
    per = {n: sqnr_db([r[k] for r in ref], [t[k] for t in test]) for k, n in enumerate(names)}
    overall = sqnr_db([a for r in ref for a in r], [a for t in test for a in t])
    logit = {n: sqnr_db([_logit(r[k]) for r in ref], [_logit(t[k]) for t in test])
             for k, n in enumerate(names) if n in sigmoid}
    return ParityResult(per, overall, logit or None)


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
    sigmoid: frozenset[str] = frozenset()  # outputs judged on their clipped logits (``sigmoid_outputs``)

    @classmethod
    def of(cls, fp32_model: nn.Module, qmodel: nn.Module, batches: list[torch.Tensor], names: list[str],
           sigmoid: frozenset[str] = frozenset()) -> "References":
        return cls(batches, names, outputs(torch_fn(fp32_model), batches), outputs(torch_fn(qmodel), batches),
                   sigmoid)

    def check(self, sess: ort.InferenceSession) -> tuple[ParityResult, ParityResult]:
        """(graph vs fake-quant, graph vs FP32) for an onnxruntime session."""
        got = outputs(onnx_fn(sess), self.batches)
        return (compare_outputs(self.fakequant, got, self.names, self.sigmoid),
                compare_outputs(self.fp32, got, self.names, self.sigmoid))

    def quantization(self) -> ParityResult:
        """Fake-quant vs FP32 in torch: the quantization error the graphs should reproduce."""
        return compare_outputs(self.fp32, self.fakequant, self.names, self.sigmoid)


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
    return {n: _capped(reference.judged_db(n)) - _capped(test.judged_db(n)) for n in reference.per_output}


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
                            f"{n} {ort_vs_fp32.judged_db(n):.1f} vs {torch_vs_fp32.judged_db(n):.1f} dB"
                            + (" (sigmoid logits)" if n in (ort_vs_fp32.logit_db or {}) else "") for n in bad))
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
    for n in strong_vs_fp32.per_output:
        s_db = strong_vs_fp32.judged_db(n)
        f_db = fp16_vs_fp32.judged_db(n) if fp16_vs_fp32 is not None else fp16_noise_db
        allowed = _noise(torch_vs_fp32.judged_db(n)) + _noise(f_db)
        allowed_db = -10 * math.log10(allowed) if 0 < allowed < math.inf else -math.inf
        if not (s_db >= allowed_db - max_worse_db):
            bad.append(f"{n} {s_db:.1f} dB from FP32, expected >= {allowed_db - max_worse_db:.1f} dB "
                       f"(fake-quant {torch_vs_fp32.judged_db(n):.1f} dB, FP16 alone {f_db:.1f} dB)"
                       + (" on sigmoid logits" if n in (strong_vs_fp32.logit_db or {}) else ""))
    if not bad:
        return None
    return "model.int8.strong.onnx is further from FP32 than INT8 and FP16 noise together explain: " + "; ".join(bad)


# A strong graph whose every INT8 layer replays right may still sit a few dB further from FP32 at the outputs than
# the noise sum predicts: FP16 rounding moves values across INT8 rounding boundaries (each flip is a whole step,
# a different noise realisation of the same power), and on a saturating output (a segmentation net's sigmoid,
# where the error is set by the few pixels in the transition band) one output SQNR over 16 inputs moves by
# several dB with which pixels flip. With the layers verified, the output check only guards the float ops the
# layers do not cover (an FP16 op that loses its range or precision costs 10x the noise power or more).
STRONG_MAX_WORSE_DB_WITH_LAYERS = 10.0


def strong_failures(layers, torch_vs_fp32: ParityResult, strong_vs_fp32: ParityResult,
                    fp16_vs_fp32: ParityResult | None = None) -> list[str]:
    """Why the strong graph is not the weak one in FP16 (empty list: it is), judged per layer first.

    ``layers``: :func:`quantkit.exporter.layer_parity.layer_parity` run on the strong graph (``fp16=True``): every
    quantized layer keeps torch's Q/DQ structure and FP16-stored scales, and, replayed on the strong graph's own
    FP16 input, differs by more than one step on at most 1 % of its outputs and is finite wherever torch is.
    The outputs must be finite, and within the noise rule of :func:`strong_failure`, with a margin of
    ``STRONG_MAX_WORSE_DB_WITH_LAYERS`` when layers were checked (3 dB when none could be located).
    """
    failures = list(layers.failures()) if layers is not None else []
    checked = layers is not None and bool(layers.rows)
    margin = STRONG_MAX_WORSE_DB_WITH_LAYERS if checked else MAX_WORSE_DB
    reason = strong_failure(torch_vs_fp32, strong_vs_fp32, fp16_vs_fp32, max_worse_db=margin)
    if reason:
        failures.append(reason)
    return failures
