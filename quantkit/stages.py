"""The pipeline's stages as small functions: model preparation, cached calibration, TensorRT target files,
evaluation. ``pipeline.run_export`` strings them together."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field

import onnx
import torch
from torch import nn

from quantkit import __version__, paths
from quantkit.calibrate.driver import CalibrationResult, run_calibration
from quantkit.calibrate.methods import MethodSettings
from quantkit.data.calib import CalibrationData
from quantkit.data.preprocess import Preprocess
from quantkit.export import parity
from quantkit.quant.functional import expose_residual_adds
from quantkit.quant.insert import QuantLayout, insert_quantizers
from quantkit.quant.tensor_quantizer import TensorQuantizer
from quantkit.recipe import Recipe

log = logging.getLogger("quantkit")


@dataclass
class PreparedModel:
    """The reparameterized FP32 model, its fake-quant copy and the quantization layout."""

    fp32: nn.Module
    qmodel: nn.Module
    layout: QuantLayout
    notes: list[str] = field(default_factory=list)


def prepare_model(recipe: Recipe) -> tuple[PreparedModel, dict]:
    """Build the model named by the recipe (registry name or ``file.py:factory``) and prepare it."""
    from quantkit.models.loading import build_model

    m = recipe.model
    model, info = build_model(m.name, weights=m.weights, num_classes=m.num_classes)
    info_dict = {
        "name": info.name,
        "description": info.description,
        "source": info.source.value,
        "num_classes": info.num_classes,
        "weights": os.path.basename(m.weights) if m.weights else None,
        "parameters": info.num_parameters,
    }
    size = getattr(model, "default_input_size", None) or info.input_size
    return prepare_module(model, recipe, info_dict, size)


def prepare_module(model: nn.Module, recipe: Recipe, info: dict | None = None,
                   size: tuple[int, int] | None = None) -> tuple[PreparedModel, dict]:
    """Reparameterize ``model`` (a copy), expose residual adds, insert quantizers per the recipe's selection."""
    from quantkit.reparam.fuse import find_unfused_batchnorms, reparameterize

    info = dict(info or {"name": type(model).__name__, "source": "python",
                         "parameters": sum(p.numel() for p in model.parameters())})
    size = size or getattr(model, "default_input_size", None)
    model.eval()
    fp32 = reparameterize(model, full_fusion=True)
    if size is not None:
        fp32.default_input_size = tuple(size)
    fp32, notes = expose_residual_adds(fp32)
    unfused = find_unfused_batchnorms(fp32)
    if unfused:
        notes.append(f"{len(unfused)} BatchNorm layer(s) could not be folded: {', '.join(unfused[:10])}")
    q = recipe.quantization
    qmodel, layout = insert_quantizers(fp32, tuple(q.quantize), tuple(q.skip), q.residual_add)
    layout.notes.extend(notes)
    info.update({
        "parameters_deploy": sum(p.numel() for p in fp32.parameters()),
        "quantizable_layers": len(layout.layers),
        "int8_layers": len(layout.int8),
    })
    return PreparedModel(fp32=fp32, qmodel=qmodel, layout=layout, notes=notes), info


def weights_digest(model: nn.Module) -> str:
    """sha256 over the names, shapes and bytes of every state_dict tensor (reparameterized weights)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        if t is None:
            continue
        t = t.detach().cpu().contiguous()
        h.update(name.encode())
        h.update(json.dumps([list(t.shape), str(t.dtype)]).encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return h.hexdigest()


def code_digest(model: nn.Module) -> str:
    """sha256 over the module tree (repr) and the forward source of every module class in it.

    Weights alone do not determine activations: two models with the same parameters but different forward
    code (a user's edit to their model file) must not share a calibration.
    """
    import inspect

    h = hashlib.sha256(repr(model).encode())
    for cls in sorted({type(m) for m in model.modules()}, key=lambda c: f"{c.__module__}.{c.__qualname__}"):
        h.update(f"{cls.__module__}.{cls.__qualname__}".encode())
        code = getattr(cls, "code", None) if isinstance(getattr(cls, "code", None), str) else None
        try:
            code = code or inspect.getsource(cls.forward)
        except (OSError, TypeError):
            code = ""
        h.update(code.encode())
    if hasattr(model, "code") and isinstance(model.code, str):  # torch.fx GraphModule: generated forward
        h.update(model.code.encode())
    return h.hexdigest()


def calibration_key_components(model: PreparedModel, data: CalibrationData, settings: MethodSettings) -> dict:
    """Everything that determines the calibration histograms (and hence every method's amax).

    The pass runs with the INT8 layers' weights fake-quantized and the float layers' weights exact, so which
    layers are INT8 changes the activations downstream: the enabled weight quantizers are part of the key.
    """
    quantizers = [(n, m) for n, m in model.qmodel.named_modules() if isinstance(m, TensorQuantizer)]
    layout = [n for n, m in quantizers if not m.is_per_channel]
    int8_weights = [n for n, m in quantizers if n.endswith("_weight_quantizer") and m.enabled]
    return {
        "weights": weights_digest(model.fp32),
        "model_code": code_digest(model.fp32),
        "quantizer_layout": json.dumps(layout),
        "int8_weights": json.dumps(int8_weights),
        "data": data.fingerprint(),
        "preprocess": json.dumps(data.preprocess.as_dict() if data.preprocess else None, sort_keys=True),
        "settings": json.dumps({"num_bins": settings.num_bins, "percentile": settings.percentile,
                                "start_bin": settings.start_bin, "num_bits": settings.num_bits}, sort_keys=True),
        "quantkit_version": __version__,
    }


def calibrate_cached(model: PreparedModel, data: CalibrationData, settings: MethodSettings, recipe: Recipe,
                     *, progress: bool = True) -> tuple[CalibrationResult, dict]:
    """Calibrate, reusing a cached result with the same content key. Returns (result, cache info for the report)."""
    from quantkit.calibrate.cache import CalibrationCache, cache_key

    components = calibration_key_components(model, data, settings)
    key = cache_key(components)
    info = {"key": key, "hit": False, "path": None, "reason": None}
    cache = None
    if recipe.calibration.use_cache:
        path = recipe.calibration.cache or str(paths.cache_dir() / "calibration" / f"{key[:24]}.json")
        cache = CalibrationCache(path)
        info["path"] = str(path)
        payload = cache.load(key, components)
        if payload is not None:  # the cache logs the hit, or the reason for a miss
            info["hit"] = True
            return CalibrationResult.from_dict(payload), info
        info["reason"] = getattr(cache, "last_reason", None)
    log.info("calibrating on %d inputs from %s", data.num_samples, data.source)
    result = run_calibration(model.qmodel, data.batches(), settings, total=len(data), progress=progress,
                             threads=1 if recipe.calibration.deterministic else None)
    if cache is not None:
        cache.save(key, result.as_dict(), components)
    return result, info


WEIGHTED_TYPES = ("Conv2d", "ConvTranspose2d", "Linear")


def write_target_files(stage, recipe: Recipe, model: PreparedModel, int8_onnx: onnx.ModelProto,
                       refs: parity.References, batch: tuple[int, int, int]) -> dict:
    """Strong (FP16) variant with its parity, lint of every graph, build_engine.sh and, when asked, the engine."""
    from quantkit.engine.config import plan_build
    from quantkit.engine.dispatch import write_dispatch_script
    from quantkit.engine.inspect import onnx_nodes_for_modules
    from quantkit.errors import ExportError
    from quantkit.export.lint import lint
    from quantkit.export.strong import to_strongly_typed

    out: dict = {"lint": {}, "strong": None, "engine": None}
    out["lint"]["model.int8.onnx"] = [f.as_dict() for f in lint(int8_onnx, strong=False)]
    strong = None
    if "strong" in recipe.export.targets:
        strong = to_strongly_typed(int8_onnx)
        strong_bytes = strong.SerializeToString()
        threads = 1 if recipe.calibration.deterministic else None
        sp, s_fp32 = refs.check(parity.session(strong_bytes, threads))
        t_fp32 = refs.quantization()
        # FP16 activations add their own rounding on top of INT8's: judge the strong graph by how far it is
        # from FP32 compared with the fake-quant model, not by bit-level agreement with it.
        worse = max(t_fp32.per_output[n] - s_fp32.per_output[n] for n in refs.names)
        if worse > 3.0:
            raise ExportError(f"model.int8.strong.onnx is {worse:.1f} dB further from FP32 than the fake-quant model "
                              f"({s_fp32.per_output} vs {t_fp32.per_output}). Nothing was written")
        stage.write_bytes("model.int8.strong.onnx", strong_bytes)
        out["lint"]["model.int8.strong.onnx"] = [f.as_dict() for f in lint(strong, strong=True)]
        out["strong"] = {"parity_vs_fakequant": sp.as_dict(), "vs_fp32": s_fp32.as_dict(),
                         "size_bytes": len(strong_bytes)}
    errors = [f for v in out["lint"].values() for f in v if f["severity"] == "error"]
    if errors:
        raise ExportError("Q/DQ lint found errors in quantkit's own export (please report): "
                          + "; ".join(f"{f['node']}: {f['message']}" for f in errors[:5]))
    weak_name, strong_name = "model.int8.onnx", "model.int8.strong.onnx"
    if recipe.export.nms:
        weak_name, strong_name = write_nms_graphs(stage, recipe, int8_onnx, strong, refs.batches[:1])
        out["nms"] = {"weak": weak_name, "strong": strong_name if strong is not None else None,
                      "flavor": recipe.export.nms_flavor}
    fp16_modules = [n for n, t in model.layout.layers.items() if n not in model.layout.int8 and t in WEIGHTED_TYPES]
    fp16_nodes = sorted(onnx_nodes_for_modules(int8_onnx, fp16_modules).values())
    dyn = None if batch[0] == batch[2] else batch
    chw = tuple(int(d) for d in refs.batches[0].shape[1:])
    weak_plan = plan_build("10.0", onnx_is_strong=False, target=recipe.export.target, batch=dyn,
                           fp16_layers=fp16_nodes, chw=chw)
    strong_plan = (plan_build("10.12", onnx_is_strong=True, target=recipe.export.target, batch=dyn, chw=chw)
                   if strong is not None else None)
    write_dispatch_script(stage.path("build_engine.sh"), weak_plan, strong_plan, weak_onnx=weak_name,
                          strong_onnx=strong_name)
    stage.files["build_engine.sh"] = stage.path("build_engine.sh")
    out["fp16_onnx_nodes"] = fp16_nodes
    if recipe.export.engine:
        out["engine"] = build_engine_here(stage, recipe, strong, dyn, fp16_nodes)
    return out


def write_nms_graphs(stage, recipe: Recipe, int8_onnx, strong, sample: list[torch.Tensor]) -> tuple[str, str]:
    """Write model.int8.nms.onnx (recipe's flavor) and model.int8.strong.nms.onnx (ONNX NMS); check they run."""
    from quantkit.export.nms import append_nms

    e = recipe.export
    kw = dict(score_threshold=e.nms_score_threshold, iou_threshold=e.nms_iou_threshold, top_k=e.nms_top_k,
              max_detections=e.nms_max_detections)
    weak = append_nms(int8_onnx, flavor=e.nms_flavor, **kw)
    if e.nms_flavor == "onnx":  # onnxruntime has no EfficientNMS_TRT kernel: only the ONNX flavor can run here
        parity.run_session(parity.session(weak), sample[0].numpy())
    stage.write_bytes("model.int8.nms.onnx", weak.SerializeToString())
    if strong is not None:
        strong_nms = append_nms(strong, flavor="onnx", **kw)
        parity.run_session(parity.session(strong_nms), sample[0].numpy())
        stage.write_bytes("model.int8.strong.nms.onnx", strong_nms.SerializeToString())
    return "model.int8.nms.onnx", "model.int8.strong.nms.onnx"


def check_engine_possible(recipe: Recipe) -> None:
    """Fail fast (before calibrating) when --engine cannot work here: no TensorRT, no GPU, wrong GPU."""
    if not recipe.export.engine:
        return
    from quantkit.engine.builder import cuda_device, import_tensorrt
    from quantkit.engine.config import check_target

    import_tensorrt()
    name, cc = cuda_device()
    check_target(recipe.export.target, cc, name)


def build_engine_here(stage, recipe: Recipe, strong, dyn, fp16_nodes) -> dict:
    """Build the engine with the installed TensorRT (strongly typed from 10.12), inspect its layer precisions."""
    from quantkit.engine.local import build_and_inspect, installed_trt_version, prefers_strong

    use_strong = strong is not None and prefers_strong(installed_trt_version())
    onnx_name = "model.int8.strong.onnx" if use_strong else "model.int8.onnx"
    info = build_and_inspect(stage.path(onnx_name), stage.staging, target=recipe.export.target, batch=dyn,
                             fp16_nodes=fp16_nodes, timing_cache=paths.cache_dir() / "trt-timing.cache",
                             engine_name="model.engine")
    stage.files["model.engine"] = info.pop("engine")
    stage.files["engine.layers.json"] = stage.path("engine.layers.json")
    return info


def evaluate(recipe: Recipe, eval_path: str | None, pp: Preprocess, model: PreparedModel, fp32_bytes: bytes,
             int8_bytes: bytes, *, progress: bool = True, threads: int | None = None) -> dict | None:
    """mAP of FP32 torch, FP32 ONNX and INT8 ONNX (onnxruntime) with one decode + NMS, or None."""
    if not eval_path:
        return None
    from quantkit.eval.coco import CocoDataset
    from quantkit.eval.detection import evaluate_detection, onnx_predictor, torch_predictor

    ev = recipe.evaluation
    ds = CocoDataset(eval_path, max_images=ev.max_images or None)
    kw = dict(conf=ev.conf, iou=ev.iou, progress=progress)
    log.info("evaluating on %s", eval_path)
    res = {
        "data": paths.display_path(eval_path),
        "fp32_torch": evaluate_detection(torch_predictor(model.fp32), ds, pp, **kw).as_dict(),
        "fp32_onnx": evaluate_detection(onnx_predictor(fp32_bytes, intra_op_threads=threads), ds, pp, **kw).as_dict(),
        "int8_onnx": evaluate_detection(onnx_predictor(int8_bytes, intra_op_threads=threads), ds, pp, **kw).as_dict(),
    }
    base = res["fp32_onnx"]["map50_95"]
    res["drop_map50_95_points"] = round(100.0 * (base - res["int8_onnx"]["map50_95"]), 4)
    res["drop_map50_points"] = round(100.0 * (res["fp32_onnx"]["map50"] - res["int8_onnx"]["map50"]), 4)
    return res


def example_batch(state) -> torch.Tensor:
    """One input at the recipe's optimal batch size (for shape-based cost estimates)."""
    from quantkit.recipe import parse_batch

    x = next(state.data.batches(limit=1))[:1]
    return x.expand(parse_batch(state.recipe.input.batch)[1], *x.shape[1:]).contiguous()


def sensitivity_and_selection(state, *, progress: bool = True) -> dict | None:
    """Per-layer sensitivity (when asked) and automatic FP16 selection under the recipe's budget.

    Runs when ``sensitivity.enabled`` or, with ``sensitivity.auto``, when a budget is set (``gates.max_drop``
    with evaluation data, or ``sensitivity.sqnr_floor``). The chosen INT8 set replaces the recipe's selection
    on ``state.model`` (quantizers toggled, layout updated). Returns the report section, or None.
    """
    from quantkit.eval.coco import CocoDataset
    from quantkit.quant.insert import set_precision
    from quantkit.sensitivity.analysis import Metric, analyze, make_measure
    from quantkit.sensitivity.cost_model import layer_costs
    from quantkit.sensitivity.select import choose_fp16_layers

    recipe, s = state.recipe, state.recipe.sensitivity
    drop, floor = recipe.gates.max_drop, s.sqnr_floor
    share = s.min_int8_share  # issue 14: "best accuracy with >= share of the conv/linear MACs in INT8"
    auto = s.auto and ((drop is not None and state.eval_path) or floor is not None or share is not None)
    if not (s.enabled or auto):
        return None
    dataset = CocoDataset(state.eval_path, max_images=recipe.evaluation.max_images or None) if state.eval_path else None
    log.info("sensitivity analysis over %d layers", len(state.model.layout.layers))
    result = analyze(state, num_images=s.num_images, dataset=dataset, progress=progress)
    costs = layer_costs(state.model.fp32, example_batch(state), state.model.layout.layers)
    section = {"analysis": result.as_dict(), "selection": None,
               "note": "mAP sensitivities are measured on the evaluation data with the torch fake-quant model"}
    if auto:
        fixed = [n for n in state.model.layout.layers if n not in state.model.layout.int8]
        if share is not None:  # issue 14: MAC-share budget (gates.max_drop then only gates)
            from quantkit.sensitivity.select import choose_for_int8_share, weighted_macs

            sel = choose_for_int8_share(result, weighted_macs(costs), share, fixed_fp16=fixed)
        elif drop is not None and dataset is not None:
            measure = make_measure(state, Metric.MAP_DROP_POINTS, dataset=dataset)
            sel = choose_fp16_layers(result, costs, max_drop_points=drop, measure=measure, fixed_fp16=fixed)
        else:
            measure = make_measure(state, Metric.SQNR_DB, num_images=s.num_images)
            sel = choose_fp16_layers(result, costs, sqnr_floor_db=floor, measure=measure, fixed_fp16=fixed)
        set_precision(state.model.qmodel, set(sel.int8))
        state.model.layout.int8 = [n for n in state.model.layout.layers if n in set(sel.int8)]
        state.model.layout.reasons = dict(sel.reasons)
        section["selection"] = sel.as_dict()
        log.info("automatic selection: %d layer(s) kept FP16 (%s)", len(sel.fp16), ", ".join(sel.fp16) or "none")
    state.sensitivity, state.costs = result, costs
    return section


def latency_estimate(state) -> dict:
    """Estimated T4 latency (roofline model, not measured) of FP16, full INT8 and the exported selection."""
    from quantkit.sensitivity.cost_model import ESTIMATE_LABEL, estimate_latency_ms, layer_costs

    costs = state.costs or layer_costs(state.model.fp32, example_batch(state), state.model.layout.layers)
    layout = state.model.layout
    ms = {"FP16 (no INT8)": estimate_latency_ms(costs, set()),
          "full INT8": estimate_latency_ms(costs, set(layout.layers)),
          "exported (hybrid)" if len(layout.int8) < len(layout.layers) else "exported": estimate_latency_ms(
              costs, set(layout.int8))}
    return {"ms": {k: round(v, 4) for k, v in ms.items()}, "batch": costs.batch, "label": ESTIMATE_LABEL,
            "note": f"{ESTIMATE_LABEL}: per-layer FLOPs and bytes against T4 peaks (65 TFLOPS FP16, 130 TOPS INT8, "
                    "320 GB/s) with one fitted efficiency factor; no fusion modelling. Measure on a T4 with build_engine.sh."}
