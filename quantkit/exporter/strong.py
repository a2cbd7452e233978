"""FP32 Q/DQ graph -> FP16 Q/DQ graph for TensorRT's strongly typed mode (TRT >= 10.12, required by 11).

A strongly typed build takes every tensor's precision from the ONNX types: float tensors must be FP16 where
FP16 is wanted, and the Q/DQ scales must be FP16 too (QuantizeLinear-19 types x and y_scale alike), so the
graph goes to opset 19.

Why our own pass rather than ModelOpt AutoCast or onnxconverter-common's float16 converter (FACTS.md prefers a
well-kept converter): ModelOpt's ONNX extra pulls GPU packages. onnxconverter-common 1.16.0 (pure Python) was
tried on the bundled detector's model.int8.onnx (``benchmarks/fp16_converter_trial.py``, issue 15):
at the exported opset 17 it gives DequantizeLinear-13 FP16 scales, which onnxruntime refuses ("Type
'tensor(float16)' ... of operator (DequantizeLinear) is invalid"); after raising the graph to opset 19 it keeps
all 90 Q / 170 DQ nodes with FP16 scales and ``lint(strong=True)`` is clean, but the graph is still invalid: it
retypes the outputs of the heads' three ``Cast(to=FLOAT)`` nodes as float16 without changing ``to``, and
onnxruntime refuses to load it. Patching those three Casts by hand gave the same SQNR against FP32 as this pass
(54.45 / 25.38 dB on 8 calibration tiles), so it buys no accuracy, while it needs that patch, clamps float
constants to 1e4 (``max_finite_val``, not FP16's 65504) and tiny ones to 1e-7 without requantizing the int8
weights, and keeps no op (NMS) in FP32 unless told. We keep this pass: it is small and checkable — convert float
initializers/constants/casts, keep int8 weights and zero points, give Q/DQ FP16 scales, keep graph I/O float32
with boundary Casts, run a few FP32-only ops (NMS) behind Casts, and refuse or clamp what FP16 cannot hold.
Every step is tested against onnxruntime by SQNR (tests/unit/test_strong.py). If ModelOpt becomes available,
compare its output with ``lint(strong=True)``.

FP16 range handling: scales above 65504 are refused (an amax of 8e6 is a calibration bug); scales below the
smallest FP16 normal (6.1e-5, e.g. near-dead weight channels) are raised to it and their int8 weights are
requantized so the dequantized weights stay as close as FP16 allows. Other float constants outside FP16 range
(a BatchNorm after a ReLU, which cannot fold, with running_var 1e6) follow ``OverflowPolicy``: ``keep_fp32``
keeps the constant float32 and runs the ops that read it in FP32 behind Casts (exact: the op sees its true
parameters; the export's default); ``clamp`` clips them to +-65504 (a variance clipped from 1e6 scales that
channel's output by sqrt(1e6/65504) = 3.9x: wrong, so only on request); ``error`` refuses the conversion.
Every change is reported in ``StrongResult``.
"""

from __future__ import annotations

import copy
import enum
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from quantkit.errors import ExportError
from quantkit.exporter.graph import DQ_OP, Q_OP, GraphIndex
from quantkit.exporter.lint import FP16_MAX, FP16_MIN_NORMAL, STRONG_MIN_OPSET, get_attr
from quantkit.quote import qcap

FLOAT, HALF = TensorProto.FLOAT, TensorProto.FLOAT16
# Ops that must see float32 (ONNX NonMaxSuppression takes float only; the TRT plugin too; Range has no float16
# type at any opset: a dynamic-batch detector decode builds its anchor grid with Range over float shapes).
FP32_OPS = frozenset({"NonMaxSuppression", "EfficientNMS_TRT", "RoiAlign", "Range"})
# (op, input index) slots typed tensor(float) even at opset 19.
FLOAT32_SLOTS = frozenset({("Resize", 2)})


class OverflowPolicy(str, enum.Enum):
    """What to do with a float constant (not a scale) outside FP16 range (recipe ``export.fp16_overflow``)."""

    KEEP_FP32 = "keep_fp32"  # the constant stays float32 and the ops reading it run FP32 behind Casts
    CLAMP = "clamp"  # clip to +-65504 (reported)
    ERROR = "error"  # refuse the conversion (ExportError)
    REFUSE = "error"  # alias of ERROR


@dataclass
class StrongResult:
    """The converted model and what had to change to fit FP16."""

    model: onnx.ModelProto
    adjusted_scales: list[str] = field(default_factory=list)  # "name: min old -> new (k values)"
    clamped_constants: list[str] = field(default_factory=list)
    fp32_nodes: list[str] = field(default_factory=list)
    kept_fp32_constants: list[str] = field(default_factory=list)  # "name: k value(s) up to X kept float32"

    def changes(self) -> dict:
        """What FP16 could not hold and what was done about it, for report.json."""
        return {"adjusted_scales": list(self.adjusted_scales), "clamped_constants": list(self.clamped_constants),
                "kept_fp32_constants": list(self.kept_fp32_constants), "fp32_nodes": list(self.fp32_nodes)}


def to_strongly_typed(model: onnx.ModelProto, *, keep_io_types: bool = True,
                      overflow: OverflowPolicy = OverflowPolicy.REFUSE) -> onnx.ModelProto:
    """Convert an FP32 Q/DQ graph to FP16 tensors with FP16 Q/DQ scales at opset >= 19.

    ``keep_io_types``: graph inputs/outputs stay float32 (Casts at the boundary). See ``convert_strongly_typed``.
    """
    return convert_strongly_typed(model, keep_io_types=keep_io_types, overflow=overflow).model


def convert_strongly_typed(model: onnx.ModelProto, *, keep_io_types: bool = True,
                           overflow: OverflowPolicy = OverflowPolicy.REFUSE,
                           fp32_ops: frozenset[str] = FP32_OPS) -> StrongResult:
    """As ``to_strongly_typed``, returning the adjustments made (scales raised, constants clamped)."""
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
           for n in model.graph.node for a in n.attribute):
        raise ExportError("strongly typed conversion does not handle subgraphs (If/Loop/Scan); "
                          "export the model without control flow")
    model = _to_opset(copy.deepcopy(model), STRONG_MIN_OPSET)
    result = StrongResult(model=model)
    elem = _elem_types(model)
    index = GraphIndex(model)
    graph = model.graph

    fp32_nodes = _overflow_consumers(index, result) if overflow is OverflowPolicy.KEEP_FP32 else set()
    keep32 = _fp32_tensors(index, fp32_ops, fp32_nodes)
    _convert_scales(index, result)
    _convert_initializers(index, keep32, overflow, result)

    new_nodes: list[onnx.NodeProto] = []
    graph_outputs = {o.name for o in graph.output}
    direct32_outputs: set[str] = set()
    for node in graph.node:
        if ((node.op_type in fp32_ops or _key(node) in fp32_nodes)
                and any(elem.get(i) == FLOAT for i in node.input if i)):
            new_nodes.extend(_wrap_fp32(node, elem, keep32, graph_outputs if keep_io_types else set(),
                                        direct32_outputs))
            result.fp32_nodes.append(node.name)
            continue
        if node.op_type == "Constant" and not all(o in keep32 for o in node.output):
            _float_attrs_to_tensor(node)
            _convert_constant_attr(node, "value", overflow, result)
        elif node.op_type == "ConstantOfShape":
            if get_attr(node, "value") is None:  # default value is float32 0
                node.attribute.append(helper.make_attribute("value", numpy_helper.from_array(np.zeros(1, np.float32))))
            _convert_constant_attr(node, "value", overflow, result)
        elif node.op_type == "Cast" and get_attr(node, "to") == FLOAT and node.output[0] not in keep32:
            _set_attr(node, "to", HALF)
        for k, inp in enumerate(node.input):
            if (node.op_type, k) in FLOAT32_SLOTS and inp and inp not in index.initializers:
                cast = f"{inp}__fp32_for_{node.name or node.output[0]}"
                new_nodes.append(helper.make_node("Cast", [inp], [cast], name=cast, to=FLOAT))
                node.input[k] = cast
        new_nodes.append(node)

    head, tail = _boundary_casts(graph, elem, new_nodes, keep_io_types, direct32_outputs)
    del graph.node[:]
    graph.node.extend(head + new_nodes + tail)
    del graph.value_info[:]
    _finish(model)
    return result


# ----------------------------------------------------------------------------------------------- steps


def _to_opset(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    current = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if current >= opset:
        return model
    try:
        from onnx import version_converter

        return version_converter.convert_version(model, opset)
    except Exception as exc:  # the converter raises bare RuntimeErrors/ValueErrors
        raise ExportError(f"cannot convert the graph from opset {current} to {opset}: {exc}. Convert before "
                          "appending custom ops (EfficientNMS_TRT), or export at opset 19") from exc


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # custom ops: fall back to what is declared
        inferred = model
    g = inferred.graph
    types = {vi.name: vi.type.tensor_type.elem_type for vi in [*g.input, *g.output, *g.value_info]}
    types.update({t.name: t.data_type for t in g.initializer})
    for node in g.node:  # Constant outputs are not always in value_info
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    types[node.output[0]] = a.t.data_type
    return types


def _key(node: onnx.NodeProto) -> str:
    """A node's identity across protobuf wrappers (its first output name is unique in the graph)."""
    return node.output[0] if node.output else node.name


def _overflow_consumers(index: GraphIndex, result: StrongResult) -> set[str]:
    """Keys of the nodes that read a float constant (not a Q/DQ scale) outside FP16 range: they run FP32."""
    scales = {n.input[1] for n in index.nodes if n.op_type in (Q_OP, DQ_OP) and len(n.input) > 1}
    consts = {name: t for name, t in index.initializers.items() if t.data_type == FLOAT}
    for n in index.nodes:
        if n.op_type == "Constant":
            t = next((a.t for a in n.attribute if a.name == "value" and a.t.data_type == FLOAT), None)
            if t is not None:
                consts[n.output[0]] = t
    keys: set[str] = set()
    for name, t in consts.items():
        if name in scales:  # scales have their own rule (_convert_scales)
            continue
        arr = numpy_helper.to_array(t)
        over = np.isfinite(arr) & (np.abs(arr) > FP16_MAX)
        readers = index.consumers.get(name, [])
        if not np.any(over) or not readers:
            continue
        keys.update(_key(c) for c in readers)
        result.kept_fp32_constants.append(
            f"{name}: {int(over.sum())} value(s) up to {np.abs(arr[np.isfinite(arr)]).max():.4g} > {FP16_MAX} kept "
            f"float32; {', '.join(c.name or c.output[0] for c in readers)} run(s) FP32")
    return keys


def _fp32_tensors(index: GraphIndex, fp32_ops: frozenset[str], fp32_nodes: set[str] = frozenset()) -> set[str]:
    """Constants, and Casts to float32, read only by FP32-only ops (or nodes kept FP32) or float32-only slots:
    they stay float32 (a shape cast to float for Range stays exact instead of a round trip through FP16)."""
    keep = set()
    names = set(index.initializers) | {n.output[0] for n in index.nodes if n.op_type == "Constant"}
    names |= {n.output[0] for n in index.nodes if n.op_type == "Cast" and get_attr(n, "to") == FLOAT}
    for name in names:
        uses = [(c, k) for c in index.consumers.get(name, []) for k, i in enumerate(c.input) if i == name]
        if uses and all(c.op_type in fp32_ops or _key(c) in fp32_nodes or (c.op_type, k) in FLOAT32_SLOTS
                        for c, k in uses):
            keep.add(name)
    return keep


def _convert_scales(index: GraphIndex, result: StrongResult) -> None:
    scale_users: dict[str, list[onnx.NodeProto]] = {}
    for node in index.nodes:
        if node.op_type in (Q_OP, DQ_OP) and len(node.input) > 1:
            scale_users.setdefault(node.input[1], []).append(node)
    for name, users in scale_users.items():
        value = index.const(name)
        if value is None:
            raise ExportError(f"Q/DQ scale {qcap(name)} is computed in the graph; store calibrated scales as "
                              "constants (fold constants) before conversion")
        old = value.astype(np.float32)
        if not np.all(np.isfinite(old)) or np.any(old <= 0) or np.any(old > FP16_MAX):
            raise ExportError(f"Q/DQ scale {qcap(name)} (max {np.max(old):.4g}) is not a positive FP16 value "
                              f"(<= {FP16_MAX}); re-calibrate or keep that layer out of quantization")
        new = np.maximum(old, np.float32(FP16_MIN_NORMAL)).astype(np.float16)
        raised = old < FP16_MIN_NORMAL
        if np.any(raised):
            result.adjusted_scales.append(
                f"{name}: {old[raised].min():.3g} -> {FP16_MIN_NORMAL:.3g} ({int(raised.sum())} value(s))")
            for node in users:
                if node.op_type == DQ_OP and node.input[0] in index.initializers:
                    _requantize(index, node, old, new.astype(np.float32))
        _replace_const(index, name, new)


def _replace_const(index: GraphIndex, name: str, value: np.ndarray) -> None:
    """Overwrite an initializer or a Constant node's value in place."""
    if name in index.initializers:
        index.initializers[name].CopyFrom(numpy_helper.from_array(value, name))
        return
    for a in index.producer[name].attribute:
        if a.name == "value":
            a.t.CopyFrom(numpy_helper.from_array(value, a.t.name))


def _requantize(index: GraphIndex, dq: onnx.NodeProto, old: np.ndarray, new: np.ndarray) -> None:
    """Re-express the int8 weights of ``dq`` with the raised scale so q*scale stays close."""
    t = index.initializers[dq.input[0]]
    q = numpy_helper.to_array(t).astype(np.float32)
    shape = [1] * q.ndim
    if old.size > 1:
        axis = get_attr(dq, "axis", 1)
        shape[axis if axis >= 0 else axis + q.ndim] = -1
    q_new = np.clip(np.round(q * old.reshape(shape) / new.reshape(shape)), -128, 127).astype(np.int8)
    t.CopyFrom(numpy_helper.from_array(q_new, t.name))


def _to_half(arr: np.ndarray, name: str, overflow: OverflowPolicy, result: StrongResult) -> np.ndarray:
    finite = np.isfinite(arr)
    over = finite & (np.abs(arr) > FP16_MAX)
    if np.any(over):
        if overflow is not OverflowPolicy.CLAMP:  # KEEP_FP32 kept it float32 before; here only when unreadable
            raise ExportError(f"constant {qcap(name)} holds {int(over.sum())} value(s) outside FP16 range "
                              f"(max |x| {np.abs(arr[finite]).max():.4g} > {FP16_MAX}); set "
                              "export.fp16_overflow to keep_fp32 (run its ops FP32) or clamp (clip them)")
        result.clamped_constants.append(f"{name}: {int(over.sum())} value(s) clipped to +-{FP16_MAX}")
        arr = np.clip(arr, -FP16_MAX, FP16_MAX)
    return arr.astype(np.float16)


def _convert_initializers(index: GraphIndex, keep32: set[str], overflow: OverflowPolicy,
                          result: StrongResult) -> None:
    for name, t in index.initializers.items():
        if t.data_type == FLOAT and name not in keep32:
            t.CopyFrom(numpy_helper.from_array(_to_half(numpy_helper.to_array(t), name, overflow, result), name))


def _convert_constant_attr(node: onnx.NodeProto, attr_name: str, overflow: OverflowPolicy,
                           result: StrongResult) -> None:
    for a in node.attribute:
        if a.name == attr_name and a.type == onnx.AttributeProto.TENSOR and a.t.data_type == FLOAT:
            half = _to_half(numpy_helper.to_array(a.t), node.name or node.output[0], overflow, result)
            a.t.CopyFrom(numpy_helper.from_array(half, a.t.name))


def _float_attrs_to_tensor(node: onnx.NodeProto) -> None:
    """Constant(value_float[s]=...) -> Constant(value=tensor) so that it can become FP16."""
    for a in list(node.attribute):
        if a.name in ("value_float", "value_floats"):
            value = np.asarray(helper.get_attribute_value(a), np.float32)
            node.attribute.remove(a)
            node.attribute.append(helper.make_attribute("value", numpy_helper.from_array(value)))


def _set_attr(node: onnx.NodeProto, name: str, value) -> None:
    for a in node.attribute:
        if a.name == name:
            a.CopyFrom(helper.make_attribute(name, value))


def _wrap_fp32(node: onnx.NodeProto, elem: dict[str, int], keep32: set[str], io32: set[str],
               direct32_outputs: set[str]) -> list[onnx.NodeProto]:
    """Casts around an op that must run in float32: inputs up to FP32, outputs back to FP16."""
    before, after = [], []
    label = node.name or node.output[0]
    for k, inp in enumerate(node.input):
        if inp and elem.get(inp) == FLOAT and inp not in keep32:
            cast = f"{inp}__fp32_for_{label}"
            before.append(helper.make_node("Cast", [inp], [cast], name=cast, to=FLOAT))
            node.input[k] = cast
    for k, out in enumerate(node.output):
        if not out or elem.get(out) != FLOAT:
            continue
        if out in io32:  # a float32 graph output: no round trip through FP16
            direct32_outputs.add(out)
            continue
        raw = f"{out}__fp32"
        node.output[k] = raw
        after.append(helper.make_node("Cast", [raw], [out], name=f"{out}__to_fp16", to=HALF))
    return before + [node] + after


def _boundary_casts(graph: onnx.GraphProto, elem: dict[str, int], nodes: list[onnx.NodeProto],
                    keep_io_types: bool, direct32_outputs: set[str]):
    head, tail = [], []
    for vi in graph.input:
        if vi.type.tensor_type.elem_type != FLOAT:
            continue
        if not keep_io_types:
            vi.type.tensor_type.elem_type = HALF
            continue
        half = f"{vi.name}__fp16"
        for n in nodes:
            for k, i in enumerate(n.input):
                if i == vi.name:
                    n.input[k] = half
        head.append(helper.make_node("Cast", [vi.name], [half], name=f"{vi.name}__to_fp16", to=HALF))
    for vi in graph.output:
        if vi.type.tensor_type.elem_type != FLOAT or vi.name in direct32_outputs:
            continue
        if not keep_io_types:
            vi.type.tensor_type.elem_type = HALF
            continue
        half = f"{vi.name}__fp16"
        for n in nodes:
            n.input[:] = [half if i == vi.name else i for i in n.input]
            n.output[:] = [half if o == vi.name else o for o in n.output]
        tail.append(helper.make_node("Cast", [half], [vi.name], name=f"{vi.name}__to_fp32", to=FLOAT))
    return head, tail


def _finish(model: onnx.ModelProto) -> None:
    model.ir_version = max(model.ir_version, 9)  # opset 19 needs IR 9
    custom = any(n.op_type in ("EfficientNMS_TRT",) or n.domain not in ("", "ai.onnx") for n in model.graph.node)
    try:
        if not custom:
            onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"strongly typed conversion produced an invalid graph: {exc}") from exc
