"""Conv / Linear subclasses are quantized through the isinstance registry, keeping their own forward.

Oracles: the float model itself (quantizers disabled must give the same bits), a hand-computed fake-quant
reference (pad, quantize, conv), and onnxruntime running the exported Q/DQ graph.
"""

import math

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import quantkit
from quantkit.calibrate.driver import apply_calibration, run_calibration
from quantkit.calib_methods import MethodSettings
from quantkit.errors import ModelError, UsageError
from quantkit.sqnr import sqnr_db
from quantkit.exporter import parity
from quantkit.exporter.layer_parity import layer_parity
from quantkit.exporter.onnx_export import export_onnx
from quantkit.exporter.passes import finalize_int8
from quantkit.models.ops import Add
from quantkit.quant.insert import insert_quantizers, quantizable_layers, set_precision
from quantkit.quant.modules import QUANT_TYPES, QuantConv2d, QuantModule
from quantkit.quant.registry import QUANT_MODULES, QuantWrapper, quant_module_for, register_quant_module
from quantkit.quant.tensor_quantizer import TensorQuantizer


class Conv2dSame(nn.Conv2d):
    """TensorFlow "same" padding computed from the input size at run time, as in timm's Conv2dSame and the
    EfficientNet ports: the padding lives in forward, which then calls F.conv2d itself."""

    def forward(self, x):
        pads = []
        for size, k, s, d in zip(x.shape[:1:-1], self.kernel_size[::-1], self.stride[::-1], self.dilation[::-1]):
            total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
            pads += [total // 2, total - total // 2]
        return F.conv2d(F.pad(x, pads), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class ScaledLinear(nn.Linear):
    """A Linear whose forward scales its output by a plain attribute."""

    def __init__(self, *a, gain: float = 0.5, **k):
        super().__init__(*a, **k)
        self.gain = gain

    def forward(self, x):
        return F.linear(x, self.weight, self.bias) * self.gain


class Net(nn.Module):
    """Same-padding convs (strided, depthwise), a plain Conv1d, a Linear subclass on 3-D tokens and on 2-D."""

    def __init__(self):
        super().__init__()
        self.stem = Conv2dSame(3, 8, 3, stride=2)
        self.dw = Conv2dSame(8, 8, 5, groups=8)
        self.c1d = nn.Conv1d(8, 8, 3, padding=1)
        self.tok = ScaledLinear(8, 8, gain=2.0)
        self.head = ScaledLinear(8, 4)

    def forward(self, x):
        x = torch.relu(self.dw(torch.relu(self.stem(x))))
        t = torch.relu(self.c1d(x.flatten(2)))
        return self.head(torch.relu(self.tok(t.transpose(1, 2))).mean(1))


LAYERS = {"stem": "Conv2dSame", "dw": "Conv2dSame", "c1d": "Conv1d", "tok": "ScaledLinear", "head": "ScaledLinear"}


def _batches():
    torch.manual_seed(0)
    return [torch.rand(4, 3, 16, 17) for _ in range(3)]  # 16 rows, stride 2: asymmetric same-padding


def _calibrated(model):
    q, layout = insert_quantizers(model.eval())
    st = MethodSettings(method="max")
    apply_calibration(q, run_calibration(q, _batches(), st, progress=False), st)
    return q, layout


@pytest.fixture(scope="module")
def quantized():
    torch.manual_seed(0)
    model = Net().eval()
    q, layout = _calibrated(model)
    return model, q, layout


def test_subclasses_and_1d_convs_are_quantizable_and_keep_their_type(quantized):
    model, q, layout = quantized
    assert quantizable_layers(model) == LAYERS
    assert layout.int8 == list(LAYERS)
    for name in LAYERS:
        m = q.get_submodule(name)
        assert isinstance(m, QUANT_TYPES) and isinstance(m, type(model.get_submodule(name)))
        assert type(m).__name__ == "Quant" + LAYERS[name]
        assert m._input_quantizer.amax is not None and m._weight_quantizer.amax is not None
    assert q.tok.gain == 2.0  # the subclass's own attributes come along
    assert q.stem._weight_quantizer.amax.shape == (8, 1, 1, 1)


def test_disabled_quantizers_give_the_float_models_bits(quantized):
    model, q, _ = quantized
    x = _batches()[0]
    set_precision(q, set())
    try:
        with torch.no_grad():
            assert torch.equal(q(x), model(x))
    finally:
        set_precision(q, set(LAYERS))


def test_same_padding_conv_quantizes_at_the_conv_after_its_own_padding(quantized):
    model, q, _ = quantized
    x = _batches()[0]
    stem = q.stem
    s_in = stem._input_quantizer.amax / 127
    s_w = (stem._weight_quantizer.amax / 127).reshape(-1, 1, 1, 1)
    pads = [1, 1, 0, 1]  # what Conv2dSame computes for 16x17, k3, s2 (w: 1 + 1, h: 0 + 1)
    xp = F.pad(x, pads)
    with torch.no_grad():
        ref = F.conv2d(torch.clamp(torch.round(xp / s_in), -128, 127) * s_in,
                       torch.clamp(torch.round(stem.weight / s_w), -128, 127) * s_w, stem.bias, stride=2)
        y, y_fp = stem(x), model.stem(x)
    assert y.shape == y_fp.shape == (4, 8, 8, 9)
    assert sqnr_db(ref.numpy(), y.numpy()) > 60
    assert sqnr_db(y_fp.numpy(), y.numpy()) < 50  # it did quantize


def test_export_puts_qdq_right_in_front_of_every_weighted_op_and_runs_in_onnxruntime(quantized):
    model, q, _ = quantized
    x = _batches()[0]
    m = finalize_int8(export_onnx(q, x[:1]))
    prod = {o: n for n in m.graph.node for o in n.output}
    inits = {t.name: t for t in m.graph.initializer}
    ops = [n for n in m.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]
    assert sorted(n.op_type for n in ops) == ["Conv", "Conv", "Conv", "Gemm", "MatMul"]
    for n in ops:
        dq_x, dq_w = prod[n.input[0]], prod[n.input[1]]
        assert dq_x.op_type == "DequantizeLinear" and prod[dq_x.input[0]].op_type == "QuantizeLinear", n.name
        assert dq_w.op_type == "DequantizeLinear" and inits[dq_w.input[0]].data_type == onnx.TensorProto.INT8
        axis = next((a.i for a in dq_w.attribute if a.name == "axis"), 1)
        assert axis == (1 if n.op_type == "MatMul" else 0), n.name  # MatMul(x, W^T): output channels on axis 1
    assert prod[prod[prod[ops[0].input[0]].input[0]].input[0]].op_type == "Pad"  # Pad -> Q -> DQ -> Conv
    sess = parity.session(m.SerializeToString(), 1)
    for b in _batches()[:2]:
        ort = np.concatenate([sess.run(None, {sess.get_inputs()[0].name: b[i:i + 1].numpy()})[0] for i in range(4)])
        with torch.no_grad():
            fq, fp = q(b).numpy(), model(b).numpy()
        assert sqnr_db(fq, ort) > 40  # onnxruntime computes what the fake-quant model computes
        assert 15 < sqnr_db(fp, ort) < sqnr_db(fq, ort)


def test_layer_parity_replays_the_subclass_op_on_the_padded_input(quantized):
    model, q, _ = quantized
    x = _batches()[0][:1]
    m = finalize_int8(export_onnx(q, x))
    lp = layer_parity(q, m, x, model, threads=1)
    assert [r.layer for r in lp.rows] == list(LAYERS) and not lp.unmatched
    assert not lp.failures(), lp.failures()
    assert all(r.int8 and r.replay_db > 40 for r in lp.rows)


class StdConv(nn.Conv2d):
    """Standardizes its weight before the conv: the op never sees self.weight itself."""

    def forward(self, x):
        mean, std = self.weight.mean((1, 2, 3), keepdim=True), self.weight.std((1, 2, 3), keepdim=True)
        w = (self.weight - mean) / (std + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


class StdNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3)
        self.std = StdConv(4, 4, 3)

    def forward(self, x):
        return self.std(torch.relu(self.a(x)))


def test_a_forward_that_transforms_its_weight_is_refused_with_the_fix():
    q, _ = insert_quantizers(StdNet().eval())
    with pytest.raises(ModelError, match=r"layer std \(StdConv\).*quantization.skip=\['std'\].*register_quant_module"):
        run_calibration(q, _batches()[:1], MethodSettings(method="max"), progress=False)
    q, layout = insert_quantizers(StdNet().eval(), skip=("std",))  # the named fix works
    assert layout.int8 == ["a"]
    st = MethodSettings(method="max")
    apply_calibration(q, run_calibration(q, _batches()[:1], st, progress=False), st)


class MyConv(nn.Conv2d):
    pass


class MySpecialConv(MyConv):
    pass


class QuantMyConv(QuantModule, MyConv):
    """A user's wrapper: quantizes the input only."""

    def forward(self, x):
        return super().forward(self._input_quantizer(x))


def test_registry_is_isinstance_based_and_user_extensible(monkeypatch):
    monkeypatch.setattr("quantkit.quant.registry.QUANT_MODULES", dict(QUANT_MODULES))
    assert quant_module_for(nn.Conv2d) is QuantConv2d  # exact: the dedicated wrapper
    assert quant_module_for(Conv2dSame) is QuantWrapper and quant_module_for(nn.Conv3d) is QuantWrapper
    assert quant_module_for(QuantConv2d) is None and quant_module_for(nn.ReLU) is None
    assert quant_module_for(type("MyAdd", (Add,), {})) is None  # QuantAdd replaces forward: exact type only
    quantkit.register_quant_module(MyConv, QuantMyConv)
    assert quant_module_for(MyConv) is QuantMyConv and quant_module_for(MySpecialConv) is QuantMyConv
    q, layout = insert_quantizers(nn.Sequential(MySpecialConv(3, 4, 3)).eval())
    assert type(q[0]) is QuantMyConv and layout.layers == {"0": "MySpecialConv"}
    with pytest.raises(UsageError, match="must subclass quantkit.quant.modules.QuantModule"):
        register_quant_module(MyConv, nn.Conv2d)
    with pytest.raises(UsageError, match="nn.Module class"):
        register_quant_module("Conv2d", QuantMyConv)


def test_type_patterns_match_subclass_names():
    _, layout = insert_quantizers(Net().eval(), skip=("type:ScaledLinear",))
    assert layout.int8 == ["stem", "dw", "c1d"]


def test_a_conv_subclass_without_a_weight_parameter_is_left_alone():
    class Shared(nn.Conv2d):
        """Reads its weight from elsewhere: nothing of its own to quantize."""

        def __init__(self):
            super().__init__(3, 4, 3)
            w = self.weight.detach().clone()
            del self.weight
            self.register_buffer("weight", w)

    assert quantizable_layers(nn.Sequential(Shared(), nn.Conv2d(4, 4, 1))) == {"1": "Conv2d"}


def test_quantizer_is_a_tensor_quantizer_on_the_generic_wrapper(quantized):
    _, q, _ = quantized
    assert isinstance(q.c1d._weight_quantizer, TensorQuantizer) and q.c1d._weight_quantizer.axis == 0


class SameBlock(nn.Module):
    """An EfficientNet-port block: same-padding conv + BN + ReLU, and a residual add written as ``x + y``."""

    def __init__(self):
        super().__init__()
        self.conv = Conv2dSame(3, 8, 3, stride=2, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.pw = Conv2dSame(8, 8, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        return x + self.bn2(self.pw(x))


def test_prepare_folds_bn_into_subclass_convs_and_exposes_their_residual_add():
    from quantkit.quant import prepare
    from quantkit.recipe_specs import QuantizationSpec

    torch.manual_seed(0)
    model = SameBlock().eval()
    for bn in (model.bn, model.bn2):  # non-trivial statistics, so a missed fold would show
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    prepared = prepare(model, QuantizationSpec())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in prepared.fp32.modules()), prepared.notes
    types = prepared.layout.layers
    assert [t for t in types.values()].count("Conv2dSame") == 2 and list(types.values()).count("Add") == 1
    x = _batches()[0]
    with torch.no_grad():
        assert sqnr_db(model(x).numpy(), prepared.fp32(x).numpy()) > 100  # the fold is exact
