"""The calibration pass: one forward loop over real data fills a histogram per activation quantizer.

The caller owns the data; :func:`calibration_mode` attaches collectors and restores quantizer state in
``finally``. Every method's amax is computed from the same histograms, so the result can switch method
without another pass (and is what the calibration cache stores).
"""

from __future__ import annotations

import math

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterable

import torch
from torch import nn

from quantkit.calibrate.histogram import HistogramCollector, SharedBatchStats
from quantkit.calib_methods import CalibMethod, MethodSettings
from quantkit.errors import CalibrationError, ModelError
from quantkit.quant.tensor_quantizer import TensorQuantizer
from quantkit.utils import interrupt
from quantkit.utils.progress import progress_bar
from quantkit.quote import cap

PERCENTILES = (99.9, 99.99, 99.999)


def _activation_quantizers(model: nn.Module) -> list[tuple[str, TensorQuantizer]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, TensorQuantizer) and not m.is_per_channel]


@contextmanager
def calibration_mode(model: nn.Module, settings: MethodSettings):
    """Attach a HistogramCollector to every per-tensor quantizer (enabled or not) and switch it to calib mode.

    Disabled quantizers are calibrated too (temporarily enabled), so one pass serves any later selection.
    """
    qs = _activation_quantizers(model)
    saved = [(q._disabled, q._if_calib, q._if_quant) for _, q in qs]
    shared = SharedBatchStats()
    for name, q in qs:
        q.collector = HistogramCollector(num_bins=settings.num_bins, name=name, shared=shared)
        q.enable()
        q.enable_calib()
    try:
        yield qs
    finally:
        for (_, q), (disabled, calib, quant) in zip(qs, saved):
            q._disabled, q._if_calib, q._if_quant = disabled, calib, quant


@dataclass
class CalibrationResult:
    """Per-tensor amax for every method. ``tensors``: quantizer name -> {method key -> amax}.

    method keys: "max", "percentile_<p>", "entropy", "mse". ``num_samples``: inputs seen.
    """

    tensors: dict[str, dict[str, float]] = field(default_factory=dict)
    num_samples: int = 0

    def amax_for(self, name: str, settings: MethodSettings) -> float:
        values = self.tensors[name]
        key = method_key(settings)
        if key not in values:
            raise CalibrationError(f"no '{key}' amax recorded for {cap(name)}; recalibrate (delete the cache)")
        return values[key]

    def as_dict(self) -> dict:
        return {"num_samples": self.num_samples, "tensors": self.tensors}

    @classmethod
    def from_dict(cls, d: dict) -> "CalibrationResult":
        """The inverse of ``as_dict``; ValueError on a non-finite amax (a damaged cache, "nan" as a string)."""
        tensors = {k: {m: float(v) for m, v in d2.items()} for k, d2 in d["tensors"].items()}
        bad = [k for k, d2 in tensors.items() if not all(math.isfinite(v) for v in d2.values())]
        if bad:
            raise ValueError(f"non-finite amax for tensor {bad[0][:200]!r}")
        return cls(tensors=tensors, num_samples=int(d["num_samples"]))


def method_key(settings: MethodSettings) -> str:
    m = CalibMethod(settings.method)
    return f"percentile_{settings.percentile:g}" if m is CalibMethod.PERCENTILE else m.value


@contextmanager
def fixed_threads(n: int | None):
    """Run torch with ``n`` intra-op threads inside the block (None: leave as is).

    oneDNN's conv kernels sum in a thread-count-dependent order, so activations differ in the last bits across
    machines; a histogram bin edge can then move an amax. One thread makes calibration machine-independent.
    """
    if n is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def run_calibration(
    model: nn.Module, batches: Iterable[torch.Tensor], settings: MethodSettings, *, total: int | None = None,
    progress: bool = True, threads: int | None = None, device: str | torch.device | None = None,
) -> CalibrationResult:
    """Run the calibration pass and compute every method's amax per activation tensor.

    ``threads``: pin torch's intra-op threads during the pass (1 gives results independent of the machine).
    ``device``: run the forward passes there (``"cuda"``); the model is moved back to its device afterwards.
    None or ``"cpu"`` is the CPU path, unchanged. The histograms then live on that device too.
    """
    from quantkit.utils.device import module_device, on_device, resolve_device

    dev = module_device(model) if device is None else resolve_device(device)
    model.eval()
    n = 0
    with torch.no_grad(), fixed_threads(threads), on_device(dev, model), calibration_mode(model, settings) as qs:
        with progress_bar(total, "calibrating", "batch", enabled=progress) as bar:
            for batch in batches:
                try:
                    model(batch.to(dev) if batch.device != dev else batch)
                except CalibrationError:
                    raise
                except (RuntimeError, ValueError) as exc:
                    raise ModelError(
                        f"the model rejects calibration input of shape {tuple(batch.shape)}: {exc}. "
                        "Pass data of the model's input size (input.size in the recipe) and channel count"
                    ) from exc
                n += batch.shape[0]
                bar.update(1)
                interrupt.test_point("calibration")
        percentiles = tuple(sorted({*PERCENTILES, settings.percentile}))
        result = CalibrationResult(num_samples=n)
        searched: dict[tuple, dict[str, float]] = {}  # quantizers fed the same tensor have equal histograms
        for name, q in qs:
            key = q.collector.content_key()
            if key not in searched:
                searched[key] = q.collector.all_amax(percentiles=percentiles, settings=settings)
            result.tensors[name] = dict(searched[key])
            q.collector = None
    return result


def apply_calibration(model: nn.Module, result: CalibrationResult, settings: MethodSettings) -> dict[str, float]:
    """Set every activation quantizer's amax from ``result`` for ``settings``' method. Returns name -> amax.

    An amax of 0 (a tensor that was always zero), NaN or Inf is an error naming the layer.
    """
    chosen = {}
    for name, q in _activation_quantizers(model):
        if name not in result.tensors:
            raise CalibrationError(f"no calibration for {cap(name)}: the calibration result does not match the model; "
                                   "recalibrate (delete the calibration cache)")
        amax = result.amax_for(name, settings)
        if not (amax > 0 and amax < float("inf")):
            raise CalibrationError(
                f"{name}: calibrated amax is {amax} (the tensor was all zero, NaN or Inf on the calibration data). "
                f"Check the data, or keep the layer in float with quantization.skip=[{name.rsplit('.', 1)[0]}]"
            )
        q.amax = amax
        chosen[name] = amax
    return chosen
