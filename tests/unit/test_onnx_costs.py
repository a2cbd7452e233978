"""The ONNX route's T4 cost table (``onnxin.costs``) against the torch route's (``sensitivity.cost_model``): the
same network, costed once from torch forward hooks and once from the exported graph's shape inference, must give
the same FLOPs and element counts per quantizable layer, and so the same latency estimates."""

from __future__ import annotations

import io

import onnx
import pytest
import torch

from quantkit.onnxin.costs import graph_costs
from quantkit.onnxin.placement import build_layout
from quantkit.sensitivity.cost_model import estimate_latency_ms, latency_section, layer_costs
from test_cost_model import NAMES, Net


@pytest.fixture(scope="module")
def both():
    torch.manual_seed(0)
    net = Net().eval()
    x = torch.zeros(1, 3, 16, 16)
    buf = io.BytesIO()
    torch.onnx.export(net, x, buf, input_names=["images"], opset_version=17, dynamo=False)
    model = onnx.load_from_string(buf.getvalue())
    layout = build_layout(model)
    return layer_costs(net, x, NAMES), graph_costs(model, layout), layout


def test_per_layer_flops_and_elements_match_the_torch_cost_model(both):
    torch_costs, onnx_costs, layout = both
    # the same five layers, in execution order: conv, depthwise conv, residual add, transposed conv, linear
    order = ["conv", "dw", "add", "up", "fc"]
    assert [c.op_type for c in layout.candidates.values()] == ["Conv", "Conv", "Add", "ConvTranspose", "Gemm"]
    got = [(c.flops, c.input_elements, c.weight_elements, c.output_elements) for c in onnx_costs.layers.values()]
    want = [(torch_costs.layers[n].flops, torch_costs.layers[n].input_elements, torch_costs.layers[n].weight_elements,
             torch_costs.layers[n].output_elements) for n in order]
    assert sorted(order) == sorted(NAMES) and got == want
    assert [c.type == "Add" for c in onnx_costs.layers.values()] == [n == "add" for n in order]
    assert onnx_costs.overhead_bytes_fp16 > 0  # the max-pool and the concat copy


def test_latency_section_orders_fp16_above_hybrid_above_int8(both):
    _, costs, layout = both
    names = list(layout.candidates)
    fp16, hybrid, int8 = (estimate_latency_ms(costs, set(k)) for k in ([], names[1:], names))
    assert fp16 > hybrid > int8 > 0
    sec = latency_section(costs, names, names[1:])
    assert sec["ms"] == {"FP16 (no INT8)": round(fp16, 4), "exported (hybrid)": round(hybrid, 4),
                         "full INT8": round(int8, 4)}
    assert "not measured" in sec["label"]
