"""YOLO-NAS detection head (super-gradients ``NDFLHeads`` / ``YoloNASDFLHead``, state_dict compatible).

Per level: stem ConvBNReLU 1x1, then a cls branch (ConvBNReLU 3x3 -> Conv1x1 -> C logits) and a reg branch
(ConvBNReLU 3x3 -> Conv1x1 -> 4*(reg_max+1) DFL logits). Decoding runs in the forward:

* DFL: softmax over the reg_max+1 bins, expectation with the fixed projection ``linspace(0, reg_max)`` done as a
  matmul on a non-persistent buffer (not a conv module, so the quantizer leaves it in float);
* anchor points ``(x + 0.5, y + 0.5)`` in grid units, levels concatenated stride 8 first, row-major inside;
* boxes ``[p - lt, p + rb] * stride`` as x1y1x2y2 in input pixels (not clipped); scores ``sigmoid(logits)``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from quantkit.models.yolo_nas_blocks import ConvBNReLU

PRIOR_PROB = 1e-2  # initial class probability: cls bias = -log((1 - p) / p) = -log(99)
GRID_CELL_OFFSET = 0.5
GRID_CELL_SCALE = 5.0  # side of the ATSS anchor boxes, in strides


def head_width(inter_channels: int, width_mult: float, divisor: int = 8) -> int:
    """super-gradients' ``width_multiplier``: ceil(int(c * w) / divisor) * divisor."""
    return math.ceil(int(inter_channels * width_mult) / divisor) * divisor


class YoloNASDFLHead(nn.Module):
    """One level of the head; forward returns ``(reg_logits [B,4(R+1),H,W], cls_logits [B,C,H,W])``."""

    def __init__(self, in_channels: int, inter_channels: int, num_classes: int, stride: int, reg_max: int = 16):
        super().__init__()
        self.num_classes = num_classes
        self.stride = stride
        self.stem = ConvBNReLU(in_channels, inter_channels, kernel_size=1, stride=1, padding=0)
        self.cls_convs = nn.Sequential(ConvBNReLU(inter_channels, inter_channels, 3, 1, 1))
        self.reg_convs = nn.Sequential(ConvBNReLU(inter_channels, inter_channels, 3, 1, 1))
        self.cls_pred = nn.Conv2d(inter_channels, num_classes, 1, 1, 0)
        self.reg_pred = nn.Conv2d(inter_channels, 4 * (reg_max + 1), 1, 1, 0)
        self.cls_dropout_rate = nn.Identity()
        self.reg_dropout_rate = nn.Identity()
        nn.init.constant_(self.cls_pred.bias, -math.log((1 - PRIOR_PROB) / PRIOR_PROB))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.stem(x)
        cls_logits = self.cls_pred(self.cls_dropout_rate(self.cls_convs(x)))
        reg_logits = self.reg_pred(self.reg_dropout_rate(self.reg_convs(x)))
        return reg_logits, cls_logits


def anchor_grid(
    sizes: list[tuple[int, int]], strides: tuple[int, ...], dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
    """Anchor points for feature maps of ``sizes`` [(h, w), ...].

    Returns ``points_grid [A,2]`` (x+0.5, y+0.5 in grid units), ``points_px [A,2]`` (times stride, pixels),
    ``stride_tensor [A,1]`` and the number of anchors per level.
    """
    points, strides_out, counts = [], [], []
    for (h, w), stride in zip(sizes, strides):
        # arange in float32 then cast: ONNX has no float16 Range
        xs = torch.arange(w, dtype=torch.float32, device=device) + GRID_CELL_OFFSET
        ys = torch.arange(h, dtype=torch.float32, device=device) + GRID_CELL_OFFSET
        gy, gx = torch.meshgrid(ys, xs, indexing="ij")
        points.append(torch.stack([gx, gy], dim=-1).reshape(-1, 2).to(dtype))
        strides_out.append(torch.full((h * w, 1), float(stride), dtype=dtype, device=device))
        counts.append(h * w)
    points_grid = torch.cat(points)
    stride_tensor = torch.cat(strides_out)
    return points_grid, points_grid * stride_tensor, stride_tensor, counts


class NDFLHeads(nn.Module):
    """All levels plus decoding. Eval: ``(boxes [B,A,4], scores [B,A,C])``; train: super-gradients' nested tuple.

    Train-mode output::

        ((pred_bboxes, pred_scores),
         (cls_logits [B,A,C], reg_distri [B,A,4(R+1)], anchors [A,4], anchor_points_px [A,2],
          num_anchors_list, stride_tensor [A,1]))

    ``anchors`` are the ATSS boxes of side ``5 * stride`` centred on the anchor points (pixels).
    """

    def __init__(
        self,
        in_channels: tuple[int, ...],
        inter_channels: tuple[int, ...],
        num_classes: int,
        strides: tuple[int, ...] = (8, 16, 32),
        reg_max: int = 16,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.reg_max = reg_max
        self.fpn_strides = tuple(strides)
        self.num_heads = len(strides)
        self.grid_cell_scale = GRID_CELL_SCALE
        self.grid_cell_offset = GRID_CELL_OFFSET
        self.register_buffer("proj_conv", torch.linspace(0, reg_max, reg_max + 1), persistent=False)
        for i, (cin, inter, stride) in enumerate(zip(in_channels, inter_channels, strides)):
            setattr(self, f"head{i + 1}", YoloNASDFLHead(cin, inter, num_classes, stride, reg_max))

    def forward(self, feats: tuple[torch.Tensor, ...] | list[torch.Tensor]):
        cls_list, distri_list, dist_list, sizes = [], [], [], []
        for i, feat in enumerate(feats[: self.num_heads]):
            b, _, h, w = feat.shape
            sizes.append((h, w))
            reg_logits, cls_logits = getattr(self, f"head{i + 1}")(feat)
            distri_list.append(reg_logits.flatten(2).permute(0, 2, 1))  # [B, HW, 4(R+1)]
            bins = reg_logits.reshape(b, 4, self.reg_max + 1, h * w).permute(0, 3, 1, 2)  # [B, HW, 4, R+1]
            dist_list.append(torch.matmul(bins.softmax(dim=-1), self.proj_conv.to(bins.dtype)))  # [B, HW, 4]
            cls_list.append(cls_logits.reshape(b, self.num_classes, h * w))
        cls_logits_all = torch.cat(cls_list, dim=-1).permute(0, 2, 1)  # [B, A, C]
        distances = torch.cat(dist_list, dim=1)  # [B, A, 4], grid units
        feat0 = feats[0]
        points, points_px, stride_tensor, counts = anchor_grid(sizes, self.fpn_strides, feat0.dtype, feat0.device)
        lt, rb = distances[..., :2], distances[..., 2:]
        pred_bboxes = torch.cat([points - lt, points + rb], dim=-1) * stride_tensor
        pred_scores = cls_logits_all.sigmoid()
        if not self.training:
            return pred_bboxes, pred_scores
        half = self.grid_cell_scale * 0.5 * stride_tensor
        anchors = torch.cat([points_px - half, points_px + half], dim=-1)
        reg_distri = torch.cat(distri_list, dim=1)
        return (pred_bboxes, pred_scores), (cls_logits_all, reg_distri, anchors, points_px, counts, stride_tensor)
