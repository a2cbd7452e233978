"""The bundled detector through both routes, scored (issue 22): a torch-route export with one layer kept FP16
(a hybrid calibration.cache), then its FP32 model.onnx through the ONNX route with that cache, --calib and
--eval; `quantkit eval` on both folders. 16 calibration and 8 held-out images keep it to about a minute of CPU."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from quantkit.cli import main
from quantkit.paths import BUNDLED_CALIBRATION, BUNDLED_EVAL, ROOT

pytestmark = pytest.mark.skipif(not (ROOT / "quantkit" / "assets" / "tree_detector.pt").is_file(),
                                reason="bundled weights missing: run python benchmarks/train_trees.py")

FP16_LAYER = "neck.neck2.blocks.conv3.conv"  # its input (a Concat output) feeds no other quantized layer
FP16_NODE = "/neck/neck2/blocks/conv3/conv/Conv"
SMALL = ("--set", "calibration.max_images=16", "--set", "evaluation.max_images=8")


def run(*args):
    res = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return res.exit_code, res.output


@pytest.fixture(scope="module")
def routes(tmp_path_factory):
    root = tmp_path_factory.mktemp("routes")
    torch_out, onnx_out = root / "torch", root / "onnx"
    code, text = run("export", "--out", torch_out, "--full-int8", "--skip", FP16_LAYER, "--no-cache", "-q", *SMALL,
                     "--set", "ptq.bias_correction=false")
    assert code == 0, text
    code, text = run("export", torch_out / "model.onnx", "--trt-calib-cache", torch_out / "calibration.cache",
                     "--calib", BUNDLED_CALIBRATION, "--eval", BUNDLED_EVAL, "--out", onnx_out, "-q", *SMALL)
    assert code == 0, text  # it failed: "has no scale for 1 quantized tensor(s) ... calibrate with --calib"
    return torch_out, onnx_out


def test_hybrid_cache_keeps_the_sources_fp16_layer(routes):
    torch_out, onnx_out = routes
    report = json.loads((onnx_out / "report.json").read_text())
    info = report["calibration"]["trt_cache"]
    assert info["kept_fp16_nodes"] == [FP16_NODE] and info["calibrated"] == []
    assert next(r for r in report["layers"] if r["name"] == FP16_NODE)["precision"] == "fp16"
    src = json.loads((torch_out / "report.json").read_text())
    assert report["model"]["int8_layers"] == src["model"]["int8_layers"]  # the same split as the source


def test_eval_on_both_routes_agrees(routes, tmp_path):
    """Oracle: the FP32 network is the same on both routes, so its held-out mAP must be too (same decode + NMS);
    the torch row exists only on the torch route."""
    torch_out, onnx_out = routes
    got = {}
    for name, folder in (("torch", torch_out), ("onnx", onnx_out)):
        js = tmp_path / f"{name}.json"
        code, text = run("eval", folder, "--json", js, "--max-images", 8)
        assert code == 0, text
        got[name] = json.loads(js.read_text())
        recorded = json.loads((folder / "report.json").read_text())["evaluation"]
        assert got[name]["int8_onnx"] == recorded["int8_onnx"] and got[name]["fp32_onnx"] == recorded["fp32_onnx"]
    t, o = got["torch"], got["onnx"]
    assert t["fp32_onnx"]["num_images"] == o["fp32_onnx"]["num_images"] == 8
    assert abs(t["fp32_onnx"]["map50_95"] - o["fp32_onnx"]["map50_95"]) < 1e-3
    assert abs(t["fp32_torch"]["map50_95"] - t["fp32_onnx"]["map50_95"]) < 1e-3
    assert o["fp32_torch"]["map50_95"] is None and "no torch model" in o["fp32_torch"]["note"]
    assert abs(o["drop_map50_95_points"]) < 1.0  # INT8 within a point of FP32 on this detector
