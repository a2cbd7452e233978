"""Per-layer INT8-vs-FP32 error and per-tensor activation histograms, from forward hooks over a few batches.

For every quantizable layer L, two numbers (dB, float64 sums over all batches; see ``quantkit.sqnr``):

* ``output_sqnr_db``: L's output in the fake-quant model (as exported: INT8 where enabled, upstream error
  included) against L's output in the FP32 model — where along the network the error builds up;
* ``input_quant_sqnr_db``: L's input activation against that activation fake-quantized with its calibrated
  amax (whether or not L is INT8) — how much the one quantizer itself costs, which is what calibration controls.

Alongside, a histogram of |x| of each activation quantizer's input over [0, ``hist_upper[name]``] (values
above land in the last bin), for the calibration chart. Nothing is kept between batches except the sums.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable

import torch
from torch import nn

from quantkit.quant.tensor_quantizer import QMAX, QMIN, TensorQuantizer

HIST_BINS = 256


@dataclass
class EnergySum:
    """Signal and noise energies of a layer's output summed over batches (float32 elementwise, float64
    sums); ``db()`` the SQNR. Also the ONNX route's per-node table (``quantkit.onnx_layer_errors``)."""

    signal: float = 0.0
    noise: float = 0.0

    def add(self, ref: torch.Tensor, test: torch.Tensor) -> None:
        r, t = ref.detach().float(), test.detach().float()
        d = r - t  # float32 elementwise, float64 accumulation: no float64 copies of the activations
        self.signal += float(torch.sum(r * r, dtype=torch.float64))
        noise = float(torch.sum(d * d, dtype=torch.float64))
        self.noise += noise if math.isfinite(noise) else math.inf

    def db(self) -> float:
        if not math.isfinite(self.noise):
            return -math.inf
        if self.noise == 0.0:
            return math.inf
        return -math.inf if self.signal == 0.0 else 10.0 * math.log10(self.signal / self.noise)


@dataclass
class LayerError:
    """One quantizable layer's measured error (dB; +inf: exact, e.g. an FP16 layer before any INT8 one)."""

    name: str
    type: str
    precision: str
    output_sqnr_db: float
    input_quant_sqnr_db: float | None


@dataclass
class TensorHistogram:
    """|x| counts of one activation tensor in ``len(counts)`` equal bins over [0, ``upper``]."""

    name: str
    upper: float
    counts: list[int] = field(default_factory=list)


@dataclass
class LayerErrorResult:
    layers: list[LayerError]
    histograms: dict[str, TensorHistogram]
    num_samples: int


def _first_tensor(out) -> torch.Tensor | None:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        for o in out:
            t = _first_tensor(o)
            if t is not None:
                return t
    return None


def _fake_quant(x: torch.Tensor, amax: float) -> torch.Tensor:
    scale = torch.tensor(amax / QMAX, dtype=torch.float32, device=x.device)
    zp = torch.zeros((), dtype=torch.int32, device=x.device)
    return torch.fake_quantize_per_tensor_affine(x.float(), scale, zp, QMIN, QMAX)


def measure_layer_errors(fp32: nn.Module, qmodel: nn.Module, layers: dict[str, str], int8: Iterable[str],
                         batches: Iterable[torch.Tensor], amax: dict[str, float], *,
                         hist_upper: dict[str, float] | None = None, bins: int = HIST_BINS,
                         device: torch.device | str | None = None, chunk: int = 2) -> LayerErrorResult:
    """Run ``fp32`` and ``qmodel`` over ``batches`` with hooks (see the module docstring).

    layers: name -> type of the quantizable layers (module names shared by both models). int8: the enabled ones.
    amax: activation quantizer name (``L._input_quantizer``) -> chosen amax. hist_upper: quantizer name -> the
    histogram's upper edge (e.g. the calibration's max amax); None: no histograms. Models are put in eval mode,
    moved to ``device`` for the passes and back after. ``chunk``: inputs per forward; memory ~ chunk x all layer
    outputs of one input (the FP32 outputs are copied: in-place activations would overwrite them).
    """
    from quantkit.utils.device import module_device, on_device, resolve_device

    dev = module_device(qmodel) if device is None else resolve_device(device)
    int8 = set(int8)
    out_energy = {n: EnergySum() for n in layers}
    in_energy = {n: EnergySum() for n in layers}
    hists: dict[str, torch.Tensor] = {}
    hist_upper = hist_upper or {}
    ref_out: dict[str, list[torch.Tensor]] = {}  # a module called twice per forward has two outputs
    handles = []

    def fp32_hook(name):
        def hook(_m, _inp, out):
            t = _first_tensor(out)
            if t is not None:
                ref_out.setdefault(name, []).append(t.detach().clone())  # later in-place ops (ReLU) would change it
        return hook

    def q_hook(name):
        def hook(_m, _inp, out):
            t = _first_tensor(out)
            if t is not None and ref_out.get(name):
                out_energy[name].add(ref_out[name].pop(0), t)
        return hook

    def quantizer_hook(layer, qname):
        def hook(_m, args):
            x = args[0].detach()
            if qname in amax and amax[qname] > 0:
                in_energy[layer].add(x, _fake_quant(x, amax[qname]))
            upper = hist_upper.get(qname)
            if upper and upper > 0:  # bin j holds [j, j+1) * upper/bins; bincount is ~2.5x faster than histc
                idx = (x.float().abs() * (bins / upper)).clamp_(max=bins - 1).to(torch.int32).flatten()
                h = torch.bincount(idx, minlength=bins).cpu()
                hists[qname] = hists[qname] + h if qname in hists else h
        return hook

    fp32_mods, q_mods = dict(fp32.named_modules()), dict(qmodel.named_modules())
    n = 0
    try:
        for name in layers:
            handles.append(fp32_mods[name].register_forward_hook(fp32_hook(name)))
            handles.append(q_mods[name].register_forward_hook(q_hook(name)))
            q = getattr(q_mods[name], "_input_quantizer", None)
            if isinstance(q, TensorQuantizer):
                handles.append(q.register_forward_pre_hook(quantizer_hook(name, f"{name}._input_quantizer")))
        fp32.eval()
        qmodel.eval()
        with torch.no_grad(), on_device(dev, fp32, qmodel):
            for batch in batches:
                for i in range(0, batch.shape[0], chunk):  # every layer's FP32 output is held for one chunk
                    x = batch[i : i + chunk].to(dev)
                    fp32(x)
                    qmodel(x)
                    ref_out.clear()
                    n += int(x.shape[0])
    finally:
        for h in handles:
            h.remove()
    rows = [LayerError(name, t, "int8" if name in int8 else "fp16", out_energy[name].db(),
                       in_energy[name].db() if in_energy[name].signal or in_energy[name].noise else None)
            for name, t in layers.items()]
    histograms = {k: TensorHistogram(k, float(hist_upper[k]), [int(c) for c in v.tolist()])
                  for k, v in hists.items()}
    return LayerErrorResult(rows, histograms, n)
