"""The T4 roofline cost table (``sensitivity.cost_model``, an ESTIMATE) of an FP32 ONNX graph's quantizable nodes,
so the ONNX route's report carries the same latency estimate as the torch route's.

Per candidate node, from shape inference (``exporter.coverage``; symbolic dims count as 1, so the figures are per
input): a weighted node's FLOPs are 2 x its MACs and it moves its data input, weight (and bias) and output; a residual Add
moves both inputs and its output (the cost model charges an FP16 Add for the conv+add fusion it breaks). Every
other node that is neither pointwise (fused into its producer, as TensorRT does) nor a view is a fixed FP16
overhead: it reads its inputs and writes its outputs once.
"""

from __future__ import annotations

import math

import onnx

from quantkit.exporter.coverage import graph_coverage, tensor_shapes
from quantkit.onnxin.placement import OnnxLayout
from quantkit.sensitivity.cost_model import CostTable, LayerCost

# ops TensorRT fuses into their producer (elementwise) or that move no data (shapes, views, constants)
_POINTWISE = {"Relu", "Sigmoid", "Tanh", "Clip", "LeakyRelu", "PRelu", "HardSigmoid", "HardSwish", "Elu", "Selu",
              "Softplus", "Mish", "Gelu", "Erf", "Exp", "Log", "Sqrt", "Reciprocal", "Neg", "Abs", "Pow", "Mul",
              "Add", "Sub", "Div", "Max", "Min", "Where", "Cast", "BatchNormalization", "Not", "Equal", "Greater",
              "Less", "Floor", "Ceil", "Round", "Sign"}
_FREE = {"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Shape", "Constant", "ConstantOfShape", "Gather",
         "Range", "Size", "Dropout", "Expand"}


def _elements(shapes: dict, name: str) -> int:
    dims = shapes.get(name)
    return math.prod(1 if d is None else d for d in dims) if dims else 0


def graph_costs(model: onnx.ModelProto, layout: OnnxLayout) -> CostTable:
    """Cost table of ``layout``'s candidate nodes (names as in ``layout.candidates``) in ``model`` (FP32)."""
    shapes = tensor_shapes(model)
    macs = {op.node: op.macs for op in graph_coverage(model).ops}
    consts = {t.name for t in model.graph.initializer}
    layers: dict[str, LayerCost] = {}
    overhead_bytes = 0.0
    for node in model.graph.node:
        c = layout.candidates.get(node.name)
        data_in = [t for t in node.input if t and t not in consts]
        if c is not None:
            out = sum(_elements(shapes, o) for o in node.output)
            if c.op_type == "Add":
                layers[node.name] = LayerCost(node.name, "Add", float(out),
                                              sum(_elements(shapes, t) for t in data_in), 0, out)
            else:
                w = sum(_elements(shapes, t) for t in node.input if t in consts)  # weight and bias
                layers[node.name] = LayerCost(node.name, c.op_type, 2.0 * macs.get(node.name, 0),
                                              _elements(shapes, c.act_input[1]), w, out)
        elif node.op_type not in _POINTWISE and node.op_type not in _FREE:
            overhead_bytes += 2.0 * (sum(_elements(shapes, t) for t in data_in)
                                     + sum(_elements(shapes, o) for o in node.output))
    dims = shapes.get(model.graph.input[0].name) or []
    return CostTable(layers=layers, overhead_flops=0.0, overhead_bytes_fp16=overhead_bytes, batch=1,
                     input_shape=tuple(1 if d is None else d for d in dims[1:]))
