"""Q/DQ insertion on an FP32 ONNX graph, and its float twin used as the parity reference.

``insert_qdq`` writes what TensorRT reads: int8 weight initializers with a per-channel DequantizeLinear, float
biases, and a per-tensor QuantizeLinear -> DequantizeLinear pair in front of each INT8 layer's activation input
(one pair per consuming layer, sharing the tensor's scale — the structure the torch route exports, so onnxruntime's
Q/DQ fusions, and the numbers, match it; other consumers keep the float tensor). Scales are ``amax / 127`` in
float32, zero points int8 0.

``simulate_qdq`` builds the same graph with the quantization spelled in plain float ops — weights replaced by
``clip(rint(w / s), -128, 127) * s`` computed in numpy, activations by ``Mul(Clip(Round(Div(x, s))), s)`` — so
onnxruntime running it is a reference that shares neither the QuantizeLinear/DequantizeLinear kernels nor the
int8 weight folding with the graph under test.
"""

from __future__ import annotations

import copy

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from quantkit.exporter.passes import normalize
from quantkit.onnxin.placement import OnnxLayout, weight_array
from quantkit.quant.tensor_quantizer import QMAX, QMIN, weight_amax


def weight_scale(w: np.ndarray, axis: int | None) -> np.ndarray:
    """float32 scale (amax / 127) per output channel along ``axis`` ([C]) or per tensor (scalar).

    Same rule as the torch route (``weight_amax``): an all-zero channel gets amax 1.
    """
    amax = weight_amax(torch.from_numpy(np.array(w, dtype=np.float32)), axis)
    s = (amax.float() / QMAX).numpy().astype(np.float32)
    return s.reshape(-1) if axis is not None else s.reshape(())


def _broadcast(scale: np.ndarray, rank: int, axis: int | None) -> np.ndarray:
    if axis is None or scale.ndim == 0:
        return scale
    shape = [1] * rank
    shape[axis] = scale.size
    return scale.reshape(shape)


def quantize_weight(w: np.ndarray, scale: np.ndarray, axis: int | None) -> np.ndarray:
    """QuantizeLinear semantics (round half to even, saturate) to int8."""
    s = _broadcast(scale, w.ndim, axis)
    return np.clip(np.rint(w.astype(np.float32) / s), QMIN, QMAX).astype(np.int8)


def fake_quant_weight(w: np.ndarray, scale: np.ndarray, axis: int | None) -> np.ndarray:
    """The float32 weight an INT8 layer computes with: dequantize(quantize(w))."""
    return (quantize_weight(w, scale, axis).astype(np.float32) * _broadcast(scale, w.ndim, axis)).astype(np.float32)


def weight_scales(model: onnx.ModelProto, layout: OnnxLayout) -> dict[str, np.ndarray]:
    """Weight initializer name -> scale, for every weighted candidate (INT8 or not)."""
    out = {}
    for c in layout.candidates.values():
        if c.weight is not None and c.weight[0] not in out:
            out[c.weight[0]] = weight_scale(weight_array(model, c.weight[0]), c.weight[1])
    return out


def with_fake_quant_weights(model: onnx.ModelProto, layout: OnnxLayout, scales: dict[str, np.ndarray]) -> onnx.ModelProto:
    """A copy whose INT8 layers' weights are fake-quantized (floats): the graph the calibration pass runs, as
    in the torch route (activations downstream see the INT8 weights; float layers keep exact weights)."""
    m = copy.deepcopy(model)
    want = {layout.candidates[n].weight for n in layout.int8 if layout.candidates[n].weight is not None}
    names = {w for w, _ in want}
    for i, t in enumerate(m.graph.initializer):
        if t.name in names:
            axis = next(a for w, a in want if w == t.name)
            new = numpy_helper.from_array(fake_quant_weight(numpy_helper.to_array(t), scales[t.name], axis), t.name)
            m.graph.initializer[i].CopyFrom(new)
    return m


def _scalar(name: str, value: float, dtype) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value, dtype=dtype), name)


def activation_scale(amax: float) -> np.float32:
    """float32 ``amax / 127``, as the torch route's TensorQuantizer computes it."""
    return np.float32(amax) / np.float32(QMAX)


def _build(model: onnx.ModelProto, layout: OnnxLayout, act_scales: dict[str, float],
           scales: dict[str, np.ndarray], simulate: bool, *, check: bool = True,
           weight_cache: dict | None = None) -> onnx.ModelProto:
    m = copy.deepcopy(model)
    g = m.graph
    inits = {t.name: t for t in g.initializer}
    selected = [layout.candidates[n] for n in layout.int8]
    act = {c.act_input[1] for c in selected}
    missing = sorted(t for t in act if t not in act_scales)
    if missing:
        from quantkit.errors import CalibrationError

        raise CalibrationError(f"no scale for activation tensor(s) {missing[:5]}: recalibrate")
    new_inits: list[onnx.TensorProto] = []
    after: dict[str, list[onnx.NodeProto]] = {}  # tensor -> Q/DQ nodes to place right after its producer
    act_out: dict[str, str] = {}  # candidate node name -> the tensor its quantized input now reads
    for t in sorted(act):
        sname = f"{t}_scale"
        new_inits.append(_scalar(sname, np.float32(act_scales[t]), np.float32))
        if simulate:
            new_inits += [_scalar(f"{t}_qmin", QMIN, np.float32), _scalar(f"{t}_qmax", QMAX, np.float32)]
        else:
            new_inits.append(_scalar(f"{t}_zero_point", 0, np.int8))
    for c in selected:  # one pair per quantized input, as the torch route's one quantizer per layer exports
        t, p = c.act_input[1], c.name
        sname = f"{t}_scale"
        if simulate:
            q, r, cl, out = f"{p}/sim_div", f"{p}/sim_round", f"{p}/sim_clip", f"{p}/input_fq"
            nodes = [helper.make_node("Div", [t, sname], [q], name=f"{p}/sim/Div"),
                     helper.make_node("Round", [q], [r], name=f"{p}/sim/Round"),
                     helper.make_node("Clip", [r, f"{t}_qmin", f"{t}_qmax"], [cl], name=f"{p}/sim/Clip"),
                     helper.make_node("Mul", [cl, sname], [out], name=f"{p}/sim/Mul")]
        else:
            zp, qo, out = f"{t}_zero_point", f"{p}/input_quantized", f"{p}/input_dequantized"
            nodes = [helper.make_node("QuantizeLinear", [t, sname, zp], [qo], name=f"{p}/input/QuantizeLinear"),
                     helper.make_node("DequantizeLinear", [qo, sname, zp], [out], name=f"{p}/input/DequantizeLinear")]
        act_out[p] = out
        after.setdefault(t, []).extend(nodes)
    weight_out: dict[tuple[str, int | None], str] = {}
    weight_nodes: dict[str, list[onnx.NodeProto]] = {}  # consumer node name -> weight DQ nodes before it
    for c in selected:
        if c.weight is None or c.weight in weight_out:
            continue
        wname, axis = c.weight
        w = numpy_helper.to_array(inits[wname])
        s = scales[wname]
        if simulate:
            out = f"{wname}_fq" if axis is None else f"{wname}_fq_axis{axis}"
            cached = weight_cache.get(out) if weight_cache is not None else None
            if cached is None:
                cached = numpy_helper.from_array(fake_quant_weight(w, s, axis), out)
                if weight_cache is not None:
                    weight_cache[out] = cached
            new_inits.append(cached)
            weight_out[c.weight] = out
            continue
        tag = "" if axis is None else f"_axis{axis}" if _axes_of(selected, wname) > 1 else ""
        qname, sname, zname, out = (f"{wname}{tag}_int8", f"{wname}{tag}_scale", f"{wname}{tag}_zero_point",
                                    f"{wname}{tag}_dequantized")
        new_inits += [numpy_helper.from_array(quantize_weight(w, s, axis), qname), numpy_helper.from_array(s, sname),
                      numpy_helper.from_array(np.zeros(s.shape, np.int8), zname)]
        attrs = {} if axis is None or s.ndim == 0 else {"axis": axis}
        weight_nodes.setdefault(c.name, []).append(
            helper.make_node("DequantizeLinear", [qname, sname, zname], [out], name=f"{wname}{tag}/DequantizeLinear",
                             **attrs))
        weight_out[c.weight] = out
    by_name = {n.name: n for n in g.node}
    for c in selected:
        node = by_name[c.name]
        k, _ = c.act_input
        node.input[k] = act_out[c.name]
        if c.weight is not None:
            node.input[1] = weight_out[c.weight]
    ordered: list[onnx.NodeProto] = []
    for t in (i.name for i in g.input):
        ordered.extend(after.pop(t, []))
    for n in g.node:
        ordered.extend(weight_nodes.get(n.name, []))
        ordered.append(n)
        for o in n.output:
            ordered.extend(after.pop(o, []))
    del g.node[:]
    g.node.extend(ordered)
    g.initializer.extend(new_inits)
    from quantkit.exporter.passes import remove_unused_initializers

    del m.graph.value_info[:]
    m = remove_unused_initializers.edits_in_place(m)  # ``m`` is already a copy
    if not check:  # a replay's throwaway twin: its bytes need not be canonical, nor checked
        return m
    m = normalize.edits_in_place(m)
    onnx.checker.check_model(m)
    return m


def _axes_of(selected, wname: str) -> int:
    return len({c.weight[1] for c in selected if c.weight is not None and c.weight[0] == wname})


def insert_qdq(model: onnx.ModelProto, layout: OnnxLayout, act_scales: dict[str, float],
               scales: dict[str, np.ndarray]) -> onnx.ModelProto:
    """The INT8 Q/DQ graph (TensorRT weak typing form) of ``model`` for the layout's INT8 layers.

    ``act_scales``: activation tensor -> float32 scale (``activation_scale(amax)``, or a TensorRT cache's value
    as read, so an imported cache round-trips bit-exactly). ``scales``: weight initializer -> per-channel scale.
    """
    return _build(model, layout, act_scales, scales, simulate=False)


def simulate_qdq(model: onnx.ModelProto, layout: OnnxLayout, act_scales: dict[str, float],
                 scales: dict[str, np.ndarray], *, check: bool = True,
                 weight_cache: dict | None = None) -> onnx.ModelProto:
    """The float twin of ``insert_qdq`` (see the module docstring): the parity reference. The replays of the
    FP16 choice build dozens of twins of one graph: ``check=False`` skips onnx.checker (it serializes the whole
    model each time) and ``weight_cache`` (a dict kept across calls) keeps each fake-quantized weight."""
    return _build(model, layout, act_scales, scales, simulate=True, check=check, weight_cache=weight_cache)
