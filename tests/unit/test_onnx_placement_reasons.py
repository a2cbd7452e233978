"""Every weighted op the ONNX route leaves float has a reason (issue 23's coverage rule, on this route): a
MatMul whose constant weight is its first input (W @ x) was counted by the graph coverage but skipped silently by
the placement, so report.json listed it as "float with no reason"."""

from __future__ import annotations

import json

import numpy as np
import onnx
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from quantkit.pipeline_onnx import run_onnx_export
from quantkit.recipe import load_recipe


def _graph() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    nodes = [h.make_node("Conv", ["images", "wc"], ["c"], pads=[1, 1, 1, 1]), h.make_node("Relu", ["c"], ["r"]),
             h.make_node("GlobalAveragePool", ["r"], ["g"]), h.make_node("Flatten", ["g"], ["f"]),
             h.make_node("MatMul", ["f", "w"], ["m"], name="x_at_w"), h.make_node("Relu", ["m"], ["m2"]),
             h.make_node("Transpose", ["m2"], ["m2t"], perm=[1, 0]),
             h.make_node("MatMul", ["w2", "m2t"], ["o0"], name="w_at_x"),
             h.make_node("Transpose", ["o0"], ["out"], perm=[1, 0])]
    inits = [nh.from_array((rng.normal(size=(32, 3, 3, 3)) * 0.2).astype(np.float32), "wc"),
             nh.from_array(rng.normal(size=(32, 16)).astype(np.float32), "w"),
             nh.from_array(rng.normal(size=(8, 16)).astype(np.float32), "w2")]
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("images", T.FLOAT, [1, 3, 16, 16])],
                     [h.make_tensor_value_info("out", T.FLOAT, [1, 8])], inits)
    return h.make_model(g, opset_imports=[h.make_opsetid("", 17)])


def test_a_weight_first_matmul_stays_float_with_a_reason(tmp_path):
    model, npy = tmp_path / "m.onnx", tmp_path / "c.npy"
    onnx.save(_graph(), model)
    np.save(npy, np.random.default_rng(1).random((16, 3, 16, 16)).astype(np.float32))
    recipe = load_recipe(None, [f"model.name='{model}'", f"calibration.data='{npy}'", "calibration.use_cache=false",
                                "sensitivity.min_int8_share=null"])
    run_onnx_export(recipe, tmp_path / "out", progress=False)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    cov = report["coverage"]
    assert cov["unexplained"] == [] and cov["error"] is None
    why = {o["node"]: o["reason"] for o in cov["float_ops"]}
    assert set(why) == {"w_at_x"} and "first input (W @ x)" in why["w_at_x"]
    assert cov["int8_ops"] == 2  # the conv and x @ W
