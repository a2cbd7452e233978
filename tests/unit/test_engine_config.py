"""Engine planning, trtexec script, target check, missing-tensorrt errors, builder API use (fake tensorrt),
and precision comparison on an inspector-format fixture."""

from __future__ import annotations

import json

import numpy as np
import os
import shutil
import subprocess
import sys
import types

import pytest

from quantkit.engine import builder as builder_mod
from quantkit.engine.builder import build_engine, import_tensorrt, network_flags
from quantkit.engine.config import (BuilderFlagName, EngineConfig, TypingMode, check_target, parse_batch,
                                    plan_build, plan_from_config)
from quantkit.engine.inspect import compare_precisions, layer_precision, normalize_layers, onnx_names
from quantkit.engine.trtexec import render_build_script, write_build_script
from quantkit.errors import DependencyError, EngineError, UsageError

F = BuilderFlagName


# ------------------------------------------------------------------------------------------- plan_build
@pytest.mark.parametrize("version,strong,typing,flags", [
    ("8.6.1", False, TypingMode.WEAK, (F.INT8, F.FP16)),
    ("10.3.0.26", False, TypingMode.WEAK, (F.INT8, F.FP16)),
    ("10.11.0", False, TypingMode.WEAK, (F.INT8, F.FP16)),
    ("10.12.0.36", False, TypingMode.WEAK, (F.INT8, F.FP16)),
    ("10.12.0.36", True, TypingMode.STRONG, ()),
    ("10.13", True, TypingMode.STRONG, ()),
    ("11.0.0", True, TypingMode.STRONG, ()),
])
def test_typing_mode_by_version(version, strong, typing, flags):
    plan = plan_build(version, strong, "t4", None, [])
    assert plan.typing == typing and plan.flags == flags
    assert plan.static_shape == (1, 3, 640, 640) and plan.profile is None


def test_weak_deprecated_note_from_10_12():
    assert any("deprecated" in n for n in plan_build("10.12.0", False, "t4").notes)
    assert not any("deprecated" in n for n in plan_build("10.11.0", False, "t4").notes)


@pytest.mark.parametrize("version,strong,match", [
    ("11.0.0", False, "removed weak typing"),
    ("11.2", False, "to_strongly_typed"),
    ("10.11.9", True, ">= 10.12"),
    ("8.6.1", True, "weak typing"),
    ("8.5.3", False, "too old"),
])
def test_impossible_combinations_refused(version, strong, match):
    with pytest.raises(EngineError, match=match):
        plan_build(version, strong, "t4")


def test_fp16_layers_need_obey_precision_constraints_in_weak_mode():
    plan = plan_build("8.6.1", False, "t4", None, ["/head/cls/Conv", "/head/reg/Conv"])
    assert plan.flags == (F.INT8, F.FP16, F.OBEY_PRECISION_CONSTRAINTS)
    assert plan.fp16_layers == ("/head/cls/Conv", "/head/reg/Conv")
    strong = plan_build("10.12.0", True, "t4", None, ["/head/cls/Conv"])
    assert strong.fp16_layers == () and any("ignored" in n for n in strong.notes)
    with pytest.raises(UsageError, match="layerPrecisions"):
        plan_build("8.6.1", False, "t4", None, ["a,b"])


@pytest.mark.parametrize("text,expected", [("1:8:32", (1, 8, 32)), ("4:4:4", (4, 4, 4)), ((1, 2, 3), (1, 2, 3))])
def test_batch_profile_parsed(text, expected):
    assert parse_batch(text) == expected
    plan = plan_build("10.3.0", False, "t4", text, [], input_name="images", chw=(3, 320, 320))
    assert plan.profile.min == (expected[0], 3, 320, 320) and plan.profile.max == (expected[2], 3, 320, 320)
    assert plan.static_shape is None


@pytest.mark.parametrize("text", ["8:1:32", "0:1:2", "1:8", "1:8:x", "1:-2:4", "", (1, 2), (1.0, 2, 3), "1:9:8"])
def test_bad_batch_profiles_refused(text):
    with pytest.raises(UsageError):
        parse_batch(text)


@pytest.mark.parametrize("bad", ["ten", "10.x", ""])
def test_bad_version_refused(bad):
    with pytest.raises(UsageError):
        plan_build(bad, False, "t4")


def test_unknown_target_refused_and_config_round_trip():
    with pytest.raises(UsageError, match="unknown engine target"):
        plan_build("10.3", False, "a100")
    cfg = EngineConfig(target="t4", batch="1:4:8", fp16_layers=("/x/Conv",))
    plan = plan_from_config(cfg, "10.3.0", onnx_is_strong=False)
    assert plan.profile.opt == (4, 3, 640, 640) and F.OBEY_PRECISION_CONSTRAINTS in plan.flags


# ------------------------------------------------------------------------------------------- check_target
def test_t4_target_check():
    check_target("t4", (7, 5), "Tesla T4")
    check_target("any", (9, 0), "NVIDIA H100 80GB HBM3")
    with pytest.raises(EngineError, match=r"compute capability 7.5.*'NVIDIA H100 80GB HBM3'.*9.0"):
        check_target("t4", (9, 0), "NVIDIA H100 80GB HBM3")
    with pytest.raises(EngineError, match="T4"):  # same sm_75, different GPU model
        check_target("t4", (7, 5), "NVIDIA GeForce RTX 2080 Ti")


# ------------------------------------------------------------------------------------------- trtexec script
def test_weak_dynamic_script_text(tmp_path):
    plan = plan_build("8.6.1", False, "t4", "1:8:32", ["/head/cls/Conv"])
    path = tmp_path / "out" / "build_engine.sh"
    text = write_build_script(path, "model_qdq.onnx", plan)
    assert path.read_text() == text and os.access(path, os.X_OK)
    lines = text.splitlines()
    assert lines[0] == "#!/usr/bin/env bash" and "set -euo pipefail" in lines
    assert "  --onnx=model_qdq.onnx \\" in lines and "  --saveEngine=model_qdq.engine \\" in lines
    assert "  --int8 \\" in lines and "  --fp16 \\" in lines and "--stronglyTyped" not in text
    assert "  --precisionConstraints=obey \\" in lines
    assert "  --layerPrecisions=/head/cls/Conv:fp16 \\" in lines
    assert "  --timingCacheFile=timing.cache \\" in lines
    for flag, n in (("min", 1), ("opt", 8), ("max", 32)):
        assert f"  --{flag}Shapes=images:{n}x3x640x640 \\" in lines
    assert "--exportLayerInfo=layers.json" in text and lines[-1] == "  --profilingVerbosity=detailed"
    assert "nvidia-smi --query-gpu=name" in text and "*T4*" in text
    assert not list(tmp_path.joinpath("out").glob(".*.tmp"))  # no temp file left behind


def test_strong_static_script_and_determinism(tmp_path):
    plan = plan_build("10.12.0", True, "any", None, [])
    text = render_build_script("m_strong.onnx", plan)
    assert "--stronglyTyped" in text and "--int8" not in text and "--fp16" not in text
    assert "Shapes=" not in text and "nvidia-smi" not in text
    assert write_build_script(tmp_path / "a.sh", "m_strong.onnx", plan) == text
    assert (tmp_path / "a.sh").read_bytes() == text.encode()


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash not installed")
def test_script_runs_with_fake_tools(tmp_path):
    """Execute the script with stub nvidia-smi/trtexec: the GPU check and the exact argv."""
    plan = plan_build("10.3.0", False, "t4", "1:2:4", [])
    write_build_script(tmp_path / "build_engine.sh", "m.onnx", plan)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "trtexec").write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@" > argv.txt\n')
    for gpu, rc in (("Tesla T4", 0), ("NVIDIA A10G", 1)):
        (bin_dir / "nvidia-smi").write_text(f"#!/usr/bin/env bash\necho '{gpu}'\n")
        for f in bin_dir.iterdir():
            f.chmod(0o755)
        env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}")
        proc = subprocess.run(["bash", str(tmp_path / "build_engine.sh")], env=env, capture_output=True, text=True)
        assert proc.returncode == rc, proc.stderr
    assert "A10G" in proc.stderr
    argv = (tmp_path / "argv.txt").read_text().splitlines()
    assert argv[:4] == ["--onnx=m.onnx", "--saveEngine=m.engine", "--int8", "--fp16"]
    assert "--maxShapes=images:4x3x640x640" in argv


# ------------------------------------------------------------------------------------------- builder
def test_missing_tensorrt_raises_dependency_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # makes `import tensorrt` raise ImportError
    with pytest.raises(DependencyError, match=r"pip install 'quantkit\[trt\]'"):
        import_tensorrt()
    onnx_file = tmp_path / "m.onnx"
    onnx_file.write_bytes(b"x")
    with pytest.raises(DependencyError, match="tensorrt"):
        build_engine(onnx_file, plan_build("10.3.0", False, "t4"), tmp_path)


def test_missing_onnx_file_refused(tmp_path):
    with pytest.raises(EngineError, match="export it first"):
        build_engine(tmp_path / "nope.onnx", plan_build("10.3.0", False, "t4"), tmp_path)


class _Rec:
    """A recording stand-in for the tensorrt objects build_engine touches."""

    def __init__(self, log, name="obj"):
        self.log, self.name = log, name

    def __getattr__(self, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Rec(self.log, f"{self.name}.{attr}")

    def __call__(self, *args, **kwargs):
        self.log.append((self.name, args))
        return _Rec(self.log, self.name + "()")

    def __int__(self):
        return {"EXPLICIT_BATCH": 0, "STRONGLY_TYPED": 5}[self.name.rsplit(".", 1)[-1]]


def fake_trt(version, log, layers=("/a/Conv", "/head/Conv"), flag_names=("INT8", "FP16", "OBEY_PRECISION_CONSTRAINTS"),
             input_shape=(-1, 3, 640, 640), inputs=None):
    trt = types.SimpleNamespace(__version__=version, float16="float16")
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(
        EXPLICIT_BATCH=_Rec(log, "EXPLICIT_BATCH"), STRONGLY_TYPED=_Rec(log, "STRONGLY_TYPED"))
    trt.BuilderFlag = types.SimpleNamespace(**{n: n for n in flag_names})
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
    trt.ProfilingVerbosity = types.SimpleNamespace(DETAILED="DETAILED")
    trt.Logger = type("Logger", (), {"WARNING": 1, "__init__": lambda self, level: None})
    net_layers = [types.SimpleNamespace(name=n, precision=None) for n in layers]

    class Config:
        def set_memory_pool_limit(self, pool, size):
            log.append(("pool", (pool, size)))

        def set_flag(self, flag):
            log.append(("flag", (flag,)))

        def add_optimization_profile(self, p):
            log.append(("profile", (p.shape,)))
            log.append(("profiles", tuple(p.shapes)))

        def create_timing_cache(self, data):
            log.append(("cache_in", (data,)))
            return "cache"

        def set_timing_cache(self, cache, ignore):
            pass

        def get_timing_cache(self):
            return types.SimpleNamespace(serialize=lambda: b"CACHE")

    class Profile:
        def __init__(self):
            self.shapes = []

        def set_shape(self, *a):
            self.shape = a
            self.shapes.append(a)

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            log.append(("network", (flags,)))
            ins = [types.SimpleNamespace(name=n, shape=s) for n, s in (inputs or [("images", input_shape)])]
            return types.SimpleNamespace(num_layers=len(net_layers), get_layer=lambda i: net_layers[i],
                                         num_inputs=len(ins), get_input=lambda i: ins[i])

        create_builder_config = staticmethod(Config)
        create_optimization_profile = staticmethod(Profile)

        def build_serialized_network(self, network, config):
            return b"ENGINE"

    trt.Builder = Builder
    trt.OnnxParser = lambda net, logger: types.SimpleNamespace(parse_from_file=lambda p: True, num_errors=0)
    return trt, net_layers


@pytest.mark.parametrize("version,strong,net_flags", [("8.6.1", False, 1), ("10.3.0", False, 0),
                                                        ("10.12.0", True, 1 << 5)])
def test_builder_uses_version_specific_api(monkeypatch, tmp_path, version, strong, net_flags):
    log = []
    trt, layers = fake_trt(version, log)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(builder_mod, "cuda_device", lambda index=0: ("Tesla T4", (7, 5)))
    onnx_file = tmp_path / "m.onnx"
    onnx_file.write_bytes(b"onnx")
    (tmp_path / "t.cache").write_bytes(b"OLD")
    plan = plan_build(version, strong, "t4", "1:2:8", [] if strong else ["/head/Conv"])
    out = build_engine(onnx_file, plan, tmp_path / "eng", tmp_path / "t.cache")
    assert out.read_bytes() == b"ENGINE" and (tmp_path / "t.cache").read_bytes() == b"CACHE"
    assert ("network", (net_flags,)) in log and ("cache_in", (b"OLD",)) in log
    assert ("pool", ("WORKSPACE", 4096 << 20)) in log
    assert ("profile", (("images", (1, 3, 640, 640), (2, 3, 640, 640), (8, 3, 640, 640)),)) in log
    flags = [a[0] for k, a in log if k == "flag"]
    assert flags == ([] if strong else ["INT8", "FP16", "OBEY_PRECISION_CONSTRAINTS"])
    assert [l.precision for l in layers] == [None, None if strong else "float16"]


def test_builder_refuses_wrong_gpu_version_and_unknown_layers(monkeypatch, tmp_path):
    log = []
    trt, _ = fake_trt("10.3.0", log)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    onnx_file = tmp_path / "m.onnx"
    onnx_file.write_bytes(b"onnx")
    monkeypatch.setattr(builder_mod, "cuda_device", lambda index=0: ("NVIDIA H100", (9, 0)))
    with pytest.raises(EngineError, match="T4"):
        build_engine(onnx_file, plan_build("10.3.0", False, "t4"), tmp_path)
    monkeypatch.setattr(builder_mod, "cuda_device", lambda index=0: ("Tesla T4", (7, 5)))
    with pytest.raises(EngineError, match="re-plan"):
        build_engine(onnx_file, plan_build("8.6.1", False, "t4"), tmp_path)
    with pytest.raises(EngineError, match="match no TensorRT layer"):
        build_engine(onnx_file, plan_build("10.3.0", False, "t4", "1:1:2", ["/missing/Conv"]), tmp_path)
    with pytest.raises(EngineError, match="no profile"):  # dynamic ONNX input, static plan
        build_engine(onnx_file, plan_build("10.3.0", False, "t4"), tmp_path)
    with pytest.raises(EngineError, match="input_name"):
        build_engine(onnx_file, plan_build("10.3.0", False, "t4", "1:1:2", input_name="x"), tmp_path)


def test_a_model_with_several_inputs_gets_every_input_in_the_profile(monkeypatch, tmp_path):
    """trtexec takes one comma-joined list per bound; the builder sets each input's shapes in the one profile."""
    shapes = (("audio", (512,)), ("side", (6,)))
    plan = plan_build("10.3.0", False, "t4", "1:4:8", inputs=shapes)
    assert plan.profile.trtexec_args() == ["--minShapes=audio:1x512,side:1x6", "--optShapes=audio:4x512,side:4x6",
                                           "--maxShapes=audio:8x512,side:8x6"]
    assert plan_build("10.3.0", False, "t4", inputs=shapes).static_shape == (1, 512)  # static: no profile
    with pytest.raises(UsageError, match="positive integers"):
        plan_build("10.3.0", False, "t4", "1:4:8", inputs=(("audio", (512,)), ("side", (0,))))
    log = []
    trt, _ = fake_trt("10.3.0", log, inputs=[("audio", (-1, 512)), ("side", (-1, 6))])
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(builder_mod, "cuda_device", lambda index=0: ("Tesla T4", (7, 5)))
    onnx_file = tmp_path / "m.onnx"
    onnx_file.write_bytes(b"onnx")
    build_engine(onnx_file, plan, tmp_path / "eng")
    assert ("profiles", (("audio", (1, 512), (4, 512), (8, 512)), ("side", (1, 6), (4, 6), (8, 6)))) in log
    with pytest.raises(EngineError, match="'side' is not a network input"):  # a profile input the graph lacks
        fake = fake_trt("10.3.0", [], inputs=[("audio", (-1, 512)), ("other", (-1, 6))])[0]
        monkeypatch.setitem(sys.modules, "tensorrt", fake)
        build_engine(onnx_file, plan, tmp_path / "eng2")


def test_network_flags_without_strongly_typed_support():
    trt, _ = fake_trt("8.6.1", [])
    del trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED
    plan = plan_build("10.12.0", True, "t4")
    with pytest.raises(EngineError, match="strongly typed"):
        network_flags(trt, plan, (8, 6, 1))


# ------------------------------------------------------------------------------------------- inspector
# Written after the inspector's DETAILED JSON format in the TensorRT developer guide ("Engine Inspector"):
# fused layer names joined by " + ", PWN(...) pointwise fusions, reformat copy nodes, TRT 10 Metadata records.
INSPECTOR_FIXTURE = json.loads(r"""
{"Layers": [
 {"Name": "Reformatting CopyNode for Input Tensor 0 to /stem/conv/Conv + /stem/act/Relu",
  "LayerType": "Reformat",
  "Inputs": [{"Name": "images", "Location": "Device", "Dimensions": [1,3,64,64],
              "Format/Datatype": "Row major linear FP32"}],
  "Outputs": [{"Name": "q_in", "Location": "Device", "Dimensions": [1,3,64,64],
               "Format/Datatype": "Four wide channel vectorized row major Int8 format"}]},
 {"Name": "/stem/conv/Conv + /stem/act/Relu", "LayerType": "CaskConvolution",
  "Inputs": [{"Name": "q_in", "Dimensions": [1,3,64,64],
              "Format/Datatype": "Four wide channel vectorized row major Int8 format"}],
  "Outputs": [{"Name": "/stem/act/Relu_output_0", "Dimensions": [1,16,32,32],
               "Format/Datatype": "Thirty-two wide channel vectorized row major Int8 format"}],
  "ParameterType": "Convolution", "Weights": {"Type": "Int8", "Count": 432}, "Bias": {"Type": "Float", "Count": 16},
  "TacticName": "sm75_xmma_fprop_implicit_gemm_interleaved_i8i8_i8i32_f32_nchw_vect_c_32kcrs_vect_c_32_nchw_vect_c_32"},
 {"Name": "/neck/conv/Conv + /neck/Add", "LayerType": "CaskConvolution",
  "Inputs": [{"Name": "x", "Dimensions": [1,16,32,32], "Format/Datatype": "Channel major FP16 format where channel % 8 == 0"}],
  "Outputs": [{"Name": "y", "Dimensions": [1,16,32,32], "Format/Datatype": "Channel major FP16 format where channel % 8 == 0"}],
  "Metadata": "[ONNX Layer: /neck/conv/Conv]\u001e[ONNX Layer: /neck/Add]"},
 {"Name": "/head/cls/Conv", "LayerType": "CaskConvolution",
  "Inputs": [{"Name": "z", "Dimensions": [1,16,32,32], "Format/Datatype": "Half"}],
  "Outputs": [{"Name": "logits", "Dimensions": [1,3,32,32], "Format/Datatype": "Half"}]},
 {"Name": "PWN(/head/Sigmoid)", "LayerType": "PointWiseV2",
  "Inputs": [{"Name": "logits", "Dimensions": [1,3,32,32], "Format/Datatype": "Row major linear FP32"}],
  "Outputs": [{"Name": "scores", "Dimensions": [1,3,32,32], "Format/Datatype": "Row major linear FP32"}]},
 {"Name": "myelin_graph_1", "LayerType": "Myelin",
  "Metadata": "[ONNX Layer: /head/dfl/Softmax]\u001e[ONNX Layer: /head/dfl/Conv]",
  "Inputs": [{"Name": "r", "Dimensions": [1,64,1024], "Format/Datatype": "Float"}],
  "Outputs": [{"Name": "boxes", "Dimensions": [1,1024,4], "Format/Datatype": "Float"}]}
],
"Bindings": ["images", "scores", "boxes"]}
""")


def test_onnx_names_from_fused_layer_names_and_metadata():
    layers = normalize_layers(INSPECTOR_FIXTURE)
    assert onnx_names(layers[1]) == {"/stem/conv/Conv", "/stem/act/Relu"}
    assert onnx_names(layers[2]) >= {"/neck/conv/Conv", "/neck/Add"}
    assert onnx_names(layers[4]) == {"/head/Sigmoid"}
    assert [layer_precision(la) for la in layers] == ["fp32", "int8", "fp16", "fp16", "fp32", "fp32"]


def test_compare_precisions_reports_int8_layers_running_float():
    layers = normalize_layers(INSPECTOR_FIXTURE)
    intended = {"/stem/conv/Conv": "int8", "/neck/conv/Conv": "int8", "/head/cls/Conv": "fp16",
                "/head/Sigmoid": "fp32", "/head/dfl/Conv": "fp32", "/backbone/gone/Conv": "int8"}
    problems = compare_precisions(layers, intended)
    assert len(problems) == 2
    assert problems[0].startswith("/backbone/gone/Conv: intended INT8, but no engine layer")
    assert problems[1] == "/neck/conv/Conv: intended INT8, runs FP16 in layer '/neck/conv/Conv + /neck/Add'"
    assert compare_precisions(layers, {"/stem/conv/Conv": "int8", "/stem/act/Relu": "int8"}) == []


def test_compare_precisions_names_only_engine_and_bad_precision():
    layers = normalize_layers({"Layers": ["/stem/conv/Conv + /stem/act/Relu"]})
    (msg,) = compare_precisions(layers, {"/stem/conv/Conv": "int8"})
    assert "DETAILED" in msg
    with pytest.raises(UsageError):
        compare_precisions(layers, {"/stem/conv/Conv": "int4"})


# ------------------------------------------------------------------------------------------- dynamic batch
def test_make_batch_dynamic_runs_at_other_batches():
    import numpy as np
    import onnxruntime as ort
    from qdq_graphs import residual_cnn

    from quantkit.exporter.dynamic import make_batch_dynamic

    static = residual_cnn(seed=1)
    dyn = make_batch_dynamic(static, "N")
    assert {vi.type.tensor_type.shape.dim[0].dim_param for vi in [*dyn.graph.input, *dyn.graph.output]} == {"N"}
    x = np.random.default_rng(0).standard_normal((3, 4, 8, 8)).astype(np.float32)
    out = ort.InferenceSession(dyn.SerializeToString()).run(None, {"x": x})
    one = ort.InferenceSession(static.SerializeToString()).run(None, {"x": x[1:2]})
    assert out[0].shape[0] == 3 and np.array_equal(out[0][1:2], one[0])


def test_make_batch_dynamic_refuses_hard_coded_reshape():
    import numpy as np
    from qdq_graphs import GraphBuilder

    from quantkit.errors import ExportError
    from quantkit.exporter.dynamic import make_batch_dynamic

    for first, ok in ((1, False), (-1, True), (0, True)):
        g = GraphBuilder()
        (r,) = g.node("Reshape", [g.input("x", [1, 2, 3]), g.init("shape", np.array([first, 6]))], "reshape")
        g.output("y", r, [1, 6])
        if ok:
            make_batch_dynamic(g.model())
        else:
            with pytest.raises(ExportError, match="reshape"):
                make_batch_dynamic(g.model())


def test_intended_precisions_and_module_mapping():
    import warnings

    from qdq_graphs import GraphBuilder, torch_fakequant_cnn

    from quantkit.engine.inspect import intended_precisions, onnx_nodes_for_modules

    g = GraphBuilder()
    x = g.input("x", [1, 4, 6, 6])
    y = g.conv(x, 4, 4, quant=True, stem="q_conv")
    z = g.conv(y, 4, 2, quant=False, stem="f_conv")
    g.output("z", z, [1, 2, 6, 6])
    got = intended_precisions(g.model())
    assert sorted((k.split("_")[0], v) for k, v in got.items()) == [("f", "fp16"), ("q", "int8")]
    assert sorted(intended_precisions(g.model(), "fp32").values()) == ["fp32", "int8"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = torch_fakequant_cnn()
    convs = [n.name for n in model.graph.node if n.op_type == "Conv"]
    # the fixture calls F.conv2d, so the exporter names nodes after the top module: '/Conv', '/Conv_1', ...
    assert set(intended_precisions(model).values()) == {"int8"} and len(convs) == 3
    g2 = GraphBuilder()
    a = g2.input("a", [1, 2, 4, 4])
    (c1,) = g2.node("Conv", [a, g2.init("w", np.ones((2, 2, 1, 1), np.float32))], "c1")
    g2.nodes[-1].name = "/backbone/stem/conv/Conv"
    (c2,) = g2.node("Conv", [c1, g2.init("w", np.ones((2, 2, 1, 1), np.float32))], "c2")
    g2.nodes[-1].name = "/backbone/stem/conv2/Conv"
    g2.output("y", c2, [1, 2, 4, 4])
    m2 = g2.model()
    assert onnx_nodes_for_modules(m2, ["backbone.stem.conv"]) == {"backbone.stem.conv": "/backbone/stem/conv/Conv"}
    with pytest.raises(UsageError, match="backbone.stem.con "):
        onnx_nodes_for_modules(m2, ["backbone.stem.con"])
