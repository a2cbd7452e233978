"""Small ModelProto -> ModelProto passes applied after torch export, each independently testable.

* :func:`constants_to_initializers` — Constant nodes become initializers (one place to find scales).
* :func:`fold_weight_quantize` — Q(float weight) -> int8 initializer feeding the DequantizeLinear, which stores
  weights at 1 byte each (the INT8 file is ~1/4 of FP32) and is the form TensorRT expects.
* :func:`normalize` — strip doc strings, deterministic metadata, so the same inputs give identical bytes.

Every pass returns a new ModelProto and leaves its input untouched (``@graph_pass`` copies it first), so a
caller may keep the graph it passed in.
"""

from __future__ import annotations

import functools

import numpy as np
import onnx
from onnx import numpy_helper

from quantkit.errors import ExportError


def graph_pass(fn):
    """Make ``fn`` (which edits the ModelProto it is given) a ModelProto -> new ModelProto pass."""
    @functools.wraps(fn)
    def run(model: onnx.ModelProto, *args, **kwargs) -> onnx.ModelProto:
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        return fn(copy, *args, **kwargs)
    run.edits_in_place = fn
    return run


@graph_pass
def constants_to_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """Move tensor-valued Constant nodes into graph initializers (names kept)."""
    g = model.graph
    keep = []
    for node in g.node:
        if node.op_type == "Constant" and len(node.attribute) == 1 and node.attribute[0].name == "value":
            t = onnx.TensorProto()
            t.CopyFrom(node.attribute[0].t)
            t.name = node.output[0]
            g.initializer.append(t)
        else:
            keep.append(node)
    del g.node[:]
    g.node.extend(keep)
    return model


@graph_pass
def inline_initializer_identities(model: onnx.ModelProto) -> onnx.ModelProto:
    """Rewire ``Identity(initializer)`` nodes (the exporter's de-duplicated constants) to the initializer."""
    g = model.graph
    inits = {t.name for t in g.initializer}
    graph_outputs = {o.name for o in g.output}
    alias = {}
    keep = []
    for n in g.node:
        if n.op_type == "Identity" and n.input[0] in inits and n.output[0] not in graph_outputs:
            alias[n.output[0]] = n.input[0]
        else:
            keep.append(n)
    for n in keep:
        for i, name in enumerate(n.input):
            if name in alias:
                n.input[i] = alias[name]
    del g.node[:]
    g.node.extend(keep)
    return model


def _consumers(g: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    out: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for i in n.input:
            out.setdefault(i, []).append(n)
    return out


def _quantize(w: np.ndarray, scale: np.ndarray, zp: np.ndarray, axis: int) -> np.ndarray:
    """ONNX QuantizeLinear semantics: saturate(round_half_even(w / scale) + zp) to int8."""
    if scale.ndim == 1 and scale.size > 1:
        shape = [1] * w.ndim
        shape[axis] = scale.size
        scale = scale.reshape(shape)
        zp = zp.reshape(shape)
    q = np.rint(w.astype(np.float32) / scale.astype(np.float32)) + zp.astype(np.int32)
    return np.clip(q, -128, 127).astype(np.int8)


def _unique(name: str, taken: set[str]) -> str:
    if name not in taken:
        return name
    k = 1
    while f"{name}_{k}" in taken:
        k += 1
    return f"{name}_{k}"


def _int8_name(q: onnx.NodeProto) -> str:
    """``<weight>_int8``; a weight the exporter computed (``onnx::...``, e.g. the transposed weight of a Linear on
    N-D input) is named after the Q node's module scope instead (``fc.weight_t_int8``)."""
    src = q.input[0]
    scope = [p for p in q.name.strip("/").split("/")[:-1] if p != "_weight_quantizer"]
    if src.startswith("onnx::") and scope:
        return ".".join(scope) + ".weight_t_int8"
    return src + "_int8"


@graph_pass
def fold_weight_quantize(model: onnx.ModelProto) -> onnx.ModelProto:
    """Replace every QuantizeLinear whose input is an initializer by an int8 initializer.

    Raises ExportError when a weight Q has a non-int8 zero point (never produced by quantkit).
    """
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    consumers = _consumers(g)
    removed_nodes = set()
    # A module called more than once (a head shared across pyramid levels), or two modules whose equal weights
    # the exporter merged into one initializer, gives several weight Q nodes over one initializer: they share
    # one int8 initializer. Only a genuinely different quantization of the same float weight gets a new name.
    folded: dict[tuple, str] = {}
    taken = {t.name for t in g.initializer}
    for node in g.node:
        if node.op_type != "QuantizeLinear" or node.input[0] not in inits:
            continue
        w = numpy_helper.to_array(inits[node.input[0]])
        scale = numpy_helper.to_array(inits[node.input[1]])
        zp_t = inits.get(node.input[2]) if len(node.input) > 2 else None
        zp = numpy_helper.to_array(zp_t) if zp_t is not None else np.zeros_like(scale, dtype=np.int8)
        if zp.dtype != np.int8:
            raise ExportError(f"weight quantizer {node.name} has zero point dtype {zp.dtype}; expected int8")
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        key = (node.input[0], scale.dtype.str, scale.shape, scale.tobytes(), zp.tobytes(), axis)
        qname = folded.get(key)
        if qname is None:
            qname = _unique(_int8_name(node), taken)
            folded[key] = qname
            taken.add(qname)
            g.initializer.append(numpy_helper.from_array(_quantize(w, scale, zp, axis), qname))
        for c in consumers.get(node.output[0], []):
            for i, name in enumerate(c.input):
                if name == node.output[0]:
                    c.input[i] = qname
        removed_nodes.add(id(node))
    keep = [n for n in g.node if id(n) not in removed_nodes]
    del g.node[:]
    g.node.extend(keep)
    return remove_unused_initializers.edits_in_place(model)


@graph_pass
def remove_unused_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    g = model.graph
    used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    for k in reversed([k for k, t in enumerate(g.initializer) if t.name not in used]):
        del g.initializer[k]  # in place: the kept ones are not copied (a 50 MB graph's weights, per replay twin)
    return model


@graph_pass
def normalize(model: onnx.ModelProto) -> onnx.ModelProto:
    """Deterministic bytes: strip doc strings, fixed producer fields, sorted initializers."""
    model.doc_string = ""
    model.graph.doc_string = ""
    for n in model.graph.node:
        n.doc_string = ""
    inits = sorted(model.graph.initializer, key=lambda t: t.name)
    del model.graph.initializer[:]
    model.graph.initializer.extend(inits)
    model.producer_name = "quantkit"
    from quantkit.version import __version__

    model.producer_version = __version__
    return model


def qdq_summary(model: onnx.ModelProto) -> dict[str, int]:
    """Counts of Q and DQ nodes and of int8 initializers, for reports and tests."""
    ops = [n.op_type for n in model.graph.node]
    return {
        "QuantizeLinear": ops.count("QuantizeLinear"),
        "DequantizeLinear": ops.count("DequantizeLinear"),
        "int8_initializers": sum(1 for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8),
    }


def finalize_int8(model: onnx.ModelProto) -> onnx.ModelProto:
    """The INT8 export passes in order (on a copy); checks the result with onnx.checker."""
    model = normalize(fold_weight_quantize(inline_initializer_identities(constants_to_initializers(model))))
    onnx.checker.check_model(model)
    return model


def finalize_fp32(model: onnx.ModelProto) -> onnx.ModelProto:
    model = normalize(remove_unused_initializers(inline_initializer_identities(constants_to_initializers(model))))
    onnx.checker.check_model(model)
    return model


__all__ = ["finalize_int8", "finalize_fp32", "fold_weight_quantize", "constants_to_initializers", "normalize",
           "qdq_summary"]
