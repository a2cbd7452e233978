"""Pure helpers of benchmarks/ptq_trees.py and benchmarks/lint_third_party.py, on tiny hand-built graphs."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))

import lint_third_party  # noqa: E402
import ptq_trees  # noqa: E402

from quantkit.exporter.lint import Finding, Severity  # noqa: E402


def _conv(name: str, x: str, out_ch: int, in_ch: int = 4) -> tuple[onnx.NodeProto, onnx.TensorProto]:
    w = numpy_helper.from_array(np.ones((out_ch, in_ch, 1, 1), np.float32), f"{name}.w")
    return helper.make_node("Conv", [x, w.name], [f"{name}.y"], name=name), w


def _detector() -> onnx.ModelProto:
    """x -> stem Conv -> Relu -> {cls Conv(1 ch) -> Sigmoid -> scores, reg Conv(4 ch) -> Softmax -> Conv-free
    decode (Mul) -> boxes}; plus a mid Conv whose output feeds another Conv (never 'final')."""
    stem, w0 = _conv("stem", "x", 4, 3)
    relu = helper.make_node("Relu", ["stem.y"], ["r"], name="relu")
    mid, w1 = _conv("mid", "r", 4)
    cls, w2 = _conv("cls_pred", "mid.y", 1)
    sig = helper.make_node("Sigmoid", ["cls_pred.y"], ["scores"], name="sigmoid")
    reg, w3 = _conv("reg_pred", "r", 4)
    soft = helper.make_node("Softmax", ["reg_pred.y"], ["s"], name="softmax", axis=1)
    two = numpy_helper.from_array(np.array(2.0, np.float32), "two")
    mul = helper.make_node("Mul", ["s", "two"], ["boxes"], name="decode")
    graph = helper.make_graph(
        [stem, relu, mid, cls, sig, reg, soft, mul], "det",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("boxes", TensorProto.FLOAT, [1]),
         helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1])],
        [w0, w1, w2, w3, two])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return model


def test_head_tail_nodes_are_final_convs_and_everything_after_them():
    names = ptq_trees.head_tail_nodes(_detector())
    # graph order; stem/relu/mid all have a Conv downstream, so they stay quantizable
    assert names == ["cls_pred", "sigmoid", "reg_pred", "softmax", "decode"]


def test_head_tail_nodes_of_a_plain_chain_is_the_last_conv_onward():
    a, wa = _conv("a", "x", 4, 3)
    b, wb = _conv("b", "a.y", 4)
    relu = helper.make_node("Relu", ["b.y"], ["y"], name="relu")
    g = helper.make_graph([a, b, relu], "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])], [wa, wb])
    assert ptq_trees.head_tail_nodes(helper.make_model(g)) == ["b", "relu"]


@pytest.mark.parametrize("base,value,points", [(0.5, 0.497, 0.3), (0.5, 0.51, -1.0), (0.4321, 0.4321, 0.0)])
def test_drop_points_is_100x_the_difference(base, value, points):
    assert ptq_trees.drop_points(base, value) == pytest.approx(points, abs=1e-9)


def test_single_output_convs_finds_the_one_class_conv_only():
    assert lint_third_party.single_output_convs(_detector()) == {"cls_pred"}


def test_summarize_counts_per_rule_and_severity_in_rule_order():
    f = [Finding("float-head", Severity.ERROR, "q1", "m1", "fix-h"),
         Finding("int8-zero-point", Severity.ERROR, "z1", "m2", "fix-z"),
         Finding("float-head", Severity.WARNING, "q2", "m3", "fix-h"),
         Finding("int8-zero-point", Severity.ERROR, "z2", "m4", "fix-z")]
    rows = lint_third_party.summarize(f)
    assert [(r[0], r[1], r[2]) for r in rows] == [("int8-zero-point", "error", 2), ("float-head", "error", 1),
                                                  ("float-head", "warning", 1)]
    assert rows[0][3].startswith("`z1`") and rows[0][4] == "fix-z"
