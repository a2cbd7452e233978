"""Q/DQ graph structure of quantkit's INT8 export, checked node by node, and parity in onnxruntime."""

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from quantkit.calibrate.driver import apply_calibration, run_calibration
from quantkit.calib_methods import MethodSettings
from quantkit.exporter import parity
from quantkit.exporter.onnx_export import export_onnx
from quantkit.exporter.passes import finalize_fp32, finalize_int8
from quantkit.models.ops import Add, Concat
from quantkit.quant.functional import expose_residual_adds
from quantkit.quant.insert import insert_quantizers


class Block(nn.Module):
    """conv -> relu -> conv, residual Add (module), concat of two branches, 1x1 conv, linear head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a = nn.Conv2d(8, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.add = Add()
        self.b = nn.Conv2d(8, 8, 1)
        self.cat = Concat(1)
        self.fuse = nn.Conv2d(16, 8, 1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        y = self.add(self.dw(torch.relu(self.a(x))), x)
        z = self.cat([y, torch.relu(self.b(x))])
        return self.fc(torch.relu(self.fuse(z)).mean((2, 3)))


def _calibrated(model, method="max"):
    torch.manual_seed(0)
    batches = [torch.rand(4, 3, 16, 16) for _ in range(3)]
    q, layout = insert_quantizers(model.eval())
    st = MethodSettings(method=method)
    apply_calibration(q, run_calibration(q, batches, st, progress=False), st)
    return q, layout, batches


def _producers(g):
    return {o: n for n in g.node for o in n.output}


@pytest.fixture(scope="module")
def exported():
    torch.manual_seed(0)
    model = Block().eval()
    q, layout, batches = _calibrated(model)
    m = finalize_int8(export_onnx(q, batches[0][:1]))
    return model, q, m, batches


def test_every_conv_and_gemm_has_quantized_data_and_int8_per_channel_weight(exported):
    _, _, m, _ = exported
    g = m.graph
    prod = _producers(g)
    inits = {t.name: t for t in g.initializer}
    layers = [n for n in g.node if n.op_type in ("Conv", "Gemm")]
    assert len(layers) == 6
    for n in layers:
        dq_x, dq_w = prod[n.input[0]], prod[n.input[1]]
        assert dq_x.op_type == "DequantizeLinear" and prod[dq_x.input[0]].op_type == "QuantizeLinear"
        assert dq_w.op_type == "DequantizeLinear"
        w = inits[dq_w.input[0]]
        assert w.data_type == onnx.TensorProto.INT8, n.name
        scale = numpy_helper.to_array(inits[dq_w.input[1]])
        axis = next((a.i for a in dq_w.attribute if a.name == "axis"), 1)
        assert axis == 0 and scale.shape == (numpy_helper.to_array(w).shape[0],)
        assert np.all(scale > 0) and np.all(np.isfinite(scale))


def test_zero_points_are_int8_zero_and_activation_scales_per_tensor(exported):
    _, _, m, _ = exported
    inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    for n in m.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            zp = inits[n.input[2]]
            assert zp.dtype == np.int8 and not zp.any()
        if n.op_type == "QuantizeLinear":
            assert inits[n.input[1]].size == 1  # activations: one scale


def test_residual_add_quantizes_only_the_skip_input(exported):
    _, _, m, _ = exported
    prod = _producers(m.graph)
    adds = [n for n in m.graph.node if n.op_type == "Add"]
    assert len(adds) == 1
    kinds = sorted(prod[i].op_type for i in adds[0].input)
    assert kinds == ["Conv", "DequantizeLinear"]  # conv path float (fused by TensorRT), skip Q/DQ'd


def test_concat_inputs_not_separately_quantized_consumer_is(exported):
    _, _, m, _ = exported
    prod = _producers(m.graph)
    cat = next(n for n in m.graph.node if n.op_type == "Concat")
    assert all(prod[i].op_type != "DequantizeLinear" for i in cat.input)
    consumers = [n for n in m.graph.node if cat.output[0] in n.input]
    assert [c.op_type for c in consumers] == ["QuantizeLinear"]  # one scale for the whole concat


def test_parity_torch_fakequant_vs_onnxruntime_above_40db(exported):
    _, q, m, batches = exported
    res = parity.compare(parity.torch_fn(q), parity.onnx_fn(parity.session(m)), batches, ["output"])
    assert res.worst >= 40.0, res


def test_int8_file_is_smaller_for_a_weight_heavy_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(128, 128, 3, padding=1)).eval()
    q, _, batches = _calibrated(model)
    fp32 = finalize_fp32(export_onnx(model, batches[0][:1])).SerializeToString()
    int8 = finalize_int8(export_onnx(q, batches[0][:1])).SerializeToString()
    assert len(int8) <= 0.30 * len(fp32)


def test_skipped_layer_exports_without_qdq_and_export_is_deterministic():
    torch.manual_seed(0)
    model = Block().eval()
    q, layout = insert_quantizers(model, skip=("fc",))
    assert "fc" not in layout.int8 and "fc" in layout.layers
    batches = [torch.rand(2, 3, 16, 16)]
    st = MethodSettings(method="percentile")
    apply_calibration(q, run_calibration(q, batches, st, progress=False), st)
    a = finalize_int8(export_onnx(q, batches[0][:1]))
    b = finalize_int8(export_onnx(q, batches[0][:1]))
    assert a.SerializeToString() == b.SerializeToString()
    prod = _producers(a.graph)
    gemm = next(n for n in a.graph.node if n.op_type == "Gemm")
    assert prod[gemm.input[0]].op_type != "DequantizeLinear"


def test_functional_add_in_user_model_becomes_quantized_skip():
    class Res(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = nn.Conv2d(4, 4, 3, padding=1)
            self.c2 = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            h = self.c1(x)
            return torch.relu(self.c2(torch.relu(h)) + h)

    gm, notes = expose_residual_adds(Res().eval())
    assert notes and "qk_add_0" in dict(gm.named_modules())
    q, layout, batches = _calibrated_input(gm, 4)
    m = finalize_int8(export_onnx(q, batches[0][:1]))
    prod = _producers(m.graph)
    add = next(n for n in m.graph.node if n.op_type == "Add")
    assert sorted(prod[i].op_type for i in add.input) == ["Conv", "DequantizeLinear"]


def _calibrated_input(model, c):
    batches = [torch.rand(2, c, 8, 8)]
    q, layout = insert_quantizers(model)
    st = MethodSettings(method="max")
    apply_calibration(q, run_calibration(q, batches, st, progress=False), st)
    return q, layout, batches


def test_passes_return_new_graphs_and_leave_their_input_untouched():
    from quantkit.exporter import passes

    torch.manual_seed(0)
    q, _, batches = _calibrated(Block().eval())
    raw = export_onnx(q, batches[0][:1])
    before = raw.SerializeToString()
    for p in (passes.constants_to_initializers, passes.inline_initializer_identities, passes.fold_weight_quantize,
              passes.remove_unused_initializers, passes.normalize, finalize_int8):
        out = p(raw)
        assert out is not raw and raw.SerializeToString() == before, p.__name__
    # the passes did something: the input still has float weights feeding QuantizeLinear, the output int8 ones
    def int8_weights(m):
        return sum(t.data_type == onnx.TensorProto.INT8 and len(t.dims) > 1 for t in m.graph.initializer)

    assert int8_weights(raw) == 0 and int8_weights(finalize_int8(raw)) == 6
