"""What a sensitivity analysis will cost, said before it starts, and which evaluation images it scores.

The analysis replays the model once per layer and configuration (only that layer INT8, only that layer float)
for every chunk of images, so its time is about ``2 x layers x chunks`` forwards. :func:`estimate_analysis`
times one real forward and logs that product up front, so nobody waits half an hour without knowing why.

Per-layer mAP sensitivities are scored on a subset of the evaluation data (``sensitivity.eval_images``, 8 by
default, the same for ``quantkit export --sensitivity`` and ``quantkit sensitivity``): ranking layers needs
far fewer images than the final accuracy figure, which is always measured on the whole evaluation set.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

log = logging.getLogger("quantkit")


@dataclass(frozen=True)
class AnalysisEstimate:
    """``forward_s``: one measured forward of a chunk (seconds); ``configs``: replays per layer and chunk (2: damage
    and recovery, 1: recovery only); ``replays``: forwards the analysis runs at most; ``upper_s``: their product
    (replays start at each layer, so the real time is usually lower)."""

    layers: int
    chunks: int
    forward_s: float
    configs: int = 2

    @property
    def replays(self) -> int:
        """Two records per chunk plus ``configs`` replays per layer and chunk."""
        return self.chunks * (2 + self.configs * self.layers)

    @property
    def upper_s(self) -> float:
        return self.forward_s * self.replays

    def message(self) -> str:
        return (f"sensitivity analysis: {self.layers} layers x {self.configs} configuration(s) x {self.chunks} "
                f"chunk(s); one forward took {self.forward_s:.3f} s, so at most ~{_fmt(self.upper_s)} "
                "(set sensitivity.num_images / sensitivity.eval_images lower to shorten it)")


def _fmt(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def estimate_analysis(model: torch.nn.Module, example: torch.Tensor, layers: int, chunks: int,
                      configs: int = 2) -> AnalysisEstimate:
    """Time one forward of ``model`` on ``example`` (one chunk) and log the analysis' expected duration.
    ``configs``: replays per layer and chunk (2: damage and recovery; 1: recovery only)."""
    with torch.no_grad():
        t0 = time.perf_counter()
        model(example)
        forward_s = time.perf_counter() - t0
    est = AnalysisEstimate(layers=layers, chunks=chunks, forward_s=forward_s, configs=configs)
    log.info("%s", est.message())
    return est


def analysis_dataset(eval_path: str | None, eval_images: int):
    """The evaluation subset for per-layer mAP sensitivities: the first ``eval_images`` images of ``eval_path``
    (0: all), or None without evaluation data."""
    if not eval_path:
        return None
    from quantkit.data.coco import CocoDataset

    return CocoDataset(eval_path, max_images=eval_images or None)
