"""Coverage from the exported graph: which weighted ops of a Q/DQ ONNX run INT8, their MACs, and why the
others stay float.

A weighted op is a Conv / ConvTranspose / Gemm / MatMul one of whose inputs is a constant weight: an
initializer or Constant, directly or through layout-only ops (Transpose, Reshape, ...), or the
DequantizeLinear of one. It is INT8 when its weight comes through a DequantizeLinear and so does its data
input (both are what TensorRT needs to run it in INT8); every other weighted op is float, and needs a reason:
the selection kept it FP16, the recipe's skip list, or the rule that score / decode math reading a Softmax,
Sigmoid, TopK or NMS output stays float (a detector's DFL projection). The INT8 share of multiply-accumulates reported
for an export is computed here, from the graph that ships, not from the layers quantkit meant to wrap: a
layer type quantkit did not wrap shows up as a float op with no reason instead of vanishing from the count.

MACs come from shape inference (onnxruntime's symbolic inference, else ONNX's; symbolic dims such as a dynamic batch count as 1, so the figures are per
input): Conv ``out elements x Cin/groups x kernel``; ConvTranspose ``in elements x Cout/groups x kernel``;
Gemm / MatMul ``out elements x K``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import onnx

from quantkit.exporter.graph import DQ_OP, Q_OP, GraphIndex
from quantkit.exporter.lint_core import head_source

WEIGHTED = ("Conv", "ConvTranspose", "Gemm", "MatMul")
_LAYOUT_OPS = ("Transpose", "Reshape", "Identity", "Unsqueeze", "Flatten", "Squeeze")
# int8 weights written by exporter.passes.fold_weight_quantize: <param>_int8, <scope>.weight_t_int8, then _<k>
_INT8_SUFFIX = re.compile(r"_int8(_\d+)?$")
_PARAM_SUFFIX = re.compile(r"\.weight(_t)?$")


@dataclass
class WeightedOp:
    """One weighted op of the graph. layer: the module (torch) or node it belongs to, None when unknown.
    macs: multiply-accumulates per input. reason: why a float op is float (None: no reason known)."""

    node: str
    op: str
    weight: str
    layer: str | None
    macs: int
    int8: bool
    reason: str | None = None

    def as_dict(self) -> dict:
        return {"node": self.node, "op": self.op, "layer": self.layer, "weight": self.weight, "macs": self.macs,
                "precision": "int8" if self.int8 else "float", "reason": self.reason}


@dataclass
class Coverage:
    """Every weighted op of one graph, in graph order. ``source``: the file name they were read from."""

    ops: list[WeightedOp]
    source: str = "model.int8.onnx"
    notes: list[str] = field(default_factory=list)

    @property
    def total_macs(self) -> int:
        return sum(o.macs for o in self.ops)

    @property
    def int8_macs(self) -> int:
        return sum(o.macs for o in self.ops if o.int8)

    @property
    def share(self) -> float | None:
        return self.int8_macs / self.total_macs if self.total_macs else None

    def float_ops(self) -> list[WeightedOp]:
        return [o for o in self.ops if not o.int8]

    def unexplained(self) -> list[WeightedOp]:
        """Float weighted ops nobody chose to keep float: an error of the export."""
        return [o for o in self.ops if not o.int8 and not o.reason]

    def mac_share(self) -> dict:
        """report.json's ``int8_mac_share``: the share of weighted-op MACs that run INT8, from the graph."""
        return {"int8_macs": self.int8_macs, "total_macs": self.total_macs,
                "share": None if self.share is None else round(self.share, 4), "batch": 1,
                "source": self.source,
                "counted": "Conv, ConvTranspose, Gemm and MatMul nodes with a constant weight in the exported graph "
                           "(MACs per input; residual Adds excluded)"}

    def as_dict(self) -> dict:
        """report.json's ``coverage``: counts, every float op with its reason, the unexplained ones."""
        return {"source": self.source, "weighted_ops": len(self.ops), "int8_ops": sum(o.int8 for o in self.ops),
                "float_ops": [o.as_dict() for o in self.float_ops()],
                "unexplained": [o.layer or o.node for o in self.unexplained()], "notes": list(self.notes),
                "rule": "a weighted op is INT8 when its weight and its data input both come through "
                        "DequantizeLinear; a float one needs a reason"}


def _const_behind(index: GraphIndex, tensor: str) -> tuple[str | None, bool]:
    """(name of the constant weight behind ``tensor``, whether it comes through DequantizeLinear), looking
    through layout-only ops; (None, False) when ``tensor`` is not a constant."""
    node = index.producer.get(tensor)
    while node is not None and node.op_type in _LAYOUT_OPS:
        tensor = node.input[0]
        node = index.producer.get(tensor)
    through_dq = node is not None and node.op_type == DQ_OP
    if through_dq:
        tensor = node.input[0]
        node = index.producer.get(tensor)
        if node is not None and node.op_type == Q_OP:  # weight Q not folded into an int8 initializer
            tensor = node.input[0]
    is_const = tensor in index.initializers or index.producer_op(tensor) == "Constant"
    return (tensor, through_dq) if is_const else (None, False)


def _weight_and_data(index: GraphIndex, node: onnx.NodeProto) -> tuple[int, str, bool] | None:
    """(weight input position, weight constant name, weight through DQ) of a weighted op, else None."""
    positions = (1, 0) if node.op_type in ("Gemm", "MatMul") else (1,)
    for i in positions:
        if len(node.input) > i and node.input[i]:
            name, dq = _const_behind(index, node.input[i])
            if name is not None:
                return i, name, dq
    return None


def _infer(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with inferred shapes. onnxruntime's symbolic inference first: it computes shape arithmetic
    (the pads a "same"-padding conv derives from its input size) that ONNX's own inference leaves unknown."""
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        return SymbolicShapeInference.infer_shapes(model, auto_merge=True)
    except Exception:  # an op it does not know: ONNX's inference, then what the file states
        pass
    try:
        return onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    except Exception:
        return model


def _shapes(model: onnx.ModelProto) -> dict[str, list[int | None]]:
    """Tensor name -> dims (None for symbolic / unknown) after shape inference."""
    inferred = _infer(model)
    g = inferred.graph
    out: dict[str, list[int | None]] = {}
    for vi in (*g.input, *g.value_info, *g.output):
        t = vi.type.tensor_type
        if t.HasField("shape"):
            out[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
    for t in g.initializer:
        out[t.name] = list(t.dims)
    return out


tensor_shapes = _shapes  # public name for the other stages (the ONNX route's cost table)


def _prod(dims) -> int:
    return math.prod(1 if d is None else d for d in dims)  # symbolic dims (a dynamic batch) count as 1


def _macs(node: onnx.NodeProto, w_pos: int, shapes: dict, w_dims: list[int]) -> int | None:
    out = shapes.get(node.output[0])
    if out is None or not w_dims:
        return None
    if node.op_type == "Conv":
        return _prod(out) * _prod(w_dims[1:])
    if node.op_type == "ConvTranspose":
        x = shapes.get(node.input[0])
        return None if x is None else _prod(x) * _prod(w_dims[1:])
    if node.op_type == "Gemm":
        trans = {a.name: a.i for a in node.attribute if a.name in ("transA", "transB")}
        if w_pos == 1:
            k = w_dims[1] if trans.get("transB") else w_dims[0]
        else:
            k = w_dims[0] if trans.get("transA") else w_dims[1]
        return _prod(out) * k
    if len(w_dims) == 1:  # MatMul with a vector: a dot product over its length
        return _prod(out) * w_dims[0]
    k = w_dims[-2] if w_pos == 1 else w_dims[-1]  # MatMul: x[..., K] @ W[K, N], or W[M, K] @ x[K, N]
    return _prod(out) * k


def _layer_of(weight: str, node_name: str, layers: set[str]) -> str | None:
    """The module a weighted op belongs to: from its weight's name (``<module>.weight``, ``<module>.weight_int8``)
    or, for a computed weight, from the node's scope (``/backbone/stem/conv/Conv``)."""
    stem = _PARAM_SUFFIX.sub("", _INT8_SUFFIX.sub("", weight))
    if stem in layers:
        return stem
    parts = [p for p in node_name.strip("/").split("/")[:-1] if p]
    if not parts:
        return None
    tokens = [t for p in parts for t in p.split(".")]
    last = re.sub(r"_\d+$", "", parts[-1]).split(".")[-1]

    def within(name: str) -> bool:  # the module's name, component by component, in scope order
        it = iter(tokens)
        comps = name.split(".")
        return comps[-1] == last and all(any(c == t for t in it) for c in comps)

    found = sorted((n for n in layers if within(n)), key=len, reverse=True)
    return found[0] if len(found) == 1 or (len(found) > 1 and len(found[0]) > len(found[1])) else None


def graph_coverage(model: onnx.ModelProto, *, layers: set[str] | None = None,
                   reasons: dict[str, str] | None = None, source: str = "model.int8.onnx") -> Coverage:
    """Classify every weighted op of ``model`` (see the module docstring).

    layers: the module names of the model it came from (to name each op's layer; None: layer = node name).
    reasons: layer (or node) name -> why it is float, for layers kept float on purpose; a float op whose layer
    has no reason here is left unexplained.
    """
    index = GraphIndex(model)
    shapes = _shapes(model)
    reasons = reasons or {}
    ops, unknown = [], []
    for node in index.nodes:
        if node.op_type not in WEIGHTED:
            continue
        found = _weight_and_data(index, node)
        if found is None:
            continue  # activation x activation (attention): no weight to quantize
        w_pos, weight, w_dq = found
        data = node.input[1 - w_pos] if node.op_type in ("Gemm", "MatMul") else node.input[0]
        int8 = w_dq and index.dq_of(data) is not None
        # the weight as the op sees it (after a Transpose), else the constant's own dims
        seen = shapes.get(node.input[w_pos])
        w_dims = seen if seen and None not in seen else (shapes.get(weight) or _const_dims(index, weight))
        macs = _macs(node, w_pos, shapes, w_dims)
        if macs is None:  # shapes unknown: count one output position, and say so
            unknown.append(node.name)
            macs = _prod(w_dims)
        layer = _layer_of(weight, node.name, layers) if layers is not None else (node.name or weight)
        reason = None if int8 else reasons.get(layer) if layer else reasons.get(node.name)
        if not int8 and reason is None:
            head = _head_source(index, data)
            if head:  # the ONNX route's placement rule: decode math on scores stays float
                reason = f"rule: reads a {head} output (score / decode math stays float)"
        ops.append(WeightedOp(node.name, node.op_type, weight, layer, int(macs), bool(int8), reason))
    notes = [f"shape inference left {len(unknown)} weighted op(s) without shapes; each counted as one output "
             f"position: {', '.join(unknown[:5])}"] if unknown else []
    return Coverage(ops, source, notes)


def _head_source(index: GraphIndex, tensor: str) -> str | None:
    """The score / decode op (Softmax, Sigmoid, TopK, ...) ``tensor`` is computed from through data-movement
    ops, else None."""
    return head_source(index.producer, lambda i: i in index.initializers or index.producer_op(i) == "Constant",
                       tensor)


def _const_dims(index: GraphIndex, name: str) -> list[int]:
    value = index.const(name)
    return list(value.shape) if value is not None else []


def coverage_failure(cov: Coverage, wrapped: set[str] = frozenset()) -> str | None:
    """The error for float weighted ops without a reason, naming the layers and the fix; None when every float
    op has one. ``wrapped``: the layers quantkit put quantizers on (their float ops mean a wrapper that does not
    quantize the weight its op sees)."""
    bad = cov.unexplained()
    if not bad:
        return None
    names = [f"{o.layer or o.node} ({o.op})" for o in bad]
    share = "n/a" if cov.share is None else f"{100 * cov.share:.2f} %"
    fixes = []
    if any(o.layer not in wrapped for o in bad):
        fixes.append("for a module type quantkit does not wrap, register a quantized wrapper with "
                     "quantkit.register_quant_module(FloatType, QuantType) (subclasses of nn.Conv1d/2d/3d, "
                     "nn.ConvTranspose1d/2d/3d and nn.Linear are wrapped already) or build the op from one of those")
    if any(o.layer in wrapped for o in bad):
        fixes.append("for a wrapped layer, its wrapper does not quantize the weight its op sees: fix the wrapper "
                     "or keep the layer float with quantization.skip")
    return (f"{len(bad)} weighted op(s) in {cov.source} run in float with no reason: {', '.join(names[:8])}"
            + (f" (+{len(names) - 8} more)" if len(names) > 8 else "")
            + f"; the graph's INT8 MAC share is {share}. Fix: " + "; ".join(fixes))
