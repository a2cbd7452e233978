"""The guard: every PTQ pass is kept only when it improves INT8-vs-FP32 output fidelity on images it did not fit on.

The calibration images are split once, deterministically, into a *fit* part (the passes' own images: the FP16
choice's replays, bias correction's means) and a *check* part spread over the set (disjoint from the fit part): :data:`CHECK_IMAGES` images, or one in
:data:`CHECK_SHARE` of a larger set up to :data:`MAX_CHECK_IMAGES` (8 images judge a cheap network's steps by
noise: on MTCNN's ONet, 8 of 256 calibration crops ranked percentile above max calibration, 64 held-out crops the
other way round by 3 dB). The check forwards then cost about one calibration pass. The FP32 outputs on the check images are computed once; each pass costs one
fake-quant forward over them (the calibration-method choice one per method). The measure is the worst output's
SQNR in dB (as the ``min_sqnr`` gate and the FP16 choice read it). A pass whose check SQNR does not rise is
reverted: the fake-quant model, layout, calibration choice and reports are restored from a deep copy taken before
it ran, so the state is exactly the one before.

The calibration histograms themselves saw every image (one pass serves every method); the check images only judge.
"""

from __future__ import annotations

import copy
import logging
import time
from contextlib import contextmanager

import numpy as np
import torch

from quantkit.ptq.passes import PassData, PassResult, implementation_for, refuse_unrunnable

log = logging.getLogger("quantkit")

CHECK_IMAGES = 8  # held-out images per check at least (a forward each time a pass is judged)
CHECK_SHARE = 8  # a larger calibration set holds out one image in CHECK_SHARE ...
MAX_CHECK_IMAGES = 64  # ... up to this many
FIT_PER_CHECK = 3  # the check part takes at most 1 image in 1 + FIT_PER_CHECK


def check_count(n: int) -> int:
    """How many of ``n`` calibration images the guard holds out: ``max(CHECK_IMAGES, n // CHECK_SHARE)`` up to
    ``MAX_CHECK_IMAGES``, and never more than ``n // (1 + FIT_PER_CHECK)`` (0 when ``n`` is too small)."""
    return min(MAX_CHECK_IMAGES, max(CHECK_IMAGES, n // CHECK_SHARE), n // (1 + FIT_PER_CHECK))


def split_rows(n: int) -> tuple[list[int], list[int]]:
    """(fit rows, check rows) of a set of ``n`` images: :func:`check_count` check rows,
    each in the middle of an equal slice of the set (so spread over it, never the first or last image, which
    ``batches(spread=True)`` of the fit part favours); the rest fit. No check rows when ``n`` is too small."""
    k = check_count(n)
    check = sorted({int((i + 0.5) * n / k) for i in range(k)}) if k > 0 else []
    taken = set(check)
    return [i for i in range(n) if i not in taken], check


class RowView:
    """Some rows of a ``data.calib.CalibrationData``, with the same ``batches``/``num_samples`` interface (other
    attributes are the whole set's). Rows are loaded one batch at a time, like the set itself."""

    def __init__(self, data, rows: list[int]) -> None:
        self._data, self.rows = data, list(rows)

    def __getattr__(self, name):  # source, kind, input_shape, preprocess, batch_size ...
        return getattr(self._data, name)

    @property
    def num_samples(self) -> int:
        return len(self.rows)

    def __len__(self) -> int:
        return -(-len(self.rows) // self._data.batch_size)

    def batches(self, limit: int | None = None, *, spread: bool = False):
        n = len(self.rows) if limit is None else min(limit, len(self.rows))
        if spread and n < len(self.rows):
            idx = [int(round(i * (len(self.rows) - 1) / max(n - 1, 1))) for i in range(n)]
        else:
            idx = list(range(n))
        take = [self.rows[i] for i in idx]
        bs = self._data.batch_size
        for start in range(0, len(take), bs):
            yield _load_rows(self._data, take[start:start + bs])


def _load_rows(data, rows: list[int]) -> torch.Tensor:
    if data.array is not None:
        batch = np.stack([np.asarray(data.array[i], dtype=np.float32) for i in rows])
    else:
        from quantkit.data.images import load_image
        from quantkit.data.preprocess import preprocess_image

        batch = np.stack([preprocess_image(load_image(data.files[i]), data.preprocess)[0] for i in rows])
    return torch.from_numpy(np.ascontiguousarray(batch))


class Checker:
    """INT8-vs-FP32 worst-output SQNR (dB) of the state's fake-quant model on the check images; the FP32
    outputs are computed once."""

    def __init__(self, state, rows: list[int]) -> None:
        self.state = state
        self.batches = [b for b in RowView(state.data, rows).batches()]
        with torch.no_grad():
            self.refs = [state.model.fp32(b) for b in self.batches]
        self.count = 0  # fake-quant forwards run (the guard's cost)

    def __call__(self) -> float:
        from quantkit.sqnr import SqnrAccumulator

        acc = SqnrAccumulator()
        with torch.no_grad():
            for b, r in zip(self.batches, self.refs):
                acc.update(r, self.state.model.qmodel(b))
        self.count += 1
        return min(acc.per_output())


class TorchOps:
    """What the guard needs from the torch route's ``state.QuantState``: a check measure, a snapshot of everything a
    pass may change, and its restore. A target of another kind (``onnxin.target.OnnxTarget``) has the same three
    itself."""

    measure_text = "worst output's SQNR (dB) of the fake-quant model against FP32"

    def __init__(self, state) -> None:
        self.state = state

    def checker(self, rows: list[int]) -> Checker:
        return Checker(self.state, rows)

    def snapshot(self) -> dict:
        """Everything a pass may change, deep-copied (the FP32 model is never changed after calibration)."""
        st = self.state
        return {"qmodel": copy.deepcopy(st.model.qmodel), "layout": copy.deepcopy(st.model.layout),
                "chosen_amax": dict(st.calibration.chosen_amax), "method": st.calibration.method,
                "selection": st.selection, "ptq": copy.deepcopy(st.ptq)}

    def restore(self, snap: dict) -> None:
        st = self.state
        st.model.qmodel, st.model.layout = snap["qmodel"], snap["layout"]
        st.calibration.chosen_amax, st.calibration.method = snap["chosen_amax"], snap["method"]
        st.selection, st.ptq = snap["selection"], snap["ptq"]


def guard_ops(target):
    """The guard's view of ``target``: the target itself when it has ``checker``/``snapshot``/``restore``, else
    :class:`TorchOps` of the torch state."""
    return target if hasattr(target, "snapshot") and hasattr(target, "checker") else TorchOps(target)


@contextmanager
def _data_view(state, view):
    full = state.data
    state.data = view
    try:
        yield
    finally:
        state.data = full


def run_passes(state, passes, extras: dict | None = None) -> list[PassResult]:
    """Run ``passes`` (enabled ones, in order) on ``state`` (the target: the torch route's ``QuantState`` or the
    ONNX route's ``OnnxTarget``), each fitted on the fit images and kept only when the check SQNR rises; returns one
    result per pass (also set as ``state.passes``). With too few images to split, the passes run unchecked (said
    in each verdict). A pass the target cannot run (``ptq.passes.pass_needs``) is refused before any runs."""
    t_start = time.perf_counter()
    ops = guard_ops(state)
    refuse_unrunnable(passes, state.recipe, state)
    fit_rows, check_rows = split_rows(state.data.num_samples)
    # no step on in the recipe (e.g. --full-int8 with bias correction off): nothing to judge, no check forwards
    anything = any(p.enabled(state.recipe) for p in passes)
    checker = ops.checker(check_rows) if check_rows and anything else None
    data = PassData(fit=RowView(state.data, fit_rows), measure=checker, extras=dict(extras or {}))
    results: list[PassResult] = []
    current = checker() if checker else None
    for p in passes:
        label = p.label(state.recipe) if hasattr(p, "label") else p.name
        if not p.enabled(state.recipe):
            results.append(PassResult(label, tried=False, verdict="off in the recipe"))
            continue
        snap = ops.snapshot() if checker else None
        t0 = time.perf_counter()
        data.current_db = current
        with _data_view(state, data.fit):
            impl = implementation_for(p.name, state)  # a front end's own implementation for its kind of target
            res = (impl.apply if impl is not None else p.apply)(state, data)
        res.name, res.seconds = label, time.perf_counter() - t0
        if not res.changed and checker is None:
            res.kept, res.verdict = False, "no change"
        elif checker is None:
            res.kept, res.verdict = True, (f"kept unchecked: {state.data.num_samples} calibration image(s) are too "
                                           f"few to hold any out (needs {1 + FIT_PER_CHECK})")
        else:
            own = res.db_before is not None  # the pass judged itself in its own measure (both ends set)
            if not own:
                res.db_before, res.db_after = current, checker() if res.db_after is None else res.db_after
            if not res.changed:
                res.kept, res.verdict = False, "no change"
            elif res.required or res.db_after > res.db_before:
                res.kept, res.verdict = True, "kept: the recipe's budget requires it" if res.required else "kept"
                current = checker() if own else res.db_after  # a pass's own measure is not the guard's
            else:
                ops.restore(snap)
                res.kept, res.verdict = False, "reverted: no gain on the check images"
        log.info("PTQ step %s", res.log_line())
        results.append(res)
    # wall times (the run record's, not report.json's): each step, and the guard's own cost (FP32 references,
    # check forwards, snapshots; the calibration-method pass's forwards count as its own)
    state.passes_seconds = {"guard": time.perf_counter() - t_start - sum(r.seconds for r in results),
                            **{r.name: r.seconds for r in results if r.tried}}
    state.passes = {"check_images": len(check_rows), "fit_images": len(fit_rows),
                    "measure": ops.measure_text,
                    "forwards": checker.count if checker else 0, "steps": results}
    return results


__all__ = ["run_passes", "split_rows", "check_count", "RowView", "Checker", "TorchOps", "guard_ops", "CHECK_IMAGES",
           "MAX_CHECK_IMAGES"]
