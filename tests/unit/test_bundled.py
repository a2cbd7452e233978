"""The bundled tree detector and its real data: weights load, data sets are consistent, the model detects trees."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from quantkit.errors import ModelError
from quantkit.models import bundled
from quantkit.models.bundled import INPUT_SIZE, TREE_DETECTOR_ARCH, tree_detector
from quantkit.models.yolo_nas import YoloNAS

ROOT = Path(__file__).resolve().parents[2]
CALIB_DIR = ROOT / "calibration" / "trees"
EVAL_DIR = ROOT / "evaldata" / "trees_holdout"


@pytest.fixture(scope="module")
def model() -> YoloNAS:
    torch.manual_seed(0)
    return tree_detector()


@pytest.fixture(scope="module")
def coco() -> dict:
    return json.loads((EVAL_DIR / "annotations.json").read_text())


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix of x1y1x2y2 boxes, [N,4] x [M,4] -> [N,M] (independent of the training code)."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None, :] - inter)


def _tile(coco: dict, index: int) -> tuple[torch.Tensor, np.ndarray]:
    """(input [1,3,H,W] in [0,1], ground-truth x1y1x2y2 boxes) of held-out tile ``index``."""
    im = coco["images"][index]
    img = np.asarray(Image.open(EVAL_DIR / "images" / im["file_name"]).convert("RGB"), dtype=np.float32)
    gt = np.array([a["bbox"] for a in coco["annotations"] if a["image_id"] == im["id"]], dtype=np.float64)
    gt[:, 2:] += gt[:, :2]
    return torch.from_numpy(img / 255.0).permute(2, 0, 1)[None], gt


def test_weights_load_strictly_as_float32(model):
    state = torch.load(ROOT / "quantkit" / "assets" / bundled.WEIGHTS_FILE, map_location="cpu", weights_only=True)
    fresh = YoloNAS(TREE_DETECTOR_ARCH, 1).state_dict()
    assert list(state) == list(fresh)
    for k, v in state.items():
        assert v.shape == fresh[k].shape, k
        if v.is_floating_point():
            assert v.dtype == torch.float32, k
            assert torch.isfinite(v).all(), k
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    # trained, not the initialisation: the class bias moved away from -log(99)
    assert not torch.allclose(loaded["heads.head1.cls_pred.bias"], fresh["heads.head1.cls_pred.bias"])


def test_output_shapes_at_320(model):
    assert model.default_input_size == INPUT_SIZE == (320, 320)
    assert not model.training
    with torch.no_grad():
        boxes, scores = model(torch.rand(2, 3, *INPUT_SIZE))
    anchors = sum((INPUT_SIZE[0] // s) * (INPUT_SIZE[1] // s) for s in (8, 16, 32))
    assert boxes.shape == (2, anchors, 4) and scores.shape == (2, anchors, 1)
    assert ((scores >= 0) & (scores <= 1)).all()


def test_missing_weights_name_the_training_command(monkeypatch):
    monkeypatch.setattr(bundled, "WEIGHTS_FILE", "no_such_weights.pt")
    with pytest.raises(ModelError, match="train_trees.py"):
        tree_detector()


def test_pretrained_needs_one_class():
    with pytest.raises(ModelError, match="num_classes"):
        tree_detector(num_classes=3)
    assert tree_detector(num_classes=3, pretrained=False).heads.head1.cls_pred.out_channels == 3


def test_calibration_tiles_are_real_320px_images():
    files = sorted(CALIB_DIR.glob("*.jpg"))
    assert 48 <= len(files) <= 64
    stds = []
    for f in files:
        with Image.open(f) as im:
            assert im.size == (320, 320) and im.mode == "RGB", f
            stds.append(np.asarray(im, dtype=np.float32).std())
    assert min(stds) > 5.0  # textured aerial imagery, not blank or constant tiles


def test_eval_annotations_are_consistent(coco):
    assert coco["categories"] == [{"id": 1, "name": "tree", "supercategory": "tree"}]
    ids = {im["id"] for im in coco["images"]}
    assert len(ids) == len(coco["images"]) == 16
    on_disk = {p.name for p in (EVAL_DIR / "images").glob("*.png")}
    assert on_disk == {im["file_name"] for im in coco["images"]}
    sizes = {}
    for im in coco["images"]:
        with Image.open(EVAL_DIR / "images" / im["file_name"]) as pil:
            assert pil.size == (im["width"], im["height"]) == (320, 320)
        sizes[im["id"]] = (im["width"], im["height"])
    assert len({a["id"] for a in coco["annotations"]}) == len(coco["annotations"])
    per_image = dict.fromkeys(ids, 0)
    for a in coco["annotations"]:
        assert a["image_id"] in ids and a["category_id"] == 1 and a["iscrowd"] == 0
        x, y, w, h = a["bbox"]
        iw, ih = sizes[a["image_id"]]
        assert w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= iw and y + h <= ih, a
        assert a["area"] == pytest.approx(w * h)
        per_image[a["image_id"]] += 1
    assert sum(n >= 1 for n in per_image.values()) >= 0.9 * len(ids)


def _detects_a_tree(net: YoloNAS, coco: dict) -> bool:
    x, gt = _tile(coco, 5)
    with torch.no_grad():
        boxes, scores = net.eval()(x)
    confident = boxes[0][scores[0, :, 0] > 0.3].numpy().astype(np.float64)
    return bool(len(confident)) and bool((_iou(confident, gt) > 0.5).any())


def test_trained_model_finds_real_trees(model, coco):
    assert _detects_a_tree(model, coco)


def test_untrained_model_does_not(coco):
    torch.manual_seed(0)
    assert not _detects_a_tree(tree_detector(pretrained=False), coco)
