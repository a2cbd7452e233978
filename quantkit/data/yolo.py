"""Ultralytics-style dataset YAML with YOLO txt labels, for calibration (a split's images) and evaluation.

The file the field uses (``data.yaml``)::

    path: ../datasets/trees     # dataset root; relative to this YAML's folder; absent: this YAML's folder
    train: images/train         # a folder (searched recursively), a .txt list of image paths, or a list of them
    val: images/val
    names: {0: tree}            # or a list: [tree]; nc (optional) must match

Labels: for ``.../images/.../x.jpg`` the file ``.../labels/.../x.txt`` (the last ``images`` folder replaced by
``labels``), one object per line ``cls cx cy w h``, coordinates normalized to [0, 1] by the image's width and
height. A polygon line (``cls x1 y1 x2 y2 ...``, as segmentation sets have) counts as its bounding box. An image
without a label file, or with an empty one, has no objects (valid). Lines in a ``.txt`` image list are relative
to the list's folder. Everything is checked when the data set is opened; each problem is a DataError naming
the file, the line and the fix.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import yaml
from PIL import Image, UnidentifiedImageError

from quantkit.data.images import IMAGE_SUFFIXES, list_images
from quantkit.errors import DataError
from quantkit.quote import cap, qcap

YAML_SUFFIXES = (".yaml", ".yml")


def is_dataset_yaml(path) -> bool:
    """True when ``path`` names a dataset YAML (by suffix)."""
    return isinstance(path, (str, os.PathLike)) and Path(path).suffix.lower() in YAML_SUFFIXES


@dataclass(frozen=True)
class YoloDataset:
    """A parsed dataset YAML. ``splits``: split name -> its entries (folders, .txt lists, images), as written."""

    yaml_path: Path
    root: Path
    names: tuple[str, ...]
    splits: dict

    def images(self, split: str) -> list[Path]:
        """The split's image files in a stable order (entries in order, each folder sorted)."""
        entries = self.splits.get(split)
        if entries is None:
            have = ", ".join(k for k in ("train", "val", "test") if k in self.splits) or "none"
            raise DataError(f"{self.yaml_path} has no '{split}' split (splits present: {have}): add "
                            f"'{split}: images/{split}' (a folder, a .txt list of images or a list of them), or "
                            "choose another split")
        files: list[Path] = []
        for entry in entries:
            p = Path(entry) if Path(entry).is_absolute() else self.root / entry
            if p.is_dir():
                files.extend(list_images(p))
            elif p.is_file() and p.suffix.lower() == ".txt":
                files.extend(_read_list(p))
            elif p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES:
                files.append(p)
            else:
                raise DataError(f"{self.yaml_path}: '{split}' entry {qcap(entry)} -> {p} does not exist (or is not a "
                                f"folder, .txt list or image): fix '{split}' or 'path' (dataset root {self.root})")
        if not files:
            raise DataError(f"{self.yaml_path}: split '{split}' lists no images: put images in {entries}")
        return files

    def display_name(self, image: Path) -> str:
        """The image's path relative to the dataset root (POSIX), or absolute when outside it."""
        try:
            return image.relative_to(self.root).as_posix()
        except ValueError:
            return image.as_posix()


def _read_list(path: Path) -> list[Path]:
    out = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        p = Path(line) if Path(line).is_absolute() else path.parent / line
        if not p.is_file():
            raise DataError(f"{path} line {i}: image {qcap(line)} -> {p} does not exist: fix the list (relative paths "
                            "are relative to the list's folder)")
        out.append(p)
    return out


def _names(raw, where: Path) -> tuple[str, ...]:
    if isinstance(raw, list) and raw:
        return tuple(str(n) for n in raw)
    if isinstance(raw, dict) and raw:
        try:
            keys = sorted(int(k) for k in raw)
        except (TypeError, ValueError):
            raise DataError(f"{where}: 'names' keys must be class indices 0..N-1, got {list(raw)}") from None
        if keys != list(range(len(keys))):
            raise DataError(f"{where}: 'names' keys must be 0..{len(keys) - 1} without gaps, got {keys}")
        return tuple(str(raw.get(k, raw.get(str(k)))) for k in keys)
    raise DataError(f"{where}: 'names' is missing or empty: list the classes, e.g. names: {{0: person, 1: car}}")


def load_dataset_yaml(path: str | Path) -> YoloDataset:
    """Parse and check an Ultralytics-style dataset YAML (see the module docstring)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"dataset YAML {p} does not exist: pass --data path/to/data.yaml")
    try:
        data = yaml.safe_load(p.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise DataError(f"{p} is not valid YAML ({exc}): fix the dataset file") from None
    if not isinstance(data, dict):
        raise DataError(f"{p} must be a mapping with path, train, val and names (Ultralytics dataset format)")
    names = _names(data.get("names"), p)
    if "nc" in data and data["nc"] != len(names):
        raise DataError(f"{p}: nc is {data['nc']} but 'names' has {len(names)} classes: make them agree")
    root = p.parent
    if data.get("path"):
        root = Path(str(data["path"]))
        root = root if root.is_absolute() else p.parent / root
        if not root.is_dir():
            raise DataError(f"{p}: dataset root 'path: {data['path']}' -> {root} does not exist: fix 'path' "
                            "(relative paths are relative to the YAML's folder)")
    splits = {}
    for key in ("train", "val", "test"):
        v = data.get(key)
        if v is None:
            continue
        if isinstance(v, (str, os.PathLike)):
            v = [v]
        if not isinstance(v, list) or not v or not all(isinstance(e, str) for e in v):
            raise DataError(f"{p}: '{key}' must be a folder, a .txt list or a list of them, got {v!r}")
        splits[key] = tuple(v)
    return YoloDataset(p, root, names, splits)


def label_path(image: Path) -> Path:
    """Ultralytics' rule: the last ``/images/`` folder of the image path becomes ``/labels/``, suffix ``.txt``."""
    s = image.as_posix()
    head, sep, tail = s.rpartition("/images/")
    s = head + "/labels/" + tail if sep else s
    return Path(s).with_suffix(".txt")


def read_labels(path: Path, num_classes: int) -> list[tuple[int, float, float, float, float]]:
    """(cls, cx, cy, w, h) rows of a YOLO label file (normalized); [] when the file does not exist."""
    if not path.is_file():
        return []
    rows = []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"label file {path} is not UTF-8 text (byte {exc.start}): a YOLO label file holds lines "
                        "'class cx cy w h'; replace or remove the file") from None
    except OSError as exc:
        raise DataError(f"cannot read label file {path}: {exc.strerror}; fix its permissions or remove it") from None
    for i, line in enumerate(text.splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        where = f"label file {path} line {i} ({qcap(line.strip(), 80)})"
        try:
            vals = [float(v) for v in parts]
        except ValueError:
            raise DataError(f"{where}: not numbers. Each line must be 'class cx cy w h' (normalized 0..1)") from None
        if len(vals) < 5 or (len(vals) > 5 and len(vals) % 2 == 0):
            raise DataError(f"{where}: {len(vals)} values; a box line is 'class cx cy w h' (5 values), a polygon "
                            "'class x1 y1 x2 y2 x3 y3 ...'. Fix the line")
        c = vals[0]
        if not (math.isfinite(c) and c == int(c) and 0 <= c < num_classes):  # int(nan) and int(inf) raise
            raise DataError(f"{where}: class {cap(parts[0], 40)} is not a class index 0..{num_classes - 1} from 'names': "
                            "fix the label or add the class to 'names' in the dataset YAML")
        coords = vals[1:]
        if not all(math.isfinite(v) and -1e-6 <= v <= 1 + 1e-6 for v in coords):
            raise DataError(f"{where}: coordinates must be normalized to 0..1 by the image size (divide pixel "
                            "values by width/height)")
        if len(coords) == 4:
            cx, cy, w, h = coords
        else:
            xs, ys = coords[0::2], coords[1::2]
            cx, cy, w, h = (min(xs) + max(xs)) / 2, (min(ys) + max(ys)) / 2, max(xs) - min(xs), max(ys) - min(ys)
        if w <= 0 or h <= 0:
            raise DataError(f"{where}: width and height must be > 0 (YOLO boxes are 'cx cy w h', not corners)")
        rows.append((int(c), cx, cy, w, h))
    return rows


def _image_size(path: Path) -> tuple[int, int]:
    try:
        with Image.open(path) as im:
            return im.size  # (width, height), from the header only
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"cannot read image {path}: {exc}. Remove or replace the corrupt file") from exc


def to_coco(ds: YoloDataset, split: str) -> tuple[dict, dict[int, Path]]:
    """The split as a COCO ground-truth dict (category id = class index + 1) and image id -> file."""
    images, anns, paths = [], [], {}
    for image_id, f in enumerate(ds.images(split), 1):
        w, h = _image_size(f)
        images.append({"id": image_id, "file_name": ds.display_name(f), "width": w, "height": h})
        paths[image_id] = f
        for c, cx, cy, bw, bh in read_labels(label_path(f), len(ds.names)):
            x1, y1 = max(0.0, (cx - bw / 2) * w), max(0.0, (cy - bh / 2) * h)
            x2, y2 = min(float(w), (cx + bw / 2) * w), min(float(h), (cy + bh / 2) * h)
            if x2 <= x1 or y2 <= y1:
                continue  # entirely outside the image after clipping
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": c + 1,
                         "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
    cats = [{"id": i + 1, "name": n} for i, n in enumerate(ds.names)]
    return {"images": images, "annotations": anns, "categories": cats}, paths
