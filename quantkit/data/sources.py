"""Opening the data a user hands over, in any of the field's conventions, behind two entry functions.

* :func:`open_calibration_source` — calibration: an image folder (searched recursively), a float32 ``.npy`` (N, ...) or a ``.npz`` of named inputs,
  a dataset YAML (a split's images, ``train`` by default), a numpy array / torch tensor (N,C,H,W), or any
  iterable of batches (a torch ``DataLoader``; ``(images, labels)`` items use the images).
* :func:`open_eval_dataset` — evaluation: a COCO folder (``annotations.json`` + ``images/``), images folder +
  explicit COCO annotations JSON, or a dataset YAML with YOLO txt labels (the ``val`` split by default).

Every problem is a DataError naming the fix, raised when the data is opened, before any long pass.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np

from quantkit.data.calib import CalibrationData, open_calibration_data
from quantkit.data.preprocess import Preprocess
from quantkit.data.yolo import is_dataset_yaml, load_dataset_yaml, to_coco
from quantkit.data.dtypes import integer_dtype
from quantkit.errors import DataError



def _as_array(x, where: str, *, sample: bool = False) -> np.ndarray:
    """``x`` as a float32 or integer array (N, ...); ``sample``: a 3-D item of an iterable (a DataLoader's
    batch) is one CHW sample, and must be float32 (integer batches from a loader are un-normalized images far
    more often than token ids: pass ids as one array)."""
    if hasattr(x, "detach"):  # a torch tensor, without importing torch for numpy users
        x = x.detach().cpu().numpy()
    if not isinstance(x, np.ndarray):
        raise DataError(f"{where} is a {type(x).__name__}; expected a float32 array/tensor (N, ...) such as images "
                        "(N,C,H,W), or an (inputs, labels) pair")
    if sample and x.dtype != np.float32:
        raise DataError(f"{where} has dtype {x.dtype}; calibration batches must be float32, preprocessed "
                        "as the model expects (convert with .float() / .astype(np.float32)); integer inputs (token "
                        "ids) are taken as one array or a .npy / .npz")
    integer_dtype(x, where)  # float32, or integers float32 holds exactly
    if sample and x.ndim == 3:  # one CHW sample, as a Dataset (not a DataLoader) yields
        x = x[None]
    if x.ndim < 2 or x.shape[0] == 0:
        raise DataError(f"{where} has shape {tuple(x.shape)}; expected a float32 array (N, ...) with N >= 1: "
                        "(N, C, H, W) images, (N, L) audio frames, ...")
    return x


def _collect_batches(items: Iterable, max_images: int) -> np.ndarray:
    """Read an iterable of batches into one float32 array (N, ...) (up to ``max_images`` samples when > 0).

    Read once, up front: calibration, parity checks and sensitivity analysis each go over the data again, and a
    shuffling DataLoader would otherwise give a different order (and result) each time.
    """
    parts, n = [], 0
    for i, item in enumerate(items):
        if isinstance(item, (tuple, list)):
            if not item:
                raise DataError(f"batch {i} is an empty {type(item).__name__}: yield images, or (images, labels)")
            item = item[0]
        elif isinstance(item, dict):
            raise DataError(f"batch {i} is a dict (keys {sorted(map(str, item))[:5]}): pass an iterable that yields "
                            "image tensors or (images, labels) pairs, e.g. (b['image'] for b in loader)")
        arr = _as_array(item, f"batch {i}", sample=True)
        if parts and arr.shape[1:] != parts[0].shape[1:]:
            raise DataError(f"batch {i} has shape {tuple(arr.shape)}, earlier batches {tuple(parts[0].shape)}: all "
                            "calibration images must share one (C, H, W)")
        if max_images and n + arr.shape[0] > max_images:
            arr = arr[: max_images - n]
        parts.append(np.array(arr, dtype=np.float32))  # a copy: the loader may reuse its buffers
        n += arr.shape[0]
        if max_images and n >= max_images:
            break
    if not parts:
        raise DataError("the calibration iterable yielded no batches: pass a non-empty DataLoader or list of batches")
    return np.concatenate(parts)


def open_calibration_source(source, preprocess: Preprocess, batch_size: int = 8, max_images: int = 0, *,
                            split: str = "train") -> CalibrationData:
    """Open calibration data given in any supported form (see the module docstring).

    Paths: an image folder (recursive), a ``.npy``, or a dataset YAML (``split``'s images). Arrays/tensors and
    iterables must already be preprocessed float32 (N, ...); their input size is taken from them. ``max_images``
    caps the samples used (0: all).
    """
    if isinstance(source, (str, Path)):
        if is_dataset_yaml(source):
            ds = load_dataset_yaml(source)
            files = ds.images(split)
            if max_images:
                files = files[:max_images]
            return CalibrationData.from_files(Path(source), files, preprocess, batch_size,
                                              names=[ds.display_name(f) for f in files], split=split)
        return open_calibration_data(source, preprocess, batch_size, max_images)
    dtype = None
    if hasattr(source, "detach") or isinstance(source, np.ndarray):
        arr = _as_array(source, "the calibration array")
        dtype = None if arr.dtype == np.float32 else arr.dtype.name  # _as_array checked it: float32 or integers
        if max_images:
            arr = arr[:max_images]
        kind, what = "array", f"<{type(source).__name__} {tuple(arr.shape)}>"
    elif hasattr(source, "__iter__"):
        arr = _collect_batches(source, max_images)
        kind, what = "batches", f"<{type(source).__name__}: {arr.shape[0]} samples>"
    else:
        raise DataError(f"calibration data of type {type(source).__name__} is not supported: pass a folder of "
                        "images, a .npy or .npz, a dataset YAML, a float32 array/tensor (N, ...), or an iterable of batches")
    if not np.isfinite(arr).all():
        raise DataError(f"the calibration {kind} contains NaN or Inf: fix the data")
    return CalibrationData(what, kind, None, batch_size, [], arr, tuple(int(s) for s in arr.shape[1:]),
                           dtypes=(dtype,) if dtype else None)


def open_eval_dataset(data: str | Path, *, annotations: str | Path | None = None, split: str = "val",
                      max_images: int | None = None):
    """A :class:`~quantkit.data.coco.CocoDataset` from a COCO folder, an images folder + ``annotations`` JSON,
    or a dataset YAML with YOLO labels (``split``, default ``val``; converted to COCO ground truth)."""
    from quantkit.data.coco import CocoDataset

    if is_dataset_yaml(data):
        if annotations is not None:
            raise DataError("a dataset YAML carries its own labels: pass either --data data.yaml or "
                            "--eval IMAGES --eval-annotations FILE.json, not both")
        ds = load_dataset_yaml(data)
        coco, paths = to_coco(ds, split)
        return CocoDataset.from_coco_dict(coco, root=ds.root, source=f"{data} ({split} split, YOLO labels)",
                                          image_paths=paths, max_images=max_images)
    return CocoDataset(data, annotations=annotations, max_images=max_images)
