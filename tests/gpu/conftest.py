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


def _cuda_reason() -> str | None:
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return f"torch {torch.__version__} sees no CUDA GPU (CPU build or no device): run on a GPU machine"
    return None


def pytest_collection_modifyitems(config, items):
    for item in items:
        if HERE not in Path(str(item.fspath)).resolve().parents:
            continue
        # cuda_only tests (the --device cuda path) need torch with CUDA, not TensorRT
        reason = _cuda_reason() if item.get_closest_marker("cuda_only") else SKIP_REASON
        if reason is not None:
            item.add_marker(pytest.mark.skip(reason=reason))
