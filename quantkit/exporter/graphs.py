"""The export stage's entry: the FP32 and INT8 Q/DQ graphs (and the strongly typed and NMS variants) of a
calibrated model, checked against the torch model in onnxruntime and linted, written into the staging folder.

Nothing is written when a check of the weak graph fails: it does not mean what the fake-quant model computes
(parity), or quantkit's own graph breaks a TensorRT placement rule (lint). The strongly typed graph never costs
the weak one: when it cannot be converted or fails its check it is not written, and ``Graphs.strong_report``
(report.json's ``strong`` section, the log, the --json summary) says why; ``gates.require_strong`` makes that exit 3.
"""

from __future__ import annotations

import logging

import torch

from quantkit.calibrate.driver import fixed_threads
from quantkit.errors import ExportError
from quantkit.exporter import parity
from quantkit.exporter.layer_parity import LayerParity, layer_parity
from quantkit.exporter.lint import Severity, lint
from quantkit.exporter.onnx_export import export_onnx
from quantkit.exporter.passes import finalize_fp32, finalize_int8
from quantkit.recipe import ExportTarget, NmsFlavor, parse_batch
from quantkit.state import Graphs, QuantState
from quantkit.utils.progress import progress_bar

log = logging.getLogger("quantkit")

PARITY_SAMPLES = 16  # calibration inputs used for the parity / SQNR checks
LAYER_PARITY_IMAGES = 1  # images for the layer-by-layer check (it holds every layer's input and output)


def write_graphs(stage, state: QuantState, *, progress: bool = True) -> Graphs:
    """Export, check and write model.onnx, model.int8.onnx and (per the recipe) model.int8.strong.onnx and the
    ``*.nms.onnx`` graphs into ``stage`` (a ``StagedOutput``). Raises ExportError, writing nothing, when a
    check fails. Parity and SQNR figures are in dB on the first ``PARITY_SAMPLES`` calibration inputs.
    ``progress``: a progress line at least every interval through each phase (each takes seconds to minutes)."""
    recipe, model, data = state.recipe, state.model, state.data
    bmin, _, bmax = parse_batch(recipe.input.batch)
    dynamic = bmin != bmax
    example = next(data.batches(limit=1))[:1]
    log.info("exporting ONNX (FP32 and INT8 Q/DQ)")
    opset = recipe.export.opset
    # one torch.onnx.export call per graph, silent inside: the bar's thread keeps the log alive; the Q/DQ graph
    # takes about 3x the float one (measured 2.8 s and 9.6 s on the bundled detector)
    with progress_bar(2, "exporting ONNX", "graph", enabled=progress, weights=(1, 3)) as bar:
        fp32_onnx = finalize_fp32(export_onnx(model.fp32, example, opset=opset, dynamic_batch=dynamic,
                                              inputs=data.inputs, dtypes=data.dtypes))
        bar.update()
        int8_onnx = finalize_int8(export_onnx(model.qmodel, example, opset=opset, dynamic_batch=dynamic,
                                              inputs=data.inputs, dtypes=data.dtypes))
        bar.update()
    fp32_bytes, int8_bytes = fp32_onnx.SerializeToString(), int8_onnx.SerializeToString()

    log.info("checking parity in onnxruntime")
    batches = list(data.batches(limit=PARITY_SAMPLES))
    names = [o.name for o in int8_onnx.graph.output]
    threads = 1 if recipe.calibration.deterministic else None  # measured figures independent of core count
    with fixed_threads(threads):
        # steps: torch FP32 + fake-quant outputs (two models), then each graph in onnxruntime (one model each)
        with progress_bar(3, "checking parity", "step", enabled=progress, weights=(3, 1, 1)) as bar:
            refs = parity.References.of(model.fp32, model.qmodel, batches, names, parity.sigmoid_outputs(int8_onnx))
            bar.update()
            fq_parity, int8_vs_fp32 = refs.check(parity.session(int8_bytes, threads))
            bar.update()
            _, fp32_parity = refs.check(parity.session(fp32_bytes, threads))
            bar.update()
        # the INT8 graph judged layer by layer (structure + replay on the same input), see check_parity
        layers = layer_parity(model.qmodel, int8_onnx, batches[0][:LAYER_PARITY_IMAGES], model.fp32, threads=threads,
                              progress=progress)
    check_parity(fq_parity, int8_vs_fp32, refs.quantization(), recipe.export.parity_min_sqnr, layers)
    stage.write_bytes("model.onnx", fp32_bytes)
    stage.write_bytes("model.int8.onnx", int8_bytes)
    graphs = Graphs(fp32_bytes=fp32_bytes, int8=int8_onnx, int8_bytes=int8_bytes, refs=refs, fq_parity=fq_parity,
                    fp32_parity=fp32_parity, int8_vs_fp32=int8_vs_fp32, layers=layers)
    graphs.lint["model.int8.onnx"] = lint(int8_onnx, strong=False)
    with fixed_threads(threads):
        if ExportTarget.STRONG in recipe.export.targets:
            _write_strong(stage, graphs, fp32_onnx, threads, recipe.export.fp16_overflow,
                          lambda strong: layer_parity(model.qmodel, strong, batches[0][:LAYER_PARITY_IMAGES], model.fp32,
                                                      threads=threads, fp16=True), progress=progress)
    errors = [f for findings in graphs.lint.values() for f in findings if f.severity is Severity.ERROR]
    if errors:
        raise ExportError("Q/DQ lint found errors in quantkit's own export (please report): "
                          + "; ".join(f"{f.node}: {f.message}" for f in errors[:5]))
    if recipe.export.nms:
        graphs.nms = _write_nms(stage, recipe.export, graphs, batches[:1])
    return graphs


def check_parity(fq: parity.ParityResult, ort_q: parity.ParityResult, torch_q: parity.ParityResult,
                 floor: float, layers: LayerParity | None = None) -> None:
    """Fail the export (nothing written) when the INT8 graph does not do what the fake-quant model does.

    With a layer-by-layer comparison (``layers``) the graph is judged by meaning: structure and replay per
    layer, plus onnxruntime's INT8-vs-FP32 SQNR within 3 dB of torch's (infinite SQNRs, when nothing is INT8,
    compare as float agreement). The output-level floor ``floor`` (dB, recipe export.parity_min_sqnr) applies
    only when no quantized layer could be located in the graph: rounding flips that cascade to the outputs of
    a deep network are not refused.
    """
    failures = parity.judge(layers, ort_q, torch_q)
    if (layers is None or not layers.rows) and not fq.worst >= floor:
        failures.append(f"worst output SQNR {fq.worst:.1f} dB (floor {floor} dB)")
    if failures:
        raise ExportError("model.int8.onnx disagrees with the torch fake-quant model: " + "; ".join(failures[:5])
                          + (f" (+{len(failures) - 5} more)" if len(failures) > 5 else "")
                          + ". Nothing was written; please report this with the recipe")


STRONG_FILE = "model.int8.strong.onnx"


def _write_strong(stage, graphs: Graphs, fp32_onnx, threads: int | None, policy, check_layers, *,
                  progress: bool = True) -> None:
    """The strongly typed (FP16) variant, judged per layer (``check_layers``: strong ModelProto -> LayerParity)
    and, at the outputs, relative to noise: INT8's (fake-quant vs FP32) plus FP16's own (the FP32 graph through
    the same converter), see ``parity.strong_failures``. Written only when it passes; reported either way."""
    from quantkit.exporter.strong import OverflowPolicy, convert_strongly_typed

    overflow = OverflowPolicy(getattr(policy, "value", policy))
    report = {"status": "failed", "file": None, "failure": None, "fp16_overflow": overflow.value,
              "criterion": "every quantized layer: FP16-stored torch scales, replay within one step on its FP16 "
                           "input, finite; outputs finite and within INT8 + FP16 noise "
                           f"(+{parity.STRONG_MAX_WORSE_DB_WITH_LAYERS:g} dB margin once layers are checked)"}
    graphs.strong_report = report
    # steps: convert both graphs, run the strong one, run the FP16 reference, check layer by layer (measured
    # about 1, 6, 3 and 5 s on the bundled detector: onnxruntime's FP16 kernels on a CPU dominate)
    with progress_bar(4, "checking the strongly typed graph", "step", enabled=progress,
                      weights=(1, 2, 1, 2)) as bar:
        try:
            converted = convert_strongly_typed(graphs.int8, overflow=overflow)
            report.update(converted.changes())
            f16 = convert_strongly_typed(fp32_onnx, overflow=OverflowPolicy.KEEP_FP32).model  # FP16 noise reference
        except ExportError as exc:
            return _not_written(report, [f"cannot convert: {exc}"])
        bar.update()
        for line in converted.kept_fp32_constants + converted.clamped_constants:
            log.info("strong graph, FP16 range: %s", line)
        strong, strong_bytes = converted.model, converted.model.SerializeToString()
        try:
            sp, s_fp32 = graphs.refs.check(parity.session(strong_bytes, threads))
            bar.update()
            f16_fp32 = graphs.refs.check(parity.session(f16.SerializeToString(), threads))[1]
            bar.update()
            layers = check_layers(strong)
            bar.update()
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises many types; a graph it cannot run is a failure
            return _not_written(report, [f"onnxruntime cannot run it: {type(exc).__name__}: {str(exc)[:300]}"])
    report.update({"parity_vs_fakequant": sp.as_dict(), "vs_fp32": s_fp32.as_dict(),
                   "fp16_alone_vs_fp32": f16_fp32.as_dict(),
                   "layers": {"checked": len(layers.rows), "disagreeing": [r.layer for r in layers.rows if r.disagrees]}})
    failures = parity.strong_failures(layers, graphs.refs.quantization(), s_fp32, f16_fp32)
    findings = lint(strong, strong=True)
    failures += [f"lint {f.node}: {f.message}" for f in findings if f.severity is Severity.ERROR]
    if failures:
        return _not_written(report, failures)
    stage.write_bytes(STRONG_FILE, strong_bytes)
    report.update({"status": "written", "file": STRONG_FILE, "size_bytes": len(strong_bytes)})
    graphs.strong = strong
    graphs.lint[STRONG_FILE] = findings


def _not_written(report: dict, failures: list[str]) -> None:
    """Record why the strong graph is not written (the weak one and the rest are) and warn once."""
    report["failure"] = "; ".join(failures[:5]) + (f" (+{len(failures) - 5} more)" if len(failures) > 5 else "")
    log.warning("%s not written (model.int8.onnx and the rest are): %s", STRONG_FILE, report["failure"])


def _write_nms(stage, spec, graphs: Graphs, sample: list[torch.Tensor]) -> dict:
    """Write model.int8.nms.onnx (the recipe's flavor) and model.int8.strong.nms.onnx (ONNX NMS); check they run."""
    from quantkit.exporter.nms import check_detector_outputs, write_nms_files

    check_detector_outputs(graphs.int8, "the model")  # a message that names the fix, not a Python argument
    return write_nms_files(stage, spec, graphs.int8, graphs.strong, sample[0].numpy())
