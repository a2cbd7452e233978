"""Low-noise INT8 fidelity on the bundled tree detector: INT8 detections scored against FP32 detections.

Labels cannot tell PTQ methods apart on this detector (all land within noise of FP32 mAP), so the reference is
the FP32 ONNX itself: its detections (score >= 0.25) on every held-out tile in its 8 flips/rotations become
the ground truth, and each INT8 graph's detections are scored against them with COCO mAP50:95 (x100; 100 =
the FP32 detections exactly). The tiles are never calibration tiles. ``±`` is the standard error over the 8
transforms (each transform's mAP computed on its own).

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python benchmarks/ptq_fidelity_trees.py [--only "NAME;NAME"] [--write]

Time: quantization wall time (calibration + PTQ passes, no cache) on this machine, one thread.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

FULL = ["sensitivity.min_int8_share=null", "ptq.bias_correction=false"]  # full INT8, no pass: the other rows add
CONFIGS = {  # name -> overrides of today's default recipe
    "previous default (entropy)": ["calibration.method=entropy", *FULL],
    "percentile": ["calibration.method=percentile", *FULL],
    "mse": ["calibration.method=mse", *FULL],
    "E": ["calibration.method=entropy", *FULL, "ptq.equalize=true"],
    "B": ["calibration.method=entropy", *FULL, "ptq.bias_correction=true"],
    "E+B": ["calibration.method=entropy", *FULL, "ptq.equalize=true", "ptq.bias_correction=true"],
    "percentile+B": ["calibration.method=percentile", *FULL, "ptq.bias_correction=true"],
    "mse+B": ["calibration.method=mse", *FULL, "ptq.bias_correction=true"],
    "R+B": ["calibration.method=entropy", *FULL, "ptq.range_choice=true", "ptq.bias_correction=true"],
    "E+R+B": ["calibration.method=entropy", *FULL, "ptq.equalize=true", "ptq.range_choice=true",
              "ptq.bias_correction=true"],
    "B, min_int8_share 0.95": ["calibration.method=entropy"],
    "E+B, min_int8_share 0.95": ["calibration.method=entropy", "ptq.equalize=true"],
    "percentile+B, min_int8_share 0.95": ["calibration.method=percentile"],
    "default (mse + B, min_int8_share 0.95, selection on 8 tiles)": [],
    "default, selection on 16 tiles": ["sensitivity.num_images=16"],
}
# the same default through the ONNX front end, on the torch route's FP32 ONNX (issue 22: one pipeline for every model)
ONNX_ROUTE = "ONNX route default (quantkit export model.onnx --calib calibration/trees)"
CACHE = Path(tempfile.gettempdir()) / "quantkit_ptq_fidelity.json"


def dihedral(img: np.ndarray) -> list[np.ndarray]:
    """The 8 flips/rotations of an HWC image."""
    out = []
    for k in range(4):
        r = np.rot90(img, k)
        out += [np.ascontiguousarray(r), np.ascontiguousarray(r[:, ::-1])]
    return out


def build_tiles(src: Path, dst: Path) -> list[int]:
    """Write the 8 transforms of every held-out tile as a COCO folder (placeholder boxes); returns transform
    index per image id."""
    from PIL import Image

    from quantkit.data.coco import CocoDataset

    ds = CocoDataset(src)
    (dst / "images").mkdir(parents=True, exist_ok=True)
    images, anns, which = [], [], []
    for image_id, img, name in ds:
        for t, im in enumerate(dihedral(img)):
            i = len(images) + 1
            fn = f"{Path(name).stem}_t{t}.png"
            Image.fromarray(im).save(dst / "images" / fn)
            images.append({"id": i, "file_name": fn, "height": im.shape[0], "width": im.shape[1]})
            anns.append({"id": i, "image_id": i, "category_id": 1, "bbox": [0, 0, 1, 1], "area": 1, "iscrowd": 0})
            which.append(t)
    (dst / "annotations.json").write_text(json.dumps({"images": images, "annotations": anns,
                                                      "categories": [{"id": 1, "name": "tree"}]}))
    return which


def reference(dst: Path, dets: dict, thr: float = 0.25) -> None:
    """Rewrite annotations.json with the FP32 detections (score >= thr) as ground truth."""
    data = json.loads((dst / "annotations.json").read_text())
    anns = []
    for image_id, d in sorted(dets.items()):
        for x1, y1, x2, y2, s, _c in d:
            if s >= thr:
                anns.append({"id": len(anns) + 1, "image_id": int(image_id), "category_id": 1,
                             "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
    data["annotations"] = anns
    (dst / "annotations.ref.json").write_text(json.dumps(data))


def score(dst: Path, dets: dict, which: list[int]) -> tuple[float, float]:
    from quantkit.data.coco import CocoDataset
    from quantkit.eval.detection import coco_map

    per = []
    for t in range(8):
        ids = [i + 1 for i, w in enumerate(which) if w == t]
        data = json.loads((dst / "annotations.ref.json").read_text())
        data["images"] = [im for im in data["images"] if im["id"] in ids]
        data["annotations"] = [a for a in data["annotations"] if a["image_id"] in ids]
        p = dst / f"annotations.t{t}.json"
        p.write_text(json.dumps(data))
        ds = CocoDataset(dst, annotations=p)
        per.append(100.0 * coco_map(ds, {i: dets[i] for i in ids}).map50_95)
    per = np.asarray(per)
    return float(per.mean()), float(per.std(ddof=1) / np.sqrt(len(per))), [round(float(v), 3) for v in per]


def quantize(recipe):
    """pipeline.quantize_and_select, what `quantkit export` runs: equalization before calibration, the automatic
    FP16 choice under the recipe's budget, then the other PTQ passes (recipe.ptq)."""
    from quantkit.pipeline import quantize_and_select

    return quantize_and_select(recipe, progress=False)


def main() -> None:
    import torch

    from quantkit import paths
    from quantkit.data.coco import CocoDataset
    from quantkit.eval.detection import onnx_predictor, predict_dataset
    from quantkit.exporter.onnx_export import export_onnx
    from quantkit.exporter.passes import finalize_fp32, finalize_int8
    from quantkit.recipe import load_recipe

    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="")
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--findings", default="", help="a Markdown file appended under the table (what it shows)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    only = [s for s in args.only.split(";") if s]
    results = json.loads(CACHE.read_text()) if CACHE.exists() else {}
    dst = Path(tempfile.mkdtemp(prefix="qk_fid_"))
    which = build_tiles(paths.BUNDLED_EVAL, dst)
    ds = CocoDataset(dst)
    fp32_bytes = None
    for name, overrides in (list(CONFIGS.items()) + [(ONNX_ROUTE, "onnx")]
                            + [(f"modelopt ONNX PTQ int8 {m}", m) for m in ("entropy", "max")]):
        if only and name not in only:
            continue
        peer = isinstance(overrides, str) and overrides != "onnx"
        recipe = load_recipe(None, ["calibration.use_cache=false", *([] if isinstance(overrides, str) else overrides)])
        t0 = time.perf_counter()
        state = quantize(recipe)
        secs = time.perf_counter() - t0
        example = next(state.data.batches(limit=1))[:1]
        if fp32_bytes is None:
            fp32_bytes = finalize_fp32(export_onnx(state.model.fp32, example, opset=17)).SerializeToString()
            ref = predict_dataset(onnx_predictor(fp32_bytes, intra_op_threads=1), ds, state.pp, progress=False)
            reference(dst, ref)
        onnx_state = None
        if overrides == "onnx":  # the ONNX front end on the same FP32 ONNX and calibration tiles, default recipe
            from quantkit.onnxin.route import quantize_onnx

            fp32_path = dst / "fp32.onnx"
            fp32_path.write_bytes(fp32_bytes)
            t0 = time.perf_counter()
            onnx_state = quantize_onnx(str(fp32_path), str(paths.BUNDLED_CALIBRATION), load_recipe(
                None, ["calibration.use_cache=false", f"model.name='{fp32_path}'",
                       f"calibration.data='{paths.BUNDLED_CALIBRATION}'"]), progress=False)
            secs = time.perf_counter() - t0
            int8 = onnx_state.int8.SerializeToString()
        elif peer:  # modelopt quantizes the same FP32 ONNX with the same calibration tiles
            from ptq_methods import modelopt_ptq

            fp32_path = dst / "fp32.onnx"
            fp32_path.write_bytes(fp32_bytes)
            calib = np.concatenate([b.numpy() for b in state.data.batches()])
            try:
                int8, secs = modelopt_ptq(str(fp32_path), calib, overrides, str(dst))
            except Exception as exc:  # report, do not hide
                print(name, "FAILED", str(exc)[-800:], flush=True)
                continue
        else:
            int8 = finalize_int8(export_onnx(state.model.qmodel, example, opset=17)).SerializeToString()
        dets = predict_dataset(onnx_predictor(int8, intra_op_threads=1), ds, state.pp, progress=False)
        m, se, per = score(dst, dets, which)
        results[name] = {"map_vs_fp32": round(m, 2), "se": round(se, 2), "seconds": round(secs, 1), "per": per}
        if onnx_state is not None:  # the share and FP16 nodes counted on the ONNX route's own graph
            from quantkit.exporter.coverage import graph_coverage

            cov = graph_coverage(onnx_state.int8)
            results[name].update(int8_mac_share=round(cov.share, 4),
                                 fp16=[n for n in onnx_state.layout.candidates if n not in set(onnx_state.layout.int8)])
        elif not peer:  # what stayed FP16 (automatic choice) and the INT8 share of the conv MACs
            from ptq_methods import mac_share

            layout = state.model.layout
            results[name].update(int8_mac_share=round(mac_share(state), 4),
                                 fp16=[n for n in layout.layers if n not in set(layout.int8)])
        print(name, results[name], flush=True)
        CACHE.write_text(json.dumps(results, indent=1))
    if args.write:
        from _results import update_section

        def paired(n: str, base: str) -> str:  # same tiles and transforms: the paired difference is low-noise
            a, b = results[n].get("per"), results.get(base, {}).get("per")
            if not a or not b or n == base:
                return ""
            d = np.asarray(a) - np.asarray(b)
            return f"{d.mean():+.2f} ± {d.std(ddof=1) / np.sqrt(len(d)):.2f}"

        mo, df = "modelopt ONNX PTQ int8 entropy", "previous default (entropy)"
        rows = ["| configuration | mAP50:95 vs FP32 detections | minus modelopt entropy (paired) | minus previous "
                "default (paired) | INT8 MAC share | quantization time s |", "|---|---:|---:|---:|---:|---:|"]
        share = lambda r: "" if r.get("int8_mac_share") is None else f"{100 * r['int8_mac_share']:.1f} %"  # noqa
        rows += [f"| {n} | {r['map_vs_fp32']:.2f} ± {r['se']:.2f} | {paired(n, mo)} | {paired(n, df)} | "
                 f"{share(r)} | {r['seconds']:.1f} |" for n, r in results.items() if n in CONFIGS or n == ONNX_ROUTE or "modelopt" in n]
        body = ("## INT8 fidelity on the bundled detector (INT8 detections vs FP32 detections)\n\n"
                f"{len(which)} tiles: the held-out tiles in their 8 flips/rotations (never calibration tiles); "
                "ground truth = FP32 ONNX detections with score >= 0.25; ± = standard error over the 8 "
                "transforms. Model `trees`; rows without a share are full INT8. E = equalization, R = "
                "consumer-aware ranges, B = bias correction; min_int8_share 0.95 = automatic FP16 by measured "
                "SQNR gain per MAC on 16 calibration tiles, >= 95 % of conv MACs INT8.\n\n" + "\n".join(rows))
        if args.findings:
            body += "\n\n" + Path(args.findings).read_text().strip()
        update_section("ptq-fidelity-trees", body, "python benchmarks/ptq_fidelity_trees.py --write")


if __name__ == "__main__":
    main()
