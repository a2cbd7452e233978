"""report.json, calibration.json, recipe.resolved.yaml, report.md and manifest.json of one export.

report.json and calibration.json are deterministic (same inputs -> same bytes); everything that varies from run
to run (wall time, timestamps, cache hit or miss, host) lives in manifest.json's ``run`` field.
"""

from __future__ import annotations

import math

from quantkit import __version__
from quantkit.paths import display_path
from quantkit.calibrate.driver import CalibrationResult, method_key
from quantkit.quant.tensor_quantizer import TensorQuantizer


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


def build_report(*, recipe, model_info, model, data, pp, settings, calib: CalibrationResult, chosen_amax,
                 cache_info, fp32_bytes, int8_bytes, qdq, fq_parity, fp32_parity, int8_vs_fp32, targets, metrics,
                 seconds) -> dict:
    """Assemble report.json's content (deterministic: no timings, no cache hit flag)."""
    sizes = {"model.onnx": len(fp32_bytes), "model.int8.onnx": len(int8_bytes)}
    if targets.get("strong"):
        sizes["model.int8.strong.onnx"] = targets["strong"]["size_bytes"]
    model_info = {**model_info, "int8_layers": len(model.layout.int8), "quantizable_layers": len(model.layout.layers)}
    report = {
        "quantkit_version": __version__,
        "model": model_info,
        "input": {"shape": [1, *data.input_shape], "batch": recipe.input.batch, "preprocess": pp.as_dict()},
        "calibration": {
            "method": method_key(settings),
            "data": display_path(data.source),
            "kind": data.kind,
            "num_samples": calib.num_samples,
            "data_fingerprint": data.fingerprint(),
            "cache_key": cache_info["key"],
        },
        "layers": layer_table(model, chosen_amax),
        "notes": list(model.layout.notes),
        "onnx": {"sizes_bytes": sizes, "int8_size_ratio": _r(len(int8_bytes) / len(fp32_bytes), 4), "qdq": qdq},
        "parity": {
            "int8_onnx_vs_torch_fakequant": fq_parity.as_dict(),
            "fp32_onnx_vs_torch": fp32_parity.as_dict(),
            "strong_onnx_vs_torch_fakequant": (targets.get("strong") or {}).get("parity_vs_fakequant"),
        },
        "accuracy": {"int8_vs_fp32_sqnr_db": int8_vs_fp32.as_dict(), "sqnr_data": "calibration inputs"},
        "lint": targets.get("lint", {}),
        "evaluation": metrics,
        "engine": targets.get("engine"),
    }
    report["_run"] = {"seconds": round(seconds, 2), "cache_hit": cache_info["hit"], "cache_path": cache_info["path"]}
    return report


def calibration_json(calib: CalibrationResult, chosen_amax: dict[str, float], settings, data) -> dict:
    return {
        "quantkit_version": __version__,
        "method": method_key(settings),
        "num_bins": settings.num_bins,
        "data_fingerprint": data.fingerprint(),
        "num_samples": calib.num_samples,
        "amax": {k: _r(v, 8) for k, v in sorted(chosen_amax.items())},
        "all_methods": {k: {m: _r(v, 8) for m, v in sorted(d.items())} for k, d in sorted(calib.tensors.items())},
    }


def write_reports(stage, recipe, report: dict, calib: CalibrationResult, command_line: list[str], *,
                  settings=None, data=None, chosen_amax=None) -> None:
    """Write every report file into the staging folder, manifest last (it hashes the others)."""
    from quantkit.report.html import render_html
    from quantkit.report.manifest import build_manifest
    from quantkit.report.markdown import render_markdown

    run = report.pop("_run", {})
    if settings is not None:
        stage.write_json("calibration.json", calibration_json(calib, chosen_amax, settings, data))
    stage.write_text("recipe.resolved.yaml", recipe.to_yaml())
    stage.write_json("report.json", report)
    stage.write_text("report.md", render_markdown(report))
    stage.write_text("report.html", render_html(report, stage.staging))
    stage.write_json("manifest.json", build_manifest(stage.staging, recipe, report, command_line, run))
