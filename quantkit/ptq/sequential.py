"""One sequential pass over the quantized model: per-layer range choice, learned rounding, bias correction.

The fake-quant model runs once on a batch of calibration images; every INT8 layer is processed when the
forward reaches it, so it sees the inputs the quantized model really produces (every upstream choice applied):

1. **range choice** (consumer-aware): among the amax candidates of the layer's input quantizer (every method
   the one-pass histograms gave: max, percentiles, entropy, mse, plus a geometric grid between the smallest
   and the largest of them), pick the one that minimises the squared error of the *consuming layer's output*
   ``layer(Q(x), Q(W))`` against ``layer(x, W)`` — not the activation's own error. With bias correction on,
   the per-channel mean of that error is not counted (bias correction removes it). A residual Add's skip input is judged by its own error
   (the Add's output error is exactly that).
2. **learned rounding** (``adaround.learn_rounding``): the layer's weights re-rounded to reconstruct
   ``layer(x, W)`` from ``Q(x)``; installed as ``s*q`` floats so the export's int8 weights are the learned ones.
3. **bias correction** (empirical, per output channel): the mean of the layer's output in the quantized model
   minus its mean in the FP32 model (same images) is subtracted from the bias, and from the running output so
   later layers see the corrected activations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from quantkit.calibrate.driver import CalibrationResult
from quantkit.quant.modules import QuantAdd, QuantConv2d, QuantLinear, QuantModule
from quantkit.quant.tensor_quantizer import QMAX, QMIN
from quantkit.ptq.adaround import RoundingResult, layer_output, learn_rounding

# Bias correction needs this many averaged values per channel (images x output pixels): a classifier's final
# Linear sees one value per image, and its per-class mean over a few dozen calibration images is mostly noise.
BIAS_MIN_SAMPLES = 256
GRID_STEPS = 12  # geometric grid steps between the smallest and largest method amax


@dataclass(frozen=True)
class SequentialOptions:
    """What the pass does. Image counts are first-axis rows of the batch handed to :func:`sequential_pass`."""

    range_choice: bool = False
    range_choice_images: int = 8
    adaround: bool = False
    adaround_iterations: int = 300
    adaround_seconds: float = 0.0  # per layer; 0: iterations only (deterministic)
    adaround_batch: int = 4
    bias_correction: bool = False

    @property
    def any(self) -> bool:
        return self.range_choice or self.adaround or self.bias_correction


@dataclass
class LayerPtq:
    """What the pass did to one layer (JSON-ready through ``as_dict``)."""

    amax_before: float | None = None
    amax_after: float | None = None
    amax_source: str | None = None
    consumer_err_before: float | None = None  # relative squared error of the layer output
    consumer_err_after: float | None = None
    rounding: RoundingResult | None = None
    bias_shift_abs_mean: float | None = None
    note: str | None = None  # a step this layer's type does not take

    def as_dict(self) -> dict:
        def r(v):
            return None if v is None else float(f"{v:.6g}")

        d = {"amax_before": r(self.amax_before), "amax_after": r(self.amax_after), "amax_source": self.amax_source,
             "consumer_err_before": r(self.consumer_err_before), "consumer_err_after": r(self.consumer_err_after)}
        if self.rounding is not None:
            d["rounding"] = self.rounding.as_dict()
        if self.bias_shift_abs_mean is not None:
            d["bias_shift_abs_mean"] = r(self.bias_shift_abs_mean)
        if self.note:
            d["note"] = self.note
        return d


def _fq(x: torch.Tensor, amax: float) -> torch.Tensor:
    scale = float(amax) / QMAX
    return torch.fake_quantize_per_tensor_affine(x, scale, 0, QMIN, QMAX)


def _candidates(values: dict[str, float]) -> list[tuple[str, float]]:
    """The methods' amax values plus a geometric grid between the smallest and the largest of them (the
    histogram methods bound how much clipping is ever considered)."""
    out = [(k, float(v)) for k, v in sorted(values.items()) if v > 0 and math.isfinite(v)]
    if not out:
        return out
    lo, hi = min(v for _, v in out), max(v for _, v in out)
    if hi > lo:
        out += [(f"grid_{k}", hi * (lo / hi) ** (k / GRID_STEPS)) for k in range(1, GRID_STEPS)]
    return out


def _choose(err_of, values: dict[str, float], current: float) -> tuple[str, float, float, float]:
    """(source, amax, err(current), err(best)) minimising ``err_of(amax)``; ties keep the earlier candidate."""
    base = err_of(current)
    best = ("calibrated", current, base)
    for key, a in _candidates(values):
        e = err_of(a)
        if e < best[2] * (1 - 1e-9):
            best = (key, a, e)
    return best[0], best[1], base, best[2]


def _channel_axis(m: nn.Module, y: torch.Tensor) -> int:
    """The output-channel axis of ``m``'s output ``y``: the last one for a Linear (which acts on the last axis
    of an N-D input: channels-last tokens), axis 1 for convolutions (NCHW)."""
    return y.dim() - 1 if isinstance(m, nn.Linear) else min(1, y.dim() - 1)


def _channel_mean(y: torch.Tensor, axis: int = 1) -> torch.Tensor:
    """Mean over every axis but ``axis``: one value per output channel."""
    return y.mean(dim=[d for d in range(y.dim()) if d != axis]) if y.dim() > 1 else y


def _per_channel(v: torch.Tensor, like: torch.Tensor, axis: int) -> torch.Tensor:
    """``v`` (one value per channel) shaped to broadcast against ``like`` along ``axis``."""
    shape = [1] * like.dim()
    shape[axis] = -1
    return v.reshape(shape)


def fp32_channel_means(fp32: nn.Module, names: list[str], x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-output-channel mean of each named module's output in the FP32 model on ``x`` (first call)."""
    means: dict[str, torch.Tensor] = {}
    hooks = []
    for n in names:
        def post(m, _a, out, n=n):
            if n not in means:
                means[n] = _channel_mean(out.detach(), _channel_axis(m, out)).double()
        hooks.append(fp32.get_submodule(n).register_forward_hook(post))
    try:
        with torch.no_grad():
            fp32(x)
    finally:
        for h in hooks:
            h.remove()
    return means


def _desc(opts: SequentialOptions) -> str:
    """The progress line's stage: which of the passes run (``PTQ (range choice, bias correction)``)."""
    names = [n for n, on in (("range choice", opts.range_choice), ("AdaRound", opts.adaround),
                             ("bias correction", opts.bias_correction)) if on]
    return f"PTQ ({', '.join(names)})"


def sequential_pass(qmodel: nn.Module, fp32: nn.Module, x: torch.Tensor, calib: CalibrationResult,
                    opts: SequentialOptions, *, progress: bool = True) -> dict[str, LayerPtq]:
    """Run the pass (see the module docstring) on the batch ``x``; modifies ``qmodel``'s input amax, weights
    and biases in place (``fp32`` is only read). Returns layer name -> what was done, in execution order.
    ``progress``: a progress line per interval, counting the FP32 pass and then each layer."""
    from quantkit.utils.progress import progress_bar

    # every quantized layer: the dedicated wrappers and the generic one (a Conv2d subclass such as a "same"-padding
    # conv, Conv1d, ConvTranspose2d), so bias correction covers what the registry quantized
    layers = {n: m for n, m in qmodel.named_modules()
              if isinstance(m, QuantModule) and m._input_quantizer.enabled}
    biased = [n for n, m in layers.items() if not isinstance(m, QuantAdd) and m._weight_quantizer.enabled]
    # the FP32 pass costs about the whole bias-corrected pass; range choice and AdaRound add per-layer work
    heavy = opts.range_choice or opts.adaround
    first = 0.0 if not opts.bias_correction else (len(layers) * (0.2 if heavy else 1.0))
    bar = progress_bar(1 + len(layers), _desc(opts), "layer", enabled=progress, weights=(first, *[1.0] * len(layers)))
    try:
        return _sequential(qmodel, fp32, x, calib, opts, layers, biased, bar)
    finally:
        bar.close()


def _sequential(qmodel, fp32, x, calib, opts, layers, biased, bar) -> dict[str, LayerPtq]:
    means = fp32_channel_means(fp32, biased, x) if opts.bias_correction else {}
    bar.update()
    report: dict[str, LayerPtq] = {}
    hooks = []
    saved_grad = [(p, p.requires_grad) for p in qmodel.parameters()]
    for p, _ in saved_grad:
        p.requires_grad_(False)

    def pre(m, args, name):
        if name in report:
            return None
        rec = report[name] = LayerPtq()
        q = m._input_quantizer
        if isinstance(m, QuantAdd):
            if opts.range_choice and q.name in calib.tensors:
                s = args[1][: opts.range_choice_images]
                def err_add(a):
                    return float(((_fq(s, a) - s) ** 2).sum() / (s ** 2).sum().clamp_min(1e-30))
                rec.amax_before = float(q.amax)
                rec.amax_source, a, rec.consumer_err_before, rec.consumer_err_after = _choose(
                    err_add, calib.tensors[q.name], float(q.amax))
                q.amax = a
                rec.amax_after = a
            return None
        if (opts.range_choice or opts.adaround) and type(m) not in (QuantConv2d, QuantLinear):
            rec.note = (f"range choice and learned rounding take Conv2d and Linear layers, not "
                        f"{type(m).__name__}: only bias correction applies")
            return None
        xin = args[0]
        w = m.weight
        wq = m._weight_quantizer(w) if m._weight_quantizer.enabled else w
        if opts.range_choice and q.name in calib.tensors:
            xs = xin[: opts.range_choice_images]
            ts = layer_output(m, xs, w)
            norm = float((ts ** 2).sum().clamp_min(1e-30))

            def err(a):
                e = layer_output(m, _fq(xs, a), wq) - ts
                if opts.bias_correction:  # the mean error per channel is removed by bias correction later
                    axis = _channel_axis(m, e)
                    e = e - _per_channel(_channel_mean(e, axis), e, axis)
                return float((e ** 2).sum()) / norm

            rec.amax_before = float(q.amax)
            rec.amax_source, a, rec.consumer_err_before, rec.consumer_err_after = _choose(
                err, calib.tensors[q.name], float(q.amax))
            q.amax = a
            rec.amax_after = a
        if opts.adaround and m._weight_quantizer.enabled:
            target = layer_output(m, xin, w)
            scale = m._weight_quantizer.amax.float() / QMAX
            w_new, rec.rounding = learn_rounding(
                m, scale, q(xin), target, iterations=opts.adaround_iterations, seconds=opts.adaround_seconds,
                batch=opts.adaround_batch, seed=len(report))
            m.weight.data.copy_(w_new)
        return None

    counted: set[str] = set()

    def post(m, args, out, name):
        if name not in counted:  # a layer called twice is one step (its first call is the one corrected)
            counted.add(name)
            bar.update()
        if not opts.bias_correction or name not in means or report[name].bias_shift_abs_mean is not None:
            return None
        axis = _channel_axis(m, out)
        if out.numel() // max(out.shape[axis], 1) < BIAS_MIN_SAMPLES:
            return None
        shift = (_channel_mean(out, axis).double() - means[name]).to(out.dtype)
        if m.bias is None:
            m.bias = nn.Parameter(torch.zeros(shift.numel(), dtype=out.dtype), requires_grad=False)
        m.bias.data.sub_(shift)
        report[name].bias_shift_abs_mean = float(shift.abs().mean())
        return out - _per_channel(shift, out, axis)

    for n, m in layers.items():
        hooks.append(m.register_forward_pre_hook(lambda mod, a, n=n: pre(mod, a, n)))
        hooks.append(m.register_forward_hook(lambda mod, a, o, n=n: post(mod, a, o, n)))
    try:
        with torch.no_grad():
            qmodel(x)
    finally:
        for h in hooks:
            h.remove()
        for p, g in saved_grad:
            p.requires_grad_(g)
    return report


__all__ = ["SequentialOptions", "LayerPtq", "sequential_pass", "fp32_channel_means"]
