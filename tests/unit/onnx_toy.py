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


# ---- a tiny "detector" with known detections, for evaluation on the ONNX route ---------------------------

DET_BOX = (4.0, 4.0, 16.0, 16.0)  # x1, y1, x2, y2 in model-input pixels: every image's one detection


def det_onnx(size: int = 32, box=DET_BOX, logit: float = 3.0, opset: int = 17) -> onnx.ModelProto:
    """images [N,3,size,size] -> boxes [N,1,4] (always ``box``, input pixels), scores [N,1,1] (sigmoid(logit)).

    The outputs are the input's conv features times zero plus constants, so the graph has quantizable nodes
    (Conv, MatMul) whose INT8 rounding cannot move the detection: a data set whose one ground-truth box is
    ``box`` mapped back through the letterbox scores mAP 1.0 in FP32 and INT8 alike."""
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(2)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 3, 1, 1)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal((4, 1)).astype(np.float32), "wm"),
             numpy_helper.from_array(np.zeros(4, np.float32), "zero4"),
             numpy_helper.from_array(np.zeros(1, np.float32), "zero1"),
             numpy_helper.from_array(np.asarray(box, np.float32), "box"),
             numpy_helper.from_array(np.asarray([logit], np.float32), "logit"),
             numpy_helper.from_array(np.asarray([-1, 1, 4], np.int64), "bshape"),
             numpy_helper.from_array(np.asarray([-1, 1, 1], np.int64), "sshape")]
    nodes = [helper.make_node("Conv", ["images", "w"], ["c"], name="conv"),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("GlobalAveragePool", ["r"], ["g"], name="gap"),
             helper.make_node("Flatten", ["g"], ["f"], name="flat"),
             helper.make_node("Mul", ["f", "zero4"], ["fz"], name="mul_b"),
             helper.make_node("Add", ["fz", "box"], ["b"], name="add_b"),
             helper.make_node("Reshape", ["b", "bshape"], ["boxes"], name="reshape_b"),
             helper.make_node("MatMul", ["f", "wm"], ["m"], name="matmul"),
             helper.make_node("Mul", ["m", "zero1"], ["mz"], name="mul_s"),
             helper.make_node("Add", ["mz", "logit"], ["s"], name="add_s"),
             helper.make_node("Sigmoid", ["s"], ["sg"], name="sigmoid"),
             helper.make_node("Reshape", ["sg", "sshape"], ["scores"], name="reshape_s")]
    g = helper.make_graph(nodes, "det", [helper.make_tensor_value_info("images", onnx.TensorProto.FLOAT,
                                                                       [1, 3, size, size])],
                          [helper.make_tensor_value_info("boxes", onnx.TensorProto.FLOAT, [1, 1, 4]),
                           helper.make_tensor_value_info("scores", onnx.TensorProto.FLOAT, [1, 1, 1])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def det_images(folder, n: int = 3, img: int = 64, seed: int = 0) -> list[str]:
    """``n`` random RGB PNGs of img x img pixels in ``folder``; returns their file names."""
    from pathlib import Path

    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = []
    for k in range(n):
        name = f"im{k}.png"
        Image.fromarray(rng.integers(0, 256, (img, img, 3), dtype=np.uint8)).save(folder / name)
        names.append(name)
    return names


def det_coco(root, n: int = 3, img: int = 64, size: int = 32, box=DET_BOX):
    """A COCO folder (root/annotations.json + root/images/) whose one box per image is ``det_onnx``'s detection
    mapped to the original pixels (letterbox of an img x img image to size x size: scale size / img, no pad)."""
    import json
    from pathlib import Path

    root = Path(root)
    names = det_images(root / "images", n, img)
    k = img / size
    x1, y1, x2, y2 = (v * k for v in box)
    coco = {"images": [{"id": i + 1, "file_name": nm, "width": img, "height": img} for i, nm in enumerate(names)],
            "annotations": [{"id": i + 1, "image_id": i + 1, "category_id": 1, "bbox": [x1, y1, x2 - x1, y2 - y1],
                             "area": (x2 - x1) * (y2 - y1), "iscrowd": 0} for i in range(n)],
            "categories": [{"id": 1, "name": "thing"}]}
    (root / "annotations.json").write_text(json.dumps(coco))
    return root


def det_yolo_yaml(root, n: int = 3, img: int = 64, size: int = 32, box=DET_BOX):
    """The same data as ``det_coco`` as an Ultralytics dataset YAML (images/{train,val}, YOLO txt labels)."""
    from pathlib import Path

    root = Path(root)
    k = img / size
    x1, y1, x2, y2 = (v * k for v in box)
    line = f"0 {(x1 + x2) / 2 / img:.8f} {(y1 + y2) / 2 / img:.8f} {(x2 - x1) / img:.8f} {(y2 - y1) / img:.8f}\n"
    for split, seed in (("train", 1), ("val", 2)):
        for nm in det_images(root / "images" / split, n, img, seed):
            (root / "labels" / split).mkdir(parents=True, exist_ok=True)
            (root / "labels" / split / nm.replace(".png", ".txt")).write_text(line)
    (root / "data.yaml").write_text("path: .\ntrain: images/train\nval: images/val\nnames:\n  0: thing\n")
    return root / "data.yaml"
