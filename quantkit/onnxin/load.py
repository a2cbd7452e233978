"""Load an FP32 ONNX file, check that quantkit can handle it, and clean it up with onnxruntime's own tools.

Clean-up is onnxruntime's offline *basic* optimization (``ORT_ENABLE_BASIC``: constant folding, redundant node
elimination, Conv+BatchNorm / Conv+Mul / Conv+Add folding — only standard ONNX ops, no device-specific
kernels), then ``onnx.shape_inference``. The cleaned graph is checked against the original on real inputs
(:func:`verify_cleanup`): clean-up must not change what the model computes.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from quantkit.errors import ExportError, ModelError, QuantkitError, UsageError
from quantkit.onnxin.external import embed_external_data
from quantkit.onnxin.opset import CONVERT_FROM_MIN, convert_opset
from quantkit.onnxin.scratch import write_via_path
from quantkit.recipe_limits import short_repr

# ops that run a subgraph (any node with a GRAPH attribute does): a data-dependent trip count can keep
# onnxruntime busy for hours inside one C call, where neither Ctrl-C nor SIGTERM reach Python
CONTROL_FLOW_OPS = ("Loop", "If", "Scan", "SequenceMap")
MIN_OPSET = 13  # per-channel QuantizeLinear/DequantizeLinear (axis) need opset 13
MAX_OPSET = 21  # newest opset whose Q/DQ semantics lint, strong conversion and TensorRT 10 are known to handle
CLEANUP_MIN_SQNR_DB = 80.0  # cleaned vs original FP32 outputs: folding may only reorder float sums

log = logging.getLogger("quantkit")


@dataclass
class LoadedOnnx:
    """A validated FP32 ONNX model. ``raw`` are the file's bytes (the report hashes them).

    ``input_shape``: [N, C, H, W] with N None when the batch is symbolic; H, W always concrete. Inputs that are
    not images ((N, L) audio frames, (N, T, D) features) have any rank >= 2, every dim but N fixed.
    ``external_data``: the data files (beside the model) whose tensors were read into ``model``.
    ``content``: what the calibration cache keys on: ``raw``, or with external data the model with its data
    embedded (so changed weights in the data file never hit a stale cache).
    """

    path: str
    raw: bytes
    model: onnx.ModelProto
    input_name: str
    input_shape: list[int | None]
    opset: int
    external_data: tuple[str, ...] = ()
    content: bytes | None = None
    converted_from: int | None = None  # the file's opset when it was converted to ``opset`` (onnx.version_converter)
    conversion_sqnr_db: float | None = None  # converted vs original outputs on the check input (inf: identical)
    inputs: tuple[tuple[str, tuple[int, ...]], ...] | None = None  # several graph inputs: (name, per-sample shape)

    def __post_init__(self):
        if self.content is None:
            self.content = self.raw

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


def load_onnx(path: str | os.PathLike, input_size: tuple[int, int] | None = None,
              data_shape: tuple[int, ...] | None = None,
              check_memory: Callable[[str, list[int | None]], None] | None = None,
              data_shapes: dict[str, tuple[int, ...]] | None = None, free_batch: bool = False) -> LoadedOnnx:
    """Read and validate an FP32 ONNX file, fix its free input dims, and bring an opset below 13 to 13.

    Free H/W take ``input_size`` (H, W in pixels), else ``data_shape`` (C, H, W of preprocessed calibration data,
    e.g. a .npy's); a free C takes ``data_shape``'s. ``check_memory(where, shape)`` runs once the shape is fixed,
    before anything allocates an input (the opset conversion's check runs the model).

    Raises UsageError (exit 2) for: a missing file, a file that is not an ONNX model, control flow, external data
    outside the model's folder, an opset outside [7, 21] or one the converter cannot bring to 13 unchanged, no
    outputs, an input neither float32 nor integer, inputs whose fixed first dims disagree, free dims with nothing to fix them, or an
    ``input_size`` that contradicts fixed dims.
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
    refuse_control_flow(model, p)  # before anything hands the graph to onnxruntime or a converter
    external = embed_external_data(model, p)  # from the model's folder, not the current one
    content = model.SerializeToString() if external else raw
    opset = default_opset(model)
    if not CONVERT_FROM_MIN <= opset <= MAX_OPSET:
        raise UsageError(
            f"{p} uses opset {opset}; quantkit handles opsets {MIN_OPSET}-{MAX_OPSET} and converts opsets "
            f"{CONVERT_FROM_MIN}-{MIN_OPSET - 1}. Re-export with opset 17 (torch.onnx.export(..., opset_version=17)) "
            "or convert it: onnx.version_converter.convert_version(onnx.load(path), 17)")
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0][:300]
        raise UsageError(f"{p} is not a valid ONNX model ({first}): re-export it") from exc
    if any(n.op_type in ("QuantizeLinear", "DequantizeLinear", "QLinearConv", "ConvInteger") for n in model.graph.node):
        raise UsageError(f"{p} is already quantized (it has QuantizeLinear/DequantizeLinear or integer ops): "
                         "pass the FP32 model; `quantkit lint` checks an existing Q/DQ graph")
    if not model.graph.output:
        raise UsageError(f"{p} has no graph outputs: there is nothing to calibrate or compare; export the model "
                         "with its outputs (torch.onnx.export(..., output_names=[...]))")
    inits = {t.name for t in model.graph.initializer}
    if sum(i.name not in inits for i in model.graph.input) > 1:
        fixed = fix_inputs(model, p, input_size, data_shapes, free_batch=free_batch)
        name, shape = fixed[0]
    else:
        name, shape = fix_input(model, p, input_size, data_shape)
        fixed = [(name, shape)]
    if check_memory is not None:
        for n, sh in fixed:
            check_memory(f"input {short_repr(n)} of {p}", sh)
    loaded = LoadedOnnx(str(p), raw, model, name, shape, opset, external, content)
    if len(fixed) > 1:
        loaded.inputs = tuple((n, tuple(int(d) for d in sh[1:])) for n, sh in fixed)
    if opset < MIN_OPSET:
        loaded.model, loaded.conversion_sqnr_db = convert_opset(model, p, MIN_OPSET, name, shape, feeds=fixed)
        loaded.converted_from, loaded.opset = opset, MIN_OPSET
    return loaded


# graph input types the route feeds: float32 data, and integer ids / uint8 pixels / masks (quantkit.data.dtypes)
INPUT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.INT64, onnx.TensorProto.INT32, onnx.TensorProto.INT16,
               onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.UINT16, onnx.TensorProto.BOOL}


def refuse_input_type(elem_type: int, qin: str, p: Path) -> None:
    """UsageError for a graph input quantkit cannot feed: float16/float64 (an FP32 model is what it quantizes),
    strings, complex numbers."""
    if elem_type not in INPUT_TYPES:
        raise UsageError(f"input {qin} of {p} is {onnx.TensorProto.DataType.Name(elem_type)}; quantkit quantizes "
                         "FP32 models whose inputs are float32 or integers (token ids, uint8 pixels): export the "
                         "model with float32 inputs")


def fix_inputs(model: onnx.ModelProto, p: Path, input_size: tuple[int, int] | None,
               data_shapes: dict[str, tuple[int, ...]] | None, *, free_batch: bool = False
               ) -> list[tuple[str, list[int | None]]]:
    """Several graph inputs: each float32, its dims after the batch fixed from the .npz array of its name
    (``data_shapes``: name -> per-sample shape); a free batch is fixed at 1 (one static shape for the engine), or
    stays free (N None) with ``free_batch`` (a min:opt:max batch: every input gets the range in the engine's
    profile; a graph whose inputs disagree on a fixed batch is refused). Returns [(name, [N, ...])] in graph
    order."""
    inits = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    names = [i.name for i in inputs]
    if input_size is not None:
        raise UsageError(f"--input-size applies to a model with one image input; {p} has {len(inputs)} inputs "
                         f"({short_repr(names)}): drop --input-size, the .npz arrays give their shapes")
    shapes = data_shapes or {}
    refuse_mixed_batch(inputs, p, free_batch)
    out = []
    for inp in inputs:
        qin, tt = short_repr(inp.name), inp.type.tensor_type
        refuse_input_type(tt.elem_type, qin, p)
        dims = list(tt.shape.dim)
        if not dims:
            raise UsageError(f"input {qin} of {p} has no batch axis: export the model with a batch dimension first")
        want = shapes.get(inp.name)
        for k, d in enumerate(dims):
            free = not d.HasField("dim_value") or d.dim_value < 1
            if k == 0:
                if free and free_batch:
                    d.Clear()
                    d.dim_param = "batch"  # one name: the inputs share the batch
                elif free:
                    d.Clear()
                    d.dim_value = 1
                elif free_batch:
                    raise UsageError(f"input {qin} of {p} has a fixed batch of {d.dim_value}, but input.batch asks "
                                     "for a min:opt:max range: export the model with a dynamic batch axis, or use a "
                                     f"fixed batch such as --batch {d.dim_value}")
                continue
            if free:
                if want is None or len(want) != len(dims) - 1:
                    raise UsageError(f"input {qin} of {p} has free dims and no array of its name to take them from: "
                                     "calibrate with a .npz holding one float32 array per input, named after it "
                                     f"(numpy.savez('calib.npz', {', '.join(f'{n!r}=...' for n in names)[:200]}))")
                d.Clear()
                d.dim_value = int(want[k - 1])
        out.append((inp.name, [None if k == 0 and free_batch else int(d.dim_value) for k, d in enumerate(dims)]))
    log.info("ONNX route: %d graph inputs %s, batch %s", len(out), ", ".join(f"{n} {s}" for n, s in out),
             "free (input.batch range)" if free_batch else "1")
    return out


def refuse_mixed_batch(inputs, p: Path, free_batch: bool = False) -> None:
    """UsageError when the graph inputs' first dims disagree (silero-vad's ``input`` [1, 576] beside its
    recurrent ``state`` [2, 1, 128]; a free first dim counts as the batch of 1 it is fixed to, unless
    ``free_batch``): every stage feeds each input its samples along axis 0, so an input whose first axis is not
    the batch cannot be fed (it failed inside onnxruntime as an internal error)."""
    first = {}
    for inp in inputs:
        dims = list(inp.type.tensor_type.shape.dim)
        if dims and dims[0].HasField("dim_value") and dims[0].dim_value >= 1:
            first[inp.name] = int(dims[0].dim_value)
        elif dims and not free_batch:
            first[inp.name] = 1
    if len(set(first.values())) > 1:
        listed = ", ".join(f"{short_repr(n)}: {v}" for n, v in first.items())
        raise UsageError(f"the inputs of {p} disagree on their first (batch) dimension ({listed}); quantkit feeds "
                         "every input its samples along axis 0, so an input whose first axis is not the batch (a "
                         "recurrent state [layers, batch, hidden], say) cannot be calibrated: export the model with "
                         "the batch first on every input (or the state folded in as a constant)")


def fix_input(model: onnx.ModelProto, p: Path, input_size: tuple[int, int] | None,
              data_shape: tuple[int, ...] | None) -> tuple[str, list[int | None]]:
    """The single NCHW float input's (name, [N, C, H, W]); free C/H/W are set in ``model`` from ``input_size``
    (H, W) or ``data_shape`` (C, H, W). N stays None when free (calibration feeds any batch)."""
    inits = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise UsageError(f"{p} has {len(inputs)} graph inputs ({short_repr([i.name for i in inputs])}); quantkit's "
                         "ONNX route takes a model with at least one float32 input (batch first): export the model "
                         "with its inputs as graph inputs")
    inp = inputs[0]
    qin = short_repr(inp.name)  # names are user content: quoted bounded
    tt = inp.type.tensor_type
    refuse_input_type(tt.elem_type, qin, p)
    dims = list(tt.shape.dim)
    for k, d in enumerate(dims):  # -1: "dynamic" as paddle2onnx and older exporters write it -> a free dim
        if d.HasField("dim_value") and d.dim_value == -1:
            d.Clear()
            d.dim_param = "N" if k == 0 else f"dim_{k}"
    shape: list[int | None] = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    if any(v is not None and v < 1 for v in shape):
        raise UsageError(f"input {qin} of {p} has the shape {shape} with a dimension below 1: re-export it "
                         "with its real input shape")
    free = [d.dim_param or "?" for k, d in enumerate(dims) if k and shape[k] is None]

    def fix(k: int, v: int) -> None:
        dims[k].Clear()
        dims[k].dim_value = v
        shape[k] = v

    if len(dims) != 4:  # (N, L) audio frames, (N, T, D) features: the calibration .npy gives the samples
        if input_size is not None:
            raise UsageError(f"--input-size (H x W) applies to NCHW image inputs; input {qin} of {p} has "
                             f"shape {shape}: drop --input-size")
        if len(dims) >= 2 and data_shape is not None and len(data_shape) == len(dims) - 1:
            for k in range(1, len(dims)):
                if shape[k] is None:
                    fix(k, int(data_shape[k - 1]))
        if len(dims) < 2 or any(v is None for v in shape[1:]):
            raise UsageError(f"input {qin} of {p} has shape {[d.dim_param or d.dim_value for d in dims]}; "
                             "quantkit's ONNX route takes [N, C, H, W] images or a rank >= 2 input whose dims "
                             "after the batch are fixed (or given by the calibration .npy's shape): export the "
                             "model with a fixed sample shape")
        return inp.name, shape
    if input_size is not None:
        h, w = (int(v) for v in input_size)
        for k, v in ((2, h), (3, w)):
            if shape[k] is not None and shape[k] != v:
                raise UsageError(f"--input-size {h}x{w} contradicts the fixed input shape {shape} of {p}: drop "
                                 f"--input-size or pass {shape[2]}x{shape[3]}")
            fix(k, v)
    if data_shape is not None and len(data_shape) == 3:  # a .npy's (C, H, W): its size is the model's input size
        for k in (1, 2, 3):
            if shape[k] is None and int(data_shape[k - 1]) >= 1:
                fix(k, int(data_shape[k - 1]))
    if shape[1] is None:
        raise UsageError(f"input {qin} of {p} has a free channel dimension: export it with a fixed C, or calibrate "
                         "with a float32 NCHW .npy (its C is taken)")
    if shape[2] is None or shape[3] is None:
        raise UsageError(f"input {qin} of {p} has free spatial dimensions {free}: pass --input-size HxW (e.g. "
                         "640x640), set input.size in the recipe, or calibrate with a .npy (its H, W are taken)")
    if free:
        log.info("input %s of %s: free dims %s fixed, shape %s", qin, p.name, free, shape)
    return inp.name, shape


def _runs_subgraph(node: onnx.NodeProto) -> bool:
    return (node.op_type in CONTROL_FLOW_OPS and node.domain in ("", "ai.onnx")) or any(
        a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)


def refuse_control_flow(model: onnx.ModelProto, path) -> None:
    """UsageError naming the first node that runs a subgraph (Loop, If, Scan, ...), in the graph or in a local
    function: quantkit's ONNX route takes straight-line graphs. A subgraph lives only inside such a node, so the
    outer node is always found first."""
    fix = ("quantkit's ONNX route takes graphs without control flow: export the model traced, with loops unrolled "
           "and branches resolved (torch.onnx.export of the plain module, not torch.jit.script; or fold constant "
           "conditions with onnx-simplifier)")
    for i, n in enumerate(model.graph.node):
        if _runs_subgraph(n):
            raise UsageError(f"{path} has control flow: node {short_repr(n.name or f'#{i}')} is a "
                             f"{short_repr(n.op_type)}; {fix}")
    called = {(n.domain, n.op_type): n.name for n in model.graph.node}
    for f in model.functions:
        for n in f.node:
            if _runs_subgraph(n):
                caller = called.get((f.domain, f.name))
                via = f", called by node {short_repr(caller)}" if caller is not None else ""
                raise UsageError(f"{path} has control flow: node {short_repr(n.name or n.op_type)} in local function "
                                 f"{short_repr(f.domain + ':' + f.name)}{via} is a {short_repr(n.op_type)}; {fix}")


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
    data = model.SerializeToString()

    def optimize_to(path: str) -> None:
        opts.optimized_model_filepath = path
        ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])

    try:
        cleaned_bytes = write_via_path(optimize_to, len(data))
    except QuantkitError:
        raise
    except Exception as exc:  # onnxruntime raises its own exception types
        raise ModelError(f"onnxruntime cannot load the model ({str(exc)[:300]}): check that it runs in "
                         "onnxruntime on CPU, or re-export it with standard ONNX ops") from exc
    cleaned = onnx.load_model_from_string(cleaned_bytes)
    # onnxruntime may record opsets of domains the graph no longer uses; keep the model's own ones
    try:
        cleaned = onnx.shape_inference.infer_shapes(cleaned, strict_mode=False)
    except Exception:  # shape inference is best-effort (custom ops); the graph is still valid without it
        pass
    return name_nodes(cleaned)


def verify_cleanup(original: onnx.ModelProto, cleaned: onnx.ModelProto, batches: list[np.ndarray]) -> float:
    """Worst output SQNR (dB) of the cleaned graph against the original on ``batches``; ExportError below 80 dB."""
    from quantkit.sqnr import sqnr_db
    from quantkit.exporter import parity

    ref, got = parity.session(original, 1), parity.session(cleaned, 1)
    a = [parity.run_session(ref, b) for b in batches]
    c = [parity.run_session(got, b) for b in batches]
    worst = min(sqnr_db([r[k] for r in a], [t[k] for t in c]) for k in range(len(a[0])))
    if not worst >= CLEANUP_MIN_SQNR_DB:
        raise ExportError(f"graph clean-up (constant/BatchNorm folding) changed the FP32 outputs: {worst:.1f} dB "
                          f"< {CLEANUP_MIN_SQNR_DB} dB against the original. Please report this with the model")
    return worst
