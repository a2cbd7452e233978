"""The FP32 ONNX front end: an ONNX file in, the same INT8 Q/DQ product as the torch route out.

Entry point: :func:`quantize_onnx` (``route``); writing an output folder: :func:`run_onnx_export` (``export``).
"""

from quantkit.onnxin.route import OnnxQuantResult, quantize_onnx

__all__ = ["OnnxQuantResult", "quantize_onnx"]
