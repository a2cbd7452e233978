"""What quantkit's Q/DQ lint finds in third-party INT8 graphs of the same detector.

Run from the repository root::

    python benchmarks/lint_third_party.py              # bundled weights; rewrites the `lint-third-party` section
    python benchmarks/lint_third_party.py --weights W  # any weights for the bundled architecture (no RESULTS.md)

The graphs are the ones ``benchmarks/ptq_trees.py`` builds (and caches under ``.data/ptq_trees/``): onnxruntime
``quantize_static`` with its defaults and per-channel, nvidia-modelopt's ONNX PTQ (when it runs here), and
quantkit's own ``model.int8.onnx``. Each graph gets ``quantkit.exporter.lint.lint`` (weak typing rules; the
strong FP16 rules too for opset >= 19 graphs) and a table: rule, severity, count, example node, fix.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import onnx

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

import ptq_trees  # noqa: E402

from quantkit.exporter.lint import RULES, Finding, lint  # noqa: E402

SECTION = "lint-third-party"
COMMAND = "python benchmarks/lint_third_party.py"
# Which graphs from ptq_trees to lint, in table order: exact labels, or prefixes where they end with "(".
WANTED = ("ORT default", "ORT pc-entropy", "ORT pc-entropy-headfp32", "modelopt int8 (entropy)",
          "quantkit full-int8 (entropy)", "quantkit hybrid-preds (")


def pick(graphs: list) -> list:
    """The graphs named by WANTED, in WANTED's order."""
    return [g for w in WANTED for g in graphs if (g.label.startswith(w) if w.endswith("(") else g.label == w)]


def qdq_counts(model: onnx.ModelProto) -> tuple[int, int]:
    """(QuantizeLinear, DequantizeLinear) node counts."""
    ops = Counter(n.op_type for n in model.graph.node)
    return ops["QuantizeLinear"], ops["DequantizeLinear"]


def single_output_convs(fp32: onnx.ModelProto) -> set[str]:
    """Names of the FP32 graph's Conv nodes with one output channel (per-tensor == per-channel for them)."""
    shapes = {t.name: tuple(t.dims) for t in fp32.graph.initializer}
    return {n.name for n in fp32.graph.node if n.op_type == "Conv" and shapes.get(n.input[1], (0,))[0] == 1}


def summarize(findings: list[Finding]) -> list[tuple[str, str, int, str, str]]:
    """One row per (rule, severity): count, first node as the example, the rule's fix; in rule order."""
    rows: dict[tuple[str, str], list[Finding]] = {}
    for f in findings:
        rows.setdefault((f.rule, f.severity.value), []).append(f)
    order = list(RULES)
    out = []
    for (rule, sev), fs in sorted(rows.items(), key=lambda kv: (order.index(kv[0][0]), kv[0][1])):
        out.append((rule, sev, len(fs), f"`{fs[0].node}`: {fs[0].message}", fs[0].fix))
    return out


def graph_section(label: str, note: str, path: Path, single: set[str]) -> tuple[str, dict[str, int]]:
    """Markdown for one graph and its {rule: count} map; ``single``: convs with one output channel."""
    model = onnx.load(path)
    opset = next((i.version for i in model.opset_import if i.domain in ("", "ai.onnx")), 0)
    strong = opset >= 19 and any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer)
    findings = lint(model, strong=strong)
    q, dq = qdq_counts(model)
    head = (f"**{label}** ({note}; opset {opset}, {q} QuantizeLinear / {dq} DequantizeLinear"
            f"{', strong FP16 rules on' if strong else ''}): ")
    counts = Counter(f.rule for f in findings)
    if not findings:
        return head + "no findings.\n", counts
    errors = sum(f.severity.value == "error" for f in findings)
    lines = [head + f"{errors} error(s), {len(findings) - errors} warning(s).", "",
             "| rule | severity | count | example node | fix |", "|---|---|---:|---|---|"]
    for rule, sev, n, example, fix in summarize(findings):
        lines.append(f"| {rule} | {sev} | {n} | {example.replace('|', '/')} | {fix} |")
    moot = [f for f in findings if f.rule == "weight-per-channel" and any(f"'{c}'" in f.message for c in single)]
    if moot:
        lines += ["", f"{len(moot)} of the weight-per-channel findings are on convs with a single output channel "
                  "(the 1-class `cls_pred`), where one scale is per-channel: harmless there."]
    return "\n".join(lines) + "\n", counts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", type=Path, help="state dict for the bundled architecture (default: bundled); "
                    "with it, RESULTS.md is left alone")
    ap.add_argument("--no-modelopt", action="store_true")
    ap.add_argument("--no-results", action="store_true")
    args = ap.parse_args(argv)
    ctx = ptq_trees.Context(args.weights)
    arr = ctx.calibration_array()
    graphs = ptq_trees.build_all(ctx, arr, evaluate_graphs=False, modelopt=not args.no_modelopt)
    picked = pick(graphs)
    single = single_output_convs(onnx.load(ctx.fp32))
    parts, summary = [], []
    for g in picked:
        if g.path is None:
            parts.append(f"**{g.label}**: not produced here: `{g.error}`\n")
            continue
        text, counts = graph_section(g.label, g.note, g.path, single)
        parts.append(text)
        summary.append((g.label, counts))
    rules = [r for r in RULES if any(c.get(r) for _, c in summary)]
    overview = ["| graph | " + " | ".join(rules) + " |", "|---|" + "---:|" * len(rules)]
    for label, counts in summary:
        overview.append(f"| {label} | " + " | ".join(str(counts.get(r, 0)) for r in rules) + " |")
    body = ("### What quantkit's Q/DQ lint finds in third-party INT8 graphs\n\n"
            "`quantkit.exporter.lint.lint` (TensorRT explicit-quantization placement rules) on the INT8 graphs of "
            "`benchmarks/ptq_trees.py` (same FP32 ONNX of the bundled tree detector, same calibration tiles). "
            "Counts per rule:\n\n" + "\n".join(overview) + "\n\n" + "\n".join(parts))
    print(body)
    if args.no_results or ctx.custom_weights:
        return 0
    from _results import update_section

    update_section(SECTION, body, COMMAND)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
