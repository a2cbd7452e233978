"""Calibration data: a folder of images (recursive), a preprocessed float32 ``.npy`` of any rank (N, ...) — NCHW
images, (N, L) audio frames, (N, T, D) tokens — or a ``.npz`` of named float32 arrays for a model with several
inputs, streamed in batches.

A ``.npz``'s arrays are packed side by side into one (N, F) array (each sample's inputs flattened, in the file's
order) so that every stage keeps handling one tensor per batch; ``CalibrationData.inputs`` names and shapes them,
``quantkit.data.inputs`` unpacks them at the model's forward and at the exported graph's inputs.

(``quantkit.data.sources.open_calibration_source`` adds dataset YAMLs, in-memory arrays and iterables.)

Only real data: there is no code path that invents inputs. Images are decoded one batch at a time, so memory
stays bounded by one batch whatever the number of images. ``fingerprint`` hashes the raw bytes of every file
used plus the preprocessing, and keys the calibration cache.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from quantkit.data.images import list_images, load_image
from quantkit.data.preprocess import Preprocess, preprocess_image
from quantkit.data.dtypes import integer_dtype
from quantkit.errors import DataError
from quantkit.recipe import CalibrationSpec, PreprocessSpec  # noqa: F401 (annotations)


@dataclass
class CalibrationData:
    """A calibration source. ``kind``: "images" (files decoded per batch) or an already preprocessed float32
    array: "npy" (a file, memory-mapped), "npz" (several named inputs, packed), "array" (numpy/torch in memory),
    "batches" (read from an iterable). ``input_shape``: one sample's shape ((C, H, W) in pixels for images; (F,)
    for packed inputs). ``inputs``: for a .npz, ((name, per-sample shape), ...) in packed order, else None.
    ``dtypes``: the integer/bool dtype each input was saved with (None for float32), in packed order (one entry
    for a single input), or None when every input is float32; samples are carried as float32 either way
    (``quantkit.data.dtypes``).
    ``names``: the files' names as hashed into the fingerprint (paths relative to the folder or dataset root);
    ``split``: the dataset YAML split the files come from."""

    source: Path | str
    kind: str
    preprocess: Preprocess | None
    batch_size: int
    files: list[Path]
    array: np.ndarray | None
    input_shape: tuple[int, ...]
    _fingerprint: str | None = field(default=None, repr=False)
    names: list[str] | None = None
    split: str | None = None
    inputs: tuple[tuple[str, tuple[int, ...]], ...] | None = None
    dtypes: tuple[str | None, ...] | None = None

    @classmethod
    def from_files(cls, source: Path, files: list[Path], preprocess: Preprocess, batch_size: int, *,
                   names: list[str], split: str | None = None) -> "CalibrationData":
        """Image files (checked readable now, not in the middle of a pass)."""
        for f in files:
            load_image(f)
        return cls(source, "images", preprocess, batch_size, list(files), None, (3, *preprocess.size),
                   names=list(names), split=split)

    @property
    def preprocessed(self) -> bool:
        """True when the data is already a model-ready array (its shape sets the input size)."""
        return self.array is not None

    @property
    def num_samples(self) -> int:
        return len(self.files) if self.array is None else int(self.array.shape[0])

    def __len__(self) -> int:
        """Number of batches."""
        return -(-self.num_samples // self.batch_size)

    def batches(self, limit: int | None = None, *, spread: bool = False) -> Iterator[torch.Tensor]:
        """Yield float32 batches (N, ...); ``limit`` caps the number of samples.

        ``spread``: with a ``limit`` below the number of samples, take ``limit`` samples evenly spaced over the
        whole set (first and last included) instead of the first ``limit``: a folder sorted by name often
        groups similar images (one scene, one video), and a per-layer analysis on its first files sees one."""
        n = self.num_samples if limit is None else min(limit, self.num_samples)
        if spread and n < self.num_samples:
            rows = [int(round(i * (self.num_samples - 1) / max(n - 1, 1))) for i in range(n)]
        else:
            rows = list(range(n))
        for start in range(0, n, self.batch_size):
            take = rows[start:start + self.batch_size]
            if self.array is not None:
                if take == list(range(take[0], take[-1] + 1)):
                    batch = np.array(self.array[take[0]:take[-1] + 1], dtype=np.float32)  # copy: memmap is read-only
                else:
                    batch = np.stack([np.asarray(self.array[i], dtype=np.float32) for i in take])
                if not np.isfinite(batch).all():
                    raise DataError(f"{self.source} rows {take[0]}..{take[-1]} contain NaN or Inf: fix the array")
            else:
                batch = np.stack([preprocess_image(load_image(self.files[i]), self.preprocess)[0] for i in take])
            yield torch.from_numpy(np.ascontiguousarray(batch))

    def fingerprint(self) -> str:
        """sha256 over the data bytes actually used and the preprocessing settings (computed once)."""
        if self._fingerprint is None:
            self._fingerprint = self._compute_fingerprint()
        return self._fingerprint

    def _compute_fingerprint(self) -> str:
        h = hashlib.sha256()
        # the same array gives the same key however it arrived (.npy, in memory, from a DataLoader)
        h.update(b"npy" if self.array is not None else self.kind.encode())
        if self.array is not None:
            h.update(json.dumps([list(self.array.shape), str(self.array.dtype)]).encode())
            if self.inputs:  # the same bytes split into other inputs are other data
                h.update(json.dumps([[n, list(s)] for n, s in self.inputs]).encode())
            if self.dtypes:  # the same values as token ids are other data than as floats
                h.update(json.dumps(list(self.dtypes)).encode())
            for start in range(0, self.array.shape[0], 64):
                h.update(np.ascontiguousarray(self.array[start : start + 64]).tobytes())
        else:
            h.update(json.dumps(self.preprocess.as_dict(), sort_keys=True).encode())
            names = self.names or [f.name for f in self.files]
            for name, f in zip(names, self.files):
                h.update(os.fsencode(name))  # the name's bytes: a non-UTF-8 file name hashes too
                h.update(hashlib.sha256(f.read_bytes()).digest())
        return h.hexdigest()


# Below this many calibration images quantkit warns (issue 24). Provisional: on the bundled detector
# (benchmarks/calib_count.py, RESULTS.md section calib-count) 32 is the smallest count whose random subsets all stay
# within 0.1 mAP50:95 point of FP32 with at most 0.5 dB of output-SQNR spread, but the loss below it is small
# there (at most ~0.2 point) and a 16-image held-out set is noisy: re-measure on a larger model before changing it.
MIN_CALIBRATION_IMAGES = 32


def small_set_note(data: CalibrationData) -> str | None:
    """The warning for a calibration set of fewer than MIN_CALIBRATION_IMAGES samples, or None."""
    n = data.num_samples
    if n >= MIN_CALIBRATION_IMAGES:
        return None
    return (f"calibration uses only {n} image{'s' if n != 1 else ''} (fewer than {MIN_CALIBRATION_IMAGES}): ranges "
            "from so few inputs vary from set to set and miss rare large activations; pass at least "
            f"{MIN_CALIBRATION_IMAGES} representative images (--calib, calibration.max_images)")


def open_calibration_data(
    path: str | Path, preprocess: Preprocess, batch_size: int = 8, max_images: int = 0
) -> CalibrationData:
    """Open ``path`` (image folder or .npy). Image folders are letterboxed to ``preprocess.size``.

    Image folders are searched recursively (see ``list_images``). Raises DataError for a missing path, an empty
    folder, unreadable images (checked up front), a .npy that is not a float32 array (N, ...) with N >= 1, or a
    .npz whose arrays are not all that with one N.
    """
    p = Path(path)
    if not p.exists():
        raise DataError(f"calibration data {p} does not exist: pass --calib DIR (images), --calib FILE.npy or "
                        "--calib FILE.npz (several named inputs)")
    if p.is_file():
        if p.suffix.lower() == ".npz":
            return _open_npz(p, batch_size, max_images)
        if p.suffix.lower() != ".npy":
            raise DataError(f"calibration file {p} is not a .npy or .npz: pass a folder of images, a float32 .npy "
                            "(N, ...) or a .npz of named float32 arrays (one per model input)")
        try:
            arr = np.load(p, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise DataError(f"cannot read {p} as a .npy array ({exc}): save it with numpy.save") from exc
        dtype = _check_array(arr, str(p))
        if max_images:
            arr = arr[:max_images]
        return CalibrationData(p, "npy", None, batch_size, [], arr, tuple(int(s) for s in arr.shape[1:]),
                               dtypes=(dtype,) if dtype else None)
    files = list_images(p)
    if max_images:
        files = files[:max_images]
    # names relative to the folder: a flat folder hashes exactly its file names, as before sub-folders counted
    return CalibrationData.from_files(p, files, preprocess, batch_size, names=[f.relative_to(p).as_posix() for f in files])


def _check_array(arr: np.ndarray, where: str) -> str | None:
    """DataError for an array that is no calibration data; its integer dtype's name, or None for float32."""
    dtype = integer_dtype(arr, where)
    if arr.ndim < 2 or arr.shape[0] == 0 or 0 in arr.shape:
        raise DataError(f"{where} has shape {tuple(arr.shape)}; expected a non-empty float32 array (N, ...) with the "
                        "samples on axis 0 and at least one axis per sample: (N, C, H, W) images, (N, L) audio "
                        "frames, ... (one sample of shape S: arr[None])")
    return dtype


def _open_npz(p: Path, batch_size: int, max_images: int) -> CalibrationData:
    """A .npz of named float32 arrays (N, ...), one per model input, packed into (N, F) in the file's order."""
    try:
        with np.load(p, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (ValueError, OSError) as exc:
        raise DataError(f"cannot read {p} as a .npz ({exc}): save it with numpy.savez(path, name=array, ...)") from exc
    if not arrays:
        raise DataError(f"{p} holds no arrays: save one float32 array (N, ...) per model input, named after it")
    dtypes = tuple(_check_array(a, f"{p}[{k!r}]") for k, a in arrays.items())
    counts = {k: int(a.shape[0]) for k, a in arrays.items()}
    if len(set(counts.values())) > 1:
        raise DataError(f"{p}: the inputs have different numbers of samples {counts}; every array needs the same N "
                        "(sample i of each array is one call of the model)")
    n = min(counts.values()) if not max_images else min(max_images, *counts.values())
    packed = np.concatenate([a[:n].reshape(n, -1).astype(np.float32, copy=False) for a in arrays.values()], axis=1)
    inputs = tuple((k, tuple(int(d) for d in a.shape[1:])) for k, a in arrays.items())
    return CalibrationData(p, "npz", None, batch_size, [], packed, tuple(packed.shape[1:]), inputs=inputs,
                           dtypes=dtypes if any(dtypes) else None)


def open_data(path, spec: "CalibrationSpec", preprocess: "PreprocessSpec",
              size: tuple[int, int]) -> tuple[CalibrationData, Preprocess]:
    """Open calibration data as a recipe describes it: ``path`` is an image folder (recursive), a ``.npy``, a
    dataset YAML (``spec.split``), a .npz (several inputs), a float32 array/tensor (N, ...) or an iterable of batches. Images are
    preprocessed at ``size`` (height, width, pixels); preprocessed data keeps its own spatial shape. Returns the data and the
    preprocessing that evaluation must use to match it."""
    from quantkit.data.sources import open_calibration_source  # YAML, arrays and iterables too

    pp = Preprocess.at_size(preprocess, size)
    data = open_calibration_source(path, pp, spec.batch_size, spec.max_images, split=spec.split)
    if data.preprocessed and data.inputs is None and len(data.input_shape) == 3:  # preprocessed images: own size
        pp = Preprocess.at_size(preprocess, data.input_shape[1:])
    return data, pp
