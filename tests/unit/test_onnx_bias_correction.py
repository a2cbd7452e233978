"""The ONNX route's bias correction (issue 22: the default passes on both routes). Oracles: each node's correction
re-measured here with torch's own conv / linear on the input tensor captured from the quantized twin in
onnxruntime (float weights) against that node's quantized output; the guard re-measured on the check rows; the FP32
graph byte-identical to an export without the step."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import numpy_helper

from quantkit.exporter import parity
from quantkit.onnxin.qdq import simulate_qdq
from quantkit.onnxin.route import quantize_onnx
from quantkit.ptq.guard import RowView, split_rows
from quantkit.recipe import load_recipe
from onnx_toy import toy_data, toy_onnx


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    d = tmp_path_factory.mktemp("bc")
    (d / "toy.onnx").write_bytes(toy_onnx())
    x = toy_data(32, seed=3)
    np.save(d / "calib.npy", x)
    return d / "toy.onnx", d / "calib.npy", x


def _recipe(model, npy, *extra):  # the step alone: no FP16 choice before it
    return load_recipe(None, [f"model.name='{model}'", f"calibration.data='{npy}'", "calibration.use_cache=false",
                              "calibration.method=max", "sensitivity.min_int8_share=null", *extra])


def _step(res):
    return next(s for s in res.passes["steps"] if s["name"] == "bias_correction")


def _biases(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return {n.name: inits[n.input[2]] for n in model.graph.node
            if n.op_type in ("Conv", "ConvTranspose", "Gemm") and len(n.input) > 2 and n.input[2] in inits}


def _capture(model: onnx.ModelProto, tensors: list[str], x: np.ndarray) -> dict[str, np.ndarray]:
    m = copy.deepcopy(model)
    m.graph.output.extend(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None) for t in tensors)
    sess = parity.session(m.SerializeToString(), 1)
    names = [o.name for o in sess.get_outputs()]
    outs = [dict(zip(names, sess.run(None, {sess.get_inputs()[0].name: x[i:i + 1]}))) for i in range(len(x))]
    return {t: np.concatenate([o[t] for o in outs]) for t in tensors}


def test_each_correction_is_the_nodes_own_mean_shift(toy):
    model, npy, x = toy
    res = quantize_onnx(str(model), str(npy), _recipe(model, npy), progress=False)
    step = _step(res)
    assert step["tried"] and step["measured"]["corrected_nodes"] > 0
    assert step["kept"]  # on this toy the step is kept (else nothing below would be compared)
    fp32 = onnx.load_from_string(res.fp32_bytes)
    before, after = _biases(fp32), _biases(res.int8)
    fit, _ = split_rows(len(x))

    class _Cal:
        array, batch_size, num_samples = x, 32, len(x)

    fit_x = np.concatenate([b.numpy() for b in RowView(_Cal, fit).batches(limit=8, spread=True)])
    sim = simulate_qdq(fp32, res.layout, res.act_scales, res.weight_scales)  # the uncorrected twin
    nodes = {n.name: n for n in fp32.graph.node}
    inits = {t.name: numpy_helper.to_array(t) for t in fp32.graph.initializer}
    checked = 0
    for name in res.layout.int8:
        node = nodes[name]
        if node.op_type not in ("Conv", "Gemm") or name not in before:
            continue
        t_in = res.layout.candidates[name].act_input[1]
        got = _capture(sim, [t_in, node.output[0]], fit_x)
        xin = torch.from_numpy(got[t_in])
        w, b = torch.from_numpy(inits[node.input[1]]), torch.from_numpy(before[name])
        if node.op_type == "Conv":
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            ref = F.conv2d(xin, w, b, stride=tuple(attrs.get("strides", [1, 1])),
                           padding=tuple(attrs.get("pads", [0, 0, 0, 0])[:2]), groups=attrs.get("group", 1))
        else:  # Gemm, transB=1 as torch exports Linear
            ref = F.linear(xin, w, b)
        shift = (ref.double().numpy() - got[node.output[0]].astype(np.float64))
        shift = np.moveaxis(shift, 1, 0).reshape(shift.shape[1], -1).mean(axis=1)
        np.testing.assert_allclose(after[name] - before[name], shift, rtol=1e-3, atol=1e-5, err_msg=name)
        checked += 1
    assert checked >= 3


def test_guard_and_fp32_graph(toy):
    model, npy, x = toy
    res = quantize_onnx(str(model), str(npy), _recipe(model, npy), progress=False)
    off = quantize_onnx(str(model), str(npy), _recipe(model, npy, "ptq.bias_correction=false"), progress=False)
    assert res.fp32_bytes == off.fp32_bytes  # model.onnx never carries the corrections
    step = _step(res)
    _, check = split_rows(len(x))
    names = [o.name for o in res.sim.graph.output]
    ref = [parity.run_session(parity.session(res.fp32_bytes, 1), x[check])]

    def worst(sim):
        got = [parity.run_session(parity.session(sim.SerializeToString(), 1), x[check])]
        r = parity.compare_outputs(ref, got, names, parity.sigmoid_outputs(sim))
        return min(r.judged_db(n) for n in names)

    corrected_twin = res.sim if step["kept"] else None
    assert step["check_sqnr_db_before"] == pytest.approx(worst(off.sim), abs=1e-3)
    if corrected_twin is not None:
        assert step["check_sqnr_db_after"] == pytest.approx(worst(corrected_twin), abs=1e-3)
        assert step["check_sqnr_db_after"] > step["check_sqnr_db_before"]
        assert res.int8.SerializeToString() != off.int8.SerializeToString()
    else:
        assert res.int8.SerializeToString() == off.int8.SerializeToString()


def test_off_in_the_recipe_runs_nothing(toy):
    model, npy, _ = toy
    res = quantize_onnx(str(model), str(npy), _recipe(model, npy, "ptq.bias_correction=false"), progress=False)
    step = _step(res)
    assert not step["tried"] and step["verdict"] == "off in the recipe"
