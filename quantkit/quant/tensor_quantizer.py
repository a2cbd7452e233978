"""TensorQuantizer: int8 symmetric fake quantization with pytorch-quantization-compatible state.

State names follow pytorch-quantization so checkpoints move between the two: the buffer ``_amax`` is a scalar
for per-tensor quantizers and shaped like the weight with 1s off the channel axis (``[C,1,1,1]`` for a Conv2d
weight) for per-channel ones. ``scale = amax / 127``, zero point 0, range [-128, 127] (TensorRT's convention;
torch's ONNX exporter turns the fake-quant ops into QuantizeLinear/DequantizeLinear).
"""

from __future__ import annotations

import torch
from torch import nn

from quantkit.errors import CalibrationError

NUM_BITS = 8
QMAX = 127
QMIN = -128


class TensorQuantizer(nn.Module):
    """Fake-quantizes a tensor with a calibrated ``_amax``.

    axis: None for per-tensor (activations), else the channel axis of per-channel quantization (weights: 0,
        ConvTranspose weights: 1).
    Modes: ``enable_calib()`` feeds every input to ``collector`` (set by the calibration driver) and passes
    the input through unchanged; ``enable_quant()`` (default) fake-quantizes once ``_amax`` is set;
    ``disable()`` makes it an identity (used for layers kept in higher precision and by sensitivity analysis).
    """

    def __init__(self, axis: int | None = None, name: str = ""):
        super().__init__()
        self.axis = axis
        self.name = name
        self.register_buffer("_amax", None)
        self.collector = None
        self._if_calib = False
        self._if_quant = True
        self._disabled = False

    # -- state ----------------------------------------------------------------------------------------------
    @property
    def amax(self) -> torch.Tensor | None:
        return self._amax

    @amax.setter
    def amax(self, value) -> None:
        t = torch.as_tensor(value, dtype=torch.float32).detach().clone()
        if not torch.isfinite(t).all():
            raise CalibrationError(
                f"amax of {self.name or 'a quantizer'} is NaN or Inf: the layer's activations are not finite; "
                "check the input data and model, or skip the layer (quantization.skip)"
            )
        self._amax = t

    @property
    def is_per_channel(self) -> bool:
        return self.axis is not None

    @property
    def enabled(self) -> bool:
        return not self._disabled

    def scale(self) -> torch.Tensor:
        """Quantization step size (``amax/127``); per-channel scales are flattened to shape [C]."""
        if self._amax is None:
            raise CalibrationError(f"quantizer {self.name} has no amax: run calibration before quantizing")
        s = self._amax.float() / QMAX
        return s.reshape(-1) if self.is_per_channel else s.reshape(())

    # -- modes ----------------------------------------------------------------------------------------------
    def enable_calib(self) -> None:
        self._if_calib, self._if_quant = True, False

    def disable_calib(self) -> None:
        self._if_calib, self._if_quant = False, True

    def disable(self) -> None:
        self._disabled = True

    def enable(self) -> None:
        self._disabled = False

    # -- forward --------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._disabled:
            return x
        if self._if_calib and self.collector is not None:
            self.collector.collect(x)  # the tensor itself: collectors detach, and key shared stats on it
        if not self._if_quant:
            return x
        if self._amax is None:
            raise CalibrationError(f"quantizer {self.name} has no amax: run calibration before quantizing")
        scale = self.scale().to(x.dtype)
        if self.is_per_channel:
            zp = torch.zeros(scale.numel(), dtype=torch.int32, device=x.device)
            return torch.fake_quantize_per_channel_affine(x, scale, zp, self.axis, QMIN, QMAX)
        zp = torch.zeros((), dtype=torch.int32, device=x.device)
        return torch.fake_quantize_per_tensor_affine(x, scale, zp, QMIN, QMAX)

    def forward_along(self, x: torch.Tensor, axis: int) -> torch.Tensor:
        """Fake-quantize ``x`` with this per-channel quantizer's scales laid along ``axis`` of ``x``.

        For a weight used transposed (``nn.Linear`` on N-D input exports as ``MatMul(x, W^T)``): quantizing
        ``W^T`` on axis 1 gives the same values as quantizing ``W`` on axis 0, and puts the DequantizeLinear
        right in front of the MatMul, where TensorRT looks for it.
        """
        if self._disabled or not self._if_quant or not self.is_per_channel:
            return self(x)
        if self._amax is None:
            raise CalibrationError(f"quantizer {self.name} has no amax: run calibration before quantizing")
        scale = self.scale().to(x.dtype)
        zp = torch.zeros(scale.numel(), dtype=torch.int32, device=x.device)
        return torch.fake_quantize_per_channel_affine(x, scale, zp, axis, QMIN, QMAX)

    def extra_repr(self) -> str:
        kind = f"per-channel axis={self.axis}" if self.is_per_channel else "per-tensor"
        state = "disabled" if self._disabled else ("calib" if self._if_calib else "quant")
        amax = "unset" if self._amax is None else (
            f"{self._amax.item():.4g}" if self._amax.numel() == 1 else f"[{self._amax.min():.3g}, {self._amax.max():.3g}]"
        )
        return f"int8 {kind} amax={amax} {state}"


def weight_amax(weight: torch.Tensor, axis: int | None) -> torch.Tensor:
    """Abs-max of a weight, per channel along ``axis`` (keepdim shape, e.g. [C,1,1,1]) or per tensor.

    Channels whose weights are all zero get amax 1.0 (any positive value quantizes zeros exactly), so the
    scale stays finite and positive.
    """
    w = weight.detach().abs().float()
    if axis is None:
        amax = w.max()
    else:
        dims = [d for d in range(w.dim()) if d != axis]
        amax = w.amax(dim=dims, keepdim=True) if dims else w
    return torch.where(amax > 0, amax, torch.ones_like(amax))
