"""Per-node INT8-vs-FP32 error and activation histograms of an ONNX-route export, in onnxruntime: the rows
``eval.layer_sqnr`` measures on the torch route, for the graph that ships.

For every candidate node N of the layout (dB, float64 sums over the samples; see ``quantkit.sqnr``):

* ``output_sqnr_db``: N's output in model.int8.onnx against N's output in the FP32 graph (upstream error
  included), both run in onnxruntime with N's output exposed;
* ``input_quant_sqnr_db``: N's data input (FP32 graph) against that input quantized with its scale (INT8 nodes;
  None for a node kept float: its tensor has no scale);

and the |x| histogram of each INT8 input tensor over [0, ``hist_upper[tensor]``] (values above in the last bin)
for the calibration chart.
"""

from __future__ import annotations

import numpy as np
import onnx
import torch

from quantkit.eval.layer_sqnr import HIST_BINS, EnergySum, LayerError, LayerErrorResult, TensorHistogram
from quantkit.onnxin.qdq import fake_quant_weight


def measure_graph_layer_errors(fp32: onnx.ModelProto, int8: onnx.ModelProto, layout, act_scales: dict[str, float],
                               batches: list[np.ndarray], *, hist_upper: dict[str, float] | None = None,
                               threads: int | None = None, bins: int = HIST_BINS) -> LayerErrorResult:
    """Rows for ``layout``'s candidates (an ``onnxin.placement.OnnxLayout``) on ``batches`` (float32, the
    graphs' input); ``act_scales``: the INT8 tensors' scales. Histograms are keyed by tensor name."""
    from quantkit.exporter import parity
    from quantkit.onnxin.measure import with_outputs

    nodes = {n.name: n for n in fp32.graph.node}
    in_int8 = {t for n in int8.graph.node for t in n.output} | {i.name for i in int8.graph.input}
    rows = [(name, c, nodes[name].output[0]) for name, c in layout.candidates.items() if name in nodes]
    rows = [(name, c, out) for name, c, out in rows if out in in_int8]
    f_names = list(dict.fromkeys([out for _, _, out in rows] + [c.act_input[1] for _, c, _ in rows]))
    q_names = list(dict.fromkeys(out for _, _, out in rows))
    f_graph, q_graph = with_outputs(fp32, f_names), with_outputs(int8, q_names)
    f_sess = parity.session(f_graph.SerializeToString(), threads)
    q_sess = parity.session(q_graph.SerializeToString(), threads)
    f_idx = {o.name: i for i, o in enumerate(f_graph.graph.output)}
    q_idx = {o.name: i for i, o in enumerate(q_graph.graph.output)}
    out_e = {name: EnergySum() for name, _, _ in rows}
    in_e = {name: EnergySum() for name, c, _ in rows if c.act_input[1] in act_scales}
    hist_upper = hist_upper or {}
    hists: dict[str, np.ndarray] = {}
    samples = 0
    for b in batches:
        fo, qo = parity.run_session(f_sess, b), parity.run_session(q_sess, b)
        samples += int(b.shape[0])
        counted: set[str] = set()  # a tensor several nodes read is counted once per batch
        for name, c, out in rows:
            out_e[name].add(torch.from_numpy(fo[f_idx[out]]), torch.from_numpy(qo[q_idx[out]]))
            t = c.act_input[1]
            if name not in in_e:
                continue
            x = fo[f_idx[t]]
            fq = fake_quant_weight(x, np.float32(act_scales[t]), None)  # QuantizeLinear + DequantizeLinear
            in_e[name].add(torch.from_numpy(x), torch.from_numpy(fq))
            upper = hist_upper.get(t)
            if upper and upper > 0 and t not in counted:
                counted.add(t)
                counts, _ = np.histogram(np.minimum(np.abs(x), upper), bins=bins, range=(0.0, upper))
                hists[t] = hists.get(t, 0) + counts
    layers = [LayerError(name, c.op_type, layout.precision(name), out_e[name].db(),
                         in_e[name].db() if name in in_e else None) for name, c, _ in rows]
    histograms = {t: TensorHistogram(t, float(hist_upper[t]), [int(v) for v in h]) for t, h in hists.items()}
    return LayerErrorResult(layers, histograms, samples)
