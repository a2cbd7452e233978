"""What the ONNX route's passes and their guard's check share (``onnxin.target``): calibration rows as arrays, one
onnxruntime session per graph over them, per-output SQNR, the check images with their FP32 outputs computed once,
and a graph with extra outputs."""

from __future__ import annotations

import copy

import numpy as np
import onnx

MEASURE = "worst output's SQNR (dB) of the float Q/DQ twin against FP32 in onnxruntime"


def row_batches(cal, rows: list[int], limit: int | None = None) -> list[np.ndarray]:
    """Calibration ``rows`` as float32 batches (``limit``: at most that many, spread over the rows)."""
    from quantkit.ptq.guard import RowView

    return [b.numpy() for b in RowView(cal, rows).batches(limit=limit, spread=limit is not None)]


def run_graph(model: onnx.ModelProto, batches: list[np.ndarray], threads: int | None) -> list[list[np.ndarray]]:
    """Every output of ``model`` on each batch, one literal CPU session (``exporter.parity.session``)."""
    from quantkit.exporter import parity

    sess = parity.session(model.SerializeToString(), threads)
    return [parity.run_session(sess, b) for b in batches]


def per_output_db(ref, got, names, sigmoid=frozenset()) -> dict[str, float]:
    """SQNR (dB) per output; a sigmoid output's is its clipped logit's (``parity.ParityResult.judged_db``)."""
    from quantkit.exporter import parity

    r = parity.compare_outputs(ref, got, names, sigmoid)
    return {n: r.judged_db(n) for n in names}


def with_outputs(model: onnx.ModelProto, tensors: list[str]) -> onnx.ModelProto:
    """A copy of ``model`` that also outputs ``tensors`` (float)."""
    m = copy.deepcopy(model)
    have = {o.name for o in m.graph.output}
    m.graph.output.extend(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None)
                          for t in tensors if t not in have)
    return m


class CheckImages:
    """The guard's held-out check rows of ``cal`` (``ptq.guard.split_rows``) and the worst output's judged SQNR of a
    graph on them (or on ``rows``) against ``fp32`` (the cleaned FP32 graph), whose outputs are computed once, when first needed."""

    def __init__(self, fp32: onnx.ModelProto, cal, threads: int | None, rows: list[int] | None = None):
        from quantkit.exporter.parity import sigmoid_outputs
        from quantkit.ptq.guard import split_rows

        self.fp32, self.threads, self.cal = fp32, threads, cal
        self.rows = split_rows(cal.num_samples)[1] if rows is None else list(rows)
        self.names, self.sigmoid = [o.name for o in fp32.graph.output], sigmoid_outputs(fp32)
        self.batches = self._ref = None

    def worst_db(self, graph: onnx.ModelProto) -> float:
        got = self._run(graph)
        return min(per_output_db(self._ref, got, self.names, self.sigmoid).values())

    def worst_raw_db(self, graph: onnx.ModelProto) -> float:
        """The worst output's SQNR with no output judged on its logit (the torch route's measure)."""
        got = self._run(graph)
        return min(per_output_db(self._ref, got, self.names).values())

    def _run(self, graph: onnx.ModelProto):
        if self._ref is None:  # loaded and run once, when a step first asks (none with every step off)
            self.batches = row_batches(self.cal, self.rows)
            self._ref = run_graph(self.fp32, self.batches, self.threads)
        return run_graph(graph, self.batches, self.threads)


__all__ = ["MEASURE", "CheckImages", "row_batches", "run_graph", "per_output_db", "with_outputs"]
