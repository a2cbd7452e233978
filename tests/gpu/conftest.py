"""GPU tests: skipped as a whole, with the reason, when tensorrt cannot be imported or no CUDA GPU is visible."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "unit"))  # qdq_graphs: the small hand-built Q/DQ graphs


def _skip_reason() -> str | None:
    try:
        import tensorrt  # noqa: F401
    except Exception as exc:  # ImportError, or OSError from a broken libnvinfer
        return f"tensorrt is not importable ({type(exc).__name__}: {exc}); install quantkit[trt] on a GPU machine"
    try:
        from quantkit.engine.builder import cuda_device

        cuda_device()
    except Exception as exc:
        return f"no CUDA GPU: {exc}"
    try:
        import torch

        if not torch.cuda.is_available():
            return "torch has no CUDA (used for engine I/O buffers); install a CUDA build of torch"
    except ImportError:
        return "torch is not installed"
    return None


SKIP_REASON = _skip_reason()


def pytest_collection_modifyitems(config, items):
    if SKIP_REASON is None:
        return
    marker = pytest.mark.skip(reason=SKIP_REASON)
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(marker)
