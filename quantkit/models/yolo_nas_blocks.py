"""YOLO-NAS building blocks with super-gradients 3.7 module names (state_dict compatible).

Every residual add goes through :class:`quantkit.models.ops.Add` and every concatenation through
:class:`quantkit.models.ops.Concat`, so the quantizer can place Q/DQ nodes the way TensorRT wants them.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from quantkit.models.ops import Add, Concat
from quantkit.models.qarepvgg import QARepVGGBlock


class Conv(nn.Module):
    """Conv2d(k, stride, padding k//2, no bias) -> BatchNorm2d -> activation; keys ``conv.*``, ``bn.*``.

    Its forward is ``act(bn(conv(x)))``; :mod:`quantkit.reparam.fuse` relies on that when it folds ``bn``.
    """

    def __init__(
        self,
        input_channels: int,
        output_channels: int,
        kernel: int,
        stride: int,
        activation_type: type[nn.Module] = nn.ReLU,
        padding: int | None = None,
        groups: int | None = None,
    ):
        super().__init__()
        pad = kernel // 2 if padding is None else padding
        self.conv = nn.Conv2d(input_channels, output_channels, kernel, stride, pad, groups=groups or 1, bias=False)
        self.bn = nn.BatchNorm2d(output_channels)
        self.act = activation_type()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class ConvBNReLU(nn.Module):
    """Conv2d -> BatchNorm2d -> ReLU inside an ``nn.Sequential`` named ``seq`` (keys ``seq.conv.*``, ``seq.bn.*``)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        groups: int = 1,
        bias: bool = False,
    ):
        super().__init__()
        self.seq = nn.Sequential()
        self.seq.add_module(
            "conv", nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=bias)
        )
        self.seq.add_module("bn", nn.BatchNorm2d(out_channels))
        self.seq.add_module("act", nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seq(x)


def qarepvgg_bottleneck_block(in_channels: int, out_channels: int) -> nn.Module:
    """QA-RepVGG "S4" block as YOLO-NAS uses it inside bottlenecks (identity branch when shapes allow)."""
    return QARepVGGBlock(in_channels, out_channels, use_residual_connection=in_channels == out_channels)


def conv3x3_block(in_channels: int, out_channels: int) -> nn.Module:
    """Plain Conv 3x3 block used by the neck's down-stage bottlenecks."""
    return Conv(in_channels, out_channels, 3, 1)


BlockFactory = Callable[[int, int], nn.Module]


class YoloNASBottleneck(nn.Module):
    """``out = cv2(cv1(x)) + alpha * x`` (residual only when in == out), ``alpha`` a learnable [1] Parameter."""

    def __init__(self, in_channels: int, out_channels: int, block: BlockFactory, shortcut: bool = True, use_alpha: bool = True):
        super().__init__()
        self.cv1 = block(in_channels, out_channels)
        self.cv2 = block(out_channels, out_channels)
        self.use_shortcut = shortcut and in_channels == out_channels
        self.add = Add() if self.use_shortcut else None
        if use_alpha:
            self.alpha = nn.Parameter(torch.tensor([1.0]))
        else:
            self.alpha = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cv2(self.cv1(x))
        if self.add is None:
            return y
        return self.add(y, self.alpha * x)


class SequentialWithIntermediates(nn.Sequential):
    """Sequential that returns a list: ``[input, out1, ..., outN]`` if ``output_intermediates`` else ``[outN]``."""

    def __init__(self, output_intermediates: bool, *modules: nn.Module):
        super().__init__(*modules)
        self.output_intermediates = output_intermediates

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:  # type: ignore[override]
        outputs = [x]
        for module in self:
            outputs.append(module(outputs[-1]))
        return outputs if self.output_intermediates else [outputs[-1]]


class YoloNASCSPLayer(nn.Module):
    """CSP layer: conv3(concat[bottlenecks(conv1(x)) (+ intermediates), conv2(x)]), all 1x1 Conv blocks."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_bottlenecks: int,
        block: BlockFactory,
        hidden_channels: int,
        concat_intermediates: bool = False,
    ):
        super().__init__()
        self.conv1 = Conv(in_channels, hidden_channels, 1, 1)
        self.conv2 = Conv(in_channels, hidden_channels, 1, 1)
        concat_width = hidden_channels * (2 + int(concat_intermediates) * num_bottlenecks)
        self.conv3 = Conv(concat_width, out_channels, 1, 1)
        self.bottlenecks = SequentialWithIntermediates(
            concat_intermediates,
            *[YoloNASBottleneck(hidden_channels, hidden_channels, block) for _ in range(num_bottlenecks)],
        )
        self.dropout = nn.Identity()
        self.concat = Concat(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch = self.bottlenecks(self.conv1(x))
        return self.conv3(self.dropout(self.concat([*branch, self.conv2(x)])))


class YoloNASStem(nn.Module):
    """Stride-2 QA-RepVGG block without identity branch."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 2):
        super().__init__()
        self.out_channels = out_channels
        self.conv = QARepVGGBlock(in_channels, out_channels, stride=stride, use_residual_connection=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class YoloNASStage(nn.Module):
    """Stride-2 QA-RepVGG downsample followed by a CSP layer of QA-RepVGG bottlenecks."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, hidden_channels: int, concat_intermediates: bool):
        super().__init__()
        self.out_channels = out_channels
        self.downsample = QARepVGGBlock(in_channels, out_channels, stride=2, use_residual_connection=False)
        self.blocks = YoloNASCSPLayer(
            out_channels, out_channels, num_blocks, qarepvgg_bottleneck_block, hidden_channels, concat_intermediates
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))


class SPP(nn.Module):
    """Spatial pyramid pooling: Conv1x1(in -> in/2), max-pools (stride 1, same size), concat, Conv1x1 -> out."""

    def __init__(self, in_channels: int, output_channels: int, k: tuple[int, ...] = (5, 9, 13)):
        super().__init__()
        self.out_channels = output_channels
        hidden = in_channels // 2
        self.cv1 = Conv(in_channels, hidden, 1, 1)
        self.cv2 = Conv(hidden * (len(k) + 1), output_channels, 1, 1)
        self.m = nn.ModuleList([nn.MaxPool2d(kernel_size=s, stride=1, padding=s // 2) for s in k])
        self.concat = Concat(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.cv1(x)
        return self.cv2(self.concat([x] + [pool(x) for pool in self.m]))


class YoloNASUpStage(nn.Module):
    """PAN up-stage with three inputs ``[x, skip1, skip2]`` (``reduce_channels=True`` form); returns (x_inter, out).

    ``x_inter = conv(x)`` is upsampled by a stride-2 ConvTranspose2d; skip1 is reduced by a 1x1 Conv; skip2 by a
    1x1 Conv and a 3x3 stride-2 Conv; the three are concatenated, reduced by a 1x1 Conv and fed to a CSP layer.
    """

    def __init__(self, in_channels: tuple[int, int, int], out_channels: int, num_blocks: int, hidden_channels: int, concat_intermediates: bool = False):
        super().__init__()
        x_channels, skip1_channels, skip2_channels = in_channels
        self.reduce_skip1 = Conv(skip1_channels, out_channels, 1, 1)
        self.reduce_skip2 = Conv(skip2_channels, out_channels, 1, 1)
        self.conv = Conv(x_channels, out_channels, 1, 1)
        self.upsample = nn.ConvTranspose2d(out_channels, out_channels, kernel_size=2, stride=2)
        self.downsample = Conv(out_channels, out_channels, 3, 2)
        self.reduce_after_concat = Conv(3 * out_channels, out_channels, 1, 1)
        self.blocks = YoloNASCSPLayer(
            out_channels, out_channels, num_blocks, qarepvgg_bottleneck_block, hidden_channels, concat_intermediates
        )
        self.concat = Concat(1)
        self.out_channels = (out_channels, out_channels)

    def forward(self, inputs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        x, skip1, skip2 = inputs
        skips = [self.reduce_skip1(skip1), self.downsample(self.reduce_skip2(skip2))]
        x_inter = self.conv(x)
        x = self.concat([self.upsample(x_inter), *skips])
        return x_inter, self.blocks(self.reduce_after_concat(x))


class YoloNASDownStage(nn.Module):
    """PAN down-stage ``[x, skip]``: Conv3x3 s2 (in -> out/2), concat with skip, CSP layer of Conv3x3 bottlenecks."""

    def __init__(self, in_channels: tuple[int, int], out_channels: int, num_blocks: int, hidden_channels: int, concat_intermediates: bool = False):
        super().__init__()
        x_channels, skip_channels = in_channels
        self.conv = Conv(x_channels, out_channels // 2, 3, 2)
        self.blocks = YoloNASCSPLayer(
            out_channels // 2 + skip_channels, out_channels, num_blocks, conv3x3_block, hidden_channels, concat_intermediates
        )
        self.concat = Concat(1)
        self.out_channels = out_channels

    def forward(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        x, skip = inputs
        return self.blocks(self.concat([self.conv(x), skip]))
