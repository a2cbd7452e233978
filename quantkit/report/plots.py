"""Plots for reports. matplotlib is optional (extra ``plot``), imported lazily, Agg backend, no pyplot state.

PNG bytes are deterministic: fixed size and dpi, no ``Software`` metadata, fixed font, so two renders of the
same result are byte-identical and can sit in a manifest.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

from quantkit.errors import require
from quantkit.utils.atomic import atomic_write_bytes

DISPLAY_CAP_DB = 120.0  # an SQNR of +inf (layer has no effect) is drawn at this length


def _figure(ncols: int, nrows: int):
    require("matplotlib", "plot")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.0 * ncols, max(2.8, 1.2 + 0.28 * nrows)), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> bytes:
    import matplotlib

    buf = io.BytesIO()
    with matplotlib.rc_context({"font.family": "DejaVu Sans", "svg.hashsalt": "quantkit"}):
        fig.savefig(buf, format="png", metadata={"Software": None}, dpi=100)
    return buf.getvalue()


def sensitivity_bar_chart_bytes(result, top: int = 20) -> bytes:
    """PNG of the ``top`` most damaging layers: SQNR with only that layer INT8 (dB), and, when the analysis
    measured it, the mAP50:95 drop with only that layer INT8 (points)."""
    names = result.ranking()[:top][::-1]  # most damaging at the top of the chart
    labels = [n if len(n) <= 48 else "…" + n[-47:] for n in names]
    panels = [("output SQNR, only this layer INT8 (dB; lower = worse)",
               [min(result.layers[n].damage_sqnr_db, DISPLAY_CAP_DB) for n in names], "tab:blue")]
    if result.has_map:
        panels.append(("mAP50:95 drop, only this layer INT8 (points)",
                       [result.layers[n].damage_map_points for n in names], "tab:red"))
    fig = _figure(len(panels), len(names))
    axes = fig.subplots(1, len(panels), sharey=True, squeeze=False)[0]
    for ax, (xlabel, values, color) in zip(axes, panels):
        ax.barh(range(len(names)), [v if math.isfinite(v) else 0.0 for v in values], color=color)
        ax.set_xlabel(xlabel)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(range(len(names)))
    axes[0].set_yticklabels(labels, fontsize=7)
    axes[0].set_ylabel("layer (worst on top)")
    fig.suptitle(f"Per-layer INT8 sensitivity ({result.num_images} calibration images"
                 + (f", mAP on {result.num_eval_images} images)" if result.has_map else ")"), fontsize=10)
    fig.tight_layout()
    return _png(fig)


def sensitivity_bar_chart(result, path: str | Path, top: int = 20) -> Path:
    """Write :func:`sensitivity_bar_chart_bytes` to ``path`` atomically; returns the path."""
    return atomic_write_bytes(path, sensitivity_bar_chart_bytes(result, top))
