"""Activation scales from a TensorRT calibration cache (``--trt-calib-cache``) for the ONNX route.

A cache holds one scale per INT8 tensor. quantkit's default (hybrid) export keeps some layers FP16, so its own
calibration.cache has no line for their input tensors. The rule: a quantizable tensor without a scale belongs to
a layer the source kept FP16. ``calibration.trt_cache_missing``:

* ``fp16`` (default): every node reading such a tensor stays FP16, as the source chose (re-quantizing a layer
  the automatic FP16 choice protected would undo that choice);
* ``calibrate``: those tensors are calibrated from ``--calib`` in onnxruntime (the route's usual pass, cached),
  the rest keep the cache's scales bit for bit.

The result lists which tensors came from the cache, which nodes were kept FP16 and which tensors were
calibrated (report.json ``calibration.trt_cache`` and calibration.json ``trt_cache``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import onnx

from quantkit.calibrate.trt_cache import CacheImport
from quantkit.data.calib import CalibrationData
from quantkit.errors import UsageError
from quantkit.onnxin.placement import OnnxLayout

log = logging.getLogger("quantkit")


def import_cache(path: str, cleaned: onnx.ModelProto, layout: OnnxLayout, calibrate_missing, *, mode: str,
                 data: CalibrationData | None) -> CacheImport:
    """Scales for ``layout``'s INT8 tensors from the cache at ``path``; demotes nodes (``mode`` fp16: edits
    ``layout.int8`` and ``layout.notes``) or calibrates the tensors the cache lacks (``mode`` calibrate:
    ``calibrate_missing(tensors) -> (tensor -> amax, CalibrationResult, cache info)``, needs ``data``).
    UsageError naming the fix when the cache is not this model's or calibration has no data."""
    from quantkit.calibrate.trt_cache import import_scales
    from quantkit.onnxin.qdq import activation_scale

    graph_tensors = ({i.name for i in cleaned.graph.input}
                     | {t for n in cleaned.graph.node for t in (*n.input, *n.output)})
    out = import_scales(path, {n: c.act_input[1] for n, c in layout.candidates.items()}, list(layout.int8),
                        graph_tensors, mode=mode, what="this graph",
                        fix="Pass the cache written for this ONNX file, or calibrate with --calib")
    if out.calibrated and data is None:
        raise UsageError(f"{path} has no scale for {len(out.calibrated)} quantized tensor(s), e.g. "
                         f"{out.calibrated[:3]}, and calibration.trt_cache_missing=calibrate needs data to calibrate "
                         "them: pass --calib DIR (or .npy), or drop that setting to keep those layers FP16 as the "
                         "source did")
    layout.int8 = [n for n in layout.int8 if n not in set(out.kept_fp16)]
    missing = out.kept_fp16_tensors if mode == "fp16" else out.calibrated
    from_cache = out.from_cache
    if missing and mode == "calibrate":
        out.calibrated = _in_order(layout, missing)
        amax, out.calib, info = calibrate_missing(out.calibrated)
        out.amax.update(amax)
        out.act_scales.update({t: float(activation_scale(a)) for t, a in amax.items()})
        out.cache_info.update({"hit": info.get("hit"), "path": info.get("path"), "reason": info.get("reason"),
                               "key": out.cache_info["key"] + "+" + str(info.get("key"))})
    if missing:
        what = (f"kept {len(out.kept_fp16)} node(s) FP16 ({', '.join(out.kept_fp16[:5])}"
                f"{', ...' if len(out.kept_fp16) > 5 else ''}), as the source did"
                if mode == "fp16" else f"calibrated those {len(missing)} tensor(s) from {data.source}")
        note = (f"--trt-calib-cache: {len(from_cache)} tensor scale(s) from {Path(path).name}; {len(missing)} "
                f"quantizable tensor(s) have no scale there (layers the source kept FP16): {what} "
                "(calibration.trt_cache_missing=" + mode + ")")
        layout.notes.append(note)
        log.info("%s", note)
    return out


def _in_order(layout: OnnxLayout, tensors) -> list[str]:
    """``tensors`` in the order the INT8 nodes first read them."""
    want = set(tensors)
    return [t for t in layout.activation_tensors(only_int8=True) if t in want]
