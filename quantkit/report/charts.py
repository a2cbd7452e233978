"""Charts every export carries: per-layer INT8-vs-FP32 error and the calibration of the worst tensors.

Same rules as ``quantkit.report.plots``: matplotlib (extra ``plot``) imported lazily, Agg canvas without pyplot
state, fixed size, dpi and font, no ``Software`` metadata, so the PNG bytes are identical across runs.
"""

from __future__ import annotations

import math

from quantkit.report.plots import DISPLAY_CAP_DB, _figure, _png

INT8_COLOR, FP16_COLOR = "tab:blue", "tab:orange"
METHOD_STYLE = {"max": ("black", "-"), "entropy": ("tab:green", "--"), "mse": ("tab:purple", "-."),
                "percentile": ("tab:red", ":")}


def _wrap(text: str, width: int) -> str:
    """Break a long title or axis label over lines instead of letting the figure edge cut it."""
    import textwrap

    return "\n".join(textwrap.wrap(text, width, break_long_words=True, break_on_hyphens=False)) or text


def _label_inches(labels: list[str], fontsize: float) -> float:
    """Width (inches) that the longest tick label needs at ``fontsize`` points (DejaVu Sans averages ~0.6 em per
    character): the left margin is sized from it, so no layer name is cut."""
    longest = max((len(x) for x in labels), default=10)
    return 0.3 + longest * 0.6 * fontsize / 72.0


def _capped(v) -> float:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return 0.0
    return min(float(v), DISPLAY_CAP_DB) if v != -math.inf else 0.0


def layer_error_chart_bytes(rows: list[dict], *, num_samples: int, max_rows: int = 40) -> bytes:
    """PNG: one horizontal bar per layer in forward order (first at the top), its output SQNR against FP32 (dB,
    longer = closer to FP32), coloured INT8 or FP16, with a dot for the layer's own input quantization SQNR.

    rows: dicts with name, precision, output_sqnr_db, input_quant_sqnr_db (as in report.json). With more than
    ``max_rows`` layers, the ``max_rows`` of lowest output SQNR are drawn, still in forward order.
    """
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    shown = rows
    if len(rows) > max_rows:
        keep = set(sorted(range(len(rows)), key=lambda i: (_capped(rows[i]["output_sqnr_db"]), i))[:max_rows])
        shown = [r for i, r in enumerate(rows) if i in keep]
    shown = shown[::-1]  # barh draws the first row at the bottom
    labels = [r["name"] + ("  [FP16]" if r["precision"] != "int8" else "") for r in shown]
    left_in, plot_in = _label_inches(labels, 6), 5.2
    width = left_in + plot_in
    fig = _figure(1, len(shown))
    fig.set_size_inches(width, max(3.0, 1.5 + 0.17 * len(shown)))
    ax = fig.subplots()
    y = list(range(len(shown)))
    ax.barh(y, [_capped(r["output_sqnr_db"]) for r in shown],
            color=[INT8_COLOR if r["precision"] == "int8" else FP16_COLOR for r in shown])
    pts = [(i, _capped(r["input_quant_sqnr_db"])) for i, r in zip(y, shown) if r.get("input_quant_sqnr_db") is not None]
    if pts:
        ax.scatter([v for _, v in pts], [i for i, _ in pts], s=9, color="black", zorder=3)
    ax.set_yticks(y)
    ax.set_yticklabels(labels, fontsize=6)
    for label, r in zip(ax.get_yticklabels(), shown):
        if r["precision"] != "int8":
            label.set_color(FP16_COLOR)
    ax.set_xlabel(_wrap(f"SQNR vs FP32 (dB; higher = closer to FP32; capped at {DISPLAY_CAP_DB:g})", 60),
                  fontsize=8)
    ax.set_ylabel("layer (forward order, first on top)")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(handles=[Patch(color=INT8_COLOR, label="output, INT8 layer"),
                       Patch(color=FP16_COLOR, label="output, FP16 layer"),
                       Line2D([], [], marker="o", ls="", color="black", markersize=4,
                              label="its input alone INT8")],
              fontsize=7, loc="lower left", bbox_to_anchor=(0.0, 1.0), ncol=3, frameon=False)
    ax.set_ylim(-0.7, len(shown) - 0.3)
    extra = f"; {len(shown)} lowest of {len(rows)} layers" if len(shown) < len(rows) else ""
    fig.suptitle(_wrap(f"Per-layer INT8 vs FP32 error ({num_samples} calibration inputs{extra})", 70), fontsize=10,
                 x=left_in / width, ha="left")
    height = fig.get_size_inches()[1]
    # fixed margins sized from the labels instead of tight_layout (which measures every tick label twice:
    # seconds with 100+ layers)
    fig.subplots_adjust(left=left_in / width, right=1 - 0.2 / width, top=1 - 0.9 / height, bottom=0.75 / height)
    return _png(fig)


def calibration_chart_bytes(tensors: list[dict], *, chosen_method: str) -> bytes:
    """PNG: for each tensor, the histogram of |x| (log counts) with a vertical line at every method's amax.

    tensors: dicts with name, upper (the histogram's right edge), counts, amax ({method key: amax}),
    input_quant_sqnr_db. The chosen method's line is thicker and named in the legend.
    """
    n = max(1, len(tensors))
    ncols = 2 if n > 1 else 1
    nrows = -(-n // ncols)
    fig = _figure(ncols, nrows)
    fig.set_size_inches(6.0 * ncols, 2.6 * nrows + 0.6)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for k, ax in enumerate(axes.flat):
        if k >= len(tensors):
            ax.set_visible(False)
            continue
        t = tensors[k]
        counts, upper = t["counts"], float(t["upper"])
        width = upper / len(counts)
        # one filled step outline, not a bar per bin: the same picture, drawn about 10x faster
        ax.stairs([max(c, 0) for c in counts], [width * i for i in range(len(counts) + 1)], fill=True, color="0.6")
        ax.set_yscale("log")
        for key, value in sorted(t["amax"].items()):
            if value is None:
                continue
            base = key.split("_", 1)[0]
            color, style = METHOD_STYLE.get(base, ("tab:gray", "-"))
            chosen = key == chosen_method
            ax.axvline(value, color=color, ls=style, lw=2.2 if chosen else 1.0,
                       label=f"{key} {value:.3g}" + (" (chosen)" if chosen else ""))
        sq = t.get("input_quant_sqnr_db")
        title = t["name"].removesuffix("._input_quantizer")
        ax.set_title(_wrap(title + (f" — {sq:.1f} dB at chosen amax" if isinstance(sq, (int, float)) else ""), 70),
                     fontsize=8)
        ax.set_xlabel("|activation|", fontsize=7)
        ax.set_ylabel("count (log)", fontsize=7)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6, loc="upper right")
    fig.suptitle(_wrap("Calibration of the worst tensors: |x| histogram and each method's clip point (amax)",
                       60 * ncols), fontsize=10)
    fig.tight_layout()
    return _png(fig)
