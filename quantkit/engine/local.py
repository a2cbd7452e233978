"""Build an engine on this machine from one Q/DQ ONNX and check its layer precisions.

Shared by ``quantkit build`` and ``quantkit export --engine``: plan for the installed TensorRT (strongly typed
for quantkit's FP16 graph, weak typing with FP16 layer constraints for the FP32 one), build, write
``engine.layers.json`` from the engine inspector, and list layers that do not run in the intended precision.
"""

from __future__ import annotations

import os
from pathlib import Path

import onnx

from quantkit.engine.builder import build_engine, import_tensorrt
from quantkit.engine.config import graph_inputs, parse_trt_version, plan_build
from quantkit.engine.dispatch import is_strong_graph
from quantkit.engine.inspect import compare_precisions, engine_layers, intended_precisions
from quantkit.utils.atomic import atomic_write_json

STRONG_FROM = (10, 12)


def installed_trt_version() -> str:
    """Version of the importable tensorrt (DependencyError with the install hint when there is none)."""
    return import_tensorrt().__version__.split("+")[0]


def prefers_strong(version: str) -> bool:
    """Whether this TensorRT builds quantkit's strongly typed FP16 graph (>= 10.12)."""
    return parse_trt_version(version)[:2] >= STRONG_FROM


def build_and_inspect(onnx_path: str | os.PathLike, out_dir: str | os.PathLike, *, target: str,
                      batch=None, fp16_nodes=(), timing_cache=None, engine_name: str | None = None) -> dict:
    """Build ``onnx_path`` into ``out_dir``; write engine.layers.json; return what was built and any mismatch.

    ``fp16_nodes``: ONNX node names kept FP16 (weak typing only; a strong graph carries its precisions).
    Raises DependencyError/EngineError when TensorRT or a suitable GPU is missing.
    """
    version = installed_trt_version()
    model = onnx.load(str(onnx_path))
    strong = is_strong_graph(model)
    shapes = tuple(graph_inputs(model))
    plan = plan_build(version, onnx_is_strong=strong, target=target, batch=batch, chw=shapes[0][1],
                      fp16_layers=() if strong else tuple(fp16_nodes), input_name=shapes[0][0],
                      inputs=shapes if len(shapes) > 1 else ())
    engine = build_engine(onnx_path, plan, out_dir, timing_cache, engine_name=engine_name)
    layers = engine_layers(engine.read_bytes())
    atomic_write_json(Path(out_dir) / "engine.layers.json", layers)
    return {"engine": engine, "tensorrt": version, "onnx": Path(onnx_path).name, "typing": plan.typing.value,
            "precision_mismatches": compare_precisions(layers, intended_precisions(model))}
