"""Detector post-processing in numpy, identical for every backend (torch, onnxruntime, TensorRT outputs).

It follows the steps of super-gradients' YOLO-NAS ``predict`` (``PPYoloEPostPredictionCallback`` with
``multi_label_per_box=True``, ``class_agnostic=False``): keep every (anchor, class) pair whose score is above
``conf``, keep the ``top_k`` best, run per-class NMS, truncate to ``max_det``.

Doing it in numpy (not torchvision, not the ONNX NonMaxSuppression op) means the FP32 model, the Q/DQ ONNX
graph and a TensorRT engine are all scored by one implementation, so mAP differences come from the
network and not from three NMS implementations with different tie-breaking.
"""

from __future__ import annotations

import numpy as np

from quantkit.errors import UsageError

# Score threshold for mAP evaluation. COCO AP integrates precision over the whole recall range, so low-score
# detections still count; the usual practice (and super-gradients' COCO evaluation) keeps them down to 1e-3.
# Deployment thresholds (0.25 for COCO-pretrained YOLO-NAS, 0.5 model default) are for display, not mAP.
EVAL_CONF = 0.001
DEFAULT_IOU = 0.7  # YOLO-NAS NMS IoU threshold (model default and COCO-pretrained setting).
DEFAULT_TOP_K = 1024  # super-gradients' nms_top_k
DEFAULT_MAX_DET = 300  # super-gradients' max_predictions

DET_COLUMNS = ("x1", "y1", "x2", "y2", "score", "class")


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix [N,M] between x1y1x2y2 boxes a [N,4] and b [M,4] in float64; 0 where the union is empty."""
    ax1, ay1, ax2, ay2 = (c[:, None] for c in np.asarray(a, dtype=np.float64).T.copy())
    bx1, by1, bx2, by2 = np.asarray(b, dtype=np.float64).T.copy()
    inter = np.maximum(np.minimum(ax2, bx2) - np.maximum(ax1, bx1), 0.0)
    inter *= np.maximum(np.minimum(ay2, by2) - np.maximum(ay1, by1), 0.0)
    area_a = np.maximum(ax2 - ax1, 0.0) * np.maximum(ay2 - ay1, 0.0)
    area_b = np.maximum(bx2 - bx1, 0.0) * np.maximum(by2 - by1, 0.0)
    union = area_a + area_b - inter
    out = np.zeros_like(inter)
    np.divide(inter, union, out=out, where=union > 0)
    return out


def nms(
    boxes: np.ndarray,
    scores: np.ndarray,
    iou: float,
    max_keep: int | None = None,
    classes: np.ndarray | None = None,
) -> np.ndarray:
    """Greedy NMS. Returns kept indices, best score first (at most ``max_keep``).

    A box is suppressed when its IoU with a kept, higher-ranked box *of the same class* (all boxes are one
    class when ``classes`` is None) is strictly greater than ``iou`` (torchvision's rule). Ties in score keep
    the lower index first, so the result is deterministic. Stopping at ``max_keep`` gives the same rows as
    running to the end and truncating, and costs O(max_keep * N) instead of an [N,N] IoU matrix.
    """
    x1, y1, x2, y2 = np.asarray(boxes, dtype=np.float64).reshape(-1, 4).T.copy()
    area = np.maximum(x2 - x1, 0.0) * np.maximum(y2 - y1, 0.0)
    cls = None if classes is None else np.asarray(classes)
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    limit = order.size if max_keep is None else min(max_keep, order.size)
    keep: list[int] = []
    while order.size and len(keep) < limit:
        i = int(order[0])
        keep.append(i)
        rest = order[1:]
        # Same arithmetic as box_iou, so both give bit-identical IoUs.
        inter = np.maximum(np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]), 0.0)
        inter *= np.maximum(np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]), 0.0)
        union = area[i] + area[rest] - inter
        ious = np.zeros_like(inter)
        np.divide(inter, union, out=ious, where=union > 0)
        survive = ious <= iou
        if cls is not None:
            survive |= cls[rest] != cls[i]
        order = rest[survive]
    return np.asarray(keep, dtype=np.int64)


def batched_nms(
    boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, iou: float, max_keep: int | None = None
) -> np.ndarray:
    """Per-class NMS: boxes of different classes never suppress each other. Returns kept indices, best first.

    Classes are compared directly rather than separated by torchvision's coordinate-offset trick, whose
    offset (``class * (max + 1)``) fails to separate classes when unclipped boxes have negative
    coordinates and perturbs IoUs by rounding.
    """
    return nms(boxes, scores, iou, max_keep, classes=classes)


def _top_k_indices(s: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` largest values, best first; ties keep the lower index (deterministic)."""
    if s.size > k:
        kth = np.partition(s, s.size - k)[s.size - k]
        above = np.flatnonzero(s > kth)
        equal = np.flatnonzero(s == kth)[: k - above.size]
        idx = np.concatenate([above, equal])
    else:
        idx = np.arange(s.size)
    return idx[np.argsort(-s[idx], kind="stable")]


def postprocess_one(
    boxes: np.ndarray,
    scores: np.ndarray,
    *,
    conf: float = EVAL_CONF,
    iou: float = DEFAULT_IOU,
    top_k: int = DEFAULT_TOP_K,
    max_det: int = DEFAULT_MAX_DET,
) -> np.ndarray:
    """One image: boxes [A,4] x1y1x2y2, scores [A,C] in [0,1] -> detections [N,6] (x1,y1,x2,y2,score,class).

    Multi-label: an anchor may yield one detection per class whose score is > ``conf``.
    Rows are sorted by score, best first; coordinates stay in the units of ``boxes`` (model-input pixels).
    """
    flat = scores.reshape(-1)
    idx = np.flatnonzero(flat > conf)  # (anchor, class) pairs, anchor-major
    s = flat[idx]
    sel = _top_k_indices(s, top_k)
    anchor, cls = np.divmod(idx[sel], scores.shape[1])
    s = s[sel]
    b = boxes[anchor]
    keep = batched_nms(b, s, cls, iou, max_det)
    out = np.empty((keep.size, 6), dtype=np.float32)
    out[:, :4] = b[keep]
    out[:, 4] = s[keep]
    out[:, 5] = cls[keep]
    return out


def postprocess(
    boxes: np.ndarray,
    scores: np.ndarray,
    *,
    conf: float = EVAL_CONF,
    iou: float = DEFAULT_IOU,
    top_k: int = DEFAULT_TOP_K,
    max_det: int = DEFAULT_MAX_DET,
) -> list[np.ndarray]:
    """Batch post-processing: boxes [B,A,4] (x1y1x2y2, model-input pixels), scores [B,A,C] in [0,1].

    Returns one float32 array [N,6] per image with rows (x1, y1, x2, y2, score, class), best score first.
    ``conf``: keep (anchor, class) pairs with score > conf (use ``EVAL_CONF`` = 0.001 for mAP);
    ``iou``: per-class NMS IoU threshold; ``top_k``: candidates kept before NMS; ``max_det``: detections kept after.
    """
    boxes = np.asarray(boxes)
    scores = np.asarray(scores)
    if boxes.ndim != 3 or boxes.shape[-1] != 4:
        raise UsageError(f"boxes must have shape [B,A,4] (x1y1x2y2), got {boxes.shape}: check the model's outputs order")
    if scores.ndim != 3 or scores.shape[:2] != boxes.shape[:2]:
        raise UsageError(
            f"scores must have shape [B,A,C] matching boxes {boxes.shape[:2]}, got {scores.shape}: "
            "the model must return (boxes, scores)"
        )
    if not 0.0 <= iou <= 1.0:
        raise UsageError(f"iou threshold {iou} is outside [0, 1]: pass e.g. 0.7")
    if top_k < 1 or max_det < 1:
        raise UsageError(f"top_k ({top_k}) and max_det ({max_det}) must be >= 1")
    return [
        postprocess_one(boxes[i], scores[i], conf=conf, iou=iou, top_k=top_k, max_det=max_det)
        for i in range(boxes.shape[0])
    ]
