"""The calibration pass keeps no activation: the tensor memory alive between batches does not grow with their number.

Counted exactly, not timed: before each batch is handed to ``run_calibration`` the test sums the bytes of every
live torch tensor the garbage collector can see (one count per storage). Feeding the same batch again and again
keeps the histograms' ranges fixed, so from the second batch on the sum must be identical; a collector that kept
what it saw (the control below) makes it grow by one activation per quantizer per batch. Peak RSS for 64 vs 512
real images is measured in ``benchmarks/calibration_speed.py``.
"""

from __future__ import annotations

import gc

import pytest
import torch
from torch import nn

from quantkit.calibrate import histogram
from quantkit.calibrate.driver import run_calibration
from quantkit.calib_methods import CalibMethod, MethodSettings
from quantkit.quant.insert import insert_quantizers

BATCHES = 6


def _live_tensor_bytes() -> int:
    gc.collect()
    seen, total = set(), 0
    for obj in gc.get_objects():
        if issubclass(type(obj), torch.Tensor) and not obj.is_meta:  # type(): no __class__ proxies
            storage = obj.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
    return total


def _model() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=8),
                        nn.ReLU(), nn.Conv2d(8, 16, 1), nn.Flatten(), nn.Linear(16 * 32 * 32, 4)).eval()
    qmodel, _ = insert_quantizers(net)
    return qmodel


def _counted_batches(record: list[int]):
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    for _ in range(BATCHES):
        record.append(_live_tensor_bytes())
        yield x.clone()  # a fresh tensor each time, as a loader gives; the previous one must be freed


def test_live_tensor_memory_is_constant_across_batches():
    qmodel = _model()
    record: list[int] = []
    result = run_calibration(qmodel, _counted_batches(record), MethodSettings(method=CalibMethod.ENTROPY),
                             progress=False)
    assert result.num_samples == 2 * BATCHES and len(result.tensors) == 4
    assert len(record) == BATCHES
    assert len(set(record[1:])) == 1, record  # histograms allocated at batch 1; nothing accumulates after


def test_the_count_sees_a_collector_that_keeps_activations(monkeypatch):
    kept: list[torch.Tensor] = []
    original = histogram.HistogramCollector.collect

    def leaky(self, x):
        kept.append(x.clone())  # a copy: the shared batch memo then drops its entry for x as usual
        original(self, x)

    monkeypatch.setattr(histogram.HistogramCollector, "collect", leaky)
    record: list[int] = []
    run_calibration(_model(), _counted_batches(record), MethodSettings(method=CalibMethod.ENTROPY), progress=False)
    growth = [b - a for a, b in zip(record[1:], record[2:])]
    per_batch = sum(t.untyped_storage().nbytes() for t in kept[:4])  # one batch's four quantizer inputs
    assert growth == [pytest.approx(per_batch, rel=0.01)] * (BATCHES - 2), (growth, per_batch)
