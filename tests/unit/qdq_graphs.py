"""Small hand-built ONNX graphs for the export/engine tests (TensorRT-style Q/DQ placement).

Not a test module: helpers imported by test_lint/test_strong/test_nms.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


class GraphBuilder:
    """Append nodes/initializers with unique names; ``model()`` checks and returns the ModelProto."""

    def __init__(self, seed: int = 0, opset: int = 17):
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.rng = np.random.default_rng(seed)
        self.opset = opset
        self._n = 0

    def name(self, stem: str) -> str:
        self._n += 1
        return f"{stem}_{self._n}"

    def init(self, stem: str, value: np.ndarray) -> str:
        name = self.name(stem)
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(self, op: str, inputs: list[str], stem: str | None = None, n_out: int = 1, **attrs) -> list[str]:
        name = self.name(stem or op.lower())
        outs = [f"{name}_out{k}" if n_out > 1 else f"{name}_out" for k in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=name, **attrs))
        return outs

    def input(self, name: str, shape, dtype=TensorProto.FLOAT) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, dtype, shape))
        return name

    def output(self, name: str, src: str, shape=None, dtype=TensorProto.FLOAT) -> str:
        self.nodes.append(helper.make_node("Identity", [src], [name], name=self.name("out")))
        self.outputs.append(helper.make_tensor_value_info(name, dtype, shape))
        return name

    # --- Q/DQ building blocks -------------------------------------------------------------------------
    def qdq(self, x: str, scale: float, zp=None, zp_dtype=np.int8) -> str:
        s = self.init("scale", np.array(scale, np.float32))
        zp_name = self.init("zp", np.array(0 if zp is None else zp, zp_dtype))
        (q,) = self.node("QuantizeLinear", [x, s, zp_name], "q")
        (dq,) = self.node("DequantizeLinear", [q, s, zp_name], "dq")
        return dq

    def qweight(self, w: np.ndarray, axis: int = 0, per_channel: bool = True) -> str:
        """int8 initializer -> DequantizeLinear (symmetric, per output channel on ``axis``)."""
        if per_channel:
            red = tuple(k for k in range(w.ndim) if k != axis)
            amax = np.abs(w).max(axis=red)
        else:
            amax = np.abs(w).max()
        scale = (np.maximum(amax, 1e-8) / 127.0).astype(np.float32)
        shape = [1] * w.ndim
        if per_channel:
            shape[axis] = -1
        q = np.clip(np.round(w / scale.reshape(shape)), -128, 127).astype(np.int8)
        qn = self.init("w_int8", q)
        sn = self.init("w_scale", scale)
        zn = self.init("w_zp", np.zeros(scale.shape, np.int8))
        attrs = {"axis": axis} if per_channel else {}
        (dq,) = self.node("DequantizeLinear", [qn, sn, zn], "w_dq", **attrs)
        return dq

    def conv(self, x: str, cin: int, cout: int, k: int = 3, quant: bool = True, act_scale: float = 0.05,
             stem: str = "conv") -> str:
        w = (self.rng.standard_normal((cout, cin, k, k)) * (1.0 / np.sqrt(cin * k * k))).astype(np.float32)
        b = (self.rng.standard_normal(cout) * 0.1).astype(np.float32)
        if quant:
            x = self.qdq(x, act_scale)
            wn = self.qweight(w)
        else:
            wn = self.init("w", w)
        (y,) = self.node("Conv", [x, wn, self.init("b", b)], stem, pads=[k // 2] * 4)
        return y

    def model(self, check: bool = True) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, "g", self.inputs, self.outputs, self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)])
        model.ir_version = 8 if self.opset <= 17 else 9
        if check:
            onnx.checker.check_model(model, full_check=True)
        return model


def residual_cnn(seed: int = 0, *, head: bool = True, quant: bool = True, c: int = 8, hw: int = 8) -> onnx.ModelProto:
    """TensorRT-style INT8 CNN: conv -> relu -> conv + skip(Q/DQ) -> relu -> head conv -> sigmoid.

    Input 'x' [1,4,hw,hw]; outputs 'feat' [1,c,hw,hw] and (head) 'scores' [1,3,hw,hw].
    """
    g = GraphBuilder(seed)
    x = g.input("x", [1, 4, hw, hw])
    (h,) = g.node("Relu", [g.conv(x, 4, c, act_scale=0.03, quant=quant)])
    skip = g.qdq(h, 0.02) if quant else h
    y = g.conv(skip, c, c, quant=False) if not quant else None
    if quant:
        # The conv and the skip share the same DQ'd tensor, as TensorRT placement gives.
        w = (g.rng.standard_normal((c, c, 3, 3)) / np.sqrt(c * 9)).astype(np.float32)
        (y,) = g.node("Conv", [skip, g.qweight(w), g.init("b", np.zeros(c, np.float32))], "conv", pads=[1] * 4)
    (a,) = g.node("Add", [y, skip], "add")
    (r,) = g.node("Relu", [a])
    g.output("feat", r, [1, c, hw, hw])
    if head:
        logits = g.conv(r, c, 3, k=1, quant=quant, act_scale=0.04, stem="head_conv")
        (s,) = g.node("Sigmoid", [logits], "sigmoid")
        g.output("scores", s, [1, 3, hw, hw])
    return g.model()


def float_cnn(seed: int = 0, c: int = 8, hw: int = 8) -> onnx.ModelProto:
    """The FP32 counterpart of ``residual_cnn`` (no Q/DQ), e.g. for onnxruntime quantize_static."""
    g = GraphBuilder(seed)
    x = g.input("x", [1, 4, hw, hw])
    (h,) = g.node("Relu", [g.conv(x, 4, c, quant=False)])
    y = g.conv(h, c, c, quant=False)
    (a,) = g.node("Add", [y, h], "add")
    (r,) = g.node("Relu", [a])
    logits = g.conv(r, c, 3, k=1, quant=False, stem="head_conv")
    (s,) = g.node("Sigmoid", [logits], "sigmoid")
    g.output("scores", s, [1, 3, hw, hw])
    return g.model()


def torch_fakequant_cnn(*, quantize_head_output: bool = False, seed: int = 0) -> onnx.ModelProto:
    """The graph torch's legacy exporter (opset 17) makes from fake-quant ops, as quantkit's exporter starts from.

    Calibrated amax values are constants (as buffers would be); weights stay float initializers behind a
    per-channel QuantizeLinear -> DequantizeLinear. ``quantize_head_output`` adds the classic mistake of
    fake-quantizing the head conv output before the Sigmoid.
    """
    import io

    import torch
    from torch import nn

    def fq_w(conv):
        amax = torch.tensor(conv.weight.detach().abs().amax(dim=(1, 2, 3)).numpy())
        zero = torch.zeros_like(amax, dtype=torch.int32)
        return torch.fake_quantize_per_channel_affine(conv.weight, amax / 127, zero, 0, -128, 127)

    def fq_a(x, amax):
        return torch.fake_quantize_per_tensor_affine(x, amax / 127, 0, -128, 127)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2 = nn.Conv2d(4, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
            self.head = nn.Conv2d(8, 3, 1)

        def forward(self, x):
            h = fq_a(torch.relu(nn.functional.conv2d(fq_a(x, 3.0), fq_w(self.c1), self.c1.bias, padding=1)), 2.0)
            r = torch.relu(nn.functional.conv2d(h, fq_w(self.c2), self.c2.bias, padding=1) + h)  # skip is Q/DQ'd
            logits = nn.functional.conv2d(fq_a(r, 4.0), fq_w(self.head), self.head.bias)
            return torch.sigmoid(fq_a(logits, 6.0) if quantize_head_output else logits)

    torch.manual_seed(seed)
    buf = io.BytesIO()
    torch.onnx.export(Net().eval(), torch.randn(1, 4, 8, 8), buf, dynamo=False, opset_version=17,
                      input_names=["x"], output_names=["scores"])
    return onnx.load_from_string(buf.getvalue())
