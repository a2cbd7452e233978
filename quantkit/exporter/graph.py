"""A read-only index over one ONNX graph: producers, consumers, constants, and the DequantizeLinear behind a
tensor. Public: lint, the strongly typed conversion and engine inspection all read graphs through it."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx
from onnx import numpy_helper

Q_OP = "QuantizeLinear"
DQ_OP = "DequantizeLinear"
# ops a weight's DequantizeLinear may sit behind (layout changes only)
_LAYOUT_OPS = ("Transpose", "Reshape", "Identity", "Unsqueeze", "Flatten")


class GraphIndex:
    """Producer/consumer maps and constant lookup over one ONNX graph (read-only)."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.graph = model.graph
        self.nodes = list(self.graph.node)
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in self.nodes:
            for out in node.output:
                if out:
                    self.producer[out] = node
            for inp in node.input:
                if inp:
                    self.consumers[inp].append(node)
        self.initializers = {t.name: t for t in self.graph.initializer}
        self.graph_outputs = {o.name for o in self.graph.output}
        self._const_cache: dict[str, np.ndarray | None] = {}

    def const(self, name: str) -> np.ndarray | None:
        """Value of an initializer or Constant-node output, else None."""
        if name in self._const_cache:
            return self._const_cache[name]
        value = None
        if name in self.initializers:
            value = numpy_helper.to_array(self.initializers[name])
        else:
            node = self.producer.get(name)
            if node is not None and node.op_type == "Constant":
                for attr in node.attribute:
                    if attr.name == "value":
                        value = numpy_helper.to_array(attr.t)
        self._const_cache[name] = value
        return value

    def const_dtype(self, name: str) -> int | None:
        """ONNX elem type of a constant tensor, else None."""
        if name in self.initializers:
            return self.initializers[name].data_type
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    return attr.t.data_type
        return None

    def producer_op(self, name: str) -> str | None:
        node = self.producer.get(name)
        return node.op_type if node is not None else None

    def opset(self, domain: str = "") -> int:
        for imp in self.model.opset_import:
            if imp.domain in (domain, "ai.onnx" if domain == "" else domain):
                return imp.version
        return 0

    def dq_of(self, tensor: str) -> onnx.NodeProto | None:
        """The DequantizeLinear producing ``tensor``, looking through layout-only ops (weights), else None."""
        node = self.producer.get(tensor)
        while node is not None and node.op_type in _LAYOUT_OPS:
            node = self.producer.get(node.input[0])
        return node if node is not None and node.op_type == DQ_OP else None


def dq_of(index: GraphIndex, tensor: str) -> onnx.NodeProto | None:
    """Function form of :meth:`GraphIndex.dq_of`."""
    return index.dq_of(tensor)
