"""Old opsets as people have them: convert with onnx's own version converter, then prove nothing changed.

Per-channel Q/DQ needs opset 13, and many third-party files (older Ultralytics, PaddlePaddle, tf2onnx exports)
are opset 11 or 12. ``onnx.version_converter`` rewrites the ops whose signature changed (Softmax's axis
semantics, Split/Squeeze/Unsqueeze/ReduceSum taking inputs instead of attributes, Upsample -> Resize ...);
an adapter that got one wrong would silently change the model, so the converted graph must give the same
outputs as the original in onnxruntime (which runs both opsets) on a fixed random input in [0, 1).
"""

from __future__ import annotations

import numpy as np
import onnx

from quantkit.errors import UsageError

CONVERT_FROM_MIN = 7  # onnxruntime runs opset 7 and newer: older files cannot be checked after conversion
CONVERT_MIN_SQNR_DB = 80.0  # converted vs original outputs: only float summation order may differ
CHECK_SEED = 0


def _outputs(model: onnx.ModelProto, name: str, x: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Every output of ``model`` on the feeds ``x`` (input name -> array; ``name``: the first input)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the graph as it is
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, x)


def convert_opset(model: onnx.ModelProto, path, target: int, input_name: str, shape: list[int | None],
                  feeds: list[tuple[str, list[int | None]]] | None = None) -> tuple[onnx.ModelProto, float]:
    """``model`` (a checked opset < ``target`` graph whose input ``input_name`` has [N, C, H, W] ``shape``, N may
    be None) converted to opset ``target``, and the worst output SQNR (dB) of the converted graph against the
    original on one random input. UsageError naming the fix when the conversion fails or changes an output."""
    from quantkit.sqnr import sqnr_db

    src = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    fix = (f"re-export the model with opset {target} or newer (torch.onnx.export(..., opset_version=17); "
           "tf2onnx --opset 17)")
    try:
        converted = onnx.version_converter.convert_version(model, target)
        onnx.checker.check_model(converted)
    except Exception as exc:  # the converter raises RuntimeError/ValidationError for ops it has no adapter for
        raise UsageError(f"{path} uses opset {src}, and onnx's version converter cannot bring it to opset {target} "
                         f"({str(exc).strip()[:200]}): {fix}") from None
    rng = np.random.default_rng(CHECK_SEED)
    types = {i.name: i.type.tensor_type.elem_type for i in model.graph.input}
    # a float input: uniform [0, 1); an integer one (token ids, pixels): zeros, an id every vocabulary holds
    x = {n: rng.random((sh[0] or 1, *sh[1:]), dtype=np.float32) if types.get(n, onnx.TensorProto.FLOAT) == onnx.TensorProto.FLOAT
         else np.zeros((sh[0] or 1, *sh[1:]), onnx.helper.tensor_dtype_to_np_dtype(types[n]))
         for n, sh in (feeds or [(input_name, shape)])}
    try:
        before = _outputs(model, input_name, x)
    except Exception as exc:  # onnxruntime's own exception types
        raise UsageError(f"{path} uses opset {src}, and onnxruntime cannot run it to check a conversion to opset "
                         f"{target} ({str(exc).strip()[:200]}): {fix}") from None
    try:
        after = _outputs(converted, input_name, x)
    except Exception as exc:
        raise UsageError(f"{path}: the opset {src} -> {target} conversion gives a graph onnxruntime cannot run "
                         f"({str(exc).strip()[:200]}): {fix}") from None
    worst = float("inf")
    for a, b in zip(before, after):
        floats = a.dtype.kind in "fc"
        if a.shape != b.shape or a.dtype != b.dtype:
            worst = float("-inf")
        elif np.array_equal(a, b, equal_nan=floats):
            continue
        elif not floats or not np.isfinite(a).all():  # integer outputs must match exactly; NaN has no SQNR
            worst = float("-inf")
        else:
            worst = min(worst, sqnr_db([np.asarray(a, np.float64)], [np.asarray(b, np.float64)]))
    if not worst >= CONVERT_MIN_SQNR_DB:
        raise UsageError(f"{path}: converting opset {src} to {target} changed the model's outputs ({worst:.1f} dB "
                         f"SQNR against the original, need >= {CONVERT_MIN_SQNR_DB:.0f} dB): {fix}")
    return converted, worst
