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


class CoverageError(QuantkitError):
    """Weighted ops of the exported graph run in float with no reason (a layer quantkit did not quantize).
    The artifacts and report are still written, so the graph can be inspected; exit code 2."""


class GateFailure(QuantkitError):
    """An accuracy gate (--max-drop, --min-sqnr) failed. Artifacts and report are still written."""

    exit_code = 3


def require(module: str, extra: str):
    """Import an optional dependency or raise DependencyError naming the pip extra to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - depends on environment
        raise DependencyError(
            f"{module} is not installed: install it with `pip install 'quantkit[{extra}]'` ({exc})"
        ) from exc
