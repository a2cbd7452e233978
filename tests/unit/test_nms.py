"""NMS post-processing: the ONNX flavour against a numpy NMS oracle in onnxruntime; the plugin's structure."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from qdq_graphs import GraphBuilder

from quantkit.errors import UsageError
from quantkit.exporter.nms import OUTPUT_NAMES, NmsFlavor, append_nms


def detector_outputs(a=40, c=3):
    g = GraphBuilder()
    b = g.input("raw_boxes", ["B", a, 4])
    s = g.input("raw_scores", ["B", a, c])
    g.output("boxes", b, ["B", a, 4])
    g.output("scores", s, ["B", a, c])
    return g.model()


def iou(box, others):
    x1 = np.maximum(box[0], others[:, 0])
    y1 = np.maximum(box[1], others[:, 1])
    x2 = np.minimum(box[2], others[:, 2])
    y2 = np.minimum(box[3], others[:, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = lambda b: (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])  # noqa: E731
    return inter / (area(box) + area(others) - inter)


def numpy_nms(boxes, scores, score_thr, iou_thr, top_k, k):
    """Greedy per-class NMS, then the K best survivors per image (independent oracle)."""
    results = []
    for bi in range(boxes.shape[0]):
        dets = []
        for ci in range(scores.shape[2]):
            s = scores[bi, :, ci]
            order = [i for i in np.argsort(-s, kind="stable") if s[i] > score_thr]
            kept = []
            while order and len(kept) < top_k:
                i = order.pop(0)
                kept.append(i)
                order = [j for j in order if iou(boxes[bi, i], boxes[bi, [j]])[0] <= iou_thr]
            dets += [(s[i], ci, i) for i in kept]
        dets.sort(key=lambda d: -d[0])
        results.append(dets[:k])
    return results


def make_inputs(seed, b=2, a=40, c=3, scale=1.0):
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 60, (b, a, 2))
    wh = rng.uniform(4, 30, (b, a, 2))
    boxes = np.concatenate([xy, xy + wh], -1).astype(np.float32)
    scores = (rng.uniform(0, 1, (b, a, c)) * scale).astype(np.float32)
    return boxes, scores


@pytest.mark.parametrize("seed,top_k,k", [(0, 100, 10), (1, 3, 10), (2, 100, 50), (3, 5, 4)])
def test_onnx_nms_matches_numpy_oracle(seed, top_k, k):
    model = append_nms(detector_outputs(), score_threshold=0.25, iou_threshold=0.45, top_k=top_k,
                       max_detections=k, flavor="onnx")
    assert [o.name for o in model.graph.output] == list(OUTPUT_NAMES)
    boxes, scores = make_inputs(seed)
    num, out_boxes, out_scores, out_cls = ort.InferenceSession(model.SerializeToString()).run(
        None, {"raw_boxes": boxes, "raw_scores": scores})
    assert num.dtype == np.int32 and out_cls.dtype == np.int32
    assert num.shape == (2, 1) and out_boxes.shape == (2, k, 4) and out_scores.shape == (2, k)
    for bi, dets in enumerate(numpy_nms(boxes, scores, 0.25, 0.45, top_k, k)):
        n = len(dets)
        assert num[bi, 0] == n
        np.testing.assert_allclose(out_scores[bi, :n], [d[0] for d in dets], rtol=0, atol=0)
        np.testing.assert_array_equal(out_cls[bi, :n], [d[1] for d in dets])
        np.testing.assert_array_equal(out_boxes[bi, :n], boxes[bi, [d[2] for d in dets]])
        # padding past num_detections
        assert np.all(out_scores[bi, n:] == 0) and np.all(out_boxes[bi, n:] == 0) and np.all(out_cls[bi, n:] == -1)


def test_onnx_nms_no_detection_gives_zero_count():
    model = append_nms(detector_outputs(), score_threshold=0.5, iou_threshold=0.5, top_k=10, max_detections=6)
    boxes, scores = make_inputs(4, scale=0.4)
    num, out_boxes, out_scores, out_cls = ort.InferenceSession(model.SerializeToString()).run(
        None, {"raw_boxes": boxes, "raw_scores": scores})
    assert num.tolist() == [[0], [0]] and out_boxes.shape == (2, 6, 4)
    assert np.all(out_cls == -1) and np.all(out_scores == 0)


def test_efficient_nms_plugin_node_structure():
    model = append_nms(detector_outputs(), score_threshold=0.3, iou_threshold=0.6, top_k=200, max_detections=100,
                       flavor=NmsFlavor.EFFICIENT_NMS_TRT)
    (node,) = [n for n in model.graph.node if n.op_type == "EfficientNMS_TRT"]
    assert node.domain == "" and list(node.input) == ["boxes", "scores"]
    assert list(node.output) == list(OUTPUT_NAMES)
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["background_class"] == -1 and attrs["score_activation"] == 0 and attrs["box_coding"] == 0
    assert attrs["max_output_boxes"] == 100 and attrs["plugin_version"] == b"1"
    assert attrs["score_threshold"] == pytest.approx(0.3) and attrs["iou_threshold"] == pytest.approx(0.6)
    types = {o.name: (o.type.tensor_type.elem_type, [d.dim_value or d.dim_param for d in o.type.tensor_type.shape.dim])
             for o in model.graph.output}
    assert types["num_detections"] == (onnx.TensorProto.INT32, ["B", 1])
    assert types["detection_boxes"] == (onnx.TensorProto.FLOAT, ["B", 100, 4])
    assert types["detection_classes"] == (onnx.TensorProto.INT32, ["B", 100])


@pytest.mark.parametrize("kwargs", [dict(score_threshold=1.5), dict(iou_threshold=-0.1), dict(top_k=0),
                                    dict(max_detections=0), dict(boxes="nope"), dict(flavor="fast")])
def test_bad_arguments_are_refused(kwargs):
    args = dict(score_threshold=0.3, iou_threshold=0.5, top_k=10, max_detections=10) | kwargs
    with pytest.raises(UsageError):
        append_nms(detector_outputs(), **args)


def test_nms_after_fp16_graph_outputs():
    """A strongly typed graph with FP16 outputs gets Casts in front of NonMaxSuppression."""
    from quantkit.exporter.strong import to_strongly_typed

    fp16 = to_strongly_typed(detector_outputs(), keep_io_types=False)
    model = append_nms(fp16, score_threshold=0.25, iou_threshold=0.45, top_k=100, max_detections=10)
    boxes, scores = make_inputs(5)
    num, out_boxes, out_scores, out_cls = ort.InferenceSession(model.SerializeToString()).run(
        None, {"raw_boxes": boxes.astype(np.float16), "raw_scores": scores.astype(np.float16)})
    b16, s16 = boxes.astype(np.float16).astype(np.float32), scores.astype(np.float16).astype(np.float32)
    for bi, dets in enumerate(numpy_nms(b16, s16, 0.25, 0.45, 100, 10)):
        assert num[bi, 0] == len(dets)
        np.testing.assert_array_equal(out_cls[bi, :len(dets)], [d[1] for d in dets])
