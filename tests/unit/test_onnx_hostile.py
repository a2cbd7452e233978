"""Hostile and real-world FP32 ONNX files on the ONNX route (issues 21, 22): control flow, temporary files,
huge fixed dims, no outputs, a full TMPDIR, external data, old opsets, free dims."""

from __future__ import annotations

import errno
import hashlib
import os
import signal
import time

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from quantkit.cli import main
from quantkit.errors import UsageError
from quantkit.onnxin import scratch
from quantkit.onnxin.load import cleanup, load_onnx
from quantkit.utils import interrupt
from onnx_toy import bn_graph


def run_cli(*args):
    res = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return res.exit_code, res.output


def sha(p) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _loop_body() -> onnx.GraphProto:
    """A Loop body that passes its float state through unchanged (v + 0), forever unless the trip count ends it."""
    return helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]), helper.make_node("Add", ["v_in", "zero"], ["v_out"])],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_in", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_out", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.zeros((), np.float32), "zero")])


def loop_model(trips: int = 10 ** 15) -> onnx.ModelProto:
    """bn_graph + a Loop of ``trips`` iterations on its output: onnxruntime would run for days."""
    m = bn_graph()
    m.graph.initializer.extend([numpy_helper.from_array(np.array(trips, np.int64), "M"),
                                numpy_helper.from_array(np.array(True), "C")])
    m.graph.node.append(helper.make_node("Loop", ["M", "C", "out"], ["looped"], name="big_loop", body=_loop_body()))
    m.graph.output[0].name = "looped"
    onnx.checker.check_model(m)
    return m


def function_if_model() -> onnx.ModelProto:
    """bn_graph whose Relu is replaced by a call of a local function holding an If (both branches Relu)."""
    m = bn_graph()
    branch = lambda name: helper.make_graph([helper.make_node("Relu", ["x"], [f"r_{name}"])], name, [],  # noqa: E731
                                            [helper.make_tensor_value_info(f"r_{name}", TensorProto.FLOAT, None)])
    fn = helper.make_function(
        "custom", "GuardedRelu", ["x"], ["y"],
        [helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.array(True), "c")),
         helper.make_node("If", ["c"], ["y"], name="the_if", then_branch=branch("t"), else_branch=branch("e"))],
        [helper.make_opsetid("", 17)])
    relu = next(n for n in m.graph.node if n.op_type == "Relu")
    relu.op_type, relu.domain, relu.name = "GuardedRelu", "custom", "guarded"
    m.functions.append(fn)
    m.opset_import.append(helper.make_opsetid("custom", 1))
    onnx.checker.check_model(m)
    return m


# ------------------------------------------------------------------------------------------------ control flow


def test_huge_loop_is_refused_at_load_in_seconds(tmp_path):
    p = tmp_path / "loop.onnx"
    onnx.save(loop_model(), p)
    npy = tmp_path / "c.npy"
    np.save(npy, np.random.default_rng(0).random((2, 3, 8, 8), dtype=np.float32))
    before, out = sha(p), tmp_path / "out"
    t0 = time.perf_counter()
    code, text = run_cli("export", str(p), "--calib", str(npy), "--out", str(out), "--no-cache")
    assert code == 2, text
    assert "control flow" in text and "'big_loop'" in text and "'Loop'" in text and "unroll" in text, text
    assert time.perf_counter() - t0 < 30  # onnxruntime was never asked to run the loop
    assert not out.exists() and sha(p) == before


def test_control_flow_inside_a_local_function_is_named(tmp_path):
    p = tmp_path / "fn.onnx"
    onnx.save(function_if_model(), p)
    with pytest.raises(UsageError, match=r"'the_if' in local function 'custom:GuardedRelu', called by node "
                                         r"'guarded' is a 'If'"):
        load_onnx(p)


def test_scan_and_unknown_graph_attribute_ops_are_refused(tmp_path):
    m = loop_model(3)
    node = m.graph.node[-1]
    node.op_type, node.domain = "Scan", ""  # any op holding a subgraph, whatever its name, is control flow
    p = tmp_path / "scan.onnx"
    p.write_bytes(m.SerializeToString())  # not checked: Scan's attributes differ; quantkit must refuse it first
    with pytest.raises(UsageError, match="'big_loop' is a 'Scan'"):
        load_onnx(p)
    node.op_type, node.domain = "MyLoop", "vendor"
    m.opset_import.append(helper.make_opsetid("vendor", 1))
    p.write_bytes(m.SerializeToString())
    with pytest.raises(UsageError, match="'big_loop' is a 'MyLoop'"):
        load_onnx(p)


# ------------------------------------------------------------------------------------------------ temporary files


@pytest.fixture
def tmpdir_here(tmp_path, monkeypatch):
    """TMPDIR -> an empty folder of this test, to see what the route leaves there."""
    d = tmp_path / "tmp"
    d.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(d))
    return d


@pytest.fixture
def no_memfd(monkeypatch):
    """The temporary-folder path, as on systems without memfd_create."""
    monkeypatch.setattr(scratch, "_memfd", lambda: None)


def test_cleanup_writes_nothing_under_tmpdir(tmpdir_here):
    cleaned = cleanup(bn_graph())
    assert [n.op_type for n in cleaned.graph.node] == ["Conv", "Relu"]  # BatchNorm folded
    assert list(tmpdir_here.iterdir()) == []


def test_temp_folder_path_gives_the_same_graph_and_removes_its_folder(tmpdir_here, no_memfd, monkeypatch):
    seen = []
    real = scratch.tempfile.mkdtemp
    monkeypatch.setattr(scratch.tempfile, "mkdtemp", lambda **kw: seen.append(real(**kw)) or seen[-1])
    got = cleanup(bn_graph())
    assert len(seen) == 1 and seen[0].startswith(str(tmpdir_here))  # the folder was used ...
    assert list(tmpdir_here.iterdir()) == []  # ... and removed
    monkeypatch.undo()
    assert got.SerializeToString() == cleanup(bn_graph()).SerializeToString()  # memfd path: byte-identical


@pytest.fixture
def latch():
    old = {s: signal.getsignal(s) for s in interrupt.SIGNALS}
    interrupt.install()
    yield
    interrupt.install()
    for s, h in old.items():
        signal.signal(s, h)


@pytest.mark.parametrize("how", ["sigterm", "keyboard", "error"])
def test_temp_folder_removed_on_every_exit_path(tmpdir_here, no_memfd, latch, how):
    def writer(path):
        with open(path, "wb") as fh:
            fh.write(b"partial")
        if how == "sigterm":  # the CLI's handler turns SIGTERM into KeyboardInterrupt
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
        elif how == "keyboard":
            raise KeyboardInterrupt
        else:
            raise RuntimeError("writer failed")

    with pytest.raises(KeyboardInterrupt if how != "error" else RuntimeError):
        scratch.write_via_path(writer, 100)
    assert list(tmpdir_here.iterdir()) == []
    if how == "sigterm":
        assert interrupt.exit_code() == 143


def test_full_tmpdir_is_a_usage_error_naming_it(tmpdir_here, no_memfd, monkeypatch):
    # mkdir in a full file system
    def full_mkdtemp(**kw):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(scratch.tempfile, "mkdtemp", full_mkdtemp)
    with pytest.raises(UsageError, match=f"temporary folder {tmpdir_here} is full.*TMPDIR"):
        cleanup(bn_graph())
    monkeypatch.undo()
    monkeypatch.setattr("tempfile.tempdir", str(tmpdir_here))
    monkeypatch.setattr(scratch, "_memfd", lambda: None)

    # onnxruntime's own write hitting ENOSPC (cleaned.onnx -> /dev/full): it reports "Protobuf serialization
    # failed", which must not read as a fault of the user's model
    real = scratch.tempfile.mkdtemp

    def mkdtemp_onto_dev_full(**kw):
        d = real(**kw)
        os.symlink("/dev/full", os.path.join(d, "cleaned.onnx"))
        return d

    monkeypatch.setattr(scratch.tempfile, "mkdtemp", mkdtemp_onto_dev_full)
    monkeypatch.setattr(scratch.shutil, "disk_usage", lambda p: type("U", (), {"free": 4096})())
    with pytest.raises(UsageError, match=f"temporary folder {tmpdir_here} is full"):
        cleanup(bn_graph())
    assert list(tmpdir_here.iterdir()) == []
    assert os.path.exists("/dev/full")  # the link was removed, not what it pointed to


# ------------------------------------------------------------------------------------------------ shapes, outputs


def _images(folder, n: int = 2, size: int = 12):
    from PIL import Image

    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"im{i}.png")
    return folder


def with_input_shape(m: onnx.ModelProto, shape) -> onnx.ModelProto:
    dims = m.graph.input[0].type.tensor_type.shape.dim
    for d, v in zip(dims, shape):
        d.Clear()
        if isinstance(v, str):
            d.dim_param = v
        else:
            d.dim_value = v
    del m.graph.output[0].type.tensor_type.shape.dim[:]  # let the output shape follow
    return m


def test_huge_fixed_input_dims_fail_the_memory_preflight(tmp_path):
    p = tmp_path / "huge.onnx"
    onnx.save(with_input_shape(bn_graph(), [1, 3, 100000, 100000]), p)
    calib = _images(tmp_path / "imgs")
    out = tmp_path / "out"
    code, text = run_cli("export", str(p), "--calib", str(calib), "--out", str(out), "--no-cache")
    assert code == 2, text
    assert "input 'images'" in text and "fixed shape [1, 3, 100000, 100000]" in text and "GiB" in text, text
    assert not out.exists()


def test_memory_estimate_takes_the_larger_of_fixed_and_calibration_batch():
    from quantkit.recipe import load_recipe
    from quantkit.preflight import check_model_input_memory, estimate_calibration_bytes

    r = load_recipe(None, ["calibration.batch_size=4"])
    need = estimate_calibration_bytes((640, 640), 32, 3)  # the fixed N=32 wins over batch_size 4
    check_model_input_memory(r, "input 'x'", [32, 3, 640, 640], available=need)
    with pytest.raises(UsageError, match=r"input 'x' has the fixed shape \[32, 3, 640, 640\].*batches of 32"):
        check_model_input_memory(r, "input 'x'", [32, 3, 640, 640], available=need - 1)
    check_model_input_memory(r, "input 'x'", [None, 3, 640, 640], available=estimate_calibration_bytes((640, 640), 4))


def test_model_without_outputs_or_with_zero_dims_exits_2(tmp_path):
    m = bn_graph()
    del m.graph.output[:]
    p = tmp_path / "noout.onnx"
    onnx.save(m, p)
    npy = tmp_path / "c.npy"
    np.save(npy, np.zeros((2, 3, 8, 8), np.float32))
    code, text = run_cli("export", str(p), "--calib", str(npy), "--out", str(tmp_path / "o"), "--no-cache")
    assert code == 2 and "has no graph outputs" in text, text
    onnx.save(with_input_shape(bn_graph(), [1, 3, 0, 8]), p)
    with pytest.raises(UsageError, match=r"shape \[1, 3, 0, 8\] with a dimension below 1"):
        load_onnx(p)
    assert not (tmp_path / "o").exists()


def test_minus_one_dims_are_free_dims_taken_from_the_npy(tmp_path):
    """paddle2onnx and older exporters write a dynamic dim as -1 (rapidocr's ch_ppocr_mobile_v2.0_cls_infer.onnx:
    [-1, 3, -1, -1]); it was refused as "a dimension below 1". It is a free dim: the .npy's H, W fix it."""
    p = tmp_path / "m1.onnx"
    onnx.save(with_input_shape(bn_graph(), [-1, 3, -1, -1]), p)
    loaded = load_onnx(p, data_shape=(3, 8, 8))
    assert loaded.input_shape == [None, 3, 8, 8]
    npy = tmp_path / "c.npy"
    np.save(npy, np.random.default_rng(0).random((8, 3, 8, 8), dtype=np.float32))
    code, text = run_cli("export", str(p), "--calib", str(npy), "--out", str(tmp_path / "o"), "--no-cache")
    assert code == 0, text
    dims = onnx.load(tmp_path / "o" / "model.onnx").graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value if d.HasField("dim_value") else d.dim_param for d in dims] == ["N", 3, 8, 8]


# ------------------------------------------------------------------------------------------------ external data


def save_external(folder, location: str = "weights.bin") -> tuple:
    """bn_graph saved to folder/model.onnx with every initializer in ``location``; returns (path, model)."""
    folder.mkdir(parents=True, exist_ok=True)
    m = bn_graph()
    p = folder / "model.onnx"
    onnx.save(m, p, save_as_external_data=True, all_tensors_to_one_file=True, location=location, size_threshold=0)
    return p, bn_graph()


def test_external_data_is_read_from_the_models_folder_not_the_cwd(tmp_path, monkeypatch):
    p, original = save_external(tmp_path / "models")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    before = {f.name: sha(f) for f in p.parent.iterdir()}
    loaded = load_onnx(p)
    assert loaded.external_data == ("weights.bin",)
    want = {t.name: numpy_helper.to_array(t) for t in original.graph.initializer}
    got = {t.name: numpy_helper.to_array(t) for t in loaded.model.graph.initializer}
    assert want.keys() == got.keys() and all(np.array_equal(want[k], got[k]) for k in want)
    npy = tmp_path / "c.npy"
    np.save(npy, np.random.default_rng(0).random((4, 3, 8, 8), dtype=np.float32))
    code, text = run_cli("export", str(p), "--calib", str(npy), "--out", "out", "--no-cache")
    assert code == 0, text
    fp32 = onnx.load(elsewhere / "out" / "model.onnx")
    assert not any(t.data_location == TensorProto.EXTERNAL for t in fp32.graph.initializer)  # self-contained
    assert {f.name: sha(f) for f in p.parent.iterdir()} == before  # the user's files untouched


def test_external_data_changes_the_calibration_cache_key(tmp_path):
    p, _ = save_external(tmp_path / "m")
    first = load_onnx(p).content
    data = bytearray((p.parent / "weights.bin").read_bytes())
    data[0] ^= 0x01  # another weight, same model file
    (p.parent / "weights.bin").write_bytes(bytes(data))
    assert load_onnx(p).raw == p.read_bytes() and load_onnx(p).content != first


def _point_at(p, location: str):
    m = onnx.load(p, load_external_data=False)
    for t in m.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = location
    p.write_bytes(m.SerializeToString())


@pytest.mark.parametrize("case", ["absolute", "dotdot", "link", "missing", "past_end", "nul", "long", "loop"])
def test_external_data_outside_the_models_folder_is_refused(tmp_path, case):
    p, _ = save_external(tmp_path / "m")
    secret = tmp_path / "secret.bin"
    secret.write_bytes((p.parent / "weights.bin").read_bytes())  # a valid data file, but outside the folder
    match = {"absolute": "an absolute path", "dotdot": "a path with '..'", "link": "a link leading outside",
             "missing": "not a file in the model's folder", "past_end": "cannot be read",
             "nul": "not a usable file name", "long": "not a usable file name", "loop": "not a usable file name"}[case]
    if case == "absolute":
        _point_at(p, str(secret))
    elif case == "dotdot":
        _point_at(p, "../secret.bin")
    elif case == "link":
        os.symlink(secret, p.parent / "link.bin")
        _point_at(p, "link.bin")
    elif case == "missing":
        _point_at(p, "nothere.bin")
    elif case == "nul":
        _point_at(p, "weights.bin\0.txt")
    elif case == "long":
        _point_at(p, "w" * 5000)
    elif case == "loop":
        os.symlink("loop.bin", p.parent / "loop.bin")
        _point_at(p, "loop.bin")
    else:
        (p.parent / "weights.bin").write_bytes(b"\0" * 8)  # shorter than the offsets it declares
    before = {f: sha(f) for f in (secret, p)}
    with pytest.raises(UsageError, match=match):
        load_onnx(p)
    assert {f: sha(f) for f in (secret, p)} == before


# ------------------------------------------------------------------------------------------------ old opsets, free dims


def _ort(model_or_bytes, x) -> list[np.ndarray]:
    import onnxruntime as ort

    data = model_or_bytes if isinstance(model_or_bytes, bytes) else model_or_bytes.SerializeToString()
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, {"images": x})


@pytest.mark.parametrize("opset", [11, 12])
def test_old_opset_is_converted_and_computes_the_same(tmp_path, opset):
    from onnx_toy import toy_data, toy_onnx

    raw = toy_onnx(opset=opset, fold=False)  # torch's legacy exporter at an old opset, BatchNorm kept
    p = tmp_path / f"toy{opset}.onnx"
    p.write_bytes(raw)
    loaded = load_onnx(p)
    assert loaded.converted_from == opset and loaded.opset == 13
    assert next(o.version for o in loaded.model.opset_import if o.domain in ("", "ai.onnx")) == 13
    assert loaded.conversion_sqnr_db >= 80 and loaded.raw == raw  # the file's bytes: the report hashes them
    x = toy_data(4, seed=7)  # not the conversion check's input
    for a, b in zip(_ort(raw, x), _ort(loaded.model, x)):
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-6)


def test_old_opset_export_states_the_conversion(tmp_path):
    import json

    from onnx_toy import toy_data, toy_onnx

    p = tmp_path / "toy11.onnx"
    p.write_bytes(toy_onnx(opset=11, fold=False))
    npy = tmp_path / "c.npy"
    np.save(npy, toy_data(8))
    code, text = run_cli("export", str(p), "--calib", str(npy), "--out", str(tmp_path / "out"), "--no-cache")
    assert code == 0, text
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["model"]["opset"] == 13 and report["model"]["opset_converted_from"] == 11
    assert any("opset 11 was converted to opset 13" in n and "identical" in n for n in report["notes"]), report["notes"]
    assert "opset 11 was converted" in (tmp_path / "out" / "report.md").read_text()
    assert all(not f for f in report["lint"].values()), report["lint"]
    code, text = run_cli("export", str(p), "--calib", str(npy), "--out", str(tmp_path / "again"), "--no-cache")
    assert code == 0, text
    for f in ("model.onnx", "model.int8.onnx", "calibration.json"):  # the conversion is deterministic
        assert sha(tmp_path / "out" / f) == sha(tmp_path / "again" / f), f


def test_a_conversion_that_changes_outputs_or_fails_is_refused(tmp_path, monkeypatch):
    import onnx.version_converter as vc

    m = bn_graph()
    m.opset_import[0].version = 11
    p = tmp_path / "old.onnx"
    onnx.save(m, p)
    real = vc.convert_version

    def wrong_adapter(model, target):  # a converter bug: one weight changed on the way
        out = real(model, target)
        w = next(t for t in out.graph.initializer if t.name == "w")
        w.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w) * np.float32(1.01), "w"))
        return out

    monkeypatch.setattr(vc, "convert_version", wrong_adapter)
    with pytest.raises(UsageError, match=r"converting opset 11 to 13 changed the model's outputs \(\d+\.\d dB"):
        load_onnx(p)

    def no_adapter(model, target):
        raise RuntimeError("No Adapter For Upsample")

    monkeypatch.setattr(vc, "convert_version", no_adapter)
    with pytest.raises(UsageError, match="cannot bring it to opset 13 .No Adapter For Upsample.*opset_version=17"):
        load_onnx(p)
    m.opset_import[0].version = 6
    onnx.save(m, p)
    with pytest.raises(UsageError, match="opset 6; quantkit handles opsets 13-21 and converts opsets 7-12"):
        load_onnx(p)


def test_free_dims_are_fixed_from_the_npy_shape(tmp_path):
    import json

    from onnx_toy import toy_data, toy_onnx

    p = tmp_path / "dyn.onnx"
    p.write_bytes(toy_onnx(dynamic_hw=True))
    assert load_onnx(p, data_shape=(3, 24, 32)).input_shape == [None, 3, 24, 32]
    assert load_onnx(p, (20, 28), data_shape=(3, 24, 32)).size == (20, 28)  # --input-size wins
    m = with_input_shape(bn_graph(), ["N", "C", "H", "W"])
    onnx.save(m, tmp_path / "free_c.onnx")
    assert load_onnx(tmp_path / "free_c.onnx", data_shape=(3, 8, 8)).input_shape == [None, 3, 8, 8]
    with pytest.raises(UsageError, match="free channel dimension.*npy"):
        load_onnx(tmp_path / "free_c.onnx", (8, 8))

    npy = tmp_path / "c.npy"
    np.save(npy, toy_data(8, size=24))
    code, text = run_cli("export", str(p), "--calib", str(npy), "--out", str(tmp_path / "out"), "--no-cache")
    assert code == 0, text
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["input"]["shape"] == [1, 3, 24, 24]
    dims = onnx.load(tmp_path / "out" / "model.onnx").graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims[1:]] == [3, 24, 24]
    code, text = run_cli("export", str(p), "--calib", str(npy), "--input-size", "32x32", "--out",
                         str(tmp_path / "out2"), "--no-cache")
    assert code == 2 and "(3, 24, 24)" in text and not (tmp_path / "out2").exists(), text


def test_no_usable_tmpdir_is_a_usage_error(no_memfd, monkeypatch):
    def none_usable():
        raise FileNotFoundError(errno.ENOENT, "No usable temporary directory found in ['/nonexistent']")

    monkeypatch.setattr(scratch.tempfile, "gettempdir", none_usable)
    with pytest.raises(UsageError, match="no usable temporary folder.*point TMPDIR at a writable folder"):
        cleanup(bn_graph())
