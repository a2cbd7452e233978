"""Per-layer sensitivity: what quantizing each layer alone costs, and what leaving it alone in float recovers.

For every quantizable layer L (``layout.layers``, residual Adds included), with the one existing calibration
(quantizers keep their amax; only their enable flags change):

* damage   — output SQNR (dB) against FP32 with only L in INT8 (lower = more harmful); with several outputs
  the worst output's SQNR, as the ``min_sqnr`` gate reads it;
* recovery — SQNR gain (dB) when L alone stays float in an otherwise all-INT8 model;

and, when a labelled data set is given, the same two in mAP50:95 points on it.

Cost: each configuration re-runs only the forward from L's first call on (prefix replay, see ``Replayer``):
the calls that finished before L are taken from one recorded all-float pass (damage) or all-INT8 pass
(recovery), so the analysis costs about one full forward per layer instead of two.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from quantkit.errors import UsageError
from quantkit.sqnr import SqnrAccumulator
from quantkit.quant.insert import set_precision
from quantkit.quant.tensor_quantizer import TensorQuantizer
from quantkit.sensitivity.replay import Replayer

if TYPE_CHECKING:  # pragma: no cover
    from quantkit.data.coco import CocoDataset
    from quantkit.state import QuantState


class Metric(Enum):
    """What an accuracy budget is expressed in."""

    SQNR_DB = "sqnr_db"  # output SQNR against FP32 on calibration inputs, dB (higher is better)
    MAP_DROP_POINTS = "map_drop_points"  # FP32 mAP50:95 minus INT8 mAP50:95, x100 (lower is better)


# ---- results -----------------------------------------------------------------------------------------------


def _r(v: float | None, nd: int = 4):
    """Rounded JSON value; infinities as strings (JSON has none): identical outputs give "inf"."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return round(float(v), nd)


@dataclass(frozen=True)
class LayerSensitivity:
    """One layer. SQNR values in dB against FP32; mAP values in mAP50:95 points (x100), None without labels.

    damage_sqnr_db: SQNR with only this layer INT8 (lower = more harmful; inf: no effect; None: not measured,
    ``analyze(damage=False)``).
    without_sqnr_db: SQNR with every layer INT8 except this one.
    recovery_sqnr_db: without_sqnr_db minus the all-INT8 SQNR (dB gained by keeping it in float).
    damage_map_points: FP32 mAP minus mAP with only this layer INT8.
    recovery_map_points: mAP with all but this layer INT8 minus the all-INT8 mAP.
    replayed: False when the analysis did not replay this layer (outside ``analyze(replay=...)``): its recovery
    reads 0 dB but was not measured.
    local_sqnr_db: the layer's own INT8 error, its output against its float output on the same (all-INT8) inputs
    (``quantkit.sensitivity.candidates``); None when not measured.
    """

    name: str
    type: str
    order: int
    damage_sqnr_db: float | None
    without_sqnr_db: float
    recovery_sqnr_db: float
    damage_map_points: float | None = None
    recovery_map_points: float | None = None
    replayed: bool = True
    local_sqnr_db: float | None = None
    # per-output view (None: not measured, or a single output where it equals the worst-output figures): the
    # noise-to-signal power ratio averaged over the outputs, all-INT8 minus this layer in float (linear, >= 0 is
    # a gain), and the same as dB. A layer that feeds only one of several heads recovers its own output without
    # raising the worst one; this is what lets the FP16 choice see it (``select._gains``).
    mean_noise_gain: float | None = None
    mean_recovery_db: float | None = None

    def as_dict(self) -> dict:
        return {"name": self.name, "type": self.type, "order": self.order,
                "damage_sqnr_db": _r(self.damage_sqnr_db), "without_sqnr_db": _r(self.without_sqnr_db),
                "recovery_sqnr_db": _r(self.recovery_sqnr_db), "damage_map_points": _r(self.damage_map_points),
                "recovery_map_points": _r(self.recovery_map_points), "replayed": self.replayed,
                "local_sqnr_db": _r(self.local_sqnr_db), "mean_recovery_db": _r(self.mean_recovery_db)}


@dataclass
class SensitivityResult:
    """Per-layer sensitivities plus the all-INT8 baseline. ``seconds`` is wall time (not in ``as_dict``)."""

    layers: dict[str, LayerSensitivity]
    int8_sqnr_db: float
    num_images: int
    fp32_map50_95: float | None = None
    int8_map50_95: float | None = None
    num_eval_images: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def has_map(self) -> bool:
        return self.fp32_map50_95 is not None

    @property
    def int8_drop_points(self) -> float | None:
        return None if not self.has_map else 100.0 * (self.fp32_map50_95 - self.int8_map50_95)

    def ranking(self) -> list[str]:
        """Layer names, most damaging first: by mAP damage when measured, then by SQNR damage, then name. Without
        damage measurements (``analyze(damage=False)``): most recovery (dB gained in float) first, layers not
        replayed last."""
        def key(s: LayerSensitivity):
            dm = -(s.damage_map_points or 0.0) if self.has_map else 0.0
            if s.damage_sqnr_db is None:
                rec = s.recovery_sqnr_db if math.isfinite(s.recovery_sqnr_db) else 1e9
                return (not s.replayed, round(dm, 6), -round(rec, 6), s.name)
            return (not s.replayed, round(dm, 6),
                    round(s.damage_sqnr_db, 6) if math.isfinite(s.damage_sqnr_db) else math.inf, s.name)
        return [s.name for s in sorted(self.layers.values(), key=key)]

    def as_dict(self) -> dict:
        """Deterministic JSON-ready form: rounded floats, layers in ranking order."""
        return {
            "metric_units": {"sqnr": "dB vs FP32 on calibration inputs, worst output", "map": "mAP50:95 points (x100)"},
            "num_images": self.num_images,
            "num_eval_images": self.num_eval_images,
            "int8_sqnr_db": _r(self.int8_sqnr_db),
            "fp32_map50_95": _r(self.fp32_map50_95, 6),
            "int8_map50_95": _r(self.int8_map50_95, 6),
            "int8_drop_points": _r(self.int8_drop_points),
            "ranking": self.ranking(),
            "layers": [self.layers[n].as_dict() for n in self.ranking()],
            "notes": list(self.notes),
        }


# ---- the analysis ------------------------------------------------------------------------------------------


def _mean_recovery(int8: SqnrAccumulator, without: SqnrAccumulator) -> tuple[float | None, float | None]:
    """(noise gain, dB) of keeping one layer in float, on the noise-to-signal ratio averaged over the outputs
    (see ``LayerSensitivity.mean_noise_gain``); (None, None) for a single output or nothing measured."""
    try:
        a, b = int8.per_output(), without.per_output()
    except UsageError:
        return None, None
    if len(a) < 2 or len(a) != len(b):
        return None, None
    na = sum(0.0 if d == math.inf else 10.0 ** (-d / 10.0) for d in a) / len(a)
    nb = sum(0.0 if d == math.inf else 10.0 ** (-d / 10.0) for d in b) / len(b)
    if na <= 0.0:
        return 0.0, 0.0
    return na - nb, (math.inf if nb <= 0.0 else 10.0 * math.log10(na / nb))


def _worst_db(acc: SqnrAccumulator) -> float:
    """The worst output's SQNR (dB), as the ``min_sqnr`` gate reads it: a detector's box coordinates (pixels)
    would otherwise drown its scores (0..1) in one pooled number."""
    return min(acc.per_output())


def _chunks(batches, size: int):
    for b in batches:
        for i in range(0, b.shape[0], size):
            yield b[i : i + size]


def _quantizer_flags(qmodel: nn.Module) -> list[tuple[TensorQuantizer, bool]]:
    return [(m, m._disabled) for m in qmodel.modules() if isinstance(m, TensorQuantizer)]


def _set_layer(module: nn.Module, int8: bool) -> None:
    for q in module.children():
        if isinstance(q, TensorQuantizer):
            q.enable() if int8 else q.disable()


def analyze(state: QuantState, *, num_images: int = 16, dataset: CocoDataset | None = None, progress: bool = True,
            chunk_size: int = 4, device: str | torch.device | None = None, damage: bool = True,
            replay=None) -> SensitivityResult:
    """Measure every quantizable layer's damage and recovery (see the module docstring).

    ``damage=False`` measures recovery only (half the replays; ``damage_sqnr_db`` is None): what the selection
    under ``min_int8_share`` needs. ``replay``: replay only these layers (the candidates
    ``quantkit.sensitivity.candidates`` picks); every other layer is listed with ``replayed=False`` and 0 dB
    (None: replay every layer). The analysis time scales with the number of replayed layers.

    state: a ``QuantState`` from ``quantize_recipe`` (calibrated). num_images: calibration inputs for SQNR.
    dataset: a small ``CocoDataset`` for mAP50:95 (None: SQNR only). chunk_size: images per replay chunk;
    memory ~ chunk_size x the activations a record keeps (YOLO-NAS S at 640x640: ~220 MB per image).
    The qmodel's precision (every quantizer's enable flag) is restored in ``finally``. ``device``: run the
    forwards there (``"cuda"``); None/``"cpu"``: the CPU path. The qmodel is moved back afterwards.
    """
    from quantkit.utils.device import module_device, on_device, resolve_device

    import time

    from quantkit.utils.progress import progress_bar

    if num_images < 1 or chunk_size < 1:
        raise UsageError(f"num_images and chunk_size must be >= 1, got {num_images} and {chunk_size}")
    t0 = time.perf_counter()
    qmodel, layout = state.model.qmodel, state.model.layout
    dev = module_device(qmodel) if device is None else resolve_device(device)
    names = list(layout.layers)
    if not names:
        raise UsageError("the model has no quantizable layers: nothing to analyse")
    chosen = names if replay is None else [n for n in names if n in set(replay)]
    unknown = [] if replay is None else sorted(set(replay) - set(names))
    if unknown:
        raise UsageError(f"replay names {unknown[:5]} are not quantizable layers: use names from the layout")
    modules = {n: qmodel.get_submodule(n) for n in chosen}
    others = {n: qmodel.get_submodule(n) for n in names if n not in modules}  # only their call order is read
    everything = set(names)
    batches = list(_chunks(state.data.batches(limit=num_images, spread=True), chunk_size))
    n_images = sum(int(b.shape[0]) for b in batches)
    items = [] if dataset is None else list(dataset)
    eval_chunks = [items[i : i + chunk_size] for i in range(0, len(items), chunk_size)]
    saved = _quantizer_flags(qmodel)
    full = SqnrAccumulator()
    dmg = {n: SqnrAccumulator() for n in chosen}
    rec_ = {n: SqnrAccumulator() for n in chosen}
    dets: dict[str, dict] = {}
    order: dict[str, int] = {}
    configs = 2 if damage else 1
    chunks = len(batches) + len(eval_chunks)
    bar = progress_bar(None, "sensitivity", "replay", enabled=False)
    try:
        with on_device(dev, qmodel), Replayer(qmodel, list(modules.values())) as rp:
            if progress and batches:  # say up front how long this will take, and weight the ETA by it
                bar = _estimated_bar(rp, qmodel, modules, everything, batches[0].to(dev), chunks, configs)
            for x in batches:
                x = x.to(dev)
                for n, out in _configs(rp, qmodel, modules, everything, x, order, damage, others):
                    if n == "fp32":
                        ref = out
                    elif n == "int8":
                        full.update(ref, out)
                    else:
                        (dmg if n[0] == "d" else rec_)[n[1]].update(ref, out)
                        bar.update()
            for chunk in eval_chunks:
                x = torch.from_numpy(np.stack([_preprocess(img, state.pp) for _, img, _ in chunk])).to(dev)
                for n, out in _configs(rp, qmodel, modules, everything, x, order, damage, others):
                    _collect_dets(dets, n, out, chunk, state)
                    bar.update(isinstance(n, tuple))
    finally:
        bar.close()
        for q, disabled in saved:
            q._disabled = disabled
    int8_db = _worst_db(full)
    notes = [f"{n}: never called in forward (no effect)" for n in names if n not in order]
    if len(chosen) < len(names):
        notes.append(f"recovery replayed for {len(chosen)} of {len(names)} layers (the candidates); the others "
                     "read 0 dB, not measured")
    maps = _maps(dets, dataset) if dataset is not None else {}
    layers = {}
    for i, n in enumerate(sorted(names, key=lambda n: (order.get(n, math.inf), names.index(n)))):
        if n not in modules:  # not replayed: nothing measured, recovery reads 0 dB
            layers[n] = LayerSensitivity(n, layout.layers[n], i, None if not damage else math.inf, int8_db, 0.0,
                                         replayed=False)
            continue
        d_db = (_worst_db(dmg[n]) if n in order else math.inf) if damage else None
        w_db = _worst_db(rec_[n]) if n in order else int8_db
        dm = rm = None
        if maps:
            dm = 100.0 * (maps["fp32"] - maps.get(("d", n), maps["fp32"]))
            rm = 100.0 * (maps.get(("r", n), maps["int8"]) - maps["int8"])
        gain, mean_db = _mean_recovery(full, rec_[n]) if n in order else (None, None)
        layers[n] = LayerSensitivity(n, layout.layers[n], i, d_db, w_db, w_db - int8_db, dm, rm,
                                     mean_noise_gain=gain, mean_recovery_db=mean_db)
    return SensitivityResult(layers, int8_db, n_images, maps.get("fp32"), maps.get("int8"), len(items),
                             time.perf_counter() - t0, notes)


def _estimated_bar(rp: Replayer, qmodel, modules, everything, x, chunks: int, configs: int):
    """Time one recorded all-INT8 forward of ``x``, log the analysis' expected duration (see
    ``quantkit.sensitivity.plan``) and return its progress bar: one step per replay (``configs`` per called layer
    and chunk), weighted by the share of a forward each replays, a record's full forward on each block's first."""
    import logging

    from quantkit.sensitivity.plan import estimate_from_record
    from quantkit.utils.progress import progress_bar

    set_precision(qmodel, everything)  # the dearer configuration (fake-quant); _configs sets its own
    rec = rp.record(x)
    rec.nodes.clear()  # only the timings are kept
    est, tails = estimate_from_record(rec, [id(m) for m in modules.values()], chunks, configs)
    logging.getLogger("quantkit").info("%s", est.message())
    block = [t + (1.0 if i == 0 else 0.0) for i, t in enumerate(tails)]  # a block opens with its record
    return progress_bar(chunks * configs * len(tails), "sensitivity", "replay", weights=block * (chunks * configs))


def _configs(rp: Replayer, qmodel, modules, everything, x, order, damage: bool = True, unreplayed=None):
    """Yield (config, outputs) for one chunk: "fp32", ("d", L) for every layer (``damage``), "int8", ("r", L)
    for every layer. ``order`` records each layer's first call (in the first pass that replays layers; for the
    ``unreplayed`` modules, name -> module, from the first record).

    The all-float record is dropped before the all-INT8 one is made, so only one record's activations are
    held at a time (memory ~ chunk images x the model's activations).
    """
    set_precision(qmodel, set())
    rec = rp.record(x)
    for n, m in (unreplayed or {}).items():
        if rp.start_of(rec, m) is not None:
            order.setdefault(n, rp.start_of(rec, m))
    yield "fp32", rec.output
    if damage:
        yield from _flip_each(rp, modules, x, rec, "d", int8=True, order=order)
    rec.nodes.clear()
    set_precision(qmodel, everything)
    rec = rp.record(x)
    yield "int8", rec.output
    yield from _flip_each(rp, modules, x, rec, "r", int8=False, order=None if damage else order)
    rec.nodes.clear()


def _flip_each(rp: Replayer, modules, x, rec, tag: str, *, int8: bool, order: dict | None = None):
    """Yield ((tag, L), outputs) with layer L alone switched to ``int8`` (INT8 or float) against record ``rec``,
    replayed from L's first call; L is switched back after. ``order``, if given, records each layer's first call."""
    for n, m in modules.items():
        start = rp.start_of(rec, m)
        if start is None:
            continue
        if order is not None:
            order.setdefault(n, start)
        _set_layer(m, int8)
        try:
            out = rp.replay(x, rec, start)
        finally:
            _set_layer(m, not int8)
        yield (tag, n), out


def _preprocess(img, pp) -> np.ndarray:
    from quantkit.data.preprocess import preprocess_image

    return preprocess_image(img, pp)[0]


def _collect_dets(dets: dict, config, out, chunk, state: QuantState) -> None:
    """NMS the detector outputs of one eval chunk and file them under ``config``."""
    from quantkit.eval.detection import _unpack_outputs, predict_dataset

    boxes, scores = (t.float().cpu().numpy() for t in _unpack_outputs(out))
    ev = state.recipe.evaluation
    got = predict_dataset(lambda _x: (boxes, scores), chunk, state.pp, batch_size=len(chunk), conf=ev.conf,
                          iou=ev.iou, progress=False)
    entry = dets.setdefault(config, {"dets": {}, "classes": 0})
    entry["dets"].update(got)
    entry["classes"] = max(entry["classes"], int(scores.shape[-1]))


def _maps(dets: dict, dataset) -> dict:
    from quantkit.eval.detection import coco_map

    return {k: coco_map(dataset, v["dets"], num_classes=v["classes"]).map50_95 for k, v in dets.items()}
