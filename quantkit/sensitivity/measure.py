"""Measuring one precision configuration of the fake-quant model: the FP16 choice's verification step.

``make_measure`` returns ``measure(int8_layers) -> value`` in the analysis' units (worst-output SQNR in dB, or
mAP50:95 points dropped), restoring the model's precision after every call.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from quantkit.errors import UsageError
from quantkit.sqnr import SqnrAccumulator
from quantkit.quant.insert import set_precision
from quantkit.sensitivity.analysis import Metric, _quantizer_flags, _worst_db

if TYPE_CHECKING:  # pragma: no cover
    from quantkit.data.coco import CocoDataset
    from quantkit.state import QuantState


def make_measure(state: QuantState, metric: Metric, *, num_images: int = 16, dataset: CocoDataset | None = None,
                 device: str | torch.device | None = None, progress: bool = False) -> Callable[[set[str]], float]:
    """A callable ``measure(int8_layers) -> value`` for :func:`quantkit.sensitivity.select.choose_fp16_layers`.

    Metric.SQNR_DB: worst output's SQNR (dB) against FP32 on ``num_images`` calibration inputs.
    Metric.MAP_DROP_POINTS: FP32 minus INT8 mAP50:95 on ``dataset``, in points (needs ``dataset``).
    Each call sets the precision, measures, and restores the qmodel's previous precision. ``device``: where the
    forwards run (None/``"cpu"``: the CPU path); the models are moved there per call and back after.
    ``progress``: one labelled progress line per measurement (each is a pass over the data).
    """
    from quantkit.eval.detection import evaluate_detection, torch_predictor
    from quantkit.utils.device import module_device, on_device, resolve_device
    from quantkit.utils.progress import progress_bar

    layers = len(state.model.layout.layers)

    def label(int8: set[str]) -> str:
        return f"torch fake-quant with {layers - len(int8)} FP16 layer(s)"

    qmodel, fp32 = state.model.qmodel, state.model.fp32
    dev = module_device(qmodel) if device is None else resolve_device(device)
    if metric is Metric.MAP_DROP_POINTS:
        if dataset is None:
            raise UsageError("an mAP budget needs evaluation data: pass --eval DATA (or use an SQNR floor)")
        ev = state.recipe.evaluation
        kw = {"conf": ev.conf, "iou": ev.iou, "progress": progress}
        with on_device(dev, fp32):
            base = evaluate_detection(torch_predictor(fp32, dev), dataset, state.pp, label="FP32 torch (budget)",
                                      **kw).map50_95

        def run(int8: set[str]) -> float:
            with on_device(dev, qmodel):
                return 100.0 * (base - evaluate_detection(torch_predictor(qmodel, dev), dataset, state.pp,
                                                          label=label(int8), **kw).map50_95)
    else:
        batches = [b.to(dev) for b in state.data.batches(limit=num_images, spread=True)]
        with torch.no_grad(), on_device(dev, fp32):
            refs = [fp32(b) for b in batches]

        def run(int8: set[str]) -> float:
            acc = SqnrAccumulator()
            with torch.no_grad(), on_device(dev, qmodel), \
                    progress_bar(len(batches), f"measuring SQNR of {label(int8)}", "batch", enabled=progress) as bar:
                for b, r in zip(batches, refs):
                    acc.update(r, qmodel(b))
                    bar.update()
            return _worst_db(acc)

    def measure(int8_layers) -> float:
        saved = _quantizer_flags(qmodel)
        try:
            set_precision(qmodel, set(int8_layers))
            return run(set(int8_layers))
        finally:
            for q, disabled in saved:
                q._disabled = disabled

    return measure
