"""`quantkit export model.onnx` (the FP32-ONNX route) and calibration.cache on both routes, through the CLI."""

from __future__ import annotations

import json

import onnx
import pytest
from click.testing import CliRunner

from quantkit.cli import main
from quantkit.calibrate.trt_cache import activation_scales, read_cache


def run(*args):
    res = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return res.exit_code, res.output


@pytest.fixture(scope="module")
def torch_export(user_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("torch") / "out"
    code, text = run("export", "--model", user_model["spec"], "--weights", user_model["weights"], "--calib",
                     user_model["npy"], "--out", str(out), "--no-cache", "--full-int8")  # every scale in the cache
    assert code == 0, text
    return out


def test_torch_route_writes_a_trt_cache_of_its_qdq_scales(torch_export):
    header, scales = read_cache(torch_export / "calibration.cache")
    assert header == "TRT-8601-EntropyCalibration2"
    assert scales == activation_scales(onnx.load(torch_export / "model.int8.onnx"))
    fp32 = onnx.load(torch_export / "model.onnx")
    names = {i.name for i in fp32.graph.input} | {o for n in fp32.graph.node for o in n.output}
    assert set(scales) <= names  # the names TensorRT's parser gives model.onnx's tensors


def test_onnx_route_end_to_end_and_cache_import(torch_export, user_model, tmp_path):
    out = tmp_path / "onnx"
    code, text = run("export", str(torch_export / "model.onnx"), "--calib", user_model["npy"], "--out", str(out),
                     "--no-cache")
    assert code == 0, text
    report = json.loads((out / "report.json").read_text())
    assert report["route"] == "onnx" and all(not f for f in report["lint"].values()), report["lint"]
    chosen = next((s["measured"]["fp16_layers"] for s in report.get("passes", {}).get("steps", [])
                   if s["name"] == "fp16_choice" and s["kept"]), [])  # the default's FP16 choice, when kept
    assert report["model"]["int8_layers"] + len(chosen) == report["model"]["quantizable_layers"] > 0
    torch_report = json.loads((torch_export / "report.json").read_text())
    assert report["model"]["quantizable_layers"] == torch_report["model"]["quantizable_layers"]  # same rules
    # the same T4 cost model on both routes (torch hooks there, the graph's shapes here): the same FP16 estimate
    ms, torch_ms = report["latency_estimate"]["ms"], torch_report["latency_estimate"]["ms"]
    assert ms["FP16 (no INT8)"] == pytest.approx(torch_ms["FP16 (no INT8)"], rel=0.1)
    assert ms["FP16 (no INT8)"] > ms["full INT8"] > 0
    # the torch route's cache on the ONNX route: the same activation scales, bit for bit. (This model's
    # `relu6(conv(y)) + x` is the one residual whose skip the routes pick differently: the torch route does not
    # see through functional relu6, the ONNX route sees a Clip after a conv; both Adds are quantized.)
    out2 = tmp_path / "imported"
    code, text = run("export", str(torch_export / "model.onnx"), "--trt-calib-cache",
                     str(torch_export / "calibration.cache"), "--calib", user_model["npy"], "--out", str(out2))
    assert code == 0, text
    imported, original = read_cache(out2 / "calibration.cache")[1], read_cache(torch_export / "calibration.cache")[1]
    assert imported.items() <= original.items() and len(imported) >= len(original) - 1


def test_bad_onnx_inputs_exit_2_and_write_nothing(torch_export, user_model, tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))  # the unit tests' toy ONNX builder
    from onnx_toy import toy_onnx

    bad = tmp_path / "notes.onnx"
    bad.write_text("not a model")
    dyn = tmp_path / "dyn.onnx"
    dyn.write_bytes(toy_onnx(dynamic_hw=True))
    other = tmp_path / "other.cache"
    other.write_text("TRT-8601-EntropyCalibration2\n/model.0/conv/Conv_output_0: 3c010204\n")
    from quantkit.paths import BUNDLED_CALIBRATION

    cases = [((str(bad), "--calib", user_model["npy"]), "not an ONNX model"),
             ((str(dyn), "--calib", str(BUNDLED_CALIBRATION)), "--input-size"),  # a .npy's H, W would fix them
             ((str(torch_export / "model.onnx"), "--trt-calib-cache", str(other)), "another model")]
    for k, (args, message) in enumerate(cases):
        out = tmp_path / f"out{k}"
        code, text = run("export", *args, "--out", str(out), "--no-cache")
        assert code == 2 and message in text, text
        assert not out.exists()


def test_bundled_detector_at_opset_12_with_free_dims(tmp_path):
    """ONNX as people have it (issue 22): the bundled detector exported by torch at opset 12 with free N/H/W.
    The route converts it to opset 13, fixes H/W from --input-size, and model.onnx still computes what the
    torch module computes."""
    import numpy as np
    import onnxruntime as ort
    import torch

    from quantkit.data.images import list_images, load_image
    from quantkit.data.preprocess import Preprocess, preprocess_image
    from quantkit.sqnr import sqnr_db
    from quantkit.models.bundled import tree_detector
    from quantkit.paths import BUNDLED_CALIBRATION

    net = tree_detector().eval()
    src = tmp_path / "det12.onnx"
    torch.onnx.export(net, torch.zeros(1, 3, 320, 320), src, input_names=["images"], opset_version=12, dynamo=False,
                      dynamic_axes={"images": {0: "N", 2: "H", 3: "W"}})
    out = tmp_path / "out"
    code, text = run("export", str(src), "--calib", str(BUNDLED_CALIBRATION), "--input-size", "320x320", "--set",
                     "calibration.max_images=8", "--out", str(out), "--no-cache")
    assert code == 0, text
    report = json.loads((out / "report.json").read_text())
    assert report["model"]["opset_converted_from"] == 12 and report["model"]["opset"] == 13
    assert all(not f for f in report["lint"].values()), report["lint"]
    assert report["accuracy"]["int8_vs_fp32_sqnr_db"]["worst_db"] > 15
    tile = list_images(BUNDLED_CALIBRATION)[-1]  # not among the 8 calibration images
    x = preprocess_image(load_image(tile), Preprocess(size=(320, 320)))[0][None].astype(np.float32)
    got = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, {"images": x})
    with torch.no_grad():
        want = net(torch.from_numpy(x))
    want = [t.numpy() for t in (want if isinstance(want, (tuple, list)) else [want])]
    assert len(got) == len(want) and sqnr_db(want, got) > 60


def test_sigterm_during_onnx_calibration_leaves_nothing(tmp_path):
    """A real `kill -TERM` mid-run on the ONNX route (the test hook signals after the first calibration batch):
    exit 143, no output folder, nothing left under TMPDIR (onnxruntime's telemetry `.ses` file included), the
    model file untouched."""
    import hashlib
    import os
    import subprocess
    import sys
    from pathlib import Path

    import numpy as np

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))  # the unit tests' toy ONNX builder
    from onnx_toy import toy_data, toy_onnx

    def sha(f):
        return hashlib.sha256(f.read_bytes()).hexdigest()

    p = tmp_path / "toy.onnx"
    p.write_bytes(toy_onnx(fold=False))
    npy = tmp_path / "c.npy"
    np.save(npy, toy_data(16))
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, TMPDIR=str(tmp), QUANTKIT_TEST_INTERRUPT="calibration:TERM", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    before = sha(p)
    res = subprocess.run([sys.executable, "-m", "quantkit", "export", str(p), "--calib", str(npy), "--out",
                          str(tmp_path / "out"), "--no-cache", "--set", "calibration.batch_size=4"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 143, res.stderr[-2000:]
    assert "interrupted (SIGTERM)" in res.stderr
    assert not (tmp_path / "out").exists() and list(tmp.iterdir()) == [] and sha(p) == before
    assert sorted(f.name for f in tmp_path.iterdir()) == ["c.npy", "tmp", "toy.onnx"]  # no staging folder either


def test_onnx_route_nms_and_engine(tmp_path):
    """--nms and --engine on the ONNX route (issue 22): the torch route's NMS writer appends NMS to the INT8 graph
    (run here in onnxruntime), build_engine.sh builds that graph; a graph without boxes/scores outputs, and
    --engine without TensorRT, are exit 2 before calibrating, with nothing written."""
    import numpy as np
    import onnxruntime as ort
    import torch

    from quantkit.data.images import list_images, load_image
    from quantkit.data.preprocess import Preprocess, preprocess_image
    from quantkit.models.bundled import tree_detector
    from quantkit.paths import BUNDLED_CALIBRATION

    net = tree_detector().eval()
    src = tmp_path / "det.onnx"
    torch.onnx.export(net, torch.zeros(1, 3, 320, 320), src, input_names=["images"], output_names=["boxes", "scores"],
                      opset_version=17, dynamo=False)
    common = ("--calib", str(BUNDLED_CALIBRATION), "--set", "calibration.max_images=8", "--no-cache")
    out = tmp_path / "out"
    code, text = run("export", str(src), *common, "--nms", "--out", str(out))
    assert code == 0, text
    assert "model.int8.nms.onnx" in (out / "build_engine.sh").read_text()
    tile = list_images(BUNDLED_CALIBRATION)[-1]
    x = preprocess_image(load_image(tile), Preprocess(size=(320, 320)))[0][None].astype(np.float32)
    sess = ort.InferenceSession(str(out / "model.int8.nms.onnx"), providers=["CPUExecutionProvider"])
    got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"images": x})))
    assert set(got) == {"num_detections", "detection_boxes", "detection_scores", "detection_classes"}
    n = int(got["num_detections"][0, 0])
    k = got["detection_boxes"].shape[1]
    assert 0 <= n <= k and np.all(got["detection_classes"][0, n:] == -1)
    # the NMS graph's kept boxes are boxes of the INT8 graph itself (same Q/DQ network underneath)
    int8 = ort.InferenceSession(str(out / "model.int8.onnx"), providers=["CPUExecutionProvider"])
    boxes = int8.run(["boxes"], {"images": x})[0][0]
    for b in got["detection_boxes"][0, :n]:
        assert np.min(np.abs(boxes - b).max(axis=1)) < 1e-3
    for k, (extra, message) in enumerate([(("--nms",), "boxes [B,A,4]"), (("--engine",), "tensorrt is not importable")]):
        bad_src = src if extra == ("--engine",) else tmp_path / "cls.onnx"
        if bad_src != src:
            import sys
            from pathlib import Path

            sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
            from onnx_toy import toy_onnx

            bad_src.write_bytes(toy_onnx())
        bad_out = tmp_path / f"bad{k}"
        code, text = run("export", str(bad_src), *common, *extra, "--out", str(bad_out))
        assert code == 2 and message in text and "calibrating" not in text.lower().replace("calibrating on", ""), text
        assert not bad_out.exists()


def _fuse_input_tensor(graph_path) -> str:
    """The float tensor the user model's ``fuse`` conv reads through its Q/DQ pair in an INT8 graph."""
    g = onnx.load(graph_path).graph
    by_out = {o: n for n in g.node for o in n.output}
    conv = next(n for n in g.node if n.op_type == "Conv" and n.name.startswith("/fuse/"))
    dq = by_out[conv.input[0]]
    return by_out[dq.input[0]].input[0]


def test_torch_route_hybrid_trt_cache_keeps_or_calibrates_the_layer_without_a_scale(torch_export, user_model,
                                                                                     tmp_path):
    """`--trt-calib-cache` on the torch route (issue 22). A cache without the ``fuse`` conv's input scale:
    by default that layer stays FP16 (oracle: the full cache with ``--skip fuse`` gives the same INT8 graph byte
    for byte); with calibration.trt_cache_missing=calibrate it stays INT8 with the amax calibrated from --calib
    (oracle: the full-INT8 export's own mse amax for it); every other scale is the cache's, bit for bit."""
    from quantkit.calibrate.trt_cache import format_cache

    header, scales = read_cache(torch_export / "calibration.cache")
    tensor = _fuse_input_tensor(torch_export / "model.int8.onnx")
    hybrid = tmp_path / "hybrid.cache"
    hybrid.write_text(format_cache({k: v for k, v in scales.items() if k != tensor}, header))
    model = ("--model", user_model["spec"], "--weights", user_model["weights"], "--calib", user_model["npy"],
             "--no-cache")
    code, text = run("export", *model, "--trt-calib-cache", str(hybrid), "--out", str(tmp_path / "fp16"))
    assert code == 0, text
    report = json.loads((tmp_path / "fp16" / "report.json").read_text())
    assert report["calibration"]["trt_cache"]["kept_fp16_nodes"] == ["fuse"]
    assert report["calibration"]["trt_cache"]["kept_fp16_tensors"] == [tensor]
    assert [r["name"] for r in report["layers"] if r["precision"] != "int8"] == ["fuse"]
    code, text = run("export", *model, "--trt-calib-cache", str(torch_export / "calibration.cache"), "--skip", "fuse",
                     "--out", str(tmp_path / "ref"))
    assert code == 0, text
    assert (tmp_path / "fp16" / "model.int8.onnx").read_bytes() == (tmp_path / "ref" / "model.int8.onnx").read_bytes()

    code, text = run("export", *model, "--trt-calib-cache", str(hybrid), "--set", "calibration.trt_cache_missing=calibrate",
                     "--set", "calibration.method=mse", "--out", str(tmp_path / "cal"))
    assert code == 0, text
    report = json.loads((tmp_path / "cal" / "report.json").read_text())
    assert report["calibration"]["trt_cache"]["calibrated"] == [tensor]
    assert all(r["precision"] == "int8" for r in report["layers"])
    got = read_cache(tmp_path / "cal" / "calibration.cache")[1]
    assert {k: v for k, v in got.items() if k != tensor} == {k: v for k, v in scales.items() if k != tensor}
    want = json.loads((torch_export / "calibration.json").read_text())["all_methods"]["fuse._input_quantizer"]["mse"]
    assert got[tensor] * 127 == pytest.approx(want, rel=1e-5)


def test_torch_route_trt_cache_errors_exit_2_and_write_nothing(torch_export, user_model, tmp_path):
    other = tmp_path / "other.cache"
    other.write_text("TRT-8601-EntropyCalibration2\n/model.0/conv/Conv_output_0: 3c010204\n")
    model = ("--model", user_model["spec"], "--weights", user_model["weights"], "--no-cache")
    cases = [((*model, "--calib", user_model["npy"], "--trt-calib-cache", str(other)), "another model"),
             ((*model, "--trt-calib-cache", str(torch_export / "calibration.cache")), "still needs --calib")]
    for k, (args, message) in enumerate(cases):
        out = tmp_path / f"out{k}"
        code, text = run("export", *args, "--out", str(out))
        assert code == 2 and message in text, text
        assert not out.exists()
