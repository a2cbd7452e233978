"""Calibration data as a ``.npz`` on the ONNX route: one float32 NCHW array per graph input, keyed by the ONNX
input name (what ``np.savez(path, **{input_name: array})`` writes; Polygraphy- and onnxruntime-style feeds).

The ONNX route calibrates one image input, so a usable file holds one array: under the input's name, or under
``arr_0`` (``np.savez(path, array)``, no name given). Any other key, several keys, pickled objects or a damaged
file are a DataError (exit 2) naming the fix. The array is loaded into memory (a .npz cannot be memory-mapped).
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from quantkit.errors import DataError

POSITIONAL = "arr_0"  # np.savez's name for an array passed without a keyword


def is_npz(data) -> bool:
    """True when ``data`` is a path ending in .npz."""
    return isinstance(data, (str, Path)) and str(data).lower().endswith(".npz")


def _keys(p: Path) -> list[str]:
    try:
        with zipfile.ZipFile(p) as zf:
            return [n[:-4] for n in zf.namelist() if n.endswith(".npy")]
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise DataError(f"{p} is not a readable .npz ({type(exc).__name__}): write it with "
                        "np.savez(path, **{input_name: array})") from exc


def npz_shape(data) -> tuple[int, ...] | None:
    """(C, H, W) of a .npz's one 4-D array, read from its header only (free model dims take it), else None
    (``npz_array`` reports a file it cannot use with its own message)."""
    if not is_npz(data) or not Path(data).is_file():
        return None
    p = Path(data)
    try:
        keys = _keys(p)
        if len(keys) != 1:
            return None
        with zipfile.ZipFile(p) as zf, zf.open(keys[0] + ".npy") as f:
            major, _ = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            shape, _, _ = read(f)
    except (DataError, ValueError, OSError, zipfile.BadZipFile):
        return None
    return tuple(int(s) for s in shape[1:]) if len(shape) == 4 else None


def npz_array(data, input_names: list[str]) -> np.ndarray:
    """The calibration array for the graph input ``input_names[0]`` from the .npz at ``data``.

    ``input_names``: the model's graph inputs (the ONNX route accepts one). DataError when the file holds another
    key, several keys, pickled objects, or cannot be read."""
    p = Path(data)
    if not p.is_file():
        raise DataError(f"calibration data {p} does not exist: pass a .npz of float32 NCHW arrays keyed by input name")
    keys = _keys(p)
    name = input_names[0]
    if not keys:
        raise DataError(f"{p} holds no arrays: save one with np.savez({str(p)!r}, **{{{name!r}: array}})")
    unknown = [k for k in keys if k not in input_names and k != POSITIONAL]
    if unknown or len(keys) > 1:
        raise DataError(f"{p} holds the arrays {sorted(keys)[:6]}, but its keys must be the model's input names "
                        f"{input_names} (one array per input; this model takes one): save it with "
                        f"np.savez(path, **{{{name!r}: array}})")
    try:
        with np.load(p, allow_pickle=False) as z:
            return np.asarray(z[keys[0]])
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:  # pickled objects, truncated members
        raise DataError(f"{p}: array {keys[0]!r} cannot be read ({str(exc)[:120]}); save plain float32 arrays "
                        "with np.savez (no object arrays)") from exc
