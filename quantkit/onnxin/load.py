"""Load an FP32 ONNX file, check that quantkit can handle it, and clean it up with onnxruntime's own tools.

Clean-up is onnxruntime's offline *basic* optimization (``ORT_ENABLE_BASIC``: constant folding, redundant node
elimination, Conv+BatchNorm / Conv+Mul / Conv+Add folding — only standard ONNX ops, no device-specific
kernels), then ``onnx.shape_inference``. The cleaned graph is checked against the original on real inputs
(:func:`verify_cleanup`): clean-up must not change what the model computes.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from quantkit.errors import ExportError, ModelError, UsageError

MIN_OPSET = 13  # per-channel QuantizeLinear/DequantizeLinear (axis) need opset 13
MAX_OPSET = 21  # newest opset whose Q/DQ semantics lint, strong conversion and TensorRT 10 are known to handle
CLEANUP_MIN_SQNR_DB = 80.0  # cleaned vs original FP32 outputs: folding may only reorder float sums


@dataclass
class LoadedOnnx:
    """A validated FP32 ONNX model. ``raw`` are the file's bytes (the calibration cache keys on them).

    ``input_shape``: [N, C, H, W] with N None when the batch is symbolic; H, W always concrete. Inputs that are
    not images ((N, L) audio frames, (N, T, D) features) have any rank >= 2, every dim but N fixed.
    """

    path: str
    raw: bytes
    model: onnx.ModelProto
    input_name: str
    input_shape: list[int | None]
    opset: int

    @property
    def is_image(self) -> bool:
        """An NCHW input (images folders and input.size apply)."""
        return len(self.input_shape) == 4

    @property
    def size(self) -> tuple[int, int] | None:
        """Input (H, W) in pixels; None for an input that is not NCHW."""
        return (int(self.input_shape[2]), int(self.input_shape[3])) if self.is_image else None


def is_onnx_path(name: str | None) -> bool:
    """True when a model argument names an ONNX file (by extension)."""
    return bool(name) and str(name).lower().endswith(".onnx")


def default_opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def load_onnx(path: str | os.PathLike, input_size: tuple[int, int] | None = None) -> LoadedOnnx:
    """Read and validate an FP32 ONNX file; fix free H/W dimensions to ``input_size`` (H, W in pixels).

    Raises UsageError (exit 2) for: a missing file, a file that is not an ONNX model, an opset outside
    [13, 21], more than one graph input, a non-float32 or non-NCHW input, free spatial dims without
    ``input_size``, or an ``input_size`` that contradicts fixed dims.
    """
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"ONNX model {p} does not exist: pass the path of an FP32 .onnx file")
    raw = p.read_bytes()
    try:
        model = onnx.load_model_from_string(raw)
    except Exception as exc:  # protobuf raises DecodeError and friends
        raise UsageError(f"{p} is not an ONNX model ({type(exc).__name__}): pass an .onnx file exported by "
                         "torch.onnx.export, tf2onnx or a training framework") from exc
    if not model.graph.node or not model.opset_import:
        raise UsageError(f"{p} is not an ONNX model (no graph nodes or opset): pass an .onnx file exported by "
                         "torch.onnx.export, tf2onnx or a training framework")
    opset = default_opset(model)
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise UsageError(
            f"{p} uses opset {opset}; quantkit handles opsets {MIN_OPSET}-{MAX_OPSET}. Re-export with opset 17 "
            "(torch.onnx.export(..., opset_version=17)) or convert it: "
            "onnx.version_converter.convert_version(onnx.load(path), 17)")
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0][:300]
        raise UsageError(f"{p} is not a valid ONNX model ({first}): re-export it") from exc
    if any(n.op_type in ("QuantizeLinear", "DequantizeLinear", "QLinearConv", "ConvInteger") for n in model.graph.node):
        raise UsageError(f"{p} is already quantized (it has QuantizeLinear/DequantizeLinear or integer ops): "
                         "pass the FP32 model; `quantkit lint` checks an existing Q/DQ graph")
    inits = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise UsageError(f"{p} has {len(inputs)} graph inputs ({[i.name for i in inputs]}); quantkit's ONNX route "
                         "takes one image input [N, C, H, W]: export the model with a single input")
    inp = inputs[0]
    tt = inp.type.tensor_type
    if tt.elem_type != onnx.TensorProto.FLOAT:
        raise UsageError(f"input '{inp.name}' of {p} is {onnx.TensorProto.DataType.Name(tt.elem_type)}; quantkit "
                         "quantizes FP32 models: export the model in float32")
    dims = list(tt.shape.dim)
    shape: list[int | None] = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    if len(dims) != 4:  # (N, L) audio frames, (N, T, D) features: the calibration .npy gives the samples
        if len(dims) < 2 or any(v is None or v <= 0 for v in shape[1:]):
            raise UsageError(f"input '{inp.name}' of {p} has shape {[d.dim_param or d.dim_value for d in dims]}; "
                             "quantkit's ONNX route takes [N, C, H, W] images or a rank >= 2 input whose dims "
                             "after the batch are fixed: export the model with a fixed sample shape")
        if input_size is not None:
            raise UsageError(f"--input-size (H x W) applies to NCHW image inputs; input '{inp.name}' of {p} has "
                             f"shape {shape}: drop --input-size")
        return LoadedOnnx(str(p), raw, model, inp.name, shape, opset)
    if shape[1] is None:
        raise UsageError(f"input '{inp.name}' of {p} has a free channel dimension: export it with a fixed C")
    if input_size is not None:
        h, w = (int(v) for v in input_size)
        for k, v in ((2, h), (3, w)):
            if shape[k] is not None and shape[k] != v:
                raise UsageError(f"--input-size {h}x{w} contradicts the fixed input shape {shape} of {p}: drop "
                                 f"--input-size or pass {shape[2]}x{shape[3]}")
            dims[k].Clear()
            dims[k].dim_value = v
            shape[k] = v
    if shape[2] is None or shape[3] is None:
        raise UsageError(f"input '{inp.name}' of {p} has free spatial dimensions "
                         f"{[d.dim_param or '?' for d in dims[2:]]}: pass --input-size HxW (e.g. 640x640) "
                         "or set input.size in the recipe")
    return LoadedOnnx(str(p), raw, model, inp.name, shape, opset)


def name_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Give every unnamed node a unique name ``<op_type>_<index>`` (skip patterns and reports need names)."""
    used = {n.name for n in model.graph.node if n.name}
    for i, n in enumerate(model.graph.node):
        if not n.name:
            name = f"{n.op_type}_{i}"
            while name in used:
                name += "_"
            n.name = name
            used.add(name)
    return model


def cleanup(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnxruntime's offline basic optimization (folds constants and BatchNorm), then shape inference."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    with tempfile.TemporaryDirectory(prefix="quantkit-onnx-") as tmp:
        out = os.path.join(tmp, "cleaned.onnx")
        opts.optimized_model_filepath = out
        try:
            ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ModelError(f"onnxruntime cannot load the model ({str(exc)[:300]}): check that it runs in "
                             "onnxruntime on CPU, or re-export it with standard ONNX ops") from exc
        cleaned = onnx.load(out)
    # onnxruntime may record opsets of domains the graph no longer uses; keep the model's own ones
    try:
        cleaned = onnx.shape_inference.infer_shapes(cleaned, strict_mode=False)
    except Exception:  # shape inference is best-effort (custom ops); the graph is still valid without it
        pass
    return name_nodes(cleaned)


def verify_cleanup(original: onnx.ModelProto, cleaned: onnx.ModelProto, batches: list[np.ndarray]) -> float:
    """Worst output SQNR (dB) of the cleaned graph against the original on ``batches``; ExportError below 80 dB."""
    from quantkit.eval.sqnr import sqnr_db
    from quantkit.exporter import parity

    ref, got = parity.session(original, 1), parity.session(cleaned, 1)
    a = [parity.run_session(ref, b) for b in batches]
    c = [parity.run_session(got, b) for b in batches]
    worst = min(sqnr_db([r[k] for r in a], [t[k] for t in c]) for k in range(len(a[0])))
    if not worst >= CLEANUP_MIN_SQNR_DB:
        raise ExportError(f"graph clean-up (constant/BatchNorm folding) changed the FP32 outputs: {worst:.1f} dB "
                          f"< {CLEANUP_MIN_SQNR_DB} dB against the original. Please report this with the model")
    return worst
