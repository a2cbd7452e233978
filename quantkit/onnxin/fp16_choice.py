"""The ONNX route's automatic FP16 choice: the torch route's ``fp16_choice`` step, run in onnxruntime.

With ``sensitivity.min_int8_share`` set (0.95 by default) the weighted nodes whose INT8 version costs the most
output fidelity per MAC are kept FP16, while at least that share of the weighted-op MACs stays INT8 — the torch
route's selection (``sensitivity.select.choose_for_int8_share``: greedy by measured gain per MAC, a layer kept only
when it recovers at least ``MIN_RECOVERY_DB``), fed with recoveries measured here:

1. **Screen** (no autograd in onnxruntime, so no first-order signal as on the torch route): up to
   :data:`MAX_CANDIDATES` weighted nodes are all replayed. A larger graph is cut into :data:`BLOCKS` contiguous
   blocks in graph order; each block is replayed in float at once (output noise is close to additive over
   nodes), and the blocks with the most recovered noise per MAC are opened until :data:`MAX_CANDIDATES` nodes are
   taken. A node's own added noise (its output's noise-to-signal ratio minus its input's) ranked poorly: on the
   RetinaFace-MobileNet0.25 ONNX its rank correlation with the measured recovery was 0.06 (early depthwise convs
   add little noise themselves but it crosses the whole network); with block screening (22 replays) the choice kept
   6 of the 8 nodes that replaying all 56 keeps, and scored 16.4 dB on the check images against its 15.8 dB.
2. **Replay**: each candidate alone back in float, every other node INT8, on the same fit images: its recovery of
   the worst output's SQNR, and of the noise averaged over the outputs (a head that recovers its own output).
3. **Guard**: the chosen set is kept only when the worst output's SQNR on the held-out *check* images
   (``ptq.guard.split_rows``, disjoint from the fit images) rises, as every default step on the torch route.

Residual Adds are not offered (only weighted nodes run FP16 by this choice). The step is recorded in the report's
``passes`` section, and ``sensitivity`` carries the selection and per-node recoveries in the torch route's format.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field

import onnx

log = logging.getLogger("quantkit")

MAX_CANDIDATES = 16  # nodes replayed one by one at most (the torch route's sensitivity.candidates.MAX_CANDIDATES)
LARGE_MACS = 1e9  # multiply-accumulates per sample above which replays use half the fit images
BLOCKS = 8  # a larger graph is screened block by block first (one replay per block)


@dataclass
class Fp16Choice:
    """The nodes newly kept FP16 (``fp16``, with ``reasons``), the report's ``passes`` step and ``sensitivity``."""

    fp16: list[str] = field(default_factory=list)
    reasons: dict[str, str] = field(default_factory=dict)
    step: dict = field(default_factory=dict)
    sensitivity: dict | None = None
    result: object = None  # the sensitivity.analysis.SensitivityResult (for the chart)


def _mean_noise(per: dict[str, float]) -> float:
    """Noise-to-signal power ratio averaged over the outputs (0 for identical outputs)."""
    from quantkit.sensitivity.select import _noise

    return sum(_noise(d) for d in per.values()) / max(len(per), 1)


def _screen(offered: list[str], macs: dict[str, float], gain_without) -> tuple[list[str], dict]:
    """The nodes to replay one by one: all of them up to :data:`MAX_CANDIDATES`; beyond that the graph-ordered
    list is cut into :data:`BLOCKS` contiguous blocks, each block is replayed in float at once
    (``gain_without(nodes)``: the output noise it removes), and the blocks with the most gain per MAC are opened
    until :data:`MAX_CANDIDATES` nodes are taken. Returns (nodes, {"blocks": [...]} for the record)."""
    if len(offered) <= MAX_CANDIDATES:
        return list(offered), {}
    size = -(-len(offered) // BLOCKS)
    blocks = [offered[i:i + size] for i in range(0, len(offered), size)]
    gains = [gain_without(b) for b in blocks]
    order = sorted(range(len(blocks)), key=lambda i: (-gains[i] / max(sum(macs[n] for n in blocks[i]), 1.0), i))
    taken: list[str] = []
    for i in order:
        if taken and len(taken) + len(blocks[i]) > MAX_CANDIDATES:
            continue
        taken += blocks[i]
    info = {"blocks": [{"first": b[0], "nodes": len(b), "noise_gain": float(f"{g:.4g}"), "opened": b[0] in taken}
                       for b, g in zip(blocks, gains)]}
    return [n for n in offered if n in set(taken)], info


def fit_image_count(macs: dict[str, float], recipe) -> int:
    """Fit images per replay (``sensitivity.num_images``), halved (at least 4) above :data:`LARGE_MACS`
    multiply-accumulates per sample, so the choice stays within the --full-int8 export's own time (PP-OCRv4 det at
    480x480, 1.3 GMAC: 2.5x with 8 images)."""
    n = recipe.sensitivity.num_images
    return n if sum(macs.values()) <= LARGE_MACS else max(4, n // 2)


def choose_fp16(cleaned: onnx.ModelProto, layout, act_scales: dict[str, float], wscales: dict, cal, recipe,
                threads: int | None, ops, check, progress: bool = False) -> Fp16Choice | None:
    """The FP16 choice for ``layout`` (its ``int8`` list is not changed here), or None when off in the recipe
    (``sensitivity.min_int8_share`` null, ``sensitivity.auto`` false) or without data to hold out. ``ops``: the
    weighted ops of ``cleaned`` with their MACs (``exporter.coverage.graph_coverage(cleaned).ops``); ``check``: the
    guard's check images (``onnxin.measure.CheckImages``). With
    ``sensitivity.enabled`` (``--sensitivity``) every node is replayed and its damage measured, and the analysis is
    returned even when no choice runs (then ``step`` is empty)."""
    from quantkit.onnxin.measure import per_output_db, row_batches, run_graph
    from quantkit.onnxin.qdq import simulate_qdq
    from quantkit.ptq.guard import split_rows
    from quantkit.ptq.passes import json_db
    from quantkit.sensitivity.analysis import LayerSensitivity, SensitivityResult
    from quantkit.sensitivity.select import _noise, choose_for_int8_share

    s = recipe.sensitivity
    fit_rows, check_rows = split_rows(cal.num_samples) if cal is not None else ([], [])
    choose = s.min_int8_share is not None and s.auto and bool(check_rows)
    if cal is None or not (choose or s.enabled):
        return None
    if not check_rows:  # --sensitivity on a tiny set: the analysis on every image, no choice to judge
        fit_rows = list(range(cal.num_samples))
    macs, types = {op.node: float(op.macs) for op in ops}, {op.node: op.op for op in ops}
    from quantkit.exporter.parity import sigmoid_outputs

    names, sig = [o.name for o in cleaned.graph.output], sigmoid_outputs(cleaned)
    int8 = list(layout.int8)
    offered = [n for n in int8 if layout.candidates[n].weight is not None and n in macs]
    fixed = [n for n in macs if n not in offered]  # float already (skip, decode rules): spend the budget first
    fit = row_batches(cal, fit_rows, fit_image_count(macs, recipe))

    weights: dict = {}  # fake-quantized weights, built once for all the replays

    def twin(nodes: list[str]) -> onnx.ModelProto:
        lay = copy.copy(layout)
        lay.int8 = nodes
        return simulate_qdq(cleaned, lay, act_scales, wscales, check=False, weight_cache=weights)

    ref = run_graph(cleaned, fit, threads)
    sim = twin(int8)
    base = per_output_db(ref, run_graph(sim, fit, threads), names, sig)
    worst0, mean0 = min(base.values()), _mean_noise(base)
    several = len(base) > 1

    from quantkit.utils.progress import progress_bar

    # replays: the blocks (when screened), then one per node (every node with --sensitivity, twice: its damage)
    total = (len(offered) * (2 if s.enabled else 1) if s.enabled or len(offered) <= MAX_CANDIDATES
             else BLOCKS + MAX_CANDIDATES)
    bar = progress_bar(max(total, 1), "FP16 choice (onnxruntime replays)", "replay", enabled=progress)

    def without(nodes) -> dict[str, float]:  # per-output SQNR with ``nodes`` float, the rest INT8
        drop = set(nodes)
        out = per_output_db(ref, run_graph(twin([m for m in int8 if m not in drop]), fit, threads), names, sig)
        bar.update()
        return out

    def gain(per: dict[str, float]) -> float:  # output noise removed (the selection's units)
        return mean0 - _mean_noise(per) if several else _noise(worst0) - _noise(min(per.values()))

    # --sensitivity (sensitivity.enabled): every node replayed, and its damage (only it INT8) measured too
    replay, screen = (list(offered), {}) if s.enabled else _screen(offered, macs, lambda nodes: gain(without(nodes)))
    order = {n: i for i, n in enumerate(macs)}
    layers = {n: LayerSensitivity(n, types[n], order[n], None, worst0, 0.0, replayed=False) for n in fixed}
    for n in offered:
        if n not in replay:
            layers[n] = LayerSensitivity(n, types[n], order[n], None, worst0, 0.0, replayed=False)
            continue
        per = without([n])
        worst, mean = min(per.values()), _mean_noise(per)
        damage = (min(per_output_db(ref, run_graph(twin([n]), fit, threads), names, sig).values()) if s.enabled
                  else None)
        if s.enabled:
            bar.update()
        layers[n] = LayerSensitivity(
            n, types[n], order[n], damage, worst, worst - worst0, replayed=True,
            mean_noise_gain=(mean0 - mean) if several else None,
            mean_recovery_db=(10.0 * math.log10(mean0 / mean) if mean > 0 else math.inf) if several and mean0 > 0
            else None)
    bar.close()
    result = SensitivityResult(layers, worst0, sum(b.shape[0] for b in fit))
    if not choose:
        return Fp16Choice(sensitivity={"analysis": result.as_dict()}, result=result)
    sel = choose_for_int8_share(result, macs, float(s.min_int8_share), fixed_fp16=fixed)
    chosen = [n for n in sel.fp16 if n not in fixed]
    sel.reasons.update({n: "float before the choice (a placement rule or quantization.skip)" for n in fixed})
    step = {"name": "fp16_choice", "tried": True, "kept": False, "changed": None,
            "check_sqnr_db_before": None, "check_sqnr_db_after": None,
            "measured": {"replayed": len(replay), **screen, "fp16_layers": sorted(chosen),
                         "int8_mac_share": round(sel.int8_share, 6)}}
    out = Fp16Choice(step=step, sensitivity={"analysis": result.as_dict(), "selection": sel.as_dict()},
                     result=result)
    if not chosen:
        step["verdict"] = "no change"
        return out
    before, after = check.worst_db(sim), check.worst_db(twin([m for m in int8 if m not in chosen]))
    step.update(changed=f"{len(chosen)} layer(s) kept FP16", check_sqnr_db_before=json_db(before),
                check_sqnr_db_after=json_db(after))
    if after > before:
        step.update(kept=True, verdict="kept")
        out.fp16, out.reasons = chosen, {n: "selection: " + sel.reasons[n] for n in chosen}
    else:
        step["verdict"] = "reverted: no gain on the check images"
    log.info("PTQ step fp16_choice: %s (%s; %.2f -> %.2f dB on the check images)", step["verdict"],
             ", ".join(chosen), before, after)
    return out


__all__ = ["choose_fp16", "Fp16Choice", "MAX_CANDIDATES", "fit_image_count"]
