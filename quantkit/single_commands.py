"""The commands that are one stage call each: ``quantkit build``, ``lint``, ``verify``, ``layers`` and ``models``
(re-exported by ``quantkit.pipeline``, which strings the multi-stage commands together)."""

from __future__ import annotations

import os
from pathlib import Path

from quantkit.errors import UsageError


def run_build(onnx_path: str | Path, *, target: str = "t4", batch: str | None = None,
              out_dir: str | Path | None = None, timing_cache: str | None = None) -> dict:
    """Build a TensorRT engine from a Q/DQ ONNX here (needs TensorRT and a GPU); see ``engine.build_and_inspect``."""
    from quantkit.engine import build_and_inspect
    from quantkit.engine.builder import cuda_device
    from quantkit.engine.local import installed_trt_version

    p = Path(onnx_path)
    if not p.is_file():
        raise UsageError(f"{p} does not exist: pass an ONNX written by `quantkit export`")
    if timing_cache is not None and Path(timing_cache).exists() and os.path.samefile(timing_cache, p):
        raise UsageError(f"--timing-cache {timing_cache} is the ONNX being built: TensorRT would overwrite it with "
                         "its timing cache; pass another file, e.g. timing.cache")
    installed_trt_version()  # fail with the install hint before anything else
    name, _ = cuda_device()  # the build itself refuses a GPU that does not match --target
    info = build_and_inspect(p, Path(out_dir) if out_dir else p.parent, target=target, batch=batch,
                             timing_cache=timing_cache)
    info["gpu"] = name
    return info


def run_lint(onnx_path: str | Path, *, strong: bool = False) -> tuple[bool, str]:
    """Lint any Q/DQ ONNX against TensorRT's placement rules. Returns (has errors, printable findings)."""
    from quantkit.exporter.lint import Severity, format_findings, lint, load_for_lint

    model = load_for_lint(onnx_path)  # an empty or non-ONNX file is exit 2, not "no findings"
    findings = lint(model, strong=strong)
    text = format_findings(findings) if findings else f"{onnx_path}: no findings"
    return any(f.severity is Severity.ERROR for f in findings), text


def run_verify(out_dir: str | Path) -> list[str]:
    """Problems found re-checking ``out_dir``'s files against its manifest.json (empty: all match)."""
    from quantkit.report.manifest import verify

    return verify(out_dir)


def list_layers(model: str, num_classes: int | None = None) -> dict[str, str]:
    """Quantizable layer name -> type of a registered model or ``file.py:factory`` (for skip patterns)."""
    from quantkit import models, reparam
    from quantkit.quant.insert import quantizable_layers

    m, _ = models.build_model(model, num_classes=num_classes, warn_random_init=False)  # names need no weights
    return quantizable_layers(reparam.reparameterize(m.eval()))


def list_models() -> list[dict]:
    """Registered models: name, exact parameter count (None with the reason when it cannot be built), input
    size (height, width) and description."""
    from quantkit import models

    rows = []
    for e in models.list_models():
        try:  # exact counts (raw, as super-gradients counts them): the registry's, else from the built module
            count = e.parameters if e.parameters is not None else models.count_parameters(
                models.build_model(e.name, warn_random_init=False)[0])
            why = None
        except Exception as exc:  # noqa: BLE001 - a missing asset must not hide the other models
            count, why = None, type(exc).__name__
        rows.append({"name": e.name, "parameters": count, "error": why, "input_size": e.input_size,
                     "description": e.description})
    return rows
