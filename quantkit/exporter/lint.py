"""Lint a Q/DQ ONNX graph against the placement rules TensorRT expects.

TensorRT (explicit quantization) reads the graph's QuantizeLinear/DequantizeLinear pairs literally: a pair in
the wrong place either costs a fusion (an extra INT8<->float reformat) or quantizes something that must stay
float (detection scores). ``lint`` walks the graph once and applies small rules, one function each, found in
``RULES``. Each finding names the node and the fix.

    findings = lint(model)                 # FP32 Q/DQ graph for TRT 8.6/10.x weak typing
    findings = lint(model, strong=True)    # FP16 Q/DQ graph for a strongly typed build (opset >= 19)
    print(format_findings(findings))

The rules live in ``quantkit.exporter.lint_rules``, the shared pieces (``GraphIndex``, ``Finding``, ``rule``, op
sets) in ``quantkit.exporter.lint_core``; both are re-exported here.
"""

from __future__ import annotations

import onnx

from quantkit.exporter import lint_rules  # noqa: F401  (importing it registers the rules in RULES, in file order)
from quantkit.exporter.lint_core import (
    DATA_MOVEMENT_OPS,
    DQ_OP,
    FP16_MAX,
    FP16_MIN_NORMAL,
    FP16_MIN_SUBNORMAL,
    HEAD_OPS,
    Q_OP,
    RULES,
    STRONG_MIN_OPSET,
    WEIGHTED_OPS,
    Finding,
    GraphIndex,
    RuleFn,
    Severity,
    get_attr,
    node_label,
    rule,
)


def load_for_lint(path) -> onnx.ModelProto:
    """Read ``path`` as an ONNX model for ``quantkit lint``; UsageError when it is not one.

    ``onnx.load`` parses an empty or unrelated file as an empty ModelProto without complaint (protobuf accepts
    zero bytes), which would lint as "no findings": a model needs an opset import and at least one node.
    """
    from pathlib import Path

    from quantkit.errors import UsageError

    p = Path(path)
    if not p.is_file():
        raise UsageError(f"{p} does not exist or is not a file: pass an .onnx file")
    if p.stat().st_size == 0:
        raise UsageError(f"{p} is empty: pass an ONNX model written by `quantkit export`")
    try:
        model = onnx.load(str(p))
    except Exception as exc:  # noqa: BLE001 - onnx/protobuf raise several types for unreadable files
        raise UsageError(f"cannot read {p} as ONNX ({type(exc).__name__}): pass an .onnx file") from None
    if not model.opset_import or not model.graph.node:
        raise UsageError(f"{p} is not an ONNX model (no opset or no nodes): pass an .onnx file")
    return model


def lint(model: onnx.ModelProto, *, strong: bool = False) -> list[Finding]:
    """Check a Q/DQ graph against TensorRT's placement rules.

    ``strong`` adds the checks for a strongly typed FP16 graph (FP16-representable scales, opset >= 19).
    Returns findings in rule order, then graph order; an empty list means clean.
    """
    index = GraphIndex(model)
    findings: list[Finding] = []
    for fn in RULES.values():
        findings.extend(fn(index, strong))
    return findings


def format_findings(findings: list[Finding]) -> str:
    """Human-readable report, one finding per two lines; 'no findings' when clean."""
    if not findings:
        return "lint: no findings\n"
    errors = sum(f.severity == Severity.ERROR for f in findings)
    lines = [f"lint: {errors} error(s), {len(findings) - errors} warning(s)"]
    for f in findings:
        lines.append(f"{f.severity.value.upper():7s} [{f.rule}] {f.node}: {f.message}")
        lines.append(f"        fix: {f.fix}")
    return "\n".join(lines) + "\n"


__all__ = ["DATA_MOVEMENT_OPS", "DQ_OP", "FP16_MAX", "FP16_MIN_NORMAL", "FP16_MIN_SUBNORMAL", "HEAD_OPS", "Q_OP", "RULES",
           "STRONG_MIN_OPSET", "WEIGHTED_OPS", "Finding", "GraphIndex", "RuleFn", "Severity", "format_findings",
           "get_attr", "lint", "load_for_lint", "node_label", "rule"]
