"""The ONNX route's per-node error table (report.json ``layer_errors``, layer_sqnr.png, calibration.png), checked
against onnx.reference: each node's output in model.int8.onnx vs model.onnx, and each INT8 node's input against
that input quantized with the scale calibration.cache gives it, recomputed here with another evaluator."""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import pytest
from onnx.reference import ReferenceEvaluator

from quantkit.calibrate.trt_cache import read_cache
from quantkit.pipeline_onnx import run_onnx_export
from quantkit.recipe import load_recipe
from onnx_toy import toy_data, toy_onnx

pytest.importorskip("matplotlib")


def _sqnr(ref: np.ndarray, got: np.ndarray) -> float:
    ref, got = ref.astype(np.float64), got.astype(np.float64)
    noise = float(np.sum((ref - got) ** 2))
    return math.inf if noise == 0 else 10 * math.log10(float(np.sum(ref ** 2)) / noise)


def _values(path, tensors: list[str], x: np.ndarray) -> dict[str, np.ndarray]:
    model = onnx.load(path)
    for o in model.opset_import:  # onnx.reference implements QuantizeLinear / DequantizeLinear from opset 19 on
        if o.domain in ("", "ai.onnx"):
            o.version = max(o.version, 19)
    model.graph.output.extend(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None) for t in tensors)
    ev = ReferenceEvaluator(model)
    runs = [ev.run(tensors, {"images": x[i:i + 1]}) for i in range(len(x))]
    return {t: np.concatenate([r[k] for r in runs]) for k, t in enumerate(tensors)}


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    root = tmp_path_factory.mktemp("le")
    model, npy = root / "toy.onnx", root / "calib.npy"
    model.write_bytes(toy_onnx())
    x = toy_data(8)  # every sample measured (the table uses up to 8)
    np.save(npy, x)
    out = root / "out"
    recipe = load_recipe(None, [f"model.name='{model}'", f"calibration.data='{npy}'", "calibration.use_cache=false"])
    run_onnx_export(recipe, out, progress=False)
    return out, x


def test_node_rows_match_onnx_reference(export):
    out, x = export
    report = json.loads((out / "report.json").read_text())
    rows = report["layer_errors"]["layers"]
    fp32 = onnx.load(out / "model.onnx")
    nodes = {n.name: n for n in fp32.graph.node}
    assert [r["name"] for r in rows] == [r["name"] for r in report["layers"]]  # one row per quantizable node
    assert report["layer_errors"]["num_samples"] == len(x)
    scales = read_cache(out / "calibration.cache")[1]
    outs = [nodes[r["name"]].output[0] for r in rows]
    ins = [nodes[r["name"]].input[0] for r in rows]
    want_f = _values(out / "model.onnx", list(dict.fromkeys(outs + ins)), x)
    want_q = _values(out / "model.int8.onnx", outs, x)
    int8_rows = 0
    for r, o, i in zip(rows, outs, ins):
        got = r["output_sqnr_db"]
        want = _sqnr(want_f[o], want_q[o])
        assert (got == "inf" and math.isinf(want)) or got == pytest.approx(want, abs=0.1), r["name"]
        if r["precision"] == "int8" and r["type"] != "Add":
            int8_rows += 1
            s = np.float32(scales[i])
            fq = np.clip(np.round(want_f[i] / s), -128, 127) * s
            assert r["input_quant_sqnr_db"] == pytest.approx(_sqnr(want_f[i], fq), abs=0.05), r["name"]
    assert int8_rows >= 3
    assert {p["file"] for p in report["plots"]} >= {"layer_sqnr.png", "calibration.png"}
    for name in ("layer_sqnr.png", "calibration.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    worst = report["layer_errors"]["worst_tensors"]
    assert worst and all(w["name"] in scales for w in worst)  # tensors named as the graph (and the cache) names them


def test_report_md_says_what_the_onnx_route_checked(export):
    """No torch model on this route: report.md names the float Q/DQ reference, and no reparameterization."""
    out, _ = export
    md = (out / "report.md").read_text()
    assert "| float Q/DQ reference vs onnxruntime |" in md and "torch fake-quant" not in md
    assert "reparameterization" not in md and "in the cleaned graph" in md
