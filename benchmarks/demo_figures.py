"""The figures the README quotes for `make demo`, measured by running it (issue 24: no hand-copied numbers).

Runs `quantkit export` on the bundled tree detector exactly as `make demo` does (the default recipe, bundled
calibration tiles, held-out evaluation tiles), then the same with `--full-int8`, each with a fresh cache, and writes
section `demo-figures` of RESULTS.md: a table, and the same figures as one JSON line that
`python benchmarks/demo_figures.py --readme` renders into the README's "Measured so far" bullet (between
`<!-- BEGIN figures:demo -->` and `<!-- END figures:demo -->`). tests/unit/test_readme_figures.py checks that the
README block is exactly what RESULTS.md holds, so the two cannot drift.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/demo_figures.py --write --readme
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SECTION = "demo-figures"
COMMAND = "PYTHONPATH=$PWD .venv/bin/python benchmarks/demo_figures.py --write --readme"
README = ROOT / "README.md"
README_BLOCK = re.compile(r"(<!-- BEGIN figures:demo -->\n)(.*?)(<!-- END figures:demo -->)", re.S)
JSON_LINE = re.compile(r"<!-- figures (\{.*?\}) -->")


def _export(out: Path, *extra: str) -> tuple[dict, float, float]:
    """(report.json, wall s, CPU s of the child) of one `quantkit export` into ``out``."""
    env = dict(os.environ, QUANTKIT_CACHE_DIR=str(out.parent / f"cache-{out.name}"))  # a fresh cache per run
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "quantkit", "export", "--out", str(out), "--quiet", *extra],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"quantkit export {' '.join(extra)} exited {proc.returncode}:\n{proc.stderr[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return json.loads((out / "report.json").read_text()), wall, cpu


def figures(report: dict, wall: float, cpu: float) -> dict:
    """The README's figures from one report.json (fractions as in the report; seconds)."""
    ev = report["evaluation"]
    steps = (report.get("passes") or {}).get("steps", [])
    return {
        "fp32_map50_95": ev["fp32_onnx"]["map50_95"], "fp32_map50": ev["fp32_onnx"]["map50"],
        "int8_map50_95": ev["int8_onnx"]["map50_95"], "int8_map50": ev["int8_onnx"]["map50"],
        "drop_points": ev["drop_map50_95_points"], "held_out_images": ev["int8_onnx"]["num_images"],
        "fp16_layers": sum(1 for r in report["layers"] if r["precision"] != "int8"),
        "int8_mac_share": report["int8_mac_share"]["share"],
        "sqnr_db": report["accuracy"]["int8_vs_fp32_sqnr_db"]["worst_db"],
        "method": report["calibration"]["method"],
        "kept": [s["name"] for s in steps if s.get("kept")],
        "reverted": [s["name"] for s in steps if s.get("tried") and not s.get("kept")],
        "int8_size_ratio": report["onnx"]["int8_size_ratio"], "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
    }


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.1f} %"


def section(default: dict, full: dict) -> str:
    rows = ["| export | held-out mAP50:95 / mAP50 INT8 (FP32) | drop, points | FP16 layers | INT8 share of "
            "weighted-op MACs (graph) | output SQNR dB | calibration method | steps kept / reverted | wall s / CPU s |",
            "|---|---|---:|---:|---:|---:|---|---|---|"]
    for name, f in (("default (`make demo`)", default), ("`--full-int8`", full)):
        rows.append(f"| {name} | {f['int8_map50_95']:.4f} / {f['int8_map50']:.4f} ({f['fp32_map50_95']:.4f} / "
                    f"{f['fp32_map50']:.4f}) | {f['drop_points']:.2f} | {f['fp16_layers']} | {_pct(f['int8_mac_share'])} "
                    f"| {f['sqnr_db']} | {f['method']} | {', '.join(f['kept']) or '-'} / "
                    f"{', '.join(f['reverted']) or '-'} | {f['wall_s']} / {f['cpu_s']} |")
    blob = json.dumps({"default": default, "full_int8": full}, sort_keys=True)
    return "\n".join([
        "## The figures the README quotes for `make demo` (bundled tree detector)", "",
        "`quantkit export` as `make demo` runs it (bundled model, `calibration/trees`, held-out "
        "`evaldata/trees_holdout`), then with `--full-int8`; fresh calibration cache each. mAP from onnxruntime on "
        "the held-out tiles (never used for calibration or for the PTQ steps' checks).", "", *rows, "",
        f"<!-- figures {blob} -->"])


def readme_block(fig: dict) -> str:
    """The README bullet rendered from the figures of section `demo-figures`."""
    d, f = fig["default"], fig["full_int8"]
    kept = ", ".join(d["kept"]) or "none"
    reverted = ", ".join(d["reverted"]) or "none"
    return (f"* Bundled tree detector (FP32 held-out mAP50:95 {d['fp32_map50_95']:.3f} / mAP50 {d['fp32_map50']:.3f} on "
            f"{d['held_out_images']} held-out tiles): `make demo` (the default: calibration method `{d['method']}` chosen for this network, "
            f"{d['fp16_layers']} layer(s) FP16 by measured gain, {_pct(d['int8_mac_share'])} of the weighted-op MACs "
            f"INT8 in the graph; PTQ steps kept: {kept}; reverted: {reverted}) scores INT8 {d['int8_map50_95']:.3f} / "
            f"{d['int8_map50']:.3f} in onnxruntime (drop {d['drop_points']:.2f} mAP50:95 points, output SQNR "
            f"{d['sqnr_db']} dB); `--full-int8` {f['int8_map50_95']:.3f} / {f['int8_map50']:.3f} (drop "
            f"{f['drop_points']:.2f}). Export time on 2 shared CPU cores: default {d['wall_s']:.0f} s, full INT8 "
            f"{f['wall_s']:.0f} s. At this accuracy level such differences are mostly noise ({d['held_out_images']} tiles). Section "
            f"`demo-figures` of `benchmarks/RESULTS.md`, with the commit it was measured at.\n")


def results_figures(text: str | None = None) -> dict:
    """The figures JSON of section `demo-figures` in RESULTS.md."""
    text = (HERE / "RESULTS.md").read_text() if text is None else text
    m = JSON_LINE.search(text.split(f"<!-- BEGIN {SECTION} -->", 1)[-1])
    if not m:
        raise SystemExit(f"RESULTS.md has no section {SECTION} with a figures line: run {COMMAND}")
    return json.loads(m.group(1))


def render_readme(readme: str, fig: dict) -> str:
    if not README_BLOCK.search(readme):
        raise SystemExit("README.md has no <!-- BEGIN figures:demo --> block")
    return README_BLOCK.sub(lambda m: m.group(1) + readme_block(fig) + m.group(3), readme)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help="run both exports and rewrite section demo-figures")
    ap.add_argument("--readme", action="store_true", help="render README.md's figures block from RESULTS.md")
    args = ap.parse_args(argv)
    if args.write:
        sys.path[:0] = [str(HERE)]
        from _results import update_section

        with tempfile.TemporaryDirectory() as tmp:
            d = figures(*_export(Path(tmp) / "default"))
            f = figures(*_export(Path(tmp) / "full", "--full-int8"))
        body = section(d, f)
        print(body)
        update_section(SECTION, body, COMMAND)
    if args.readme:
        README.write_text(render_readme(README.read_text(), results_figures()))
    if not (args.write or args.readme):
        ap.print_help()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
