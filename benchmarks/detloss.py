"""Training loss for the YOLO-NAS-style detector: task-aligned assignment, BCE on classes, GIoU + DFL on boxes.

Used only by ``benchmarks/train_trees.py`` (training is not part of the quantkit package). The recipe follows
the published PP-YOLOE / YOLO-NAS design; the code is ours:

* **Assignment** (task-aligned, TOOD): for every ground-truth box, the candidate anchors are those whose
  centre lies inside it; each candidate gets the alignment ``score**alpha * IoU**beta`` of its prediction,
  and the ``topk`` best become positives. An anchor claimed by several boxes keeps the one it overlaps most.
* **Class target**: a positive's target is its alignment, rescaled so the best anchor of each box gets that
  box's best IoU (soft labels). Negatives get 0. Loss: binary cross-entropy summed over anchors and classes.
* **Box loss**: ``1 - GIoU`` between decoded and target boxes, and the distribution focal loss (DFL) on the
  left/top/right/bottom distances in grid units; both weighted by the positive's class target.

All three terms are divided by the sum of class targets in the batch (at least 1).

Layout the model must give in train mode (``quantkit.models.yolo_nas``): ``cls_logits [B,A,C]``,
``reg_distri [B,A,4*(reg_max+1)]`` (side-major: channel ``side*(reg_max+1) + bin``, sides l,t,r,b),
``anchor_points_px [A,2]`` (x,y pixels) and ``stride_tensor [A,1]`` (pixels).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

EPS = 1e-9


@dataclass(frozen=True)
class LossConfig:
    """Weights and assigner settings (unitless)."""

    cls_weight: float = 1.0
    iou_weight: float = 2.5
    dfl_weight: float = 0.5
    topk: int = 13
    alpha: float = 1.0  # exponent of the class score in the alignment metric
    beta: float = 6.0  # exponent of the IoU in the alignment metric


def pairwise_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of x1y1x2y2 boxes ``a [..., N, 4]`` against ``b [..., M, 4]`` -> ``[..., N, M]``."""
    lt = torch.maximum(a[..., :, None, :2], b[..., None, :, :2])
    rb = torch.minimum(a[..., :, None, 2:], b[..., None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area_a = (a[..., 2:] - a[..., :2]).clamp(min=0).prod(-1)
    area_b = (b[..., 2:] - b[..., :2]).clamp(min=0).prod(-1)
    return inter / (area_a[..., :, None] + area_b[..., None, :] - inter + EPS)


def giou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Generalised IoU of matching x1y1x2y2 boxes ``a [N,4]``, ``b [N,4]`` -> ``[N]`` in [-1, 1]."""
    lt = torch.maximum(a[:, :2], b[:, :2])
    rb = torch.minimum(a[:, 2:], b[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area_a = (a[:, 2:] - a[:, :2]).clamp(min=0).prod(-1)
    area_b = (b[:, 2:] - b[:, :2]).clamp(min=0).prod(-1)
    union = area_a + area_b - inter + EPS
    hull = (torch.maximum(a[:, 2:], b[:, 2:]) - torch.minimum(a[:, :2], b[:, :2])).clamp(min=0).prod(-1) + EPS
    return inter / union - (hull - union) / hull


def decode_distances(reg_distri: torch.Tensor, reg_max: int) -> torch.Tensor:
    """DFL expectation: ``[B,A,4*(reg_max+1)]`` logits -> ``[B,A,4]`` l,t,r,b distances in grid units."""
    b, a, _ = reg_distri.shape
    prob = reg_distri.view(b, a, 4, reg_max + 1).softmax(-1)
    bins = torch.arange(reg_max + 1, dtype=prob.dtype, device=prob.device)
    return (prob * bins).sum(-1)


def distances_to_boxes(dist: torch.Tensor, points: torch.Tensor, strides: torch.Tensor) -> torch.Tensor:
    """``[B,A,4]`` l,t,r,b grid-unit distances around ``points [A,2]`` px -> x1y1x2y2 px boxes ``[B,A,4]``."""
    d = dist * strides  # [A,1] broadcasts over the 4 sides
    return torch.cat([points - d[..., :2], points + d[..., 2:]], dim=-1)


def pad_targets(boxes: list[torch.Tensor], labels: list[torch.Tensor] | None = None):
    """Ragged per-image targets -> ``(boxes [B,M,4], labels [B,M] long, mask [B,M] bool)``, M >= 1."""
    m = max(1, max((len(x) for x in boxes), default=0))
    out_b = torch.zeros(len(boxes), m, 4)
    out_l = torch.zeros(len(boxes), m, dtype=torch.long)
    mask = torch.zeros(len(boxes), m, dtype=torch.bool)
    for i, bx in enumerate(boxes):
        n = len(bx)
        if n:
            out_b[i, :n] = bx
            out_l[i, :n] = 0 if labels is None else labels[i]
            mask[i, :n] = True
    return out_b, out_l, mask


@torch.no_grad()
def assign(scores, pred_boxes, points, gt_boxes, gt_labels, gt_mask, cfg: LossConfig):
    """Task-aligned assignment.

    Args: scores ``[B,A,C]`` sigmoid, pred_boxes ``[B,A,4]`` px, points ``[A,2]`` px, gt_boxes ``[B,M,4]``
    px, gt_labels ``[B,M]``, gt_mask ``[B,M]``.
    Returns: ``(fg [B,A] bool, target_boxes [B,A,4] px, target_scores [B,A,C])``.
    """
    bsz, n_anchor, n_cls = scores.shape
    ious = pairwise_iou(gt_boxes, pred_boxes)  # [B,M,A]
    cls_score = scores.permute(0, 2, 1).gather(1, gt_labels[..., None].expand(-1, -1, n_anchor))  # [B,M,A]
    px, py = points[:, 0], points[:, 1]
    inside = torch.stack([px - gt_boxes[..., 0, None], py - gt_boxes[..., 1, None],
                          gt_boxes[..., 2, None] - px, gt_boxes[..., 3, None] - py], -1).amin(-1) > EPS
    valid = inside & gt_mask[..., None]
    metric = cls_score.pow(cfg.alpha) * ious.pow(cfg.beta) * valid
    k = min(cfg.topk, n_anchor)
    # Rank candidates by metric; the tiny inside-bonus breaks ties early in training (all metrics ~0).
    top_idx = (metric + valid * 1e-12).topk(k, dim=-1).indices
    pos = torch.zeros_like(metric, dtype=torch.bool).scatter_(-1, top_idx, True) & valid  # [B,M,A]
    multi = pos.sum(1, keepdim=True) > 1
    if multi.any():
        best = F.one_hot((ious * pos).argmax(1), gt_boxes.shape[1]).permute(0, 2, 1).bool()  # [B,M,A]
        pos = torch.where(multi, best & pos, pos)
    fg = pos.any(1)  # [B,A]
    gt_idx = pos.float().argmax(1)  # [B,A]
    target_boxes = gt_boxes.gather(1, gt_idx[..., None].expand(-1, -1, 4))
    target_labels = gt_labels.gather(1, gt_idx)
    metric = metric * pos
    norm = metric * ((ious * pos).amax(-1, keepdim=True) / (metric.amax(-1, keepdim=True) + EPS))
    quality = norm.amax(1)  # [B,A]
    target_scores = F.one_hot(target_labels, n_cls).float() * (quality * fg)[..., None]
    return fg, target_boxes, target_scores


def dfl_loss(reg_distri: torch.Tensor, target_dist: torch.Tensor, reg_max: int) -> torch.Tensor:
    """Distribution focal loss per anchor: ``[N,4*(reg_max+1)]`` logits, ``[N,4]`` targets -> ``[N]``."""
    logits = reg_distri.view(-1, reg_max + 1)
    t = target_dist.reshape(-1).clamp(0, reg_max - 0.01)
    left = t.floor().long()
    w_right = t - left
    loss = F.cross_entropy(logits, left, reduction="none") * (1 - w_right) + \
        F.cross_entropy(logits, left + 1, reduction="none") * w_right
    return loss.view(-1, 4).mean(-1)


def detection_loss(train_out, gt_boxes: list[torch.Tensor], reg_max: int, cfg: LossConfig = LossConfig(),
                   gt_labels: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Total loss and its parts for one batch.

    Args:
        train_out: the model's train-mode raw tuple ``(cls_logits, reg_distri, anchors, anchor_points_px,
            num_anchors_list, stride_tensor)``.
        gt_boxes: per image, ``[n,4]`` x1y1x2y2 boxes in input pixels (n may be 0).
        reg_max: the head's DFL maximum bin.
        gt_labels: per image ``[n]`` class ids; all zero when omitted.
    """
    cls_logits, reg_distri, _, points, _, strides = train_out
    dist = decode_distances(reg_distri, reg_max)
    pred_boxes = distances_to_boxes(dist, points, strides)
    boxes, labels, mask = pad_targets(gt_boxes, gt_labels)
    boxes, labels, mask = boxes.to(cls_logits.device), labels.to(cls_logits.device), mask.to(cls_logits.device)
    fg, t_boxes, t_scores = assign(cls_logits.detach().sigmoid(), pred_boxes.detach(), points, boxes, labels,
                                   mask, cfg)
    norm = t_scores.sum().clamp(min=1.0)
    loss_cls = F.binary_cross_entropy_with_logits(cls_logits, t_scores, reduction="sum") / norm
    if fg.any():
        weight = t_scores.sum(-1)[fg]
        loss_iou = ((1 - giou(pred_boxes[fg], t_boxes[fg])) * weight).sum() / norm
        s = strides.expand(fg.shape[0], -1, -1)[fg]  # [P,1]
        p = points.expand(fg.shape[0], -1, -1)[fg]  # [P,2]
        tb = t_boxes[fg]
        t_dist = torch.cat([p - tb[:, :2], tb[:, 2:] - p], -1) / s
        loss_dfl = (dfl_loss(reg_distri[fg], t_dist, reg_max) * weight).sum() / norm
    else:
        loss_iou = loss_dfl = reg_distri.sum() * 0.0
    total = cfg.cls_weight * loss_cls + cfg.iou_weight * loss_iou + cfg.dfl_weight * loss_dfl
    parts = {"cls": loss_cls.item(), "iou": loss_iou.item(), "dfl": loss_dfl.item(), "pos": int(fg.sum())}
    return total, parts
