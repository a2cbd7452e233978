"""Strongly typed FP16 conversion: parity with the FP32 Q/DQ graph (onnxruntime and onnx.reference), structure,
FP16 range handling."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, numpy_helper
from onnx.reference import ReferenceEvaluator
from qdq_graphs import GraphBuilder, residual_cnn

from quantkit.errors import ExportError
from quantkit.exporter.lint import Severity, lint
from quantkit.exporter.nms import append_nms
from quantkit.exporter.strong import OverflowPolicy, convert_strongly_typed, to_strongly_typed


def sqnr_db(ref, test):
    ref, test = np.asarray(ref, np.float64), np.asarray(test, np.float64)
    return 10 * np.log10(np.sum(ref**2) / max(np.sum((ref - test) ** 2), 1e-30))


def run(model, feeds):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


@pytest.fixture(scope="module")
def pair():
    fp32 = residual_cnn(seed=3, c=16, hw=16)
    return fp32, to_strongly_typed(fp32)


def test_parity_fp32_qdq_vs_strong_fp16(pair):
    fp32, strong = pair
    x = {"x": np.random.default_rng(0).standard_normal((2, 4, 16, 16)).astype(np.float32)[:1]}
    ref = run(fp32, x)
    for outputs in (run(strong, x), ReferenceEvaluator(strong).run(None, x)):
        for r, t in zip(ref, outputs):
            assert t.dtype == np.float32
            assert sqnr_db(r, t) >= 30.0


def test_structure_opset_io_and_qdq_kept(pair):
    fp32, strong = pair
    assert next(o.version for o in strong.opset_import if o.domain == "") == 19
    assert [i.type.tensor_type.elem_type for i in strong.graph.input] == [TensorProto.FLOAT]
    assert {o.type.tensor_type.elem_type for o in strong.graph.output} == {TensorProto.FLOAT}
    count = lambda m, op: sum(n.op_type == op for n in m.graph.node)  # noqa: E731
    for op in ("QuantizeLinear", "DequantizeLinear", "Conv", "Add", "Sigmoid"):
        assert count(strong, op) == count(fp32, op)
    before = {t.name: t for t in fp32.graph.initializer}
    for t in strong.graph.initializer:
        if t.data_type == TensorProto.INT8:  # int8 weights and zero points byte-identical
            assert t.raw_data == before[t.name].raw_data or numpy_helper.to_array(t).tolist() == \
                numpy_helper.to_array(before[t.name]).tolist()
        else:
            assert t.data_type in (TensorProto.FLOAT16, TensorProto.INT64), t.name
    scales = {n.input[1] for n in strong.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")}
    assert {t.data_type for t in strong.graph.initializer if t.name in scales} == {TensorProto.FLOAT16}
    assert lint(strong, strong=True) == []
    inferred = onnx.shape_inference.infer_shapes(strong, strict_mode=True)
    conv_out = {n.output[0] for n in strong.graph.node if n.op_type == "Conv"}
    assert {v.type.tensor_type.elem_type for v in inferred.graph.value_info if v.name in conv_out} == {
        TensorProto.FLOAT16}


def test_deterministic_bytes(pair):
    fp32, strong = pair
    assert to_strongly_typed(fp32).SerializeToString() == strong.SerializeToString()


def test_io_types_fp16_when_asked(pair):
    fp32, _ = pair
    m = to_strongly_typed(fp32, keep_io_types=False)
    assert {v.type.tensor_type.elem_type for v in [*m.graph.input, *m.graph.output]} == {TensorProto.FLOAT16}
    x = np.random.default_rng(1).standard_normal((1, 4, 16, 16)).astype(np.float32)
    out = run(m, {"x": x.astype(np.float16)})
    assert sqnr_db(run(fp32, {"x": x})[0], out[0]) >= 30.0


def _tiny_weight_model():
    """A conv whose channel 0 has tiny weights: its per-channel scale is below FP16's smallest normal."""
    g = GraphBuilder(5)
    x = g.qdq(g.input("x", [1, 2, 5, 5]), 0.02)
    w = g.rng.standard_normal((3, 2, 3, 3)).astype(np.float32)
    w[0] *= 1e-3 / np.abs(w[0]).max()  # amax 1e-3 -> scale 7.9e-6 (subnormal in FP16)
    (y,) = g.node("Conv", [x, g.qweight(w)], "conv", pads=[1] * 4)
    g.output("y", y, [1, 3, 5, 5])
    return g.model(), w


def test_subnormal_weight_scale_raised_and_weights_requantized():
    model, w = _tiny_weight_model()
    assert any(f.severity == Severity.WARNING for f in lint(model, strong=True) if f.rule == "strong-fp16-scale")
    res = convert_strongly_typed(model)
    assert len(res.adjusted_scales) == 1 and "w_scale" in res.adjusted_scales[0]
    assert [f for f in lint(res.model, strong=True) if f.rule == "strong-fp16-scale"] == []
    inits = {t.name: numpy_helper.to_array(t) for t in res.model.graph.initializer}
    dq = next(n for n in res.model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits
              and inits[n.input[0]].dtype == np.int8 and inits[n.input[0]].ndim == 4)
    scale = inits[dq.input[1]].astype(np.float32)
    w_dq = inits[dq.input[0]].astype(np.float32) * scale.reshape(-1, 1, 1, 1)
    # dequantized weights within half a (new) step of the originals, channel by channel
    assert np.all(np.abs(w_dq - w) <= scale.reshape(-1, 1, 1, 1) * 0.5 + np.abs(w) * 1e-2 + 1e-9)
    x = np.random.default_rng(2).standard_normal((1, 2, 5, 5)).astype(np.float32)
    assert sqnr_db(run(model, {"x": x})[0], run(res.model, {"x": x})[0]) >= 30.0


def _const_model(value):
    g = GraphBuilder()
    x = g.input("x", [1, 4])
    (y,) = g.node("Add", [x, g.init("big", np.array([1.0, 2.0, value, 3.0], np.float32))], "add")
    g.output("y", y, [1, 4])
    return g.model()


def test_constant_outside_fp16_refused_or_clamped():
    with pytest.raises(ExportError, match="outside FP16 range"):
        to_strongly_typed(_const_model(1e6))
    res = convert_strongly_typed(_const_model(1e6), overflow=OverflowPolicy.CLAMP)
    assert len(res.clamped_constants) == 1 and "big" in res.clamped_constants[0]
    out = run(res.model, {"x": np.zeros((1, 4), np.float32)})[0]
    assert out[0, 2] == 65504.0


def test_scale_overflowing_fp16_refused():
    g = GraphBuilder()
    g.output("y", g.qdq(g.input("x", [1, 4]), 1e5), [1, 4])
    with pytest.raises(ExportError, match="FP16"):
        to_strongly_typed(g.model())


def test_nms_stays_fp32_behind_casts():
    """NonMaxSuppression takes float32 only: the pass runs it behind Casts and outputs stay exact types."""
    g = GraphBuilder()
    b, s = g.input("b", [1, 30, 4]), g.input("s", [1, 30, 2])
    (b2,) = g.node("Mul", [b, g.init("one", np.array(1.0, np.float32))], "mul")
    g.output("boxes", b2, [1, 30, 4])
    g.output("scores", s, [1, 30, 2])
    model = append_nms(g.model(), score_threshold=0.3, iou_threshold=0.5, top_k=20, max_detections=10)
    res = convert_strongly_typed(model)
    assert res.fp32_nodes == ["nms/selected"]
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 40, (1, 30, 2))
    feeds = {"b": np.concatenate([xy, xy + 10], -1).astype(np.float32),
             "s": rng.uniform(0, 1, (1, 30, 2)).astype(np.float32)}
    ref, got = run(model, feeds), run(res.model, feeds)
    assert [o.dtype for o in got] == [np.int32, np.float32, np.float32, np.int32]
    assert got[0].tolist() == ref[0].tolist()
    np.testing.assert_array_equal(got[3], ref[3])
    np.testing.assert_allclose(got[2], ref[2], atol=1e-3)  # scores pass through FP16


def test_torch_exported_graph_converts_with_constant_node_scales():
    """torch's legacy exporter stores scales as Constant nodes and weights as float Q->DQ: both convert."""
    import warnings

    from qdq_graphs import torch_fakequant_cnn

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fp32 = torch_fakequant_cnn(seed=1)
    strong = to_strongly_typed(fp32)
    assert lint(strong, strong=True) == []
    x = {"x": np.random.default_rng(3).standard_normal((1, 4, 8, 8)).astype(np.float32)}
    assert sqnr_db(run(fp32, x)[0], run(strong, x)[0]) >= 30.0


def test_float_only_slots_and_float_constant_forms():
    """Resize's scales input stays float32; Constant(value_float) and default ConstantOfShape become FP16."""
    g = GraphBuilder()
    x = g.input("x", [1, 2, 3, 3])
    scales = g.init("scales", np.array([1, 1, 2, 2], np.float32))
    (up,) = g.node("Resize", [x, "", scales], "resize", mode="nearest")
    (half,) = g.node("Constant", [], "half", value_float=0.5)
    (zeros,) = g.node("ConstantOfShape", [g.init("shape", np.array([1, 2, 6, 6]))], "zeros")
    (y,) = g.node("Mul", [up, half], "mul")
    (z,) = g.node("Add", [y, zeros], "add")
    g.output("y", z, [1, 2, 6, 6])
    model = g.model()
    strong = to_strongly_typed(model)
    assert {t.name: t.data_type for t in strong.graph.initializer}[scales] == TensorProto.FLOAT
    x = {"x": np.random.default_rng(0).standard_normal((1, 2, 3, 3)).astype(np.float32)}
    np.testing.assert_allclose(run(strong, x)[0], run(model, x)[0], rtol=1e-3, atol=1e-3)


def test_range_over_a_float_shape_stays_float32():
    """A dynamic-batch decode: grid = Range(0, float(W), 1) * stride + x. Range has no float16 type at any opset;
    the conversion keeps it (and the Cast feeding it) float32 and the graph still matches FP32 in onnxruntime."""
    g = GraphBuilder()
    x = g.input("x", ["batch", 2, 3, 40])
    (shape,) = g.node("Shape", [x], "shape")
    (w,) = g.node("Gather", [shape, g.init("three", np.array(3, np.int64))], "w", axis=0)
    (wf,) = g.node("Cast", [w], "wf", to=TensorProto.FLOAT)
    (start,) = g.node("Constant", [], "start", value=numpy_helper.from_array(np.array(0.5, np.float32)))
    (grid,) = g.node("Range", [start, wf, g.init("one", np.array(1.0, np.float32))], "range")
    (scaled,) = g.node("Mul", [grid, g.init("stride", np.array(8.0, np.float32))], "mul")
    (y,) = g.node("Add", [x, scaled], "add")
    g.output("y", y, ["batch", 2, 3, 40])
    model = g.model()
    result = convert_strongly_typed(model)  # ran the full ONNX checker (it refused float16 Range before)
    assert any("range" in n for n in result.fp32_nodes)
    nodes = {n.name: n for n in result.model.graph.node}
    assert next(a.i for a in nodes[[k for k in nodes if k.startswith("wf")][0]].attribute if a.name == "to") \
        == TensorProto.FLOAT
    for batch in (1, 3):
        feed = {"x": np.random.default_rng(batch).standard_normal((batch, 2, 3, 40)).astype(np.float32)}
        np.testing.assert_allclose(run(result.model, feed)[0], run(model, feed)[0], rtol=1e-3, atol=0.05)


def _bn_after_relu(var: float):
    """Relu -> BatchNormalization whose channel 1 has running_var ``var`` (a BN after a ReLU cannot fold)."""
    g = GraphBuilder()
    x = g.input("x", [2, 3, 4, 4])
    (r,) = g.node("Relu", [x], "relu")
    params = [g.init(n, np.asarray(v, np.float32)) for n, v in (("bn.weight", [1.0, 2.0, 0.5]),
                                                                 ("bn.bias", [0.1, -0.2, 0.3]),
                                                                 ("bn.running_mean", [0.5, 300.0, 0.0]),
                                                                 ("bn.running_var", [1.0, var, 4.0]))]
    (y,) = g.node("BatchNormalization", [r, *params], "bn", epsilon=1e-5)
    g.output("y", y, [2, 3, 4, 4])
    return g.model()


def test_bn_running_var_outside_fp16_kept_fp32():
    """keep_fp32: the BN runs FP32 behind Casts on its true parameters; every other policy is checked too."""
    model = _bn_after_relu(2.5e6)
    x = (np.random.default_rng(0).standard_normal((2, 3, 4, 4)) * 3000).astype(np.float32)
    ref = run(model, {"x": x})[0]
    # independent oracle: the BatchNormalization formula in numpy
    var, mean = np.array([1.0, 2.5e6, 4.0]), np.array([0.5, 300.0, 0.0])
    want = (np.maximum(x, 0) - mean[:, None, None]) / np.sqrt(var[:, None, None] + 1e-5) \
        * np.array([1.0, 2.0, 0.5])[:, None, None] + np.array([0.1, -0.2, 0.3])[:, None, None]
    assert sqnr_db(want, ref) > 100
    res = convert_strongly_typed(model, overflow=OverflowPolicy.KEEP_FP32)
    assert len(res.kept_fp32_constants) == 1 and "bn.running_var" in res.kept_fp32_constants[0]
    assert len(res.fp32_nodes) == 1 and res.fp32_nodes[0].startswith("bn")
    inits = {t.name: t.data_type for t in res.model.graph.initializer}
    assert [t for n, t in inits.items() if n.startswith("bn.running_var")] == [TensorProto.FLOAT]
    got = run(res.model, {"x": x})[0]
    assert np.all(np.isfinite(got)) and sqnr_db(want, got) > 50  # FP16 input rounding only
    assert sqnr_db(want[:, 1], got[:, 1]) > 50  # the channel with the huge variance too
    clamped = convert_strongly_typed(model, overflow=OverflowPolicy.CLAMP)
    assert "bn.running_var" in clamped.clamped_constants[0]
    # clipping the variance to 65504 scales channel 1 by sqrt(2.5e6 / 65504) ~ 6x: why it is not the default
    assert sqnr_db(want[:, 1], run(clamped.model, {"x": x})[0][:, 1]) < 10
    with pytest.raises(ExportError, match="export.fp16_overflow"):
        convert_strongly_typed(model, overflow=OverflowPolicy.ERROR)
