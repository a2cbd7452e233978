"""Choose which layers stay FP16 under an accuracy budget, cheapest first, then verify by measuring.

Prediction: keeping layer L in float recovers ``recovery(L)`` (mAP points, or noise power for SQNR) as
measured by the sensitivity analysis, and costs ``fp16_extra_ms(L)`` of estimated T4 time (roofline model,
not measured). Recoveries are treated as additive: a knapsack, solved greedily by recovery per estimated ms,
then pruned (drop a chosen layer whenever the prediction stays within budget without it, most expensive first).

Verification: the chosen configuration is measured with the caller's ``measure(int8_layers)``; while the
measurement misses the budget, more layers follow in priority order (1, 2, 4, ... at a time, so even a budget
only the all-FP16 model meets is reached in about log2(#layers) measurements).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

from quantkit.errors import UsageError
from quantkit.quant.registry import WEIGHTED_KINDS
from quantkit.sensitivity.analysis import Metric, SensitivityResult, _r
from quantkit.sensitivity.cost_model import ESTIMATE_LABEL, CostTable, estimate_latency_ms

_TINY_MS = 1e-9  # a layer with no estimated cost is free to keep in FP16


def _noise(db: float) -> float:
    """Noise-to-signal power ratio of an SQNR in dB (0 for +inf)."""
    return 0.0 if db == math.inf else 10.0 ** (-db / 10.0)


def _db(noise: float) -> float:
    return math.inf if noise <= 0.0 else -10.0 * math.log10(noise)


@dataclass
class Selection:
    """The chosen precisions. ``predicted``/``measured`` are in the metric's unit (mAP points dropped, or dB).

    ``estimated_ms``: fp16 / int8 / hybrid, an ESTIMATE of T4 latency (roofline model, not measured).
    ``met``: whether the last measurement met the budget (None when nothing was measured).
    """

    metric: Metric
    budget: float
    int8: list[str]
    fp16: list[str]
    predicted: float
    measured: float | None
    met: bool | None
    estimated_ms: dict[str, float]
    reasons: dict[str, str]
    measurements: list[dict] = field(default_factory=list)

    def as_dict(self) -> dict:
        unit = "mAP50:95 points dropped" if self.metric is Metric.MAP_DROP_POINTS else "output SQNR dB"
        return {
            "metric": self.metric.value, "unit": unit, "budget": _r(self.budget),
            "predicted": _r(self.predicted), "measured": _r(self.measured), "met": self.met,
            "int8_layers": list(self.int8), "fp16_layers": list(self.fp16),
            "estimated_ms": {k: round(v, 5) for k, v in self.estimated_ms.items()},
            "estimated_ms_label": ESTIMATE_LABEL,
            "reasons": dict(self.reasons),
            "measurements": [{"num_fp16": m["num_fp16"], "value": _r(m["value"]), "met": m["met"]}
                             for m in self.measurements],
        }


def _gains(result: SensitivityResult, metric: Metric) -> dict[str, float]:
    """What keeping each layer in float recovers: mAP points, or noise power (linear) for SQNR."""
    if metric is Metric.MAP_DROP_POINTS:
        return {n: s.recovery_map_points for n, s in result.layers.items()}
    full = _noise(result.int8_sqnr_db)
    # several outputs: the gain on the noise averaged over the outputs (a head layer recovers its own output
    # without moving the worst one); one output: the worst output's, which is the same thing
    return {n: s.mean_noise_gain if s.mean_noise_gain is not None else full - _noise(s.without_sqnr_db)
            for n, s in result.layers.items()}


def _recovery_db(s) -> float:
    """The dB a layer recovers, as the FP16 choice's minimum reads it: averaged over the outputs where measured."""
    return s.mean_recovery_db if s.mean_recovery_db is not None else s.recovery_sqnr_db


def _predict(result: SensitivityResult, metric: Metric, gains: dict[str, float], fp16) -> float:
    recovered = sum(max(gains[n], 0.0) for n in fp16)
    if metric is Metric.MAP_DROP_POINTS:
        return max(result.int8_drop_points - recovered, 0.0)
    return _db(_noise(result.int8_sqnr_db) - recovered)


def _within(metric: Metric, value: float, budget: float) -> bool:
    return value <= budget + 1e-9 if metric is Metric.MAP_DROP_POINTS else value >= budget - 1e-9


def priority(result: SensitivityResult, costs: CostTable, metric: Metric) -> list[str]:
    """Layers in the order they should leave INT8: positive recovery per estimated ms first, then the rest
    by single-layer damage (noise power) per estimated ms; ties by name."""
    gains = _gains(result, metric)

    def key(n: str):
        ms = max(costs.layers[n].fp16_extra_ms(costs.spec), _TINY_MS) if n in costs.layers else _TINY_MS
        d_db = result.layers[n].damage_sqnr_db
        damage = _noise(d_db) if d_db is not None else 0.0  # None: a recovery-only analysis
        return (0, -gains[n] / ms, n) if gains[n] > 0 else (1, -damage / ms, n)

    return sorted(result.layers, key=key)


def choose_fp16_layers(result: SensitivityResult, costs: CostTable, *, max_drop_points: float | None = None,
                       sqnr_floor_db: float | None = None, measure: Callable[[set[str]], float] | None = None,
                       fixed_fp16=(), max_measurements: int = 10) -> Selection:
    """Keep in FP16 the cheapest set of layers predicted to meet the budget, then verify with ``measure``.

    Give exactly one budget: ``max_drop_points`` (mAP50:95 points; needs a result with mAP) or
    ``sqnr_floor_db`` (output SQNR in dB). ``measure(int8_layers)`` returns the metric of a configuration
    (see ``quantkit.sensitivity.analysis.make_measure``); without it the selection is only predicted.
    ``fixed_fp16``: layers that stay FP16 whatever the budget (e.g. the recipe's ``quantization.skip``).
    """
    if (max_drop_points is None) == (sqnr_floor_db is None):
        raise UsageError("give exactly one budget: max_drop_points (mAP50:95 points) or sqnr_floor_db (dB)")
    metric = Metric.MAP_DROP_POINTS if max_drop_points is not None else Metric.SQNR_DB
    budget = float(max_drop_points if max_drop_points is not None else sqnr_floor_db)
    if metric is Metric.MAP_DROP_POINTS and not result.has_map:
        raise UsageError("an mAP budget needs a sensitivity analysis with evaluation data (--eval DATA); "
                         "without labels use an SQNR floor")
    if metric is Metric.MAP_DROP_POINTS and budget < 0:
        raise UsageError(f"max_drop_points must be >= 0, got {budget}")
    gains = _gains(result, metric)
    order = priority(result, costs, metric)
    extra = {n: costs.layers[n].fp16_extra_ms(costs.spec) if n in costs.layers else 0.0 for n in order}

    fixed = list(dict.fromkeys(fixed_fp16))
    unknown = [n for n in fixed if n not in result.layers]
    if unknown:
        raise UsageError(f"fixed_fp16 names {unknown[:5]} are not analysed layers: use names from the layout")
    fp16: list[str] = list(fixed)
    for n in (m for m in order if m not in fixed):  # greedy: best recovery per ms until the prediction fits
        if _within(metric, _predict(result, metric, gains, fp16), budget) or gains[n] <= 0:
            break
        fp16.append(n)
    for n in sorted((m for m in fp16 if m not in fixed), key=lambda n: (-extra[n], n)):  # prune the unneeded
        rest = [m for m in fp16 if m != n]
        if _within(metric, _predict(result, metric, gains, rest), budget):
            fp16 = rest
    predicted = _predict(result, metric, gains, fp16)
    reasons = {n: _reason(result, metric, n, gains[n], extra[n]) for n in fp16}
    reasons.update({n: "kept FP16 by the caller (e.g. quantization.skip)" for n in fixed})

    measured = met = None
    history: list[dict] = []
    step = 1
    while measure is not None and len(history) < max_measurements:
        int8 = {n for n in order if n not in fp16}
        measured = float(measure(int8))
        met = _within(metric, measured, budget)
        history.append({"num_fp16": len(fp16), "value": measured, "met": met})
        remaining = [n for n in order if n not in fp16]
        if met or not remaining:
            break
        added = remaining[:step]
        for n in added:
            reasons[n] = (f"added after measuring {_fmt(metric, measured)} against the budget "
                          f"{_fmt(metric, budget)}; costs {extra[n]:.4f} ms (estimated)")
        fp16.extend(added)
        step *= 2
    fp16_set = set(fp16)
    int8_list = [n for n in result.layers if n not in fp16_set]
    fp16_list = [n for n in result.layers if n in fp16_set]
    est = {"fp16": estimate_latency_ms(costs, ()), "int8": estimate_latency_ms(costs, costs.layers),
           "hybrid": estimate_latency_ms(costs, [n for n in int8_list if n in costs.layers])}
    return Selection(metric, budget, int8_list, fp16_list, predicted, measured, met, est,
                     {n: reasons[n] for n in fp16_list}, history)


def _fmt(metric: Metric, v: float) -> str:
    return f"{v:.3f} mAP points" if metric is Metric.MAP_DROP_POINTS else f"{v:.2f} dB"


def _reason(result: SensitivityResult, metric: Metric, name: str, gain: float, extra_ms: float) -> str:
    s = result.layers[name]
    if metric is Metric.MAP_DROP_POINTS:
        what = f"recovers {gain:.3f} mAP points ({s.recovery_sqnr_db:.2f} dB)"
    else:
        what = f"recovers {s.recovery_sqnr_db:.2f} dB of output SQNR"
    return f"{what}, costs {extra_ms:.4f} ms (estimated)"


# ---- selection under a compute budget: "best accuracy with >= X % of the MACs in INT8" ----------------------

_WEIGHTED = WEIGHTED_KINDS  # conv / linear layers of any dimension, subclasses included (cost table kinds)

# A layer stays FP16 under ``min_int8_share`` only if keeping it float recovers at least this much output SQNR.
# 0.05 dB is 1.2 % of the output noise power: smaller gains are below what 8 calibration images measure
# repeatably and below any held-out change seen so far (a layer that bought 0.01 dB for 0.37 % of the MACs of the
# bundled detector moved nothing), while every FP16 layer still costs T4 time, an INT8/FP16 reformat and, for a
# residual Add, the conv+add fusion. Spending no budget beats spending it on noise.
MIN_RECOVERY_DB = 0.05


@dataclass
class ShareSelection:
    """FP16 layers chosen under ``min_int8_share`` (share of conv/linear MACs that stay INT8).

    ``curve``: one point per greedy step — layers kept FP16 so far, the INT8 MAC share, the predicted output
    SQNR (dB, additive-noise model) and, when measured, the measured SQNR — the accuracy / INT8-share curve.
    """

    min_int8_share: float
    fp16: list[str]
    int8_share: float
    predicted_db: float
    curve: list[dict]
    reasons: dict[str, str]
    int8: list[str] = field(default_factory=list)
    min_recovery_db: float = MIN_RECOVERY_DB
    candidates: list[str] = field(default_factory=list)  # the layers whose recovery was measured by replay

    @property
    def met(self) -> bool:
        """The INT8 share of MACs reached the budget (by construction, unless the fixed FP16 layers exceed it)."""
        return self.int8_share >= self.min_int8_share

    def as_dict(self) -> dict:
        return {"budget": self.min_int8_share, "unit": "share of conv/linear MACs in INT8",
                "measured": round(self.int8_share, 6), "met": self.met,
                "min_int8_share": self.min_int8_share, "fp16_layers": list(self.fp16),
                "int8_layers": list(self.int8),
                "int8_mac_share": round(self.int8_share, 6), "predicted_sqnr_db": _r(self.predicted_db),
                "curve": [{k: (_r(v) if isinstance(v, float) else v) for k, v in p.items()} for p in self.curve],
                "reasons": dict(self.reasons), "min_recovery_db": self.min_recovery_db,
                "candidates": list(self.candidates)}


def weighted_macs(costs: CostTable) -> dict[str, float]:
    """MACs (FLOPs / 2) of every conv / linear layer in the cost table; other layer types are not counted."""
    return {n: c.flops / 2.0 for n, c in costs.layers.items() if c.type in _WEIGHTED}


def choose_for_int8_share(result: SensitivityResult, macs: dict[str, float], min_int8_share: float, *,
                          measure: Callable[[set[str]], float] | None = None, fixed_fp16=(),
                          charges: dict[str, float] | None = None,
                          min_recovery_db: float = MIN_RECOVERY_DB) -> ShareSelection:
    """Keep FP16 the layers with the most measured gain per MAC while >= ``min_int8_share`` of the MACs stay INT8.

    Gain of a layer: the output noise power its INT8 version adds (recovered by keeping it in float; from
    ``result``, i.e. measured on the data the sensitivity analysis ran on). Layers are taken greedily by gain per
    MAC; a layer that would break the budget is skipped and smaller ones still considered (greedy knapsack).

    Budget: ``(1 - min_int8_share)`` x the conv/linear MACs in ``macs``. A layer spends its MACs plus its
    ``charges`` entry: MAC-equivalents for what keeping it FP16 costs beyond its own MACs — for a residual Add the
    conv+add fusion it breaks (``cost_model.mac_equivalents``), so an Add is not free. The reported
    ``int8_share`` is the plain conv/linear MAC share; the charges only decide what fits.

    Minimum: a layer is kept only if its measured recovery is at least ``min_recovery_db`` dB of output SQNR
    (``MIN_RECOVERY_DB``, 0.05 dB, see its comment); 0 keeps any positive gain.

    ``measure`` (``int8_layers -> SQNR dB``) adds measured values to the curve; ``fixed_fp16`` stay FP16 regardless
    (and spend the budget first). Layers the analysis did not replay (``LayerSensitivity.replayed`` false: outside
    its candidate cap) have no measured gain and are never chosen; the replayed ones are listed as ``candidates``.
    """
    if not 0.0 <= min_int8_share <= 1.0:
        raise UsageError(f"min_int8_share must be in [0, 1], got {min_int8_share}")
    gains = _gains(result, Metric.SQNR_DB)
    charges = charges or {}
    total = sum(macs.values()) or 1.0
    budget = (1.0 - min_int8_share) * total

    def cost(n: str) -> float:
        return macs.get(n, 0.0) + charges.get(n, 0.0)

    fp16 = [n for n in dict.fromkeys(fixed_fp16)]
    spent = sum(cost(n) for n in fp16)  # MACs plus MAC-equivalents: what the budget sees
    plain = sum(macs.get(n, 0.0) for n in fp16)  # MACs only: the reported share
    everything = list(result.layers)

    def point(label: str) -> dict:
        p = {"step": label, "num_fp16": len(fp16), "int8_mac_share": 1.0 - plain / total,
             "predicted_sqnr_db": _predict(result, Metric.SQNR_DB, gains, fp16)}
        if measure is not None:
            p["measured_sqnr_db"] = float(measure({n for n in everything if n not in fp16}))
        return p

    curve = [point("all INT8" if not fp16 else "fixed FP16")]
    order = sorted((n for n in everything if n not in fp16 and gains[n] > 0
                    and _recovery_db(result.layers[n]) >= min_recovery_db),
                   key=lambda n: (-gains[n] / max(cost(n), 1.0), n))
    reasons = {n: "kept FP16 by the caller (e.g. quantization.skip)" for n in fp16}
    for n in order:
        if spent + cost(n) > budget + 1e-9:
            continue
        fp16.append(n)
        spent += cost(n)
        plain += macs.get(n, 0.0)
        s = result.layers[n]
        what = (f"{s.recovery_sqnr_db:.2f} dB of output SQNR" if s.mean_recovery_db is None else
                f"{s.mean_recovery_db:.2f} dB of output SQNR averaged over the outputs (worst output "
                f"{s.recovery_sqnr_db:+.2f} dB)")
        reasons[n] = f"recovers {what} for {100.0 * macs.get(n, 0.0) / total:.2f} % of the conv/linear MACs"
        if charges.get(n):
            reasons[n] += (f", charged {100.0 * charges[n] / total:.2f} % as MAC-equivalent of the conv+add fusion "
                           "it breaks (estimated)")
        curve.append(point(n))
    return ShareSelection(min_int8_share, list(fp16), 1.0 - plain / total,
                          _predict(result, Metric.SQNR_DB, gains, fp16), curve, reasons,
                          [n for n in everything if n not in set(fp16)], min_recovery_db,
                          [n for n, s in result.layers.items() if s.replayed])
