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


def compare(reference_fn, test_fn, batches: Iterable[torch.Tensor], names: list[str]) -> ParityResult:
    """Accumulate outputs of two callables (batch -> list of arrays) over ``batches`` and compare by SQNR."""
    refs: list[list[np.ndarray]] = [[] for _ in names]
    tests: list[list[np.ndarray]] = [[] for _ in names]
    for b in batches:
        for k, (r, t) in enumerate(zip(reference_fn(b), test_fn(b))):
            refs[k].append(r)
            tests[k].append(t)
    per = {n: sqnr_db(refs[k], tests[k]) for k, n in enumerate(names)}
    overall = sqnr_db([a for rs in refs for a in rs], [a for ts in tests for a in ts])
    return ParityResult(per, overall)


def torch_fn(model: nn.Module):
    return lambda b: torch_outputs(model, b)


def onnx_fn(sess: ort.InferenceSession):
    return lambda b: run_session(sess, b.numpy())
