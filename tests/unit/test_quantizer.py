"""TensorQuantizer math against closed forms and pytorch-quantization 2.1.3 (the oracle for state layout)."""

import pytest
import torch
from torch import nn

from quantkit.quant.modules import QuantConv2d, QuantConvTranspose2d, QuantLinear
from quantkit.quant.tensor_quantizer import TensorQuantizer, weight_amax


def closed_form(x, amax, axis=None):
    s = amax / 127.0
    if axis is not None:
        shape = [1] * x.dim()
        shape[axis] = -1
        s = s.reshape(shape)
    return torch.clamp(torch.round(x / s), -128, 127) * s


def test_per_tensor_matches_closed_form_including_clipping():
    torch.manual_seed(0)
    x = torch.randn(4, 8, 5, 5) * 3
    q = TensorQuantizer()
    q.amax = 2.0
    y = q(x)
    ref = closed_form(x, torch.tensor(2.0))
    # torch rounds x*inv_scale, the closed form x/scale: they may differ by one step at exact .5 ties only
    diff = (y - ref).abs()
    assert (diff > 1e-6).float().mean() < 1e-3
    assert diff.max() <= 2.0 / 127 + 1e-6
    assert y.max() <= 2.0 + 1e-6 and y.min() >= -128 * 2.0 / 127 - 1e-6  # asymmetric int8 range [-128, 127]
    assert len(torch.unique(y)) <= 256


def test_per_channel_weight_amax_shape_and_zero_channel():
    w = torch.randn(6, 3, 3, 3)
    w[2] = 0
    amax = weight_amax(w, 0)
    assert amax.shape == (6, 1, 1, 1)
    assert amax[2].item() == 1.0  # all-zero channel gets a finite positive amax
    assert torch.allclose(amax[0].flatten(), w[0].abs().max().reshape(1))
    q = TensorQuantizer(axis=0)
    q.amax = amax
    assert torch.allclose(q(w), closed_form(w, amax.flatten(), 0), atol=1e-6)
    assert torch.equal(q(w)[2], torch.zeros_like(w[2]))


def test_nan_amax_is_refused():
    q = TensorQuantizer(name="layer._input_quantizer")
    with pytest.raises(Exception, match="NaN or Inf"):
        q.amax = float("nan")


@pytest.mark.parametrize("groups", [1, 4, 8])
def test_quant_conv_state_names_and_weight_axis(groups):
    conv = nn.Conv2d(8, 16, 3, padding=1, groups=groups)
    qc = QuantConv2d.from_float(conv, "conv")
    keys = set(qc.state_dict())
    assert {"weight", "bias", "_weight_quantizer._amax"} <= keys
    assert qc._weight_quantizer.amax.shape == (16, 1, 1, 1)
    qc._input_quantizer.amax = 4.0
    x = torch.randn(2, 8, 6, 6)
    wq = closed_form(conv.weight, qc._weight_quantizer.amax.flatten(), 0)
    ref = nn.functional.conv2d(closed_form(x, torch.tensor(4.0)), wq, conv.bias, padding=1, groups=groups)
    assert torch.allclose(qc(x), ref, atol=1e-4)


def test_conv_transpose_uses_axis_1_and_linear_axis_0():
    ct = QuantConvTranspose2d.from_float(nn.ConvTranspose2d(4, 6, 2, stride=2), "up")
    assert ct._weight_quantizer.axis == 1 and ct._weight_quantizer.amax.shape == (1, 6, 1, 1)
    lin = QuantLinear.from_float(nn.Linear(5, 3), "fc")
    assert lin._weight_quantizer.axis == 0 and lin._weight_quantizer.amax.shape == (3, 1)


def test_pytorch_quantization_state_loads_into_quantkit_and_matches():
    pq_nn = pytest.importorskip("pytorch_quantization.nn")
    from pytorch_quantization.tensor_quant import QuantDescriptor

    torch.manual_seed(1)
    pq_conv = pq_nn.QuantConv2d(4, 8, 3, padding=1,
                                quant_desc_input=QuantDescriptor(num_bits=8, calib_method="max"),
                                quant_desc_weight=QuantDescriptor(num_bits=8, axis=(0,)))
    x = torch.randn(2, 4, 8, 8)
    pq_conv._input_quantizer.amax = 2.5  # pq's setter registers the _amax buffer
    pq_conv._weight_quantizer.amax = pq_conv.weight.detach().abs().amax(dim=(1, 2, 3), keepdim=True)
    ours = QuantConv2d.from_float(nn.Conv2d(4, 8, 3, padding=1), "c")
    ours._input_quantizer.amax = 1.0
    missing = ours.load_state_dict(pq_conv.state_dict(), strict=True)
    assert not missing.missing_keys and not missing.unexpected_keys
    with torch.no_grad():
        ref, got = pq_conv(x), ours(x)
    err = ((ref - got) ** 2).sum() / (ref**2).sum()
    assert err < 1e-8, err  # same scales, same grid: identical up to float rounding

    # and back: quantkit state into pytorch-quantization
    back = pq_nn.QuantConv2d(4, 8, 3, padding=1, quant_desc_weight=QuantDescriptor(num_bits=8, axis=(0,)))
    # pq creates a missing _amax buffer with .cuda() on load; give it CPU buffers to load into
    back._input_quantizer.amax = 1.0
    back._weight_quantizer.amax = torch.ones(8, 1, 1, 1)
    back.load_state_dict(ours.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.allclose(back(x), got, atol=1e-5)
