"""The export pipeline, stage by stage. Only strings the stages together; each stage lives in its package.

quantize:  reparam -> quant -> calibrate (cached)                        -> QuantState (on the qmodel)
export:    ONNX (FP32 + INT8 Q/DQ [+ strong FP16]) -> parity -> lint -> evaluation -> report/manifest
           -> build_engine.sh [-> engine] -> gates
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from quantkit import paths
from quantkit.calibrate.driver import CalibrationResult, apply_calibration, fixed_threads
from quantkit.calibrate.methods import MethodSettings
from quantkit.data.calib import CalibrationData, open_calibration_data
from quantkit.data.preprocess import Preprocess
from quantkit.errors import ExportError, GateFailure, ModelError, UsageError
from quantkit.export import parity
from quantkit.export.artifacts import StagedOutput, check_output_dir
from quantkit.export.onnx_export import export_onnx
from quantkit.export.passes import finalize_fp32, finalize_int8, qdq_summary
from quantkit.recipe import Recipe, parse_batch
from quantkit.stages import (PreparedModel, calibrate_cached, check_engine_possible, evaluate, latency_estimate,
                             prepare_model, prepare_module, sensitivity_and_selection, write_target_files)

log = logging.getLogger("quantkit")

PARITY_SAMPLES = 16  # calibration inputs used for the parity / SQNR checks


@dataclass
class QuantState:
    """Everything ``quantize`` learned, kept on the returned module as ``qmodel.quantkit_state``."""

    recipe: Recipe
    model: PreparedModel
    model_info: dict
    data: CalibrationData
    pp: Preprocess
    settings: MethodSettings
    calib: CalibrationResult
    chosen_amax: dict[str, float]
    cache_info: dict
    eval_path: str | None
    t0: float = field(default_factory=time.perf_counter)
    selection_report: dict | None = None  # sensitivity analysis / automatic FP16 selection, when run
    sensitivity: object = None  # SensitivityResult, when run
    costs: object = None  # the T4 cost table (CostTable), once computed
    ptq: object = None  # quantkit.ptq.PtqReport, once the accuracy passes ran (issue 14)


@dataclass
class ExportResult:
    """What an export produced. ``report`` is the content of report.json."""

    out_dir: Path
    report: dict
    files: list[str] = field(default_factory=list)
    gate_failures: list[str] = field(default_factory=list)


def resolve_inputs(recipe: Recipe) -> tuple[str, str | None]:
    """(calibration data path, evaluation data path) with the bundled defaults for the bundled model."""
    calib = recipe.calibration.data
    ev = recipe.evaluation.data
    if recipe.model.name == paths.BUNDLED_MODEL:
        calib = calib or str(paths.BUNDLED_CALIBRATION)
        if ev is None and paths.BUNDLED_EVAL.exists():
            ev = str(paths.BUNDLED_EVAL)
    if calib is None:
        raise UsageError("no calibration data: pass --calib DIR (images) or --calib FILE.npy; "
                         "quantkit never calibrates on random data")
    return calib, (ev or None)


def open_data(recipe: Recipe, calib_path: str, model_size: tuple[int, int] | None) -> tuple[CalibrationData, Preprocess]:
    """Open the calibration data with the recipe's preprocessing at the model's input size."""
    size = recipe.input.size or model_size or (640, 640)
    p = recipe.preprocess
    pp = Preprocess(size=tuple(size), letterbox=p.letterbox, pad_value=p.pad_value, scale=p.scale,
                    mean=tuple(p.mean), std=tuple(p.std))
    data = open_calibration_data(calib_path, pp, recipe.calibration.batch_size, recipe.calibration.max_images)
    if data.kind == "npy":
        pp = Preprocess(size=data.input_shape[1:], letterbox=p.letterbox, pad_value=p.pad_value, scale=p.scale,
                        mean=tuple(p.mean), std=tuple(p.std))
    return data, pp


def quantize_recipe(recipe: Recipe, *, model: nn.Module | None = None, calib: str | None = None,
                    progress: bool = True, post_ptq: bool = True) -> QuantState:
    """Build (or take) the model, prepare it, calibrate (reusing the cache), set every amax.

    ``post_ptq``: run the post-calibration accuracy passes (``recipe.ptq``) here; run_export passes False and
    runs them after the automatic FP16 selection instead."""
    calib_path, eval_path = resolve_inputs(recipe) if calib is None else (str(calib), recipe.evaluation.data)
    prepared, info = prepare_model(recipe) if model is None else prepare_module(model, recipe)
    data, pp = open_data(recipe, calib_path, getattr(prepared.fp32, "default_input_size", None))
    example = next(data.batches(limit=1))[:1]
    try:
        with torch.no_grad():
            prepared.fp32(example)
    except (RuntimeError, ValueError) as exc:
        raise ModelError(f"the model rejects input of shape {tuple(example.shape)}: {exc}. "
                         "Set input.size (or the .npy shape) to what the model expects") from exc
    settings = MethodSettings(method=recipe.calibration.method, percentile=recipe.calibration.percentile,
                              num_bins=recipe.calibration.num_bins)
    from quantkit.ptq import equalize_state_model, ptq_for_state  # issue 14: accuracy passes

    prepared, ptq_report = equalize_state_model(prepared, data, recipe)  # exact FP32 rescale, before calibration
    calib_result, cache_info = calibrate_cached(prepared, data, settings, recipe, progress=progress)
    chosen = apply_calibration(prepared.qmodel, calib_result, settings)
    state = QuantState(recipe, prepared, info, data, pp, settings, calib_result, chosen, cache_info, eval_path)
    state.ptq = ptq_report
    if post_ptq:
        ptq_for_state(state)
    return state


def export_state(state: QuantState, out_dir: str | Path, *, force: bool = False, progress: bool = True,
                 command_line: list[str] | None = None) -> ExportResult:
    """Export a quantized state to ``out_dir`` atomically; checks parity, lint, gates."""
    recipe, model, data = state.recipe, state.model, state.data
    out_dir = Path(out_dir)
    bmin, bopt, bmax = parse_batch(recipe.input.batch)
    dynamic = not (bmin == bopt == bmax)
    example = next(data.batches(limit=1))[:1]
    with StagedOutput(out_dir, force) as stage:
        log.info("exporting ONNX (FP32 and INT8 Q/DQ)")
        fp32_onnx = finalize_fp32(export_onnx(model.fp32, example, opset=recipe.export.opset, dynamic_batch=dynamic))
        int8_onnx = finalize_int8(export_onnx(model.qmodel, example, opset=recipe.export.opset, dynamic_batch=dynamic))
        fp32_bytes, int8_bytes = fp32_onnx.SerializeToString(), int8_onnx.SerializeToString()

        log.info("checking parity in onnxruntime")
        batches = list(data.batches(limit=PARITY_SAMPLES))
        names = [o.name for o in int8_onnx.graph.output]
        threads = 1 if recipe.calibration.deterministic else None  # measured figures independent of core count
        with fixed_threads(threads):
            refs = parity.References.of(model.fp32, model.qmodel, batches, names)
            fq_parity, int8_vs_fp32 = refs.check(parity.session(int8_bytes, threads))
            _, fp32_parity = refs.check(parity.session(fp32_bytes, threads))
        check_parity(fq_parity, int8_vs_fp32, refs.quantization(), recipe.export.parity_min_sqnr)
        stage.write_bytes("model.onnx", fp32_bytes)
        stage.write_bytes("model.int8.onnx", int8_bytes)
        with fixed_threads(threads):
            targets = write_target_files(stage, recipe, model, int8_onnx, refs, (bmin, bopt, bmax))
            metrics = evaluate(recipe, state.eval_path, state.pp, model, fp32_bytes, int8_bytes, progress=progress,
                               threads=threads)

        from quantkit.report.build import build_report, write_reports

        report = build_report(
            recipe=recipe, model_info=state.model_info, model=model, data=data, pp=state.pp, settings=state.settings,
            calib=state.calib, chosen_amax=state.chosen_amax, cache_info=state.cache_info, fp32_bytes=fp32_bytes,
            int8_bytes=int8_bytes, qdq=qdq_summary(int8_onnx), fq_parity=fq_parity, fp32_parity=fp32_parity,
            int8_vs_fp32=int8_vs_fp32, targets=targets, metrics=metrics, seconds=time.perf_counter() - state.t0,
        )
        add_selection_sections(stage, state, report)
        gate_failures = check_gates(recipe, report)
        report["gates"] = {"max_drop": recipe.gates.max_drop, "min_sqnr": recipe.gates.min_sqnr,
                           "failures": gate_failures, "passed": not gate_failures}
        write_reports(stage, recipe, report, state.calib, command_line or [], settings=state.settings, data=data,
                      chosen_amax=state.chosen_amax)
        files = sorted(stage.files)
    result = ExportResult(out_dir=out_dir, report=report, files=files, gate_failures=gate_failures)
    if gate_failures:
        raise GateFailure("; ".join(gate_failures) + f" (artifacts and report written to {out_dir})")
    return result


def run_export(recipe: Recipe, out_dir: str | Path, *, force: bool = False, progress: bool = True,
               command_line: list[str] | None = None) -> ExportResult:
    """Run the whole pipeline for ``recipe`` and write the artifacts into ``out_dir`` atomically.

    Raises a QuantkitError subclass on bad input (nothing written), ExportError when parity fails (nothing
    written), GateFailure after the artifacts are written when a gate in ``recipe.gates`` fails.
    """
    check_output_dir(Path(out_dir), force)  # before a long calibration, not after it
    check_engine_possible(recipe)
    state = quantize_recipe(recipe, progress=progress, post_ptq=False)
    state.selection_report = sensitivity_and_selection(state, progress=progress)
    from quantkit.ptq import ptq_for_state  # issue 14: after the FP16 selection (the passes touch INT8 layers only)

    ptq_for_state(state)
    return export_state(state, out_dir, force=force, progress=progress, command_line=command_line)


def check_parity(fq, ort_q, torch_q, floor: float) -> None:
    """Fail the export (nothing written) when the INT8 graph does not do what the fake-quant model does."""
    worse = {n: torch_q.per_output[n] - ort_q.per_output[n] for n in ort_q.per_output}
    if not fq.worst >= floor or max(worse.values()) > 3.0:
        raise ExportError(
            f"model.int8.onnx disagrees with the torch fake-quant model: worst output SQNR {fq.worst:.1f} dB "
            f"(floor {floor} dB); INT8-vs-FP32 SQNR onnxruntime {ort_q.per_output} vs torch {torch_q.per_output}. "
            "Nothing was written; please report this with the recipe"
        )


def add_selection_sections(stage, state: QuantState, report: dict) -> None:
    """Latency estimate, sensitivity/selection, the full-INT8 accuracy row and the sensitivity plot."""
    report["latency_estimate"] = latency_estimate(state)
    sel = state.selection_report
    report["sensitivity"] = sel
    if not sel:
        return
    from quantkit.report.plots import sensitivity_bar_chart_bytes

    stage.write_bytes("sensitivity.png", sensitivity_bar_chart_bytes(state.sensitivity))
    report.setdefault("plots", []).append({"file": "sensitivity.png", "title": "Per-layer INT8 sensitivity"})
    a = sel["analysis"]
    ev = report.get("evaluation")
    if ev and a.get("int8_map50_95") is not None:
        ev["extra_rows"] = [{"label": "full INT8 before selection (torch fake-quant)",
                             "map50_95": a["int8_map50_95"], "map50": a.get("int8_map50")}]


def check_gates(recipe: Recipe, report: dict) -> list[str]:
    """Human-readable failures of the recipe's gates against the report's measurements."""
    failures = []
    g = recipe.gates
    if g.min_sqnr is not None:
        sqnr = report["accuracy"]["int8_vs_fp32_sqnr_db"]["worst_db"]
        if sqnr is None or float(sqnr) < g.min_sqnr:
            failures.append(f"INT8-vs-FP32 SQNR {sqnr} dB is below --min-sqnr {g.min_sqnr} dB")
    if g.max_drop is not None:
        ev = report.get("evaluation")
        if not ev:
            failures.append("--max-drop needs evaluation data (--eval DATA) and none was given")
        elif ev["drop_map50_95_points"] > g.max_drop:
            failures.append(f"INT8 mAP50:95 drop {ev['drop_map50_95_points']:.3f} points exceeds --max-drop {g.max_drop}")
    return failures
