"""The default PTQ passes, in the order they run (each behind the ``quantkit.ptq.passes`` protocol):

1. ``calibration_method`` — per network, the activation amax rule (max / percentile / entropy / mse) whose ranges
   give the best output SQNR on the check images, from the one calibration pass's histograms (no new pass);
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

# the candidate rules, in the order ties are broken (the previous fixed default, mse, first)
CANDIDATE_METHODS = (CalibMethod.MSE, CalibMethod.ENTROPY, CalibMethod.PERCENTILE, CalibMethod.MAX)


class CalibrationMethodPass:
    """Choose the calibration method per network by measured output SQNR on the check images."""

    name, needs = "calibration_method", ("torch",)

    def enabled(self, recipe) -> bool:
        return recipe.calibration.method is CalibMethod.AUTO

    def apply(self, target, data: PassData) -> PassResult:
        cal, qmodel = target.calibration, target.model.qmodel
        base = target.recipe.calibration.settings  # the starting rule (mse) and the histogram settings
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
        best = max(scores, key=lambda k: (scores[k], -list(scores).index(k)))  # ties: earlier candidate
        apply_calibration(qmodel, cal.result, _settings_for(best, base))
        cal.chosen_amax, cal.method = chosen[best], best
        return PassResult(self.name, changed=None if best == start else f"method {start} -> {best}",
                          measured={"check_sqnr_db_by_method": {k: round(v, 3) for k, v in scores.items()},
                                    "method": best}, db_after=scores[best])


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
