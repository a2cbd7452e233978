"""report.html: one self-contained page (inline CSS, plots embedded as base64 PNG) for people who open it in
a browser from a CI artifact. Same content as report.md, rendered from report.json's data."""

from __future__ import annotations

import base64
import html
from pathlib import Path

from quantkit.report.markdown import fmt_number, mac_share_text, worst_tensor_rows

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:70rem;color:#1d232a;
line-height:1.45;padding:0 1rem}
h1{font-size:1.6rem;margin-bottom:.2rem}h2{font-size:1.2rem;margin-top:2rem;border-bottom:1px solid #d8dee4}
table{border-collapse:collapse;margin:.6rem 0;font-size:.9rem}td,th{border:1px solid #d8dee4;padding:.25rem .6rem;
text-align:left}th{background:#f3f5f7}td.num{text-align:right;font-variant-numeric:tabular-nums}
.int8{color:#0b6e4f;font-weight:600}.fp16{color:#a15c00;font-weight:600}.est{color:#6b7280;font-style:italic}
.bad{color:#b42318;font-weight:700}.good{color:#0b6e4f;font-weight:700}img{max-width:100%;border:1px solid #d8dee4}
code{background:#f3f5f7;padding:0 .2rem;border-radius:3px}.sub{color:#57606a}
"""


def _e(v) -> str:
    return html.escape(str(v))


def _num(v, nd=3) -> str:
    return _e(fmt_number(v, nd))


def _table(head: list[str], rows: list[list[str]], numeric: set[int] = frozenset()) -> str:
    out = ["<table>" + ("<tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr>" if any(head) else "")]
    for r in rows:
        out.append("<tr>" + "".join(f'<td class="num">{c}</td>' if i in numeric else f"<td>{c}</td>"
                                    for i, c in enumerate(r)) + "</tr>")
    return "".join(out) + "</table>"


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<p><img alt="{_e(alt)}" data-file="{_e(path.name)}" src="data:image/png;base64,{data}"></p>'


def render_html(report: dict, folder: Path | None = None) -> str:
    """Render the report; PNGs listed in ``report["plots"]`` are read from ``folder`` and embedded."""
    m, c = report["model"], report["calibration"]
    acc = report["accuracy"]["int8_vs_fp32_sqnr_db"]
    par = report["parity"]
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>quantkit report — {_e(m['name'])}</title>"
             f"<style>{CSS}</style></head><body>",
             f"<h1>quantkit export report — <code>{_e(m['name'])}</code></h1>",
             f"<p class='sub'>quantkit {_e(report['quantkit_version'])} · input {_e(report['input']['shape'])} · "
             f"batch <code>{_e(report['input']['batch'])}</code></p>"]
    gates = report.get("gates") or {}
    if gates.get("max_drop") is not None or gates.get("min_sqnr") is not None:
        verdict = ("<span class='good'>PASSED</span>" if gates["passed"] else
                   "<span class='bad'>FAILED</span>: " + _e("; ".join(gates["failures"])))
        parts.append(f"<p>Gates: {verdict}</p>")
    parts.append("<h2>Model</h2>" + _table(["", ""], [
        ["model", f"<code>{_e(m['name'])}</code> — {_e(m.get('description', ''))}"],
        ["parameters", f"{m['parameters']:,} ({m['parameters_deploy']:,} after reparameterization)"],
        ["INT8 layers", f"{m['int8_layers']} of {m['quantizable_layers']} quantizable; the rest run FP16 in TensorRT"],
        *([["INT8 share of MACs", _e(mac_share_text(report.get("int8_mac_share")))]]
          if mac_share_text(report.get("int8_mac_share")) else []),
        *([["torch device", _e(report["runtime"]["device"]) + " (ONNX checks on CPU)"]] if report.get("runtime") else []),
    ]))
    parts.append("<h2>Calibration</h2>" + _table(["", ""], [
        ["method", _e(c["method"])], ["data", f"<code>{_e(c['data'])}</code> ({c['num_samples']} {_e(c['kind'])})"],
        ["data fingerprint", f"<code>{_e(c['data_fingerprint'][:16])}…</code>"],
        ["cache key", f"<code>{_e(c['cache_key'][:16])}…</code>"]]))
    rows = [["INT8 ONNX vs FP32 torch (output SQNR)", _num(acc["worst_db"], 2) + " dB"],
            ["INT8 ONNX (onnxruntime) vs torch fake-quant", _num(par["int8_onnx_vs_torch_fakequant"]["worst_db"], 2) + " dB"],
            ["FP32 ONNX vs torch", _num(par["fp32_onnx_vs_torch"]["worst_db"], 2) + " dB"]]
    if par.get("strong_onnx_vs_torch_fakequant"):
        rows.append(["strong FP16 ONNX vs torch fake-quant", _num(par["strong_onnx_vs_torch_fakequant"]["worst_db"], 2) + " dB"])
    strong = report.get("strong")
    if strong and strong.get("status") == "failed":  # the weak graph and the rest are written; say why this is not
        rows.append(["strong FP16 ONNX", "<b>not written</b>: " + _e(strong.get("failure") or "")])
    parts.append("<h2>Accuracy</h2>" + _table(["measure", "value"], rows, {1}))
    ev = report.get("evaluation")
    if ev:
        erows = [[label, _num(ev[k]["map50_95"], 4), _num(ev[k]["map50"], 4)]
                 for k, label in (("fp32_torch", "FP32 torch"), ("fp32_onnx", "FP32 ONNX"), ("int8_onnx", "INT8 ONNX"))
                 if k in ev]
        for extra in ev.get("extra_rows", []):
            erows.append([_e(extra["label"]), _num(extra["map50_95"], 4), _num(extra["map50"], 4)])
        parts.append(f"<p>Held-out data <code>{_e(ev['data'])}</code>:</p>"
                     + _table(["model", "mAP50:95", "mAP50"], erows, {1, 2})
                     + f"<p>Drop FP32 → INT8: <b>{_num(ev['drop_map50_95_points'], 2)} mAP50:95 points</b> "
                       f"({_num(ev['drop_map50_points'], 2)} mAP50 points).</p>")
    lat = report.get("latency_estimate")
    if lat:
        parts.append("<h2>Estimated T4 latency <span class='est'>(roofline estimate, not measured)</span></h2>"
                     + _table(["configuration", "estimated ms"],
                              [[_e(k), _num(v, 3)] for k, v in lat["ms"].items()], {1})
                     + f"<p class='est'>{_e(lat.get('note', ''))}</p>")
    sizes = report["onnx"]["sizes_bytes"]
    parts.append("<h2>Artifacts</h2>" + _table(["file", "size (MiB)"],
                                                [[f"<code>{_e(k)}</code>", f"{v / 2**20:.2f}"] for k, v in sizes.items()],
                                                {1}) + f"<p>INT8/FP32 size ratio {_e(report['onnx']['int8_size_ratio'])}</p>")
    for plot in report.get("plots", []):
        if folder is not None and (folder / plot["file"]).is_file():
            parts.append(f"<h2>{_e(plot['title'])}</h2>" + _img(folder / plot["file"], plot["title"]))
            if plot["file"] == "calibration.png" and (report.get("layer_errors") or {}).get("worst_tensors"):
                head, rows = worst_tensor_rows(report)
                parts.append(_table(head, [[f"<code>{_e(r[0])}</code>", *map(_e, r[1:])] for r in rows],
                                    set(range(1, len(head)))))
    lrows = []
    for r in report["layers"]:
        prec = f"<span class='{r['precision']}'>{r['precision'].upper()}</span>"
        why = _e(r.get("why", ""))
        w = (f"{_num(r.get('weight_amax_min'), 4)} … {_num(r.get('weight_amax_max'), 4)}"
             if "weight_amax_min" in r else "")
        lrows.append([f"<code>{_e(r['name'])}</code>", _e(r["type"]), prec, _num(r["input_amax"], 4), w, why])
    parts.append("<h2>Per-layer precision</h2>"
                 + _table(["layer", "type", "precision", "input amax", "weight amax (min … max)", "why"], lrows, {3}))
    lint = report.get("lint") or {}
    items = "".join(f"<li><code>{_e(k)}</code>: {len(v)} finding(s)" + "".join(
        f"<br><span class='sub'>{_e(f['severity'])} {_e(f['rule'])} at {_e(f['node'])}: {_e(f['message'])}</span>"
        for f in v[:10]) + "</li>" for k, v in lint.items())
    parts.append(f"<h2>Q/DQ lint</h2><ul>{items}</ul>")
    if report.get("notes"):
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{_e(n)}</li>" for n in report["notes"]) + "</ul>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
