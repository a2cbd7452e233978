"""Real TensorRT engines from small Q/DQ graphs: outputs vs onnxruntime by SQNR, layer precisions as intended.

Runs only where tensorrt and a CUDA GPU exist (see conftest.py); the engine target is 'any' because the test
GPU need not be a T4.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from qdq_graphs import residual_cnn

from quantkit.engine.builder import build_engine, import_tensorrt
from quantkit.engine.config import STRONG_FROM, plan_build
from quantkit.engine.inspect import compare_precisions, engine_layers, intended_precisions
from quantkit.exporter.dynamic import make_batch_dynamic
from quantkit.exporter.strong import to_strongly_typed

pytestmark = pytest.mark.gpu


def sqnr_db(ref, test):
    ref, test = np.asarray(ref, np.float64), np.asarray(test, np.float64)
    return 10 * np.log10(np.sum(ref**2) / max(np.sum((ref - test) ** 2), 1e-30))


def run_engine(engine_bytes: bytes, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run an engine with the name-based I/O API (TensorRT 8.5+), torch CUDA tensors as buffers."""
    import torch

    trt = import_tensorrt()
    engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(engine_bytes)
    context = engine.create_execution_context()
    for name, value in feeds.items():
        context.set_input_shape(name, value.shape)
    buffers, outputs = {}, {}
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(name)))
        if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
            buffers[name] = torch.from_numpy(np.ascontiguousarray(feeds[name].astype(dtype))).cuda()
        else:
            shape = tuple(context.get_tensor_shape(name))
            buffers[name] = torch.empty(shape, dtype=getattr(torch, {"float32": "float32", "float16": "float16",
                                                                     "int32": "int32"}[dtype.name]), device="cuda")
            outputs[name] = buffers[name]
        context.set_tensor_address(name, buffers[name].data_ptr())
    stream = torch.cuda.current_stream()
    assert context.execute_async_v3(stream.cuda_stream)
    stream.synchronize()
    return {k: v.float().cpu().numpy() for k, v in outputs.items()}


@pytest.fixture(scope="module")
def graph():
    return residual_cnn(seed=7, c=32, hw=32)


@pytest.fixture(scope="module")
def feeds():
    return {"x": np.random.default_rng(0).standard_normal((1, 4, 32, 32)).astype(np.float32)}


def _check(model, onnx_path, plan, out_dir, feeds, ref_model):
    onnx.save(model, onnx_path)
    engine_path = build_engine(onnx_path, plan, out_dir, out_dir / "timing.cache")
    assert (out_dir / "timing.cache").stat().st_size > 0
    engine_bytes = engine_path.read_bytes()
    got = run_engine(engine_bytes, feeds)
    ref = dict(zip([o.name for o in ref_model.graph.output],
                   ort.InferenceSession(ref_model.SerializeToString()).run(None, feeds)))
    for name, value in ref.items():
        assert sqnr_db(value, got[name]) >= 30.0, name
    intended = intended_precisions(model)
    assert intended and set(intended.values()) == {"int8"}
    assert compare_precisions(engine_layers(engine_bytes), intended) == []


def test_weak_typed_engine_matches_onnxruntime(tmp_path, graph, feeds):
    trt = import_tensorrt()
    version = trt.__version__.split("+")[0]
    if tuple(int(p) for p in version.split(".")[:2]) >= (11, 0):
        pytest.skip(f"TensorRT {version} has no weak typing")
    dyn = make_batch_dynamic(graph)
    plan = plan_build(version, False, "any", "1:2:4", [], input_name="x", chw=(4, 32, 32))
    batch3 = {"x": np.concatenate([feeds["x"], -feeds["x"], 0.5 * feeds["x"]])}  # inside the profile, not opt
    _check(dyn, tmp_path / "m_qdq.onnx", plan, tmp_path, batch3, dyn)


def test_strongly_typed_engine_matches_onnxruntime(tmp_path, graph, feeds):
    trt = import_tensorrt()
    version = trt.__version__.split("+")[0]
    if tuple(int(p) for p in version.split(".")[:2]) < STRONG_FROM:
        pytest.skip(f"TensorRT {version} < 10.12: strongly typed build not planned")
    plan = plan_build(version, True, "any", None, [], input_name="x", chw=(4, 32, 32))
    _check(to_strongly_typed(graph), tmp_path / "m_strong.onnx", plan, tmp_path, feeds, graph)


def test_onnx_route_engine_flag_builds_and_reports(tmp_path):
    """`quantkit export model.onnx --engine` (ONNX route) builds model.engine with the torch route's builder and
    records the build in report.json (needs TensorRT and a GPU; the export targets any GPU here)."""
    import json
    import sys
    from pathlib import Path

    from click.testing import CliRunner

    from quantkit.cli import main

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
    from onnx_toy import toy_data, toy_onnx

    (tmp_path / "toy.onnx").write_bytes(toy_onnx())
    np.save(tmp_path / "calib.npy", toy_data(16))
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["export", str(tmp_path / "toy.onnx"), "--calib", str(tmp_path / "calib.npy"),
                                    "--engine", "--target", "any", "--out", str(out), "--no-cache"])
    assert res.exit_code == 0, res.output
    assert (out / "model.engine").stat().st_size > 0 and (out / "engine.layers.json").is_file()
    assert json.loads((out / "report.json").read_text())["engine"]
