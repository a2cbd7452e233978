"""Plots for reports. matplotlib is optional (extra ``plot``), imported lazily, Agg backend, no pyplot state.

PNG bytes are deterministic: fixed size and dpi, no ``Software`` metadata, fixed font, so two renders of the
same result are byte-identical and can sit in a manifest.
"""

from __future__ import annotations

import io
import math
import textwrap
from pathlib import Path

from quantkit.errors import require
from quantkit.utils.atomic import atomic_write_bytes

DISPLAY_CAP_DB = 120.0  # an SQNR of +inf (layer has no effect) is drawn at this length
NO_CHARTS_NOTE = ("charts not drawn: matplotlib is not installed (pip install 'quantkit[plot]'); report.json and "
                  "report.md hold the same figures as tables")


def charts_available() -> bool:
    """True when matplotlib can be imported. An export's charts are optional: without it the report is written
    without them (``NO_CHARTS_NOTE`` in its notes) rather than failing after the work is done."""
    from quantkit.utils.optional_deps import is_installed

    return is_installed("matplotlib")


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


def _noise_points(values: list[float]) -> float:
    """Robust scale of the per-layer mAP damages (1.4826 x median |damage|, points): most single layers change
    mAP by nothing real on a small evaluation set, so this is the measurement scatter, not an effect."""
    vals = sorted(abs(v) for v in values if v is not None and math.isfinite(v))
    if not vals:
        return 0.0
    mid = len(vals) // 2
    med = vals[mid] if len(vals) % 2 else 0.5 * (vals[mid - 1] + vals[mid])
    return 1.4826 * med


def sensitivity_bar_chart_bytes(result, top: int = 20, fp16=()) -> bytes:
    """PNG of the ``top`` most damaging layers per panel, worst on top: SQNR with only that layer INT8 (dB,
    sorted lowest first), and, when the analysis measured it, the mAP50:95 drop with only that layer INT8
    (points, sorted largest first). Layers in ``fp16`` (kept FP16 in the export) are drawn orange and tagged.
    Noise: the SQNR panel marks the all-INT8 SQNR; the mAP panel shades +/- the robust scatter of all layers'
    drops (1.4826 x median |drop|): bars inside it are within measurement noise."""
    fp16 = set(fp16)
    layers = list(result.layers.values())

    def sqnr(s):
        return s.damage_sqnr_db if math.isfinite(s.damage_sqnr_db) else DISPLAY_CAP_DB

    def gain(s):
        return s.recovery_sqnr_db if math.isfinite(s.recovery_sqnr_db) else DISPLAY_CAP_DB

    recovery_only = any(s.damage_sqnr_db is None for s in layers)  # the min_int8_share selection's analysis
    if recovery_only:
        label, metric, worst = "output SQNR gained keeping only this layer FP16 (dB; higher = more sensitive)", gain, -1
    else:
        label, metric, worst = "output SQNR, only this layer INT8 (dB; lower = worse)", sqnr, 1
    panels = [(label, sorted(layers, key=lambda s: (worst * metric(s), s.name))[:top],
               lambda s: min(metric(s), DISPLAY_CAP_DB), "tab:blue")]
    if result.has_map:
        panels.append(("mAP50:95 drop, only this layer INT8 (points; higher = worse)",
                       sorted(layers, key=lambda s: (-(s.damage_map_points or 0.0), s.name))[:top],
                       lambda s: s.damage_map_points or 0.0, "tab:red"))
    nrows = max(len(p[1]) for p in panels)
    fig = _figure(len(panels), nrows)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (xlabel, chosen, value, color) in zip(axes, panels):
        chosen = chosen[::-1]  # barh draws the first entry at the bottom: worst on top
        y = range(len(chosen))
        ax.barh(y, [value(s) for s in chosen], color=["tab:orange" if s.name in fp16 else color for s in chosen])
        ax.set_yticks(y)
        ax.set_yticklabels([n + (" [FP16]" if n in fp16 else "") for n in (s.name for s in chosen)], fontsize=7)
        for label, s in zip(ax.get_yticklabels(), chosen):
            if s.name in fp16:
                label.set_color("tab:orange")
        ax.set_xlabel("\n".join(textwrap.wrap(xlabel, 55)), fontsize=8)
        ax.set_ylabel("layer (worst on top)")
        ax.grid(axis="x", alpha=0.3)
    if math.isfinite(result.int8_sqnr_db) and not recovery_only:
        axes[0].axvline(result.int8_sqnr_db, color="black", ls="--", lw=1,
                        label=f"all layers INT8: {result.int8_sqnr_db:.1f} dB")
        axes[0].legend(fontsize=7, loc="lower right")
    if result.has_map:
        noise = _noise_points([s.damage_map_points for s in layers])
        axes[1].axvspan(-noise, noise, color="0.85", zorder=0,
                        label=f"noise: ±{noise:.2f} pt (1.48·median |drop| over {len(layers)} layers)")
        axes[1].axvline(0.0, color="black", lw=0.8)
        axes[1].legend(fontsize=7, loc="lower right")
    longest = max((len(s.name) for p in panels for s in p[1]), default=10) + 7
    fig.set_size_inches(len(panels) * (4.2 + longest * 0.6 * 7 / 72.0), fig.get_size_inches()[1])
    fig.suptitle(f"Per-layer INT8 sensitivity ({result.num_images} calibration images"
                 + (f", mAP on {result.num_eval_images} images" if result.has_map else "")
                 + ("; orange = kept FP16)" if fp16 else ")"), fontsize=10)
    fig.tight_layout()
    return _png(fig)


def sensitivity_bar_chart(result, path: str | Path, top: int = 20, fp16=()) -> Path:
    """Write :func:`sensitivity_bar_chart_bytes` to ``path`` atomically; returns the path."""
    return atomic_write_bytes(path, sensitivity_bar_chart_bytes(result, top, fp16))
