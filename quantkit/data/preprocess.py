"""Image preprocessing shared by calibration and evaluation: YOLO-style letterbox, scaling, normalisation."""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
from PIL import Image

from quantkit.recipe import PreprocessSpec


@dataclass(frozen=True)
class Preprocess(PreprocessSpec):
    """How an RGB uint8 image becomes a float32 CHW model input: the recipe's ``PreprocessSpec`` (letterbox,
    pad_value, scale, mean, std: see there) at a resolved model input size.

    size: (height, width) of the model input in pixels.
    """

    size: tuple[int, int] = (640, 640)

    @classmethod
    def at_size(cls, spec: PreprocessSpec, size: tuple[int, int]) -> "Preprocess":
        """``spec`` applied at ``size`` (height, width) in pixels."""
        return cls(size=tuple(size), **{f.name: getattr(spec, f.name) for f in fields(PreprocessSpec)})

    def as_dict(self) -> dict:
        return {
            "size": list(self.size),
            "letterbox": self.letterbox,
            "pad_value": self.pad_value,
            "scale": self.scale,
            "mean": list(self.mean),
            "std": list(self.std),
        }


@dataclass(frozen=True)
class LetterboxInfo:
    """Maps model-input pixels back to original pixels: ``orig = (model - pad) / ratio``.

    ``ratio_y`` is set only for a plain (aspect-changing) resize; then ``ratio`` applies to x alone.
    """

    ratio: float
    pad_x: float
    pad_y: float
    ratio_y: float | None = None

    def to_original(self, boxes: np.ndarray) -> np.ndarray:
        """Map x1,y1,x2,y2 boxes (model-input pixels, shape [N,4]) to original-image pixels."""
        out = np.asarray(boxes, dtype=np.float64).copy()
        out[:, [0, 2]] = (out[:, [0, 2]] - self.pad_x) / self.ratio
        out[:, [1, 3]] = (out[:, [1, 3]] - self.pad_y) / (self.ratio if self.ratio_y is None else self.ratio_y)
        return out


def letterbox(img: np.ndarray, size: tuple[int, int], pad_value: int = 114) -> tuple[np.ndarray, LetterboxInfo]:
    """Resize ``img`` (HWC uint8 RGB) to fit ``size`` keeping aspect ratio; centre-pad with ``pad_value``."""
    h, w = img.shape[:2]
    th, tw = size
    ratio = min(th / h, tw / w)
    nh, nw = max(1, round(h * ratio)), max(1, round(w * ratio))
    if (nh, nw) != (h, w):
        img = np.asarray(Image.fromarray(img).resize((nw, nh), Image.BILINEAR))
    out = np.full((th, tw, 3), pad_value, dtype=np.uint8)
    top, left = (th - nh) // 2, (tw - nw) // 2
    out[top : top + nh, left : left + nw] = img
    return out, LetterboxInfo(ratio=ratio, pad_x=float(left), pad_y=float(top))


def preprocess_image(img: np.ndarray, pp: Preprocess) -> tuple[np.ndarray, LetterboxInfo]:
    """HWC uint8 RGB image -> (float32 CHW array, LetterboxInfo)."""
    if pp.letterbox:
        img, info = letterbox(img, pp.size, pp.pad_value)
    else:
        h, w = img.shape[:2]
        th, tw = pp.size
        if (h, w) != (th, tw):
            img = np.asarray(Image.fromarray(img).resize((tw, th), Image.BILINEAR))
        info = LetterboxInfo(ratio=tw / w, pad_x=0.0, pad_y=0.0, ratio_y=th / h)
    x = img.astype(np.float32) * np.float32(pp.scale)
    mean = np.asarray(pp.mean, dtype=np.float32)
    std = np.asarray(pp.std, dtype=np.float32)
    if np.any(mean != 0) or np.any(std != 1):
        x = (x - mean) / std
    return np.ascontiguousarray(x.transpose(2, 0, 1)), info
