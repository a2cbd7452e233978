"""The ONNX route after its front end (``onnxin.quantize_onnx``): checks, graphs, engine plan, evaluation, report
and the staged output folder — the same files as the torch route. It lives beside ``pipeline.py``, not in
``onnxin``, so the front end imports no stage that runs after quantization.

model.onnx (cleaned FP32), model.int8.onnx (weak typing), model.int8.strong.onnx (FP16 + Q/DQ, opset 19),
calibration.json, calibration.cache (TensorRT text format), build_engine.sh, report.json/.md/.html,
recipe.resolved.yaml, manifest.json. Parity: onnxruntime INT8 against ``simulate_qdq`` (the same quantization in
plain float ops, run in onnxruntime) on up to 16 calibration inputs; evaluation with onnxruntime when ``--eval``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from quantkit import paths
from quantkit.version import __version__
from quantkit.calibrate.driver import CalibrationResult, fixed_threads, method_key
from quantkit.errors import ExportError, GateFailure
from quantkit.exporter import parity
from quantkit.output import StagedOutput, check_output_dir
from quantkit.exporter.lint import lint
from quantkit.onnxin.route import OnnxQuantResult, _r, quantize_onnx
from quantkit.recipe import ExportTarget, Recipe, parse_batch
from quantkit.state import ExportResult
from quantkit.report.gates import check_gates, gates_section

log = logging.getLogger("quantkit")

PARITY_SAMPLES = 16
LAYER_ERROR_SAMPLES = 8  # inputs of the per-node error table (the torch route's VisualInputs.max_samples)
WEIGHTED = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def check_parity(res: OnnxQuantResult, batches: list[np.ndarray], floor: float, threads: int | None) -> dict:
    """INT8 graph vs its float Q/DQ twin (must agree), and both vs FP32. ExportError when they disagree."""
    names = [o.name for o in res.int8.graph.output]
    run = lambda model: [parity.run_session(parity.session(model, threads), b) for b in batches]  # noqa: E731
    fp32, sim, int8 = run(res.fp32_bytes), run(res.sim), run(res.int8)
    sig = parity.sigmoid_outputs(res.int8)  # judged on clipped logits (parity.ParityResult.judged_db)
    fq = parity.compare_outputs(sim, int8, names, sig)
    ort_q, sim_q = parity.compare_outputs(fp32, int8, names, sig), parity.compare_outputs(fp32, sim, names, sig)
    # the torch route's rule (parity.judge: at most 3 dB below the reference, SQNRs capped at float agreement
    # so a graph with nothing INT8 is not "inf dB worse"), plus the output floor
    failures = parity.judge(None, ort_q, sim_q)
    if not fq.worst >= floor:
        failures.append(f"worst output SQNR {fq.worst:.1f} dB (floor {floor} dB)")
    if failures:
        raise ExportError("model.int8.onnx disagrees with its float Q/DQ reference: " + "; ".join(failures)
                          + ". Nothing was written; please report this with the model")
    return {"fq": fq, "int8_vs_fp32": ort_q, "reference_vs_fp32": sim_q, "fp32": fp32, "names": names,
            "sigmoid": sig}


def strong_variant(res: OnnxQuantResult, batches: list[np.ndarray] | None, checked: dict | None,
                   threads: int | None, policy=None):
    """(strong ModelProto, bytes, report section), or (None, None, report section saying why) when it cannot be
    converted or is further from FP32 than the reference's INT8 noise plus FP16's own noise explain (the torch
    route's output rule, ``parity.strong_failure``): the weak graph is written either way. No ``batches``:
    converted and linted only. ``policy``: recipe ``export.fp16_overflow`` (None: keep_fp32)."""
    from quantkit.exporter.strong import OverflowPolicy, convert_strongly_typed

    overflow = OverflowPolicy(getattr(policy, "value", policy) or OverflowPolicy.KEEP_FP32.value)
    report = {"status": "failed", "file": None, "failure": None, "fp16_overflow": overflow.value}
    try:
        converted = convert_strongly_typed(res.int8, overflow=overflow)
        fp16_model = convert_strongly_typed(res.fp32, overflow=OverflowPolicy.KEEP_FP32).model if batches else None
    except ExportError as exc:
        report["failure"] = f"cannot convert: {exc}"
        log.warning("model.int8.strong.onnx not written (the weak graph is): %s", report["failure"])
        return None, None, report
    report.update(converted.changes())
    strong = converted.model
    data = strong.SerializeToString()
    written = {"status": "written", "file": "model.int8.strong.onnx", "size_bytes": len(data)}
    if not batches:
        return strong, data, {**report, **written, "vs_fp32": None, "note": "no data: parity not measured"}
    names = checked["names"]

    def vs_fp32(model_bytes: bytes) -> parity.ParityResult:
        got = [parity.run_session(parity.session(model_bytes, threads), b) for b in batches]
        return parity.compare_outputs(checked["fp32"], got, names, checked["sigmoid"])

    s_fp32 = vs_fp32(data)
    fp16_only = vs_fp32(fp16_model.SerializeToString())  # FP16 noise, same converter
    report.update({"vs_fp32": s_fp32.as_dict(), "fp16_alone_vs_fp32": fp16_only.as_dict()})
    failure = parity.strong_failure(checked["reference_vs_fp32"], s_fp32, fp16_only)
    if failure:
        report["failure"] = failure
        log.warning("model.int8.strong.onnx not written (the weak graph is): %s", failure)
        return None, None, report
    return strong, data, {**report, **written}


def write_build_script(stage, recipe: Recipe, res: OnnxQuantResult, has_strong: bool,
                       nms: dict | None = None) -> list[str]:
    """The backend's build scripts for the ONNX route (TensorRT: build_engine.sh; the ``*.nms.onnx`` graphs when
    ``nms`` names them); returns the weighted nodes kept FP16 (trtexec --layerPrecisions)."""
    from quantkit.engine.backend import BuildRequest, get_backend

    fp16 = sorted(n for n, c in res.layout.candidates.items() if n not in res.layout.int8 and c.op_type in WEIGHTED)
    req = BuildRequest(weak_onnx=(nms or {}).get("weak") or "model.int8.onnx",
                       strong_onnx=((nms or {}).get("strong") or "model.int8.strong.onnx") if has_strong else None,
                       fp16_nodes=tuple(fp16), batch=tuple(parse_batch(recipe.input.batch)),
                       sample_shape=tuple(int(d) for d in res.loaded.input_shape[1:]),
                       input_name=res.loaded.input_name, inputs=tuple(res.loaded.inputs or ()))
    get_backend(recipe.export.backend).write_scripts(stage, recipe, req)
    return fp16


def evaluate_onnx(recipe: Recipe, eval_path: str | None, dataset, res: OnnxQuantResult, int8_bytes: bytes,
                  *, progress: bool, threads: int | None) -> dict | None:
    """mAP of the FP32 and INT8 graphs in onnxruntime with the torch route's evaluation (one decode + NMS + COCO
    eval; the FP32 torch row says there is no torch model), or None without evaluation data. ``dataset``: the
    one opened from ``eval_path`` before calibration (``eval.plan.open_evaluation``)."""
    if not eval_path:
        return None
    from quantkit.eval import evaluate_export

    return evaluate_export(dataset, recipe, res.pp, None, res.fp32_bytes, int8_bytes, source=eval_path,
                           progress=progress, threads=threads)


def calibration_json(res: OnnxQuantResult) -> dict:
    """calibration.json in the torch route's layout (keys: ONNX tensor names), plus the scale source."""
    d = {"quantkit_version": __version__, "route": "onnx",
         "method": "trt-calibration-cache" if res.trt_cache else method_key(res.settings),
         "num_bins": res.settings.num_bins,
         "data_fingerprint": res.data.fingerprint() if res.data is not None else None,
         "num_samples": res.calib.num_samples if res.calib is not None else 0,
         "amax": {k: _r(v, 8) for k, v in sorted(res.chosen_amax.items())},
         "scales_hex": {k: _hex(v) for k, v in sorted(res.act_scales.items())},
         "all_methods": ({k: {m: _r(v, 8) for m, v in sorted(d.items())} for k, d in sorted(res.calib.tensors.items())}
                         if res.calib is not None else {})}
    if res.trt_cache:
        d["trt_cache"] = res.trt_cache["import"]  # which tensors came from it, were kept FP16 or calibrated
    return d


def _hex(scale: float) -> str:
    from quantkit.calibrate.trt_cache import scale_to_hex

    return scale_to_hex(scale)


def _param_count(model) -> int:
    """Elements of the float initializers (weights, biases, constants) of a graph."""
    return int(sum(np.prod(t.dims, dtype=np.int64) for t in model.graph.initializer
                   if t.data_type in (1, 10, 11)))


def _conversion(res: OnnxQuantResult) -> dict:
    """The opset conversion, when one ran (absent otherwise: reports of opset-13+ files are unchanged)."""
    c = res.loaded
    if c.converted_from is None:
        return {}
    return {"opset_converted_from": c.converted_from,
            "opset_conversion_sqnr_db": "inf" if c.conversion_sqnr_db == float("inf") else _r(c.conversion_sqnr_db, 3)}


def _integer_inputs(model) -> dict:
    """report.json ``input.integer_inputs`` (name -> numpy dtype name) for graph inputs of an integer type, as
    the torch route writes it for data saved as integers; nothing for an all-float model."""
    import onnx

    inits = {t.name for t in model.graph.initializer}
    ints = {i.name: onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type).name
            for i in model.graph.input if i.name not in inits
            and i.type.tensor_type.elem_type != onnx.TensorProto.FLOAT}
    return {"integer_inputs": ints} if ints else {}


def _layer_rows(res: OnnxQuantResult, recipe: Recipe) -> list[dict]:
    """The layer table, each FP16 node with its reason (the FP16 choice's, a recipe pattern's), as the torch
    route's rows carry ``why``."""
    from quantkit.report.sections import fp16_reasons

    q = recipe.quantization
    why = fp16_reasons(res.layout, tuple(q.quantize), tuple(q.skip))
    return [{**r, "why": why[r["name"]]} if r["name"] in why else r for r in res.layer_table()]


def build_report(recipe: Recipe, res: OnnxQuantResult, int8_bytes: bytes, checked: dict | None, strong: dict | None,
                 lint_out: dict, metrics: dict | None) -> dict:
    """report.json content: the torch route's sections (``report.build.core_report``), then the ONNX route's own
    (``route``, the clean-up's SQNR, the opset conversion, the guarded steps, ``--sensitivity``)."""
    from quantkit.report.build import ReportCore, core_report

    none = {"per_output_db": {}, "overall_db": None, "worst_db": None}
    report = core_report(ReportCore(
        model={"name": Path(res.loaded.path).name, "source": "onnx", "opset": res.loaded.opset, **_conversion(res),
               "sha256_of_file": __import__("hashlib").sha256(res.loaded.raw).hexdigest(),
               "parameters": _param_count(res.loaded.model), "parameters_deploy": _param_count(res.fp32),
               "int8_layers": len(res.layout.int8), "quantizable_layers": len(res.layout.candidates)},
        input={"shape": [1, *res.loaded.input_shape[1:]], "name": res.loaded.input_name,
               "batch": recipe.input.batch, "preprocess": res.pp.as_dict(),
               **({"inputs": {n: [1, *sh] for n, sh in res.loaded.inputs}} if res.loaded.inputs else {}),
               **_integer_inputs(res.loaded.model)},
        calibration={
            "method": "trt-calibration-cache" if res.trt_cache else method_key(res.settings),
            "data": paths.display_path(res.data.source) if res.data is not None else None,
            "kind": res.data.kind if res.data is not None else None,
            "num_samples": res.calib.num_samples if res.calib is not None else 0,
            "data_fingerprint": res.data.fingerprint() if res.data is not None else "none (no data given)",
            "cache_key": res.cache_info.get("key"),
            **({"trt_cache": res.trt_cache["import"]} if res.trt_cache else {}),
        },
        layers=_layer_rows(res, recipe), notes=res.layout.notes,
        fp32_size=len(res.fp32_bytes), int8_model=res.int8, int8_size=len(int8_bytes),
        parity={
            "reference": "the same Q/DQ placement and scales in plain float ops (Div/Round/Clip/Mul, numpy "
                         "fake-quantized weights), run in onnxruntime",
            "int8_onnx_vs_torch_fakequant": checked["fq"].as_dict() if checked else none,
            "fp32_onnx_vs_torch": none,
            "strong_onnx_vs_torch_fakequant": None,
        },
        accuracy={"int8_vs_fp32_sqnr_db": checked["int8_vs_fp32"].as_dict() if checked else none,
                  "sqnr_data": "calibration inputs"},
        lint=lint_out, strong=strong, evaluation=metrics, engine=None))
    report["route"] = "onnx"
    report["onnx"]["cleanup_sqnr_db"] = ("inf" if res.cleanup_sqnr_db == float("inf")
                                         else _r(res.cleanup_sqnr_db, 3))
    if res.passes:
        report["passes"] = res.passes
    if res.sensitivity:
        report["sensitivity"] = res.sensitivity
    return report


def layer_error_sections(res: OnnxQuantResult, batches: list[np.ndarray], threads: int | None):
    """report.json ``layer_errors`` and the two charts (layer_sqnr.png, calibration.png) of the torch route, measured
    on model.int8.onnx against the FP32 graph in onnxruntime (``quantkit.onnx_layer_errors``) on up to
    ``LAYER_ERROR_SAMPLES`` calibration inputs."""
    from quantkit.onnx_layer_errors import measure_graph_layer_errors
    from quantkit.report.sections import VisualSections, error_rows, error_sections, first_samples, worst_tensors

    picked = first_samples(batches, LAYER_ERROR_SAMPLES)
    tensors = res.calib.tensors if res.calib is not None else {}
    upper = {t: max(v.values()) for t, v in tensors.items() if v}
    measured = measure_graph_layer_errors(res.fp32, res.int8, res.layout, res.act_scales, picked, hist_upper=upper,
                                          threads=threads)
    rows = error_rows(measured.layers)
    worst = worst_tensors(rows, measured.histograms, tensors, 4,
                          key=lambda r: res.layout.candidates[r["name"]].act_input[1])
    out = VisualSections()
    method = "trt-calibration-cache" if res.trt_cache else method_key(res.settings)
    error_sections(out, rows, worst, measured.num_samples, method, model="model.int8.onnx, onnxruntime")
    return out


def latency_estimate(res: OnnxQuantResult) -> dict:
    """The torch route's ``latency_estimate`` (T4 roofline ESTIMATE: FP16, full INT8, the export) from the
    graph's candidate nodes (``onnxin.costs``)."""
    from quantkit.onnxin.costs import graph_costs
    from quantkit.sensitivity.cost_model import latency_section

    return latency_section(graph_costs(res.fp32, res.layout), res.layout.candidates, res.layout.int8)


def _open_evaluation(recipe: Recipe):
    """(evaluation data path, its opened data set) or (None, None): the torch route's plan, dependency check and
    opening (``quantkit.eval.plan``), so a COCO folder, images + annotations JSON and a dataset YAML all work and
    fail the same way, before any calibration."""
    from quantkit.eval.plan import open_evaluation, plan_evaluation
    from quantkit.utils.optional_deps import check_optional_deps

    plan = plan_evaluation(recipe)
    check_optional_deps(recipe, evaluation=bool(plan.path))
    if not plan.path:
        return None, None
    return plan.path, open_evaluation(recipe, plan.path, recipe.evaluation.max_images)


def add_coverage(report: dict, res: OnnxQuantResult, recipe: Recipe) -> None:
    """The torch route's coverage from the exported graph (``exporter.coverage``): the INT8 MAC share of
    model.int8.onnx and every float weighted op with its reason (the recipe's patterns, the placement's notes).
    A float op without a reason is reported (report, log) but not fatal here yet: the placement decides which
    nodes it can quantize, and an unplaced one has no ``--skip`` to name it."""
    from quantkit.report.build import coverage_section
    from quantkit.report.sections import fp16_reasons

    q = recipe.quantization
    reasons = fp16_reasons(res.layout, tuple(q.quantize), tuple(q.skip))
    for note in res.layout.notes:  # "<node>: <why it stays float>"
        node, sep, why = note.partition(": ")
        if sep and node not in reasons:
            reasons[node] = "rule: " + why
    coverage_section(report, res.int8, reasons, wrapped=set(res.layout.candidates))
    if report["coverage"]["error"]:
        msg = "ONNX route: " + report["coverage"]["error"].split(". Fix:")[0]
        report["notes"].append(msg)
        log.warning(msg)


def _check_nms_outputs(path: str) -> None:
    """--nms: the graph's outputs are checked before calibrating (a file that does not load is left to the
    loader's own messages)."""
    import onnx

    from quantkit.exporter.nms import check_detector_outputs

    try:
        model = onnx.load(path, load_external_data=False)
    except Exception:  # noqa: BLE001 - quantize_onnx names what is wrong with the file
        return
    check_detector_outputs(model, path)


def run_onnx_export(recipe: Recipe, out_dir: str | Path, *, force: bool = False, progress: bool = True,
                    command_line: list[str] | None = None, trt_cache: str | None = None,
                    inputs: list[str] = ()) -> ExportResult:
    """``quantkit export model.onnx --calib DATA --out DIR``: quantize_onnx, check, write the folder atomically.
    ``inputs``: every path the run reads (``--force`` never replaces a folder that is, holds or sits in one)."""
    from quantkit.calibrate.trt_cache import cache_text_for
    from quantkit.report.build import write_reports

    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    check_output_dir(out_dir, force, inputs)
    from quantkit import engine

    engine.check_possible(recipe)  # --engine: TensorRT and a suitable GPU, before calibrating (as the torch route)
    eval_path, eval_dataset = _open_evaluation(recipe)  # bad evaluation data: exit 2 before calibrating
    if recipe.export.nms:
        _check_nms_outputs(recipe.model.name)
    res = quantize_onnx(recipe.model.name, recipe.calibration.data, recipe, trt_cache=trt_cache, progress=progress)
    if recipe.export.nms:  # before anything is staged: the outputs NMS reads
        from quantkit.exporter.nms import check_detector_outputs

        check_detector_outputs(res.int8, recipe.model.name)
    threads = 1 if recipe.calibration.deterministic else None
    int8_bytes = res.int8.SerializeToString()
    with StagedOutput(out_dir, force, inputs) as stage, fixed_threads(threads):
        checked = strong = strong_model = None
        strong_bytes = batches = None
        lint_out = {"model.int8.onnx": [f.as_dict() for f in lint(res.int8)]}
        if res.data is not None:
            from quantkit.utils.progress import progress_bar

            batches = [b.numpy() for b in res.data.batches(limit=PARITY_SAMPLES)]
            want_strong = ExportTarget.STRONG in recipe.export.targets
            # steps: three graphs in onnxruntime, then (strong) two FP16 graphs: seconds to minutes, silent inside
            with progress_bar(1 + want_strong, "checking parity", "step", enabled=progress, weights=(3, 2)) as bar:
                checked = check_parity(res, batches, recipe.export.parity_min_sqnr, threads)
                bar.update()
                if want_strong:
                    strong_model, strong_bytes, strong = strong_variant(res, batches, checked, threads,
                                                                        recipe.export.fp16_overflow)
                    bar.update()
        elif ExportTarget.STRONG in recipe.export.targets:  # no data: nothing to measure parity on; lint still checks it
            strong_model, strong_bytes, strong = strong_variant(res, None, None, threads, recipe.export.fp16_overflow)
            log.warning("no calibration data given: parity and SQNR are not measured (pass --calib to check them)")
        if strong_bytes is not None:
            lint_out["model.int8.strong.onnx"] = [f.as_dict() for f in lint(strong_model, strong=True)]
        errors = [f for v in lint_out.values() for f in v if f["severity"] == "error"]
        if errors:
            raise ExportError("Q/DQ lint found errors in quantkit's own export (please report): "
                              + "; ".join(f"{f['node']}: {f['message']}" for f in errors[:5]))
        stage.write_bytes("model.onnx", res.fp32_bytes)
        stage.write_bytes("model.int8.onnx", int8_bytes)
        if strong_bytes is not None:
            stage.write_bytes("model.int8.strong.onnx", strong_bytes)
        stage.write_text("calibration.cache", cache_text_for(res.int8))
        nms = None
        if recipe.export.nms:  # the torch route's writer: model.int8.nms.onnx (+ strong), each run once here
            from quantkit.exporter.nms import write_nms_files

            nms = write_nms_files(stage, recipe.export, res.int8, strong_model if strong_bytes is not None else None,
                                  batches[0] if batches else None)
        fp16 = write_build_script(stage, recipe, res, strong_bytes is not None, nms)
        built = None
        if recipe.export.engine:  # --engine: the torch route's builder (TensorRT + GPU checked before calibrating)
            built = engine.build_engine_files(stage, recipe, strong_written=strong_bytes is not None, fp16_nodes=fp16,
                                              batch=parse_batch(recipe.input.batch))
        metrics = evaluate_onnx(recipe, eval_path, eval_dataset, res, int8_bytes, progress=progress, threads=threads)
        report = build_report(recipe, res, int8_bytes, checked, strong, lint_out, metrics)
        report["fp16_onnx_nodes"] = fp16
        if batches:  # per-node error table and charts, as the torch route's report has them
            from quantkit.report.sections import add_to_report

            sections = layer_error_sections(res, batches, threads)
            for name, data in sections.files.items():
                stage.write_bytes(name, data)
            add_to_report(report, sections)
        if recipe.sensitivity.enabled and res.choice is not None:  # --sensitivity: the torch route's chart
            from quantkit.report.plots import sensitivity_bar_chart_bytes

            stage.write_bytes("sensitivity.png", sensitivity_bar_chart_bytes(res.choice.result, fp16=fp16))
            report.setdefault("plots", []).append({"file": "sensitivity.png", "title": "Per-layer INT8 sensitivity"})
        report["engine"] = built
        report["latency_estimate"] = latency_estimate(res)
        add_coverage(report, res, recipe)
        if recipe.gates.max_drop is not None:
            report["notes"].append("ONNX route: --max-drop is a gate only (automatic FP16 selection needs the "
                                   "torch route for now); keep layers float with --skip NODE_NAME_GLOB")
        if recipe.ptq.equalize:  # said, not silently skipped: equalization rescales a torch module's weights
            msg = ("ONNX route: equalization (ptq.equalize) runs on the torch route only for now; this graph is "
                   "calibrated (the calibration method, the FP16 nodes and bias correction chosen per network, each "
                   "checked on held-out calibration images), every other supported node INT8 unless --skip or a "
                   "TensorRT cache without its scale keeps it FP16 (keep nodes float with --skip NODE_NAME_GLOB)")
            report["notes"].append(msg)
            log.info(msg)
        failures = check_gates(recipe, report)
        report["gates"] = gates_section(recipe, failures)
        report["_run"] = {"seconds": round(time.perf_counter() - t0, 2), "cache_hit": res.cache_info.get("hit"),
                          "cache_path": res.cache_info.get("path")}
        stage.write_json("calibration.json", calibration_json(res))
        write_reports(stage, recipe, report, command_line or [])
        files = sorted(stage.files)
    result = ExportResult(out_dir=out_dir, report=report, files=files, gate_failures=failures)
    if failures:
        raise GateFailure("; ".join(failures) + f" (artifacts and report written to {out_dir})", result)
    return result

