"""TensorRT calibration cache text: writing, reading, bit-exact round trip, and the errors that name the fix."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from onnx import helper, numpy_helper, TensorProto

from quantkit.calibrate.trt_cache import (activation_scales, amax_from_cache, cache_text_for, format_cache,
                                         hex_to_scale, parse_cache, read_cache, scale_to_hex)
from quantkit.errors import UsageError


def test_known_line_decodes_to_one_over_127():
    # 0x3c010204 is float32(1/127): the scale of amax 1.0 (checked with struct, independently of numpy)
    _, scales = parse_cache("TRT-8601-EntropyCalibration2\nimages: 3c010204\n")
    assert scales["images"] == struct.unpack(">f", bytes.fromhex("3c010204"))[0]
    assert np.float32(scales["images"]) == np.float32(1.0) / np.float32(127.0)
    assert scale_to_hex(np.float32(1.0) / np.float32(127.0)) == "3c010204"


def test_round_trip_is_bit_exact(tmp_path):
    rng = np.random.default_rng(0)
    scales = {f"/layer{i}/Relu_output_0": float(np.float32(v)) for i, v in enumerate(rng.uniform(1e-4, 2.0, 200))}
    scales["input.1"] = float(np.float32(1e-30))  # tiny and odd names survive too
    path = tmp_path / "calibration.cache"
    path.write_text(format_cache(scales))
    header, back = read_cache(path)
    assert header == "TRT-8601-EntropyCalibration2"
    assert set(back) == set(scales)
    for k, v in scales.items():
        assert np.float32(back[k]).tobytes() == np.float32(v).tobytes(), k
    assert format_cache(back) == path.read_text()  # deterministic bytes


@pytest.mark.parametrize("text, match", [
    ("", "not a TensorRT calibration cache"),
    ("hello\nx: 3c010204\n", "first line"),
    ("TRT-8601-EntropyCalibration2\nx = 3c010204\n", "line 2"),
    ("TRT-8601-EntropyCalibration2\nx: 7fc00000\n", "finite and > 0"),  # NaN
    ("TRT-8601-EntropyCalibration2\n", "no tensor lines"),
])
def test_malformed_caches_are_usage_errors(text, match):
    with pytest.raises(UsageError, match=match):
        parse_cache(text)


def test_names_matching_nothing_list_the_closest():
    graph = {"/conv1/Relu_output_0", "/conv2/Relu_output_0", "images"}
    scales = {"/conv1/Relu_output_0": 0.01, "/conv2/Relu_outptu_0": 0.02}
    with pytest.raises(UsageError, match=r"match no tensor.*closest: /conv2/Relu_output_0"):
        amax_from_cache(scales, ["/conv1/Relu_output_0"], graph)
    with pytest.raises(UsageError, match="another model"):
        amax_from_cache({"/other/x": 0.1}, ["images"], graph)
    with pytest.raises(UsageError, match="no scale for 1 quantized tensor"):
        amax_from_cache({"images": 0.1}, ["images", "/conv1/Relu_output_0"], graph)
    amax = amax_from_cache({"images": 0.1, "/conv2/Relu_output_0": 0.5}, ["images"], graph)
    assert amax == {"images": float(np.float32(0.1) * np.float32(127))}


def test_activation_scales_of_a_qdq_graph_skip_weights():
    s = np.float32(0.05)
    inits = [numpy_helper.from_array(np.array(s), "s"), numpy_helper.from_array(np.array(0, np.int8), "z"),
             numpy_helper.from_array(np.ones((2, 3, 1, 1), np.int8), "w_int8"),
             numpy_helper.from_array(np.full(2, 0.1, np.float32), "ws"),
             numpy_helper.from_array(np.zeros(2, np.int8), "wz")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w_int8", "ws", "wz"], ["wd"], axis=0),
             helper.make_node("Conv", ["xd", "wd"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    assert activation_scales(m) == {"x": float(s)}
    assert cache_text_for(m) == f"TRT-8601-EntropyCalibration2\nx: {scale_to_hex(s)}\n"
    assert hex_to_scale(scale_to_hex(s)) == float(s)
