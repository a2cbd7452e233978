"""QA-RepVGG block ("Make RepVGG Greater Again", arXiv 2212.01593), checkpoint-compatible with super-gradients 3.7.

Training form::

    y = act(post_bn(BN(conv3x3(x)) + alpha * conv1x1(x) [+ b1x1] [+ x]))

The identity branch exists only when ``use_residual_connection`` is set, which requires in == out channels and
stride 1. ``alpha`` scales the 1x1 branch: a learnable ``[1]`` Parameter with ``use_alpha``, else the constant 1.

Deploy forms (see :meth:`QARepVGGBlock.partial_fusion` / :meth:`QARepVGGBlock.full_fusion`):

* partial: ``act(post_bn(rbr_reparam(x)))``  -- branches merged, post-BN kept (super-gradients' export form);
* full:    ``act(rbr_reparam(x))``           -- post-BN folded into the conv too.

State-dict keys and shapes equal super-gradients' ``QARepVGGBlock``: ``branch_3x3.conv.weight``,
``branch_3x3.bn.*``, ``branch_1x1.weight`` (+ ``.bias``), ``post_bn.*``, ``rbr_reparam.weight/.bias`` (a
placeholder that is registered from the start, as upstream does) and ``alpha`` when learnable.
"""

from __future__ import annotations

from enum import Enum
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from quantkit.errors import ModelError
from quantkit.models.ops import Add


class FusionState(str, Enum):
    """Which form a :class:`QARepVGGBlock` is in."""

    UNFUSED = "unfused"
    PARTIAL = "partial"  # branches merged into rbr_reparam, post_bn kept
    FULL = "full"  # post_bn folded as well


def bn_scale_shift(bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel float64 ``(scale, shift)`` with ``bn(x) == x * scale + shift`` in eval mode.

    ``scale = gamma / sqrt(running_var + eps)``, ``shift = beta - running_mean * scale``.
    """
    if bn.running_mean is None or bn.running_var is None:
        raise ModelError("cannot fold a BatchNorm without running statistics (track_running_stats=False)")
    mean = bn.running_mean.detach().double()
    var = bn.running_var.detach().double()
    gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones_like(mean)
    beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(mean)
    scale = gamma / torch.sqrt(var + bn.eps)
    return scale, beta - mean * scale


def fold_bn_into_kernel(
    kernel: torch.Tensor, bias: torch.Tensor | None, bn: nn.modules.batchnorm._BatchNorm
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold an eval-mode BatchNorm that follows a conv (kernel [out, in/groups, kh, kw]) into kernel and bias.

    ``W' = W * g / sqrt(var + eps)`` per output channel, ``b' = (b - mean) * g / sqrt(var + eps) + beta``.
    The arithmetic runs in float64; results are cast back to ``kernel``'s dtype.
    """
    scale, shift = bn_scale_shift(bn)
    new_kernel = kernel.detach().double() * scale.view(-1, *([1] * (kernel.dim() - 1)))
    new_bias = shift if bias is None else bias.detach().double() * scale + shift
    return new_kernel.to(kernel.dtype), new_bias.to(kernel.dtype)


class QARepVGGBlock(nn.Module):
    """QA-RepVGG block; constructor options mirror super-gradients' ``QARepVGGBlock``.

    Args:
        in_channels / out_channels: channel counts.
        stride: stride of both convs (1 or 2 in YOLO-NAS).
        dilation: dilation of the 3x3 conv (padding = dilation keeps the spatial size at stride 1).
        groups: groups of both convs.
        activation_type / activation_kwargs: activation class and its kwargs (ReLU by default).
        se_type / se_kwargs: optional squeeze-excitation module applied after the activation (Identity).
        build_residual_branches: False builds the block partially fused (upstream's deploy constructor).
        use_residual_connection: add the identity branch; requires in == out and stride 1.
        use_alpha: learnable scalar on the 1x1 branch.
        use_1x1_bias: the 1x1 conv has a bias.
        use_post_bn: BatchNorm after the branch sum (QARepVGG "S4"); else Identity ("S3").
        deploy: build directly in the fully fused form (only ``rbr_reparam`` and the activation), for loading
            checkpoints saved after :meth:`full_fusion`.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        dilation: int = 1,
        groups: int = 1,
        activation_type: type[nn.Module] = nn.ReLU,
        activation_kwargs: Mapping[str, Any] | None = None,
        se_type: type[nn.Module] = nn.Identity,
        se_kwargs: Mapping[str, Any] | None = None,
        build_residual_branches: bool = True,
        use_residual_connection: bool = True,
        use_alpha: bool = False,
        use_1x1_bias: bool = True,
        use_post_bn: bool = True,
        deploy: bool = False,
    ):
        super().__init__()
        if in_channels % groups or out_channels % groups:
            raise ModelError(f"QARepVGGBlock: channels ({in_channels}, {out_channels}) must be divisible by groups={groups}")
        if use_residual_connection and (in_channels != out_channels or stride != 1):
            raise ModelError(
                "QARepVGGBlock: the identity branch needs in_channels == out_channels and stride 1 "
                f"(got {in_channels}->{out_channels}, stride {stride}); pass use_residual_connection=False"
            )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.stride = stride
        self.dilation = dilation
        self.groups = groups
        self.use_residual_connection = use_residual_connection
        self.use_alpha = use_alpha
        self.use_1x1_bias = use_1x1_bias
        self.use_post_bn = use_post_bn

        # Registration order follows upstream so that state_dict key order matches too.
        self.nonlinearity = activation_type(**dict(activation_kwargs or {}))
        self.se = se_type(**dict(se_kwargs or {}))
        self.branch_3x3 = nn.Sequential()
        self.branch_3x3.add_module(
            "conv",
            nn.Conv2d(in_channels, out_channels, 3, stride, padding=dilation, dilation=dilation, groups=groups, bias=False),
        )
        self.branch_3x3.add_module("bn", nn.BatchNorm2d(out_channels))
        self.branch_1x1 = nn.Conv2d(in_channels, out_channels, 1, stride, padding=0, groups=groups, bias=use_1x1_bias)
        # The identity add is an Add module so the quantizer can see it (it has no state).
        self.identity = Add() if use_residual_connection else None
        if use_residual_connection:
            self.register_buffer("id_tensor", self._identity_kernel(), persistent=False)
        if use_alpha:
            self.alpha = nn.Parameter(torch.tensor([1.0]))
        else:
            self.alpha = 1.0
        self.post_bn = nn.BatchNorm2d(out_channels) if use_post_bn else nn.Identity()
        # Placeholder that upstream registers from the start; it receives the fused kernel.
        self.rbr_reparam = nn.Conv2d(
            in_channels, out_channels, 3, stride, padding=dilation, dilation=dilation, groups=groups, bias=True
        )
        self.state = FusionState.UNFUSED
        if deploy:
            self.full_fusion()
        elif not build_residual_branches:
            self.partial_fusion()

    # -- flags kept for upstream compatibility ------------------------------------------------------------------
    @property
    def partially_fused(self) -> bool:
        return self.state is FusionState.PARTIAL

    @property
    def fully_fused(self) -> bool:
        return self.state is FusionState.FULL

    @property
    def deploy(self) -> bool:
        """True once the branches are merged (partial or full fusion)."""
        return self.state is not FusionState.UNFUSED

    def _identity_kernel(self) -> torch.Tensor:
        per_group = self.in_channels // self.groups
        kernel = torch.zeros(self.in_channels, per_group, 3, 3)
        for i in range(self.in_channels):
            kernel[i, i % per_group, 1, 1] = 1.0
        return kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.state is FusionState.FULL:
            return self.se(self.nonlinearity(self.rbr_reparam(x)))
        if self.state is FusionState.PARTIAL:
            return self.se(self.nonlinearity(self.post_bn(self.rbr_reparam(x))))
        y = self.branch_3x3(x) + self.alpha * self.branch_1x1(x)
        if self.identity is not None:
            y = self.identity(y, x)
        return self.se(self.nonlinearity(self.post_bn(y)))

    @torch.no_grad()
    def equivalent_kernel_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Kernel [out, in/groups, 3, 3] and bias [out] of one conv equal to the three branches (before post_bn)."""
        conv = self.branch_3x3.conv
        kernel, bias = fold_bn_into_kernel(conv.weight, None, self.branch_3x3.bn)
        kernel, bias = kernel.double(), bias.double()
        alpha = self.alpha.detach().double() if isinstance(self.alpha, torch.Tensor) else float(self.alpha)
        kernel = kernel + alpha * F.pad(self.branch_1x1.weight.detach().double(), [1, 1, 1, 1])
        if self.branch_1x1.bias is not None:
            bias = bias + alpha * self.branch_1x1.bias.detach().double()
        if self.identity is not None:
            kernel = kernel + self.id_tensor.double()
        dtype = conv.weight.dtype
        return kernel.to(dtype), bias.to(dtype)

    @torch.no_grad()
    def partial_fusion(self) -> None:
        """Merge the 3x3, 1x1 and identity branches into ``rbr_reparam``; keep ``post_bn``.

        Uses the BN running statistics, so call it on a model whose statistics are final. Idempotent; raises
        ModelError on a fully fused block (the post-BN cannot be recovered).
        """
        if self.state is FusionState.PARTIAL:
            return
        if self.state is FusionState.FULL:
            raise ModelError("QARepVGGBlock is fully fused and cannot be converted back to partial fusion")
        if hasattr(self, "branch_3x3"):  # absent when built with deploy flags
            kernel, bias = self.equivalent_kernel_bias()
            self.rbr_reparam.weight.copy_(kernel)
            self.rbr_reparam.bias.copy_(bias)
            del self.branch_3x3, self.branch_1x1
        self.identity = None
        if "id_tensor" in self._buffers:
            del self._buffers["id_tensor"]
        if "alpha" in self._parameters:
            del self._parameters["alpha"]
        self.alpha = 1.0
        self.state = FusionState.PARTIAL

    @torch.no_grad()
    def full_fusion(self) -> None:
        """Partial fusion, then fold ``post_bn`` into ``rbr_reparam`` and remove it. Idempotent."""
        if self.state is FusionState.FULL:
            return
        self.partial_fusion()
        if isinstance(self.post_bn, nn.BatchNorm2d):
            kernel, bias = fold_bn_into_kernel(self.rbr_reparam.weight, self.rbr_reparam.bias, self.post_bn)
            self.rbr_reparam.weight.copy_(kernel)
            self.rbr_reparam.bias.copy_(bias)
        del self.post_bn
        self.state = FusionState.FULL

    # upstream API names
    def fuse_block_residual_branches(self) -> None:
        self.partial_fusion()

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, stride={self.stride}, groups={self.groups}, "
            f"residual={self.use_residual_connection}, alpha={self.use_alpha}, 1x1_bias={self.use_1x1_bias}, "
            f"post_bn={self.use_post_bn}, state={self.state.value}"
        )
