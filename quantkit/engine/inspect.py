"""Which precision each layer of a built engine runs in, compared with what the Q/DQ graph intended.

``engine_layers`` reads an engine through TensorRT's IEngineInspector (JSON, needs the engine built with
profiling verbosity DETAILED, as ``build_engine`` and build_engine.sh do). ``compare_precisions`` is pure
Python and also reads the file trtexec writes with ``--exportLayerInfo``.

Matching: TensorRT fuses ONNX nodes into one layer and joins their names ("/a/Conv + /a/Relu",
"PWN(/b/Sigmoid, /b/Mul)"); TensorRT 10 also lists them in "Metadata" as "[ONNX Layer: name]". A layer's
precision is that of its first input tensor ("Format/Datatype": "... Int8 ...", "Half"/"FP16", "Float"/"FP32").
"""

from __future__ import annotations

import json
import re
from typing import Any

import onnx

from quantkit.engine.builder import import_tensorrt
from quantkit.errors import EngineError, UsageError
from quantkit.exporter.graph import GraphIndex, dq_of
from quantkit.exporter.lint import WEIGHTED_OPS

PRECISIONS = ("int8", "fp16", "fp32")
_META = re.compile(r"\[ONNX Layer: (.*?)\]")
_SPLIT = re.compile(r"\s\+\s|,\s|\(|\)")
_WRAPPERS = ("PWN", "ForeignNode", "myelin")


def engine_layers(engine_bytes: bytes) -> list[dict]:
    """Layer dicts (Name, LayerType, Inputs, Outputs, ...) of a serialized engine via IEngineInspector."""
    trt = import_tensorrt()
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(engine_bytes)
    if engine is None:
        raise EngineError("TensorRT could not deserialize the engine (built for another GPU or TensorRT version?)")
    inspector = engine.create_engine_inspector()
    return normalize_layers(json.loads(inspector.get_engine_information(trt.LayerInformationFormat.JSON)))


def normalize_layers(info: dict | list) -> list[dict]:
    """Accept the inspector/--exportLayerInfo JSON (dict with 'Layers', or the list) and return layer dicts.

    Layers given as bare names (profiling verbosity LAYER_NAMES_ONLY) become {'Name': name}.
    """
    layers = info.get("Layers", []) if isinstance(info, dict) else info
    return [dict(layer) if isinstance(layer, dict) else {"Name": str(layer)} for layer in layers]


def layer_precision(layer: dict[str, Any]) -> str | None:
    """'int8' | 'fp16' | 'fp32' from the layer's first input format, None when not recorded."""
    for tensor in layer.get("Inputs", []):
        if not isinstance(tensor, dict):
            continue
        fmt = str(tensor.get("Format/Datatype", "")).lower()
        if "int8" in fmt:
            return "int8"
        if "fp16" in fmt or "half" in fmt:
            return "fp16"
        if "fp32" in fmt or "float" in fmt:
            return "fp32"
    return None


def onnx_names(layer: dict[str, Any]) -> set[str]:
    """ONNX node names a (possibly fused) TensorRT layer was built from."""
    names = set(_META.findall(str(layer.get("Metadata", ""))))
    for token in _SPLIT.split(str(layer.get("Name", ""))):
        token = token.strip()
        if token and token not in _WRAPPERS:
            names.add(token)
    return names


def intended_precisions(model: onnx.ModelProto, float_precision: str = "fp16") -> dict[str, str]:
    """ONNX node name -> intended precision for every Conv/ConvTranspose/Gemm/MatMul of a Q/DQ graph.

    A layer whose data and weight inputs are both dequantized is meant INT8; the others ``float_precision``
    ('fp16' for the weak FP16+INT8 build and the strong FP16 graph, 'fp32' for an FP32 fallback). Unnamed
    nodes are skipped (TensorRT cannot report them by name either).
    """
    if float_precision not in PRECISIONS:
        raise UsageError(f"float_precision must be one of {PRECISIONS}, got {float_precision!r}")
    index = GraphIndex(model)
    out = {}
    for node in index.nodes:
        if node.op_type in WEIGHTED_OPS and node.name and len(node.input) > 1:
            quantized = dq_of(index, node.input[0]) is not None and dq_of(index, node.input[1]) is not None
            out[node.name] = "int8" if quantized else float_precision
    return out


def _weight_source(model: onnx.ModelProto, node: onnx.NodeProto) -> str | None:
    """Initializer name behind a weighted node's weight input, looking through one DequantizeLinear."""
    producers = {o: n for n in model.graph.node for o in n.output}
    name = node.input[1] if len(node.input) > 1 else None
    p = producers.get(name)
    if p is not None and p.op_type == "DequantizeLinear":
        name = p.input[0]
    return name


def onnx_nodes_for_modules(model: onnx.ModelProto, module_names: list[str]) -> dict[str, str]:
    """Map torch module names ('backbone.stem.conv') to the ONNX node names of their weighted op, e.g. for
    ``fp16_layers``. The weight initializer is named after the parameter (``<module>.weight``, or
    ``<module>.weight_int8`` once quantkit folds it to int8), which identifies the node whatever scope names
    the exporter chose; the scope path ('/backbone/stem/conv/Conv') is the fallback. Raises UsageError for
    names that match no node or several, so a typo never silently matches nothing.
    """
    nodes = [n for n in model.graph.node if n.op_type in WEIGHTED_OPS]
    by_weight: dict[str, list[str]] = {}
    for n in nodes:
        src = _weight_source(model, n) or ""
        src = src.removesuffix("_int8")
        if src.endswith(".weight"):
            by_weight.setdefault(src[: -len(".weight")], []).append(n.name)
    result, missing = {}, []
    for module in module_names:
        hits = by_weight.get(module)
        if not hits:
            prefix = "/" + module.replace(".", "/") + "/"
            hits = [n.name for n in nodes if n.name.startswith(prefix) and "/" not in n.name[len(prefix):]]
        if len(hits) != 1:
            missing.append(f"{module} ({len(hits)} matches)")
        else:
            result[module] = hits[0]
    if missing:
        raise UsageError(f"modules without exactly one weighted ONNX node: {missing}; check the module names")
    return result


def _is_reformat(layer: dict[str, Any]) -> bool:
    return layer.get("LayerType") == "Reformat" or str(layer.get("Name", "")).startswith("Reformatting CopyNode")


def compare_precisions(engine_layers: list[dict], intended: dict[str, str]) -> list[str]:
    """Problems where a layer does not run in the precision the graph intended; empty list when all match.

    ``intended``: ONNX node name -> 'int8' | 'fp16' | 'fp32' (e.g. every quantized Conv -> 'int8').
    Reports layers meant INT8 that run FP16/FP32 (and any other mismatch), nodes found in no layer, and
    layers whose precision the engine did not record.
    """
    bad = {k: v for k, v in intended.items() if v not in PRECISIONS}
    if bad:
        raise UsageError(f"intended precisions must be one of {PRECISIONS}; got {bad}")
    by_name: dict[str, list[dict]] = {}
    for layer in engine_layers:
        if _is_reformat(layer):
            continue
        for name in onnx_names(layer):
            by_name.setdefault(name, []).append(layer)
    problems = []
    for node, want in sorted(intended.items()):
        layers = by_name.get(node)
        if not layers:
            problems.append(f"{node}: intended {want.upper()}, but no engine layer contains it "
                            "(renamed or removed by TensorRT; check the engine's layer list)")
            continue
        layer = layers[0]
        got = layer_precision(layer)
        if got is None:
            problems.append(f"{node}: intended {want.upper()}, precision not recorded in layer "
                            f"'{layer.get('Name')}' (build with profiling verbosity DETAILED)")
        elif got != want:
            problems.append(f"{node}: intended {want.upper()}, runs {got.upper()} in layer '{layer.get('Name')}'")
    return problems
