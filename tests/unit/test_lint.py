"""Q/DQ lint: one graph that breaks each rule (finding present) and its clean counterpart (finding absent)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto
from qdq_graphs import GraphBuilder, float_cnn, residual_cnn

from quantkit.exporter.lint import RULES, Severity, format_findings, lint


def rules_of(model, strong=False, severity=None):
    return {f.rule for f in lint(model, strong=strong) if severity is None or f.severity == severity}


def findings_for(model, rule, strong=False):
    return [f for f in lint(model, strong=strong) if f.rule == rule]


def conv_graph(*, zp=None, zp_dtype=np.int8, scale=0.05, w_axis=0, per_channel=True, quant_weight=True,
               quant_data=True, act_per_channel=False):
    g = GraphBuilder(1)
    x = g.input("x", [1, 4, 6, 6])
    w = g.rng.standard_normal((8, 4, 3, 3)).astype(np.float32)
    if quant_data:
        if act_per_channel:
            s = g.init("scale", np.full(4, scale, np.float32))
            z = g.init("zp", np.zeros(4, np.int8))
            (q,) = g.node("QuantizeLinear", [x, s, z], "q", axis=1)
            (x,) = g.node("DequantizeLinear", [q, s, z], "dq", axis=1)
        else:
            x = g.qdq(x, scale, zp=zp, zp_dtype=zp_dtype)
    wn = g.qweight(w, axis=w_axis, per_channel=per_channel) if quant_weight else g.init("w", w)
    (y,) = g.node("Conv", [x, wn], "conv", pads=[1] * 4)
    g.output("y", y, [1, 8, 6, 6])
    return g.model(check=False)


def test_clean_reference_graph_has_no_findings():
    model = residual_cnn()
    assert lint(model) == []
    assert "no findings" in format_findings([])


def test_every_rule_is_registered():
    assert {"int8-zero-point", "scale-finite-positive", "weight-per-channel", "activation-per-tensor",
            "weighted-both-inputs", "residual-add", "concat-shared-scale", "float-head", "dangling-qdq",
            "float-bias", "strong-fp16-scale", "strong-opset"} <= set(RULES)


@pytest.mark.parametrize("zp,dtype", [(3, np.int8), (128, np.uint8), (0, np.uint8)])
def test_zero_point_must_be_int8_zero(zp, dtype):
    found = findings_for(conv_graph(zp=zp, zp_dtype=dtype), "int8-zero-point")
    assert found and all(f.severity == Severity.ERROR for f in found)
    assert {f.node for f in found} >= {n.name for n in conv_graph().graph.node if n.op_type == "QuantizeLinear"}
    assert findings_for(conv_graph(zp=0, zp_dtype=np.int8), "int8-zero-point") == []


def test_quantize_without_zero_point_is_uint8():
    g = GraphBuilder()
    x = g.input("x", [1, 4])
    s = g.init("s", np.array(0.1, np.float32))
    (q,) = g.node("QuantizeLinear", [x, s], "q")
    (dq,) = g.node("DequantizeLinear", [q, s], "dq")
    g.output("y", dq, [1, 4])
    found = findings_for(g.model(), "int8-zero-point")
    assert [f.node for f in found] == ["q_2"]
    assert "uint8" in found[0].message


@pytest.mark.parametrize("scale", [0.0, -0.1, float("nan"), float("inf")])
def test_scale_must_be_finite_positive(scale):
    assert "scale-finite-positive" in rules_of(conv_graph(scale=scale))
    assert "scale-finite-positive" not in rules_of(conv_graph(scale=0.1))


def test_conv_weight_per_channel_on_axis_0():
    wrong = findings_for(conv_graph(w_axis=1), "weight-per-channel")
    assert len(wrong) == 1 and wrong[0].severity == Severity.ERROR and "axis=0" in wrong[0].fix
    per_tensor = findings_for(conv_graph(per_channel=False), "weight-per-channel")
    assert len(per_tensor) == 1 and per_tensor[0].severity == Severity.WARNING
    assert findings_for(conv_graph(), "weight-per-channel") == []


@pytest.mark.parametrize("trans_b,axis,ok", [(1, 0, True), (1, 1, False), (0, 1, True), (0, 0, False)])
def test_gemm_weight_axis_follows_trans_b(trans_b, axis, ok):
    g = GraphBuilder()
    x = g.qdq(g.input("x", [2, 6]), 0.05)
    w = g.rng.standard_normal((5, 6) if trans_b else (6, 5)).astype(np.float32)
    (y,) = g.node("Gemm", [x, g.qweight(w, axis=axis)], "gemm", transB=trans_b)
    g.output("y", y, [2, 5])
    assert (findings_for(g.model(), "weight-per-channel") == []) == ok


def test_matmul_weight_axis_is_last():
    for axis, ok in [(1, True), (0, False)]:
        g = GraphBuilder()
        x = g.qdq(g.input("x", [2, 6]), 0.05)
        w = g.rng.standard_normal((6, 5)).astype(np.float32)
        (y,) = g.node("MatMul", [x, g.qweight(w, axis=axis)], "mm")
        g.output("y", y, [2, 5])
        assert (findings_for(g.model(), "weight-per-channel") == []) == ok


def test_activations_per_tensor():
    assert "activation-per-tensor" in rules_of(conv_graph(act_per_channel=True))
    assert "activation-per-tensor" not in rules_of(conv_graph())


@pytest.mark.parametrize("data,weight", [(True, False), (False, True)])
def test_weighted_layer_needs_both_inputs_quantized(data, weight):
    found = findings_for(conv_graph(quant_data=data, quant_weight=weight), "weighted-both-inputs")
    assert [f.node for f in found] == ["conv_" + str(_conv_index(data, weight))]
    assert findings_for(conv_graph(quant_data=False, quant_weight=False), "weighted-both-inputs") == []
    assert findings_for(conv_graph(), "weighted-both-inputs") == []


def _conv_index(data, weight):
    model = conv_graph(quant_data=data, quant_weight=weight)
    return next(n.name for n in model.graph.node if n.op_type == "Conv").split("_")[1]


def _residual(mode):
    """mode: 'skip' (clean), 'both', 'conv_path' (Q/DQ on conv output, none on skip), 'none_int8'."""
    g = GraphBuilder(2)
    x = g.input("x", [1, 4, 6, 6])
    xq = g.qdq(x, 0.02)
    (h,) = g.node("Relu", [g.conv(xq, 4, 4)])  # skip tensor (float)
    y = g.conv(h, 4, 4)
    a, b = y, h
    if mode in ("skip", "both"):
        b = g.qdq(h, 0.05)
    if mode in ("both", "conv_path"):
        a = g.qdq(y, 0.05)
    (s,) = g.node("Add", [a, b], "add")
    g.output("y", s, [1, 4, 6, 6])
    return g.model()


def test_residual_add_placement():
    assert findings_for(_residual("skip"), "residual-add") == []
    for mode in ("both", "conv_path", "none_int8"):
        found = findings_for(_residual(mode), "residual-add")
        assert len(found) == 1 and found[0].node.startswith("add"), mode
    assert "skip" in findings_for(_residual("conv_path"), "residual-add")[0].fix


@pytest.mark.parametrize("scales,bad", [((0.1, 0.1), False), ((0.1, 0.2), True)])
def test_concat_inputs_share_one_scale(scales, bad):
    g = GraphBuilder()
    a, b = g.input("a", [1, 2, 4, 4]), g.input("b", [1, 3, 4, 4])
    (c,) = g.node("Concat", [g.qdq(a, scales[0]), g.qdq(b, scales[1])], "concat", axis=1)
    g.output("y", c, [1, 5, 4, 4])
    assert bool(findings_for(g.model(), "concat-shared-scale")) == bad


def test_no_qdq_between_head_conv_and_sigmoid():
    g = GraphBuilder()
    x = g.input("x", [1, 4, 6, 6])
    logits = g.conv(x, 4, 3, k=1)
    (r,) = g.node("Reshape", [g.qdq(logits, 0.1), g.init("shape", np.array([1, 3, 36]))])
    (s,) = g.node("Sigmoid", [r], "sigmoid")
    g.output("scores", s, [1, 3, 36])
    found = findings_for(g.model(), "float-head")
    assert len(found) == 1 and found[0].severity == Severity.ERROR and "Sigmoid" in found[0].message
    assert findings_for(residual_cnn(), "float-head") == []  # Q/DQ in front of the head conv is fine


def test_dangling_q_and_orphan_dq():
    g = GraphBuilder()
    x = g.input("x", [1, 4])
    s = g.init("s", np.array(0.1, np.float32))
    z = g.init("z", np.array(0, np.int8))
    (q,) = g.node("QuantizeLinear", [x, s, z], "q")
    (c,) = g.node("Cast", [q], "cast", to=TensorProto.FLOAT)
    (dq,) = g.node("DequantizeLinear", [g.node("Cast", [c], "c8", to=TensorProto.INT8)[0], s, z], "dq")
    g.output("y", dq, [1, 4])
    found = {f.node for f in findings_for(g.model(), "dangling-qdq")}
    assert found == {"q_3", "dq_6"}
    assert findings_for(conv_graph(), "dangling-qdq") == []


@pytest.mark.parametrize("scale,severity", [(1e-9, Severity.ERROR), (1e-5, Severity.WARNING),
                                            (7e4, Severity.ERROR), (0.01, None)])
def test_strong_mode_scales_fp16_representable(scale, severity):
    model = conv_graph(scale=scale)
    model.opset_import[0].version = 19
    found = findings_for(model, "strong-fp16-scale", strong=True)
    assert [f.severity for f in found] == ([severity] * 2 if severity else [])  # the Q and the DQ
    assert findings_for(model, "strong-fp16-scale", strong=False) == []


def test_strong_mode_needs_opset_19():
    model = conv_graph()
    assert "strong-opset" in rules_of(model, strong=True)
    assert "strong-opset" not in rules_of(model)
    model.opset_import[0].version = 19
    assert "strong-opset" not in rules_of(model, strong=True)


def test_format_names_node_and_fix():
    text = format_findings(lint(conv_graph(zp=5)))
    assert "ERROR" in text and "[int8-zero-point]" in text and "fix:" in text and "q_" in text


def _ort_quantize(tmp_path, **kwargs) -> onnx.ModelProto:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            rng = np.random.default_rng(0)
            self._it = iter([{"x": rng.standard_normal((1, 4, 8, 8)).astype(np.float32)} for _ in range(4)])

        def get_next(self):
            return next(self._it, None)

    src, dst = tmp_path / "f.onnx", tmp_path / "q.onnx"
    onnx.save(float_cnn(), src)
    quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ, **kwargs)
    return onnx.load(dst)


def test_onnxruntime_quantize_static_placement_problems_are_found(tmp_path):
    """ORT's QDQ output is meant for ORT, not TensorRT: the lint must say why."""
    from onnxruntime.quantization import QuantType

    found = lint(_ort_quantize(tmp_path))
    rules = {f.rule for f in found}
    # asymmetric activations (non-zero zero points), both Add inputs quantized, head conv output and
    # Sigmoid output quantized, per-tensor weights, int32 biases
    assert {"int8-zero-point", "residual-add", "float-head", "weight-per-channel", "float-bias"} <= rules
    assert any("non-zero" in f.message for f in found if f.rule == "int8-zero-point")
    assert any(f.node == "add_8" and "both" in f.message for f in found)
    assert any("Sigmoid" in f.message for f in found if f.rule == "float-head")
    uint8 = lint(_ort_quantize(tmp_path, activation_type=QuantType.QUInt8, per_channel=True))
    assert any("UINT8" in f.message for f in uint8 if f.rule == "int8-zero-point")
    assert "weight-per-channel" not in {f.rule for f in uint8}  # per_channel=True uses axis 0


def test_torch_legacy_export_of_fake_quant_modules():
    """The exporter's starting point (torch fake-quant, opset 17) lints clean; a quantized head output does not."""
    import warnings

    from qdq_graphs import torch_fakequant_cnn

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clean = torch_fakequant_cnn()
        bad = torch_fakequant_cnn(quantize_head_output=True)
    assert sum(n.op_type == "QuantizeLinear" for n in clean.graph.node) == 6  # 3 activations + 3 weights
    assert lint(clean) == []
    found = lint(bad)
    assert [f.rule for f in found] == ["float-head"] and "Sigmoid" in found[0].message


def test_single_output_channel_per_channel_weight_is_not_flagged():
    """A 1-class head conv has one output channel: a [1]-shaped scale on axis 0 is per-channel, not per-tensor."""
    import torch
    from torch import nn

    from quantkit.calibrate.driver import apply_calibration, run_calibration
    from quantkit.calib_methods import MethodSettings
    from quantkit.exporter.lint import lint
    from quantkit.exporter.onnx_export import export_onnx
    from quantkit.exporter.passes import finalize_int8
    from quantkit.quant.insert import insert_quantizers

    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 1, 1)).eval()
    q, _ = insert_quantizers(model)
    st = MethodSettings(method="max")
    batches = [torch.rand(2, 3, 8, 8)]
    apply_calibration(q, run_calibration(q, batches, st, progress=False), st)
    findings = lint(finalize_int8(export_onnx(q, batches[0][:1])))
    assert not [f for f in findings if f.rule == "weight-per-channel"], findings


def test_residual_add_as_the_last_op_is_not_a_head_output():
    """A model ending in conv(x) + x: the skip input's Q/DQ fuses into the conv epilogue (issue 17: quantkit's
    own export of such a model failed its own lint). A Q/DQ straight on an output is still an error."""
    g = GraphBuilder()
    x = g.input("x", [1, 4, 6, 6])
    (h,) = g.node("Relu", [g.conv(x, 4, 4)])
    skip = g.qdq(h, 0.02)
    w = (g.rng.standard_normal((4, 4, 3, 3)) / 6).astype(np.float32)
    (y,) = g.node("Conv", [skip, g.qweight(w), g.init("b", np.zeros(4, np.float32))], "conv", pads=[1] * 4)
    (a,) = g.node("Add", [y, skip], "add")
    g.output("y", a, [1, 4, 6, 6])
    assert findings_for(g.model(), "float-head") == []
    g2 = GraphBuilder()
    x = g2.input("x", [1, 4, 6, 6])
    (a,) = g2.node("Add", [g2.qdq(g2.conv(x, 4, 4), 0.1), x], "add")  # Q/DQ on the conv output itself
    g2.output("y", a, [1, 4, 6, 6])
    assert [f.severity for f in findings_for(g2.model(), "float-head")] == [Severity.ERROR]
