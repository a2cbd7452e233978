"""The sensitivity stage's entry: per-layer analysis and, under a budget, the automatic FP16 choice.

One implementation serves ``quantkit export`` (inside the pipeline) and ``quantkit sensitivity`` (the
stand-alone command): the budget rule, the fixed FP16 layers and the verification are the same for both.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import torch

from quantkit.errors import UsageError
from quantkit.recipe import Recipe, parse_batch
from quantkit.state import QuantState, SensitivityOutcome

log = logging.getLogger("quantkit")


def example_batch(state: QuantState) -> torch.Tensor:
    """One input repeated to the recipe's optimal batch size (for shape-based cost estimates)."""
    x = next(state.data.batches(limit=1))[:1]
    return x.expand(parse_batch(state.recipe.input.batch)[1], *x.shape[1:]).contiguous()


def budget_of(recipe: Recipe, has_eval: bool) -> tuple[str, float] | None:
    """The budget automatic selection works to. An accuracy budget the user gives wins: ("max_drop", mAP50:95
    points) when ``gates.max_drop`` is set and evaluation data exists, else ("sqnr_floor", dB) when
    ``sensitivity.sqnr_floor`` is set; otherwise ("min_int8_share", fraction of conv/linear MACs) when
    ``sensitivity.min_int8_share`` is set (0.95 by default: the best accuracy with >= 95 % INT8 MACs); else None."""
    drop, floor, share = recipe.gates.max_drop, recipe.sensitivity.sqnr_floor, recipe.sensitivity.min_int8_share
    if drop is not None and has_eval:
        return "max_drop", drop
    if floor is not None:
        return "sqnr_floor", floor
    if share is not None:
        return "min_int8_share", share
    return None


def analyze_and_select(state: QuantState, *, dataset=None, analysis_dataset=None, analyze_always: bool = False,
                       progress: bool = True) -> SensitivityOutcome | None:
    """:func:`_analyze_and_select` on one CPU thread when ``calibration.deterministic`` (the default): the
    per-layer SQNRs, and so the chosen FP16 layers and the exported graph, must not depend on the core count."""
    from quantkit.calibrate.driver import fixed_threads

    with fixed_threads(1 if state.recipe.calibration.deterministic else None):
        return _analyze_and_select(state, dataset=dataset, analysis_dataset=analysis_dataset,
                                   analyze_always=analyze_always, progress=progress)


def _analyze_and_select(state: QuantState, *, dataset=None, analysis_dataset=None, analyze_always: bool = False,
                        progress: bool = True) -> SensitivityOutcome | None:
    """Analyse per-layer sensitivity and, with a budget and ``sensitivity.auto``, keep layers FP16 so that the
    measured result meets it. The chosen INT8 set replaces the recipe's selection on ``state.model``
    (quantizers toggled, layout updated, a reason per FP16 layer).

    dataset: a ``CocoDataset`` the chosen set is verified on under an mAP budget (None: SQNR only).
    analysis_dataset: the (smaller) ``CocoDataset`` the per-layer mAP sensitivities are measured on
    (``sensitivity.eval_images``; None: SQNR sensitivities only).
    analyze_always: analyse even without a budget (``sensitivity.enabled``, or the ``sensitivity`` command).
    Returns None when neither analysis nor selection was asked for; also sets ``state.selection``.
    """
    from quantkit.quant.insert import set_precision
    from quantkit.sensitivity.analysis import Metric, analyze
    from quantkit.sensitivity.measure import make_measure
    from quantkit.sensitivity.candidates import MAX_CANDIDATES
    from quantkit.sensitivity.cost_model import layer_costs, mac_equivalents
    from quantkit.sensitivity.select import choose_fp16_layers
    from quantkit.utils.progress import heartbeat

    recipe, s = state.recipe, state.recipe.sensitivity
    budget = budget_of(recipe, dataset is not None) if s.auto else None
    if recipe.gates.max_drop is not None and dataset is None and s.sqnr_floor is None and analyze_always:
        raise UsageError("--max-drop needs evaluation data to measure mAP: pass --eval DATA (COCO folder), "
                         "or give an SQNR floor (--sqnr-floor dB) instead")
    if not (analyze_always or s.enabled or budget):
        return None
    layout = state.model.layout
    # the selection under min_int8_share only needs each layer's SQNR recovery: without an asked-for analysis
    # (sensitivity.enabled, the sensitivity command) it skips the damage replays and the per-layer mAP
    full = analyze_always or s.enabled or (budget is not None and budget[0] != "min_int8_share")
    dev = recipe.runtime.device
    with heartbeat("estimating per-layer T4 costs", enabled=progress):  # shape pass at the optimal batch
        costs = layer_costs(state.model.fp32, example_batch(state), layout.layers)
    fixed = [n for n in layout.layers if n not in layout.int8]
    local = None
    if budget and budget[0] == "min_int8_share" and not full:  # replay only the best few (candidates.py)
        with heartbeat("ranking FP16 candidates (one forward and backward)", enabled=progress):
            local, replay = _candidates(state, costs, budget[1], fixed, dev)
        log.info("sensitivity analysis: replaying %d of %d layers, the most promising by estimated SQNR gain per "
                 "MAC from one forward and backward (cap %d)", len(replay), len(layout.layers), MAX_CANDIDATES)
    else:
        replay = None
        log.info("sensitivity analysis over %d layers%s", len(layout.layers), "" if full else " (SQNR recovery only)")
    result = analyze(state, num_images=s.num_images, dataset=analysis_dataset if full else None,
                     progress=progress, device=dev, damage=full, replay=replay)
    if local is not None:
        result.layers = {n: replace(v, local_sqnr_db=local.get(n)) for n, v in result.layers.items()}
    section = {"analysis": result.as_dict(), "selection": None,
               "note": "mAP sensitivities are measured on the evaluation data with the torch fake-quant model"}
    if budget:
        kind, value = budget
        if kind != "min_int8_share" and s.min_int8_share is not None:
            log.info("automatic FP16 choice by %s %s (an accuracy budget wins over sensitivity.min_int8_share=%s)",
                     kind, value, s.min_int8_share)
        if kind == "min_int8_share":
            from quantkit.sensitivity.select import choose_for_int8_share, weighted_macs

            sel = choose_for_int8_share(result, weighted_macs(costs), value, fixed_fp16=fixed,
                                        charges=mac_equivalents(costs))
        elif kind == "max_drop":
            measure = make_measure(state, Metric.MAP_DROP_POINTS, dataset=dataset, device=dev, progress=progress)
            sel = choose_fp16_layers(result, costs, max_drop_points=value, measure=measure, fixed_fp16=fixed)
        else:
            measure = make_measure(state, Metric.SQNR_DB, num_images=s.num_images, device=dev, progress=progress)
            sel = choose_fp16_layers(result, costs, sqnr_floor_db=value, measure=measure, fixed_fp16=fixed)
        set_precision(state.model.qmodel, set(sel.int8))
        layout.int8 = [n for n in layout.layers if n in set(sel.int8)]
        layout.reasons = dict(sel.reasons)
        section["selection"] = sel.as_dict()
        log.info("automatic selection: %d layer(s) kept FP16 (%s)", len(sel.fp16), ", ".join(sel.fp16) or "none")
    state.selection = SensitivityOutcome(section=section, sensitivity=result, costs=costs, choice=sel if budget else None)
    return state.selection


def _candidates(state: QuantState, costs, min_int8_share: float, fixed: list[str], device) -> tuple[dict, list]:
    """(layer -> local SQNR dB, the layers to replay) for the ``min_int8_share`` choice: ranked by one all-INT8
    forward and backward (``candidates.one_pass_signals``), capped at ``candidates.MAX_CANDIDATES``, only layers
    that fit the budget left after the ``fixed`` FP16 layers (MACs plus the Add fusion charge, as the selection
    spends them)."""
    from quantkit.sensitivity.candidates import one_pass_signals, pick_candidates
    from quantkit.sensitivity.cost_model import mac_equivalents
    from quantkit.sensitivity.select import weighted_macs

    macs, charges = weighted_macs(costs), mac_equivalents(costs)
    cost = {n: macs.get(n, 0.0) + charges.get(n, 0.0) for n in costs.layers}
    left = (1.0 - min_int8_share) * (sum(macs.values()) or 1.0) - sum(cost.get(n, 0.0) for n in fixed)
    signals = one_pass_signals(state, num_images=state.recipe.sensitivity.num_images, device=device)
    local = {n: s.local_sqnr_db for n, s in signals.items()}
    return local, pick_candidates(signals, cost, left, exclude=fixed)


def latency_estimate(state: QuantState) -> dict:
    """Estimated T4 latency (roofline model, not measured), in ms, of FP16, full INT8 and the exported choice."""
    from quantkit.sensitivity.cost_model import layer_costs, latency_section

    costs = state.selection.costs if state.selection else None
    costs = costs or layer_costs(state.model.fp32, example_batch(state), state.model.layout.layers)
    layout = state.model.layout
    return latency_section(costs, layout.layers, layout.int8)
