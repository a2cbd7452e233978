"""Reading image files for calibration and evaluation, with errors that name the fix."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from quantkit.errors import DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")


def list_images(directory: str | Path) -> list[Path]:
    """Sorted image files (jpg/jpeg/png/bmp, any case) directly inside ``directory``."""
    d = Path(directory)
    if not d.exists():
        raise DataError(f"data directory {d} does not exist: pass an existing folder of .jpg/.png images")
    if not d.is_dir():
        raise DataError(f"{d} is not a directory: pass a folder of .jpg/.png images or a .npy file")
    files = sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"no .jpg/.png images in {d}: put calibration images there or pass a .npy array")
    return files


def load_image(path: str | Path) -> np.ndarray:
    """Decode ``path`` to an HWC uint8 RGB array."""
    try:
        with Image.open(path) as im:
            im.load()
            return np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DataError(f"cannot read image {path}: {exc}. Remove or replace the corrupt file") from exc
