"""The pieces shared by the lint driver (``lint``) and its rules (``lint_rules``).

Op-type sets and FP16 limits, ``Severity``/``Finding``, ``GraphIndex`` (producer/consumer maps and constant
lookup over one graph), small node helpers, and the ``rule`` decorator that registers a rule in ``RULES``.
"""

from __future__ import annotations

import enum
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

Q_OP = "QuantizeLinear"
DQ_OP = "DequantizeLinear"
# Layers whose inputs TensorRT wants quantized (data and weight); the value is the input index of the weight.
WEIGHTED_OPS = {"Conv": 1, "ConvTranspose": 1, "Gemm": 1, "MatMul": 1}
# Ops that need float resolution at the end of a detector; Q/DQ must not sit in front of them.
HEAD_OPS = {"Sigmoid", "Softmax", "LogSoftmax", "NonMaxSuppression", "EfficientNMS_TRT", "TopK"}
# Ops that only move data: a walk back from a head op passes through them.
DATA_MOVEMENT_OPS = {
    "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Concat", "Identity",
    "Slice", "Split", "Gather", "Cast", "Expand", "Tile",
}
FP16_MAX = float(np.finfo(np.float16).max)  # 65504
FP16_MIN_NORMAL = float(np.finfo(np.float16).tiny)  # 2**-14 ~ 6.1e-5
FP16_MIN_SUBNORMAL = 2.0**-24  # smallest positive float16; anything below half of it rounds to 0
STRONG_MIN_OPSET = 19


class Severity(str, enum.Enum):
    ERROR = "error"
    WARNING = "warning"


@dataclass(frozen=True)
class Finding:
    """One rule violation. ``node`` is the ONNX node name (or tensor name when the node has none)."""

    rule: str
    severity: Severity
    node: str
    message: str
    fix: str

    def as_dict(self) -> dict[str, str]:
        """Plain JSON-ready dict (severity as its string value)."""
        return {"rule": self.rule, "severity": self.severity.value, "node": self.node, "message": self.message,
                "fix": self.fix}


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


def node_label(node: onnx.NodeProto) -> str:
    return node.name or f"<{node.op_type} -> {node.output[0] if node.output else '?'}>"


def get_attr(node: onnx.NodeProto, name: str, default=None):
    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default


RuleFn = Callable[[GraphIndex, bool], Iterable[Finding]]
RULES: dict[str, RuleFn] = {}


def rule(name: str) -> Callable[[RuleFn], RuleFn]:
    """Register a lint rule under ``name`` (the name findings carry)."""

    def register(fn: RuleFn) -> RuleFn:
        RULES[name] = fn
        return fn

    return register
