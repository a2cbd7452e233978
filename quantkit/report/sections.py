"""Report sections people look at: where the INT8 error comes from, how the worst tensors were calibrated,
why each FP16 layer is FP16, how much of the conv/linear work runs INT8, and on which device torch ran.

One entry, :func:`build_visual_sections`, measures and draws; :func:`add_to_report` merges the result into
report.json's content (the caller writes ``VisualSections.files`` next to it). Everything is deterministic on
the CPU path (fixed threads, float64 sums, rounded values, byte-stable PNGs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from quantkit.calibrate.driver import CalibrationResult, fixed_threads
from quantkit.quant.insert import QuantLayout
from quantkit.quant.registry import WEIGHTED_KINDS as WEIGHTED_TYPES

LAYER_CHART, CALIB_CHART = "layer_sqnr.png", "calibration.png"


@dataclass
class VisualInputs:
    """What the sections need from a quantized model.

    fp32 / qmodel: the reparameterized FP32 model and its calibrated fake-quant copy (same layer names).
    calib: every method's amax per activation tensor; chosen_amax: the amax in use; method: its key ("entropy").
    batches: a few calibration batches (float32 NCHW) to measure on. quantize / skip: the recipe's patterns
    (to say why a layer is FP16). costs: the T4 cost table if already computed (None: computed here).
    device: where the torch passes run (``cpu`` / ``cuda``); threads: torch threads pinned (1: deterministic).
    worst: how many tensors the calibration chart shows; max_samples: inputs measured (from ``batches``).
    """

    fp32: nn.Module
    qmodel: nn.Module
    layout: QuantLayout
    calib: CalibrationResult
    chosen_amax: dict[str, float]
    method: str
    batches: list[torch.Tensor]
    quantize: tuple[str, ...] = ("*",)
    skip: tuple[str, ...] = ()
    costs: object = None
    device: str = "cpu"
    threads: int | None = 1
    worst: int = 4
    max_samples: int = 8


@dataclass
class VisualSections:
    """``report``: keys to add to report.json; ``why``: FP16 layer -> reason; ``files``: name -> PNG bytes;
    ``plots``: entries for report["plots"] (file, title)."""

    report: dict = field(default_factory=dict)
    why: dict[str, str] = field(default_factory=dict)
    files: dict[str, bytes] = field(default_factory=dict)
    plots: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _r(v, nd: int = 3):
    """Rounded JSON value; +/-inf as the strings "inf"/"-inf" (JSON has no infinity)."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    if isinstance(v, float) and math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return round(float(v), nd)


def _num(v):
    """Back from the JSON form to a float (for charts)."""
    return {"inf": math.inf, "-inf": -math.inf}.get(v, v) if isinstance(v, str) else v


def fp16_reasons(layout: QuantLayout, quantize: tuple[str, ...], skip: tuple[str, ...]) -> dict[str, str]:
    """Why each quantizable layer that is not INT8 stays FP16: the selection's reason when it chose it, else the
    recipe pattern that kept it out (``quantization.skip`` match, or no ``quantization.quantize`` match)."""
    out = {}
    int8 = set(layout.int8)
    for name in layout.layers:
        if name in int8:
            continue
        if name in getattr(layout, "reasons", {}):  # the ONNX route's layout records no selection reasons
            out[name] = layout.reasons[name]
            continue
        hits = [p for p in skip if name in layout.pattern_hits.get(p, ())]
        if hits:
            out[name] = "recipe: matches quantization.skip " + ", ".join(f"'{p}'" for p in hits)
        elif not any(name in layout.pattern_hits.get(p, ()) for p in quantize):
            out[name] = "recipe: matches no quantization.quantize pattern (" + ", ".join(f"'{p}'" for p in quantize) + ")"
        else:
            out[name] = "kept FP16 by the caller (set_precision); no recipe pattern or selection reason recorded"
    return out


def int8_mac_share(costs, layout: QuantLayout) -> dict:
    """Share of the conv/linear multiply-accumulates (per-layer FLOPs / 2 from the cost model) that run INT8."""
    int8 = set(layout.int8)
    total = sum(c.flops for c in costs.layers.values() if c.type in WEIGHTED_TYPES) / 2
    q = sum(c.flops for n, c in costs.layers.items() if c.type in WEIGHTED_TYPES and n in int8) / 2
    return {"int8_macs": int(q), "total_macs": int(total), "share": _r(q / total if total else None, 4),
            "batch": costs.batch, "counted": "conv, conv-transpose and linear layers (residual Adds excluded)"}


def first_samples(batches, n: int) -> list:
    """The first ``n`` samples of ``batches`` (tensors or arrays, batch first), as batches (the last one cut)."""
    out, left = [], n
    for b in batches:
        if left <= 0:
            break
        out.append(b[:left])
        left -= int(out[-1].shape[0])
    return out


def worst_tensors(rows: list[dict], hists, tensors: dict[str, dict[str, float]], n: int, key=None) -> list[dict]:
    """The ``n`` activation tensors with the lowest input quantization SQNR (INT8 layers first), one per
    distinct tensor (quantizers fed the same tensor have the same histogram and amax). ``tensors``: every
    method's amax per tensor key; ``key(row)``: a row's key in ``hists`` and ``tensors`` (default: the torch
    route's ``<layer>._input_quantizer``)."""
    key = key or (lambda r: f"{r['name']}._input_quantizer")
    cands = [r for r in rows if r["input_quant_sqnr_db"] is not None and key(r) in hists]
    int8 = [r for r in cands if r["precision"] == "int8"] or cands
    int8.sort(key=lambda r: (_num(r["input_quant_sqnr_db"]), r["name"]))
    out, seen = [], set()
    for r in int8:
        q = key(r)
        h = hists[q]
        ident = (tuple(h.counts), tuple(sorted(tensors.get(q, {}).items())))
        if ident in seen:
            continue
        seen.add(ident)
        out.append({"name": q, "layer": r["name"], "upper": _r(h.upper, 6), "counts": list(h.counts),
                    "amax": {k: _r(v, 6) for k, v in sorted(tensors.get(q, {}).items())},
                    "input_quant_sqnr_db": r["input_quant_sqnr_db"]})
        if len(out) == n:
            break
    return out


def error_rows(layers) -> list[dict]:
    """report.json ``layer_errors.layers`` rows of measured ``LayerError`` s (rounded, JSON-safe)."""
    return [{"name": e.name, "type": e.type, "precision": e.precision, "output_sqnr_db": _r(e.output_sqnr_db, 2),
             "input_quant_sqnr_db": _r(e.input_quant_sqnr_db, 2)} for e in layers]


def error_sections(out: "VisualSections", rows: list[dict], worst: list[dict], num_samples: int, method: str, *,
                   model: str) -> None:
    """Add ``layer_errors`` and both charts (the layer-error bars, the worst tensors' calibration) to ``out``;
    without matplotlib the charts are left out with a note. ``model``: what "exported" means in the text."""
    from quantkit.report.charts import calibration_chart_bytes, layer_error_chart_bytes
    from quantkit.report.plots import NO_CHARTS_NOTE, charts_available

    out.report["layer_errors"] = {
        "num_samples": num_samples, "data": "calibration inputs", "units": "dB",
        "output_sqnr_db": f"each layer's output in the exported ({model}) model vs the FP32 model, upstream error included",
        "input_quant_sqnr_db": "each layer's input vs that input fake-quantized with its calibrated amax, alone",
        "layers": rows,
        "worst_tensors": [{k: v for k, v in t.items() if k != "counts"} for t in worst],
    }
    if not charts_available():
        out.notes.append(NO_CHARTS_NOTE)
        return
    out.files[LAYER_CHART] = layer_error_chart_bytes(rows, num_samples=num_samples)
    out.plots.append({"file": LAYER_CHART, "title": "Per-layer INT8 vs FP32 error (SQNR, FP16 layers marked)"})
    if worst:
        out.files[CALIB_CHART] = calibration_chart_bytes(worst, chosen_method=method)
        out.plots.append({"file": CALIB_CHART, "title": "Calibration of the worst tensors (histogram and each method's amax)"})


def build_visual_sections(inp: VisualInputs) -> VisualSections:
    """Measure per-layer errors and histograms, draw both charts, and collect the FP16 reasons, the INT8 MAC
    share and the device. Without matplotlib the figures are measured and the charts left out (a note says so)."""
    from quantkit.eval.layer_sqnr import measure_layer_errors
    from quantkit.sensitivity.cost_model import layer_costs
    from quantkit.utils.device import device_label, resolve_device

    dev = resolve_device(inp.device)
    layout = inp.layout
    upper = {q: max(v.values()) for q, v in inp.calib.tensors.items() if v}
    batches = first_samples(inp.batches, inp.max_samples)
    with fixed_threads(inp.threads if dev.type == "cpu" else None):
        res = measure_layer_errors(inp.fp32, inp.qmodel, layout.layers, layout.int8, batches, inp.chosen_amax,
                                   hist_upper=upper, device=dev)
        costs = inp.costs or layer_costs(inp.fp32, batches[0][:1], layout.layers)
    rows = error_rows(res.layers)
    worst = worst_tensors(rows, res.histograms, inp.calib.tensors, inp.worst)
    out = VisualSections(why=fp16_reasons(layout, inp.quantize, inp.skip))
    error_sections(out, rows, worst, res.num_samples, inp.method, model="fake-quant")
    out.report["int8_mac_share"] = int8_mac_share(costs, layout)
    out.report["runtime"] = {"device": device_label(dev),
                             "note": "torch calibration, sensitivity and FP32 torch evaluation ran here; ONNX export, "
                                     "parity and onnxruntime evaluation run on the CPU"}
    return out


def add_to_report(report: dict, sections: VisualSections) -> None:
    """Merge ``sections`` into report.json's content: new keys, a "why" on every FP16 layer row, plots first."""
    report.update(sections.report)
    report.setdefault("notes", []).extend(n for n in sections.notes if n not in report["notes"])
    for row in report.get("layers", []):
        if row.get("precision") != "int8" and not row.get("why") and row["name"] in sections.why:
            row["why"] = sections.why[row["name"]]
    report["plots"] = sections.plots + [p for p in report.get("plots", []) if p["file"] not in sections.files]
