"""The ONNX route's calibration-method choice: the torch route's ``calibration_method`` step, run in onnxruntime.

With ``calibration.method: auto`` (the default) each candidate rule (mse, entropy, percentile, max) turns the one
calibration pass's histograms into activation scales; the float Q/DQ twin of the graph (``onnxin.qdq.simulate_qdq``)
is run on the guard's *check* images (``ptq.guard.split_rows``: 8 to 64, spread over the set) and the rule whose
worst output is closest to FP32 (SQNR, dB) is kept, ties going to the earlier candidate. As on the torch route, the
histograms saw every calibration image; the check images only judge. The step is recorded in the report's
``passes`` section in the torch route's format.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from quantkit.calib_methods import CalibMethod, MethodSettings
from quantkit.calibrate.driver import method_key
from quantkit.errors import CalibrationError

log = logging.getLogger("quantkit")

CANDIDATES = (CalibMethod.MSE, CalibMethod.ENTROPY, CalibMethod.PERCENTILE, CalibMethod.MAX)


@dataclass
class MethodChoice:
    """The rule kept (``settings``), its amax per tensor, and the report's ``passes`` section."""

    settings: MethodSettings
    amax: dict[str, float]
    passes: dict = field(default_factory=dict)


def choose_method(cleaned, layout, wscales: dict, calib, needed: list[str], base: MethodSettings, cal,
                  threads: int | None, amax_of, scale_of) -> MethodChoice:
    """Pick the calibration rule for ``cleaned`` (the FP32 ModelProto) as described in the module docstring.

    ``calib``: the calibration pass's histograms; ``needed``: the INT8 activation tensors; ``base``: the starting
    rule (mse) and histogram settings; ``cal``: the calibration data; ``amax_of(calib, needed, settings)`` and
    ``scale_of(amax)``: the route's amax rule and amax -> scale. Fewer than 4 calibration images: the starting rule,
    said in the record."""
    from quantkit.exporter import parity
    from quantkit.onnxin.measure import passes_record, row_batches, run_graph
    from quantkit.onnxin.qdq import simulate_qdq
    from quantkit.ptq.guard import split_rows
    from quantkit.ptq.passes import json_db

    start = method_key(base)
    _, check = split_rows(cal.num_samples)
    record = {"name": "calibration_method", "tried": True, "kept": False, "changed": None,
              "check_sqnr_db_before": None, "check_sqnr_db_after": None, "measured": {}}
    passes = passes_record(cal)
    passes["steps"].append(record)
    if not check:
        record.update(kept=True, verdict=f"kept unchecked: {cal.num_samples} calibration image(s) are too few to "
                                         f"hold any out; the starting rule {start} is used")
        return MethodChoice(base, amax_of(calib, needed, base), passes)
    batches = row_batches(cal, check)
    fp32 = run_graph(cleaned, batches, threads)
    names = [o.name for o in cleaned.graph.output]
    sig = parity.sigmoid_outputs(cleaned)
    scores: dict[str, float] = {}
    amaxes: dict[str, dict[str, float]] = {}
    rules: dict[str, MethodSettings] = {}
    for m in CANDIDATES:
        settings = MethodSettings(m, percentile=base.percentile, num_bins=base.num_bins)
        key = method_key(settings)
        try:
            amax = amax_of(calib, needed, settings)
        except CalibrationError as exc:  # e.g. a percentile of 0 on a mostly-zero tensor: not a candidate
            log.info("calibration method %s skipped: %s", key, exc)
            continue
        outs = run_graph(simulate_qdq(cleaned, layout, {t: scale_of(a) for t, a in amax.items()}, wscales), batches,
                         threads)
        scores[key] = float(parity.compare_outputs(fp32, outs, names, sig).worst)
        amaxes[key], rules[key] = amax, settings
    if start not in scores:
        raise CalibrationError(f"calibration method {start} cannot be applied to this model's histograms")
    best = max(scores, key=lambda k: (scores[k], -list(scores).index(k)))
    record.update(kept=best != start, changed=None if best == start else f"method {start} -> {best}",
                  verdict="kept" if best != start else "no change", check_sqnr_db_before=json_db(scores[start]),
                  check_sqnr_db_after=json_db(scores[best]),
                  measured={"check_sqnr_db_by_method": json_db(scores), "method": best})
    log.info("PTQ step calibration_method: %s (%s dB on the check images; %s)", record["verdict"],
             f"{scores[start]:.2f} -> {scores[best]:.2f}",
             ", ".join(f"{k} {v:.2f}" for k, v in scores.items()))
    return MethodChoice(rules[best], amaxes[best], passes)
