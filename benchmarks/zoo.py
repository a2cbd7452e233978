"""Conformance zoo: architectures users bring, built by the libraries that define them, through quantkit.

Run from the repository root, in an environment with torchvision, timm and ultralytics (they need a torch
that torchvision supports; see the section's provenance line)::

    python benchmarks/zoo.py                 # all; rewrites the `zoo` section of benchmarks/RESULTS.md
    python benchmarks/zoo.py resnet18 yolov8n  # some; prints the table only

No weights are downloaded: each network gets seeded initial weights, then its BatchNorm statistics are
re-estimated on real photographs (the shipped calibration/trees tiles and scikit-image's sample photos) so
activations have realistic ranges. Each is exported with the public API (``quantkit.quantize`` +
``quantkit.export``, entropy calibration, weak + strong targets) and checked: export exits cleanly, Q/DQ lint
has no errors, every Conv/ConvTranspose/Gemm/MatMul with a constant weight reads an int8 weight (the rest
are listed with the reason), layer-by-layer parity passes; the INT8 share of MACs is computed from ONNX shapes.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

from _results import update_section  # noqa: E402
from zoo_models import ARCHS, Arch  # noqa: E402
from zoo_measure import measure  # noqa: E402

import quantkit  # noqa: E402
from quantkit.paths import BUNDLED_CALIBRATION  # noqa: E402
from quantkit.recipe import Recipe  # noqa: E402

SECTION = "zoo"
COMMAND = "python benchmarks/zoo.py"
MEAN, STD = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)


def photos(size: int, imagenet_norm: bool) -> np.ndarray:
    """Real RGB photographs at size x size, NCHW float32: calibration/trees tiles + skimage.data photos."""
    from PIL import Image
    from skimage import data as skd

    imgs = [np.asarray(Image.open(p).convert("RGB")) for p in sorted(BUNDLED_CALIBRATION.iterdir())
            if p.suffix.lower() in (".jpg", ".png")][:24]
    for name in ("astronaut", "chelsea", "coffee", "rocket", "cat", "hubble_deep_field", "immunohistochemistry",
                 "retina", "colorwheel", "logo"):
        a = getattr(skd, name)()
        if a.ndim == 3 and a.shape[2] >= 3:
            imgs.append(a[..., :3])
    out = []
    for a in imgs:
        x = np.asarray(Image.fromarray(a).resize((size, size), Image.BILINEAR), np.float32) / 255.0
        out.append(((x - MEAN) / STD) if imagenet_norm else x)
    return np.ascontiguousarray(np.stack(out).transpose(0, 3, 1, 2))


def reestimate_bn(model: nn.Module, images: np.ndarray, batch: int = 8) -> None:
    """Replace BatchNorm running statistics by their average over ``images`` (cumulative, momentum None)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    with torch.no_grad():
        for i in range(0, len(images), batch):
            model(torch.from_numpy(images[i:i + batch]))
    for m, mom in zip(bns, saved):
        m.momentum = mom
    model.eval()


@dataclass
class Row:
    arch: Arch
    status: str = "ok"
    seconds: float = 0.0
    m: dict | None = None


def run_one(arch: Arch, workdir: Path) -> Row:
    t0 = time.perf_counter()
    row = Row(arch)
    try:
        torch.manual_seed(0)
        model = arch.build()
        imgs = photos(arch.size, arch.imagenet_norm)
        reestimate_bn(model, imgs)
        if arch.finalize is not None:
            model = arch.finalize(model).eval()
        calib = workdir / f"{arch.name}.npy"
        np.save(calib, imgs)
        r = Recipe()
        recipe = replace(r, calibration=replace(r.calibration, use_cache=False),  # conformance: full INT8
                         sensitivity=replace(r.sensitivity, min_int8_share=None))
        qmodel = quantkit.quantize(model, calib, recipe, progress=False)
        res = quantkit.export(qmodel, workdir / arch.name, progress=False)
        row.m = measure(workdir / arch.name, res.report, qmodel.quantkit_state)
    except Exception as exc:  # a conformance failure is a result, not a crash of the benchmark
        row.status = f"FAILED: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
        traceback.print_exc()
    row.seconds = time.perf_counter() - t0
    return row


def _db(v) -> str:
    return "—" if v is None else (f"{v}" if isinstance(v, str) else f"{v:.1f}")


def table(rows: list[Row]) -> str:
    head = ("| architecture | library | input | weighted layers | INT8 | float (reason) | INT8 MACs | lint | "
            "layer parity (worst same-input dB) | INT8-vs-FP32 SQNR, worst output, ORT / torch (dB) | strong graph | "
            "residual adds | s |\n|" + "---|" * 13)
    lines = [head]
    for r in rows:
        a = r.arch
        if r.m is None:
            lines.append(f"| {a.name} | {a.library} | {a.size} | — | — | — | — | — | {r.status} | — | — | — | "
                         f"{r.seconds:.0f} |")
            continue
        m = r.m
        floats = "; ".join(f"{n}: {why}" for n, why in m["float_layers"][:3]) or "none"
        if len(m["float_layers"]) > 3:
            floats += f"; +{len(m['float_layers']) - 3} more"
        lint = "clean" if not m["lint_errors"] else f"{m['lint_errors']} errors"
        lint += f", {m['lint_warnings']} warnings" if m["lint_warnings"] else ""
        parity = ("passes" if m["parity_ok"] else f"FAILS at {m['first_disagreement']}") + \
            f" ({_db(m['worst_replay_db'])})"
        lines.append(
            f"| {a.name} | {a.library} | {a.size} | {m['weighted']} | {m['int8']} ({100 * m['int8_share']:.1f} %) | "
            f"{floats} | {100 * m['int8_macs_share']:.1f} % of {m['gmacs']:.2f} GMAC | {lint} | {parity} | "
            f"{_db(m['ort_vs_fp32_db'])} / {_db(m['torch_vs_fp32_db'])} | "
            f"{'passes' if m.get('strong_written', m.get('strong_vs_fp32_db') is not None) else 'not written'} | "
            f"{m['adds_path']} | {r.seconds:.0f} |")
    return "\n".join(lines)


def _slug(name: str) -> str:
    return name.split()[0]


def _json_num(v):
    return str(v)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", help="architectures to run (default: all)")
    ap.add_argument("--rows", type=Path, default=None,
                    help="folder keeping one JSON row per architecture: runs add to it, and the RESULTS.md table "
                         "is written from it once it holds every architecture (lets a long zoo run in parts)")
    ap.add_argument("--table-only", action="store_true", help="run nothing; write the table from --rows")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    chosen = [] if args.table_only else [a for a in ARCHS if not args.names or a.name in args.names]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in chosen:
            print(f"[zoo] {arch.name} ...", flush=True)
            row = run_one(arch, Path(tmp))
            print(f"[zoo] {arch.name}: {row.status} ({row.seconds:.0f} s) {row.m}", flush=True)
            rows.append(row)
            if args.rows is not None:
                args.rows.mkdir(parents=True, exist_ok=True)
                (args.rows / f"{_slug(arch.name)}.json").write_text(json.dumps(
                    {"status": row.status, "seconds": row.seconds, "m": row.m}, default=_json_num))
    if args.rows is not None:
        saved = {a.name: args.rows / f"{_slug(a.name)}.json" for a in ARCHS}
        if all(p.exists() for p in saved.values()):
            rows = []
            for a in ARCHS:
                d = json.loads(saved[a.name].read_text(), parse_constant=float)
                rows.append(Row(a, d["status"], d["seconds"], d["m"]))
            args.names = []
    body = table(rows)
    print(body)
    if not args.names:
        import torchvision

        intro = (f"Architectures from torchvision {torchvision.__version__}, timm and ultralytics (seeded init, "
                 f"BatchNorm statistics re-estimated on {len(photos(32, True))} real photos, entropy calibration "
                 f"on the same photos), exported with `quantkit.quantize` + `quantkit.export` under torch "
                 f"{torch.__version__}. INT8 = Conv/ConvTranspose/Gemm/MatMul with a constant weight reading an "
                 "int8 weight through DequantizeLinear; layer parity = structure and same-input replay of every "
                 "quantized layer call (see quantkit/export/layer_parity.py). The INT8-vs-FP32 SQNR of networks "
                 "with random weights is no accuracy figure (random deep networks amplify small perturbations); "
                 "the conformance claim is that onnxruntime's figure equals torch's fake-quant figure. s: wall-clock "
                 "seconds for the whole export on the machine below, shared with other jobs (not a speed figure)."
                 "\n\n")
        update_section(SECTION, intro + body, COMMAND)
    return 0 if all(r.m is not None and r.m["parity_ok"] and not r.m["lint_errors"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
