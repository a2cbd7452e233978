"""The pieces shared by the lint driver (``lint``) and its rules (``lint_rules``).

Op-type sets and FP16 limits, ``Severity``/``Finding``, small node helpers, and the ``rule`` decorator that
registers a rule in ``RULES``. ``GraphIndex`` lives in ``quantkit.exporter.graph`` (shared with the strong
conversion and engine inspection) and is re-exported here.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import onnx

from quantkit.exporter.graph import DQ_OP, Q_OP, GraphIndex  # noqa: F401  (re-exported for the rules)

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


def head_source(producer, is_const: Callable[[str], bool], tensor: str) -> str | None:
    """The score / decode op type (``HEAD_OPS``) ``tensor`` is computed from through data-movement ops, else
    None. ``producer``: tensor name -> producing node; ``is_const``: whether a tensor is a constant."""
    stack, seen = [tensor], set()
    while stack:
        t = stack.pop()
        if t in seen:
            continue
        seen.add(t)
        p = producer.get(t)
        if p is None:
            continue
        if p.op_type in HEAD_OPS:
            return p.op_type
        if p.op_type in DATA_MOVEMENT_OPS:
            stack.extend(i for i in p.input if i and not is_const(i))
    return None


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
