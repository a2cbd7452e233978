"""The evaluation stage's entry: mAP of the FP32 torch model, the FP32 ONNX and the INT8 ONNX on labelled data,
with one decode + NMS for all three (used by ``quantkit export --eval`` and ``quantkit eval``, on both routes: an
export from an FP32 ONNX file has no torch model, and its ``fp32_torch`` row says so instead of a number)."""

from __future__ import annotations

import logging
import os

from torch import nn

from quantkit import paths
from quantkit.data.preprocess import Preprocess
from quantkit.data.coco import CocoDataset
from quantkit.recipe import Recipe

log = logging.getLogger("quantkit")

ModelSource = bytes | str | os.PathLike  # serialized ONNX, or a path to one


NO_TORCH = "ONNX route: there is no torch model; the export started from an FP32 ONNX file"


def evaluate_export(dataset: CocoDataset, recipe: Recipe, pp: Preprocess, fp32_model: nn.Module | None,
                    fp32_onnx: ModelSource, int8_onnx: ModelSource, *, source: str | os.PathLike,
                    progress: bool = True, threads: int | None = None) -> dict:
    """Evaluate the three models on ``dataset`` with ``recipe.evaluation``'s NMS thresholds; the torch model
    runs on ``recipe.runtime.device``; ``fp32_model`` None (the ONNX route): its row holds None and a note.

    source: where ``dataset`` came from (named in the report). threads: onnxruntime intra-op threads (1 makes the figures independent of the core count). Returns the
    report's ``evaluation`` section: per model mAP50:95 / mAP50 (fractions) and the INT8 drop in points (x100).
    """
    from quantkit.eval.detection import evaluate_detection, onnx_predictor, torch_predictor
    from quantkit.utils.device import on_device

    ev = recipe.evaluation
    kw = dict(conf=ev.conf, iou=ev.iou, progress=progress)
    log.info("evaluating on %s", source)
    if fp32_model is None:
        fp32_torch = {"map50_95": None, "map50": None, "note": NO_TORCH}
    else:
        with on_device(recipe.runtime.device, fp32_model) as dev:
            fp32_torch = evaluate_detection(torch_predictor(fp32_model, dev), dataset, pp, label="FP32 torch",
                                            **kw).as_dict()
    res = {
        "data": paths.display_path(source),
        "fp32_torch": fp32_torch,
        "fp32_onnx": evaluate_detection(onnx_predictor(fp32_onnx, intra_op_threads=threads), dataset, pp,
                                        label="FP32 ONNX", **kw).as_dict(),
        "int8_onnx": evaluate_detection(onnx_predictor(int8_onnx, intra_op_threads=threads), dataset, pp,
                                        label="INT8 ONNX", **kw).as_dict(),
    }
    base = res["fp32_onnx"]["map50_95"]
    res["drop_map50_95_points"] = round(100.0 * (base - res["int8_onnx"]["map50_95"]), 4)
    res["drop_map50_points"] = round(100.0 * (res["fp32_onnx"]["map50"] - res["int8_onnx"]["map50"]), 4)
    return res
