"""What each command does, as a list of stage calls. Only strings the stages together: the logic lives in the
stage packages, each behind one entry function; the state between them is the typed dataclasses of
``quantkit.state``.

export:       models.build -> quant.prepare -> data.open_data -> calibrate.calibrate
              -> sensitivity.analyze_and_select -> exporter.write_graphs -> engine.write_calibration_cache
              -> engine.write_build_script [-> engine.build_here] -> eval.evaluate_export -> report.write -> commit
              (an FP32 .onnx model goes to the ONNX front end, onnxin.run_onnx_export, inside the same preflight)
sensitivity:  models.build -> quant.prepare -> data.open_data -> calibrate.calibrate
              -> sensitivity.analyze_and_select
eval:         models.build -> quant.prepare -> eval.evaluate_export (on an export folder's graphs)
build / lint / verify / layers / models: one stage call each (``quantkit.single_commands``, re-exported here).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from quantkit import paths
from quantkit.errors import CoverageError, GateFailure, ModelError, UsageError
from quantkit.eval.plan import EvalPlan, plan_evaluation
from quantkit.models.checks import check_float32, check_outputs
from quantkit.recipe import Recipe, load_recipe, parse_batch
from quantkit.state import ExportResult, QuantState
from quantkit.utils.optional_deps import check_optional_deps
from quantkit.preflight import check_cache, preflight, run_inputs
from quantkit.single_commands import list_layers, list_models, run_build, run_lint, run_verify  # noqa: F401

log = logging.getLogger("quantkit")


def resolve_inputs(recipe: Recipe, plan: EvalPlan | None = None) -> tuple[str, str | None]:
    """(calibration data path, evaluation data path) with the bundled defaults for the bundled model."""
    calib = recipe.calibration.data
    ev = (plan or plan_evaluation(recipe)).path  # a dropped bundled default is logged, not silent
    if recipe.model.name == paths.BUNDLED_MODEL:
        calib = calib or str(paths.BUNDLED_CALIBRATION)
    if calib is None and recipe.calibration.trt_cache:
        raise UsageError("--trt-calib-cache on a torch model still needs --calib DIR (images) or --calib FILE.npy: "
                         "the export checks the graphs against the torch model on them (an FP32 .onnx model can "
                         "take the cache alone)")
    if calib is None:
        raise UsageError("no calibration data: pass --calib DIR (images) or --calib FILE.npy; "
                         "quantkit never calibrates on random data")
    return calib, (ev or None)


def _prepared(recipe: Recipe, model: nn.Module | None, inputs=None, dtypes=None):
    """Build (or take) the model and prepare it; ``inputs`` (a .npz's named inputs): its forward takes them packed
    (``quantkit.data.inputs.adapt_model``), so every stage keeps one tensor per batch; ``dtypes`` (the data's
    integer inputs): its forward gets them back as integers."""
    from quantkit import models, quant
    from quantkit.data.inputs import adapt_model

    if model is None:
        built, info, size = models.build(recipe.model)
        if inputs or dtypes:
            adapt_model(built, inputs, dtypes)
        return quant.prepare(built, recipe.quantization, info, size)
    from quantkit.models.loading import check_eager

    check_eager(model, "the model passed in")
    if inputs or dtypes:
        import copy

        model = adapt_model(copy.deepcopy(model), inputs, dtypes)  # the user's object keeps its class
    return quant.prepare(model, recipe.quantization)


def quantize_recipe(recipe: Recipe, *, model: nn.Module | None = None, calib=None, progress: bool = True,
                    post_ptq: bool = True, plan: EvalPlan | None = None) -> QuantState:
    """Build (or take) the model, prepare it, equalize (``ptq.equalize``), calibrate (reusing the cache), set
    every amax, and run the post-calibration accuracy passes (``recipe.ptq``) unless ``post_ptq`` is False
    (``run_export`` runs them after the automatic FP16 selection instead: they correct INT8 layers only).

    ``calib``: a path, a float32 NCHW array/tensor or an iterable of batches (None: the recipe's).
    ``plan``: the evaluation plan when the caller already made it (it logs a dropped bundled default once)."""
    from quantkit import calibrate
    from quantkit.data import open_data
    from quantkit.ptq import equalize_state_model, ptq_for_state
    from quantkit.utils.device import resolve_device

    resolve_device(recipe.runtime.device)  # --device cuda without CUDA fails before any work
    if calib is not None:
        plan = EvalPlan(recipe.evaluation.data, explicit=True)
    plan = plan or plan_evaluation(recipe)
    calib_path, eval_path = resolve_inputs(recipe, plan) if calib is None else (calib, recipe.evaluation.data)
    check_optional_deps(recipe, evaluation=bool(eval_path))  # fail before any work, with the install hint
    # opened now so bad labels / a YAML without the split fail before calibrating; kept for evaluation
    eval_dataset = _open_eval(recipe, eval_path, recipe.evaluation.max_images) if eval_path else None
    data = None
    if _opens_before_model(calib_path):
        # several named inputs, or integer ones: the model must take them packed (and cast back to integers)
        # before it is prepared (traced, copied)
        data, pp = open_data(calib_path, recipe.calibration, recipe.preprocess, recipe.input.size or (640, 640))
    prepared = _prepared(recipe, model, data.inputs if data is not None else None,
                         data.dtypes if data is not None else None)
    if plan.note:  # report.json's notes say why there is no held-out evaluation
        prepared.layout.notes.append(plan.note)
    size = recipe.input.size or getattr(prepared.fp32, "default_input_size", None) or (640, 640)
    if data is None:
        data, pp = open_data(calib_path, recipe.calibration, recipe.preprocess, size)
    _note_small_set(data, prepared.layout.notes)
    example = next(data.batches(limit=1))[:1]
    check_float32(prepared.fp32)  # a half/double model is told so, not to fix input.size
    try:
        with torch.no_grad():
            outputs = prepared.fp32(example)
    except TypeError as exc:  # forward(input, text): more arguments than the data gives
        from quantkit.models.checks import forward_arguments_hint

        hint = forward_arguments_hint(prepared.fp32, data.inputs)
        if hint is None:
            raise
        raise ModelError(f"the model's forward cannot be called with the calibration data: {exc}. {hint}") from exc
    except (RuntimeError, ValueError) as exc:
        shape = (f"inputs {', '.join(f'{n} {(1, *s)}' for n, s in data.inputs)}" if data.inputs
                 else f"input of shape {tuple(example.shape)}")
        if data.dtypes:  # integers given, maybe to a model that takes floats (un-normalized uint8 images)
            saved = ", ".join(d for d in data.dtypes if d)
            raise ModelError(f"the model rejects the calibration data's {saved} values ({shape}): {exc}. Integer "
                             "arrays reach the model as integers (token ids); for a model that takes floats, save "
                             "them preprocessed as float32 (e.g. arr.astype(np.float32) / 255)") from exc
        raise ModelError(f"the model rejects {shape}: {exc}. Set input.size (or the .npy/.npz shapes) to what the "
                         "model expects") from exc
    prepared, outputs = _flatten_structured_outputs(prepared, outputs, example)
    check_outputs(outputs)  # outputs need a batch axis
    prepared, ptq_report = equalize_state_model(prepared, data, recipe)  # exact FP32 rescale, before calibration
    calibration = calibrate.calibrate(prepared, data, recipe.calibration, progress=progress,
                                      device=recipe.runtime.device)
    state = QuantState(recipe, prepared, data, pp, calibration, eval_path, ptq=ptq_report, eval_dataset=eval_dataset)
    if post_ptq:
        ptq_for_state(state)
    return state


def _opens_before_model(calib) -> bool:
    """True for calibration data the model's forward must be adapted to: a .npz (named inputs), a .npy or array
    of integers (token ids; read from the .npy's header only)."""
    import numpy as np

    if isinstance(calib, (str, Path)):
        name = str(calib).lower()
        if name.endswith(".npz"):
            return True
        if not name.endswith(".npy") or not Path(calib).is_file():
            return False
        try:
            return np.load(calib, mmap_mode="r", allow_pickle=False).dtype.kind in "iub"
        except (ValueError, OSError):
            return False  # open_data reports an unreadable .npy with its own message
    if isinstance(calib, torch.Tensor):
        return not calib.is_floating_point()
    return isinstance(calib, np.ndarray) and calib.dtype.kind in "iub"


def _flatten_structured_outputs(prepared, outputs, example):
    """A forward returning a dict / named tuple / nested lists: both models return its tensors flattened and
    named (``models.outputs``), said in the log and the report. Returns (a new PreparedModel with the flattening
    views and the note; ``prepared`` is not changed, the modules are shared), and the new outputs."""
    from dataclasses import replace

    from quantkit.models.outputs import flatten_outputs, is_flat, output_names

    if is_flat(outputs):
        return prepared, outputs
    names = output_names(outputs)
    note = (f"the model returns a {type(outputs).__name__}: the graphs output its {len(names)} tensor(s) in its "
            f"order, named {', '.join(names)}")
    flat = replace(prepared, fp32=flatten_outputs(prepared.fp32, names), qmodel=flatten_outputs(prepared.qmodel, names),
                   layout=replace(prepared.layout, notes=[*prepared.layout.notes, note]))
    log.info(note)
    with torch.no_grad():
        return flat, flat.fp32(example)


def _note_small_set(data, notes: list[str]) -> None:
    """Warn (log and report note) when calibrating on fewer than MIN_CALIBRATION_IMAGES images."""
    from quantkit.data.calib import small_set_note

    note = small_set_note(data)
    if note:
        log.warning(note)
        notes.append(note)


def export_state(state: QuantState, out_dir: str | Path, *, force: bool = False, progress: bool = True,
                 command_line: list[str] | None = None, inputs: list[str] | None = None) -> ExportResult:
    """Export a quantized state to ``out_dir`` atomically; checks parity, lint, gates.

    inputs: every path the run read (``--force`` never replaces a folder that is, holds or sits inside one);
    None: the state's calibration and evaluation data and the recipe's files."""
    from quantkit import engine, exporter, report
    from quantkit.calibrate.driver import fixed_threads
    from quantkit.eval import evaluate_export
    from quantkit.output import StagedOutput

    recipe, out_dir = state.recipe, Path(out_dir)
    batch = parse_batch(recipe.input.batch)
    threads = 1 if recipe.calibration.deterministic else None  # measured figures independent of core count
    if inputs is None:
        inputs = run_inputs(recipe, calib=str(state.data.source), eval_path=state.eval_path)
    with StagedOutput(out_dir, force, inputs) as stage:
        graphs = exporter.write_graphs(stage, state, progress=progress)
        engine.write_calibration_cache(stage, graphs.int8)
        engine.write_build_script(stage, recipe, graphs, state.model, batch)
        built = engine.build_here(stage, recipe, graphs, state.model, batch) if recipe.export.engine else None
        metrics = None
        if state.eval_path:
            with fixed_threads(threads):
                metrics = evaluate_export(_eval_dataset(state, recipe.evaluation.max_images), recipe, state.pp,
                                          state.model.fp32, graphs.fp32_bytes, graphs.int8_bytes,
                                          source=state.eval_path, progress=progress, threads=threads)
        inputs = report.ReportInputs(state, graphs, metrics, built, command_line or [])
        content, failures = report.write(stage, inputs, progress=progress)
        files = sorted(stage.files)
    result = ExportResult(out_dir=out_dir, report=content, files=files, gate_failures=failures)
    uncovered = (content.get("coverage") or {}).get("error")
    if uncovered:  # never an "INT8" model with float convs nobody chose: exit 2, the files kept to inspect
        raise CoverageError(uncovered + (f"; gates failed too: {'; '.join(failures)}" if failures else "")
                            + f" (artifacts and report written to {out_dir})")
    if failures:
        raise GateFailure("; ".join(failures) + f" (artifacts and report written to {out_dir})", result)
    return result


def _open_eval(recipe: Recipe, path, max_images: int):
    from quantkit.data.sources import open_eval_dataset

    ev = recipe.evaluation
    return open_eval_dataset(path, annotations=ev.annotations, split=ev.split, max_images=max_images or None)


def _eval_dataset(state: QuantState, max_images: int):
    """The evaluation data set (COCO folder, images + COCO JSON, or dataset YAML) capped at ``max_images``
    (0: all), or None without one; the one ``quantize_recipe`` opened when the cap is the recipe's."""
    if not state.eval_path:
        return None
    if state.eval_dataset is not None and max_images == state.recipe.evaluation.max_images:
        return state.eval_dataset
    return _open_eval(state.recipe, state.eval_path, max_images)


def quantize_and_select(recipe: Recipe, *, model: nn.Module | None = None, calib=None, progress: bool = True,
                        plan: EvalPlan | None = None) -> QuantState:
    """What ``quantkit export`` and ``quantkit.quantize`` do before writing anything: :func:`quantize_recipe`,
    then the registered PTQ passes (``ptq.run_default_passes``: calibration-method choice, the automatic FP16
    selection under the recipe's budget (``sensitivity.min_int8_share``, ``gates.max_drop``
    or ``sensitivity.sqnr_floor``; measured on ``sensitivity.num_images`` calibration inputs spread over the set
    and, for an mAP budget, on the evaluation data), then the post-calibration accuracy passes (``recipe.ptq``), which
    correct INT8 layers only and so run after the selection), each kept only when it raises the output SQNR on
    held-out calibration images."""
    from quantkit.ptq import run_default_passes

    state = quantize_recipe(recipe, model=model, calib=calib, progress=progress, post_ptq=False, plan=plan)
    if recipe.calibration.trt_cache:  # the cache's scales as they are: no per-network choice, no FP16 choice
        from quantkit.trt_cache_import import import_trt_cache

        return import_trt_cache(state, recipe.calibration.trt_cache)[0]
    run_default_passes(state, dataset=_eval_dataset(state, recipe.evaluation.max_images),
                       analysis_dataset=_eval_dataset(state, recipe.sensitivity.eval_images), progress=progress)
    return state


def run_export(recipe: Recipe, out_dir: str | Path, *, force: bool = False, progress: bool = True,
               command_line: list[str] | None = None, recipe_path: str | None = None, model_named: bool = True,
               trust_recipe: bool = False) -> ExportResult:
    """Run the whole pipeline for ``recipe`` and write the artifacts into ``out_dir`` atomically.

    ``model_named`` (False: the model comes from ``recipe_path`` alone) and ``trust_recipe``: consent to import
    a ``file.py:factory`` that an output folder's recipe names (``quantkit.models.consent.check_recipe_file``).
    Raises a QuantkitError subclass on bad input (nothing written), ExportError when parity fails (nothing
    written), CoverageError after the artifacts are written when a weighted op of model.int8.onnx runs in float
    with no reason, GateFailure after the artifacts are written when a gate in ``recipe.gates`` fails.
    """
    from quantkit import engine
    from quantkit.models.consent import check_recipe_file
    from quantkit.onnxin.load import is_onnx_path
    from quantkit.output import resolve_target
    from quantkit.utils.outlock import OutputLock

    check_recipe_file(recipe_path, recipe.model.name, model_named, trust_recipe)  # before any import
    if is_onnx_path(recipe.model.name):
        calib, ev = recipe.calibration.data, recipe.evaluation.data  # the ONNX route may run on a TensorRT cache
    else:
        plan = plan_evaluation(recipe)  # made once: it logs a dropped bundled default
        calib, ev = resolve_inputs(recipe, plan)
    # every path the run writes is checked before a long calibration, and --out is locked throughout
    inputs = preflight(recipe, out_dir, force=force, recipe_path=recipe_path, calib=calib, eval_path=ev)
    with OutputLock(resolve_target(out_dir)):
        if is_onnx_path(recipe.model.name):  # an FP32 .onnx file takes the ONNX front end
            from quantkit.pipeline_onnx import run_onnx_export

            return run_onnx_export(recipe, out_dir, force=force, progress=progress, command_line=command_line,
                                   trt_cache=recipe.calibration.trt_cache, inputs=inputs)
        engine.check_possible(recipe)
        state = quantize_and_select(recipe, progress=progress, plan=plan)
        return export_state(state, out_dir, force=force, progress=progress, command_line=command_line,
                            inputs=inputs)


@dataclass
class SensitivityRun:
    """What ``quantkit sensitivity`` produced: sensitivity.json's content, the ranked table (text) and the
    verified FP16 choice (None without a budget)."""

    out_dir: Path
    doc: dict
    table: str
    summary: list[str]
    met: bool | None


def run_sensitivity(recipe: Recipe, out_dir: str | Path, *, force: bool = False, top: int = 15,
                    progress: bool = True, recipe_path: str | None = None, model_named: bool = True,
                    trust_recipe: bool = False) -> SensitivityRun:
    """Per-layer sensitivity of ``recipe``'s model, the T4 cost estimate and, with a budget, the FP16 choice;
    writes sensitivity.json and sensitivity.png into ``out_dir`` atomically. mAP sensitivities use
    ``sensitivity.eval_images`` evaluation images (0: all); an mAP budget is checked on the whole evaluation set
    (``evaluation.max_images``), as ``export`` checks it, so both keep the same FP16 layers."""
    from quantkit import sensitivity
    from quantkit.models.consent import check_recipe_file
    from quantkit.output import StagedOutput, check_output_dir
    from quantkit.report.plots import sensitivity_bar_chart_bytes
    from quantkit.sensitivity.table import format_summary, format_table

    check_recipe_file(recipe_path, recipe.model.name, model_named, trust_recipe)  # before any import (see run_export)
    out = Path(out_dir)
    inputs, own = run_inputs(recipe, recipe_path=recipe_path), ("sensitivity.json", "sensitivity.png")
    check_output_dir(out, force, inputs, own_files=own)  # never replace inputs or foreign files
    check_cache(recipe, inputs)  # never overwrite an input or a foreign file with the calibration cache
    check_optional_deps(recipe, evaluation=False, plot=True)  # sensitivity.png needs matplotlib
    # as in export (quantize_and_select): the analysis and the FP16 choice see the calibrated model before the
    # PTQ passes, and an mAP budget is checked on the whole evaluation set, so both keep the same FP16 layers
    from quantkit.calibrate.driver import fixed_threads
    from quantkit.ptq import run_passes_before

    state = quantize_recipe(recipe, progress=progress, post_ptq=False)
    subset = _eval_dataset(state, recipe.sensitivity.eval_images)
    dataset = _eval_dataset(state, recipe.evaluation.max_images)
    with fixed_threads(1 if recipe.calibration.deterministic else None):
        # the steps export runs before its FP16 choice (the calibration-method choice), then the analysis on the
        # calibration images export's FP16 choice fits on (the held-out check images excluded)
        fit = run_passes_before(state, "fp16_choice", dataset=dataset, analysis_dataset=subset, progress=progress)
        full = state.data
        state.data = fit
        try:
            outcome = sensitivity.analyze_and_select(state, dataset=dataset, analysis_dataset=subset,
                                                     analyze_always=True, progress=progress)
        finally:
            state.data = full
    choice = outcome.choice
    doc = {"model": state.model.info, "sensitivity": outcome.sensitivity.as_dict(),
           "cost_model": outcome.costs.as_dict(), "selection": choice.as_dict() if choice else None}
    png = sensitivity_bar_chart_bytes(outcome.sensitivity, top=top)
    with StagedOutput(out, force, inputs, own_files=own) as stage:
        stage.write_json("sensitivity.json", doc)
        stage.write_bytes("sensitivity.png", png)
    return SensitivityRun(out, doc, format_table(outcome.sensitivity, outcome.costs, top),
                          format_summary(doc, choice), None if choice is None else choice.met)


def run_eval(out_dir: str | Path, data: str | None = None, max_images: int = 0, *, model: str | None = None,
             trust_recipe: bool = False, annotations: str | None = None) -> dict:
    """mAP of the FP32 torch model, model.onnx and model.int8.onnx of an export folder (the recipe it was
    made with rebuilds the torch model); ``data`` defaults to the recipe's (or the bundled) evaluation set.

    A recorded ``file.py:factory`` / ``module:function`` model is imported only when ``model`` names the same
    one again or ``trust_recipe`` is set (``quantkit.models.consent``): reading a folder never runs its code.
    ``annotations``: COCO JSON for a ``data`` images folder (a new ``data`` never reuses the recorded one's)."""
    from dataclasses import replace

    from quantkit.calibrate.driver import fixed_threads
    from quantkit.data import open_data
    from quantkit.eval import evaluate_export
    from quantkit.models.consent import consented_model

    folder = Path(out_dir)
    recipe_file = folder / "recipe.resolved.yaml"
    if not recipe_file.is_file():
        raise UsageError(f"{folder} is not a quantkit export folder (no recipe.resolved.yaml): pass --out of an export")
    recipe = load_recipe(recipe_file)
    spec = consented_model(recipe.model.name, model, trust_recipe, recipe_file)  # before anything is imported
    if spec != recipe.model.name:
        recipe = replace(recipe, model=replace(recipe.model, name=spec))
    if annotations and not data:
        raise UsageError("--eval-annotations needs --eval IMAGES_DIR (the images those annotations describe)")
    if data:  # new evaluation data: the recorded annotations JSON belongs to the recorded data
        recipe = replace(recipe, evaluation=replace(recipe.evaluation, data=str(data), annotations=annotations))
    from quantkit.onnxin.load import is_onnx_path

    if is_onnx_path(recipe.model.name):  # an ONNX-route folder: score its graphs; there is no torch model
        from quantkit.eval.folder import evaluate_onnx_folder

        data_path = data or recipe.evaluation.data
        if not data_path:
            raise UsageError("no evaluation data: pass --eval DIR (COCO: annotations.json + images/) or "
                             "--data data.yaml")
        check_optional_deps(recipe, evaluation=True)
        # one onnxruntime thread when the export used one: the same figures as its report
        return evaluate_onnx_folder(folder, recipe, data_path, max_images,
                                    threads=1 if recipe.calibration.deterministic else None)
    calib_path, default_eval = resolve_inputs(recipe)
    data_path = data or default_eval
    if not data_path:
        raise UsageError("no evaluation data: pass --eval DIR (COCO: annotations.json + images/) or --data data.yaml")
    prepared = _prepared(recipe, None)
    size = recipe.input.size or getattr(prepared.fp32, "default_input_size", None) or (640, 640)
    _, pp = open_data(calib_path, recipe.calibration, recipe.preprocess, size)
    dataset = _open_eval(recipe, data_path, max_images)
    threads = 1 if recipe.calibration.deterministic else None  # the export's figures, reproduced on any machine
    with fixed_threads(threads):
        return evaluate_export(dataset, recipe, pp, prepared.fp32, str(folder / "model.onnx"),
                               str(folder / "model.int8.onnx"), source=data_path, threads=threads)
