"""What the zoo measures on one export: weighted layers and their precision, MACs, lint, parity (zoo.py)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper, shape_inference

from quantkit.exporter.lint import Severity, lint
from quantkit.quant.functional import adds_path

WEIGHTED = ("Conv", "ConvTranspose", "Gemm", "MatMul")
_THROUGH = ("Transpose", "Reshape", "Identity", "Unsqueeze", "Flatten")


def _num(v) -> float | None:
    if v is None:
        return None
    if isinstance(v, str):
        return math.inf if v == "inf" else -math.inf
    return float(v)


def _weight(g, prod, inits, node):
    """(kind, array) of a weighted node's constant weight: 'int8', 'float', or (None, None) if not constant."""
    t = node.input[1] if len(node.input) > 1 else ""
    p = prod.get(t)
    while p is not None and p.op_type in _THROUGH:
        t, p = p.input[0], prod.get(p.input[0])
    if t in inits:
        return "float", numpy_helper.to_array(inits[t])
    if p is not None and p.op_type == "DequantizeLinear":
        src = p.input[0]
        if src in inits:
            w = numpy_helper.to_array(inits[src])
            return ("int8" if w.dtype == np.int8 else "float"), w
        q = prod.get(src)
        if q is not None and q.op_type == "QuantizeLinear" and q.input[0] in inits:
            return "float", numpy_helper.to_array(inits[q.input[0]])
    return None, None


def _macs(node, w: np.ndarray, shapes: dict) -> int:
    out = shapes.get(node.output[0])
    if node.op_type == "ConvTranspose":
        inp = shapes.get(node.input[0])
        return int(np.prod(inp)) * int(np.prod(w.shape[1:])) if inp else 0
    if not out:
        return 0
    if node.op_type == "Conv":
        return int(np.prod(out)) * int(np.prod(w.shape[1:]))
    if node.op_type == "Gemm":
        trans_b = any(a.name == "transB" and a.i for a in node.attribute)
        return int(np.prod(out)) * int(w.shape[1] if trans_b else w.shape[0])
    return int(np.prod(out)) * int(w.shape[-2])


def _shapes(m: onnx.ModelProto) -> dict:
    inf = shape_inference.infer_shapes(m)
    out = {}
    for vi in list(inf.graph.value_info) + list(inf.graph.output) + list(inf.graph.input):
        dims = [d.dim_value if d.HasField("dim_value") else 1 for d in vi.type.tensor_type.shape.dim]
        out[vi.name] = dims
    return out


def measure(out_dir: Path, report: dict, state) -> dict:
    """Figures for one zoo row from the export folder, its report and the quantized state."""
    m = onnx.load(str(out_dir / "model.int8.onnx"))
    g = m.graph
    prod = {o: n for n in g.node for o in n.output}
    inits = {t.name: t for t in g.initializer}
    shapes = _shapes(m)
    weighted = int8 = 0
    macs_all = macs_int8 = 0
    floats = []
    fp16_modules = {n for n in state.model.layout.layers if n not in state.model.layout.int8}
    for node in g.node:
        if node.op_type not in WEIGHTED:
            continue
        kind, w = _weight(g, prod, inits, node)
        if kind is None:
            continue  # activation x activation (attention): no weight to quantize
        weighted += 1
        macs = _macs(node, w, shapes)
        macs_all += macs
        if kind == "int8":
            int8 += 1
            macs_int8 += macs
        else:
            scope = node.name.strip("/").split("/")
            why = ("kept FP16 by the selection" if any(f.endswith(scope[-2] if len(scope) > 1 else "") for f in fp16_modules)
                   else "not an nn.Conv2d/ConvTranspose2d/Linear module (functional op)")
            floats.append((node.name, why))
    findings = lint(m)
    layers = report.get("parity_layers", {})
    replay = [_num(r["torch_vs_ort_replay_db"]) for r in layers.get("layers", [])]
    replay = [v for v in replay if v is not None]
    torch_q = layers.get("torch_int8_vs_fp32_sqnr_db", {})
    return {
        "weighted": weighted, "int8": int8, "int8_share": int8 / max(weighted, 1), "float_layers": floats,
        "gmacs": macs_all / 1e9, "int8_macs_share": macs_int8 / max(macs_all, 1),
        "lint_errors": sum(f.severity == Severity.ERROR for f in findings),
        "lint_warnings": sum(f.severity == Severity.WARNING for f in findings),
        "parity_ok": layers.get("first_disagreement") is None and not (layers.get("unmatched") and layers.get("unclaimed")),
        "first_disagreement": layers.get("first_disagreement") or (layers.get("unmatched") or [None])[0],
        "layer_rows": len(layers.get("layers", [])),
        "worst_replay_db": min(replay) if replay else None,
        "ort_vs_fp32_db": _num(report["accuracy"]["int8_vs_fp32_sqnr_db"]["worst_db"]),
        "torch_vs_fp32_db": _num(torch_q.get("worst_db")),
        "strong_written": (out_dir / "model.int8.strong.onnx").exists(),  # only after its noise check passed
        "adds_path": adds_path(report.get("notes", [])),
    }
