"""Where Q/DQ goes in an FP32 ONNX graph: the torch route's placement rules, read off the graph.

* Conv / ConvTranspose / Gemm / MatMul with a constant weight: the data input is quantized per tensor, the
  weight per output channel (Conv axis 0, ConvTranspose axis 1 — per tensor when grouped, as the torch route
  does —, Gemm axis 0 with transB=1 else 1, MatMul the last axis); biases stay float.
* A residual Add (two computed inputs, one coming from a conv through BN/activations, and an output that still
  reaches a weighted layer): only the skip input is quantized, so TensorRT fuses the Add into the conv.
* Concat needs nothing: its consumer's Q/DQ sits after it, so its inputs share that one scale.
* Decode / NMS / scores stay float: a weighted op whose data comes from Softmax/TopK/NMS (a DFL projection
  Conv or MatMul, say) is not a candidate, and nothing after the last weighted layer is quantized. A Sigmoid's
  output feeding a learned layer (basic-pitch's note posteriorgram into its onset convs) is an activation in
  [0, 1] like any other: that layer is quantized, as the torch route quantizes every conv.

Layer names are ONNX node names; selection reuses the torch route's ``select_layers`` (fnmatch globs,
``type:Conv``; a pattern matching nothing is an error listing the closest names).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx
from onnx import numpy_helper

from quantkit.exporter.lint_core import HEAD_OPS, WEIGHTED_OPS, get_attr, head_source

# Ops a conv output passes through on its way to a residual Add (the torch route's _PASS_THROUGH, in ONNX)
# lint's score/decode ops (HEAD_OPS) whose output a weighted op reads only in a decode projection (DFL); a Sigmoid's
# output is an activation like any other to a learned layer
DECODE_OPS = HEAD_OPS - {"Sigmoid"}
PASS_THROUGH_OPS = {"BatchNormalization", "Relu", "Clip", "LeakyRelu", "HardSwish", "HardSigmoid", "Identity",
                    "Elu", "Selu", "Gelu", "Tanh", "Mish", "PRelu"}


@dataclass(frozen=True)
class Candidate:
    """One quantizable node. ``act_input``: (input index, tensor) quantized per tensor. ``weight``: the weight
    initializer's name and its output-channel axis (None: per tensor), or None for a residual Add."""

    name: str
    op_type: str
    act_input: tuple[int, str]
    weight: tuple[str, int | None] | None


@dataclass
class OnnxLayout:
    """The torch route's QuantLayout, for an ONNX graph: candidates by node name and the INT8 selection."""

    candidates: dict[str, Candidate] = field(default_factory=dict)
    int8: list[str] = field(default_factory=list)
    pattern_hits: dict[str, list[str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    reasons: dict[str, str] = field(default_factory=dict)  # node kept FP16 by a measured choice -> why

    @property
    def layers(self) -> dict[str, str]:
        """Node name -> op type of every candidate, in graph order."""
        return {n: c.op_type for n, c in self.candidates.items()}

    def activation_tensors(self, only_int8: bool = False) -> list[str]:
        """Activation tensors to quantize (all candidates' or only the INT8 ones'), first-seen order, unique."""
        names = self.int8 if only_int8 else list(self.candidates)
        return list(dict.fromkeys(self.candidates[n].act_input[1] for n in names))

    def precision(self, name: str) -> str:
        return "int8" if name in self.int8 else "fp16"


class _Graph:
    def __init__(self, model: onnx.ModelProto):
        g = model.graph
        self.inits = {t.name: t for t in g.initializer}
        self.producer = {o: n for n in g.node for o in n.output if o}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in g.node:
            for i in n.input:
                if i:
                    self.consumers.setdefault(i, []).append(n)
        for n in g.node:  # Constant nodes count as initializers
            if n.op_type == "Constant":
                for o in n.output:
                    self.inits.setdefault(o, None)
        self.outputs = {o.name for o in g.output}

    def is_const(self, name: str) -> bool:
        return name in self.inits

    def float_init(self, name: str) -> bool:
        t = self.inits.get(name)
        return t is not None and t.data_type == onnx.TensorProto.FLOAT

    def from_decode_op(self, tensor: str) -> bool:
        """True when ``tensor`` is computed by a decode op (``DECODE_OPS``), possibly through data-movement ops."""
        return head_source(self.producer, self.is_const, tensor) in DECODE_OPS

    def from_conv(self, tensor: str) -> bool:
        """True when ``tensor`` is a conv output, possibly through BN/activations (SiLU = x * Sigmoid(x))."""
        t = tensor
        for _ in range(64):
            p = self.producer.get(t)
            if p is None:
                return False
            if p.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
                return True
            if p.op_type in PASS_THROUGH_OPS:
                t = p.input[0]
            elif p.op_type == "Mul" and len(p.input) == 2:  # SiLU / Swish written as x * sigmoid(x)
                a, b = p.input
                pa, pb = self.producer.get(a), self.producer.get(b)
                if pb is not None and pb.op_type == "Sigmoid" and pb.input[0] == a:
                    t = a
                elif pa is not None and pa.op_type == "Sigmoid" and pa.input[0] == b:
                    t = b
                else:
                    return False
            else:
                return False
        return False

    def reaches_weighted(self) -> set[str]:
        """Tensors from which a weighted op is reachable downstream."""
        out: set[str] = set()
        stack = [n for n in self.producer.values() if n.op_type in WEIGHTED_OPS]
        seen: set[int] = set()
        while stack:
            n = stack.pop()
            if id(n) in seen:
                continue
            seen.add(id(n))
            for i in n.input:
                if i and not self.is_const(i):
                    out.add(i)
                    p = self.producer.get(i)
                    if p is not None:
                        stack.append(p)
        return out


def weight_axis(node: onnx.NodeProto, weight_rank: int) -> int | None:
    """Output-channel axis of a weighted node's weight (None: per-tensor, grouped ConvTranspose)."""
    if node.op_type == "Conv":
        return 0
    if node.op_type == "ConvTranspose":
        return 1 if get_attr(node, "group", 1) == 1 else None
    if node.op_type == "Gemm":
        return 0 if get_attr(node, "transB", 0) else 1
    return weight_rank - 1  # MatMul: [..., K, N]


def find_candidates(model: onnx.ModelProto, residual_add: bool = True) -> tuple[dict[str, Candidate], list[str]]:
    """Quantizable nodes in graph order (see the module docstring) and notes on what was left float and why."""
    g = _Graph(model)
    reach = g.reaches_weighted() if residual_add else set()
    out: dict[str, Candidate] = {}
    notes: list[str] = []
    for n in model.graph.node:
        if n.op_type in WEIGHTED_OPS and len(n.input) >= 2:
            data, w = n.input[0], n.input[1]
            if g.float_init(data) and not g.is_const(w) and n.op_type in ("MatMul", "Gemm"):
                # W @ x: coverage counts it as a weighted op, so it needs a reason to stay float
                notes.append(f"{n.name}: {n.op_type} with its constant weight as the first input (W @ x) kept float "
                             "(quantkit places Q/DQ for x @ W)")
                continue
            if g.is_const(w) and not g.float_init(w) and g.inits.get(w) is not None:
                notes.append(f"{n.name}: {n.op_type} weight {w!r} is not float32 "
                             f"({onnx.TensorProto.DataType.Name(g.inits[w].data_type)}); kept as it is")
                continue
            if not g.float_init(w) or g.is_const(data):
                continue  # activation x activation MatMul, or a weight computed at run time: stays float
            if n.op_type == "Gemm" and get_attr(n, "transA", 0):
                notes.append(f"{n.name}: Gemm with transA=1 kept float (its data input is transposed)")
                continue
            if g.from_decode_op(data):
                notes.append(f"{n.name}: {n.op_type} reads decoded scores/softmax output; kept float")
                continue
            rank = len(g.inits[w].dims)
            out[n.name] = Candidate(n.name, n.op_type, (0, data), (w, weight_axis(n, rank)))
        elif residual_add and n.op_type == "Add" and len(n.input) == 2:
            a, b = n.input
            if g.is_const(a) or g.is_const(b) or a == b or n.output[0] not in reach:
                continue
            a_conv, b_conv = g.from_conv(a), g.from_conv(b)
            if not (a_conv or b_conv):
                continue
            k = 0 if (b_conv and not a_conv) else 1  # the skip input: the one not straight from a conv
            out[n.name] = Candidate(n.name, "Add", (k, n.input[k]), None)
    return out, notes


def build_layout(model: onnx.ModelProto, quantize: tuple[str, ...] = ("*",), skip: tuple[str, ...] = (),
                 residual_add: bool = True) -> OnnxLayout:
    """Candidates plus the recipe's selection (node-name globs / ``type:Op``); unmatched patterns are errors."""
    from quantkit.quant.insert import select_layers

    cands, notes = find_candidates(model, residual_add)
    layout = OnnxLayout(candidates=cands, notes=notes)
    if not cands:
        from quantkit.errors import ModelError

        raise ModelError("the ONNX graph has no Conv/ConvTranspose/Gemm/MatMul with a constant weight: nothing to "
                         "quantize. Export the model with its weights as initializers")
    from quantkit.errors import UsageError

    try:
        layout.int8, layout.pattern_hits = select_layers(layout.layers, tuple(quantize), tuple(skip))
    except UsageError as exc:  # the torch route's hint names `quantkit layers`, which lists module names
        raise UsageError(str(exc).replace("Run `quantkit layers MODEL` to list layer names",
                                          "patterns match ONNX node names (see the 'layers' table of report.json, "
                                          "or open the model in Netron)")) from None
    return layout


def weight_array(model: onnx.ModelProto, name: str):
    """The float32 numpy value of initializer ``name``."""
    t = next(t for t in model.graph.initializer if t.name == name)
    return numpy_helper.to_array(t)
