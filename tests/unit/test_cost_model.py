"""T4 roofline cost ESTIMATE: closed-form FLOPs and bytes, roofline times, INT8 < FP16, monotonicity."""

import pytest
import torch
from torch import nn

from quantkit.models.ops import Add
from quantkit.sensitivity.cost_model import (ESTIMATE_LABEL, T4, DeviceSpec, Precision, estimate_latency_ms,
                                              layer_costs)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.up = nn.ConvTranspose2d(8, 4, 2, stride=2)
        self.add = Add()
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x):
        y = torch.relu(self.conv(x))
        y = self.add(self.dw(y), y)
        z = self.pool(self.up(y))
        z = torch.cat([z, z], 1)[:, :4]  # a copy (cat) outside any quantizable layer: overhead
        return self.fc(z.flatten(1))


NAMES = ["conv", "dw", "up", "add", "fc"]


@pytest.fixture(scope="module")
def table():
    return layer_costs(Net().eval(), torch.zeros(2, 3, 16, 16), NAMES)


def test_closed_form_flops_and_elements(table):
    c = table.layers["conv"]  # out 2x8x8x8, 3x3 over 3 input channels
    assert c.flops == 2 * (2 * 8 * 8 * 8) * 3 * 9
    assert (c.input_elements, c.weight_elements, c.output_elements) == (2 * 3 * 16 * 16, 8 * 3 * 9 + 8, 2 * 8 * 8 * 8)
    assert c.bytes(Precision.FP16) == 2 * (2 * 3 * 256 + 224 + 1024) and c.bytes(Precision.INT8) == 2 * 3 * 256 + 224 + 1024
    dw = table.layers["dw"]  # depthwise: one input channel per output
    assert dw.flops == 2 * (2 * 8 * 8 * 8) * 1 * 9 and dw.weight_elements == 8 * 9
    up = table.layers["up"]  # transposed: every input pixel scatters Cout x k x k MACs
    assert up.flops == 2 * (2 * 8 * 8 * 8) * 4 * 4 and up.output_elements == 2 * 4 * 16 * 16
    fc = table.layers["fc"]
    assert fc.flops == 2 * 2 * 256 * 10 and fc.weight_elements == 256 * 10 + 10
    add = table.layers["add"]
    assert add.flops == 2 * 8 * 8 * 8 and add.input_elements == 2 * add.output_elements


def test_roofline_time_is_the_slower_of_compute_and_memory(table):
    c = table.layers["conv"]
    for p, peak, nbytes in ((Precision.FP16, 65e12, c.bytes(Precision.FP16)), (Precision.INT8, 130e12, c.bytes(Precision.INT8))):
        want = 1e3 * max(c.flops / (peak * T4.efficiency), nbytes / (320e9 * T4.efficiency))
        assert c.time_ms(p) == pytest.approx(want, rel=1e-12)
    # a compute-bound layer on an imaginary device with huge bandwidth: time = flops / peak
    fast_mem = DeviceSpec(bandwidth_gbs=1e12, efficiency=1.0)
    assert c.time_ms(Precision.FP16, fast_mem) == pytest.approx(1e3 * c.flops / 65e12)


def test_overhead_counts_pooling_and_concat_but_not_pointwise_or_views(table):
    # pool: reads 2x4x16x16, writes 2x4x8x8; cat: reads 2x(2x4x8x8), writes 2x8x8x8; slice and flatten are views;
    # relu is pointwise (fused); all at 2 bytes
    pool = 2 * 4 * 256 + 2 * 4 * 64
    cat = 2 * (2 * 4 * 64) + 2 * 8 * 64
    assert table.overhead_bytes_fp16 >= 2 * (pool + cat)
    assert table.overhead_bytes_fp16 <= 2 * (pool + cat) * 1.6  # max_pool2d_with_indices also writes indices
    assert table.overhead_flops == 0.0


def test_int8_is_faster_and_moving_any_layer_to_fp16_costs_time(table):
    fp16, int8 = estimate_latency_ms(table, ()), estimate_latency_ms(table, NAMES)
    assert int8 < fp16
    for n in NAMES:
        hybrid = estimate_latency_ms(table, [m for m in NAMES if m != n])
        assert int8 < hybrid < fp16, n
        assert hybrid - int8 == pytest.approx(table.layers[n].fp16_extra_ms(), rel=1e-9)


def test_outputs_are_labelled_estimates_and_bad_names_refused(table):
    d = table.as_dict()
    assert d["label"] == ESTIMATE_LABEL and "not measured" in ESTIMATE_LABEL
    assert d["batch"] == 2 and set(d["layers"]) == set(NAMES)
    with pytest.raises(Exception, match="not in the cost table"):
        estimate_latency_ms(table, ["nope"])
    with pytest.raises(Exception, match="not modules of the model"):
        layer_costs(Net(), torch.zeros(1, 3, 16, 16), ["nope"])
