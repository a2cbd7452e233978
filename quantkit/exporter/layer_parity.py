"""Layer-by-layer parity of an exported Q/DQ graph with the torch fake-quant model it came from.

Comparing only the final outputs cannot tell a wrong graph from a correct one: a single value on a rounding
boundary rounds differently in onnxruntime and in torch, and the flip cascades through the layers after it
(FACTS.md: on a deep detector every layer agreed to > 127 dB up to the first flip, the outputs only to
31-37 dB). So each quantized layer is judged on its own:

* **structure** — the layer's data input carries a Q/DQ pair exactly when torch quantizes it, with torch's
  scale; its weight is int8 with torch's per-channel scales on the output-channel axis;
* **replay** — the torch module is run on the very tensor onnxruntime fed that layer, and its output is
  compared with onnxruntime's: same inputs, same arithmetic, so anything beyond rounding (more than one
  quantization step of the output on more than ``MAX_FRACTION_OVER_STEP`` of the elements) means the layer
  does something else (a wrong op or a wrong Q/DQ).

Layers are found by hooking every quantized wrapper (one row per call, so a head shared across pyramid levels
gives one row per level) and matching the calls, in execution order, to the graph's nodes by op type and the
exporter's scope name. ``LayerParity.rows`` is also the debugger table for a runtime that disagrees with
the fake-quant model: per layer, torch-vs-onnxruntime SQNR and INT8-vs-FP32 SQNR.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from quantkit.data.inputs import ort_feeds
from quantkit.sqnr import sqnr_db
from quantkit.exporter.layer_rows import MAX_FRACTION_OVER_STEP, LayerParity, LayerRow  # noqa: F401 - re-exported
from quantkit.quant.modules import QUANT_TYPES, QuantAdd

SCALE_RTOL = 1e-5  # float32 scales written from the same amax agree to the last bit; allow float noise

# by float base class, so generic wrappers of subclasses (QuantConv2dSame, a Linear subclass) match too
_OPS = {QuantAdd: ("Add",), nn.modules.conv._ConvTransposeNd: ("ConvTranspose",), nn.Linear: ("Gemm", "MatMul")}
_DEFAULT_OPS = ("Conv",)


def _ops_of(module: nn.Module) -> tuple[str, ...]:
    for cls, ops in _OPS.items():
        if isinstance(module, cls):
            return ops
    return _DEFAULT_OPS


# ------------------------------------------------------------------------------------------- torch side


@dataclass
class _Call:
    name: str  # module name, with #k for repeated calls
    module: nn.Module
    out_q: np.ndarray | None = None
    out_fp32: np.ndarray | None = None


def _record(model: nn.Module, names: list[str], x: torch.Tensor) -> list[tuple[str, np.ndarray]]:
    """(module name, output) for every call of the named modules, in execution order."""
    calls: list[tuple[str, np.ndarray]] = []
    handles = []
    wanted = set(names)
    for name, m in model.named_modules():
        if name in wanted:
            handles.append(m.register_forward_hook(
                lambda mod, inp, out, name=name: calls.append((name, out.detach().float().numpy().copy()))
                if isinstance(out, torch.Tensor) else None))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return calls


def _torch_calls(qmodel: nn.Module, fp32: nn.Module | None, x: torch.Tensor) -> list[_Call]:
    modules = {n: m for n, m in qmodel.named_modules() if isinstance(m, QUANT_TYPES) and n}
    q_calls = _record(qmodel, list(modules), x)
    f_calls = _record(fp32, list(modules), x) if fp32 is not None else []
    seen: dict[str, int] = {}
    out = []
    f_by_name: dict[str, list[np.ndarray]] = {}
    for n, y in f_calls:
        f_by_name.setdefault(n, []).append(y)
    for n, y in q_calls:
        k = seen.get(n, 0)
        seen[n] = k + 1
        fp = f_by_name.get(n, [])
        out.append(_Call(name=n if k == 0 else f"{n}#{k}", module=modules[n], out_q=y,
                         out_fp32=fp[k] if k < len(fp) else None))
    return out


# -------------------------------------------------------------------------------------------- graph side


class _Graph:
    def __init__(self, model: onnx.ModelProto, fp16: bool = False):
        self.model, self.fp16 = model, fp16
        # FP16-stored scales: a float32 scale one ulp off torch's may round to the neighbouring FP16 value
        self.rtol = 2.0 ** -10 if fp16 else SCALE_RTOL
        self.nodes = list(model.graph.node)
        self.producer = {o: n for n in self.nodes for o in n.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in self.nodes:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.inits = {t.name: t for t in model.graph.initializer}

    def want(self, scale: np.ndarray) -> np.ndarray:
        """torch's scale as this graph must store it: the strong converter's FP16 (raised to the smallest normal)."""
        return np.maximum(scale, np.float32(2.0 ** -14)).astype(np.float16) if self.fp16 else scale

    def const(self, name: str) -> np.ndarray | None:
        t = self.inits.get(name)
        return numpy_helper.to_array(t) if t is not None else None

    def qdq(self, tensor: str) -> tuple[onnx.NodeProto | None, onnx.NodeProto | None, str]:
        """(DQ, Q, float tensor) behind ``tensor``: the Q/DQ pair feeding it, if any, and the float input."""
        dq = self.producer.get(tensor)
        if dq is None or dq.op_type != "DequantizeLinear":
            return None, None, tensor
        q = self.producer.get(dq.input[0])
        if q is None or q.op_type != "QuantizeLinear":
            return dq, None, tensor
        return dq, q, q.input[0]

    def output_of(self, node: onnx.NodeProto) -> str:
        """Layer output: a MatMul's bias Add (nn.Linear on N-D input exports as MatMul + Add) is part of it."""
        out = node.output[0]
        if node.op_type == "MatMul":
            cons = self.consumers.get(out, [])
            if len(cons) == 1 and cons[0].op_type == "Add" and any(i in self.inits for i in cons[0].input):
                return cons[0].output[0]
        return out


def _scope_matches(node_name: str, module_name: str) -> bool:
    """The exporter names a node ``/<scope>/.../<last>/<Op>``: ``last`` is the module's attribute path as it was
    called (``conv1``; ``features.0.0`` or ``conv.0.0`` from a torch.fx GraphModule), a suffix of its qualified
    name, with ``_<k>`` appended when that scope name was already used."""
    parts = node_name.strip("/").split("/")
    if len(parts) < 2:
        return False
    last = parts[-2]
    return any(module_name == c or module_name.endswith("." + c) for c in (last, re.sub(r"_\d+$", "", last)))


def _match(graph: _Graph, calls: list[_Call]) -> tuple[list[tuple[_Call, onnx.NodeProto]], list[str]]:
    """Pair calls with nodes in execution order (the exporter writes nodes in trace order)."""
    used: set[int] = set()
    pairs, unmatched = [], []
    cursor = 0
    for call in calls:
        base = call.name.split("#")[0]
        ops = _ops_of(call.module)

        def ok(i: int) -> bool:
            n = graph.nodes[i]
            return i not in used and n.op_type in ops and _scope_matches(n.name, base)

        idx = next((i for i in range(cursor, len(graph.nodes)) if ok(i)), None)
        if idx is None:
            idx = next((i for i in range(len(graph.nodes)) if ok(i)), None)
        if idx is None:
            unmatched.append(call.name)
            continue
        used.add(idx)
        cursor = idx + 1
        pairs.append((call, graph.nodes[idx]))
    return pairs, unmatched


def _weight_axis(node: onnx.NodeProto, rank: int) -> int:
    if node.op_type == "Conv":
        return 0
    if node.op_type == "ConvTranspose":
        return 1
    if node.op_type == "Gemm":
        return 0 if any(a.name == "transB" and a.i for a in node.attribute) else 1
    return rank - 1  # MatMul [..., K, N]


def _scale_problem(what: str, got: np.ndarray | None, want: np.ndarray, rtol: float = SCALE_RTOL) -> str | None:
    if got is None:
        return f"{what} scale is not a constant"
    got, want = np.ravel(got).astype(np.float64), np.ravel(want).astype(np.float64)
    if got.shape != want.shape:
        return f"{what} has {got.size} scale(s), torch {want.size}"
    rel = np.abs(got - want) / np.maximum(np.abs(want), 1e-30)
    if np.any(rel > rtol):
        i = int(np.argmax(rel))
        return f"wrong {what} scale: {got[i]:.6g} in the graph, torch {want[i]:.6g}"
    return None


def _check_data(graph: _Graph, call: _Call, node: onnx.NodeProto) -> tuple[list[str], list[str]]:
    """Structural problems of the data input(s) and the float tensors to replay the layer on."""
    m, problems = call.module, []
    data = node.input[1] if isinstance(m, QuantAdd) else node.input[0]
    dq, q, f_data = graph.qdq(data)
    floats = [f_data]
    if isinstance(m, QuantAdd):
        dq_main, _, f_main = graph.qdq(node.input[0])
        floats = [f_main, f_data]
        if dq_main is not None:
            problems.append("extra Q/DQ on the conv-path input of the residual Add")
    iq = m._input_quantizer
    if iq.enabled and dq is None:
        problems.append("missing Q/DQ on the data input (torch quantizes it)")
    elif not iq.enabled and dq is not None:
        problems.append("extra Q/DQ on the data input (torch keeps this layer in float)")
    elif iq.enabled:
        want = graph.want(iq.scale().detach().numpy())
        if q is None:
            problems.append("the data DequantizeLinear has no QuantizeLinear in front of it")
        for which, n in (("data QuantizeLinear", q), ("data DequantizeLinear", dq)):
            p = _scale_problem(which, graph.const(n.input[1]), want, graph.rtol) if n is not None else None
            if p:
                problems.append(p)
    return problems, floats


def _check_weight(graph: _Graph, call: _Call, node: onnx.NodeProto) -> list[str]:
    wq = getattr(call.module, "_weight_quantizer", None)
    if wq is None or len(node.input) < 2:
        return []
    dq, q, _ = graph.qdq(node.input[1])
    if not wq.enabled:
        return ["extra Q/DQ on the weight (torch keeps it float)"] if dq is not None else []
    if dq is None:
        return ["missing Q/DQ on the weight: it is stored in float (torch quantizes it)"]
    weight = graph.const(dq.input[0])
    if weight is None and q is not None:
        weight = graph.const(q.input[0])
    scale = graph.const(dq.input[1])
    want = graph.want(wq.scale().detach().numpy())
    if weight is None or scale is None:
        return ["weight Q/DQ does not read constants"]
    if want.size > 1 and scale.size == 1:
        return [f"weight quantized per-tensor (1 scale) where torch uses per-channel ({want.size} scales)"]
    if scale.size > 1:
        axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
        axis = axis + weight.ndim if axis < 0 else axis
        expect = _weight_axis(node, weight.ndim)
        if axis != expect:
            return [f"weight scales on axis {axis}, but its output channels are axis {expect}"]
    p = _scale_problem("weight", scale, want, graph.rtol)
    return [p] if p else []


# ------------------------------------------------------------------------------------------------ driver


def _ort_values(model: onnx.ModelProto, names: list[str], x: np.ndarray, threads: int | None) -> dict[str, np.ndarray]:
    """Run ``model`` literally with ``names`` added as graph outputs; one image at a time for a fixed batch."""
    from quantkit.exporter.parity import session

    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    inputs = {i.name for i in m.graph.input}
    extra = [n for n in dict.fromkeys(names) if n not in have and n not in inputs]
    for n in extra:  # untyped: onnxruntime infers float32 or (strong graph) float16
        m.graph.output.add().name = n
    sess = session(m, threads)
    inp = sess.get_inputs()[0]
    outs = [o.name for o in sess.get_outputs()]
    batch = inp.shape[0]
    step = batch if isinstance(batch, int) else x.shape[0]
    parts = [sess.run(outs, ort_feeds(sess.get_inputs(), x[i:i + step])) for i in range(0, x.shape[0], step)]
    values = {n: np.concatenate([p[k] for p in parts]) for k, n in enumerate(outs)}
    values.update(ort_feeds(sess.get_inputs(), x))
    return values


def _sqnr(ref: np.ndarray | None, test: np.ndarray) -> float:
    if ref is None or ref.shape != test.shape:
        return math.nan
    return sqnr_db(ref, test)


def layer_parity(qmodel: nn.Module, int8_onnx: onnx.ModelProto, x: torch.Tensor, fp32: nn.Module | None = None,
                 *, threads: int | None = None, fp16: bool = False, progress: bool = False) -> LayerParity:
    """Compare every quantized layer of ``qmodel`` with its node in ``int8_onnx`` on the inputs ``x``.

    ``fp32`` (the float model with the same module names) adds the per-layer INT8-vs-FP32 column. Keep ``x``
    small (one or two images): every layer's input and output are held in memory. ``fp16``: ``int8_onnx`` is the
    strongly typed graph: scales are expected as the converter writes them (FP16) and the layer is replayed in
    float32 on its FP16 input, so one quantization step still bounds an honest layer's difference. ``progress``:
    progress lines (``quantkit.utils.progress``): on a large detector this check runs for minutes.
    """
    from quantkit.utils.progress import progress_bar

    with progress_bar(None, "checking parity layer by layer", "step", enabled=progress) as bar:
        calls = _torch_calls(qmodel, fp32, x)
        graph = _Graph(int8_onnx, fp16)
        pairs, unmatched = _match(graph, calls)
        # steps: the torch passes and the match (done), onnxruntime's pass, one replay per layer; each setup step
        # weighs about a third of all replays (a guess that only shapes the ETA)
        setup = max(len(pairs), 3) / 3.0
        bar.set_total(2 + len(pairs), weights=(setup, setup, *([1.0] * len(pairs))))
        bar.update()
        checked = []
        for call, node in pairs:
            problems, floats = _check_data(graph, call, node)
            problems += _check_weight(graph, call, node)
            checked.append((call, node, problems, floats, graph.output_of(node)))
        wanted = [t for _, _, _, floats, out in checked for t in (*floats, out)]
        values = _ort_values(int8_onnx, wanted, x.detach().float().numpy(), threads)
        bar.update()
        rows = []
        for call, node, problems, floats, out in checked:
            rows.append(_replay_row(call, node, problems, floats, out, values))
            bar.update()
    claimed = {id(node) for _, node in pairs}
    unclaimed = [n.name for n in graph.nodes if id(n) not in claimed and n.op_type in ("Conv", "ConvTranspose", "Gemm")
                 or (n.op_type == "MatMul" and id(n) not in claimed and graph.qdq(n.input[1])[0] is not None)]
    return LayerParity(rows=rows, unmatched=unmatched, unclaimed=unclaimed)


def _replay_row(call: _Call, node: onnx.NodeProto, problems: list[str], floats: list[str], out: str,
                values: dict[str, np.ndarray]) -> LayerRow:
    """One layer's row: the torch module run on the tensors onnxruntime fed the node, against the node's output
    ``out`` (``values``: onnxruntime's tensors by name)."""
    y_ort = values[out]
    row = LayerRow(layer=call.name, op=node.op_type, node=node.name or out,
                   int8=bool(call.module._input_quantizer.enabled), problems=problems)
    with torch.no_grad():
        # replay: the op on the tensors that reach the node (a subclass's own padding already done)
        y_torch = call.module.replay(*[torch.from_numpy(np.ascontiguousarray(values[f], np.float32)) for f in floats])
    y_torch, y_ort = y_torch.float().numpy(), y_ort.astype(np.float32)
    if y_torch.shape == y_ort.shape and np.any(np.isfinite(y_torch) & ~np.isfinite(y_ort)):
        row.problems.append("non-finite outputs where torch's are finite (an FP16 overflow?)")
    if y_torch.shape == y_ort.shape:
        step = float(np.max(np.abs(y_ort))) / 127.0
        row.replay_db = sqnr_db(y_ort, y_torch)
        row.over_step = float(np.mean(np.abs(y_torch - y_ort) > step)) if step > 0 else 0.0
    else:
        row.problems.append(f"output shape {tuple(y_ort.shape)} in the graph, torch {tuple(y_torch.shape)}")
    row.run_db = _sqnr(call.out_q, y_ort)
    row.int8_vs_fp32_db = _sqnr(call.out_fp32, y_ort)
    return row
