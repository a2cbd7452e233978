"""YOLO-NAS S/M/L (super-gradients 3.7.1 layout: identical state_dict keys, shapes and parameter counts).

``YoloNAS(arch, num_classes)`` builds any size from a frozen :class:`YoloNASArch`; ``yolo_nas_s/m/l`` are the
published configurations. A scaled-down variant is just another ``YoloNASArch``.

Skeleton: backbone (QA-RepVGG stem, 4 stages of stride-2 QA-RepVGG + CSP, SPP) -> PAN neck (2 up-stages, 2
down-stages) -> DFL heads at strides 8/16/32. Input sides must be multiples of 32. Output contract:

* eval mode:  ``(pred_bboxes [B,A,4] x1y1x2y2 px, pred_scores [B,A,C] sigmoid)``;
* train mode: ``((pred_bboxes, pred_scores), (cls_logits, reg_distri, anchors, anchor_points_px,
  num_anchors_list, stride_tensor))`` as super-gradients' PPYoloE loss expects.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from quantkit.errors import ModelError
from quantkit.models.yolo_nas_blocks import SPP, YoloNASDownStage, YoloNASStage, YoloNASStem, YoloNASUpStage
from quantkit.models.yolo_nas_head import NDFLHeads, head_width

BN_EPS = 1e-3
BN_MOMENTUM = 0.03


@dataclass(frozen=True)
class StageSpec:
    """One backbone stage or neck stage: output channels, bottleneck count, CSP hidden width, concat flag."""

    out_channels: int
    num_blocks: int
    hidden_channels: int
    concat_intermediates: bool = False


@dataclass(frozen=True)
class YoloNASArch:
    """Everything that distinguishes one YOLO-NAS size from another.

    ``stages`` are the 4 backbone stages (strides 4/8/16/32). ``neck`` is (up1, up2, down1, down2): up1 and up2
    produce strides 16 and 8, down1 and down2 strides 16 and 32. Head level i has
    ``head_width(head_inter_channels[i], head_width_mult)`` channels.
    """

    name: str
    stages: tuple[StageSpec, StageSpec, StageSpec, StageSpec]
    neck: tuple[StageSpec, StageSpec, StageSpec, StageSpec]
    head_width_mult: float
    stem_channels: int = 48
    context_channels: int = 768
    spp_kernels: tuple[int, ...] = (5, 9, 13)
    head_inter_channels: tuple[int, int, int] = (128, 256, 512)
    reg_max: int = 16
    strides: tuple[int, int, int] = (8, 16, 32)
    in_channels: int = 3
    bn_eps: float = BN_EPS
    bn_momentum: float = BN_MOMENTUM
    default_input_size: tuple[int, int] = field(default=(640, 640))

    def validate(self) -> None:
        """Raise ModelError if the architecture cannot be built."""
        if len(self.stages) != 4 or len(self.neck) != 4:
            raise ModelError(f"{self.name}: YOLO-NAS needs 4 backbone stages and 4 neck stages")
        if tuple(self.strides) != (8, 16, 32) or len(self.head_inter_channels) != 3:
            raise ModelError(f"{self.name}: the YOLO-NAS skeleton has heads at strides (8, 16, 32) only")
        for spec in (*self.stages, *self.neck):
            if spec.num_blocks < 1 or spec.hidden_channels < 1 or spec.out_channels < 2:
                raise ModelError(f"{self.name}: invalid stage {spec}")
        if self.reg_max < 1:
            raise ModelError(f"{self.name}: reg_max must be >= 1")


def _s(out: int, n: int, h: int, concat: bool = False) -> StageSpec:
    return StageSpec(out, n, h, concat)


YOLO_NAS_S = YoloNASArch(
    name="yolo_nas_s",
    stages=(_s(96, 2, 32), _s(192, 3, 64), _s(384, 5, 96), _s(768, 2, 192)),
    neck=(_s(192, 2, 64), _s(96, 2, 48), _s(192, 2, 64), _s(384, 2, 64)),
    head_width_mult=0.5,
)
YOLO_NAS_M = YoloNASArch(
    name="yolo_nas_m",
    stages=(_s(96, 2, 64, True), _s(192, 3, 128, True), _s(384, 5, 256, True), _s(768, 2, 384, False)),
    neck=(_s(192, 2, 192), _s(96, 3, 64), _s(192, 2, 192), _s(384, 3, 256)),
    head_width_mult=0.75,
)
YOLO_NAS_L = YoloNASArch(
    name="yolo_nas_l",
    stages=(_s(96, 2, 96, True), _s(192, 3, 128, True), _s(384, 5, 256, True), _s(768, 2, 512, True)),
    neck=(_s(192, 4, 128), _s(96, 4, 128), _s(192, 4, 128), _s(384, 4, 256)),
    head_width_mult=1.0,
)


class NStageBackbone(nn.Module):
    """Stem -> stage1..4 -> SPP context module; returns [stage1, stage2, stage3, context] (strides 4/8/16/32)."""

    def __init__(self, arch: YoloNASArch):
        super().__init__()
        self.num_stages = len(arch.stages)
        self.stem = YoloNASStem(arch.in_channels, arch.stem_channels)
        prev = arch.stem_channels
        for i, spec in enumerate(arch.stages):
            setattr(self, f"stage{i + 1}", YoloNASStage(prev, spec.out_channels, spec.num_blocks, spec.hidden_channels, spec.concat_intermediates))
            prev = spec.out_channels
        self.context_module = SPP(prev, arch.context_channels, arch.spp_kernels)
        self.out_channels = [s.out_channels for s in arch.stages[:3]] + [arch.context_channels]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        outputs = []
        for i in range(self.num_stages):
            x = getattr(self, f"stage{i + 1}")(x)
            if i < self.num_stages - 1:
                outputs.append(x)
        outputs.append(self.context_module(x))
        return outputs


class YoloNASPANNeckWithC2(nn.Module):
    """PAN neck; inputs (c2, c3, c4, c5) at strides 4/8/16/32, outputs (p3, p4, p5) at strides 8/16/32."""

    def __init__(self, in_channels: list[int], arch: YoloNASArch):
        super().__init__()
        c2, c3, c4, c5 = in_channels
        up1, up2, down1, down2 = arch.neck
        self.neck1 = YoloNASUpStage((c5, c4, c3), up1.out_channels, up1.num_blocks, up1.hidden_channels, up1.concat_intermediates)
        self.neck2 = YoloNASUpStage((up1.out_channels, c3, c2), up2.out_channels, up2.num_blocks, up2.hidden_channels, up2.concat_intermediates)
        self.neck3 = YoloNASDownStage((up2.out_channels, up2.out_channels), down1.out_channels, down1.num_blocks, down1.hidden_channels, down1.concat_intermediates)
        self.neck4 = YoloNASDownStage((down1.out_channels, up1.out_channels), down2.out_channels, down2.num_blocks, down2.hidden_channels, down2.concat_intermediates)
        self.out_channels = (up2.out_channels, down1.out_channels, down2.out_channels)

    def forward(self, inputs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        c2, c3, c4, c5 = inputs
        n1_inter, x = self.neck1([c5, c4, c3])
        n2_inter, p3 = self.neck2([x, c3, c2])
        p4 = self.neck3([p3, n2_inter])
        p5 = self.neck4([p4, n1_inter])
        return p3, p4, p5


class YoloNAS(nn.Module):
    """YOLO-NAS detector built from a :class:`YoloNASArch`; see the module docstring for the output contract.

    Attributes: ``arch``, ``num_classes``, ``default_input_size`` (H, W) in pixels, ``strides``.
    """

    def __init__(self, arch: YoloNASArch, num_classes: int = 80):
        super().__init__()
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ModelError(f"num_classes must be a positive integer, got {num_classes!r}")
        arch.validate()
        self.arch = arch
        self.num_classes = num_classes
        self.default_input_size = tuple(arch.default_input_size)
        self.strides = tuple(arch.strides)
        self.backbone = NStageBackbone(arch)
        self.neck = YoloNASPANNeckWithC2(self.backbone.out_channels, arch)
        inter = tuple(head_width(c, arch.head_width_mult) for c in arch.head_inter_channels)
        self.heads = NDFLHeads(self.neck.out_channels, inter, num_classes, arch.strides, arch.reg_max)
        # super-gradients sets these after construction (CustomizableDetector._initialize_weights)
        for m in self.modules():
            if type(m) is nn.BatchNorm2d:
                m.eps = arch.bn_eps
                m.momentum = arch.bn_momentum
            elif type(m) is nn.ReLU:
                m.inplace = True

    def forward(self, x: torch.Tensor):
        return self.heads(self.neck(self.backbone(x)))


def yolo_nas_s(num_classes: int = 80) -> YoloNAS:
    """YOLO-NAS S (19.05 M raw parameters, 12.18 M after partial QA-RepVGG fusion)."""
    return YoloNAS(YOLO_NAS_S, num_classes)


def yolo_nas_m(num_classes: int = 80) -> YoloNAS:
    """YOLO-NAS M (51.18 M raw parameters, 31.92 M after partial QA-RepVGG fusion)."""
    return YoloNAS(YOLO_NAS_M, num_classes)


def yolo_nas_l(num_classes: int = 80) -> YoloNAS:
    """YOLO-NAS L (66.98 M raw parameters, 42.02 M after partial QA-RepVGG fusion)."""
    return YoloNAS(YOLO_NAS_L, num_classes)
