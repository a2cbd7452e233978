"""The training crops of benchmarks/train_trees.py: augmentations keep image and boxes consistent.

Synthetic sources stand in for deepforest's images (those are fetched by the benchmark, not shipped): dark
background with bright square "trees", so a box's content can be checked from the pixels.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))

import train_trees  # noqa: E402
from train_trees import CropSampler, TrainConfig  # noqa: E402


def _source(rng: np.random.Generator, n: int = 12, side: int = 400) -> tuple[np.ndarray, np.ndarray]:
    img = np.full((side, side, 3), 20, np.uint8)
    boxes = []
    for _ in range(n):
        x, y, s = int(rng.integers(0, side - 40)), int(rng.integers(0, side - 40)), int(rng.integers(20, 40))
        img[y:y + s, x:x + s] = 230
        boxes.append((x, y, x + s, y + s))
    return img, np.array(boxes, np.float32)


def _sampler(cfg: TrainConfig) -> CropSampler:
    s = CropSampler.__new__(CropSampler)  # skip __init__: it loads the real images
    s.cfg, s.rng = cfg, np.random.default_rng(cfg.seed)
    src_rng = np.random.default_rng(123)
    s.sources = [_source(src_rng) for _ in train_trees.SOURCE_PROBS]
    return s


def test_paste_adds_boxes_on_free_spots_holding_the_pasted_pixels():
    cfg = TrainConfig(crop=128, paste=5)
    s = _sampler(cfg)
    out = np.zeros((128, 128, 3), np.float32)  # an empty crop: every box afterwards is a pasted tree
    new, boxes = s._paste(out, np.zeros((0, 4), np.float32), 1.0, 5)
    assert 1 <= len(boxes) <= 5 and new.shape == out.shape
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2:] <= 128).all()
    t = torch.from_numpy(boxes)
    iou = train_trees.pairwise_iou(t, t).numpy()
    np.fill_diagonal(iou, 0)
    assert iou.max() < 0.1  # pasted trees never pile up on boxes already there
    for x1, y1, x2, y2 in boxes.astype(int):
        centre = new[(y1 + y2) // 2, (x1 + x2) // 2]
        assert centre.min() > 150  # the crown centre is the bright source tree, fully opaque
    assert new.sum() > 0 and out.sum() == 0  # the input crop is not modified in place


def test_paste_keeps_existing_boxes():
    s = _sampler(TrainConfig(crop=128, paste=3))
    existing = np.array([[10, 10, 40, 40]], np.float32)
    _, boxes = s._paste(np.zeros((128, 128, 3), np.float32), existing, 1.0, 3)
    np.testing.assert_array_equal(boxes[0], existing[0])


@pytest.mark.parametrize("extra", [{}, {"blur": 1.6, "blur_prob": 1.0, "channel_gain": 0.2}, {"paste": 6}],
                         ids=["plain", "blur+gain", "paste"])
def test_every_box_sits_on_a_tree_after_all_augmentations(extra):
    """Scale, crop, flips, transposes, blur, colour and paste move pixels and boxes together: each box's
    centre is on a bright synthetic tree (boxes are exact squares there, so a clipped box's centre is too)."""
    s = _sampler(TrainConfig(crop=96, box_focus=0.5, seed=5, **extra))
    seen = 0
    for _ in range(24):
        img, boxes = s.sample()
        assert img.shape == (96, 96, 3) and img.dtype == np.float32 and boxes.shape[1:] == (4,)
        gray = img.mean(-1)
        mid = (gray.max() + gray.min()) / 2
        for x1, y1, x2, y2 in boxes:
            assert 0 <= x1 < x2 <= 96 and 0 <= y1 < y2 <= 96
            assert gray[int((y1 + y2) / 2), int((x1 + x2) / 2)] > mid
            seen += 1
    assert seen >= 10  # the check ran on enough boxes to mean something
