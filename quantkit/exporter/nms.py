"""Append detection post-processing (NMS) to a graph with outputs boxes [B,A,4] and scores [B,A,C].

Two flavours, same four outputs (the layout of TensorRT's EfficientNMS plugin, which deployment code expects):

    num_detections [B,1] int32, detection_boxes [B,K,4] float, detection_scores [B,K] float,
    detection_classes [B,K] int32       (K = max_detections, padded with 0 / class -1 past num_detections)

* ``NmsFlavor.ONNX``: standard ``NonMaxSuppression`` (per class) + a per-image top-K over the survivors, in
  plain ONNX ops. TensorRT >= 10 maps NonMaxSuppression to its INMSLayer; onnxruntime runs it too.
* ``NmsFlavor.EFFICIENT_NMS_TRT``: one ``EfficientNMS_TRT`` plugin node (default domain, as the TensorRT ONNX
  parser looks plugins up by op name). For TensorRT < 10.12, where the plugin is not deprecated yet;
  onnxruntime cannot run it and ``onnx.checker`` does not know it.

Boxes are corners (x1, y1, x2, y2) in pixels; scores are already activated (Sigmoid), so no score activation.
"""

from __future__ import annotations

import copy

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from quantkit.errors import ExportError, UsageError
from quantkit.recipe import NmsFlavor

OUTPUT_NAMES = ("num_detections", "detection_boxes", "detection_scores", "detection_classes")
PREFIX = "nms/"


def append_nms(model: onnx.ModelProto, *, score_threshold: float, iou_threshold: float, top_k: int,
               max_detections: int, flavor: NmsFlavor | str = NmsFlavor.ONNX, boxes: str = "boxes",
               scores: str = "scores") -> onnx.ModelProto:
    """Return a copy of ``model`` whose outputs are the four NMS outputs (see module docstring).

    ``top_k``: candidates kept per class before suppression (EfficientNMS: per image);
    ``max_detections``: K, detections per image after NMS. Thresholds are in [0, 1].
    """
    try:
        flavor = NmsFlavor(flavor)
    except ValueError:
        raise UsageError(f"unknown NMS flavor {flavor!r}; use one of {[f.value for f in NmsFlavor]}") from None
    if not 0.0 <= score_threshold <= 1.0 or not 0.0 <= iou_threshold <= 1.0:
        raise UsageError(f"NMS thresholds must be in [0, 1], got score {score_threshold}, iou {iou_threshold}")
    if top_k < 1 or max_detections < 1:
        raise UsageError(f"NMS top_k and max_detections must be >= 1, got {top_k}, {max_detections}")
    model = copy.deepcopy(model)
    graph = model.graph
    names = {o.name: o for o in graph.output}
    for name in (boxes, scores):
        if name not in names:
            raise UsageError(f"graph has no output '{name}' (outputs: {sorted(names)}); pass boxes=/scores=")
    batch = _dim(names[boxes], 0)
    for name in (boxes, scores):  # an FP16 graph (keep_io_types=False): NMS takes float32 only
        if names[name].type.tensor_type.elem_type == TensorProto.FLOAT16:
            graph.node.append(helper.make_node("Cast", [name], [name + "_fp32"], name=PREFIX + name + "_fp32",
                                               to=TensorProto.FLOAT))
    boxes, scores = (n + "_fp32" if names[n].type.tensor_type.elem_type == TensorProto.FLOAT16 else n
                     for n in (boxes, scores))
    if flavor == NmsFlavor.ONNX:
        nodes, inits = _onnx_nms(boxes, scores, score_threshold, iou_threshold, top_k, max_detections)
    else:
        nodes, inits = _efficient_nms(boxes, scores, score_threshold, iou_threshold, top_k, max_detections)
    graph.node.extend(nodes)
    graph.initializer.extend(inits)
    del graph.output[:]
    k = max_detections
    graph.output.extend([
        helper.make_tensor_value_info(OUTPUT_NAMES[0], TensorProto.INT32, [batch, 1]),
        helper.make_tensor_value_info(OUTPUT_NAMES[1], TensorProto.FLOAT, [batch, k, 4]),
        helper.make_tensor_value_info(OUTPUT_NAMES[2], TensorProto.FLOAT, [batch, k]),
        helper.make_tensor_value_info(OUTPUT_NAMES[3], TensorProto.INT32, [batch, k]),
    ])
    if flavor == NmsFlavor.ONNX:
        try:
            onnx.checker.check_model(model, full_check=True)
        except onnx.checker.ValidationError as exc:
            raise ExportError(f"appending NMS produced an invalid graph: {exc}") from exc
    return model


def _dim(vi: onnx.ValueInfoProto, k: int):
    dims = vi.type.tensor_type.shape.dim
    if len(dims) <= k:
        return "batch"
    return dims[k].dim_value if dims[k].HasField("dim_value") else (dims[k].dim_param or "batch")


def _efficient_nms(boxes, scores, score_thr, iou_thr, top_k, k):
    node = helper.make_node(
        "EfficientNMS_TRT", [boxes, scores], list(OUTPUT_NAMES), name=PREFIX + "EfficientNMS_TRT", domain="",
        plugin_version="1", background_class=-1, max_output_boxes=int(k), score_threshold=float(score_thr),
        iou_threshold=float(iou_thr), score_activation=0, class_agnostic=0, box_coding=0,
    )
    return [node], []


class _Nodes:
    """Tiny node factory with prefixed, unique, deterministic names."""

    def __init__(self):
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def const(self, name: str, value) -> str:
        full = PREFIX + name
        self.inits.append(numpy_helper.from_array(np.asarray(value), full))
        return full

    def op(self, op_type: str, inputs: list[str], name: str, outputs: list[str] | None = None, **attrs):
        outs = outputs or [PREFIX + name]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=PREFIX + name, **attrs))
        return outs[0] if len(outs) == 1 else outs


def _onnx_nms(boxes, scores, score_thr, iou_thr, top_k, k):
    n = _Nodes()
    i64 = np.int64
    # NonMaxSuppression wants scores [B, C, A]; selected rows are (batch, class, box), grouped by batch.
    scores_bca = n.op("Transpose", [scores], "scores_bca", perm=[0, 2, 1])
    sel = n.op("NonMaxSuppression", [boxes, scores_bca, n.const("top_k", np.array([top_k], i64)),
                                     n.const("iou_threshold", np.array([iou_thr], np.float32)),
                                     n.const("score_threshold", np.array([score_thr], np.float32))],
               "selected", center_point_box=0)
    col = {c: n.op("Gather", [sel, n.const(f"col{c}", np.array(c, i64))], f"sel_col{c}", axis=1) for c in range(3)}
    sel_score = n.op("GatherND", [scores_bca, sel], "sel_score")  # [N]
    sel_boxes = n.op("GatherND", [boxes, n.op("Gather", [sel, n.const("cols02", np.array([0, 2], i64))],
                                               "sel_b_a", axis=1)], "sel_boxes")  # [N, 4]
    # Dense [B, N] score table: survivors of image b keep their score, others get -1 (scores are >= 0).
    shape_b = n.op("Shape", [boxes], "boxes_shape")
    b = n.op("Gather", [shape_b, n.const("zero", np.array([0], i64))], "batch")  # [1]
    b_range = n.op("Range", [n.const("zero_s", np.array(0, i64)),
                             n.op("Squeeze", [b, n.const("axis0", np.array([0], i64))], "batch_s"),
                             n.const("one_s", np.array(1, i64))], "batch_range")
    mine = n.op("Equal", [n.op("Unsqueeze", [b_range, n.const("axis1", np.array([1], i64))], "batch_col"),
                          n.op("Unsqueeze", [col[0], n.const("axis0b", np.array([0], i64))], "sel_row")], "mine")
    table = n.op("Where", [mine, n.op("Unsqueeze", [sel_score, n.const("axis0c", np.array([0], i64))], "score_row"),
                           n.const("minus_one", np.array(-1.0, np.float32))], "table")  # [B, N]
    n_sel = n.op("Shape", [sel_score], "n_selected")  # [1]
    kk = n.op("Min", [n_sel, n.const("k", np.array([k], i64))], "k_eff")
    top_scores, top_idx = n.op("TopK", [table, kk], "topk", outputs=[PREFIX + "top_scores", PREFIX + "top_idx"],
                               axis=1, largest=1, sorted=1)
    valid = n.op("GatherElements", [mine, top_idx], "valid", axis=1)  # [B, k_eff] bool
    num = n.op("ReduceSum", [n.op("Cast", [valid], "valid_i32", to=TensorProto.INT32),
                             n.const("axes1", np.array([1], i64))], "num", keepdims=1)
    out_boxes = n.op("Gather", [sel_boxes, top_idx], "top_boxes", axis=0)  # [B, k_eff, 4]
    out_cls = n.op("Gather", [col[1], top_idx], "top_cls", axis=0)  # [B, k_eff]
    valid3 = n.op("Unsqueeze", [valid, n.const("axis2", np.array([2], i64))], "valid3")
    zero_f = n.const("zero_f", np.array(0.0, np.float32))
    out_boxes = n.op("Where", [valid3, out_boxes, zero_f], "boxes_masked")
    out_scores = n.op("Where", [valid, top_scores, zero_f], "scores_masked")
    out_cls = n.op("Where", [valid, n.op("Cast", [out_cls], "cls_i32", to=TensorProto.INT32),
                             n.const("minus_one_i", np.array(-1, np.int32))], "cls_masked")
    # Pad the k_eff columns up to K.
    pad_n = n.op("Sub", [n.const("k2", np.array([k], i64)), kk], "pad_n")
    z1 = n.const("zeros1", np.array([0], i64))
    pads2 = n.op("Concat", [z1, z1, z1, pad_n], "pads2", axis=0)
    pads3 = n.op("Concat", [z1, z1, z1, z1, pad_n, z1], "pads3", axis=0)
    n.op("Identity", [num], "out_num", outputs=[OUTPUT_NAMES[0]])
    n.op("Pad", [out_boxes, pads3, zero_f], "pad_boxes", outputs=[OUTPUT_NAMES[1]])
    n.op("Pad", [out_scores, pads2, zero_f], "pad_scores", outputs=[OUTPUT_NAMES[2]])
    n.op("Pad", [out_cls, pads2, n.const("minus_one_pad", np.array(-1, np.int32))], "pad_cls",
         outputs=[OUTPUT_NAMES[3]])
    return n.nodes, n.inits


def write_nms_files(stage, spec, int8: onnx.ModelProto, strong: onnx.ModelProto | None, sample) -> dict:
    """Write ``model.int8.nms.onnx`` (``spec.nms_flavor``) and, when there is a strong graph,
    ``model.int8.strong.nms.onnx`` (ONNX NMS) into ``stage``; each graph that onnxruntime can run is run once on
    ``sample`` (a float32 batch, numpy; None: not run). Both routes call this. Returns the names written and
    the flavor (``Graphs.nms``)."""
    from quantkit.exporter import parity

    kw = dict(score_threshold=spec.nms_score_threshold, iou_threshold=spec.nms_iou_threshold, top_k=spec.nms_top_k,
              max_detections=spec.nms_max_detections)
    weak = append_nms(int8, flavor=spec.nms_flavor, **kw)
    if spec.nms_flavor is NmsFlavor.ONNX and sample is not None:  # onnxruntime has no EfficientNMS_TRT kernel
        parity.run_session(parity.session(weak), sample)
    stage.write_bytes("model.int8.nms.onnx", weak.SerializeToString())
    out = {"weak": "model.int8.nms.onnx", "strong": None, "flavor": spec.nms_flavor.value}
    if strong is not None:
        strong_nms = append_nms(strong, flavor=NmsFlavor.ONNX, **kw)
        if sample is not None:
            parity.run_session(parity.session(strong_nms), sample)
        stage.write_bytes("model.int8.strong.nms.onnx", strong_nms.SerializeToString())
        out["strong"] = "model.int8.strong.nms.onnx"
    return out


def check_detector_outputs(model: onnx.ModelProto, where: str) -> None:
    """UsageError unless ``model`` has the outputs NMS reads: ``boxes`` [B,A,4] and ``scores`` [B,A,C] (ranks and
    the 4 checked where the graph states them)."""
    outs = {o.name: o for o in model.graph.output}
    names = list(outs)

    def shape(name):
        t = outs[name].type.tensor_type
        return [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim] if t.HasField("shape") else None

    ok = "boxes" in outs and "scores" in outs
    if ok:
        b, c = shape("boxes"), shape("scores")
        ok = (b is None or (len(b) == 3 and b[2] in (4, None))) and (c is None or len(c) == 3)
    if not ok:
        got = ", ".join(f"{n} {shape(n)}" for n in names[:8])
        raise UsageError(f"--nms needs a detector whose graph outputs are boxes [B,A,4] (x1,y1,x2,y2 in pixels) "
                         f"and scores [B,A,C] (activated); {where} has outputs {got}: rename or reshape them in "
                         "the ONNX (or export without --nms and add your own post-processing)")
