"""Tensors an ONNX file stores outside itself (``onnx.save(..., save_as_external_data=True)``): read from the
model's own folder, whatever the current folder is, and only from there.

The ONNX spec resolves an external-data ``location`` relative to the model file. Parsing the file's bytes (as
quantkit does, to hash them) loses that folder, so onnx's checker and onnxruntime fell back to the current folder:
a valid model was refused unless run from its own folder. Here every location is checked to stay inside the
model's folder (no absolute path, no ``..`` component, no link leading out) before a byte is read, then the data
is embedded into the in-memory model; the file on disk is never changed.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path, PurePosixPath, PureWindowsPath

import onnx

from quantkit.errors import UsageError
from quantkit.recipe_limits import short_repr

PROTOBUF_LIMIT = 2 ** 31 - 1  # bytes: onnxruntime and onnx take a model from memory only below 2 GiB


def _tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Initializers and tensor attributes of the graph and of local functions (subgraphs are refused earlier)."""
    yield from model.graph.initializer
    for nodes in (model.graph.node, *(f.node for f in model.functions)):
        for n in nodes:
            for a in n.attribute:
                if a.type == onnx.AttributeProto.TENSOR:
                    yield a.t
                elif a.type == onnx.AttributeProto.TENSORS:
                    yield from a.tensors


def _escapes(location: str) -> str | None:
    """Why ``location`` may point outside the model's folder (by its text alone), or None."""
    if PurePosixPath(location).is_absolute() or PureWindowsPath(location).is_absolute() or PureWindowsPath(
            location).drive or location.startswith(("/", "\\")):
        return "an absolute path"
    if ".." in PurePosixPath(location.replace("\\", "/")).parts:
        return "a path with '..'"
    return None


def embed_external_data(model: onnx.ModelProto, path: str | os.PathLike) -> tuple[str, ...]:
    """Read every external tensor of ``model`` (parsed from the file at ``path``) from the file's own folder into
    ``model``. Returns the locations read (empty when the model keeps all data inside).

    UsageError naming the tensor and the fix for: a location that is absolute, has ``..``, or resolves (through a
    link) outside the folder; a missing data file; offsets or lengths outside it; a model over 2 GiB.
    """
    from onnx.external_data_helper import load_external_data_for_tensor

    p = Path(path)
    folder = p.resolve().parent
    fix = (f"save the model with its data beside it, e.g. onnx.save(model, '{p.name}', save_as_external_data=True, "
           "location='weights.bin')")
    used: list[str] = []
    for t in _tensors(model):
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in t.external_data}
        loc = info.get("location", "")
        where = f"{p}: tensor {short_repr(t.name)} stores its data in {short_repr(loc)}"
        why = _escapes(loc) if loc else "no file name"
        target = folder / loc
        try:
            if why is None and not str(target.resolve()).startswith(str(folder) + os.sep):
                why = "a link leading outside the model's folder"
            is_file = why is None and target.is_file()
        except (ValueError, OSError, RuntimeError) as exc:  # a NUL byte, a name over NAME_MAX, a link loop
            why = f"not a usable file name ({type(exc).__name__})"
        if why is not None:
            raise UsageError(f"{where}, {why}: quantkit reads external data only from the model's own folder "
                             f"{folder}; {fix}")
        if not is_file:
            raise UsageError(f"{where}, which is not a file in the model's folder {folder}: copy the data file "
                             f"next to {p.name}, or {fix}")
        try:
            load_external_data_for_tensor(t, str(folder))
        except (ValueError, OSError) as exc:  # offsets/lengths past the file's end, unreadable file
            raise UsageError(f"{where}, which cannot be read ({str(exc)[:200]}): re-export the model") from None
        if loc not in used:
            used.append(loc)
    if used and model.ByteSize() > PROTOBUF_LIMIT:
        raise UsageError(f"{p} with its external data is {model.ByteSize() / 2 ** 30:.1f} GiB; quantkit's ONNX route "
                         "takes models up to 2 GiB")
    return tuple(used)
