"""Integer model inputs (token ids, uint8 pixels) from .npy / .npz on both routes.

Oracles: the torch FP32 model run on the integer tensors themselves, and onnxruntime running the exported graphs
with the integer feeds a deployment gives them. Fractional values for an integer input, and integers float32
cannot carry exactly, are exit 2 naming the fix, with nothing written.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from quantkit.cli import main
from user_nets import ort_per_sample, sqnr_db, write_nets
from quantkit.data.dtypes import EXACT_INT_LIMIT, integer_dtype
from quantkit.data.inputs import ort_feeds
from quantkit.errors import DataError

NETS = '''
import torch
from torch import nn


class Tokens(nn.Module):
    """forward(ids (N, L) int64): embedding -> Conv1d -> mean -> Linear."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(500, 16)
        self.conv = nn.Conv1d(16, 32, 3, padding=1)
        self.fc = nn.Linear(32, 4)

    def forward(self, ids):
        return self.fc(torch.relu(self.conv(self.emb(ids).transpose(1, 2))).mean(-1))


class TokensAndMask(Tokens):
    """forward(ids int64, mask float): the embedding masked before the conv."""

    def forward(self, ids, mask):
        x = self.emb(ids).transpose(1, 2) * mask[:, None, :]
        return self.fc(torch.relu(self.conv(x)).mean(-1))


class Pixels(nn.Module):
    """forward(x (N, H, W, 3) uint8): NHWC bytes -> float NCHW / 255 -> two convs -> Linear."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        x = x.permute(0, 3, 1, 2).float() / 255.0
        return self.fc(torch.relu(self.c2(torch.relu(self.c1(x)))).mean((2, 3)))


def tokens():
    return Tokens().eval()


def masked():
    return TokensAndMask().eval()


def pixels():
    return Pixels().eval()
'''


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("ints")
    nets = write_nets(d, NETS, "qk_int_nets")
    r = np.random.default_rng(0)
    np.save(d / "ids.npy", r.integers(0, 500, (40, 24)))
    np.savez(d / "masked.npz", mask=(r.random((40, 24)) > 0.2).astype(np.float32), ids=r.integers(0, 500, (40, 24)))
    np.save(d / "pixels.npy", r.integers(0, 256, (40, 16, 16, 3)).astype(np.uint8))
    return d, nets


def _export(model: list[str], calib: Path, out: Path, *extra: str):
    res = CliRunner().invoke(main, ["export", *model, "--calib", str(calib), "--out", str(out), "--no-cache", "--json",
                                    "-q", *extra])
    return res.exit_code, res.output


def _input_types(path: Path) -> dict[str, str]:
    m = onnx.load(str(path))
    return {i.name: onnx.TensorProto.DataType.Name(i.type.tensor_type.elem_type) for i in m.graph.input}


HELD = np.random.default_rng(9)  # held-out samples, never calibrated on


@pytest.mark.parametrize("factory, calib, names, types", [
    ("tokens", "ids.npy", ["images"], {"images": "INT64"}),
    ("masked", "masked.npz", ["mask", "ids"], {"mask": "FLOAT", "ids": "INT64"}),
    ("pixels", "pixels.npy", ["images"], {"images": "UINT8"}),
])
def test_both_routes_take_integer_inputs_and_keep_their_type(work, factory, calib, names, types):
    d, nets = work
    torch_out, onnx_out = d / f"t_{factory}", d / f"o_{factory}"
    code, text = _export([f"{d / 'nets.py'}:{factory}"], d / calib, torch_out)
    assert code == 0, text
    # the ONNX route on the torch route's own FP32 graph, which takes the integers as such
    code, text = _export([str(torch_out / "model.onnx")], d / calib, onnx_out)
    assert code == 0, text
    if factory == "pixels":
        held = {"images": HELD.integers(0, 256, (8, 16, 16, 3)).astype(np.uint8)}
    else:
        held = {"ids": HELD.integers(0, 500, (8, 24))}
        if factory == "masked":
            held["mask"] = (HELD.random((8, 24)) > 0.2).astype(np.float32)
    with torch.no_grad():
        args = {k: torch.from_numpy(v) for k, v in held.items()}
        ref = (nets.masked()(**args) if factory == "masked" else getattr(nets, factory)()(*args.values())).numpy()
    feeds = held if factory == "masked" else {"images": next(iter(held.values()))}
    for out in (torch_out, onnx_out):
        for name in ("model.onnx", "model.int8.onnx", "model.int8.strong.onnx"):
            assert _input_types(out / name) == types, (out, name)
        assert sqnr_db(ref, ort_per_sample(out / "model.onnx", feeds)) > 100.0  # the FP32 graph is the torch model
        assert sqnr_db(ref, ort_per_sample(out / "model.int8.onnx", feeds)) > 25.0
        report = json.loads((out / "report.json").read_text())
        want = {k: {"INT64": "int64", "UINT8": "uint8"}[v] for k, v in types.items() if v != "FLOAT"}
        assert report["input"]["integer_inputs"] == want
        assert report["int8_mac_share"]["share"] > 0.95


def test_fractional_values_for_an_integer_input_are_exit_2(work, tmp_path):
    d, _ = work
    code, text = _export([f"{d / 'nets.py'}:tokens"], d / "ids.npy", tmp_path / "t")
    assert code == 0, text
    np.save(tmp_path / "frac.npy", np.random.default_rng(1).random((8, 24)).astype(np.float32) * 100)
    code, text = _export([str(tmp_path / "t" / "model.onnx")], tmp_path / "frac.npy", tmp_path / "o")
    assert code == 2 and "fractional values" in text and "integer dtype" in text, text
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("arr, expect", [
    (np.array([[0, EXACT_INT_LIMIT + 1]], np.int64), "2**24"),
    (np.zeros((2, 3), np.float64), "has dtype float64"),
    (np.zeros((2, 3), np.complex64), "has dtype complex64"),
])
def test_arrays_float32_cannot_carry_are_refused(work, tmp_path, arr, expect):
    d, _ = work
    np.save(tmp_path / "bad.npy", arr)
    code, text = _export([f"{d / 'nets.py'}:tokens"], tmp_path / "bad.npy", tmp_path / "o")
    assert code == 2 and expect in text, text
    assert not (tmp_path / "o").exists()


def test_integer_dtype_and_feeds_closed_form():
    assert integer_dtype(np.zeros((2, 2), np.float32), "x") is None
    assert integer_dtype(np.full((2, 2), EXACT_INT_LIMIT, np.int64), "x") == "int64"
    assert integer_dtype(np.zeros((2, 2), bool), "x") == "bool"
    with pytest.raises(DataError, match="2\\*\\*24"):
        integer_dtype(np.full((1, 1), -EXACT_INT_LIMIT - 1, np.int64), "x")

    class Inp:  # what onnxruntime's session.get_inputs() gives
        def __init__(self, name, type_, shape):
            self.name, self.type, self.shape = name, type_, shape

    packed = np.array([[3.0, 7.0, 0.5], [499.0, 1.0, 0.25]], np.float32)  # ids (2,) then mask (1,)
    feeds = ort_feeds([Inp("ids", "tensor(int64)", [1, 2]), Inp("mask", "tensor(float)", [1, 1])], packed)
    assert feeds["ids"].dtype == np.int64 and feeds["ids"].tolist() == [[3, 7], [499, 1]]
    assert feeds["mask"].dtype == np.float32 and feeds["mask"].tolist() == [[0.5], [0.25]]
    one = ort_feeds([Inp("img", "tensor(uint8)", [1, 2])], np.array([[255.0, 0.0]], np.float32))
    assert one["img"].dtype == np.uint8 and one["img"].tolist() == [[255, 0]]


def test_integers_for_a_model_that_takes_floats_are_exit_2_naming_the_fix(tmp_path):
    """uint8 pixels saved for a float model: the torch model refuses them (told to save float32), and the ONNX
    route refuses them for a float32 graph input instead of feeding un-normalized values."""
    np.save(tmp_path / "u8.npy", np.random.default_rng(2).integers(0, 256, (8, 3, 32, 32)).astype(np.uint8))
    code, text = _export(["--model", "trees"], tmp_path / "u8.npy", tmp_path / "t")
    assert code == 2 and "uint8 values" in text and "float32" in text, text
    assert not (tmp_path / "t").exists()
    conv = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU()).eval()
    torch.onnx.export(conv, torch.zeros(1, 3, 32, 32), str(tmp_path / "f.onnx"), input_names=["x"], opset_version=17,
                      dynamo=False)
    code, text = _export([str(tmp_path / "f.onnx")], tmp_path / "u8.npy", tmp_path / "o")
    assert code == 2 and "holds uint8 values for the model's float32 input 'x'" in text, text
    assert not (tmp_path / "o").exists()
