"""report.md: the export summary a person reads (model, calibration, precision map, accuracy, sizes)."""

from __future__ import annotations


def fmt_number(v, nd=3) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def mac_share_text(share: dict | None) -> str | None:
    """'87.50% (1,234,567 of 1,411,000 MACs per image)' or None when the report has no MAC share."""
    if not share or share.get("share") is None:
        return None
    where = f", counted in {share['source']}" if share.get("source") else ""
    return (f"{100 * share['share']:.2f}% ({share['int8_macs']:,} of {share['total_macs']:,} conv/linear MACs "
            f"at batch {share['batch']}{where})")


def coverage_lines(cov: dict | None, max_rows: int = 40) -> list[str]:
    """The weighted ops of the exported graph left in float, each with its reason; the error when one has none."""
    if not cov:
        return []
    lines = ["", "## Coverage of the exported graph", "",
             f"{cov['int8_ops']} of {cov['weighted_ops']} weighted ops (Conv / ConvTranspose / Gemm / MatMul with a "
             f"constant weight) in `{cov['source']}` run INT8; _{cov['rule']}_.", ""]
    if cov.get("error"):
        lines += [f"**Error: {cov['error']}**", ""]
    rows = cov.get("float_ops") or []
    if rows:
        lines += ["| float op | layer | MACs | why |", "|---|---|---|---|"]
        lines += [f"| `{r['node']}` ({r['op']}) | `{r['layer']}` | {r['macs']:,} | {r['reason'] or '**no reason**'} |"
                  for r in rows[:max_rows]]
        if len(rows) > max_rows:
            lines.append(f"\n({len(rows) - max_rows} more in report.json)")
    return lines


def worst_tensor_rows(report: dict) -> tuple[list[str], list[list[str]]]:
    """Header and rows (plain strings) of the worst-tensors table: name, own SQNR, each method's amax."""
    worst = (report.get("layer_errors") or {}).get("worst_tensors") or []
    methods = sorted({k for t in worst for k in t["amax"]})
    head = ["tensor", "its INT8 SQNR (dB)", *[f"amax {m}" for m in methods]]
    rows = [[t["name"], fmt_number(t["input_quant_sqnr_db"], 2),
             *[fmt_number(t["amax"].get(m), 4) for m in methods]] for t in worst]
    return head, rows


def parity_layer_lines(pl: dict | None, max_rows: int = 60) -> list[str]:
    """The layer-by-layer parity table (onnxruntime vs the torch fake-quant model on the same input): the
    debugger for an engine that disagrees with the fake-quant model. First disagreement on top."""
    if not pl:
        return []
    first = pl.get("first_disagreement")
    lines = ["", "## Parity, layer by layer", "",
             f"First disagreement: **`{first}`**" if first else
             "Every quantized layer agrees with the torch fake-quant model on the same input.", "",
             f"_Criterion: {pl.get('criterion', '')}._", "",
             "| layer | op | INT8 | torch vs onnxruntime, same input (dB) | over 1 step | torch vs onnxruntime, full run (dB) "
             "| INT8 vs FP32 (dB) |", "|---|---|---|---|---|---|---|"]
    rows = pl.get("layers") or []
    for r in rows[:max_rows]:
        lines.append(f"| `{r['layer']}` | {r['op']} | {'yes' if r['int8'] else 'no'} | {r['torch_vs_ort_replay_db']} | "
                     f"{100 * r['over_one_step']:.2f} % | {r['torch_vs_ort_run_db']} | {r['int8_vs_fp32_db']} |")
    if len(rows) > max_rows:
        lines.append(f"\n({len(rows) - max_rows} more layers in report.json)")
    return lines


def pass_lines(passes: dict | None) -> list[str]:
    """The guarded accuracy steps: tried, kept or reverted, with the check-image SQNR before and after."""
    if not passes:
        return []
    lines = ["## Accuracy steps, each checked on held-out calibration images", "",
             f"Fitted on {passes['fit_images']} calibration images, judged on {passes['check_images']} others "
             f"({passes['measure']}); a step is kept only when it raises it.", "",
             "| step | result | dB before | dB after | changed |", "|---|---|---|---|---|"]
    for s in passes["steps"]:
        lines.append(f"| {s['name']} | {s['verdict']} | {fmt_number(s['check_sqnr_db_before'], 2)} | "
                     f"{fmt_number(s['check_sqnr_db_after'], 2)} | {s['changed'] or ''} |")
    by = next((s["measured"].get("check_sqnr_db_by_method") for s in passes["steps"]
               if s["measured"].get("check_sqnr_db_by_method")), None)
    if by:
        lines += ["", "Calibration methods on the check images: "
                  + ", ".join(f"{k} {fmt_number(v, 2)} dB" for k, v in by.items()) + "."]
    return lines + [""]


def _params(report: dict) -> str:
    """The parameter counts, said the way the route got them (the ONNX route reparameterizes nothing)."""
    m = report["model"]
    if report.get("route") == "onnx":
        return (f"{m['parameters']:,} float values in the file's initializers; {m['parameters_deploy']:,} in the "
                "cleaned graph, folded constants included")
    return f"{m['parameters']:,} parameters; {m['parameters_deploy']:,} after reparameterization"


def _reference(report: dict) -> str:
    """What model.int8.onnx is checked against: the torch fake-quant model, or (ONNX route, no torch model) the
    same Q/DQ in plain float ops."""
    return "float Q/DQ reference" if report.get("route") == "onnx" else "torch fake-quant"


def render_markdown(report: dict) -> str:
    """Render report.json's content as Markdown (deterministic)."""
    m, c, acc = report["model"], report["calibration"], report["accuracy"]["int8_vs_fp32_sqnr_db"]
    lines = [
        f"# quantkit export report — {m['name']}",
        "",
        "## Summary",
        "",
        "| | |",
        "|---|---|",
        f"| model | `{m['name']}` ({_params(report)}) |",
        f"| input | {report['input']['shape']} (batch `{report['input']['batch']}`) |",
        f"| calibration | {c['method']} on {c['num_samples']} {c['kind']} from `{c['data']}` |",
        f"| INT8 layers | {m['int8_layers']} of {m['quantizable_layers']} quantizable (the rest run FP16 in TensorRT) |",
        f"| INT8 vs FP32 output SQNR | {fmt_number(acc['worst_db'], 2)} dB worst output ({report['accuracy']['sqnr_data']}) |",
        f"| {_reference(report)} vs onnxruntime | "
        f"{fmt_number(report['parity']['int8_onnx_vs_torch_fakequant']['worst_db'], 2)} dB |",
    ]
    strong = report.get("strong")
    if strong:
        lines.append(f"| strongly typed FP16 graph | " + (f"`{strong['file']}`" if strong["status"] == "written" else
                     f"**not written** (model.int8.onnx is): {strong['failure']}") + " |")
        for line in strong.get("kept_fp32_constants", []) + strong.get("clamped_constants", []):
            lines.append(f"| FP16 range | {line} |")
    share = mac_share_text(report.get("int8_mac_share"))
    if share:
        lines.append(f"| INT8 share of MACs | {share} |")
    if report.get("runtime"):
        lines.append(f"| torch device | {report['runtime']['device']} (ONNX checks on CPU) |")
    lines += coverage_lines(report.get("coverage"))
    lines.append("")
    ev = report.get("evaluation")
    if ev:
        lines += ["## Accuracy (held-out data)", "", f"Data: `{ev['data']}`", "",
                  "| model | mAP50:95 | mAP50 |", "|---|---|---|"]
        for key, label in (("fp32_torch", "FP32 torch"), ("fp32_onnx", "FP32 ONNX (onnxruntime)"),
                           ("int8_onnx", "INT8 Q/DQ ONNX as exported (onnxruntime)")):
            lines.append(f"| {label} | {fmt_number(ev[key]['map50_95'], 4)} | {fmt_number(ev[key]['map50'], 4)} |")
        for extra in ev.get("extra_rows", []):
            lines.append(f"| {extra['label']} | {fmt_number(extra['map50_95'], 4)} | {fmt_number(extra['map50'], 4)} |")
        lines += ["", f"Drop FP32 -> INT8: **{fmt_number(ev['drop_map50_95_points'], 2)} mAP50:95 points**, "
                      f"{fmt_number(ev['drop_map50_points'], 2)} mAP50 points.", ""]
    lat = report.get("latency_estimate")
    if lat:
        lines += ["## Estimated T4 latency (roofline estimate, NOT measured)", "", "| configuration | estimated ms |",
                  "|---|---|"] + [f"| {k} | {fmt_number(v, 3)} |" for k, v in lat["ms"].items()] + ["", f"_{lat['note']}_", ""]
    lines += pass_lines(report.get("passes"))
    sel = (report.get("sensitivity") or {}).get("selection")
    if sel:
        lines += ["## Automatic FP16 selection", "",
                  f"Budget: {sel['budget']} ({sel['unit']}); measured: {sel['measured']} -> "
                  f"{'met' if sel['met'] else 'NOT met'}. Kept FP16: "
                  + (", ".join(f"`{n}`" for n in sel["fp16_layers"]) or "none") + ".", ""]
        lines += [f"- `{n}`: {why}" for n, why in sel["reasons"].items() if n in sel["fp16_layers"]] + [""]
        if sel.get("curve"):  # the accuracy / INT8-share curve of the min_int8_share selection
            lines += ["Accuracy vs INT8 share, one greedy step per row (predicted output SQNR: additive-noise model "
                      "from the measured per-layer recoveries; the held-out figures above are measured):", "",
                      "| FP16 layers | added | INT8 share of conv/linear MACs | predicted SQNR dB |",
                      "|---|---|---|---|"]
            lines += [f"| {p['num_fp16']} | `{p['step']}` | {fmt_number(100 * p['int8_mac_share'], 2)} % | "
                      f"{fmt_number(p['predicted_sqnr_db'], 2)} |" for p in sel["curve"]] + [""]
    for plot in report.get("plots", []):
        lines += [f"## {plot['title']}", "", f"![{plot['title']}]({plot['file']})", ""]
        le = report.get("layer_errors") or {}
        if plot["file"] == "layer_sqnr.png" and le:
            lines += [f"Bars: each layer's output in the exported model vs FP32 ({le['num_samples']} {le['data']}; "
                      "upstream error included). Dots: the layer's input alone quantized with its calibrated amax. "
                      "Orange / [FP16]: layer kept FP16.", ""]
        if plot["file"] == "calibration.png" and le.get("worst_tensors"):
            head, rows = worst_tensor_rows(report)
            lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            lines += ["| `" + r[0] + "` | " + " | ".join(r[1:]) + " |" for r in rows] + [""]
    fp16_rows = [r for r in report["layers"] if r["precision"] != "int8"]
    if fp16_rows:
        lines += ["## Layers kept FP16, and why", ""] + [f"- `{r['name']}` ({r['type']}): {r.get('why') or 'no reason recorded'}"
                                                         for r in fp16_rows] + [""]
    sizes = report["onnx"]["sizes_bytes"]
    lines += ["## Artifacts", "", "| file | size |", "|---|---|"]
    lines += [f"| `{k}` | {_mib(v)} |" for k, v in sizes.items()]
    lines += ["", f"INT8/FP32 size ratio: {report['onnx']['int8_size_ratio']}", ""]
    gates = report.get("gates")
    if gates and (gates["max_drop"] is not None or gates["min_sqnr"] is not None):
        lines += ["## Gates", "", "PASSED" if gates["passed"] else "FAILED: " + "; ".join(gates["failures"]), ""]
    lines += ["## Per-layer precision", "", "| layer | type | precision | input amax | weight amax (min..max) | why |",
              "|---|---|---|---|---|---|"]
    for r in report["layers"]:
        w = f"{fmt_number(r.get('weight_amax_min'), 4)}..{fmt_number(r.get('weight_amax_max'), 4)}" if "weight_amax_min" in r else ""
        lines.append(f"| `{r['name']}` | {r['type']} | {r['precision']} | {fmt_number(r['input_amax'], 4)} | {w} | "
                     f"{r.get('why', '')} |")
    if report.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in report["notes"]]
    lines += parity_layer_lines(report.get("parity_layers"))
    lint = report.get("lint") or {}
    lines += ["", "## Q/DQ lint", ""]
    for name, findings in lint.items():
        lines.append(f"- `{name}`: {len(findings)} finding(s)" + ("" if not findings else ": " + "; ".join(
            f"{f['severity']} {f['rule']} at {f['node']}" for f in findings[:10])))
    if report.get("next_steps"):
        lines += ["", "## Next steps", "", "From inside this folder:", ""]
        lines += [f"- {s['what']}: `{s['command']}`" for s in report["next_steps"]]
    return "\n".join(lines) + "\n"
