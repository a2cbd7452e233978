"""Error hierarchy. Every user-facing error names the fix; the CLI maps each class to an exit code."""

from __future__ import annotations

import errno

#: errno values that mean "the file system has no room": a full disk and an exhausted quota.
DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})


class QuantkitError(Exception):
    """Base class of errors caused by the user's input or environment (exit code 2).

    The message is bounded (``quantkit.quote.bound_message``): a name from a user's file can be megabytes
    long (a valid ONNX tensor name, a state_dict key), and an error must still be one readable line."""

    exit_code = 2

    def __init__(self, *args):
        if len(args) == 1 and isinstance(args[0], str):
            from quantkit.quote import bound_message

            args = (bound_message(args[0]),)
        super().__init__(*args)


class UsageError(QuantkitError):
    """Bad arguments, recipe keys or values."""


class DataError(QuantkitError):
    """Calibration or evaluation data is missing, unreadable or has the wrong shape."""


class ModelError(QuantkitError):
    """The model cannot be built, loaded, or does not accept the data."""


class WeightsError(ModelError):
    """A weights file does not match the model or cannot be loaded safely."""


class CalibrationError(QuantkitError):
    """Calibration produced unusable ranges (amax of 0, NaN or Inf)."""


class ExportError(QuantkitError):
    """An exported graph failed a parity or structural check."""


class StorageError(QuantkitError):
    """The disk is full (ENOSPC, EDQUOT) or a path is too long for the file system (PATH_MAX, NAME_MAX)."""


def is_disk_full(exc: BaseException | None) -> bool:
    """True for an OSError that means the file system is full (ENOSPC) or the user's quota is spent (EDQUOT)."""
    return isinstance(exc, OSError) and exc.errno in DISK_FULL


class DependencyError(QuantkitError):
    """An optional dependency (tensorrt, matplotlib, faster-coco-eval, ...) is missing."""


class EngineError(QuantkitError):
    """TensorRT or the GPU is missing or unsuitable for the requested engine build."""


class CoverageError(QuantkitError):
    """Weighted ops of the exported graph run in float with no reason (a layer quantkit did not quantize).
    The artifacts and report are still written, so the graph can be inspected; exit code 2."""


class GateFailure(QuantkitError):
    """An accuracy gate (--max-drop, --min-sqnr) failed. Artifacts and report are still written; ``result``: the
    export's result (``ExportResult``), so the CLI can still print its summary."""

    exit_code = 3

    def __init__(self, message: str, result=None) -> None:
        super().__init__(message)
        self.result = result


def require(module: str, extra: str):
    """Import an optional dependency or raise DependencyError naming the pip extra to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - depends on environment
        raise DependencyError(
            f"{module} is not installed: install it with `pip install 'quantkit[{extra}]'` ({exc})"
        ) from exc
