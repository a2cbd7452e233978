"""``quantize_onnx``: an FP32 ONNX file + calibration data (or a TensorRT cache) + a recipe -> INT8 Q/DQ graph.

load + validate -> clean up (onnxruntime basic optimization, shape inference; FP32 outputs checked unchanged)
-> placement + selection (ONNX node names) -> calibration in onnxruntime (cached) or a TensorRT cache's scales
-> the registered PTQ passes on an ``OnnxTarget`` (the torch route's guard) -> Q/DQ insertion (+ its float twin,
the parity reference).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from quantkit.calibrate.driver import CalibrationResult, method_key
from quantkit.calib_methods import MethodSettings
from quantkit.data.calib import CalibrationData, small_set_note
from quantkit.data.preprocess import Preprocess
from quantkit.errors import DataError, UsageError
from quantkit.exporter.passes import normalize
from quantkit.onnxin import calibrate as ocal
from quantkit.onnxin.load import LoadedOnnx, cleanup, load_onnx, verify_cleanup
from quantkit.onnxin import passes as _passes  # noqa: F401  (registers the default passes' ONNX implementations)
from quantkit.onnxin.placement import OnnxLayout, build_layout
from quantkit.onnxin.target import OnnxTarget
from quantkit.onnxin.qdq import insert_qdq, simulate_qdq, weight_scales, with_fake_quant_weights
from quantkit.recipe import Recipe, parse_batch
from quantkit.preflight import check_model_input_memory

log = logging.getLogger("quantkit")

CLEANUP_CHECK_BATCHES = 2


@dataclass
class OnnxQuantResult:
    """Everything the ONNX route produced, for the export/report/engine/evaluation stages.

    fp32 / fp32_bytes: the cleaned FP32 graph (model.onnx). int8: the Q/DQ graph (model.int8.onnx).
    sim: the same quantization in plain float ops (parity reference). chosen_amax / act_scales: per quantized
    activation tensor (ONNX tensor names). calib: every method's amax (None when a TensorRT cache was imported).
    weight_scales: weight initializer -> per-channel float32 scale.
    """

    loaded: LoadedOnnx
    fp32: onnx.ModelProto
    fp32_bytes: bytes
    int8: onnx.ModelProto
    sim: onnx.ModelProto
    layout: OnnxLayout
    settings: MethodSettings
    pp: Preprocess
    data: CalibrationData | None
    calib: CalibrationResult | None
    chosen_amax: dict[str, float]
    act_scales: dict[str, float]
    weight_scales: dict[str, np.ndarray]
    cache_info: dict = field(default_factory=dict)
    cleanup_sqnr_db: float | None = None
    trt_cache: dict | None = None  # {"path", "header"} when scales came from a TensorRT calibration cache
    passes: dict | None = None  # report.json "passes": the registered PTQ passes as the guard ran them
    choice: object = None  # onnxin.fp16_choice.Fp16Choice: the FP16 choice / --sensitivity analysis, or None

    @property
    def sensitivity(self) -> dict | None:
        """report.json ``sensitivity``: the analysis and (when a choice ran) the selection."""
        return self.choice.sensitivity if self.choice is not None else None

    def layer_table(self) -> list[dict]:
        """One row per quantizable node: name, type, precision, input tensor and amax, weight amax range."""
        rows = []
        for name, c in self.layout.candidates.items():
            t = c.act_input[1]
            row = {"name": name, "type": c.op_type, "precision": self.layout.precision(name), "input_tensor": t,
                   "input_amax": _r(self.chosen_amax.get(t)) if name in self.layout.int8 else None}
            if c.weight is not None:
                s = self.weight_scales[c.weight[0]] * np.float32(127)
                row["weight_amax_min"], row["weight_amax_max"] = _r(float(s.min())), _r(float(s.max()))
            rows.append(row)
        return rows


def _r(v, nd: int = 6):
    return None if v is None else round(float(v), nd)


def npy_shape(data) -> tuple[int, ...] | None:
    """The per-sample shape ((C, H, W) for images, any rank otherwise) of a float32 .npy (read from its header),
    else None: free model dims take it."""
    p = Path(str(data)) if data is not None else None
    if p is None or p.suffix.lower() != ".npy" or not p.is_file():
        return None
    try:
        arr = np.load(p, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError):
        return None  # open_data reports an unreadable .npy with its own message
    return tuple(int(s) for s in arr.shape[1:]) if arr.ndim >= 2 else None


def _db(v: float | None) -> str:
    return "identical" if v == float("inf") else f"unchanged ({v:.1f} dB SQNR)"


def open_data(recipe: Recipe, calib: str, loaded) -> tuple[CalibrationData, Preprocess]:
    """The recipe's preprocessing at the graph's input size; a .npy / .npz must match the graph's per-sample
    shape (C, H, W for images, any rank otherwise). A .npz's array is the one keyed by the graph's input name
    (``onnxin.npz``)."""
    from dataclasses import replace

    from quantkit.data import open_data as open_calibration
    from quantkit.onnxin.npz import is_npz, npz_array

    sample = tuple(int(d) for d in loaded.input_shape[1:])
    size = tuple(loaded.size or (640, 640))
    if loaded.inputs:  # several graph inputs: a .npz, packed in graph order (every onnxruntime feed splits it so)
        from quantkit.onnxin.npz import npz_packed

        if not is_npz(calib):
            raise DataError(f"the ONNX model takes {len(loaded.inputs)} inputs ({[n for n, _ in loaded.inputs]}); "
                            f"calibrate with a .npz holding one float32 array per input, named after it")
        packed, dtypes = npz_packed(calib, loaded.inputs)
        data, pp = open_calibration(packed, recipe.calibration, recipe.preprocess, size)
        data = replace(data, source=Path(calib), kind="npz", inputs=loaded.inputs,
                       dtypes=dtypes if any(dtypes) else None)
        check_integer_inputs(data, loaded, calib)
        return data, pp
    if is_npz(calib):
        arr = npz_array(calib, [loaded.input_name])
        data, pp = open_calibration(arr, recipe.calibration, recipe.preprocess, size)
        data = replace(data, source=Path(calib), kind="npz")  # the report names the file, not "<ndarray>"
    else:
        data, pp = open_calibration(calib, recipe.calibration, recipe.preprocess, size)
    if data.inputs is not None:
        raise DataError(f"calibration data {calib} holds several inputs, but the ONNX model takes one: pass a .npy or "
                        "a .npz of one array")
    if tuple(data.input_shape) != sample:
        raise DataError(f"calibration data {calib} has inputs of shape {tuple(data.input_shape)} but the ONNX model "
                        f"takes {sample}: pass data of the model's input shape")
    check_integer_inputs(data, loaded, calib)
    return data, pp


def check_integer_inputs(data: CalibrationData, loaded, calib) -> None:
    """DataError when integer data (uint8 pixels) would feed a float32 graph input (un-normalized images, most
    likely), or when a graph input of an integer type (token ids, uint8 pixels) would be fed fractional values
    (onnxruntime's cast would truncate them silently: every calibration sample is checked once)."""
    import onnx

    from quantkit.data.dtypes import check_integral

    from quantkit.data.inputs import unpack

    types = {i.name: i.type.tensor_type.elem_type for i in loaded.model.graph.input}
    names = [n for n, _ in loaded.inputs] if loaded.inputs else [loaded.input_name]
    ints = []
    for name, saved in zip(names, data.dtypes or [None] * len(names)):
        if types.get(name, onnx.TensorProto.FLOAT) != onnx.TensorProto.FLOAT:
            ints.append(name)
        elif saved:
            raise DataError(f"calibration data {calib} holds {saved} values for the model's float32 input {name!r}: "
                            "save it preprocessed as the model expects, as float32 (for 8-bit images, e.g. "
                            "arr.astype(np.float32) / 255)")
    for batch in data.batches() if ints else ():
        parts = unpack(batch, loaded.inputs) if loaded.inputs else {loaded.input_name: batch}
        for name in ints:
            check_integral(parts[name].numpy(), f"calibration data {calib} (input {name!r})")


def quantize_onnx(path: str, data: str | None, recipe: Recipe, *, trt_cache: str | None = None,
                  progress: bool = True) -> OnnxQuantResult:
    """Quantize the FP32 ONNX file at ``path`` per ``recipe``.

    ``data``: calibration images folder or .npy (required unless ``trt_cache`` is given; with a cache it still
    checks the clean-up and serves parity). ``trt_cache``: a TensorRT calibration cache whose scales are used
    instead of calibrating. Raises QuantkitError subclasses naming the fix (exit 2) on bad input.
    """
    if data is None and trt_cache is None:
        raise UsageError("no calibration data: pass --calib DIR (images) or --calib FILE.npy, or --trt-calib-cache "
                         "FILE; quantkit never calibrates on random data")
    from quantkit.onnxin.npz import npz_shape, npz_shapes

    bmin, _, bmax = parse_batch(recipe.input.batch)
    loaded = load_onnx(path, recipe.input.size, data_shape=npy_shape(data) or npz_shape(data),
                       check_memory=lambda where, shape: check_model_input_memory(
                           recipe, where, shape, batch=None if data is not None else 1),
                       data_shapes=npz_shapes(data), free_batch=bmin != bmax)
    cleaned = cleanup(loaded.model)
    pp = Preprocess.at_size(recipe.preprocess, loaded.size or (640, 640))  # not used for non-image inputs
    cal = None
    sqnr = None
    if data is not None:
        cal, pp = open_data(recipe, str(data), loaded)
        batches = [b.numpy() for b in cal.batches(limit=CLEANUP_CHECK_BATCHES)]
        sqnr = verify_cleanup(loaded.model, cleaned, batches)
    from quantkit.ptq import registered_passes
    from quantkit.ptq.passes import refuse_unrunnable

    refuse_unrunnable(registered_passes(), recipe, OnnxTarget)  # before any work: what this route cannot run
    q = recipe.quantization
    layout = build_layout(cleaned, tuple(q.quantize), tuple(q.skip), q.residual_add)
    if loaded.converted_from is not None:  # said in the report and the log, never done silently
        note = (f"ONNX route: the model's opset {loaded.converted_from} was converted to opset {loaded.opset} with "
                f"onnx.version_converter; outputs on a check input {_db(loaded.conversion_sqnr_db)}")
        layout.notes.insert(0, note)
        log.info(note)
    wscales = weight_scales(cleaned, layout)
    settings = recipe.calibration.settings
    needed = layout.activation_tensors(only_int8=True)
    calib_result, cache_info, trt = None, {"key": None, "hit": False, "path": None, "reason": None}, None
    passes = choice = None
    quant_graph = cleaned  # with a TensorRT cache's scales: the graph as it is
    if trt_cache is not None:
        from quantkit.onnxin.trt_import import import_cache

        def calibrate_missing(tensors: list[str]):  # only for calibration.trt_cache_missing=calibrate
            graph = with_fake_quant_weights(cleaned, layout, wscales)
            weights = sorted({layout.candidates[n].weight[0] for n in layout.int8 if layout.candidates[n].weight})
            result, info = ocal.calibrate_onnx_cached(
                graph, loaded.content, tensors, weights, cal, settings, cache_path=recipe.calibration.cache,
                use_cache=recipe.calibration.use_cache, progress=progress,
                threads=1 if recipe.calibration.deterministic else None)
            return ocal.chosen_amax(result, tensors, settings), result, info

        imported = import_cache(str(trt_cache), cleaned, layout, calibrate_missing,
                                mode=recipe.calibration.trt_cache_missing, data=cal)
        amax, act_scales, calib_result, cache_info = (imported.amax, imported.act_scales, imported.calib,
                                                      imported.cache_info)
        trt = {"path": str(trt_cache), "header": imported.header, "import": imported.as_dict(str(trt_cache))}
    else:
        note = small_set_note(cal)
        if note:  # a TensorRT cache brings its own ranges: the data then only serves checks
            log.warning(note)
            layout.notes.append(note)
        calib_graph = with_fake_quant_weights(cleaned, layout, wscales)
        int8_weights = sorted({layout.candidates[n].weight[0] for n in layout.int8 if layout.candidates[n].weight})
        calib_result, cache_info = ocal.calibrate_onnx_cached(
            calib_graph, loaded.content, layout.activation_tensors(), int8_weights, cal, settings,
            cache_path=recipe.calibration.cache, use_cache=recipe.calibration.use_cache, progress=progress,
            threads=1 if recipe.calibration.deterministic else None)
        target = OnnxTarget(recipe=recipe, fp32=cleaned, graph=cleaned, layout=layout, wscales=wscales,
                            calib=calib_result, needed=needed, settings=settings, amax={}, act_scales={}, data=cal,
                            threads=1 if recipe.calibration.deterministic else None, progress=progress)
        target.set_amax(settings, ocal.chosen_amax(calib_result, needed, settings))
        passes, choice, quant_graph = _run_passes(target)
        settings, amax, act_scales = target.settings, target.amax, target.act_scales
    # model.onnx stays the cleaned FP32 graph; the quantized graphs carry bias correction's biases when it was kept
    int8 = insert_qdq(quant_graph, layout, act_scales, wscales)
    sim = simulate_qdq(quant_graph, layout, act_scales, wscales)
    fp32 = normalize(copy.deepcopy(cleaned))
    del fp32.graph.value_info[:]
    onnx.checker.check_model(fp32)
    log.info("ONNX route: %d of %d quantizable nodes INT8 (%s calibration)", len(layout.int8), len(layout.candidates),
             "TensorRT cache" if trt else method_key(settings))
    return OnnxQuantResult(loaded=loaded, fp32=fp32, fp32_bytes=fp32.SerializeToString(), int8=int8, sim=sim,
                           layout=layout, settings=settings, pp=pp, data=cal, calib=calib_result, chosen_amax=amax,
                           act_scales=act_scales, weight_scales=wscales, cache_info=cache_info,
                           cleanup_sqnr_db=sqnr, trt_cache=trt, passes=passes, choice=choice)


def _run_passes(target: OnnxTarget):
    """The registered PTQ passes (calibration-method choice, FP16 choice, bias correction, then any a user
    registered), each kept only when it raises the check SQNR: the torch route's guard (``ptq.guard.run_passes``)
    on ``target``. Returns (report.json ``passes``, the FP16 choice's analysis or None, the graph to quantize)."""
    from quantkit.ptq import registered_passes
    from quantkit.ptq.guard import run_passes
    from quantkit.ptq.passes import passes_json

    if target.data is None:
        return None, None, target.graph
    run_passes(target, registered_passes())
    return passes_json(target.passes), target.choice, target.graph
