"""The placement rules ``quantkit.exporter.lint.lint`` applies, one function each, registered with ``@rule``.

Registration order is the order of this file; ``lint`` reports findings in that order, so keep it stable.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import onnx

from quantkit.exporter.lint_core import (
    DATA_MOVEMENT_OPS,
    DQ_OP,
    FP16_MAX,
    FP16_MIN_NORMAL,
    FP16_MIN_SUBNORMAL,
    HEAD_OPS,
    Q_OP,
    STRONG_MIN_OPSET,
    WEIGHTED_OPS,
    Finding,
    GraphIndex,
    Severity,
    get_attr,
    node_label,
    rule,
)
from quantkit.exporter.graph import dq_of

# --------------------------------------------------------------------------------------------- helpers


def _qdq_nodes(index: GraphIndex) -> Iterator[onnx.NodeProto]:
    return (n for n in index.nodes if n.op_type in (Q_OP, DQ_OP))


def _is_weight_dq(index: GraphIndex, node: onnx.NodeProto) -> bool:
    """A DQ of a stored int8 weight, or a Q/DQ pair fake-quantizing a float weight initializer."""
    if index.const(node.input[0]) is not None:
        return True
    q = index.producer.get(node.input[0]) if node.op_type == DQ_OP else None
    return q is not None and q.op_type == Q_OP and index.const(q.input[0]) is not None


def _scale_of(index: GraphIndex, node: onnx.NodeProto) -> np.ndarray | None:
    return index.const(node.input[1]) if len(node.input) > 1 else None


def _feeds_bias(index: GraphIndex, node: onnx.NodeProto) -> bool:
    consumers = index.consumers.get(node.output[0], [])
    return bool(consumers) and all(
        c.op_type in ("Conv", "ConvTranspose", "Gemm") and len(c.input) > 2 and c.input[2] == node.output[0]
        for c in consumers)


def _weight_out_axis(node: onnx.NodeProto, weight_rank: int) -> int:
    """Output-channel axis of the weight input of a weighted layer."""
    if node.op_type == "Conv":
        return 0
    if node.op_type == "ConvTranspose":
        return 1
    if node.op_type == "Gemm":
        return 0 if get_attr(node, "transB", 0) else 1
    return weight_rank - 1  # MatMul: [..., K, N]


# ----------------------------------------------------------------------------------------------- rules


@rule("int8-zero-point")
def _rule_zero_point(index: GraphIndex, strong: bool) -> Iterator[Finding]:
    fix = "use int8 symmetric quantization: zero point an int8 tensor of zeros (scale = amax / 127)"
    for node in _qdq_nodes(index):
        label = node_label(node)
        if _feeds_bias(index, node):
            continue  # reported by "float-bias"
        if len(node.input) < 3 or not node.input[2]:
            if node.op_type == Q_OP:  # a QuantizeLinear without zero point outputs uint8
                yield Finding("int8-zero-point", Severity.ERROR, label,
                              "QuantizeLinear has no zero point, so it quantizes to uint8", fix)
            elif index.const_dtype(node.input[0]) not in (None, onnx.TensorProto.INT8):
                yield Finding("int8-zero-point", Severity.ERROR, label,
                              "DequantizeLinear reads a non-int8 constant", fix)
            continue
        zp_name = node.input[2]
        dtype = index.const_dtype(zp_name)
        zp = index.const(zp_name)
        if zp is None:
            yield Finding("int8-zero-point", Severity.WARNING, label,
                          f"zero point '{zp_name}' is not a constant; cannot verify it is int8 zero", fix)
        elif dtype != onnx.TensorProto.INT8:
            name = onnx.TensorProto.DataType.Name(dtype)
            yield Finding("int8-zero-point", Severity.ERROR, label,
                          f"zero point is {name} (TensorRT supports int8 only)", fix)
        elif np.any(zp != 0):
            yield Finding("int8-zero-point", Severity.ERROR, label,
                          f"zero point is non-zero ({np.unique(zp)[:4].tolist()}); TensorRT needs symmetric", fix)


@rule("scale-finite-positive")
def _rule_scale(index: GraphIndex, strong: bool) -> Iterator[Finding]:
    for node in _qdq_nodes(index):
        scale = _scale_of(index, node)
        if scale is None:
            yield Finding("scale-finite-positive", Severity.ERROR, node_label(node),
                          "scale is not a constant initializer", "store scales as initializers")
        elif not np.all(np.isfinite(scale)) or np.any(scale <= 0):
            bad = scale[~(np.isfinite(scale) & (scale > 0))].ravel()[:4].tolist()
            yield Finding("scale-finite-positive", Severity.ERROR, node_label(node),
                          f"scale has non-finite or non-positive values {bad}",
                          "re-calibrate: amax must be finite and > 0 (dead channels need a floor)")


@rule("float-bias")
def _rule_bias(index: GraphIndex, strong: bool) -> Iterator[Finding]:
    for node in _qdq_nodes(index):
        if node.op_type == DQ_OP and _feeds_bias(index, node):
            yield Finding("float-bias", Severity.ERROR, node_label(node),
                          "the layer's bias is stored quantized (int32 DequantizeLinear)",
                          "store biases as float initializers; TensorRT quantizes them itself")


@rule("weight-per-channel")
def _rule_weight_axis(index: GraphIndex, strong: bool) -> Iterator[Finding]:
    for node in index.nodes:
        if node.op_type not in WEIGHTED_OPS or len(node.input) < 2:
            continue
        dq = dq_of(index, node.input[1])
        if dq is None or not _is_weight_dq(index, dq):
            continue
        weight = index.const(dq.input[0])
        if weight is None:  # Q(float weight) -> DQ
            weight = index.const(index.producer[dq.input[0]].input[0])
        scale = _scale_of(index, dq)
        if scale is None:
            continue
        if index.producer.get(node.input[1]) is not dq:
            continue  # reshaped/transposed weight: axis mapping not checked
        want = _weight_out_axis(node, weight.ndim)
        one_channel = scale.ndim == 1 and weight.shape[want] == 1  # per-channel with a single output channel
        if scale.size == 1 and not one_channel:
            yield Finding("weight-per-channel", Severity.WARNING, node_label(dq),
                          f"weight of {node.op_type} '{node_label(node)}' is quantized per-tensor",
                          f"quantize weights per output channel (axis {want})")
            continue
        axis = get_attr(dq, "axis", 1)
        axis = axis + weight.ndim if axis < 0 else axis
        if axis != want or scale.size != weight.shape[want]:
            yield Finding("weight-per-channel", Severity.ERROR, node_label(dq),
                          f"weight of {node.op_type} '{node_label(node)}' is quantized on axis {axis} "
                          f"({scale.size} scales) but its output channels are axis {want} "
                          f"({weight.shape[want]})",
                          f"set DequantizeLinear axis={want} with one scale per output channel")


@rule("activation-per-tensor")
def _rule_activation_per_tensor(index: GraphIndex, strong: bool) -> Iterator[Finding]:
    for node in _qdq_nodes(index):
        if _is_weight_dq(index, node):
            continue
        scale = _scale_of(index, node)
        if scale is not None and scale.size != 1:
            yield Finding("activation-per-tensor", Severity.ERROR, node_label(node),
                          f"activation quantized with {scale.size} scales",
                          "quantize activations per-tensor (one scalar scale)")


@rule("weighted-both-inputs")
def _rule_both_inputs(index: GraphIndex, strong: bool) -> Iterator[Finding]:
    for node in index.nodes:
        if node.op_type not in WEIGHTED_OPS or len(node.input) < 2:
            continue
        data_q = dq_of(index, node.input[0]) is not None
        weight_q = dq_of(index, node.input[1]) is not None
        if data_q != weight_q:
            which = "weight" if data_q else "data input"
            yield Finding("weighted-both-inputs", Severity.ERROR, node_label(node),
                          f"{node.op_type} has a quantized {'data input' if data_q else 'weight'} "
                          f"but an unquantized {which}; TensorRT cannot run it in INT8",
                          f"add Q/DQ on the {which}, or remove the other Q/DQ to keep the layer in float")


@rule("residual-add")
def _rule_residual_add(index: GraphIndex, strong: bool) -> Iterator[Finding]:
    convs = ("Conv", "ConvTranspose")
    for node in index.nodes:
        if node.op_type != "Add" or len(node.input) != 2 or any(index.const(i) is not None for i in node.input):
            continue  # not a residual Add (bias-like or malformed)
        label = node_label(node)
        src = [index.producer.get(i) for i in node.input]
        is_dq = [p is not None and p.op_type == DQ_OP for p in src]
        if all(is_dq):
            yield Finding("residual-add", Severity.WARNING, label,
                          "both Add inputs are quantized; the Add cannot fuse into the conv epilogue",
                          "keep Q/DQ only on the skip (identity) input; the conv-path input stays float")
            continue
        for k in range(2):
            mine, other = src[k], src[1 - k]
            other_is_conv = other is not None and other.op_type in convs
            if is_dq[k] and not other_is_conv:
                q = index.producer.get(mine.input[0])
                if q is not None and q.op_type == Q_OP and index.producer_op(q.input[0]) in convs:
                    yield Finding("residual-add", Severity.WARNING, label,
                                  "the conv-path input of the residual Add is quantized and the skip is not",
                                  "move the Q/DQ from the conv output to the skip input of the Add")
            elif (not any(is_dq) and mine is not None and mine.op_type in convs and not other_is_conv
                  and dq_of(index, mine.input[0]) is not None):
                yield Finding("residual-add", Severity.WARNING, label,
                              f"INT8 conv '{node_label(mine)}' feeds a residual Add whose skip input is not "
                              "quantized; the Add will not fuse into the INT8 conv",
                              "add Q/DQ (with the next layer's input scale) on the skip input")


@rule("concat-shared-scale")
def _rule_concat(index: GraphIndex, strong: bool) -> Iterator[Finding]:
    for node in index.nodes:
        if node.op_type != "Concat":
            continue
        scales = []
        for inp in node.input:
            dq = index.producer.get(inp)
            if dq is not None and dq.op_type == DQ_OP:
                s = _scale_of(index, dq)
                if s is not None:
                    scales.append(float(np.ravel(s)[0]) if s.size == 1 else np.nan)
        if len(scales) >= 2 and not np.allclose(scales, scales[0], rtol=1e-6, atol=0):
            yield Finding("concat-shared-scale", Severity.WARNING, node_label(node),
                          f"Concat inputs are quantized with different scales {sorted(set(scales))[:4]}",
                          "quantize once after the Concat (TensorRT propagates it) or give all inputs one scale")


def _head_region(index: GraphIndex) -> set[int]:
    """ids of nodes between the last weighted layers and the graph outputs (the float head)."""
    region: set[int] = set()
    stack = [index.producer[o] for o in index.graph_outputs if o in index.producer]
    while stack:
        node = stack.pop()
        if id(node) in region or node.op_type in WEIGHTED_OPS:
            continue
        region.add(id(node))
        stack.extend(index.producer[i] for i in node.input if i in index.producer)
    return region


@rule("float-head")
def _rule_float_head(index: GraphIndex, strong: bool) -> Iterator[Finding]:
    head = _head_region(index)
    flagged: set[int] = set()
    for node in index.nodes:
        if node.op_type not in HEAD_OPS:
            continue
        stack = [i for i in node.input if i]
        seen: set[str] = set()
        while stack:
            name = stack.pop()
            if name in seen:
                continue
            seen.add(name)
            prod = index.producer.get(name)
            if prod is None or prod.op_type in WEIGHTED_OPS:
                continue
            if prod.op_type in (Q_OP, DQ_OP):
                if prod.op_type == DQ_OP and _is_weight_dq(index, prod):
                    continue
                if id(prod) not in flagged:
                    flagged.add(id(prod))
                    where = "detection head" if id(node) in head else "graph"
                    yield Finding("float-head", Severity.ERROR if id(node) in head else Severity.WARNING,
                                  node_label(prod),
                                  f"Q/DQ feeds {node.op_type} '{node_label(node)}' in the {where}; "
                                  "scores/softmax need float resolution",
                                  "remove Q/DQ between the last conv and Sigmoid/Softmax/decode/NMS")
                if prod.op_type == DQ_OP:
                    q = index.producer.get(prod.input[0])
                    if q is not None and q.op_type == Q_OP:
                        flagged.add(id(q))
                stack.extend(prod.input[:1])
            elif prod.op_type in DATA_MOVEMENT_OPS:
                stack.extend(i for i in prod.input if i and index.const(i) is None)
    for node in index.nodes:  # Q/DQ sitting on the way to an output with no weighted layer after it
        if node.op_type == Q_OP and id(node) in head and id(node) not in flagged:
            consumers = [c for out in node.output for c in index.consumers.get(out, [])]
            dq_outs = [o for c in consumers if c.op_type == DQ_OP for o in c.output]
            feeds_weighted = any(c.op_type in WEIGHTED_OPS or c.op_type == "Concat" or _residual_skip(index, c, o)
                                 for o in dq_outs for c in index.consumers.get(o, []))
            if not feeds_weighted:
                yield Finding("float-head", Severity.ERROR, node_label(node),
                              "Q/DQ after the last weighted layer quantizes a head output",
                              "remove Q/DQ between the last conv and the outputs")


def _residual_skip(index: GraphIndex, node: onnx.NodeProto, tensor: str) -> bool:
    """``tensor`` is the quantized skip input of a residual Add whose other input comes straight from a weighted
    layer: TensorRT fuses that Add into the layer's INT8 epilogue, so the Q/DQ belongs there even at the end."""
    if node.op_type != "Add" or len(node.input) != 2:
        return False
    other = node.input[1] if node.input[0] == tensor else node.input[0]
    return index.producer_op(other) in WEIGHTED_OPS


@rule("dangling-qdq")
def _rule_dangling(index: GraphIndex, strong: bool) -> Iterator[Finding]:
    for node in _qdq_nodes(index):
        label = node_label(node)
        if node.op_type == Q_OP:
            out = node.output[0]
            consumers = index.consumers.get(out, [])
            if out in index.graph_outputs or not consumers or any(c.op_type != DQ_OP for c in consumers):
                yield Finding("dangling-qdq", Severity.ERROR, label,
                              "QuantizeLinear output does not go (only) to DequantizeLinear",
                              "pair every QuantizeLinear with a DequantizeLinear")
        else:
            src = node.input[0]
            if index.producer_op(src) == Q_OP:
                continue
            if index.const(src) is not None:
                continue  # a stored weight; its dtype is checked by "int8-zero-point"
            yield Finding("dangling-qdq", Severity.ERROR, label,
                          "DequantizeLinear input is neither a QuantizeLinear nor a constant",
                          "feed DequantizeLinear from a QuantizeLinear or an int8 weight initializer")


@rule("strong-fp16-scale")
def _rule_fp16_scale(index: GraphIndex, strong: bool) -> Iterator[Finding]:
    if not strong:
        return
    for node in _qdq_nodes(index):
        scale = _scale_of(index, node)
        if scale is None:
            continue
        s = np.abs(scale.astype(np.float64)).ravel()
        label = node_label(node)
        fix = "clamp the scale into FP16's normal range (requantize int8 weights) or keep this layer FP32"
        if np.any(s > FP16_MAX):
            yield Finding("strong-fp16-scale", Severity.ERROR, label,
                          f"scale {s.max():.3g} overflows FP16 (max {FP16_MAX})", fix)
        if np.any(s < FP16_MIN_SUBNORMAL / 2):
            yield Finding("strong-fp16-scale", Severity.ERROR, label,
                          f"scale {s.min():.3g} rounds to 0 in FP16", fix)
        elif np.any(s < FP16_MIN_NORMAL):
            yield Finding("strong-fp16-scale", Severity.WARNING, label,
                          f"scale {s.min():.3g} is subnormal in FP16 (< {FP16_MIN_NORMAL:.3g}); precision lost",
                          fix)


@rule("strong-opset")
def _rule_opset(index: GraphIndex, strong: bool) -> Iterator[Finding]:
    if strong and index.opset() < STRONG_MIN_OPSET:
        yield Finding("strong-opset", Severity.ERROR, "<model>",
                      f"opset {index.opset()} < {STRONG_MIN_OPSET}: QuantizeLinear cannot take FP16 scales",
                      "convert with quantkit.exporter.strong.to_strongly_typed (opset 19)")
