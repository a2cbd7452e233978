"""What a sensitivity analysis will cost, said before it starts, and which evaluation images it scores.

The analysis replays the model once per layer and configuration (only that layer INT8, only that layer float)
for every chunk of images, each replay running only the part of the forward from that layer on. So its time is
about ``chunks x (2 records + configs x sum over layers of the tail share)`` forwards, where a layer's tail
share is the fraction of a forward's wall time from its first call to the end. :func:`estimate_from_record`
reads both from one timed, recorded forward (the analysis' own first one) and logs the product up front, so
nobody waits half an hour without knowing why; the same shares weight the progress line's ETA.

Per-layer mAP sensitivities are scored on a subset of the evaluation data (``sensitivity.eval_images``, 8 by
default, the same for ``quantkit export --sensitivity`` and ``quantkit sensitivity``): ranking layers needs
far fewer images than the final accuracy figure, which is always measured on the whole evaluation set.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

log = logging.getLogger("quantkit")


@dataclass(frozen=True)
class AnalysisEstimate:
    """``forward_s``: one measured forward of a chunk (seconds); ``configs``: replays per layer and chunk (2: damage
    and recovery, 1: recovery only); ``tail``: mean share of a forward that one replay re-runs (0..1);
    ``replays``: the replays and records the analysis runs; ``expected_s``: the time they should take;
    ``upper_s``: the time if every replay re-ran the whole forward."""

    layers: int
    chunks: int
    forward_s: float
    configs: int = 2
    tail: float = 1.0

    @property
    def replays(self) -> int:
        """Two records per chunk plus ``configs`` replays per layer and chunk."""
        return self.chunks * (2 + self.configs * self.layers)

    @property
    def expected_s(self) -> float:
        return self.forward_s * self.chunks * (2 + self.configs * self.layers * self.tail)

    @property
    def upper_s(self) -> float:
        return self.forward_s * self.replays

    def message(self) -> str:
        return (f"sensitivity analysis: {self.layers} layers x {self.configs} configuration(s) x {self.chunks} "
                f"chunk(s); one forward took {self.forward_s:.3f} s and a replay re-runs {100 * self.tail:.0f} % "
                f"of one on average, so expect about {_fmt(self.expected_s)} "
                "(set sensitivity.num_images / sensitivity.eval_images lower to shorten it)")


def _fmt(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def estimate_from_record(rec, cut_ids: list[int], chunks: int, configs: int = 2) -> tuple[AnalysisEstimate, list[float]]:
    """The estimate from one timed record (``quantkit.sensitivity.replay.Record``) of a chunk, and the tail
    share of each called layer in ``cut_ids`` order (the relative cost of its replays, for the ETA).
    ``configs``: replays per layer and chunk (2: damage and recovery; 1: recovery only)."""
    tails = [t for t in (rec.tail_fraction(i) for i in cut_ids) if t is not None]
    forward_s = max(rec.t_end - rec.t_start, 0.0)
    mean = sum(tails) / len(tails) if tails else 1.0
    return AnalysisEstimate(layers=len(tails), chunks=chunks, forward_s=forward_s, configs=configs, tail=mean), tails


def analysis_dataset(eval_path: str | None, eval_images: int):
    """The evaluation subset for per-layer mAP sensitivities: the first ``eval_images`` images of ``eval_path``
    (0: all), or None without evaluation data."""
    if not eval_path:
        return None
    from quantkit.data.coco import CocoDataset

    return CocoDataset(eval_path, max_images=eval_images or None)
