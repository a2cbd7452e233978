"""Printable tables of a sensitivity analysis: ranked layers (dB, mAP points, estimated ms) and the choice."""

from __future__ import annotations

import math

from quantkit.sensitivity.analysis import SensitivityResult
from quantkit.sensitivity.cost_model import ESTIMATE_LABEL, CostTable
from quantkit.sensitivity.select import Selection


def _fmt(v, nd=2) -> str:
    if v is None:
        return "-"
    return ("inf" if v > 0 else "-inf") if math.isinf(v) else f"{round(v, nd) + 0.0:.{nd}f}"  # no "-0.00"


def format_table(result: SensitivityResult, costs: CostTable, top: int) -> str:
    """The ``top`` most damaging layers as a fixed-width text table (dB, mAP points, estimated ms)."""
    head = f"{'#':>3}  {'layer':<48} {'type':<16} {'dmg dB':>8} {'rec dB':>7}"
    if result.has_map:
        head += f" {'dmg mAP':>8} {'rec mAP':>8}"
    head += f" {'+ms fp16*':>9}"
    lines = [head]
    for i, n in enumerate(result.ranking()[:top], 1):
        s = result.layers[n]
        label = n if len(n) <= 48 else "…" + n[-47:]
        row = f"{i:>3}  {label:<48} {s.type:<16} {_fmt(s.damage_sqnr_db):>8} {_fmt(s.recovery_sqnr_db):>7}"
        if result.has_map:
            row += f" {_fmt(s.damage_map_points, 3):>8} {_fmt(s.recovery_map_points, 3):>8}"
        extra = costs.layers[n].fp16_extra_ms(costs.spec) if n in costs.layers else None
        row += f" {_fmt(extra, 4):>9}"
        lines.append(row)
    base = f"all-INT8 output SQNR {_fmt(result.int8_sqnr_db)} dB on {result.num_images} calibration images"
    if result.has_map:
        base += (f"; mAP50:95 FP32 {result.fp32_map50_95:.4f} -> INT8 {result.int8_map50_95:.4f} "
                 f"(drop {result.int8_drop_points:.3f} points, {result.num_eval_images} images)")
    lines += [base, "dmg: only this layer INT8; rec: gained by keeping only this layer in float; "
              "* estimated T4 ms (roofline model, not measured)"]
    return "\n".join(lines)


def format_summary(doc: dict, selection: Selection | None) -> list[str]:
    """Lines after the table: the estimated latencies and, with a budget, the verified FP16 choice."""
    ms = doc["cost_model"]["estimated_ms"]
    lines = [f"{ESTIMATE_LABEL}, batch {doc['cost_model']['batch']}: FP16 {ms['fp16']:.3f} ms, "
             f"all INT8 {ms['int8']:.3f} ms"]
    if selection is not None:
        s = selection.as_dict()
        verdict = {True: "meets", False: "MISSES", None: "not measured against"}[selection.met]
        lines.append(f"FP16 layers ({len(selection.fp16)}): {', '.join(selection.fp16) or 'none'}")
        hybrid = (s.get("estimated_ms") or {}).get("hybrid")
        lines.append(f"measured {s['measured']} {s['unit']}: {verdict} the budget {s['budget']}"
                     + (f"; hybrid {hybrid:.3f} ms ({ESTIMATE_LABEL})" if hybrid is not None else ""))
    return lines
