"""`--trt-calib-cache` with a hybrid cache (issue 22): quantkit's default export keeps some layers FP16, so its
calibration.cache has no line for their input tensors. Default: those nodes stay FP16; with
calibration.trt_cache_missing=calibrate they are calibrated from --calib. The report says which."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from quantkit.calibrate.trt_cache import format_cache, read_cache
from quantkit.errors import QuantkitError
from quantkit.pipeline_onnx import run_onnx_export
from quantkit.recipe import load_recipe
from onnx_toy import toy_data, toy_onnx


def _recipe(model, npy, *extra):  # every node INT8, biases as they are, unless the test says
    return load_recipe(None, [f"model.name='{model}'", f"calibration.data='{npy}'", "calibration.use_cache=false",
                              "sensitivity.min_int8_share=null", "ptq.bias_correction=false", *extra])


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """(model, .npy, full export folder, a hybrid cache without one tensor, the node reading it)."""
    root = tmp_path_factory.mktemp("hy")
    model, npy = root / "toy.onnx", root / "calib.npy"
    model.write_bytes(toy_onnx(fold=False))
    np.save(npy, toy_data(16))
    out = root / "full"
    # method fixed: --trt-calib-cache's missing tensors are calibrated with calibration.method's rule (auto: its
    # starting rule max; a per-network choice is not measured for a few tensors), so the oracle uses that rule
    res = run_onnx_export(_recipe(model, npy, "calibration.method=max"), out, progress=False)
    header, scales = read_cache(out / "calibration.cache")
    layers = res.report["layers"]
    readers: dict[str, list[str]] = {}
    for row in layers:
        readers.setdefault(row["input_tensor"], []).append(row["name"])
    # a tensor read by exactly one quantized node, not the graph input: the "FP16 layer" of a hybrid source
    tensor = next(t for t, nodes in readers.items() if len(nodes) == 1 and t in scales and t != "images")
    hybrid = root / "hybrid.cache"
    hybrid.write_text(format_cache({k: v for k, v in scales.items() if k != tensor}, header))
    return model, npy, out, hybrid, tensor, readers[tensor][0]


def _qdq_inputs(path) -> set[str]:
    return {n.input[0] for n in onnx.load(path).graph.node if n.op_type == "QuantizeLinear"}


def test_default_keeps_the_node_without_a_scale_fp16(full, tmp_path):
    """Oracle: the full cache imported with that node skipped gives the same INT8 graph byte for byte."""
    model, npy, _, hybrid, tensor, node = full
    out = tmp_path / "o2"
    res = run_onnx_export(_recipe(model, npy), out, progress=False, trt_cache=str(hybrid))
    ref = tmp_path / "ref"
    run_onnx_export(_recipe(model, npy, f"quantization.skip=['{node}']"), ref, progress=False,
                    trt_cache=str(full[2] / "calibration.cache"))
    assert (out / "model.int8.onnx").read_bytes() == (ref / "model.int8.onnx").read_bytes()
    assert tensor not in _qdq_inputs(out / "model.int8.onnx")
    row = next(r for r in res.report["layers"] if r["name"] == node)
    assert row["precision"] == "fp16"
    info = res.report["calibration"]["trt_cache"]
    assert info["kept_fp16_nodes"] == [node] and info["kept_fp16_tensors"] == [tensor] and info["calibrated"] == []
    assert tensor not in info["from_cache"] and set(info["from_cache"]) == set(read_cache(hybrid)[1]) & set(
        info["from_cache"])
    assert json.loads((out / "calibration.json").read_text())["trt_cache"] == info
    assert any("kept 1 node(s) FP16" in n and node in n for n in res.report["notes"])
    assert node in (out / "build_engine.sh").read_text()  # --layerPrecisions keeps it FP16 in TensorRT too


def test_calibrate_mode_calibrates_the_missing_tensor(full, tmp_path):
    """Oracle: the full calibration's scale for that tensor (same data, method and graph: bit for bit); every
    other scale is the cache's."""
    model, npy, full_out, hybrid, tensor, node = full
    out = tmp_path / "o3"
    res = run_onnx_export(_recipe(model, npy, "calibration.trt_cache_missing=calibrate"), out, progress=False,
                          trt_cache=str(hybrid))
    assert read_cache(out / "calibration.cache")[1] == read_cache(full_out / "calibration.cache")[1]
    assert (out / "model.int8.onnx").read_bytes() == (full_out / "model.int8.onnx").read_bytes()
    info = res.report["calibration"]["trt_cache"]
    assert info["calibrated"] == [tensor] and info["kept_fp16_nodes"] == []


def test_calibrate_mode_without_data_and_bad_mode_are_exit_2(full, tmp_path):
    model, npy, _, hybrid, _, _ = full
    out = tmp_path / "o4"
    with pytest.raises(QuantkitError, match="--calib") as e:
        run_onnx_export(load_recipe(None, [f"model.name='{model}'", "calibration.trt_cache_missing=calibrate"]),
                        out, progress=False, trt_cache=str(hybrid))
    assert e.value.exit_code == 2 and not out.exists()
    with pytest.raises(QuantkitError, match="trt_cache_missing") as e:
        _recipe(model, npy, "calibration.trt_cache_missing=int8")
    assert e.value.exit_code == 2


def test_cache_with_no_scale_for_any_quantized_tensor_is_exit_2(full, tmp_path):
    """Every quantized tensor missing would leave nothing INT8: refused, not a silently FP16 'INT8' export."""
    model, npy, _, _, _, _ = full
    cache = tmp_path / "outputs_only.cache"
    cache.write_text(format_cache({"boxes": 0.01}))  # a real tensor of the graph, but no quantized layer's input
    out = tmp_path / "o5"
    with pytest.raises(QuantkitError, match="nothing would be INT8") as e:
        run_onnx_export(_recipe(model, npy), out, progress=False, trt_cache=str(cache))
    assert e.value.exit_code == 2 and not out.exists()
