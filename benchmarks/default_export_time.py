"""Wall time of `quantkit export` on the bundled detector: today's default vs the previous default, side by side.

Issue 14 allows the default to grow more accurate as long as its export stays within 3x the previous default's
export time on the bundled detector. Both commands run here in one process tree, alternating (old, new, old,
new, ...), each with a fresh calibration cache folder (nothing reused between runs), the default thread settings
and held-out evaluation included — the whole command a user runs. The ratio uses the medians.

    PYTHONPATH=$PWD python benchmarks/default_export_time.py [--repeats 2] [--write]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

# the previous default (before issue 14's switch), spelled as overrides of today's default recipe
PREVIOUS = ["calibration.method=entropy", "ptq.bias_correction=false", "sensitivity.min_int8_share=null"]


def run(overrides: list[str], out: Path, cache: Path) -> tuple[float, dict]:
    cmd = [sys.executable, "-m", "quantkit", "export", "--out", str(out), "--quiet"]
    for o in overrides:
        cmd += ["--set", o]
    env = {**os.environ, "QUANTKIT_CACHE_DIR": str(cache)}
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    secs = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{cmd} exited {r.returncode}: {r.stderr[-2000:]}")
    return secs, json.loads((out / "report.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="qk_deftime_"))
    times: dict[str, list[float]] = {"previous default": [], "default": []}
    reports: dict[str, dict] = {}
    for i in range(args.repeats):
        for name, ov in (("previous default", PREVIOUS), ("default", [])):
            secs, rep = run(ov, tmp / f"{name.replace(' ', '_')}_{i}", tmp / f"cache_{name[0]}_{i}")
            times[name].append(secs)
            reports[name] = rep
            print(name, round(secs, 1), flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["default"] / med["previous default"]
    rows = ["| configuration | export wall time s (each run) | median s | held-out mAP50:95 INT8 (FP32) | "
            "INT8 share of conv MACs | FP16 layers |", "|---|---|---:|---|---:|---:|"]
    for name, rep in reports.items():
        ev = rep.get("evaluation") or {}
        share = (rep.get("int8_mac_share") or {}).get("share")
        fp16 = sum(1 for row in rep.get("layers", []) if row.get("precision") != "int8")
        rows.append(f"| {name} | {' / '.join(f'{t:.1f}' for t in times[name])} | {med[name]:.1f} | "
                    f"{ev.get('int8_onnx', {}).get('map50_95', float('nan')):.4f} "
                    f"({ev.get('fp32_onnx', {}).get('map50_95', float('nan')):.4f}) | "
                    f"{'' if share is None else f'{100 * share:.1f} %'} | {fp16} |")
    body = ("### Default export time on the bundled detector: today's default vs the previous one\n\n"
            "`quantkit export` (the whole command: calibration with a fresh cache, automatic FP16 choice, PTQ "
            "passes, ONNX export, parity, lint, held-out evaluation, report), alternating runs in one session. "
            f"Previous default = `{' '.join('--set ' + o for o in PREVIOUS)}`.\n\n" + "\n".join(rows)
            + f"\n\n**Ratio of medians: {ratio:.2f}x** (issue 14 allows <= 3x).")
    print(body)
    if args.write:
        from _results import update_section

        update_section("default-export-time", body, "python benchmarks/default_export_time.py --write")


if __name__ == "__main__":
    main()
