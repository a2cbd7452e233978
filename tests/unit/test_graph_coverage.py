"""Coverage from the exported graph: every weighted op INT8 or float with a reason; the INT8 MAC share counted
on the graph that ships.

Oracles: MACs in closed form from the layer shapes; the graph structure itself (a planted float conv is found
whatever quantkit believed it wrapped); the public export path end to end.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import quantkit
from quantkit.calibrate.driver import apply_calibration, run_calibration
from quantkit.calib_methods import MethodSettings
from quantkit.errors import CoverageError
from quantkit.exporter.coverage import coverage_failure, graph_coverage
from quantkit.exporter.onnx_export import export_onnx
from quantkit.exporter.passes import finalize_int8
from quantkit.quant.insert import insert_quantizers
from quantkit.recipe import Recipe
from quantkit.report.sections import fp16_reasons


class Conv2dSame(nn.Conv2d):
    """Dynamic "same" padding in forward, then F.conv2d: the exact-type swap table used to miss it."""

    def forward(self, x):
        pads = []
        for size, k, s in zip(x.shape[:1:-1], self.kernel_size[::-1], self.stride[::-1]):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return F.conv2d(F.pad(x, pads), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class FunctionalConv(nn.Module):
    """A planted un-quantized conv: its own weight parameter, applied with F.conv2d; no conv module at all."""

    def __init__(self, cin, cout):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin, 3, 3) * 0.1)

    def forward(self, x):
        return F.conv2d(x, self.weight, padding=1)


class SameNet(nn.Module):
    def __init__(self, planted: bool = False):
        super().__init__()
        self.stem = Conv2dSame(3, 8, 3, stride=2)
        self.mid = FunctionalConv(8, 8) if planted else Conv2dSame(8, 8, 3)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.mid(torch.relu(self.stem(x))))
        return self.head(x.mean((2, 3)))


# MACs per image at 16x16: stem 8x8 outputs x 8 x (3*9); mid 8x8 x 8 x (8*9); head 8 x 4
MACS = {"stem": 64 * 8 * 27, "mid": 64 * 8 * 72, "head": 32}


def _exported(model, skip=(), dynamic=False):
    torch.manual_seed(0)
    batches = [torch.rand(2, 3, 16, 16) for _ in range(2)]
    q, layout = insert_quantizers(model.eval(), skip=skip)
    st = MethodSettings(method="max")
    apply_calibration(q, run_calibration(q, batches, st, progress=False), st)
    return finalize_int8(export_onnx(q, batches[0][:1], dynamic_batch=dynamic)), layout, q


def _coverage(model, skip=(), dynamic=False):
    m, layout, q = _exported(model, skip, dynamic)
    names = {n for n, _ in q.named_modules() if n}
    return graph_coverage(m, layers=names, reasons=fp16_reasons(layout, ("*",), tuple(skip))), layout


@pytest.mark.parametrize("dynamic", [False, True])
def test_subclass_convs_count_as_int8_with_closed_form_macs(dynamic):
    torch.manual_seed(0)
    cov, _ = _coverage(SameNet(), dynamic=dynamic)
    assert [(o.layer, o.op, o.int8) for o in cov.ops] == [("stem", "Conv", True), ("mid", "Conv", True),
                                                          ("head", "Gemm", True)]
    assert {o.layer: o.macs for o in cov.ops} == MACS  # a dynamic batch counts as 1
    assert cov.share == 1.0 and not cov.unexplained() and coverage_failure(cov) is None
    assert cov.mac_share()["total_macs"] == sum(MACS.values())


def test_a_planted_float_conv_is_an_unexplained_error_naming_the_layer():
    torch.manual_seed(0)
    cov, layout = _coverage(SameNet(planted=True))
    assert "mid" not in layout.layers  # quantkit never saw it as a layer ...
    (bad,) = cov.unexplained()  # ... the graph does
    assert (bad.layer, bad.op, bad.int8, bad.macs, bad.reason) == ("mid", "Conv", False, MACS["mid"], None)
    assert cov.share == pytest.approx((MACS["stem"] + MACS["head"]) / sum(MACS.values()))
    msg = coverage_failure(cov, wrapped=set(layout.layers))
    assert msg.startswith("1 weighted op(s) in model.int8.onnx run in float with no reason: mid (Conv)")
    assert "register_quant_module" in msg and f"{100 * cov.share:.2f} %" in msg


def test_a_skipped_layer_is_float_with_its_reason():
    torch.manual_seed(0)
    cov, _ = _coverage(SameNet(), skip=("mid",))
    (fl,) = cov.float_ops()
    assert fl.layer == "mid" and fl.reason == "recipe: matches quantization.skip 'mid'"
    assert not cov.unexplained() and cov.share == pytest.approx(1 - MACS["mid"] / sum(MACS.values()))


def _graph(nodes, inits, x_shape, out_shape):
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _qdq(name, inp, scale="s", zp="z", axis=None):
    kw = {} if axis is None else {"axis": axis}
    return [helper.make_node("QuantizeLinear", [inp, scale, zp], [f"{name}_q"], name=f"{name}/Q"),
            helper.make_node("DequantizeLinear", [f"{name}_q", scale, zp], [f"{name}_dq"], name=f"{name}/DQ", **kw)]


def test_matmul_gemm_and_conv_transpose_from_a_hand_built_graph():
    """MatMul with its int8 weight behind a Transpose, Gemm with a float weight (x data quantized), a
    ConvTranspose fully quantized, and an activation x activation MatMul that has no weight."""
    s, z = numpy_helper.from_array(np.float32(0.1), "s"), numpy_helper.from_array(np.int8(0), "z")
    w_mm = numpy_helper.from_array(np.ones((6, 8), np.int8), "fc.weight_int8")  # [N, K], transposed in the graph
    ws = numpy_helper.from_array(np.full(6, 0.1, np.float32), "ws")
    w_gemm = numpy_helper.from_array(np.ones((5, 6), np.float32), "g.weight")
    w_ct = numpy_helper.from_array(np.ones((5, 3, 2, 2), np.int8), "up.weight_int8")
    ws3 = numpy_helper.from_array(np.full(3, 0.1, np.float32), "ws3")
    nodes = [*_qdq("x", "x"),
             helper.make_node("DequantizeLinear", ["fc.weight_int8", "ws", "z6"], ["wdq"], axis=0),
             helper.make_node("Transpose", ["wdq"], ["wt"], perm=[1, 0]),
             helper.make_node("MatMul", ["x_dq", "wt"], ["h"], name="/fc/MatMul"),  # [4, 6]
             *_qdq("h", "h"),
             helper.make_node("Gemm", ["h_dq", "g.weight"], ["k"], name="/g/Gemm", transB=1),  # [4, 5]
             helper.make_node("Reshape", ["k", "shape"], ["k4"]),  # [1, 5, 2, 2]
             *_qdq("k", "k4"),
             helper.make_node("DequantizeLinear", ["up.weight_int8", "ws3", "z3"], ["w3"], axis=1),
             helper.make_node("ConvTranspose", ["k_dq", "w3"], ["c"], name="/up/ConvTranspose", strides=[2, 2]),
             helper.make_node("MatMul", ["c", "c"], ["y"], name="/attn/MatMul")]
    inits = [s, z, w_mm, ws, w_gemm, w_ct, ws3, numpy_helper.from_array(np.zeros(6, np.int8), "z6"),
             numpy_helper.from_array(np.zeros(3, np.int8), "z3"),
             numpy_helper.from_array(np.array([1, 5, 2, 2], np.int64), "shape")]
    m = _graph(nodes, inits, [4, 8], [1, 3, 4, 4])
    cov = graph_coverage(m, layers={"fc", "g", "up", "attn"}, reasons={"g": "kept FP16 by the test"})
    assert [(o.layer, o.op, o.int8, o.macs, o.reason) for o in cov.ops] == [
        ("fc", "MatMul", True, 4 * 6 * 8, None),
        ("g", "Gemm", False, 4 * 5 * 6, "kept FP16 by the test"),
        ("up", "ConvTranspose", True, 1 * 5 * 2 * 2 * 3 * 2 * 2, None)]
    assert not cov.unexplained()
    assert graph_coverage(m, layers={"fc", "g", "up"}).unexplained()[0].layer == "g"  # no reason given: error


# ------------------------------------------------------------------------- the public export path, end to end


def _recipe() -> Recipe:
    r = Recipe()
    return replace(r, calibration=replace(r.calibration, method="max", use_cache=False),
                   export=replace(r.export, targets=("weak",)),
                   sensitivity=replace(r.sensitivity, min_int8_share=None))


@pytest.fixture(scope="module")
def calib():
    return np.random.default_rng(0).random((4, 3, 16, 16), dtype=np.float32)


def test_export_reports_the_graph_share_for_a_subclass_model(calib, tmp_path):
    torch.manual_seed(0)
    qmodel = quantkit.quantize(SameNet().eval(), calib, _recipe(), progress=False)
    res = quantkit.export(qmodel, tmp_path / "out", progress=False)
    share, cov = res.report["int8_mac_share"], res.report["coverage"]
    assert share["share"] == 1.0 and share["total_macs"] == sum(MACS.values()) and share["source"] == "model.int8.onnx"
    assert cov["weighted_ops"] == cov["int8_ops"] == 3 and cov["error"] is None
    assert "INT8 share of MACs | 100.00%" in (tmp_path / "out" / "report.md").read_text()


def test_export_with_a_planted_float_conv_exits_2_and_keeps_the_artifacts(calib, tmp_path):
    torch.manual_seed(0)
    qmodel = quantkit.quantize(SameNet(planted=True).eval(), calib, _recipe(), progress=False)
    out = tmp_path / "out"
    with pytest.raises(CoverageError, match=r"run in float with no reason: mid \(Conv\).*artifacts and report "
                                            r"written to") as exc:
        quantkit.export(qmodel, out, progress=False)
    assert exc.value.exit_code == 2
    report = json.loads((out / "report.json").read_text())
    assert report["int8_mac_share"]["share"] < 1 and report["coverage"]["unexplained"] == ["mid"]
    assert report["coverage"]["error"] in str(exc.value)
    assert (out / "model.int8.onnx").is_file() and (out / "manifest.json").is_file()
    assert "**Error: 1 weighted op(s)" in (out / "report.md").read_text()
    assert onnx.load(str(out / "model.int8.onnx")).graph.node  # a readable graph to inspect


def test_decode_math_on_a_softmax_output_is_float_by_rule():
    """A detector's DFL projection: Softmax over bins, then MatMul with a constant vector of bin values."""
    proj = numpy_helper.from_array(np.arange(4, dtype=np.float32), "proj")
    nodes = [helper.make_node("Softmax", ["x"], ["p"], axis=-1),
             helper.make_node("Reshape", ["p", "shape"], ["pr"]),
             helper.make_node("MatMul", ["pr", "proj"], ["y"], name="/heads/MatMul")]
    shape = numpy_helper.from_array(np.array([2, 6, 4], np.int64), "shape")
    cov = graph_coverage(_graph(nodes, [proj, shape], [2, 24], [2, 6]), layers={"heads"})
    (op,) = cov.ops
    assert (op.layer, op.int8, op.macs) == ("heads", False, 2 * 6 * 4)
    assert op.reason == "rule: reads a Softmax output (score / decode math stays float)" and not cov.unexplained()


def test_onnx_route_reports_the_graph_share_with_reasons(tmp_path):
    from onnx_toy import toy_data, toy_onnx

    from quantkit.pipeline_onnx import run_onnx_export
    from quantkit.onnxin.placement import build_layout
    from quantkit.recipe import load_recipe

    model, npy = tmp_path / "toy.onnx", tmp_path / "calib.npy"
    model.write_bytes(toy_onnx(fold=False))
    np.save(npy, toy_data(8))
    layout = build_layout(onnx.load(str(model)))
    conv = next(n for n, c in layout.candidates.items() if c.op_type == "Conv")
    recipe = load_recipe(None, [f"model.name='{model}'", f"calibration.data='{npy}'", "calibration.use_cache=false",
                                f"quantization.skip=['{conv}']", "export.targets=['weak']"])
    res = run_onnx_export(recipe, tmp_path / "out", progress=False)
    cov, share = res.report["coverage"], res.report["int8_mac_share"]
    assert cov["error"] is None and cov["unexplained"] == []
    skipped = [o for o in cov["float_ops"] if o["node"] == conv]
    assert skipped and skipped[0]["reason"] == f"recipe: matches quantization.skip '{conv}'"
    int8 = onnx.load(str(tmp_path / "out" / "model.int8.onnx"))
    assert share["share"] == round(graph_coverage(int8).share, 4) and 0 < share["share"] < 1


NET_PY = '''
import math
import torch
import torch.nn.functional as F
from torch import nn


class FunctionalConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(8, 3, 3, 3) * 0.1)

    def forward(self, x):
        return F.conv2d(x, self.weight, padding=1)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.planted = FunctionalConv()
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(torch.relu(self.planted(x)))


def build():
    torch.manual_seed(0)
    return Net()
'''


def test_cli_exit_2_and_json_summary_for_a_planted_float_conv(tmp_path, calib):
    from click.testing import CliRunner

    from quantkit.cli import main

    (tmp_path / "net.py").write_text(NET_PY)
    np.save(tmp_path / "calib.npy", calib)
    out = tmp_path / "out"
    run = CliRunner().invoke(main, ["export", "--model", f"{tmp_path / 'net.py'}:build", "--calib",
                                    str(tmp_path / "calib.npy"), "--out", str(out), "--no-cache", "--full-int8",
                                    "--json", "--quiet", "--set", "export.targets=['weak']"])
    assert run.exit_code == 2, run.output
    summary = json.loads(next(s for s in run.stdout.splitlines() if s.startswith("{")))  # stderr may be mixed in
    assert summary["ok"] is False and summary["exit_code"] == 2
    assert "run in float with no reason: planted (Conv)" in summary["error"]
    report = json.loads((out / "report.json").read_text())
    assert report["coverage"]["unexplained"] == ["planted"] and report["int8_mac_share"]["share"] < 0.5
