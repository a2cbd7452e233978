"""Wall time of the default `quantkit export` (automatic FP16 choice) against `--full-int8`, side by side.

Issue 23 asks that the default export take at most 2x the `--full-int8` export's wall time. The only difference
between the two commands is the automatic FP16 choice (`sensitivity.min_int8_share`), so the ratio is what that
choice costs. Both commands run here in one process tree, alternating (full-int8, default, full-int8, ...), each
with a fresh calibration cache folder (nothing reused between runs) and held-out evaluation when the model has
evaluation data (the bundled detector). The ratio uses the medians. Run it with OMP_NUM_THREADS=1 on a quiet machine.

    PYTHONPATH=$PWD python benchmarks/fp16_choice_time.py [--repeats 2] [--write]
    PYTHONPATH=$PWD python benchmarks/fp16_choice_time.py --model yolo_nas_s --input-size 320x320 --write

`yolo_nas_s` runs on its random initial weights (timing only: its accuracy figures mean nothing) and calibrates
on the bundled calibration tiles.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT), str(HERE)]


def _child_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def run(args: list[str], out: Path, cache: Path) -> tuple[float, float, dict]:
    """One whole `quantkit export` in a subprocess: (wall seconds, CPU seconds user+sys, report.json). The CPU
    time is the steadier figure on a shared machine: other people's work stretches wall time, not CPU time."""
    cmd = [sys.executable, "-m", "quantkit", "export", "--out", str(out), "--quiet", *args]
    env = {**os.environ, "QUANTKIT_CACHE_DIR": str(cache), "PYTHONPATH": str(ROOT)}
    c0, t0 = _child_cpu(), time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    secs, cpu = time.perf_counter() - t0, _child_cpu() - c0
    if r.returncode != 0:
        raise RuntimeError(f"{cmd} exited {r.returncode}: {r.stderr[-2000:]}")
    return secs, cpu, json.loads((out / "report.json").read_text())


def _row(name: str, times: list[float], cpus: list[float], rep: dict) -> str:
    ev = rep.get("evaluation") or {}
    share = (rep.get("int8_mac_share") or {}).get("share")
    fp16 = [row for row in rep.get("layers", []) if row.get("precision") != "int8"]
    adds = sum(1 for row in fp16 if row.get("type") == "Add")
    lat = (rep.get("latency_estimate") or {}).get("ms", {})
    est = lat.get("exported (hybrid)", lat.get("exported"))
    sel = ((rep.get("sensitivity") or {}).get("selection") or {})
    cand = sel.get("candidates")
    m = ev.get("int8_onnx", {}).get("map50_95")
    mp = f"{m:.4f} ({ev['fp32_onnx']['map50_95']:.4f})" if m is not None else "n/a"
    return (f"| {name} | {' / '.join(f'{t:.1f}' for t in times)} | {statistics.median(times):.1f} | "
            f"{statistics.median(cpus):.1f} | {mp} | "
            f"{'' if share is None else f'{100 * share:.1f} %'} | {len(fp16)} ({adds} Add) | "
            f"{'' if cand is None else len(cand)} | {'' if est is None else f'{est:.3f}'} "
            f"(full INT8 {lat.get('full INT8', float('nan')):.3f}) |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="registered model (default: the bundled detector)")
    ap.add_argument("--input-size", default=None, help="HxW, e.g. 320x320")
    ap.add_argument("--calib", default=None, help="calibration images (default: the bundled tiles)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--note", default="", help="a line added under the table (e.g. the numbers before a change)")
    args = ap.parse_args()
    common: list[str] = []
    if args.model:
        common += ["--model", args.model, "--calib", args.calib or str(ROOT / "calibration" / "trees")]
    elif args.calib:
        common += ["--calib", args.calib]
    if args.input_size:
        common += ["--input-size", args.input_size]
    tmp = Path(tempfile.mkdtemp(prefix="qk_fp16time_"))
    configs = (("--full-int8", ["--full-int8"]), ("default", []))
    times: dict[str, list[float]] = {name: [] for name, _ in configs}
    cpus: dict[str, list[float]] = {name: [] for name, _ in configs}
    reports: dict[str, dict] = {}
    for i in range(args.repeats):
        for name, extra in configs:
            tag = name.strip("-").replace(" ", "_")
            secs, cpu, rep = run(common + extra, tmp / f"{tag}_{i}", tmp / f"cache_{tag}_{i}")
            times[name].append(secs)
            cpus[name].append(cpu)
            reports[name] = rep
            print(name, round(secs, 1), round(cpu, 1), flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["default"] / med["--full-int8"]
    cpu_ratio = statistics.median(cpus["default"]) / statistics.median(cpus["--full-int8"])
    label = args.model or "bundled detector"
    size = args.input_size or "the model's default input size"
    rows = ["| configuration | export wall time s (each run) | median s | median CPU s | held-out mAP50:95 INT8 (FP32) "
            "| INT8 share of conv MACs | FP16 layers | layers replayed | est. T4 ms, exported (full INT8) |",
            "|---|---|---:|---:|---|---:|---:|---:|---|"]
    rows += [_row(name, times[name], cpus[name], reports[name]) for name, _ in configs]
    body = (f"### FP16 choice cost: default export vs `--full-int8` on {label} at {size}\n\n"
            "`quantkit export` (the whole command: calibration with a fresh cache, automatic FP16 choice or none, "
            "PTQ passes, ONNX export, parity, lint, held-out evaluation when there is data, report), alternating runs "
            f"in one session, `OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}`. "
            f"Common arguments: `{' '.join(common).replace(str(ROOT) + '/', '') or '(none)'}`. 'layers replayed': the candidates the FP16 choice "
            "measured by replay; est. T4 ms: report.json `latency_estimate` (roofline, not measured).\n\n"
            + "\n".join(rows) + f"\n\n**Ratio of medians, default / --full-int8: {ratio:.2f}x wall, {cpu_ratio:.2f}x CPU** "
            "(issue 23 allows <= 2x)." + (f"\n\n{args.note}" if args.note else ""))
    print(body)
    if args.write:
        from _results import update_section

        tag = (args.model or "bundled") + (f"-{args.input_size}" if args.input_size else "")
        cmd = "python benchmarks/fp16_choice_time.py" + "".join(
            f" --{k.replace('_', '-')} {v}" for k, v in (("model", args.model), ("input_size", args.input_size),
                                                          ("repeats", args.repeats)) if v) + " --write"
        update_section(f"fp16-choice-time-{tag}", body, cmd)


if __name__ == "__main__":
    main()
