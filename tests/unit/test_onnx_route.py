"""The FP32-ONNX route: validation errors, clean-up, placement, calibration, Q/DQ graph, end-to-end export."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx.version_converter
import pytest
import torch
from onnx import numpy_helper

from quantkit.calibrate.histogram import HistogramCollector
from quantkit.calib_methods import CalibMethod, MethodSettings
from quantkit.errors import QuantkitError, UsageError
from quantkit.sqnr import sqnr_db
from quantkit.exporter import parity
from quantkit.exporter.lint import lint
from quantkit.onnxin.load import cleanup, load_onnx, verify_cleanup
from quantkit.onnxin.placement import build_layout
from quantkit.onnxin.qdq import activation_scale, insert_qdq, simulate_qdq, weight_scales
from quantkit.recipe import load_recipe
from onnx_toy import bn_graph, toy_data, toy_onnx


@pytest.fixture(scope="module")
def toy_path(tmp_path_factory):
    p = tmp_path_factory.mktemp("onnx") / "toy.onnx"
    p.write_bytes(toy_onnx(fold=False))
    return p


@pytest.fixture(scope="module")
def toy_npy(tmp_path_factory):
    p = tmp_path_factory.mktemp("data") / "calib.npy"
    np.save(p, toy_data(16))
    return p


# ------------------------------------------------------------------------------------------------ validation


def test_not_onnx_is_a_usage_error(tmp_path):
    p = tmp_path / "notes.onnx"
    p.write_text("this is a text file, not a model\n")
    with pytest.raises(UsageError, match="not an ONNX model|not a valid ONNX"):
        load_onnx(p)


def test_free_spatial_dims_need_input_size(tmp_path):
    p = tmp_path / "dyn.onnx"
    p.write_bytes(toy_onnx(dynamic_hw=True))
    with pytest.raises(UsageError, match="--input-size"):
        load_onnx(p)
    loaded = load_onnx(p, (24, 32))
    assert loaded.input_shape[1:] == [3, 24, 32] and loaded.size == (24, 32)


def test_input_size_contradicting_fixed_dims(toy_path):
    with pytest.raises(UsageError, match="contradicts"):
        load_onnx(toy_path, (32, 32))


def test_unsupported_opset_names_the_fix(tmp_path):
    m = bn_graph()
    m.opset_import[0].version = 6  # 7-12 are converted (test_onnx_hostile); older ones onnxruntime cannot check
    p = tmp_path / "old.onnx"
    onnx.save(m, p)
    with pytest.raises(UsageError, match="opset 6.*convert_version"):
        load_onnx(p)


def test_cleanup_folds_batchnorm_and_keeps_outputs():
    m = bn_graph()
    cleaned = cleanup(m)
    assert "BatchNormalization" not in {n.op_type for n in cleaned.graph.node}
    x = toy_data(2, 8)
    assert verify_cleanup(m, cleaned, [x]) >= 80.0


# ------------------------------------------------------------------------------------------------- placement


def test_placement_follows_the_torch_route_rules(toy_path):
    model = cleanup(load_onnx(toy_path).model)
    layout = build_layout(model)
    c = layout.candidates
    assert {n: v.op_type for n, v in c.items()} == {
        "/c1/Conv": "Conv", "/c2/Conv": "Conv", "/Add": "Add", "/c3/Conv": "Conv",
        "/up/ConvTranspose": "ConvTranspose", "/fc/Gemm": "Gemm"}
    assert c["/up/ConvTranspose"].weight[1] == 1 and c["/fc/Gemm"].weight[1] == 0  # output-channel axes
    # residual: relu(c2(a)) + a -> the skip (a, input 1) is quantized, the conv path is not
    assert c["/Add"].act_input == (1, "/Relu_output_0")
    assert any("/MatMul" in n for n in layout.notes)  # Softmax -> MatMul decode stays float


def test_skip_pattern_matching_nothing_lists_closest(toy_path):
    model = cleanup(load_onnx(toy_path).model)
    with pytest.raises(UsageError, match="closest: .*/c3/Conv"):
        build_layout(model, skip=("/c3/Convv",))
    layout = build_layout(model, skip=("/c3/*", "type:Gemm"))
    assert "/c3/Conv" not in layout.int8 and "/fc/Gemm" not in layout.int8 and "/c2/Conv" in layout.int8


# --------------------------------------------------------------------------------------------- Q/DQ graph


def _qdq(toy_path, skip=()):
    model = cleanup(load_onnx(toy_path).model)
    layout = build_layout(model, skip=skip)
    rng = np.random.default_rng(3)
    amax = {t: float(rng.uniform(0.5, 4.0)) for t in layout.activation_tensors()}
    scales = {t: float(activation_scale(a)) for t, a in amax.items()}
    ws = weight_scales(model, layout)
    return model, layout, scales, ws, insert_qdq(model, layout, scales, ws), simulate_qdq(model, layout, scales, ws)


def test_qdq_graph_structure_and_lint(toy_path):
    model, layout, scales, ws, q, _ = _qdq(toy_path)
    assert lint(q) == []
    inits = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
    nodes = list(q.graph.node)
    acts = [n for n in nodes if n.op_type == "QuantizeLinear"]
    assert {n.input[0] for n in acts} == set(layout.activation_tensors())
    assert len(acts) == len(layout.int8)  # one pair per INT8 layer input, as the torch route exports
    for n in acts:
        assert inits[n.input[2]].dtype == np.int8 and inits[n.input[2]] == 0
        assert np.float32(inits[n.input[1]]) == np.float32(scales[n.input[0]])
    by_name = {n.name: n for n in nodes}
    producer = {o: n for n in nodes for o in n.output}
    for name, want_axis in (("/c1/Conv", 0), ("/up/ConvTranspose", 1), ("/fc/Gemm", 0)):
        node = by_name[name]
        dq = producer[node.input[1]]
        assert dq.op_type == "DequantizeLinear" and inits[dq.input[0]].dtype == np.int8
        assert next(a.i for a in dq.attribute if a.name == "axis") == want_axis
        if len(node.input) > 2:  # bias stays a float initializer
            assert inits[node.input[2]].dtype == np.float32
    add = by_name["/Add"]
    assert producer[add.input[1]].op_type == "DequantizeLinear" and producer[add.input[0]].op_type == "Relu"
    concat = by_name["/Concat"]
    assert all(producer[i].op_type != "DequantizeLinear" for i in concat.input)  # Q/DQ after it: one scale
    assert producer[by_name["/MatMul"].input[0]].op_type == "Softmax"
    assert producer[by_name["/Sigmoid"].input[0]].op_type == "Gemm"


def test_qdq_graph_matches_onnx_reference_and_float_twin(toy_path):
    from onnx.reference import ReferenceEvaluator

    _, _, _, _, q, sim = _qdq(toy_path)
    x = toy_data(2)
    got = parity.run_session(parity.session(q, 1), x)
    # onnx.reference implements DequantizeLinear from opset 19 on: convert (semantics unchanged for int8)
    ref = ReferenceEvaluator(onnx.version_converter.convert_version(q, 19)).run(None, {"images": x})
    twin = parity.run_session(parity.session(sim, 1), x)
    for a, b, c in zip(got, ref, twin):
        assert sqnr_db([b], [a]) > 60.0  # onnx.reference (independent Q/DQ kernels) agrees with onnxruntime
        assert sqnr_db([c], [a]) > 60.0


def test_skipped_layer_has_no_qdq(toy_path):
    *_, q, _ = _qdq(toy_path, skip=("/c3/Conv",))
    producer = {o: n for n in q.graph.node for o in n.output}
    c3 = next(n for n in q.graph.node if n.name == "/c3/Conv")
    assert producer[c3.input[0]].op_type == "Concat" and c3.input[1] == "c3.weight"
    assert lint(q) == []


# ------------------------------------------------------------------------------------------------ calibration


def test_calibration_histogram_equals_the_torch_collector(toy_path, toy_npy, tmp_path):
    """The graph input is a calibrated tensor: its histogram must equal a collector fed the same batches."""
    from quantkit.data.calib import open_calibration_data
    from quantkit.data.preprocess import Preprocess
    from quantkit.onnxin.calibrate import calibrate_onnx_cached

    model = cleanup(load_onnx(toy_path).model)
    data = open_calibration_data(str(toy_npy), Preprocess(size=(16, 16)), 8)
    settings = MethodSettings(CalibMethod.ENTROPY)
    kw = dict(cache_path=str(tmp_path / "c.json"), use_cache=True, progress=False)
    res, info = calibrate_onnx_cached(model, b"toy", ["images", "/Relu_output_0"], [], data, settings, **kw)
    assert not info["hit"]
    col = HistogramCollector(num_bins=settings.num_bins)
    for b in data.batches():
        col.collect(b)
    expected = col.all_amax(percentiles=(99.9, 99.99, 99.999), settings=settings)
    assert res.tensors["images"] == expected
    assert res.num_samples == 16
    again, info2 = calibrate_onnx_cached(model, b"toy", ["images", "/Relu_output_0"], [], data, settings, **kw)
    assert info2["hit"] and again.tensors == res.tensors
    _, info3 = calibrate_onnx_cached(model, b"other model", ["images", "/Relu_output_0"], [], data, settings, **kw)
    assert not info3["hit"]  # keyed by the ONNX bytes


# ------------------------------------------------------------------------------------------------ end to end


def _recipe(model, npy, *extra):
    return load_recipe(None, [f"model.name='{model}'", f"calibration.data='{npy}'", "calibration.use_cache=false",
                              *extra])


def test_export_end_to_end_and_trt_cache_round_trip(toy_path, toy_npy, tmp_path):
    from quantkit.calibrate.trt_cache import read_cache
    from quantkit.pipeline_onnx import run_onnx_export

    out = tmp_path / "out"
    # every node INT8 (each scale is in the cache), no bias correction (a cache carries scales, not biases)
    full = ("sensitivity.min_int8_share=null", "ptq.bias_correction=false")
    res = run_onnx_export(_recipe(toy_path, toy_npy, *full), out, progress=False)
    for f in ("model.onnx", "model.int8.onnx", "model.int8.strong.onnx", "calibration.json", "calibration.cache",
              "build_engine.sh", "report.json", "manifest.json"):
        assert (out / f).is_file(), f
    assert res.report["lint"]["model.int8.onnx"] == [] and res.report["lint"]["model.int8.strong.onnx"] == []
    assert res.report["parity"]["int8_onnx_vs_torch_fakequant"]["worst_db"] in ("inf",) or \
        res.report["parity"]["int8_onnx_vs_torch_fakequant"]["worst_db"] > 30
    cal = json.loads((out / "calibration.json").read_text())
    _, scales = read_cache(out / "calibration.cache")
    assert set(scales) == set(cal["amax"])
    # importing the cache reproduces the INT8 graph byte for byte (same scales, bit-exact)
    out2 = tmp_path / "out2"
    run_onnx_export(_recipe(toy_path, toy_npy, *full), out2, progress=False, trt_cache=str(out / "calibration.cache"))
    assert (out2 / "model.int8.onnx").read_bytes() == (out / "model.int8.onnx").read_bytes()
    assert (out2 / "calibration.cache").read_bytes() == (out / "calibration.cache").read_bytes()


def test_cache_for_another_model_is_refused_and_nothing_written(toy_path, toy_npy, tmp_path):
    from quantkit.pipeline_onnx import run_onnx_export

    cache = tmp_path / "other.cache"
    cache.write_text("TRT-8601-EntropyCalibration2\n/yolo/conv1/Conv_output_0: 3c010204\ninput_1: 3c010204\n")
    out = tmp_path / "out"
    with pytest.raises(QuantkitError, match="another model") as e:
        run_onnx_export(_recipe(toy_path, toy_npy), out, progress=False, trt_cache=str(cache))
    assert e.value.exit_code == 2 and not out.exists()


# ------------------------------------------------------------------------------------------- planted faults


def test_cleanup_check_catches_a_changed_graph():
    from quantkit.errors import ExportError

    m = bn_graph()
    bad = cleanup(m)
    w = next(t for t in bad.graph.initializer if numpy_helper.to_array(t).ndim == 4)
    w.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w) * 1.01, w.name))  # a 1% folding error
    with pytest.raises(ExportError, match="clean-up"):
        verify_cleanup(m, bad, [toy_data(2, 8)])


def test_parity_catches_a_wrong_weight_axis(toy_path, toy_npy):
    """A per-channel weight scale applied on the wrong axis must fail the export's parity check."""
    from quantkit.errors import ExportError
    from quantkit.onnxin import quantize_onnx
    from quantkit.pipeline_onnx import check_parity

    res = quantize_onnx(str(toy_path), str(toy_npy), _recipe(toy_path, toy_npy))
    batches = [toy_data(4, seed=5)]
    check_parity(res, batches, 30.0, 1)  # as built: passes
    g = res.int8.graph
    dq = next(n for n in g.node if n.op_type == "DequantizeLinear" and n.input[0].startswith("c2.weight"))
    scale = next(t for t in g.initializer if t.name == dq.input[1])
    s = numpy_helper.to_array(scale)
    scale.CopyFrom(numpy_helper.from_array(s[::-1].copy(), scale.name))  # scales of other channels
    with pytest.raises(ExportError, match="disagrees"):
        check_parity(res, batches, 30.0, 1)


@pytest.mark.parametrize("gate, quantized", [("Sigmoid", True), ("Softmax", False)])
def test_a_learned_layer_after_a_sigmoid_is_quantized_a_softmax_projection_is_not(gate, quantized):
    """basic-pitch feeds its sigmoid note posteriorgram into learned convs (5 % of its MACs): an activation in
    [0, 1] like any other, quantized as the torch route quantizes every conv. A Softmax (through a Reshape)
    feeding a weighted op is a DFL-style decode projection: it stays float, with a note."""
    from onnx import TensorProto, helper

    r = np.random.default_rng(0)
    w1 = numpy_helper.from_array(r.normal(size=(4, 3, 3, 3)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(r.normal(size=(2, 4, 1, 1)).astype(np.float32), "w2")
    shape = numpy_helper.from_array(np.array([1, 4, 6, 6], np.int64), "shape")
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], name="c1", pads=[0, 0, 0, 0]),
             helper.make_node(gate, ["a"], ["g"], name="gate", **({"axis": 1} if gate == "Softmax" else {})),
             helper.make_node("Reshape", ["g", "shape"], ["r"], name="reshape"),
             helper.make_node("Conv", ["r", "w2"], ["y"], name="c2")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 6, 6])], [w1, w2, shape])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    layout = build_layout(model)
    assert ("c2" in layout.candidates) is quantized
    assert any(n.startswith("c2: Conv reads decoded scores") for n in layout.notes) is not quantized
