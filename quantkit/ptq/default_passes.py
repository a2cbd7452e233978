"""The default PTQ passes, in the order they run (each behind the ``quantkit.ptq.passes`` protocol):

1. ``calibration_method`` — per network, the activation amax rule (max / percentile / entropy / mse) from the one
   calibration pass's histograms (no new pass): max, unless a clipping rule's ranges give an output SQNR on the
   check images at least ``calibration.clip_margin_db`` higher (then the best of them; see ``pick_method``);
2. ``fp16_choice`` — the automatic FP16 choice under the recipe's budget (``sensitivity.analyze_and_select``);
3. ``bias_correction`` — the sequential pass (empirical bias correction, and range choice / learned rounding when
   the recipe asks), on INT8 layers only, so after the FP16 choice.

Their math is the stage functions'; a pass only wraps one and says what it changed and measured. On a target of
another kind (the ONNX route's graph, ``onnxin.target.OnnxTarget``) the guard runs the implementation its front end
registered instead (``ptq.passes.register_implementation``; ``onnxin.passes``), behind the same checks and record.
"""

from __future__ import annotations

import logging

from quantkit.calibrate.driver import apply_calibration, method_key
from quantkit.calib_methods import CalibMethod, MethodSettings
from quantkit.errors import CalibrationError
from quantkit.ptq.passes import PassData, PassResult

log = logging.getLogger("quantkit")

# the candidate rules, in the order ties between clipping rules are broken (mse, the default of earlier releases,
# first); max is the rule the choice starts from and the one a clipping rule must beat by the margin
CANDIDATE_METHODS = (CalibMethod.MSE, CalibMethod.ENTROPY, CalibMethod.PERCENTILE, CalibMethod.MAX)


def pick_method(scores: dict[str, float], margin_db: float) -> str:
    """The rule to keep, from each candidate's check SQNR (dB, ``scores`` in ``CANDIDATE_METHODS`` order, keyed by
    ``method_key``): max, unless the best clipping rule beats max by at least ``margin_db`` dB.

    Why max holds the tie: the check images are calibration images, so a rule fitted to the calibration set's tails
    (percentile, entropy, mse clip them) is measured on data like the data it was fitted to. On the three real
    networks where a clipping rule led max by under 1 dB on the check (MTCNN ONet 0.84, EfficientNet-Lite0 0.76,
    MTCNN RNet 0.65), max scored as well or better on held-out photos (+4.4, +0.7, +0.04 dB); on PP-OCR's direction
    classifier, where percentile led by 1.25 dB, percentile held out 2.0 dB better (and on MTCNN PNet, entropy led by
    2.1 dB and max held out 0.6 dB better). Against it: EfficientNet-Lite0's FP32 ONNX on the ONNX route, where mse
    led by 0.3 dB and held out 1.0 dB better than max. 1 dB is a compromise, not a law (benchmarks/RESULTS.md,
    real-networks). With max unavailable (it failed on this model's histograms) the best check SQNR wins."""
    clip = _best_clipping(scores)
    if "max" not in scores or clip is None:
        return clip or "max"
    return clip if scores[clip] - scores["max"] >= margin_db else "max"


def _best_clipping(scores: dict[str, float]) -> str | None:
    """The clipping rule (not max) with the best check SQNR, ties to the earlier candidate; None if there is none."""
    clips = [k for k in scores if k != "max"]
    return max(clips, key=lambda k: (scores[k], -clips.index(k))) if clips else None


def pick_reason(scores: dict[str, float], chosen: str, margin_db: float) -> str:
    """One line for the report: why ``pick_method`` kept ``chosen``."""
    clip = _best_clipping(scores)
    if "max" not in scores:
        return f"{chosen}: the best check SQNR (max not available)"
    if clip is None:
        return "max: the only rule"
    lead = scores[clip] - scores["max"]
    if chosen == "max":
        return f"max: the best clipping rule ({clip}) led it by {lead:.2f} dB, under the {margin_db:g} dB margin"
    return f"{chosen}: led max by {lead:.2f} dB (margin {margin_db:g} dB)"


class CalibrationMethodPass:
    """Choose the calibration method per network by measured output SQNR on the check images."""

    name, needs = "calibration_method", ("torch",)

    def enabled(self, recipe) -> bool:
        return recipe.calibration.method is CalibMethod.AUTO

    def apply(self, target, data: PassData) -> PassResult:
        cal, qmodel = target.calibration, target.model.qmodel
        base = target.recipe.calibration.settings  # the starting rule (max) and the histogram settings
        start = cal.method or method_key(base)
        if data.measure is None:  # nothing held out to choose on: keep the starting rule
            return PassResult(self.name, changed=None, measured={"note": "too few images to choose on"})
        scores: dict[str, float] = {}
        chosen: dict[str, dict[str, float]] = {}
        for m in CANDIDATE_METHODS:
            settings = MethodSettings(m, percentile=base.percentile, num_bins=base.num_bins)
            key = method_key(settings)
            try:
                chosen[key] = apply_calibration(qmodel, cal.result, settings)
            except CalibrationError as exc:  # e.g. a percentile of 0 on a mostly-zero tensor: not a candidate
                log.info("calibration method %s skipped: %s", key, exc)
                continue
            # the starting rule is what the guard just measured: no forward for it
            scores[key] = data.current_db if key == start and data.current_db is not None else float(data.measure())
        best = pick_method(scores, target.recipe.calibration.clip_margin_db)
        apply_calibration(qmodel, cal.result, _settings_for(best, base))
        cal.chosen_amax, cal.method = chosen[best], best
        return PassResult(self.name, changed=None if best == start else f"method {start} -> {best}",
                          measured={"check_sqnr_db_by_method": {k: round(v, 3) for k, v in scores.items()},
                                    "method": best, "clip_margin_db": target.recipe.calibration.clip_margin_db,
                                    "why": pick_reason(scores, best, target.recipe.calibration.clip_margin_db)},
                          db_after=scores[best])


def _settings_for(key: str, base: MethodSettings) -> MethodSettings:
    method = CalibMethod.PERCENTILE if key.startswith("percentile") else CalibMethod(key)
    return MethodSettings(method, percentile=base.percentile, num_bins=base.num_bins)


class Fp16ChoicePass:
    """The automatic FP16 choice (``sensitivity.analyze_and_select``) under the recipe's budget."""

    name, needs = "fp16_choice", ("torch",)

    def enabled(self, recipe) -> bool:
        from quantkit.sensitivity.run import budget_of

        s = recipe.sensitivity
        return bool(s.enabled or (s.auto and budget_of(recipe, True)))

    def apply(self, target, data: PassData) -> PassResult:
        from quantkit.sensitivity import analyze_and_select
        from quantkit.sensitivity.run import budget_of

        before = list(target.model.layout.int8)
        outcome = analyze_and_select(target, dataset=data.extras.get("dataset"),
                                     analysis_dataset=data.extras.get("analysis_dataset"),
                                     progress=data.extras.get("progress", True))
        fp16 = [n for n in before if n not in set(target.model.layout.int8)]
        sel = outcome.section.get("selection") if outcome else None
        measured = {"fp16_layers": fp16}
        if sel and "int8_mac_share" in sel:
            measured["int8_mac_share"] = sel["int8_mac_share"]
        budget = budget_of(target.recipe, data.extras.get("dataset") is not None)
        return PassResult(self.name, changed=f"{len(fp16)} layer(s) kept FP16" if fp16 else None,
                          measured=measured, required=bool(budget and budget[0] != "min_int8_share"))


class SequentialPtqPass:
    """Empirical bias correction (and range choice / learned rounding when asked) on the INT8 layers."""

    needs = ("torch",)

    def __init__(self) -> None:
        self.name = "bias_correction"

    def enabled(self, recipe) -> bool:
        p = recipe.ptq
        return bool(p.bias_correction or p.range_choice or p.adaround)

    def label(self, recipe) -> str:
        """The steps this pass runs for ``recipe`` (the report names them)."""
        p = recipe.ptq
        return "+".join(k for k, on in (("range_choice", p.range_choice), ("adaround", p.adaround),
                                        ("bias_correction", p.bias_correction)) if on) or self.name  # all off

    def needs_for(self, recipe) -> tuple[str, ...]:
        return self.needs + (("autograd",) if recipe.ptq.adaround else ())

    def apply(self, target, data: PassData) -> PassResult:
        from quantkit.ptq import ptq_for_state

        report = ptq_for_state(target)  # fits on target.data, which the guard points at the fit images
        shifted = sum(1 for r in report.layers.values() if r.bias_shift_abs_mean is not None)
        measured = {"steps": self.label(target.recipe), "bias_corrected_layers": shifted,
                    "layers": len(report.layers)}
        return PassResult(self.name, changed=f"{len(report.layers)} INT8 layer(s) processed" if report.layers
                          else None, measured=measured)


def default_passes() -> list:
    """Fresh instances of the default passes, in order."""
    return [CalibrationMethodPass(), Fp16ChoicePass(), SequentialPtqPass()]
