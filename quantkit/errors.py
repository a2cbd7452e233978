"""Error hierarchy. Every user-facing error names the fix; the CLI maps each class to an exit code."""

from __future__ import annotations


class QuantkitError(Exception):
    """Base class of errors caused by the user's input or environment (exit code 2)."""

    exit_code = 2


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


class DependencyError(QuantkitError):
    """An optional dependency (tensorrt, matplotlib, faster-coco-eval, ...) is missing."""


class EngineError(QuantkitError):
    """TensorRT or the GPU is missing or unsuitable for the requested engine build."""


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
