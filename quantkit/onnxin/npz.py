"""Calibration data as a ``.npz`` on the ONNX route: one float32 NCHW array per graph input, keyed by the ONNX
input name (what ``np.savez(path, **{input_name: array})`` writes; Polygraphy- and onnxruntime-style feeds).

For a model with one input a usable file holds one array: under the input's name, or under ``arr_0``
(``np.savez(path, array)``, no name given); a model with several inputs takes one array per input, named after
it, packed in graph order (:func:`npz_packed`). Any other key, several keys, pickled objects or a damaged
file are a DataError (exit 2) naming the fix. The array is loaded into memory (a .npz cannot be memory-mapped).
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from quantkit.data.dtypes import integer_dtype
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


def npz_shapes(data) -> dict[str, tuple[int, ...]] | None:
    """name -> per-sample shape of every array of a .npz, read from the headers only (a model with several
    inputs takes its free dims from them), else None."""
    if not is_npz(data) or not Path(data).is_file():
        return None
    out = {}
    try:
        with zipfile.ZipFile(Path(data)) as zf:
            for key in _keys(Path(data)):
                with zf.open(key + ".npy") as f:
                    major, _ = np.lib.format.read_magic(f)
                    read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
                    shape, _, _ = read(f)
                out[key] = tuple(int(v) for v in shape[1:])
    except (DataError, ValueError, OSError, zipfile.BadZipFile):
        return None
    return out


def npz_packed(data, inputs: tuple[tuple[str, tuple[int, ...]], ...]) -> tuple[np.ndarray, tuple[str | None, ...]]:
    """A .npz of one float32 or integer array per graph input (``inputs``: (name, per-sample shape) in graph
    order), packed side by side into float32 (N, F) in graph order (``quantkit.data.inputs``), and each array's
    integer dtype (None for float32; ``quantkit.data.dtypes``). DataError naming the fix for a missing or extra
    key, another shape or dtype, unequal sample counts, or a file that cannot be read."""
    p = Path(data)
    names = [n for n, _ in inputs]
    if not p.is_file():
        raise DataError(f"calibration data {p} does not exist: pass a .npz with one float32 array per input {names}")
    keys = _keys(p)
    missing, extra = [n for n in names if n not in keys], [k for k in keys if k not in names]
    if missing or extra:
        raise DataError(f"{p} holds the arrays {sorted(keys)[:8]}, but the model's inputs are {names}: save one "
                        "float32 array per input, named after it (numpy.savez(path, "
                        + ", ".join(f"{n!r}=..." for n in names)[:200] + "))")
    try:
        with np.load(p, allow_pickle=False) as z:
            arrays = {n: np.asarray(z[n]) for n in names}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"{p} cannot be read ({str(exc)[:120]}); save plain float32 arrays with np.savez") from exc
    counts = {n: int(a.shape[0]) if a.ndim else 0 for n, a in arrays.items()}
    dtypes = []
    for n, shape in inputs:
        a = arrays[n]
        dtypes.append(integer_dtype(a, f"{p}[{n!r}]"))  # float32, or integers float32 holds exactly
        if tuple(a.shape[1:]) != tuple(shape):
            raise DataError(f"{p}[{n!r}] is {a.dtype} {tuple(a.shape)}; the model's input {n!r} takes "
                            f"(N, {', '.join(str(d) for d in shape)})")
    if len(set(counts.values())) > 1 or not min(counts.values()):
        raise DataError(f"{p}: the inputs have different (or zero) numbers of samples {counts}; every array needs "
                        "the same N (sample i of each array is one call of the model)")
    n = min(counts.values())
    packed = np.concatenate([arrays[k].reshape(n, -1).astype(np.float32, copy=False) for k in names], axis=1)
    return packed, tuple(dtypes)


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
