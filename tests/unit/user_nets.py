"""Helpers for tests that export a user's network file (``nets.py:factory``) and check its graphs in onnxruntime."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import onnxruntime as ort


def write_nets(folder: Path, source: str, module_name: str):
    """Write ``source`` to ``folder/nets.py`` and import it (the factories the test exports, run as the oracle)."""
    (folder / "nets.py").write_text(source)
    spec = importlib.util.spec_from_file_location(module_name, folder / "nets.py")
    nets = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(nets)
    return nets


def sqnr_db(ref, test) -> float:
    """10 log10(sum ref^2 / sum (ref - test)^2), in dB."""
    ref, test = np.asarray(ref, np.float64), np.asarray(test, np.float64)
    return 10 * math.log10(np.sum(ref ** 2) / max(np.sum((ref - test) ** 2), 1e-30))


def ort_per_sample(path: Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """The first output of the graph at ``path``, run one sample at a time (an export's batch is 1) with named
    feeds."""
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    n = len(next(iter(feeds.values())))
    return np.concatenate([sess.run(None, {k: v[i:i + 1] for k, v in feeds.items()})[0] for i in range(n)])
