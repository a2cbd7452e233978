"""A COCO-format detection data set on disk: ``root/annotations.json`` plus its images, validated up front."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from quantkit.data.images import load_image
from quantkit.errors import DataError
from quantkit.quote import cap

ANNOTATIONS_NAME = "annotations.json"
IMAGES_DIR = "images"


def _resolve_image(root: Path, file_name: str) -> Path | None:
    """``root/images/file_name`` if it exists, else ``root/file_name`` (COCO files often carry a subfolder)."""
    for cand in (root / IMAGES_DIR / file_name, root / file_name):
        if cand.is_file():
            return cand
    return None


def _check_bbox(bbox, where: str) -> list[float]:
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        raise DataError(f"{where}: bbox must be [x, y, width, height], got {cap(repr(bbox))}. Fix the annotation")
    try:
        vals = [float(v) for v in bbox]
    except (TypeError, ValueError):
        raise DataError(f"{where}: bbox {cap(repr(bbox))} has non-numeric values. Fix the annotation") from None
    if not all(math.isfinite(v) for v in vals) or vals[2] <= 0 or vals[3] <= 0:
        raise DataError(
            f"{where}: bbox {bbox!r} needs finite values and positive width and height "
            "(COCO boxes are [x, y, w, h], not [x1, y1, x2, y2]). Fix or remove the annotation"
        )
    return vals


class CocoDataset:
    """COCO detection set: ``root/annotations.json`` and images under ``root/images/`` (or relative to ``root``).

    Everything is validated when the object is built (JSON structure, unique ids, known image and category
    ids, box shape, image files present) so an evaluation never fails half-way. Iteration yields
    ``(image_id, HWC uint8 RGB array, file_name)`` in ascending image id order.

    ``max_images``: keep only the first N images by id (for quick evaluations); the ground truth used for
    mAP is restricted to those images.
    """

    def __init__(self, root: str | Path, *, annotations: str | Path | None = None, max_images: int | None = None):
        self.root = Path(root)
        ann_path = Path(annotations) if annotations is not None else self.root / ANNOTATIONS_NAME
        if not self.root.is_dir():
            raise DataError(f"data set folder {self.root} does not exist: pass a folder holding {ANNOTATIONS_NAME}")
        if not ann_path.is_file():
            raise DataError(
                f"{ann_path} not found: a detection data set needs COCO annotations at <root>/{ANNOTATIONS_NAME} "
                f"and images under <root>/{IMAGES_DIR}/"
            )
        try:
            data = json.loads(ann_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DataError(f"cannot parse {ann_path} as JSON ({exc}): fix or regenerate the annotation file") from exc
        self.annotations_path = ann_path
        self._explicit_paths: dict[int, Path] = {}
        self._load(data, max_images)

    @classmethod
    def from_coco_dict(cls, data: dict, *, root: str | Path, source: str | Path, image_paths: dict[int, Path],
                       max_images: int | None = None) -> "CocoDataset":
        """A data set from an in-memory COCO dict (e.g. converted YOLO labels) whose image files are given by
        id (``image_paths``). ``source`` names the origin in error messages; validated like a file."""
        self = cls.__new__(cls)
        self.root = Path(root)
        self.annotations_path = Path(source)
        self._explicit_paths = dict(image_paths)
        self._load(data, max_images)
        return self

    def _load(self, data, max_images: int | None) -> None:
        src = self.annotations_path
        if not isinstance(data, dict):
            raise DataError(f"{src}: top level must be an object with images, annotations, categories")
        for key in ("images", "annotations", "categories"):
            if not isinstance(data.get(key), list):
                raise DataError(f"{src}: missing list '{key}'. A COCO file needs images, annotations and categories")
        if not data["categories"]:
            raise DataError(f"{src}: 'categories' is empty: list the classes as {{'id': int, 'name': str}}")

        cats = []
        for c in data["categories"]:
            if not isinstance(c, dict) or not isinstance(c.get("id"), int):
                raise DataError(f"{src}: category {cap(repr(c))} needs an integer 'id'")
            cats.append({"id": c["id"], "name": str(c.get("name", c["id"]))})
        cat_ids = [c["id"] for c in cats]
        if len(set(cat_ids)) != len(cat_ids):
            raise DataError(f"{src}: duplicate category ids {sorted(cat_ids)}: make them unique")

        images = []
        for im in data["images"]:
            if not isinstance(im, dict) or not isinstance(im.get("id"), int) or not isinstance(im.get("file_name"), str):
                raise DataError(f"{src}: image entry {cap(repr(im))} needs an integer 'id' and a 'file_name'")
            w, h = im.get("width"), im.get("height")
            if not (isinstance(w, int) and isinstance(h, int) and w > 0 and h > 0):
                raise DataError(f"{src}: image {im['id']} ({im['file_name']}) needs positive integer width and height")
            images.append({"id": im["id"], "file_name": im["file_name"], "width": w, "height": h})
        img_ids = [im["id"] for im in images]
        if len(set(img_ids)) != len(img_ids):
            raise DataError(f"{src}: duplicate image ids: make each image's 'id' unique")
        if not images:
            raise DataError(f"{src}: 'images' is empty: the data set has nothing to evaluate")
        images.sort(key=lambda im: im["id"])
        if max_images is not None:
            if max_images < 1:
                raise DataError(f"max_images must be >= 1, got {max_images}")
            images = images[:max_images]

        known_img = {im["id"] for im in images}
        all_img = set(img_ids)
        known_cat = set(cat_ids)
        anns = []
        for a in data["annotations"]:
            if not isinstance(a, dict):
                raise DataError(f"{src}: annotation {cap(repr(a))} is not an object")
            where = f"{src}: annotation {a.get('id', '?')} (image {a.get('image_id')})"
            if a.get("image_id") not in all_img:
                raise DataError(f"{where} refers to an image id not listed in 'images': add the image or drop the box")
            if a.get("category_id") not in known_cat:
                raise DataError(f"{where} has category_id {cap(repr(a.get('category_id')))} not in 'categories'")
            bbox = _check_bbox(a.get("bbox"), where)
            if a["image_id"] not in known_img:
                continue
            area = a.get("area")
            area = float(area) if isinstance(area, (int, float)) and area > 0 else bbox[2] * bbox[3]
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": a["image_id"],
                    "category_id": a["category_id"],
                    "bbox": bbox,
                    "area": area,
                    "iscrowd": int(bool(a.get("iscrowd", 0))),
                }
            )

        paths = {}
        for im in images:
            p = self._explicit_paths.get(im["id"]) or _resolve_image(self.root, im["file_name"])
            if p is None:
                raise DataError(
                    f"image file {im['file_name']} (id {im['id']}) not found under {self.root / IMAGES_DIR} "
                    f"or {self.root}: copy it there or remove it from {src.name}"
                )
            paths[im["id"]] = p

        self.categories = sorted(cats, key=lambda c: c["id"])
        self.images = images
        self.anns = anns
        self._paths = paths
        self._by_id = {im["id"]: im for im in images}

    # ---- queries ---------------------------------------------------------------------------------------

    @property
    def category_ids(self) -> list[int]:
        """Category ids in ascending order: the default mapping of model class index -> category id."""
        return [c["id"] for c in self.categories]

    @property
    def image_ids(self) -> list[int]:
        return [im["id"] for im in self.images]

    def coco_dict(self) -> dict:
        """The validated ground truth as a fresh COCO dict (safe to hand to an evaluator that mutates it)."""
        return {
            "images": [dict(im) for im in self.images],
            "annotations": [dict(a, bbox=list(a["bbox"])) for a in self.anns],
            "categories": [dict(c) for c in self.categories],
        }

    def __len__(self) -> int:
        return len(self.images)

    def load(self, image_id: int) -> np.ndarray:
        """Decode one image (HWC uint8 RGB) and check it matches the width/height in the annotations."""
        im = self._by_id.get(image_id)
        if im is None:
            raise DataError(f"image id {image_id} is not in {self.annotations_path}")
        arr = load_image(self._paths[image_id])
        if arr.shape[:2] != (im["height"], im["width"]):
            raise DataError(
                f"{self._paths[image_id]} is {arr.shape[1]}x{arr.shape[0]} (w x h) but {self.annotations_path.name} "
                f"says {im['width']}x{im['height']}: the boxes would be misplaced. Fix width/height or the image"
            )
        return arr

    def __iter__(self) -> Iterator[tuple[int, np.ndarray, str]]:
        for im in self.images:
            yield im["id"], self.load(im["id"]), im["file_name"]
