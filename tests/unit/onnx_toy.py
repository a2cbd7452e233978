"""A small FP32 ONNX model for the ONNX-route tests: Conv+BN+ReLU, a residual Add, a Concat, a ConvTranspose,
a Linear (Gemm), a Softmax -> constant-MatMul decode and a Sigmoid score head. Exported with torch's legacy
exporter (opset 17), like many third-party FP32 ONNX files."""

from __future__ import annotations

import io

import numpy as np
import onnx
import torch
from torch import nn


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.c1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.c3 = nn.Conv2d(16, 8, 1)
        self.up = nn.ConvTranspose2d(8, 4, 2, stride=2)
        self.fc = nn.Linear(4, 6)
        self.register_buffer("proj", torch.arange(4, dtype=torch.float32).reshape(4, 1))
        with torch.no_grad():
            self.bn1.running_mean.uniform_(-0.5, 0.5)
            self.bn1.running_var.uniform_(0.5, 2.0)
            self.bn1.weight.uniform_(0.5, 1.5)
        self.eval()

    def forward(self, x):
        a = torch.relu(self.bn1(self.c1(x)))
        b = torch.relu(self.c2(a)) + a
        c = torch.cat([a, b], 1)
        d = torch.relu(self.c3(c))
        f = self.up(d).mean((2, 3))
        boxes = torch.softmax(f, -1) @ self.proj
        return boxes, torch.sigmoid(self.fc(f))


def toy_onnx(size: int = 16, dynamic_hw: bool = False, opset: int = 17, fold: bool = True) -> bytes:
    """Serialized FP32 ONNX of ``Toy``; ``fold=False`` keeps BatchNormalization in the graph."""
    model = Toy()
    buf = io.BytesIO()
    axes = {"images": {0: "N", 2: "H", 3: "W"}} if dynamic_hw else {"images": {0: "N"}}
    torch.onnx.export(model, torch.zeros(1, 3, size, size), buf, input_names=["images"],
                      output_names=["boxes", "scores"], opset_version=opset, dynamo=False,
                      dynamic_axes=axes, do_constant_folding=fold, training=torch.onnx.TrainingMode.EVAL)
    return buf.getvalue()


def toy_data(n: int = 8, size: int = 16, seed: int = 0) -> np.ndarray:
    """Float32 NCHW inputs (smooth random images in [0, 1])."""
    rng = np.random.default_rng(seed)
    return rng.random((n, 3, size, size), dtype=np.float32)


def bn_graph() -> onnx.ModelProto:
    """Conv -> BatchNormalization -> Relu, hand-built (opset 17), to check BatchNorm folding."""
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(1)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    inits = [numpy_helper.from_array(w, "w"),
             numpy_helper.from_array(rng.uniform(0.5, 1.5, 4).astype(np.float32), "gamma"),
             numpy_helper.from_array(rng.uniform(-0.5, 0.5, 4).astype(np.float32), "beta"),
             numpy_helper.from_array(rng.uniform(-0.5, 0.5, 4).astype(np.float32), "mean"),
             numpy_helper.from_array(rng.uniform(0.5, 2.0, 4).astype(np.float32), "var")]
    nodes = [helper.make_node("Conv", ["images", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["b"], name="bn"),
             helper.make_node("Relu", ["b"], ["out"], name="relu")]
    g = helper.make_graph(nodes, "bn", [helper.make_tensor_value_info("images", onnx.TensorProto.FLOAT, [1, 3, 8, 8])],
                          [helper.make_tensor_value_info("out", onnx.TensorProto.FLOAT, [1, 4, 8, 8])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
