"""Evaluation stage: detection mAP (COCO), output SQNR.

Entry: :func:`evaluate_export` (FP32 torch, FP32 ONNX and INT8 ONNX on labelled data -> report section).
"""

from quantkit.eval.held_out import evaluate_export

__all__ = ["evaluate_export"]
