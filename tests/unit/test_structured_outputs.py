"""Models whose forward returns a dict, a named tuple or nested lists (torchvision's segmentation models return
``OrderedDict(out=..., aux=...)``): exported with their tensors as the graphs' outputs, named after their keys
(it was an internal error). Oracle: the torch model's own dict, compared output by output in onnxruntime."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner

from quantkit.cli import main

NETS = '''
from collections import OrderedDict, namedtuple

import torch
from torch import nn

Pair = namedtuple("Pair", "mask edges")


class Seg(nn.Module):
    """A residual conv body (its add becomes a module through torch.fx) and two heads, returned as a dict."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.body = nn.Conv2d(16, 16, 3, padding=1)
        self.out = nn.Conv2d(16, 3, 1)
        self.aux = nn.Conv2d(16, 2, 1)

    def forward(self, x):
        y = torch.relu(self.stem(x))
        y = torch.relu(self.body(y)) + y
        return OrderedDict(out=self.out(y), aux=self.aux(y))


class Nested(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 4, 1)
        self.c = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        y = torch.relu(self.a(x))
        return y.mean((2, 3)), {"heads": [self.b(y), Pair(self.c(y), self.c(y).abs())]}


class WithInt(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return {"y": self.a(x), "stride": 8}


def seg():
    return Seg().eval()


def nested():
    return Nested().eval()


def with_int():
    return WithInt().eval()
'''


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("structured")
    (d / "nets.py").write_text(NETS)
    spec = importlib.util.spec_from_file_location("qk_structured_nets", d / "nets.py")
    nets = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(nets)
    x = np.random.default_rng(0).random((24, 3, 32, 32), dtype=np.float32)
    np.save(d / "calib.npy", x)
    return d, nets


def _export(d: Path, factory: str, out: str):
    res = CliRunner().invoke(main, ["export", f"{d / 'nets.py'}:{factory}", "--calib", str(d / "calib.npy"), "--out",
                                    str(d / out), "--no-cache", "-q"])
    return res.exit_code, res.output, d / out


def _sqnr(ref, test) -> float:
    ref, test = np.asarray(ref, np.float64), np.asarray(test, np.float64)
    return 10 * math.log10(np.sum(ref ** 2) / max(np.sum((ref - test) ** 2), 1e-30))


def _ort(path: Path, x: np.ndarray) -> dict[str, np.ndarray]:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    runs = [sess.run(None, {"images": x[i:i + 1]}) for i in range(len(x))]
    return {n: np.concatenate([r[k] for r in runs]) for k, n in enumerate(names)}


def test_dict_output_with_an_fx_rewritten_residual(work):
    d, nets = work
    code, text, out = _export(d, "seg", "out_seg")
    assert code == 0, text
    held = np.random.default_rng(5).random((6, 3, 32, 32), dtype=np.float32)
    with torch.no_grad():
        ref = nets.seg()(torch.from_numpy(held))
    for name, floor in (("model.onnx", 80.0), ("model.int8.onnx", 25.0)):
        got = _ort(out / name, held)
        assert list(got) == ["out", "aux"], name
        for key in ("out", "aux"):
            assert _sqnr(ref[key].numpy(), got[key]) > floor, (name, key)
    import json

    report = json.loads((out / "report.json").read_text())
    assert any("the model returns a" in n and "named out, aux" in n for n in report["notes"])
    assert any(r["type"] == "Add" and r["precision"] == "int8" for r in report["layers"])  # the residual add


def test_nested_outputs_are_named_by_their_path(work):
    d, nets = work
    code, text, out = _export(d, "nested", "out_nested")
    assert code == 0, text
    names = [o.name for o in onnx.load(str(out / "model.onnx")).graph.output]
    assert names == ["output_0", "output_1_heads_0", "output_1_heads_1_mask", "output_1_heads_1_edges"]
    held = np.random.default_rng(6).random((4, 3, 32, 32), dtype=np.float32)
    with torch.no_grad():
        flat, tree = nets.nested()(torch.from_numpy(held))
    want = [flat, tree["heads"][0], tree["heads"][1].mask, tree["heads"][1].edges]
    got = _ort(out / "model.onnx", held)
    assert all(_sqnr(w.numpy(), got[n]) > 80 for w, n in zip(want, names))


def test_a_non_tensor_output_is_exit_2_naming_it(work):
    d, _ = work
    code, text, out = _export(d, "with_int", "out_int")
    assert code == 2 and "model output 'stride' is a int, not a tensor" in text, text
    assert not out.exists()


def test_the_users_model_object_is_unchanged(work):
    from quantkit.pipeline import quantize_recipe
    from quantkit.recipe import load_recipe

    d, nets = work
    net = nets.seg()
    recipe = load_recipe(None, ["calibration.use_cache=false", "calibration.method=max", "input.size=[32, 32]"])
    state = quantize_recipe(recipe, model=net, calib=np.load(d / "calib.npy")[:8], progress=False)
    x = torch.zeros(1, 3, 32, 32)
    with torch.no_grad():
        assert isinstance(net(x), dict) and isinstance(state.model.fp32(x), tuple)
