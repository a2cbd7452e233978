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
   (``ptq.guard.split_rows``, disjoint from the fit images) rises: the one guard of every route
   (``ptq.guard.run_passes``), this being the ``fp16_choice`` pass's implementation for ``onnxin.target.OnnxTarget``.

Residual Adds are not offered (only weighted nodes run FP16 by this choice). The guard records the step in the
report's ``passes`` section, and ``sensitivity`` carries the selection and per-node recoveries in the torch route's format.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import onnx

from quantkit.ptq.passes import PassData, PassResult

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


def choose_fp16(target, data: PassData) -> PassResult:
    """The FP16 choice for ``target`` (an ``onnxin.target.OnnxTarget``): its ``layout.int8`` loses the chosen nodes
    (each with its reason in ``layout.reasons``), the guard keeping the change only when the check SQNR rises.
    Runs with ``sensitivity.min_int8_share`` set and ``sensitivity.auto`` (the choice) or ``sensitivity.enabled``
    (``--sensitivity``: every node replayed and its damage measured; the analysis is kept in ``target.choice`` even
    with nothing chosen, or when the guard reverts the choice). ``data.fit``: the images the replays run on."""
    from quantkit.onnxin.measure import per_output_db, run_graph
    from quantkit.sensitivity.analysis import LayerSensitivity, SensitivityResult
    from quantkit.sensitivity.run import budget_of
    from quantkit.sensitivity.select import _noise, choose_for_int8_share

    recipe, layout, graph, threads = target.recipe, target.layout, target.graph, target.threads
    s = recipe.sensitivity
    # the budget: an SQNR floor the user set (kept regardless, as on the torch route), else the INT8 MAC share;
    # --max-drop stays a gate here (its mAP would need the evaluation data inside the choice)
    budget = budget_of(recipe, has_eval=False) if s.auto else None
    floor = budget[1] if budget and budget[0] == "sqnr_floor" else None
    choose = budget is not None and (floor is not None or data.measure is not None)
    if not (choose or s.enabled):
        why = ("no FP16 budget: sensitivity.min_int8_share and sensitivity.sqnr_floor are null (--max-drop is a "
               "gate on this route)" if budget is None else "too few calibration images to hold any out")
        return PassResult("fp16_choice", measured={"note": why})
    macs, types = target.macs, {op.node: op.op for op in target.ops}
    from quantkit.exporter.parity import sigmoid_outputs

    names, sig = [o.name for o in graph.graph.output], sigmoid_outputs(graph)
    int8 = list(layout.int8)
    offered = [n for n in int8 if layout.candidates[n].weight is not None and n in macs]
    fixed = [n for n in macs if n not in offered]  # float already (skip, decode rules): spend the budget first
    fit = target.fit_arrays(data.fit)

    weights: dict = {}  # fake-quantized weights, built once for all the replays

    def twin(nodes: list[str]) -> onnx.ModelProto:
        return target.twin(nodes, weight_cache=weights)

    ref = run_graph(target.fp32, fit, threads)
    sim = twin(int8)
    base = per_output_db(ref, run_graph(sim, fit, threads), names, sig)
    worst0, mean0 = min(base.values()), _mean_noise(base)
    several = len(base) > 1

    from quantkit.utils.progress import progress_bar

    # replays: the blocks (when screened), then one per node (every node with --sensitivity, twice: its damage)
    total = (len(offered) * (2 if s.enabled else 1) if s.enabled or floor is not None or len(offered) <= MAX_CANDIDATES
             else BLOCKS + MAX_CANDIDATES)
    bar = progress_bar(max(total, 1), "FP16 choice (onnxruntime replays)", "replay", enabled=target.progress)

    def without(nodes) -> dict[str, float]:  # per-output SQNR with ``nodes`` float, the rest INT8
        drop = set(nodes)
        out = per_output_db(ref, run_graph(twin([m for m in int8 if m not in drop]), fit, threads), names, sig)
        bar.update()
        return out

    def gain(per: dict[str, float]) -> float:  # output noise removed (the selection's units)
        return mean0 - _mean_noise(per) if several else _noise(worst0) - _noise(min(per.values()))

    # --sensitivity (sensitivity.enabled): every node replayed, and its damage (only it INT8) measured too; an SQNR
    # floor needs every node's recovery (the selection predicts the floor from them, then verifies)
    replay, screen = ((list(offered), {}) if s.enabled or floor is not None
                      else _screen(offered, macs, lambda nodes: gain(without(nodes))))
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
        target.choice = Fp16Choice(sensitivity={"analysis": result.as_dict()}, result=result)
        return PassResult("fp16_choice", measured={"note": "analysis only (--sensitivity; no budget to choose to "
                                                           "or too few images to hold any out)"})
    if floor is not None:
        from quantkit.onnxin.costs import graph_costs
        from quantkit.sensitivity.select import choose_fp16_layers

        def measure(int8_nodes) -> float:  # worst output's SQNR on the fit images with only ``int8_nodes`` INT8
            keep = set(int8_nodes)
            nodes = [m for m in int8 if m in keep or m not in macs]  # residual Adds stay as placed
            return min(per_output_db(ref, run_graph(twin(nodes), fit, threads), names, sig).values())

        costs = graph_costs(target.fp32, layout)
        sel = choose_fp16_layers(result, costs, sqnr_floor_db=float(floor), measure=measure, fixed_fp16=fixed)
    else:
        sel = choose_for_int8_share(result, macs, float(s.min_int8_share), fixed_fp16=fixed)
    chosen = [n for n in sel.fp16 if n not in fixed]
    sel.reasons.update({n: "float before the choice (a placement rule or quantization.skip)" for n in fixed})
    target.choice = Fp16Choice(fp16=chosen, reasons={n: "selection: " + sel.reasons[n] for n in chosen},
                               sensitivity={"analysis": result.as_dict(), "selection": sel.as_dict()}, result=result)
    if chosen:
        layout.int8 = [n for n in layout.int8 if n not in set(chosen)]
        layout.reasons = {**layout.reasons, **target.choice.reasons}
        log.info("FP16 choice: %s", ", ".join(chosen))
    share = getattr(sel, "int8_share", None)  # the share selection's own figure; else counted from the choice
    if share is None:
        share = sum(v for n, v in macs.items() if n in set(layout.int8)) / (sum(macs.values()) or 1.0)
    measured = {"replayed": len(replay), **screen, "fp16_layers": sorted(chosen), "int8_mac_share": round(share, 6)}
    if floor is not None:
        measured["budget"] = {"sqnr_floor_db": float(floor), "met": sel.met, "measured_db": sel.measured}
    return PassResult("fp16_choice", changed=f"{len(chosen)} layer(s) kept FP16" if chosen else None,
                      measured=measured, required=floor is not None)


__all__ = ["choose_fp16", "Fp16Choice", "MAX_CANDIDATES", "fit_image_count"]
