"""The ONNX route's ``calibration_method`` pass: the torch route's per-network calibration-rule choice, run on the
graph in onnxruntime (registered for ``OnnxTarget`` by ``onnxin.passes``).

With ``calibration.method: auto`` (the default) each candidate rule (mse, entropy, percentile, max) turns the one
calibration pass's histograms into activation scales; the guard's check measure (``OnnxTarget.checker``: the
float Q/DQ twin against FP32 on the held-out check images, 8 to 64 spread over the set) scores it by the worst
output's raw SQNR, the torch route's measure, and ``ptq.default_passes.pick_method`` keeps max unless a clipping
rule beats it by ``calibration.clip_margin_db`` (the torch route's rule); the step judges itself in that measure
(``PassResult.db_before`` / ``db_after``). The guard's own measure judges a sigmoid output on its clipped logit,
which ranks calibration rules poorly where the check images saturate it: on PP-OCRv4's text detector (check crops
with almost no text) every rule read infinite and the choice fell to the first candidate (mse; held-out text-pixel
F1 0.48), where the raw SQNR picks entropy (0.78). As on the torch route, the histograms saw every calibration
image; the check images only judge.
"""

from __future__ import annotations

import logging

from quantkit.calib_methods import MethodSettings
from quantkit.calibrate.driver import method_key
from quantkit.errors import CalibrationError
from quantkit.ptq.default_passes import CANDIDATE_METHODS, pick_method, pick_reason
from quantkit.ptq.passes import PassData, PassResult

log = logging.getLogger("quantkit")

CANDIDATES = CANDIDATE_METHODS  # the torch route's candidates, in its tie-break order


def choose_method(target, data: PassData) -> PassResult:
    """Set ``target``'s calibration rule to the candidate ``pick_method`` keeps (see the module docstring)."""
    from quantkit.onnxin.calibrate import chosen_amax

    base = target.recipe.calibration.settings  # the starting rule (max) and the histogram settings
    start = method_key(target.settings)
    if data.measure is None:  # nothing held out to choose on
        return PassResult("calibration_method", measured={"note": f"too few images to choose on: the starting "
                                                                   f"rule {start} is used"})
    scores: dict[str, float] = {}
    rules: dict[str, tuple[MethodSettings, dict[str, float]]] = {}
    for m in CANDIDATES:
        settings = MethodSettings(m, percentile=base.percentile, num_bins=base.num_bins)
        key = method_key(settings)
        try:
            amax = chosen_amax(target.calib, target.needed, settings)
        except CalibrationError as exc:  # e.g. a percentile of 0 on a mostly-zero tensor: not a candidate
            log.info("calibration method %s skipped: %s", key, exc)
            continue
        target.set_amax(settings, amax)
        scores[key] = float(data.measure.raw())
        rules[key] = (settings, amax)
    if start not in scores:
        raise CalibrationError(f"calibration method {start} cannot be applied to this model's histograms")
    best = pick_method(scores, target.recipe.calibration.clip_margin_db)
    target.set_amax(*rules[best])
    log.info("calibration method check SQNR: %s", ", ".join(f"{k} {v:.2f} dB" for k, v in scores.items()))
    return PassResult("calibration_method", changed=None if best == start else f"method {start} -> {best}",
                      measured={"check_sqnr_db_by_method": {k: round(v, 3) for k, v in scores.items()},
                                "method": best, "clip_margin_db": target.recipe.calibration.clip_margin_db,
                                "why": pick_reason(scores, best, target.recipe.calibration.clip_margin_db)},
                      db_before=scores[start], db_after=scores[best])


__all__ = ["choose_method", "CANDIDATES"]
