"""Quantized module wrappers.

Each wrapper subclasses its float module, so parameters, ``state_dict`` keys and ``repr`` stay familiar; it
adds ``_input_quantizer`` (per-tensor, activations) and, for layers with weights, ``_weight_quantizer``
(per-channel on the output-channel axis) — the layout pytorch-quantization uses. Which float type gets which
wrapper (subclasses included) is decided in ``quantkit.quant.registry``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from quantkit.models.ops import Add
from quantkit.quant.tensor_quantizer import TensorQuantizer, weight_amax


class QuantModule:
    """Base of every quantized wrapper: copies a float module's state into the quant subclass.

    ``exact_only``: the wrapper replaces its float type's ``forward``, so it is right for that exact type only;
    subclasses of that type (which may override ``forward``) get the generic wrapper of
    ``quantkit.quant.registry`` instead. A user's wrapper registered with ``register_quant_module`` leaves it
    False, and then also wraps the subclasses of the type it was registered for.
    """

    weight_axis: int | None = 0
    exact_only: bool = False

    @classmethod
    def from_float(cls, module: nn.Module, name: str) -> nn.Module:
        q = cls.__new__(cls)
        q.__dict__ = module.__dict__.copy()
        q._modules = module._modules.copy()
        q._parameters = module._parameters.copy()
        q._buffers = module._buffers.copy()
        q.add_module("_input_quantizer", TensorQuantizer(axis=None, name=f"{name}._input_quantizer"))
        if "weight" in q._parameters:
            axis = q._weight_axis()
            q.add_module("_weight_quantizer", TensorQuantizer(axis=axis, name=f"{name}._weight_quantizer"))
            q._weight_quantizer.amax = weight_amax(q.weight, axis)
        return q

    def _weight_axis(self) -> int | None:
        return self.weight_axis

    def replay(self, *inputs: torch.Tensor) -> torch.Tensor:
        """The layer's output for the tensors that reach its ONNX op (layer parity replays this): for these
        wrappers the module's own inputs."""
        return self(*inputs)


_QuantMixin = QuantModule  # the former name



class QuantConv2d(QuantModule, nn.Conv2d):
    """Conv2d (incl. grouped/depthwise) with quantized input and per-output-channel weights (axis 0)."""

    exact_only = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self._input_quantizer(x), self._weight_quantizer(self.weight), self.bias)


class QuantConv1d(QuantModule, nn.Conv1d):
    """Conv1d (audio, sequences) with quantized input and per-output-channel weights (axis 0)."""

    exact_only = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self._input_quantizer(x), self._weight_quantizer(self.weight), self.bias)


class QuantConvTranspose2d(QuantModule, nn.ConvTranspose2d):
    """ConvTranspose2d; its weight is [in, out/groups, kH, kW], so output channels sit on axis 1.

    Grouped transposed convs fall back to a per-tensor weight scale (axis 1 would not index output channels).
    """

    exact_only = True

    def _weight_axis(self) -> int | None:
        return 1 if self.groups == 1 else None

    def forward(self, x: torch.Tensor, output_size=None) -> torch.Tensor:
        out_pad = self._output_padding(x, output_size, self.stride, self.padding, self.kernel_size, 2, self.dilation)
        return F.conv_transpose2d(
            self._input_quantizer(x), self._weight_quantizer(self.weight), self.bias, self.stride,
            self.padding, out_pad, self.groups, self.dilation,
        )


class QuantLinear(QuantModule, nn.Linear):
    """Linear with quantized input and per-output-feature weights.

    On 2-D input it exports as Gemm(transB=1) with the weight quantized on axis 0. On N-D input (a
    channels-last MLP, a transformer block) the exporter writes ``MatMul(x, W^T) + b``: there the transposed
    weight is quantized on its output axis 1, so the int8 weight feeds the MatMul through its DequantizeLinear
    directly (a Q/DQ in front of a Transpose would be folded into a float constant by the exporter).
    """

    exact_only = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xq = self._input_quantizer(x)
        if x.dim() <= 2:
            return F.linear(xq, self._weight_quantizer(self.weight), self.bias)
        y = torch.matmul(xq, self._weight_quantizer.forward_along(self.weight.t(), axis=1))
        return y if self.bias is None else y + self.bias


class QuantAdd(QuantModule, Add):
    """Residual add that quantizes only the skip input, so TensorRT can fuse the add into the conv epilogue."""

    exact_only = True

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return x + self._input_quantizer(skip)


# isinstance(m, QUANT_TYPES): m is a quantized wrapper (dedicated, generic or a user's registered one)
QUANT_TYPES = (QuantModule,)


def quantizers(model: nn.Module):
    """Yield ``(name, TensorQuantizer)`` for every quantizer in ``model``, in module order."""
    for name, m in model.named_modules():
        if isinstance(m, TensorQuantizer):
            yield name, m
