"""Reading image files for calibration and evaluation, with errors that name the fix."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from quantkit.errors import DataError
from quantkit.quote import cap, printable

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")


def list_images(directory: str | Path) -> list[Path]:
    """Image files (jpg/jpeg/png/bmp, any case) anywhere under ``directory``, sorted by relative path.

    Sub-folders are searched recursively (``train/cat/1.jpg`` counts); hidden files and folders (``.x``) are
    skipped, and symbolic links to folders are not followed (no loops). A flat folder lists exactly its files.
    A (non-hidden) sub-folder that cannot be read is a DataError naming it, not a silent gap in the data.
    """
    d = Path(directory)
    if not d.exists():
        raise DataError(f"data directory {d} does not exist: pass an existing folder of .jpg/.png images")
    if not d.is_dir():
        raise DataError(f"{d} is not a directory: pass a folder of .jpg/.png images or a .npy file")
    found: list[tuple[str, Path]] = []

    def unreadable(exc: OSError) -> None:  # os.walk would skip the folder: calibration on part of the data
        where = Path(exc.filename if exc.filename is not None else d)
        what = f"the data folder {printable(d)}" if where == d else f"the folder {printable(where)} inside {printable(d)}"
        raise DataError(f"cannot read {what} ({exc.strerror}): its "
                        "images would be left out silently. Make it readable (chmod -R a+rX) or move it out of "
                        "the data folder") from None

    for folder, subdirs, names in os.walk(d, onerror=unreadable):  # followlinks=False
        subdirs[:] = [s for s in subdirs if not s.startswith(".")]
        base = Path(folder)
        for name in names:
            p = base / name
            if not name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES and p.is_file():
                found.append((p.relative_to(d).as_posix(), p))
    if not found:
        raise DataError(f"no .jpg/.png images in {d} (searched its sub-folders too): put calibration images there "
                        "or pass a .npy array")
    return [p for _, p in sorted(found)]


def load_image(path: str | Path) -> np.ndarray:
    """Decode ``path`` to an HWC uint8 RGB array.

    16-bit images (PNG ``I;16``, ``I``) are scaled to 8 bits (``v / 257``, rounded) instead of being clipped
    at 255 — which turned them all white. Images beyond Pillow's decompression-bomb limit (~179 Mpx) and
    float images are refused with a DataError naming the fix.
    """
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
                return _gray16_to_rgb8(np.asarray(im), path)
            if im.mode == "F":
                raise DataError(f"image {path} holds 32-bit floats: save it as an 8- or 16-bit PNG/JPEG")
            return np.asarray(im.convert("RGB"))
    except Image.DecompressionBombError as exc:
        raise DataError(f"image {path} is too large to decode safely ({exc}); downscale it (calibration resizes "
                        "to the model's input size anyway)") from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DataError(f"cannot read image {printable(path)}: {_reason(exc)}. Remove or replace the corrupt "
                        "file") from exc


def _reason(exc: BaseException) -> str:
    """Why Pillow failed, without its repr of the path (which spells a non-UTF-8 name as ``\\udcNN``)."""
    if isinstance(exc, UnidentifiedImageError):
        return "not an image Pillow can identify"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return cap(exc)


def _gray16_to_rgb8(arr: np.ndarray, path) -> np.ndarray:
    wide = arr.astype(np.int64)
    if wide.size and (wide.min() < 0 or wide.max() > 65535):
        raise DataError(f"image {path} holds 32-bit integers outside 0..65535: save it as an 8- or 16-bit image")
    gray = ((wide * 2 + 257) // 514).astype(np.uint8)  # round(v / 257): 65535 -> 255, 257*k -> k exactly
    return np.repeat(gray[..., None], 3, axis=-1)
