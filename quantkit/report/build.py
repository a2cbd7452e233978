"""report.json, calibration.json, recipe.resolved.yaml, report.md and manifest.json of one export.

report.json and calibration.json are deterministic (same inputs -> same bytes); everything that varies from run
to run (wall time, timestamps, cache hit or miss, host) lives in manifest.json's ``run`` field.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

from quantkit.version import __version__
from quantkit.calibrate.driver import CalibrationResult, method_key
from quantkit.exporter.onnx_export import INPUT_NAME
from quantkit.exporter.passes import qdq_summary
from quantkit.paths import display_path
from quantkit.quant.tensor_quantizer import TensorQuantizer
from quantkit.state import Graphs, QuantState

log = logging.getLogger("quantkit")


@dataclass
class ReportInputs:
    """What one export's report is made of: the calibrated state, the checked graphs, the held-out evaluation
    (None without data), the engine build (None unless ``--engine``) and the command line (for the manifest)."""

    state: QuantState
    graphs: Graphs
    metrics: dict | None = None
    engine: dict | None = None
    command_line: list[str] = field(default_factory=list)


def _r(v: float, nd: int = 6):
    if v is None or (isinstance(v, float) and (math.isinf(v) or math.isnan(v))):
        return None
    return round(float(v), nd)


def layer_table(model, chosen_amax: dict[str, float]) -> list[dict]:
    """One row per quantizable layer: name, type, precision, input amax, weight amax range."""
    rows = []
    modules = dict(model.qmodel.named_modules())
    for name, type_name in model.layout.layers.items():
        m = modules[name]
        row = {"name": name, "type": type_name, "precision": model.layout.precision(name),
               "input_amax": _r(chosen_amax.get(f"{name}._input_quantizer"))}
        if name in model.layout.reasons:
            row["why"] = model.layout.reasons[name]
        wq = getattr(m, "_weight_quantizer", None)
        if isinstance(wq, TensorQuantizer) and wq.amax is not None:
            row["weight_amax_min"] = _r(wq.amax.min().item())
            row["weight_amax_max"] = _r(wq.amax.max().item())
        rows.append(row)
    return rows


@dataclass
class ReportCore:
    """The sections every export's report.json has, whichever route made it: both routes fill this record and
    :func:`core_report` lays it out (the torch route from its state and graphs, the ONNX route from
    ``onnxin.quantize_onnx``'s result). ``fp32_size`` / ``int8_size``: model.onnx / model.int8.onnx in bytes;
    ``strong``: report.json's ``strong`` section (None: not a target)."""

    model: dict
    input: dict
    calibration: dict
    layers: list[dict]
    notes: list[str]
    fp32_size: int
    int8_model: object
    int8_size: int
    parity: dict
    accuracy: dict
    lint: dict
    strong: dict | None = None
    evaluation: dict | None = None
    engine: dict | None = None


def core_report(core: ReportCore) -> dict:
    """report.json's common sections from ``core`` (the routes add their own after: ``ptq``, ``passes``, ...)."""
    sizes = {"model.onnx": core.fp32_size, "model.int8.onnx": core.int8_size}
    if core.strong and core.strong.get("status") == "written":
        sizes["model.int8.strong.onnx"] = core.strong["size_bytes"]
    report = {
        "quantkit_version": __version__,
        "model": core.model,
        "input": core.input,
        "calibration": core.calibration,
        "layers": core.layers,
        "notes": list(core.notes),
        "onnx": {"sizes_bytes": sizes, "int8_size_ratio": _r(core.int8_size / core.fp32_size, 4),
                 "qdq": qdq_summary(core.int8_model)},
        "parity": core.parity,
        "accuracy": core.accuracy,
        "lint": core.lint,
        "evaluation": core.evaluation,
        "engine": core.engine,
    }
    if core.strong is not None:  # written or why not (the weak graph is written either way)
        report["strong"] = core.strong
    return report


def build_report(inputs: ReportInputs, seconds: float) -> dict:
    """Assemble report.json's content (deterministic: no timings, no cache hit flag; those go to ``_run``)."""
    state, graphs = inputs.state, inputs.graphs
    recipe, model, data, cal = state.recipe, state.model, state.data, state.calibration
    strong = graphs.strong_report or {}
    written = strong.get("status") == "written"
    model_info = {**model.info, "int8_layers": len(model.layout.int8), "quantizable_layers": len(model.layout.layers)}
    inp = {"shape": [1, *data.input_shape], "batch": recipe.input.batch, "preprocess": state.pp.as_dict()}
    if data.inputs:  # several named inputs (a .npz): shape is their packed form, inputs what the graphs take
        inp["inputs"] = {name: [1, *shape] for name, shape in data.inputs}
    if data.dtypes:  # inputs saved as integers (token ids): the graphs take them as such
        names = [n for n, _ in data.inputs] if data.inputs else [INPUT_NAME]
        inp["integer_inputs"] = {n: d for n, d in zip(names, data.dtypes) if d}
    report = core_report(ReportCore(
        model=model_info, input=inp,
        calibration={
            "method": cal.method or method_key(recipe.calibration.settings),
            "data": display_path(data.source),
            "kind": data.kind,
            "num_samples": cal.result.num_samples,
            "data_fingerprint": data.fingerprint(),
            "cache_key": cal.cache["key"],
            **({"trt_cache": cal.trt_cache} if cal.trt_cache else {}),
        },
        layers=layer_table(model, cal.chosen_amax), notes=model.layout.notes,
        fp32_size=len(graphs.fp32_bytes), int8_model=graphs.int8, int8_size=len(graphs.int8_bytes),
        parity={
            "int8_onnx_vs_torch_fakequant": graphs.fq_parity.as_dict(),
            "fp32_onnx_vs_torch": graphs.fp32_parity.as_dict(),
            "strong_onnx_vs_torch_fakequant": strong.get("parity_vs_fakequant") if written else None,
        },
        accuracy={"int8_vs_fp32_sqnr_db": graphs.int8_vs_fp32.as_dict(), "sqnr_data": "calibration inputs"},
        lint={name: [f.as_dict() for f in findings] for name, findings in graphs.lint.items()},
        strong=graphs.strong_report, evaluation=inputs.metrics, engine=inputs.engine))
    ptq_seconds = None
    if state.ptq is not None and any(state.ptq.enabled.values()):  # what the accuracy passes did
        report["ptq"] = state.ptq.as_dict()
        ptq_seconds = report["ptq"].pop("seconds")  # wall times vary run to run: the manifest's run record
    if state.passes is not None:  # the guarded steps: tried, kept or reverted, check-image SQNR before/after
        from quantkit.ptq.passes import passes_json

        report["passes"] = passes_json(state.passes)
    if graphs.layers is not None:  # per-layer table, with torch's INT8-vs-FP32 beside onnxruntime's
        report["parity_layers"] = {**graphs.layers.as_dict(),
                                   "torch_int8_vs_fp32_sqnr_db": graphs.refs.quantization().as_dict()}
    report["_run"] = {"seconds": round(seconds, 2), "cache_hit": cal.cache["hit"], "cache_path": cal.cache["path"]}
    if ptq_seconds:
        report["_run"]["ptq_seconds"] = ptq_seconds
    if getattr(state, "passes_seconds", None):  # wall time of each guarded step and of the guard itself
        report["_run"]["passes_seconds"] = {k: round(v, 2) for k, v in state.passes_seconds.items()}
    return report


def calibration_json(calib: CalibrationResult, chosen_amax: dict[str, float], settings, data,
                     method: str | None = None, trt_cache: dict | None = None) -> dict:
    """calibration.json's content; ``method``: the method key chosen per network (None: ``settings``');
    ``trt_cache``: where each scale came from when they were imported (``--trt-calib-cache``)."""
    return {
        "quantkit_version": __version__,
        "method": method or method_key(settings),
        "num_bins": settings.num_bins,
        "data_fingerprint": data.fingerprint(),
        "num_samples": calib.num_samples,
        "amax": {k: _r(v, 8) for k, v in sorted(chosen_amax.items())},
        "all_methods": {k: {m: _r(v, 8) for m, v in sorted(d.items())} for k, d in sorted(calib.tensors.items())},
        **({"trt_cache": trt_cache} if trt_cache else {}),
    }


def write_reports(stage, recipe, report: dict, command_line: list[str], *, calib: CalibrationResult | None = None,
                  chosen_amax: dict[str, float] | None = None, data=None, method: str | None = None,
                  trt_cache: dict | None = None) -> None:
    """Write every report file into the staging folder, manifest last (it hashes the others).
    ``calibration.json`` is written when ``calib`` is given."""
    from quantkit.report.html import render_html
    from quantkit.report.manifest import build_manifest
    from quantkit.report.markdown import render_markdown

    from quantkit.report.next_steps import next_steps

    run = report.pop("_run", {})
    report["next_steps"] = next_steps(target=recipe.export.target, files=sorted(stage.files),
                                      has_eval=bool(report.get("evaluation")))
    if calib is not None:
        stage.write_json("calibration.json", calibration_json(calib, chosen_amax, recipe.calibration.settings, data,
                                                              method, trt_cache))
    stage.write_text("recipe.resolved.yaml", recipe.to_yaml())
    stage.write_json("report.json", report)
    stage.write_text("report.md", render_markdown(report))
    stage.write_text("report.html", render_html(report, stage.staging))
    stage.write_json("manifest.json", build_manifest(stage.staging, recipe, report, command_line, run))


def add_selection_sections(stage, state: QuantState, report: dict) -> None:
    """Latency estimate, sensitivity/selection, the full-INT8 accuracy row and the sensitivity plot."""
    from quantkit.sensitivity import latency_estimate

    report["latency_estimate"] = latency_estimate(state)
    sel = state.selection.section if state.selection else None
    report["sensitivity"] = sel
    if not sel:
        return
    from quantkit.report.plots import NO_CHARTS_NOTE, charts_available, sensitivity_bar_chart_bytes

    fp16 = [n for n in state.model.layout.layers if n not in set(state.model.layout.int8)]  # marked in the chart
    if charts_available():
        stage.write_bytes("sensitivity.png", sensitivity_bar_chart_bytes(state.selection.sensitivity, fp16=fp16))
        report.setdefault("plots", []).append({"file": "sensitivity.png", "title": "Per-layer INT8 sensitivity"})
    elif NO_CHARTS_NOTE not in report["notes"]:
        report["notes"].append(NO_CHARTS_NOTE)
    a = sel["analysis"]
    ev = report.get("evaluation")
    if ev and a.get("int8_map50_95") is not None:
        ev["extra_rows"] = [{"label": "full INT8 before selection (torch fake-quant)",
                             "map50_95": a["int8_map50_95"], "map50": a.get("int8_map50")}]


def add_visual_sections(stage, inputs: ReportInputs, report: dict) -> None:
    """Per-layer error and calibration charts, the reason every FP16 layer is FP16, the INT8 share of MACs and
    the device, measured on the parity inputs."""
    from quantkit.report.sections import VisualInputs, add_to_report, build_visual_sections

    state = inputs.state
    r, cal = state.recipe, state.calibration
    vis = build_visual_sections(VisualInputs(
        fp32=state.model.fp32, qmodel=state.model.qmodel, layout=state.model.layout, calib=cal.result,
        chosen_amax=cal.chosen_amax, method=cal.method or method_key(r.calibration.settings), batches=inputs.graphs.refs.batches,
        quantize=tuple(r.quantization.quantize), skip=tuple(r.quantization.skip),
        costs=state.selection.costs if state.selection else None, device=r.runtime.device,
        threads=1 if r.calibration.deterministic else None))
    for name, data in vis.files.items():
        stage.write_bytes(name, data)
    add_to_report(report, vis)


def add_coverage_section(inputs: ReportInputs, report: dict) -> None:
    """Coverage from the exported graph (``exporter.coverage``): every weighted op of model.int8.onnx INT8 or
    float with a reason; ``int8_mac_share`` becomes the graph's (the torch layers' estimate is kept beside it).
    A float op without a reason leaves its message in ``coverage.error`` (the pipeline then exits 2)."""
    from quantkit.report.sections import fp16_reasons

    state = inputs.state
    layout, q = state.model.layout, state.recipe.quantization
    reasons = fp16_reasons(layout, tuple(q.quantize), tuple(q.skip))
    names = {n for n, _ in state.model.qmodel.named_modules() if n}
    coverage_section(report, inputs.graphs.int8, reasons, wrapped=set(layout.layers), layers=names)


def coverage_section(report: dict, int8_model, reasons: dict[str, str], *, wrapped: set[str],
                     layers: set[str] | None = None) -> None:
    """report.json ``coverage`` and ``int8_mac_share`` from ``int8_model`` (both routes): ``reasons``: why each
    float layer / node is float; ``wrapped``: what quantkit quantizes; ``layers``: the torch module names the
    graph's scopes map to (None: ONNX node names). An earlier ``int8_mac_share`` (the torch layers' estimate)
    is kept as ``torch_layers_share``."""
    from quantkit.exporter.coverage import coverage_failure, graph_coverage

    cov = graph_coverage(int8_model, layers=layers, reasons=reasons)
    torch_share = report.get("int8_mac_share")
    report["int8_mac_share"] = cov.mac_share()
    if torch_share:
        report["int8_mac_share"]["torch_layers_share"] = torch_share.get("share")
    report["coverage"] = cov.as_dict()
    report["coverage"]["error"] = coverage_failure(cov, wrapped=wrapped)
    share = report["int8_mac_share"]["share"]
    log.info("INT8 share of weighted-op MACs in model.int8.onnx: %s (%d of %d weighted ops INT8)",
             "n/a" if share is None else f"{100 * share:.2f} %", report["coverage"]["int8_ops"], len(cov.ops))


def write(stage, inputs: ReportInputs, *, progress: bool = True) -> tuple[dict, list[str]]:
    """The report stage's entry: build report.json's content, judge the recipe's gates, write every report
    file (calibration.json, recipe.resolved.yaml, report.json/.md/.html, plots, manifest.json) into ``stage``.
    Returns (report, gate failures). ``progress``: progress lines through its steps (the per-layer error pass
    and the charts take tens of seconds on a busy machine)."""
    import time

    from quantkit.report.gates import check_gates, gates_section
    from quantkit.utils.progress import progress_bar

    state = inputs.state
    # steps: the sensitivity chart, the per-layer error pass + charts, coverage and the files (measured 5 s,
    # 20 s, 0.2 s)
    with progress_bar(3, "writing the report", "step", enabled=progress, weights=(1, 4, 0.1)) as bar:
        report = build_report(inputs, seconds=time.perf_counter() - state.t0)
        add_selection_sections(stage, state, report)
        bar.update()
        add_visual_sections(stage, inputs, report)
        bar.update()
        add_coverage_section(inputs, report)
        failures = check_gates(state.recipe, report)
        report["gates"] = gates_section(state.recipe, failures)
        write_reports(stage, state.recipe, report, inputs.command_line, calib=state.calibration.result,
                      chosen_amax=state.calibration.chosen_amax, data=state.data, method=state.calibration.method,
                      trt_cache=state.calibration.trt_cache)
        bar.update()
    return report, failures
