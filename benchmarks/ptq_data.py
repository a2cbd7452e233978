"""Three DISJOINT sets of real 224x224 photographs for the PTQ benchmark: calibration, selection, scoring.

Each set is made of seeded random square crops (side 35-100 % of the short edge, random flip, antialiased
resize) of *different source photographs*, so no photo contributes to two sets:

* calibration: scikit-image astronaut, coffee, rocket, brick, camera; DeepForest OSBS_029, SOAP_031;
* selection:   scikit-image chelsea, immunohistochemistry, grass, clock; DeepForest SOAP_061;
* scoring:     scikit-image stereo_motorcycle (left view only), hubble_deep_field, retina, colorwheel, logo,
               gravel, coins, moon, page, text, cell; DeepForest both YELL crops and the DJI drone photo.

scikit-image's data images ship inside its wheel; DeepForest's inside ``deepforest==2.1.0`` (pass the unzipped
``deepforest/data`` folder, see FACTS.md). Returns uint8 NHWC arrays; :func:`normalize` makes model inputs.
"""

from __future__ import annotations

import os

import numpy as np
import torch

CALIB = ["astronaut", "coffee", "rocket", "brick", "camera", "df:OSBS_029.png", "df:SOAP_031.png"]
SELECT = ["chelsea", "immunohistochemistry", "grass", "clock", "df:SOAP_061.png"]
SCORE = ["stereo_motorcycle", "hubble_deep_field", "retina", "colorwheel", "logo", "gravel", "coins", "moon", "page",
         "text", "cell", "df:2019_YELL_2_528000_4978000_image_crop2.png", "df:2019_YELL_2_541000_4977000_image_crop.png",
         "df:AWPE Pigeon Lake 2020 DJI_0005.JPG"]


def _load(name: str, df_dir: str) -> np.ndarray:
    if name.startswith("df:"):
        from skimage import io

        img = io.imread(os.path.join(df_dir, name[3:]))
    else:
        import skimage.data as d

        img = getattr(d, name)()
        if isinstance(img, tuple):  # stereo_motorcycle: (left, right, disparity) -> left only
            img = img[0]
    img = np.asarray(img)
    if img.dtype == bool:
        img = img.astype(np.uint8) * 255
    if img.ndim == 2:
        img = np.stack([img] * 3, -1)
    return np.ascontiguousarray(img[..., :3]).astype(np.uint8)


def _crops(img: np.ndarray, n: int, seed: int, size: int = 224) -> np.ndarray:
    rng = np.random.default_rng(seed)
    h, w = img.shape[:2]
    t = torch.from_numpy(img).permute(2, 0, 1).float()[None]
    out = []
    for _ in range(n):
        side = int(min(h, w) * rng.uniform(0.35, 1.0))
        y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        c = t[..., y:y + side, x:x + side]
        if rng.random() < 0.5:
            c = c.flip(-1)
        c = torch.nn.functional.interpolate(c, size=(size, size), mode="bilinear", antialias=True,
                                            align_corners=False)
        out.append(c.round().clamp(0, 255).to(torch.uint8)[0].permute(1, 2, 0).numpy())
    return np.stack(out)


def build_set(names: list[str], total: int, df_dir: str, seed: int) -> np.ndarray:
    """``total`` crops spread evenly over ``names`` (uint8, N x 224 x 224 x 3)."""
    per = [total // len(names) + (1 if i < total % len(names) else 0) for i in range(len(names))]
    return np.concatenate([_crops(_load(n, df_dir), k, seed + i) for i, (n, k) in enumerate(zip(names, per))])


def build_sets(df_dir: str, n_calib: int = 96, n_select: int = 32, n_score: int = 420) -> dict[str, np.ndarray]:
    assert not set(CALIB) & set(SELECT) and not set(CALIB) & set(SCORE) and not set(SELECT) & set(SCORE)
    return {"calib": build_set(CALIB, n_calib, df_dir, 1000), "select": build_set(SELECT, n_select, df_dir, 2000),
            "score": build_set(SCORE, n_score, df_dir, 3000)}


def normalize(u8: np.ndarray, mean, std) -> torch.Tensor:
    x = torch.from_numpy(u8).permute(0, 3, 1, 2).float() / 255.0
    return (x - torch.tensor(mean).reshape(1, 3, 1, 1)) / torch.tensor(std).reshape(1, 3, 1, 1)
