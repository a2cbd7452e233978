"""Build the shipped tree data sets from the real NEON aerial images inside the ``deepforest`` wheel.

Run from the repository root::

    python benchmarks/prepare_trees.py

Steps (idempotent, deterministic; the same wheel gives byte-identical outputs):

1. ``python -m pip download --no-deps deepforest==2.1.0 -d .data/`` and unzip ``deepforest/data/`` into
   ``.data/deepforest_data/`` (skipped when already there).
2. Calibration tiles: 56 seeded random 320x320 crops of the TRAINING images (``TRAIN_IMAGES``), JPEG
   quality 95, into ``calibration/trees/``.
3. Held-out evaluation set: the HELD-OUT image (``HOLDOUT_IMAGE``, 1249x1035, never used for training or
   calibration) cut into a 4x4 grid of 320x320 PNG tiles whose last row/column touch the image edge; each
   box is clipped to the tile and kept when at least half of its area lies inside. Written as
   ``evaldata/trees_holdout/images/*.png`` + ``annotations.json`` (COCO, one category: id 1 "tree").

The training script (``benchmarks/train_trees.py``) reads the raw images through :func:`load_source`.
"""

from __future__ import annotations

import io
import subprocess
import sys
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from quantkit.errors import DataError  # noqa: E402
from quantkit.utils.atomic import atomic_write_bytes, atomic_write_json  # noqa: E402

DEEPFOREST_VERSION = "2.1.0"
DOWNLOAD_DIR = ROOT / ".data"
DATA_DIR = DOWNLOAD_DIR / "deepforest_data"
TRAIN_IMAGES = ("2019_YELL_2_528000_4978000_image_crop2.png", "OSBS_029.png", "SOAP_061.png")
HOLDOUT_IMAGE = "2019_YELL_2_541000_4977000_image_crop.png"
CALIB_DIR = ROOT / "calibration" / "trees"
EVAL_DIR = ROOT / "evaldata" / "trees_holdout"
TILE = 320  # pixels, square
CALIB_SEED = 20190
# Calibration crops per training image: the big YELL scene dominates, the two 400x400 sites add variety.
CALIB_COUNTS = {TRAIN_IMAGES[0]: 40, TRAIN_IMAGES[1]: 8, TRAIN_IMAGES[2]: 8}
CALIB_TAGS = {TRAIN_IMAGES[0]: "yell528", TRAIN_IMAGES[1]: "osbs029", TRAIN_IMAGES[2]: "soap061"}
MIN_INSIDE_FRACTION = 0.5  # keep a clipped box when >= this fraction of its area is inside the tile
CATEGORY = {"id": 1, "name": "tree", "supercategory": "tree"}


def ensure_data(data_dir: Path = DATA_DIR) -> Path:
    """Return the folder holding deepforest's data files, downloading the wheel from PyPI if needed."""
    if all((data_dir / n).exists() for n in (*TRAIN_IMAGES, HOLDOUT_IMAGE)):
        return data_dir
    wheel = DOWNLOAD_DIR / f"deepforest-{DEEPFOREST_VERSION}-py3-none-any.whl"
    if not wheel.exists():
        DOWNLOAD_DIR.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", f"deepforest=={DEEPFOREST_VERSION}",
               "-d", str(DOWNLOAD_DIR)]
        if subprocess.run(cmd, check=False).returncode != 0 or not wheel.exists():
            raise DataError(f"could not download deepforest=={DEEPFOREST_VERSION}: run `{' '.join(cmd)}` "
                            "by hand (needs access to PyPI)")
    data_dir.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as zf:
        for info in zf.infolist():
            name = info.filename
            if name.startswith("deepforest/data/") and not name.endswith("/"):
                (data_dir / Path(name).name).write_bytes(zf.read(info))
    return data_dir


def read_voc_boxes(xml_path: Path) -> np.ndarray:
    """All boxes of a Pascal VOC file as float32 [N,4] x1,y1,x2,y2 pixels (every label counts as "tree")."""
    root = ET.parse(xml_path).getroot()
    boxes = []
    for obj in root.iter("object"):
        bb = obj.find("bndbox")
        boxes.append([float(bb.find(k).text) for k in ("xmin", "ymin", "xmax", "ymax")])
    return np.asarray(boxes, dtype=np.float32).reshape(-1, 4)


def load_source(name: str, data_dir: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(HWC uint8 RGB image, float32 [N,4] x1y1x2y2 boxes in pixels) of one deepforest image."""
    d = ensure_data() if data_dir is None else data_dir
    with Image.open(d / name) as im:
        img = np.asarray(im.convert("RGB"))
    return img, read_voc_boxes(d / (Path(name).stem + ".xml"))


def grid_origins(size: int, tile: int = TILE) -> list[int]:
    """Evenly spaced tile origins covering ``[0, size)``; the first is 0, the last is ``size - tile``."""
    if size <= tile:
        return [0]
    n = -(-size // tile)
    return [round(i * (size - tile) / (n - 1)) for i in range(n)]


def clip_boxes(boxes: np.ndarray, x0: int, y0: int, tile: int = TILE) -> np.ndarray:
    """Boxes shifted into the tile at (x0, y0), clipped to it; those with < 50 % of their area inside dropped."""
    b = boxes - np.array([x0, y0, x0, y0], dtype=np.float32)
    c = np.clip(b, 0, tile)
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    inside = (c[:, 2] - c[:, 0]) * (c[:, 3] - c[:, 1])
    keep = (area > 0) & (inside >= MIN_INSIDE_FRACTION * area) & (inside > 0)
    return c[keep]


def _encode(img: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "JPEG":
        Image.fromarray(img).save(buf, format="JPEG", quality=95, optimize=False)
    else:
        Image.fromarray(img).save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def _remove_stale(directory: Path, suffix: str, keep: set[str]) -> None:
    for p in directory.glob(f"*{suffix}"):
        if p.name not in keep:
            p.unlink()


def write_calibration(data_dir: Path, out_dir: Path = CALIB_DIR) -> list[str]:
    """Write the seeded calibration crops; returns the file names."""
    rng = np.random.default_rng(CALIB_SEED)
    names = []
    for src in TRAIN_IMAGES:
        img, _ = load_source(src, data_dir)
        h, w = img.shape[:2]
        tag = CALIB_TAGS[src]
        for i in range(CALIB_COUNTS[src]):
            y0 = int(rng.integers(0, h - TILE + 1))
            x0 = int(rng.integers(0, w - TILE + 1))
            name = f"{tag}_{i:02d}.jpg"
            atomic_write_bytes(out_dir / name, _encode(img[y0:y0 + TILE, x0:x0 + TILE], "JPEG"))
            names.append(name)
    _remove_stale(out_dir, ".jpg", set(names))
    return names


def write_holdout(data_dir: Path, out_dir: Path = EVAL_DIR) -> dict:
    """Write the held-out tiles + COCO annotations; returns the COCO dict."""
    img, boxes = load_source(HOLDOUT_IMAGE, data_dir)
    h, w = img.shape[:2]
    images, annotations, names = [], [], []
    for y0 in grid_origins(h):
        for x0 in grid_origins(w):
            image_id = len(images) + 1
            name = f"yell541_y{y0:04d}_x{x0:04d}.png"
            atomic_write_bytes(out_dir / "images" / name, _encode(img[y0:y0 + TILE, x0:x0 + TILE], "PNG"))
            names.append(name)
            images.append({"id": image_id, "file_name": name, "width": TILE, "height": TILE})
            for x1, y1, x2, y2 in clip_boxes(boxes, x0, y0).tolist():
                bw, bh = x2 - x1, y2 - y1
                annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": 1,
                                    "bbox": [x1, y1, bw, bh], "area": bw * bh, "iscrowd": 0})
    _remove_stale(out_dir / "images", ".png", set(names))
    coco = {"info": {"description": f"NEON tree crowns, {HOLDOUT_IMAGE} from deepforest=={DEEPFOREST_VERSION}, "
                                    f"{TILE}x{TILE} tiles"},
            "licenses": [], "categories": [CATEGORY], "images": images, "annotations": annotations}
    atomic_write_json(out_dir / "annotations.json", coco)
    return coco


def main() -> None:
    data_dir = ensure_data()
    calib = write_calibration(data_dir)
    coco = write_holdout(data_dir)
    per_tile = np.bincount([a["image_id"] for a in coco["annotations"]], minlength=len(coco["images"]) + 1)[1:]
    print(f"calibration: {len(calib)} tiles -> {CALIB_DIR.relative_to(ROOT)}")
    print(f"held-out: {len(coco['images'])} tiles, {len(coco['annotations'])} boxes "
          f"(per tile min {per_tile.min()}, max {per_tile.max()}) -> {EVAL_DIR.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
