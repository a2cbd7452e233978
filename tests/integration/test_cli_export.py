"""`quantkit export` end to end on a user model: artifacts, parity, lint, verify, cache, gates, bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from quantkit.cli import main


def run(*args, env=None):
    res = CliRunner().invoke(main, list(args), catch_exceptions=False, env=env)
    return res.exit_code, res.output


def export_args(m, out, *extra):
    return ["export", "--model", m["spec"], "--weights", m["weights"], "--calib", m["npy"], "--out", str(out), *extra]


@pytest.fixture(scope="module")
def exported(user_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("exp") / "out"
    code, text = run(*export_args(user_model, out))
    assert code == 0, text
    return out, text


def test_export_writes_every_artifact_with_parity(exported):
    out, text = exported
    names = {p.name for p in out.iterdir()}
    assert {"model.onnx", "model.int8.onnx", "model.int8.strong.onnx", "calibration.json", "report.json",
            "report.md", "manifest.json", "recipe.resolved.yaml", "build_engine.sh"} <= names
    report = json.loads((out / "report.json").read_text())
    assert report["parity"]["int8_onnx_vs_torch_fakequant"]["worst_db"] >= 40
    assert report["parity"]["fp32_onnx_vs_torch"]["worst_db"] >= 60
    assert report["model"]["quantizable_layers"] == 10  # 8 conv, fc, 2 adds - 1
    # the default keeps FP16 the layers with the most measured gain per MAC while >= 95 % of the MACs stay INT8
    sel = report["sensitivity"]["selection"]
    assert report["int8_mac_share"]["share"] >= 0.95 and sel["met"] and sel["fp16_layers"]
    assert report["model"]["int8_layers"] == 10 - len(sel["fp16_layers"]) and set(sel["reasons"]) >= set(sel["fp16_layers"])
    assert not [f for fs in report["lint"].values() for f in fs if f["severity"] == "error"], report["lint"]
    assert "INT8 vs FP32 output SQNR" in text and str(out) in text
    m = onnx.load(out / "model.onnx")
    assert not [n for n in m.graph.node if n.op_type == "BatchNormalization"]  # Conv+BN folded


def test_verify_passes_then_catches_modification(exported, tmp_path):
    out, _ = exported
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    assert run("verify", str(copy))[0] == 0
    with open(copy / "model.int8.onnx", "r+b") as fh:
        fh.seek(100)
        b = fh.read(1)
        fh.seek(100)
        fh.write(bytes([b[0] ^ 1]))
    code, text = run("verify", str(copy))
    assert code == 4 and "model.int8.onnx" in text
    (copy / "extra.bin").write_bytes(b"x")
    assert "extra.bin" in run("verify", str(copy))[1]


def test_second_run_hits_cache_and_is_byte_identical(user_model, exported, tmp_path):
    out, _ = exported
    out2 = tmp_path / "out2"
    code, text = run(*export_args(user_model, out2))
    assert code == 0, text
    assert "cache hit" in text
    for name in ("model.onnx", "model.int8.onnx", "model.int8.strong.onnx", "calibration.json", "report.json"):
        assert (out / name).read_bytes() == (out2 / name).read_bytes(), name
    m1, m2 = (json.loads((d / "manifest.json").read_text()) for d in (out, out2))
    for m in (m1, m2):
        m.pop("run")
        m.pop("command")
    assert m1 == m2


def test_changed_method_uses_same_pass_but_new_amax(user_model, exported, tmp_path):
    out, _ = exported
    a = json.loads((out / "calibration.json").read_text())
    other = "mse" if a["method"] == "max" else "max"  # the default chose a["method"] for this network (auto)
    code, text = run(*export_args(user_model, tmp_path / "o", "--method", other))
    assert code == 0 and "cache hit" in text  # every method comes from the one cached pass
    b = json.loads((tmp_path / "o" / "calibration.json").read_text())
    assert b["method"] == other and a["all_methods"] == b["all_methods"] and a["amax"] != b["amax"]
    assert all(b["amax"][k] == b["all_methods"][k][other] for k in b["amax"])
    assert all(a["amax"][k] == a["all_methods"][k][a["method"]] for k in a["amax"])  # the chosen one, applied


def test_gate_failure_exit_3_after_writing(user_model, tmp_path):
    code, text = run(*export_args(user_model, tmp_path / "g", "--min-sqnr", "200"))
    assert code == 3 and "below --min-sqnr" in text
    report = json.loads((tmp_path / "g" / "report.json").read_text())
    assert report["gates"]["passed"] is False
    code, text = run(*export_args(user_model, tmp_path / "g2", "--max-drop", "0.3"))
    assert code == 3 and "needs evaluation data" in text


def test_non_empty_output_needs_force(user_model, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("previous")
    code, text = run(*export_args(user_model, out))
    assert code == 2 and "--force" in text
    assert (out / "keep.txt").read_text() == "previous"


@pytest.mark.parametrize("case", ["unknown_model", "bad_factory", "missing_calib", "weights_mismatch",
                                  "pickle_weights", "unknown_recipe_key", "bad_skip", "engine_without_trt",
                                  "zero_amax", "inf_activations", "wrong_input_size"])
def test_bad_inputs_exit_2_and_write_nothing(user_model, tmp_path, case):
    out = tmp_path / "out"
    m = dict(user_model)
    extra = []
    expect = {"unknown_model": "unknown model", "bad_factory": "nope", "missing_calib": "does not exist",
              "weights_mismatch": "missing", "pickle_weights": "refuses for safety",
              "unknown_recipe_key": "valid keys", "bad_skip": "matches no quantizable layer",
              "engine_without_trt": "tensorrt", "zero_amax": "calibrated amax is 0",
              "inf_activations": "nan or inf", "wrong_input_size": "rejects"}[case]
    if case == "unknown_model":
        m["spec"] = "yolo_nas_xs"
    elif case == "bad_factory":
        m["spec"] = m["spec"].replace(":build", ":nope")
    elif case == "missing_calib":
        m["npy"] = str(tmp_path / "none.npy")
    elif case == "weights_mismatch":
        torch.save({"stem.0.weight": torch.zeros(1)}, tmp_path / "w.pt")
        m["weights"] = str(tmp_path / "w.pt")
    elif case == "pickle_weights":
        torch.save({"obj": Path("x")}, tmp_path / "p.pt")  # needs pickle code: refused
        m["weights"] = str(tmp_path / "p.pt")
    elif case == "unknown_recipe_key":
        extra = ["--set", "calibration.methd=max"]
    elif case == "bad_skip":
        extra = ["--skip", "stemm.*"]
    elif case == "zero_amax":
        m["spec"] = m["spec"].replace(":build", ":build_dead")
    elif case == "inf_activations":
        m["spec"] = m["spec"].replace(":build", ":build_blowup")
    elif case == "wrong_input_size":
        import numpy as np

        np.save(tmp_path / "gray.npy", np.zeros((2, 1, 64, 64), np.float32))  # 1 channel for an RGB model
        m["npy"] = str(tmp_path / "gray.npy")
    elif case == "engine_without_trt":
        pytest.importorskip("pytest")
        try:
            import tensorrt  # noqa: F401
            pytest.skip("tensorrt is installed here")
        except ImportError:
            pass
        extra = ["--engine"]
    code, text = run(*export_args(m, out, *extra))
    assert code == 2, text
    assert expect.lower() in text.lower(), text
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # no staging left behind


def _previous_output(target):
    import hashlib

    target.mkdir()
    (target / "old.txt").write_bytes(b"previous")
    files = {"old.txt": {"sha256": hashlib.sha256(b"previous").hexdigest(), "size": 8}}
    (target / "manifest.json").write_text(json.dumps({"schema": 1, "files": files}))
    return {p.name: p.read_bytes() for p in target.iterdir()}


@pytest.mark.parametrize("point, sig, code", [("calibration", "INT", 130), ("commit", "TERM", 143),
                                              ("after_commit", "INT", 0)])  # "rename": tests/unit
def test_interrupt_leaves_previous_output_or_finishes(user_model, tmp_path, point, sig, code):
    """A signal at a known point (QUANTKIT_TEST_INTERRUPT: the process signals itself there): before the commit
    the previous output stays and the exit is 128+signal; inside or after the commit the run finishes, exit 0."""
    target = tmp_path / "prev"
    before = _previous_output(target)
    env = dict(os.environ, QUANTKIT_TEST_INTERRUPT=f"{point}:{sig}")
    cmd = [sys.executable, "-m", "quantkit", *export_args(user_model, target, "--force", "--no-cache")]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == code, res.stderr
    if code:
        assert "interrupted (SIG" + sig + ")" in res.stderr
        assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    else:
        assert not (target / "old.txt").exists() and run("verify", str(target))[0] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prev"]  # no staging, no .old, no lock file


def test_force_never_deletes_inputs_and_refuses_before_calibrating(user_model, tmp_path):
    import shutil

    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(user_model["npy"], data / "calib.npy")
    m = dict(user_model, npy=str(data / "calib.npy"))
    for out in (data, tmp_path):  # the data folder itself, and its parent
        code, text = run(*export_args(m, out, "--force"))
        assert code == 2 and "an input of this run" in text and "calibrating" not in text, text
        assert (data / "calib.npy").read_bytes() == open(user_model["npy"], "rb").read()
    code, text = run(*export_args(m, tmp_path / "x", "--recipe", str(data / "calib.npy")))
    assert code == 2  # (not a YAML mapping) — and nothing written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


@pytest.mark.parametrize("case", ["cache_dir_file", "out_under_file", "huge_input"])
def test_environment_errors_exit_2_before_calibration(user_model, tmp_path, case):
    (tmp_path / "afile").write_text("x")
    env, out, extra = None, tmp_path / "out", []
    if case == "cache_dir_file":
        env, match = {"QUANTKIT_CACHE_DIR": str(tmp_path / "afile")}, "QUANTKIT_CACHE_DIR"
    elif case == "out_under_file":
        out, match = tmp_path / "afile" / "sub", "is a file, not a folder"
    else:
        extra, match = ["--input-size", "16384x16384"], "GiB of memory"  # the largest size a recipe accepts
    code, text = run(*export_args(user_model, out, *extra), env=env)
    assert code == 2 and match in text and "calibrating" not in text, text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_second_concurrent_run_on_one_out_exits_2(user_model, tmp_path):
    from quantkit.output import resolve_target
    from quantkit.utils.outlock import OutputLock

    out = tmp_path / "new"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from quantkit.utils.outlock import "
                               "OutputLock; OutputLock(sys.argv[1]).acquire(); print('held', flush=True); "
                               "time.sleep(60)", str(resolve_target(out))], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        code, text = run(*export_args(user_model, out))
        assert code == 2 and "another quantkit run" in text and not out.exists(), text
    finally:
        holder.kill()
        holder.wait()
    with OutputLock(resolve_target(out)):  # the kernel dropped the killed holder's lock
        pass


def test_exception_mid_export_leaves_nothing(user_model, tmp_path, monkeypatch):
    import quantkit.report.build as rb

    def boom(*a, **k):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(rb, "write_reports", boom)
    out = tmp_path / "x"
    res = CliRunner().invoke(main, export_args(user_model, out))
    assert res.exit_code == 1
    assert not out.exists() and not list(tmp_path.iterdir())


def test_dynamic_batch_runs_at_several_sizes_and_nms_graph(user_model, tmp_path):
    import numpy as np

    from quantkit.exporter import parity

    out = tmp_path / "dyn"
    code, text = run(*export_args(user_model, out, "--batch", "1:4:8", "--nms"))
    # the user model is a classifier: --nms needs detector outputs, so it must fail clearly and write nothing
    assert code == 2 and "boxes" in text and not out.exists()
    code, text = run(*export_args(user_model, out, "--batch", "1:4:8"))
    assert code == 0, text
    x = np.load(user_model["npy"])[:8]
    for name in ("model.onnx", "model.int8.onnx", "model.int8.strong.onnx"):
        sess = parity.session((out / name).read_bytes())
        assert sess.get_inputs()[0].shape[0] == "batch"
        ref = parity.run_session(sess, x)[0]
        for n in (1, 3, 8):
            got = parity.run_session(sess, x[:n])[0]
            assert got.shape[0] == n and np.allclose(got, ref[:n], atol=1e-3), name
    script = (out / "build_engine.sh").read_text()
    assert "--minShapes=images:1x3x64x64" in script and "--optShapes=images:4x3x64x64" in script


def test_build_without_tensorrt_exits_2_with_hint(exported):
    try:
        import tensorrt  # noqa: F401
        pytest.skip("tensorrt is installed here")
    except ImportError:
        pass
    out, _ = exported
    code, text = run("build", str(out / "model.int8.onnx"), "--target", "t4")
    assert code == 2 and "pip install 'quantkit[trt]'" in text


def test_lint_command_on_own_export_is_clean(exported):
    out, _ = exported
    code, text = run("lint", str(out / "model.int8.onnx"))
    assert code == 0 and "no findings" in text
    code, text = run("lint", str(out / "model.int8.strong.onnx"), "--strong")
    assert code == 0, text


def test_byte_identical_across_thread_counts(user_model, tmp_path):
    """Same inputs, 1 vs 2 intra-op threads, fresh caches: identical ONNX, calibration and report bytes."""
    outs = []
    for threads in (1, 2):
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), QUANTKIT_CACHE_DIR=str(tmp_path / f"cache{threads}"))
        out = tmp_path / f"t{threads}"
        cmd = [sys.executable, "-c", f"import torch; torch.set_num_threads({threads}); "
               "from quantkit.cli import main; main()", *export_args(user_model, out)]
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr
        outs.append(out)
    for name in ("model.onnx", "model.int8.onnx", "model.int8.strong.onnx", "calibration.json", "report.json",
                 "build_engine.sh"):
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name


def test_python_api_quantize_then_export(user_model, tmp_path):
    import importlib.util

    import quantkit
    import quantkit.errors
    from quantkit.quant.tensor_quantizer import TensorQuantizer

    spec = importlib.util.spec_from_file_location("user_net", user_model["dir"] / "net.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    net = mod.build()
    net.load_state_dict(torch.load(user_model["weights"], weights_only=True))
    recipe = quantkit.load_recipe(None, ["calibration.method=mse", "model.name=user"])
    qmodel = quantkit.quantize(net, user_model["npy"], recipe)
    qs = [m for m in qmodel.modules() if isinstance(m, TensorQuantizer)]
    assert qs and all(q.amax is not None for q in qs)
    x = torch.from_numpy(__import__("numpy").load(user_model["npy"])[:2])
    with torch.no_grad():
        assert qmodel(x).shape == (2, 5)
    res = quantkit.export(qmodel, tmp_path / "api")
    assert (tmp_path / "api" / "model.int8.onnx").is_file()
    assert res.report["calibration"]["method"] == "mse"
    with pytest.raises(quantkit.errors.UsageError):
        quantkit.export(net, tmp_path / "api2")


def test_auto_selection_under_sqnr_floor_is_verified_in_onnxruntime(user_model, tmp_path):
    out = tmp_path / "auto"
    base = json.loads(run(*export_args(user_model, tmp_path / "full", "--full-int8"))[1] and (tmp_path / "full" / "report.json")
                      .read_text())["accuracy"]["int8_vs_fp32_sqnr_db"]["worst_db"]
    floor = round(base + 8.0, 1)  # demand clearly more than full INT8 gives
    code, text = run(*export_args(user_model, out, "--set", f"sensitivity.sqnr_floor={floor}", "--sensitivity"))
    assert code == 0, text
    report = json.loads((out / "report.json").read_text())
    sel = report["sensitivity"]["selection"]
    assert sel["met"] and sel["fp16_layers"] and float(sel["measured"]) >= floor  # "inf": outputs equal FP32
    fp16 = {r["name"] for r in report["layers"] if r["precision"] == "fp16"}
    assert fp16 == set(sel["fp16_layers"]) and all("why" in r for r in report["layers"] if r["name"] in fp16)
    # independent check: the exported graph, run in onnxruntime, meets the floor too
    assert float(report["accuracy"]["int8_vs_fp32_sqnr_db"]["worst_db"] or "inf") >= floor - 0.5
    assert (out / "sensitivity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Estimated T4 latency" in (out / "report.md").read_text()
    lat = report["latency_estimate"]["ms"]
    assert lat["full INT8"] <= lat["exported (hybrid)"] <= lat["FP16 (no INT8)"]


def test_models_lists_exact_super_gradients_counts():
    code, text = run("models")
    assert code == 0
    for name, count in (("yolo_nas_s", "19,053,888"), ("yolo_nas_m", "51,182,658"), ("yolo_nas_l", "66,976,392")):
        line = next(ln for ln in text.splitlines() if ln.startswith(name))
        assert count in line, line


def test_cached_calibration_equals_fresh_one_after_a_different_skip_list(user_model, exported, tmp_path):
    """The pass sees INT8 layers' fake-quantized weights, so a different FP16 set must not reuse the cache:
    the export after a run with another skip list is byte-identical to one from an empty cache."""
    skip = ["--set", "quantization.skip=[fuse]"]
    code, text = run(*export_args(user_model, tmp_path / "cached", *skip))  # cache holds the full-INT8 pass
    assert code == 0 and "cache hit" not in text, text
    code, text = run(*export_args(user_model, tmp_path / "fresh", *skip, "--no-cache"))
    assert code == 0, text
    for name in ("calibration.json", "model.int8.onnx"):
        assert (tmp_path / "cached" / name).read_bytes() == (tmp_path / "fresh" / name).read_bytes(), name
    full = json.loads((exported[0] / "calibration.json").read_text())["all_methods"]
    part = json.loads((tmp_path / "fresh" / "calibration.json").read_text())["all_methods"]
    assert full != part  # the skip list really changed the activations this checks


ODD_NETS = '''
import sys
import torch
from torch import nn


class Base(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, 1, 1)
        self.c2 = nn.Conv2d(8, 8, 3, 1, 1)

    def forward(self, x):
        y = torch.relu(self.c1(x))
        return self.c2(y) + y  # the last op is a residual add


class Scalar(Base):
    def forward(self, x):
        return super().forward(x).mean()


def build():
    torch.manual_seed(0)
    return Base()

def build_scalar():
    return Scalar()

def build_half():
    return Base().half()

def build_exit():
    sys.exit(5)
'''


@pytest.mark.parametrize("case, code, expect", [
    ("residual_last", 0, "INT8 vs FP32"), ("skip_all", 0, "INT8 vs FP32"), ("sqnr_floor_200", 0, "INT8 vs FP32"),
    ("scalar_output", 2, "scalar"), ("half_model", 2, "model.float()"), ("sys_exit", 2, "SystemExit: 5")])
def test_odd_models_export_or_exit_2(user_model, tmp_path, case, code, expect):
    (tmp_path / "odd.py").write_text(ODD_NETS)
    factory = {"scalar_output": "build_scalar", "half_model": "build_half", "sys_exit": "build_exit"}.get(case, "build")
    extra = {"skip_all": ["--skip", "*"], "sqnr_floor_200": ["--set", "sensitivity.sqnr_floor=200"],
             "residual_last": ["--full-int8"]}.get(case, [])  # the graph-end Add quantized: lint-clean
    out = tmp_path / "out"
    got, text = run("export", "--model", f"{tmp_path / 'odd.py'}:{factory}", "--calib", user_model["npy"],
                    "--out", str(out), "--no-cache", *extra)
    assert got == code and expect in text, text
    if code == 0:
        report = json.loads((out / "report.json").read_text())
        assert all(not f for f in report["lint"].values()), report["lint"]
        if case != "residual_last":  # nothing left INT8: the graph is the FP32 one, within float noise
            assert report["accuracy"]["int8_vs_fp32_sqnr_db"]["worst_db"] in ("inf",) or \
                float(report["accuracy"]["int8_vs_fp32_sqnr_db"]["worst_db"]) > 100
    else:
        assert not out.exists()


def test_16bit_png_calibration_matches_8bit(user_model, tmp_path):
    """A folder of 16-bit PNGs calibrates exactly like the same pictures in 8 bits (it used to read as white)."""
    from PIL import Image

    from quantkit.data.images import list_images, load_image
    from quantkit.paths import BUNDLED_CALIBRATION

    for bits in (8, 16):
        (tmp_path / f"c{bits}").mkdir()
    for f in list_images(BUNDLED_CALIBRATION)[:8]:
        gray = np.asarray(Image.fromarray(load_image(f)).convert("L").resize((64, 64)))
        Image.fromarray(gray).save(tmp_path / "c8" / f"{f.stem}.png")
        Image.fromarray(gray.astype(np.uint16) * 257).save(tmp_path / "c16" / f"{f.stem}.png")
    sqnr = {}
    for bits in (8, 16):
        code, text = run("export", "--model", user_model["spec"], "--weights", user_model["weights"], "--calib",
                         str(tmp_path / f"c{bits}"), "--input-size", "64x64", "--out", str(tmp_path / f"o{bits}"),
                         "--no-cache")
        assert code == 0, text
        sqnr[bits] = json.loads((tmp_path / f"o{bits}" / "report.json").read_text())["accuracy"]
    assert sqnr[16] == sqnr[8] and float(sqnr[16]["int8_vs_fp32_sqnr_db"]["worst_db"]) > 15
