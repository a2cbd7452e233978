"""Where onnxruntime writes the cleaned graph: an anonymous in-memory file, else a temporary folder removed on
every exit path.

onnxruntime saves its optimized model only to a path (``SessionOptions.optimized_model_filepath``). On Linux that
path is ``/proc/self/fd/N`` of a ``memfd_create`` file: nothing reaches the disk, so neither a full ``$TMPDIR``
nor a SIGKILL can leave anything behind. Elsewhere (or when memfd is refused) a ``quantkit-onnx-*`` folder under
``$TMPDIR`` holds it, removed in ``finally`` (exceptions, KeyboardInterrupt, and SIGTERM, which
``quantkit.utils.interrupt`` turns into KeyboardInterrupt). A full ``$TMPDIR`` is a UsageError naming it; onnxruntime
itself reports a failed write as "Protobuf serialization failed", which reads as a fault of the user's model.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from quantkit.errors import UsageError

FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
HEADROOM_BYTES = 1 << 20  # free space below (model size + this) while a write failed: the folder is full


def _read_fd(fd: int) -> bytes:
    os.lseek(fd, 0, os.SEEK_SET)
    parts = []
    while chunk := os.read(fd, 1 << 24):
        parts.append(chunk)
    return b"".join(parts)


def _memfd() -> int | None:
    make = getattr(os, "memfd_create", None)
    if make is None or not Path("/proc/self/fd").is_dir():
        return None
    try:
        return make("quantkit-onnx-cleaned", getattr(os, "MFD_CLOEXEC", 0))
    except OSError:  # no memfd in this kernel / sandbox: use the temporary folder
        return None


def full_tmpdir_error(folder: str | os.PathLike, exc: BaseException | None = None) -> UsageError:
    tmp = Path(folder)
    why = f" ({exc.strerror})" if isinstance(exc, OSError) and exc.strerror else ""
    return UsageError(f"the temporary folder {tmp} is full{why} while writing the cleaned ONNX graph: free space "
                      f"there, or point TMPDIR at a folder with room (about twice the model's size)")


def _looks_full(folder: str, need: int) -> bool:
    try:
        return shutil.disk_usage(folder).free < need + HEADROOM_BYTES
    except OSError:
        return False


def write_via_path(write: Callable[[str], None], size_hint: int) -> bytes:
    """Call ``write(path)`` (a writer that only takes a file path) and return the bytes it wrote.

    ``size_hint``: the expected size in bytes (to tell a full ``$TMPDIR`` from other failures). Raises
    UsageError when ``$TMPDIR`` is full; the writer's own exceptions otherwise.
    """
    fd = _memfd()
    if fd is not None:
        try:
            write(f"/proc/self/fd/{fd}")
            return _read_fd(fd)
        finally:
            os.close(fd)
    try:
        base = tempfile.gettempdir()
    except FileNotFoundError as exc:  # TMPDIR, /tmp, /var/tmp ... none writable
        raise UsageError(f"no usable temporary folder ({exc}): point TMPDIR at a writable folder") from None
    try:
        tmp = tempfile.mkdtemp(prefix="quantkit-onnx-")
    except OSError as exc:
        if exc.errno in FULL_ERRNOS:
            raise full_tmpdir_error(base, exc) from None
        raise UsageError(f"cannot create a temporary folder in {base} ({exc.strerror}): point TMPDIR at a "
                         "writable folder") from None
    try:
        out = os.path.join(tmp, "cleaned.onnx")
        try:
            write(out)
            with open(out, "rb") as fh:
                return fh.read()
        except OSError as exc:
            if exc.errno in FULL_ERRNOS:
                raise full_tmpdir_error(base, exc) from None
            raise
        except Exception:  # the writer's own error type (onnxruntime: "Protobuf serialization failed")
            if _looks_full(tmp, size_hint):
                raise full_tmpdir_error(base) from None
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
