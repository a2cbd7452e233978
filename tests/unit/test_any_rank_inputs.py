"""Issue 23, wall 4: inputs that are not NCHW images.

A Conv1d audio model fed (N, L) or (N, C, L) frames from a .npy, and a two-input model fed a .npz whose arrays
are named after its forward arguments (in another order), export with exit 0; their INT8 graphs, run in
onnxruntime with the inputs a deployment feeds, stay close to the torch FP32 model (an independent oracle).
Bad .npy/.npz data is exit 2 naming the fix, with nothing written.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner

from quantkit.cli import main
from user_nets import ort_per_sample, sqnr_db, write_nets

NETS = '''
import torch
from torch import nn


class Frames(nn.Module):
    """(N, L) audio frames -> (N, 1, L) -> two Conv1d -> mean over time -> Linear."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.c1 = nn.Conv1d(1, 16, 9, stride=2, padding=4)
        self.c2 = nn.Conv1d(16, 32, 9, stride=2, padding=4)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        h = x.unsqueeze(1) if x.dim() == 2 else x
        return self.fc(torch.relu(self.c2(torch.relu(self.c1(h)))).mean(-1))


class TwoInputs(nn.Module):
    """forward(audio (N, L), side (N, 6)): a Conv1d branch and a Linear branch summed."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.c1 = nn.Conv1d(1, 16, 9, stride=2, padding=4)
        self.proj = nn.Linear(6, 16)
        self.fc = nn.Linear(16, 4)

    def forward(self, audio, side):
        h = torch.relu(self.c1(audio.unsqueeze(1))).mean(-1)
        return self.fc(torch.relu(h + self.proj(side)))


class IgnoresText(nn.Module):
    """forward(audio, text) that never reads text (easyocr's recognizer passes a text tensor it ignores)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.c1 = nn.Conv1d(1, 16, 9, stride=2, padding=4)
        self.fc = nn.Linear(16, 4)

    def forward(self, audio, text):
        return self.fc(torch.relu(self.c1(audio.unsqueeze(1))).mean(-1))


def ignores():
    return IgnoresText().eval()


def frames():
    return Frames().eval()


def two():
    return TwoInputs().eval()
'''


def _sines(n: int, length: int, seed: int = 0) -> np.ndarray:
    """Noisy sines of random pitch and loudness: audio-like frames (N, L)."""
    r = np.random.default_rng(seed)
    t = np.arange(length, dtype=np.float32) / 8000.0
    f, a = r.uniform(80, 900, (n, 1)), r.uniform(0.2, 1.0, (n, 1))
    return (a * np.sin(2 * np.pi * f * t) + r.normal(0, 0.05, (n, length))).astype(np.float32)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    nets = write_nets(d, NETS, "qk_any_rank_nets")
    return d, nets


def _export(d: Path, factory: str, calib: Path, out: str, *extra: str):
    res = CliRunner().invoke(main, ["export", f"{d / 'nets.py'}:{factory}", "--calib", str(calib), "--out",
                                    str(d / out), "--no-cache", "--json", "-q", *extra])
    line = next(ln for ln in res.output.splitlines() if ln.startswith("{"))
    return res.exit_code, json.loads(line), d / out


def _conv_inputs_quantized(model: onnx.ModelProto) -> list[bool]:
    producer = {o: n for n in model.graph.node for o in n.output}
    return [producer.get(n.input[0]) is not None and producer[n.input[0]].op_type == "DequantizeLinear"
            for n in model.graph.node if n.op_type == "Conv"]


@pytest.mark.parametrize("layout", ["NL", "NCL"])
def test_conv1d_audio_from_npy_exports_and_matches_fp32(work, layout):
    d, nets = work
    x = _sines(24, 1024)
    if layout == "NCL":
        x = x[:, None, :]
    np.save(d / f"{layout}.npy", x)
    code, summary, out = _export(d, "frames", d / f"{layout}.npy", f"out_{layout}", "--full-int8")
    assert code == 0, summary
    int8 = onnx.load(str(out / "model.int8.onnx"))
    assert [i.name for i in int8.graph.input] == ["images"]
    dims = [d_.dim_value for d_ in int8.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [1, *x.shape[1:]]
    assert _conv_inputs_quantized(int8) == [True, True]  # both Conv1d run INT8
    held_out = _sines(8, 1024, seed=7)  # not calibrated on
    held_out = held_out[:, None, :] if layout == "NCL" else held_out
    with torch.no_grad():
        ref = nets.frames()(torch.from_numpy(held_out)).numpy()
    assert sqnr_db(ref, ort_per_sample(out / "model.int8.onnx", {"images": held_out})) > 25.0
    assert sqnr_db(ref, ort_per_sample(out / "model.onnx", {"images": held_out})) > 100.0
    report = json.loads((out / "report.json").read_text())
    assert report["input"]["shape"] == [1, *x.shape[1:]]
    assert report["int8_mac_share"]["share"] == 1.0 and "Conv" in report["int8_mac_share"]["counted"]  # graph-measured


def test_two_inputs_from_npz_matched_by_name(work):
    d, nets = work
    audio, side = _sines(24, 512), np.random.default_rng(3).normal(size=(24, 6)).astype(np.float32)
    np.savez(d / "two.npz", side=side, audio=audio)  # not the forward's order: matched by name
    code, summary, out = _export(d, "two", d / "two.npz", "out_two")
    assert code == 0, summary
    for name in ("model.onnx", "model.int8.onnx", "model.int8.strong.onnx"):
        m = onnx.load(str(out / name))
        assert {i.name: [v.dim_value for v in i.type.tensor_type.shape.dim] for i in m.graph.input} == {
            "side": [1, 6], "audio": [1, 512]}, name
    held = {"audio": _sines(8, 512, seed=9), "side": np.random.default_rng(4).normal(size=(8, 6)).astype(np.float32)}
    with torch.no_grad():
        ref = nets.two()(torch.from_numpy(held["audio"]), side=torch.from_numpy(held["side"])).numpy()
    assert sqnr_db(ref, ort_per_sample(out / "model.int8.onnx", held)) > 25.0
    assert sqnr_db(ref, ort_per_sample(out / "model.int8.strong.onnx", held)) > 25.0
    report = json.loads((out / "report.json").read_text())
    assert report["input"]["inputs"] == {"side": [1, 6], "audio": [1, 512]}
    assert _conv_inputs_quantized(onnx.load(str(out / "model.int8.onnx"))) == [True]


def test_an_input_forward_ignores_stays_an_input_of_the_graphs(work):
    """The exporter drops an input the model never reads; the graphs keep it (unused), so every stage and a
    deployment feed them what forward takes (it fed the packed arrays to a one-input graph: an internal error)."""
    d, nets = work
    audio = _sines(24, 512)
    np.savez(d / "ign.npz", audio=audio, text=np.zeros((24, 1), np.float32))
    code, summary, out = _export(d, "ignores", d / "ign.npz", "out_ign")
    assert code == 0, summary
    for name in ("model.onnx", "model.int8.onnx", "model.int8.strong.onnx"):
        m = onnx.load(str(out / name))
        assert [(i.name, [v.dim_value for v in i.type.tensor_type.shape.dim]) for i in m.graph.input] == [
            ("audio", [1, 512]), ("text", [1, 1])], name
    held = {"audio": _sines(8, 512, seed=11), "text": np.zeros((8, 1), np.float32)}
    with torch.no_grad():
        ref = nets.ignores()(torch.from_numpy(held["audio"]), None).numpy()
    assert sqnr_db(ref, ort_per_sample(out / "model.int8.onnx", held)) > 25.0


@pytest.mark.parametrize("make, expect", [
    (lambda d: np.savez(d / "bad.npz", audio=_sines(4, 64), extra=np.zeros((4, 6), np.float32)),
     "no argument named ['extra']"),
    (lambda d: np.savez(d / "bad.npz", audio=_sines(4, 64)), "nothing for ['side']"),
    (lambda d: np.savez(d / "bad.npz", audio=_sines(4, 64), side=np.zeros((3, 6), np.float32)),
     "different numbers of samples"),
    (lambda d: np.savez(d / "bad.npz", audio=_sines(4, 64).astype(np.float64), side=np.zeros((4, 6), np.float32)),
     "has dtype float64"),
    (lambda d: np.save(d / "bad.npy", np.zeros(64, np.float32)), "expected a non-empty float32 array (N, ...)"),
    # a one-array file for a forward of two inputs: told to save a .npz named after them (was an internal error)
    (lambda d: np.save(d / "bad.npy", _sines(4, 64)), "forward takes 2 inputs (audio, side)"),
])
def test_bad_arrays_are_exit_2_naming_the_fix(work, tmp_path, make, expect):
    d, _ = work
    make(tmp_path)
    calib = next(tmp_path.glob("bad.*"))
    res = CliRunner().invoke(main, ["export", f"{d / 'nets.py'}:two", "--calib", str(calib), "--out",
                                    str(tmp_path / "out"), "--no-cache", "-q"])
    assert res.exit_code == 2 and expect in res.output, res.output
    assert not (tmp_path / "out").exists()


def test_onnx_route_takes_audio_frames_from_npy(work, tmp_path):
    """The ONNX front end: an FP32 .onnx with a (1, L) input, calibrated from a (N, L) .npy."""
    d, nets = work
    x = _sines(16, 1024, seed=5)
    np.save(tmp_path / "frames.npy", x)
    with torch.no_grad():
        torch.onnx.export(nets.frames(), (torch.from_numpy(x[:1]),), str(tmp_path / "frames.onnx"), dynamo=False,
                          opset_version=17, input_names=["pcm"], output_names=["logits"])
    res = CliRunner().invoke(main, ["export", str(tmp_path / "frames.onnx"), "--calib", str(tmp_path / "frames.npy"),
                                    "--out", str(tmp_path / "o"), "--no-cache", "--json", "-q"])
    assert res.exit_code == 0, res.output
    int8 = onnx.load(str(tmp_path / "o" / "model.int8.onnx"))
    assert [i.name for i in int8.graph.input] == ["pcm"] and _conv_inputs_quantized(int8) == [True, True]
    held = _sines(8, 1024, seed=11)
    with torch.no_grad():
        ref = nets.frames()(torch.from_numpy(held)).numpy()
    assert sqnr_db(ref, ort_per_sample(tmp_path / "o" / "model.int8.onnx", {"pcm": held})) > 25.0
    # the calibration data must have the graph's sample shape
    np.save(tmp_path / "short.npy", x[:, :512])
    res = CliRunner().invoke(main, ["export", str(tmp_path / "frames.onnx"), "--calib", str(tmp_path / "short.npy"),
                                    "--out", str(tmp_path / "o2"), "--no-cache", "-q"])
    assert res.exit_code == 2 and "takes (1024,)" in res.output and not (tmp_path / "o2").exists()


def _batched(path: Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """The whole set in one run (a graph with a free batch)."""
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)[0]


def _check_dynamic_two(out: Path, audio: np.ndarray, side: np.ndarray, ref: np.ndarray) -> None:
    """Every graph takes a free batch on both inputs; the INT8 graph at batch 5 equals it one sample at a time and
    stays close to torch FP32; build_engine.sh gives both inputs the batch range (trtexec's comma-joined form)."""
    for name in ("model.onnx", "model.int8.onnx"):
        g = onnx.load(str(out / name))
        dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in g.graph.input}
        assert dims == {"audio": [dims["audio"][0], 512], "side": [dims["audio"][0], 6]}, dims
        assert isinstance(dims["audio"][0], str)  # symbolic, shared
    feeds = {"audio": audio, "side": side}
    whole = _batched(out / "model.int8.onnx", feeds)
    np.testing.assert_allclose(whole, ort_per_sample(out / "model.int8.onnx", feeds), rtol=1e-5, atol=1e-5)
    assert sqnr_db(ref, whole) > 20.0
    import re

    script = (out / "build_engine.sh").read_text()
    for k, n in (("min", 1), ("opt", 4), ("max", 8)):  # the graph's input order (the torch route: the .npz's)
        found = {frozenset(m.split(",")) for m in re.findall(rf"--{k}Shapes=(\S+)", script)}
        assert found == {frozenset({f"audio:{n}x512", f"side:{n}x6"})}, (k, found)


def test_several_inputs_with_dynamic_batch_on_both_routes(work, tmp_path):
    """A min:opt:max batch over several inputs (it was refused: build_engine.sh wrote one input's shapes): every
    input gets the batch range in the profile, on the torch route and on the ONNX route."""
    d, nets = work
    audio, side = _sines(24, 512), np.random.default_rng(4).normal(size=(24, 6)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", side=side, audio=audio)
    held_a, held_s = _sines(5, 512, seed=9), np.random.default_rng(9).normal(size=(5, 6)).astype(np.float32)
    with torch.no_grad():
        ref = nets.two()(torch.from_numpy(held_a), torch.from_numpy(held_s)).numpy()
    res = CliRunner().invoke(main, ["export", f"{d / 'nets.py'}:two", "--calib", str(tmp_path / "calib.npz"),
                                    "--out", str(tmp_path / "torch"), "--no-cache", "-q", "--batch", "1:4:8"])
    assert res.exit_code == 0, res.output
    _check_dynamic_two(tmp_path / "torch", held_a, held_s, ref)
    src = tmp_path / "two.onnx"  # the FP32 graph as a user exports it, free batch on both inputs
    torch.onnx.export(nets.two(), (torch.zeros(1, 512), torch.zeros(1, 6)), str(src), input_names=["audio", "side"],
                      output_names=["out"], opset_version=17, dynamo=False,
                      dynamic_axes={"audio": {0: "N"}, "side": {0: "N"}})
    res = CliRunner().invoke(main, ["export", str(src), "--calib", str(tmp_path / "calib.npz"), "--out",
                                    str(tmp_path / "onnx"), "--no-cache", "-q", "--batch", "1:4:8"])
    assert res.exit_code == 0, res.output
    _check_dynamic_two(tmp_path / "onnx", held_a, held_s, ref)
    # a graph whose batch is fixed cannot take a range: exit 2 naming both ways out, nothing written
    fixed = tmp_path / "fixed.onnx"
    torch.onnx.export(nets.two(), (torch.zeros(1, 512), torch.zeros(1, 6)), str(fixed),
                      input_names=["audio", "side"], output_names=["out"], opset_version=17, dynamo=False)
    res = CliRunner().invoke(main, ["export", str(fixed), "--calib", str(tmp_path / "calib.npz"), "--out",
                                    str(tmp_path / "bad"), "--no-cache", "-q", "--batch", "1:4:8"])
    assert res.exit_code == 2 and "fixed batch of 1" in res.output and "--batch 1" in res.output
    assert not (tmp_path / "bad").exists()


def test_onnx_route_takes_several_inputs_from_npz(work, tmp_path):
    """Issue 23: several inputs on the ONNX route too (it refused any graph with more than one input). The FP32
    ONNX of the two-input model, free batch, calibrated from a .npz keyed by input name in another order; the INT8
    graph, fed as a deployment feeds it, against the torch FP32 model."""
    d, nets = work
    src = tmp_path / "two.onnx"
    torch.onnx.export(nets.two(), (torch.zeros(1, 512), torch.zeros(1, 6)), str(src), input_names=["audio", "side"],
                      output_names=["out"], opset_version=17, dynamo=False,
                      dynamic_axes={"audio": {0: "N"}, "side": {0: "N"}})
    audio, side = _sines(24, 512), np.random.default_rng(3).normal(size=(24, 6)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", side=side, audio=audio)
    res = CliRunner().invoke(main, ["export", str(src), "--calib", str(tmp_path / "calib.npz"), "--out",
                                    str(tmp_path / "out"), "--no-cache", "-q", "--full-int8"])
    assert res.exit_code == 0, res.output
    out = tmp_path / "out"
    m = onnx.load(str(out / "model.int8.onnx"))
    assert [(i.name, [v.dim_value for v in i.type.tensor_type.shape.dim]) for i in m.graph.input] == [
        ("audio", [1, 512]), ("side", [1, 6])]
    held = {"audio": _sines(8, 512, seed=9), "side": np.random.default_rng(4).normal(size=(8, 6)).astype(np.float32)}
    with torch.no_grad():
        ref = nets.two()(torch.from_numpy(held["audio"]), side=torch.from_numpy(held["side"])).numpy()
    assert sqnr_db(ref, ort_per_sample(out / "model.int8.onnx", held)) > 25.0
    assert sqnr_db(ref, ort_per_sample(out / "model.onnx", held)) > 100.0
    report = json.loads((out / "report.json").read_text())
    assert report["input"]["inputs"] == {"audio": [1, 512], "side": [1, 6]} and report["route"] == "onnx"
    assert _conv_inputs_quantized(m) == [True]
    # a .npz without one of the inputs: exit 2 naming them, nothing written
    np.savez(tmp_path / "bad.npz", audio=audio)
    res = CliRunner().invoke(main, ["export", str(src), "--calib", str(tmp_path / "bad.npz"), "--out",
                                    str(tmp_path / "bad"), "--no-cache", "-q"])
    assert res.exit_code == 2 and "['audio', 'side']" in res.output, res.output
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("first", [1, "N"])  # a free first dim is fixed to the batch of 1: it disagrees too
def test_inputs_whose_first_dims_disagree_are_exit_2_not_an_internal_error(tmp_path, first):
    """silero-vad's openvino graph: input [1, 576] beside a recurrent state [2, 1, 128] (batch on axis 1). Every
    stage feeds samples along axis 0, so this cannot be calibrated: exit 2 naming both dims and the fix (it was an
    onnxruntime error reported as a bug in quantkit)."""
    from onnx import TensorProto, helper

    w = onnx.numpy_helper.from_array(np.ones((8, 4), np.float32), "w")
    nodes = [helper.make_node("MatMul", ["input", "w"], ["h"]), helper.make_node("ReduceSum", ["state"], ["s"]),
             helper.make_node("Add", ["h", "s"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [first, 8]),
                                           helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, 1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "rnn.onnx"))
    np.savez(tmp_path / "c.npz", input=np.ones((4, 8), np.float32), state=np.zeros((4, 1, 4), np.float32))
    res = CliRunner().invoke(main, ["export", str(tmp_path / "rnn.onnx"), "--calib", str(tmp_path / "c.npz"),
                                    "--out", str(tmp_path / "out"), "--no-cache", "-q"])
    assert res.exit_code == 2 and "disagree on their first (batch) dimension ('input': 1, 'state': 2)" in res.output, \
        res.output
    assert not (tmp_path / "out").exists()
