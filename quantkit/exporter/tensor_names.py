"""Which ONNX tensor each layer's input quantizer reads in the INT8 graph the torch route exports.

A TensorRT calibration cache names tensors the way the ONNX graph does (``/backbone/stem/conv/Conv_output_0``);
the torch model names quantizers (``backbone.stem.conv._input_quantizer``). To join the two, every input
quantizer is given a distinct tag amax, the INT8 graph is exported exactly as ``write_graphs`` exports it, and
each activation QuantizeLinear's scale is read back to the quantizer that carries that tag. The model's amax,
precision and mode are restored afterwards; nothing else changes.
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from quantkit.exporter.onnx_export import export_onnx
from quantkit.exporter.passes import finalize_int8
from quantkit.quant.insert import set_precision
from quantkit.quant.modules import QUANT_TYPES
from quantkit.quant.tensor_quantizer import QMAX, TensorQuantizer

_STEP = 2.0 ** -10  # tag k is amax 1 + k * _STEP: exact in float32 for k < 2**13, far apart after / 127


def _tag(k: int) -> float:
    return 1.0 + k * _STEP


def _untag(scale: float) -> int | None:
    k = (scale * QMAX - 1.0) / _STEP
    r = round(k)
    return r if abs(k - r) < 0.05 else None


def _activation_q_scales(model: onnx.ModelProto) -> list[tuple[str, float]]:
    """(input tensor, scalar scale) of every QuantizeLinear that quantizes an activation (not an initializer)."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    consts = {n.output[0]: n for n in g.node if n.op_type == "Constant"}
    out = []
    for n in g.node:
        if n.op_type != "QuantizeLinear" or n.input[0] in inits or n.input[0] in consts:
            continue
        s = inits.get(n.input[1])
        arr = (numpy_helper.to_array(s) if s is not None else
               numpy_helper.to_array(consts[n.input[1]].attribute[0].t) if n.input[1] in consts else None)
        if arr is not None and arr.size == 1:
            out.append((n.input[0], float(np.float32(arr.reshape(())))))
    return out


def input_tensor_names(qmodel: nn.Module, layers: list[str], example: torch.Tensor, *, opset: int = 17,
                       inputs=None, dtypes=None) -> tuple[dict[str, str], set[str]]:
    """({layer: ONNX tensor its input quantizer reads}, every tensor name of that INT8 graph) for ``layers``
    (wrapped layer names). A layer whose quantizer leaves no QuantizeLinear in the graph is absent."""
    modules = dict(qmodel.named_modules())
    quantizers = {n: modules[n]._input_quantizer for n in layers
                  if isinstance(modules.get(n), QUANT_TYPES)
                  and isinstance(getattr(modules[n], "_input_quantizer", None), TensorQuantizer)}
    saved_amax = {n: q.amax for n, q in quantizers.items()}
    saved_on = {name: m.enabled for name, m in qmodel.named_modules() if isinstance(m, TensorQuantizer)}
    order = sorted(quantizers)
    try:
        set_precision(qmodel, set(order))
        for k, n in enumerate(order):
            quantizers[n].amax = torch.tensor(_tag(k))
        graph = finalize_int8(export_onnx(qmodel, example, opset=opset, inputs=inputs, dtypes=dtypes))
    finally:
        for n, q in quantizers.items():
            q._amax = saved_amax[n]
        for name, m in qmodel.named_modules():
            if isinstance(m, TensorQuantizer) and name in saved_on:
                m.enable() if saved_on[name] else m.disable()
    found: dict[str, str] = {}
    for tensor, scale in _activation_q_scales(graph):
        k = _untag(scale)
        if k is not None and 0 <= k < len(order):
            found[order[k]] = tensor
    names = ({i.name for i in graph.graph.input} | {t for node in graph.graph.node for t in (*node.input, *node.output)})
    return found, names
