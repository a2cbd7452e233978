"""COCO mAP of a detector on a CocoDataset, for any backend that maps an NCHW batch to (boxes, scores).

The chain is the same for torch, onnxruntime and TensorRT: letterbox (``quantkit.data.preprocess``) ->
``predict`` -> numpy NMS (``quantkit.eval.nms``) -> boxes back to original pixels, clipped -> COCO results ->
faster-coco-eval (same numbers as pycocotools).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from quantkit.data.dtypes import ort_dtype
from quantkit.data.preprocess import LetterboxInfo, Preprocess, preprocess_image
from quantkit.errors import DataError, ModelError, UsageError, require
from quantkit.data.coco import CocoDataset
from quantkit.eval.nms import DEFAULT_IOU, DEFAULT_MAX_DET, DEFAULT_TOP_K, EVAL_CONF, postprocess

Predictor = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
CategoryMap = Sequence[int] | Mapping[int, int]

_SCORE_SLACK = 1e-3  # fp16 outputs may overshoot [0, 1] by rounding


@dataclass(frozen=True)
class DetectionMetrics:
    """COCO box AP (fractions in [0, 1], not percent) over ``num_images`` with ``num_detections`` results."""

    map50_95: float
    map50: float
    map75: float
    num_images: int
    num_detections: int

    def as_dict(self) -> dict:
        """JSON-ready dict; AP values rounded to 6 decimals so reports are byte-stable across runs."""
        d = asdict(self)
        for k in ("map50_95", "map50", "map75"):
            d[k] = round(float(d[k]), 6)
        return d


# ---- predictors ----------------------------------------------------------------------------------------


def _unpack_outputs(out) -> tuple:
    # super-gradients-style heads return ((boxes, scores), raw_head_outputs); take the decoded pair.
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], (tuple, list)):
        out = out[0]
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        raise ModelError(
            "a detector must return (boxes [B,A,4], scores [B,A,C]); got "
            f"{type(out).__name__} of length {len(out) if hasattr(out, '__len__') else '?'}"
        )
    return out


def torch_predictor(model, device=None) -> Predictor:
    """Wrap a torch detector: sets ``model.eval()``, runs under ``no_grad`` on ``device`` (default: the model's).

    The returned function maps a float32 NCHW numpy batch to float32 numpy (boxes, scores).
    """
    import torch

    model.eval()
    param = next(iter(model.parameters()), None)
    dev = torch.device(device) if device is not None else (param.device if param is not None else torch.device("cpu"))
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32

    def predict(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with torch.no_grad():
            out = model(torch.from_numpy(np.ascontiguousarray(x)).to(device=dev, dtype=dtype))
        boxes, scores = _unpack_outputs(out)
        return boxes.float().cpu().numpy(), scores.float().cpu().numpy()

    return predict


def onnx_predictor(
    model: str | Path | bytes,
    providers: Sequence[str] = ("CPUExecutionProvider",),
    intra_op_threads: int | None = None,
) -> Predictor:
    """Wrap an ONNX detector (path, serialized bytes or ModelProto) in an onnxruntime session.

    The graph must have one image input and exactly two outputs (boxes, scores), no NMS inside.
    A graph with a fixed batch dimension (e.g. 1, as TensorRT exports often are) is fed in chunks of that
    size, the last chunk zero-padded and the padding dropped. A float16 input is fed float16.
    """
    import onnxruntime as ort

    if hasattr(model, "SerializeToString"):
        model = model.SerializeToString()
    elif isinstance(model, (str, Path)):
        if not Path(model).is_file():
            raise ModelError(f"ONNX file {model} not found: pass the path of an exported model")
        model = str(model)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if intra_op_threads is not None:
        opts.intra_op_num_threads = int(intra_op_threads)
    try:
        sess = ort.InferenceSession(model, sess_options=opts, providers=list(providers))
    except Exception as exc:  # onnxruntime raises its own exception types
        raise ModelError(f"onnxruntime cannot load the model ({exc}): re-export it or check the providers") from exc
    inputs, outputs = sess.get_inputs(), sess.get_outputs()
    if len(inputs) != 1:
        raise ModelError(f"the ONNX detector must have one image input, it has {[i.name for i in inputs]}")
    if len(outputs) != 2:
        raise ModelError(
            f"the ONNX detector must output exactly (boxes, scores) without NMS, it has {[o.name for o in outputs]}"
        )
    inp = inputs[0]
    shape = list(inp.shape)
    fixed_batch = shape[0] if shape and isinstance(shape[0], int) and shape[0] > 0 else None
    in_dtype = ort_dtype(inp.type)  # a uint8-image detector takes the pixels as uint8 (preprocess.scale: 1)
    out_names = [o.name for o in outputs]

    def predict(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        for axis, (want, got) in enumerate(zip(shape[1:], x.shape[1:]), start=1):
            if isinstance(want, int) and want != got:
                raise ModelError(
                    f"the ONNX input {inp.name} expects {shape} but got {list(x.shape)} (axis {axis}): "
                    "set the preprocessing size to the export size"
                )
        x = np.ascontiguousarray(x, dtype=in_dtype)
        if fixed_batch is None:
            boxes, scores = sess.run(out_names, {inp.name: x})
        else:
            parts_b, parts_s = [], []
            for i in range(0, x.shape[0], fixed_batch):
                chunk = x[i : i + fixed_batch]
                n = chunk.shape[0]
                if n < fixed_batch:
                    chunk = np.concatenate([chunk, np.zeros((fixed_batch - n, *chunk.shape[1:]), chunk.dtype)])
                b, s = sess.run(out_names, {inp.name: chunk})
                parts_b.append(b[:n])
                parts_s.append(s[:n])
            boxes, scores = np.concatenate(parts_b), np.concatenate(parts_s)
        return boxes.astype(np.float32), scores.astype(np.float32)

    return predict


# ---- evaluation ----------------------------------------------------------------------------------------


def _to_original(boxes: np.ndarray, info: LetterboxInfo, pp: Preprocess, h: int, w: int) -> np.ndarray:
    """Model-input pixels -> original pixels, clipped to the image."""
    if pp.letterbox:
        out = info.to_original(boxes)
    else:
        # A plain resize scales x and y independently, so map each axis with its own factor.
        th, tw = pp.size
        out = np.asarray(boxes, dtype=np.float64).copy()
        out[:, [0, 2]] *= w / tw
        out[:, [1, 3]] *= h / th
    out[:, [0, 2]] = np.clip(out[:, [0, 2]], 0.0, w)
    out[:, [1, 3]] = np.clip(out[:, [1, 3]], 0.0, h)
    return out


def _check_outputs(boxes: np.ndarray, scores: np.ndarray, batch: int) -> None:
    if boxes.ndim != 3 or boxes.shape[0] != batch or boxes.shape[2] != 4:
        raise ModelError(f"predict returned boxes of shape {boxes.shape}; expected [{batch}, A, 4] (x1y1x2y2)")
    if scores.ndim != 3 or scores.shape[:2] != boxes.shape[:2]:
        raise ModelError(f"predict returned scores of shape {scores.shape}; expected [{batch}, {boxes.shape[1]}, C]")
    if scores.size and (scores.min() < -_SCORE_SLACK or scores.max() > 1 + _SCORE_SLACK):
        raise ModelError(
            f"scores span [{scores.min():.3g}, {scores.max():.3g}]: they must be probabilities in [0, 1] "
            "(apply sigmoid to class logits in the model's forward)"
        )


def predict_dataset(
    predict: Predictor,
    dataset: CocoDataset,
    pp: Preprocess,
    *,
    batch_size: int = 8,
    conf: float = EVAL_CONF,
    iou: float = DEFAULT_IOU,
    top_k: int = DEFAULT_TOP_K,
    max_det: int = DEFAULT_MAX_DET,
    progress: bool = True,
    label: str | None = None,
) -> dict[int, np.ndarray]:
    """Run ``predict`` over the data set. Returns image id -> float64 [N,6] rows (x1,y1,x2,y2,score,class)
    in original-image pixels, clipped to the image, best score first. ``label`` names the model in the progress
    line (``evaluating INT8 ONNX 8/16 img``), so several evaluations in a row can be told apart."""
    from quantkit.utils.progress import progress_bar

    if batch_size < 1:
        raise UsageError(f"batch_size must be >= 1, got {batch_size}")
    results: dict[int, np.ndarray] = {}
    pending: list[tuple[int, np.ndarray, LetterboxInfo, int, int]] = []

    def flush() -> None:
        x = np.stack([p[1] for p in pending])
        boxes, scores = (np.asarray(o) for o in predict(x))
        _check_outputs(boxes, scores, len(pending))
        dets = postprocess(boxes, scores, conf=conf, iou=iou, top_k=top_k, max_det=max_det)
        for (image_id, _, info, h, w), d in zip(pending, dets):
            out = d.astype(np.float64)
            out[:, :4] = _to_original(d[:, :4], info, pp, h, w)
            results[image_id] = out
        pending.clear()

    bar = progress_bar(len(dataset), f"evaluating {label}" if label else "evaluating", "img", enabled=progress)
    try:
        for image_id, img, _ in dataset:
            x, info = preprocess_image(img, pp)
            pending.append((image_id, x, info, img.shape[0], img.shape[1]))
            if len(pending) == batch_size:
                flush()
                bar.update(batch_size)
        if pending:
            n = len(pending)
            flush()
            bar.update(n)
    finally:
        bar.close()
    return results


def _class_lookup(category_map: CategoryMap | None, dataset: CocoDataset, num_classes: int) -> np.ndarray:
    """Array [num_classes] of category ids (-1: class not mapped, its detections are dropped)."""
    known = set(dataset.category_ids)
    if category_map is None:
        ids = dataset.category_ids
        if num_classes > len(ids):
            raise UsageError(
                f"the model predicts {num_classes} classes but the evaluation data has {len(ids)} categories: "
                "evaluate on data labelled with the model's classes (a dataset YAML naming all of them, or a COCO "
                f"file with {num_classes} categories), or export a model trained for those {len(ids)} classes "
                f"(--num-classes {len(ids)} with its weights); from Python, pass category_map (class index -> "
                "category id) to say which classes to score"
            )
        return np.asarray(ids[:num_classes], dtype=np.int64)
    items = category_map.items() if isinstance(category_map, Mapping) else enumerate(category_map)
    lut = np.full(num_classes, -1, dtype=np.int64)
    for cls, cat in items:
        if cat not in known:
            raise UsageError(f"category_map sends class {cls} to category {cat}, which the data set does not have")
        if 0 <= int(cls) < num_classes:
            lut[int(cls)] = int(cat)
    return lut


def coco_map(
    dataset: CocoDataset,
    detections: Mapping[int, np.ndarray],
    *,
    category_map: CategoryMap | None = None,
    num_classes: int | None = None,
) -> DetectionMetrics:
    """COCO box mAP of ``detections`` (image id -> [N,6] original-pixel rows as from ``predict_dataset``).

    Class index c maps to ``category_map[c]``, by default to the c-th smallest category id of the data set
    (then a model with more classes (``num_classes``, default: the largest class seen + 1) than the data set
    has categories is refused). Detections of unmapped classes are dropped. COCO keeps the 100 best
    detections per image; images without detections count as misses.
    """
    fce = require("faster_coco_eval", "eval")
    if not dataset.anns:
        raise DataError(f"{dataset.annotations_path} has no boxes on the evaluated images: mAP is undefined")
    unknown = set(detections) - set(dataset.image_ids)
    if unknown:
        raise UsageError(f"detections for image ids {sorted(unknown)[:5]} that are not in the data set")
    seen = 1 + max((int(d[:, 5].max()) for d in detections.values() if len(d)), default=-1)
    num_classes = max(seen, num_classes or 0)
    lut = _class_lookup(category_map, dataset, num_classes)
    results = []
    for image_id in sorted(detections):
        d = np.asarray(detections[image_id], dtype=np.float64)
        for x1, y1, x2, y2, score, cls in d:
            cat = int(lut[int(cls)])
            if cat < 0:
                continue
            results.append(
                {
                    "image_id": int(image_id),
                    "category_id": cat,
                    "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)],
                    "score": float(score),
                }
            )
    gt = fce.COCO(dataset.coco_dict())
    dt = gt.loadRes(results)
    ev = fce.COCOeval_faster(gt, dt, iouType="bbox")
    ev.params.imgIds = dataset.image_ids
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    stats = [max(float(v), 0.0) for v in ev.stats[:3]]  # -1 means "no ground truth"; excluded above
    return DetectionMetrics(
        map50_95=stats[0], map50=stats[1], map75=stats[2], num_images=len(dataset), num_detections=len(results)
    )


def evaluate_detection(
    predict: Predictor,
    dataset: CocoDataset,
    pp: Preprocess,
    *,
    batch_size: int = 8,
    conf: float = EVAL_CONF,
    iou: float = DEFAULT_IOU,
    top_k: int = DEFAULT_TOP_K,
    max_det: int = DEFAULT_MAX_DET,
    category_map: CategoryMap | None = None,
    progress: bool = True,
    label: str | None = None,
) -> DetectionMetrics:
    """COCO box mAP of a detector on ``dataset``.

    ``predict`` maps a float32 NCHW batch (preprocessed with ``pp``) to (boxes [B,A,4] x1y1x2y2 in
    model-input pixels, scores [B,A,C] in [0,1]); see ``torch_predictor`` / ``onnx_predictor``.
    ``conf`` defaults to 0.001 (mAP needs the low-score tail), ``iou`` 0.7, ``top_k`` 1024, ``max_det`` 300,
    as super-gradients evaluates YOLO-NAS. ``progress``: a bar on a terminal, lines in a log, labelled with
    ``label`` (the model evaluated, e.g. ``"FP32 torch"``).
    """
    num_classes = 0

    def counting_predict(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        nonlocal num_classes
        boxes, scores = predict(x)
        num_classes = max(num_classes, int(np.shape(scores)[-1]))
        return boxes, scores

    dets = predict_dataset(
        counting_predict, dataset, pp, batch_size=batch_size, conf=conf, iou=iou, top_k=top_k, max_det=max_det,
        progress=progress, label=label,
    )
    return coco_map(dataset, dets, category_map=category_map, num_classes=num_classes)
