"""Post-training accuracy methods beyond calibration, as separate switchable passes (AIMET-style):

* cross-layer equalization (``equalize``) — exact FP32 rescaling, BEFORE calibration;
* consumer-aware range choice, learned rounding (AdaRound) and empirical bias correction (``sequential``) —
  AFTER calibration, in one sequential pass over the fake-quant model.

Every pass only changes numbers the existing export already writes (input amax -> activation Q/DQ scales,
weights -> int8 initializers, biases -> float Conv/Gemm biases); the Q/DQ structure is unchanged.

After calibration they run as objects behind one protocol (``quantkit.ptq.passes``), in the order of its
registry: calibration-method choice, the automatic FP16 choice, then the sequential pass (``default_passes``), each
kept only when it raises the output SQNR on held-out calibration images (``quantkit.ptq.guard``)::

    prepared, report = equalize_state_model(prepared, data, recipe)   # before calibration (recipe.ptq.equalize)
    state = QuantState(..., calibrate.calibrate(prepared, data, recipe.calibration), ptq=report)
    run_default_passes(state)                                          # state.passes: what was kept, with dB
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from quantkit.calibrate.driver import CalibrationResult
from quantkit.ptq.default_passes import default_passes
from quantkit.ptq.equalize import ChannelClip, EqualizePair, equalize
from quantkit.ptq.passes import PassResult, PtqPass, register_pass, registered_passes
from quantkit.ptq.sequential import LayerPtq, SequentialOptions, sequential_pass
from quantkit.quant.tensor_quantizer import TensorQuantizer, weight_amax


@dataclass
class PtqReport:
    """What the PTQ passes did. ``seconds``: wall time per pass. ``amax``: activation quantizer -> final amax
    (None when no pass changed any). ``layers``: per-layer record of the sequential pass."""

    enabled: dict[str, bool] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    pairs: list[EqualizePair] = field(default_factory=list)
    layers: dict[str, LayerPtq] = field(default_factory=dict)
    amax: dict[str, float] | None = None
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        rounding = [r.rounding for r in self.layers.values() if r.rounding is not None]
        return {
            "enabled": dict(self.enabled),
            "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
            "equalized_pairs": [p.as_dict() for p in self.pairs],
            "range_choice_changed": sum(1 for r in self.layers.values()
                                        if r.amax_source not in (None, "calibrated")),
            "rounding_kept": sum(r.kept for r in rounding), "rounding_layers": len(rounding),
            "layers": {n: r.as_dict() for n, r in self.layers.items()},
            "notes": list(self.notes),
        }


def options_from_spec(spec) -> SequentialOptions:
    """SequentialOptions from a ``recipe.PtqSpec``."""
    return SequentialOptions(range_choice=spec.range_choice, range_choice_images=spec.range_choice_images,
                             adaround=spec.adaround, adaround_iterations=spec.adaround_iterations,
                             adaround_seconds=spec.adaround_seconds, bias_correction=spec.bias_correction)


def equalize_prepared(prepared, batches: list[torch.Tensor], spec, quantization):
    """Cross-layer equalization of ``prepared.fp32`` (when ``spec.equalize``), quantizers re-inserted per
    ``quantization`` (a ``recipe.QuantizationSpec``). Returns (PreparedModel, PtqReport).

    Run before calibration: the calibration cache keys on the (equalized) FP32 weights, so equalized and plain
    models never share a cache entry. FP32 outputs are unchanged (float rounding only).
    """
    from quantkit.quant.insert import insert_quantizers
    from quantkit.state import PreparedModel

    report = PtqReport(enabled={"equalize": bool(spec.equalize)})
    if not spec.equalize:
        return prepared, report
    t0 = time.perf_counter()
    fp32, pairs, notes = equalize(prepared.fp32, batches[: max(1, spec.num_images)])
    report.pairs, report.notes = pairs, list(notes)
    if pairs:
        qmodel, layout = insert_quantizers(fp32, tuple(quantization.quantize), tuple(quantization.skip),
                                           quantization.residual_add)
        layout.notes.extend(prepared.layout.notes)
        layout.reasons.update(prepared.layout.reasons)
        prepared = PreparedModel(fp32=fp32, qmodel=qmodel, layout=layout, notes=prepared.notes + notes,
                                 info=prepared.info)
    report.seconds["equalize"] = time.perf_counter() - t0
    return prepared, report


def apply_ptq(prepared, calib: CalibrationResult, batches: list[torch.Tensor], spec,
              report: PtqReport | None = None, *, progress: bool = True) -> PtqReport:
    """The post-calibration passes (range choice, learned rounding, bias correction) on ``prepared.qmodel``,
    in place, on the first ``spec.num_images`` rows of ``batches``. Call after ``apply_calibration``.
    Returns the report (extending ``report`` from :func:`equalize_prepared` when given)."""
    report = report or PtqReport()
    opts = options_from_spec(spec)
    report.enabled.update({"range_choice": opts.range_choice, "adaround": opts.adaround,
                           "bias_correction": opts.bias_correction})
    if not opts.any:
        return report
    x = torch.cat(list(batches), 0)[: spec.num_images]
    t0 = time.perf_counter()
    report.layers = sequential_pass(prepared.qmodel, prepared.fp32, x, calib, opts, progress=progress)
    report.seconds["sequential"] = time.perf_counter() - t0
    if opts.range_choice:
        report.amax = {n: float(q.amax) for n, q in prepared.qmodel.named_modules()
                       if isinstance(q, TensorQuantizer) and not q.is_per_channel and q.amax is not None}
    return report


def equalize_state_model(prepared, data, recipe):
    """Pipeline hook before calibration: :func:`equalize_prepared` on the first ``recipe.ptq.num_images``
    calibration inputs. Returns (PreparedModel, PtqReport); a no-op unless ``recipe.ptq.equalize``."""
    if not recipe.ptq.equalize:
        return prepared, PtqReport(enabled={"equalize": False})
    from quantkit.calibrate.driver import fixed_threads

    with fixed_threads(1 if recipe.calibration.deterministic else None):
        batches = list(data.batches(limit=recipe.ptq.num_images, spread=True))
        return equalize_prepared(prepared, batches, recipe.ptq, recipe.quantization)


def ptq_for_state(state, *, progress: bool = True) -> PtqReport:
    """Pipeline hook after calibration AND after any automatic FP16 selection (the passes only touch INT8
    layers, and a layer switched to FP16 afterwards would keep an INT8-only correction): :func:`apply_ptq` on a
    ``state.QuantState``; updates ``state.calibration.chosen_amax`` with the chosen ranges, sets ``state.ptq``."""
    from quantkit.calibrate.driver import fixed_threads

    spec = state.recipe.ptq
    report = getattr(state, "ptq", None)
    if getattr(report, "layers", None):  # already applied (idempotence: never correct twice)
        return report
    with fixed_threads(1 if state.recipe.calibration.deterministic else None):
        batches = list(state.data.batches(limit=spec.num_images, spread=True))
        report = apply_ptq(state.model, state.calibration.result, batches, spec, report, progress=progress)
    if report.amax:
        cal = state.calibration
        cal.chosen_amax = {n: report.amax.get(n, a) for n, a in cal.chosen_amax.items()}
    state.ptq = report
    return report


def run_default_passes(state, *, dataset=None, analysis_dataset=None, progress: bool = True) -> list:
    """The registered passes (calibration-method choice, FP16 choice, bias correction, then any a user
    registered), each kept only when it raises the output SQNR on held-out calibration images
    (``quantkit.ptq.guard``). ``dataset``/``analysis_dataset``: evaluation data for an mAP budget of the FP16 choice.
    Returns the per-pass results (also ``state.passes``)."""
    from quantkit.calibrate.driver import fixed_threads
    from quantkit.ptq.guard import run_passes

    with fixed_threads(1 if state.recipe.calibration.deterministic else None):
        return run_passes(state, registered_passes(), {"dataset": dataset, "analysis_dataset": analysis_dataset,
                                                       "progress": progress})


def run_passes_before(state, name: str, *, dataset=None, analysis_dataset=None, progress: bool = True):
    """What :func:`run_default_passes` does before the registered pass ``name`` (e.g. the calibration-method
    choice before ``fp16_choice``), guarded the same way; returns the calibration images that pass would fit on
    (``ptq.guard.RowView``), so a command that runs only that step (``quantkit sensitivity``) sees exactly the
    model and images ``export`` gives it. Run it inside ``calibrate.driver.fixed_threads`` as export does."""
    from quantkit.ptq.guard import RowView, run_passes, split_rows

    order = [p.name for p in registered_passes()]
    before = registered_passes()[:order.index(name)] if name in order else registered_passes()
    run_passes(state, before, {"dataset": dataset, "analysis_dataset": analysis_dataset, "progress": progress})
    fit_rows, _ = split_rows(state.data.num_samples)
    return RowView(state.data, fit_rows)


for _p in default_passes():  # the ordered registry starts with the defaults (once, even if re-imported)
    if _p.name not in {q.name for q in registered_passes()}:
        register_pass(_p)


__all__ = ["PtqReport", "run_default_passes", "run_passes_before", "register_pass", "registered_passes", "PassResult", "PtqPass",
           "apply_ptq", "ptq_for_state", "equalize_state_model", "equalize_prepared", "equalize", "ChannelClip",
           "sequential_pass", "SequentialOptions", "options_from_spec", "weight_amax"]
