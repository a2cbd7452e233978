"""The evaluation stage's entry: mAP of the FP32 torch model, the FP32 ONNX and the INT8 ONNX on labelled data,
with one decode + NMS for all three (used by ``quantkit export --eval`` and ``quantkit eval``)."""

from __future__ import annotations

import logging
import os

from torch import nn

from quantkit import paths
from quantkit.data.preprocess import Preprocess
from quantkit.recipe import EvaluationSpec

log = logging.getLogger("quantkit")

ModelSource = bytes | str | os.PathLike  # serialized ONNX, or a path to one


def evaluate_export(data_path: str | os.PathLike, spec: EvaluationSpec, pp: Preprocess, fp32_model: nn.Module,
                    fp32_onnx: ModelSource, int8_onnx: ModelSource, *, max_images: int | None = None,
                    progress: bool = True, threads: int | None = None) -> dict:
    """Evaluate the three models on the COCO folder ``data_path`` with ``spec``'s NMS thresholds.

    max_images: evaluate the first N images only (None: ``spec.max_images``; 0 = all). threads: onnxruntime
    intra-op threads (1 makes the figures independent of the core count). Returns the report's
    ``evaluation`` section: per model mAP50:95 / mAP50 (fractions) and the INT8 drop in points (x100).
    """
    from quantkit.eval.coco import CocoDataset
    from quantkit.eval.detection import evaluate_detection, onnx_predictor, torch_predictor

    limit = spec.max_images if max_images is None else max_images
    ds = CocoDataset(data_path, max_images=limit or None)
    kw = dict(conf=spec.conf, iou=spec.iou, progress=progress)
    log.info("evaluating on %s", data_path)
    res = {
        "data": paths.display_path(data_path),
        "fp32_torch": evaluate_detection(torch_predictor(fp32_model), ds, pp, **kw).as_dict(),
        "fp32_onnx": evaluate_detection(onnx_predictor(fp32_onnx, intra_op_threads=threads), ds, pp, **kw).as_dict(),
        "int8_onnx": evaluate_detection(onnx_predictor(int8_onnx, intra_op_threads=threads), ds, pp, **kw).as_dict(),
    }
    base = res["fp32_onnx"]["map50_95"]
    res["drop_map50_95_points"] = round(100.0 * (base - res["int8_onnx"]["map50_95"]), 4)
    res["drop_map50_points"] = round(100.0 * (res["fp32_onnx"]["map50"] - res["int8_onnx"]["map50"]), 4)
    return res
