"""The one-line machine-readable summary of a command (``--json``) and the output-mode switches behind
``--quiet`` / ``--json``.

``--json`` prints exactly one line of JSON on stdout (logs and progress stay on stderr), built here from the
export's report, so CI can read the outcome without parsing report.json's path or the human summary:

    {"command": "export", "ok": true, "exit_code": 0, "out_dir": "out", "files": [...], "sqnr_db": 31.2, ...}

A failing command prints the same shape with ``ok: false``, its exit code and the error message.
"""

from __future__ import annotations

import json
import logging

from quantkit.utils.progress import ProgressMode, set_progress_mode

SUMMARY_VERSION = 1


def configure_output(*, quiet: bool = False, json_summary: bool = False, verbose: bool = False) -> None:
    """Apply ``--quiet`` (no progress, warnings and errors only on stderr) and ``--json``; ``-v`` wins over
    ``--quiet`` for the log level. Call after the CLI's logging setup."""
    if quiet:
        set_progress_mode(ProgressMode.QUIET)
        if not verbose:
            logging.getLogger("quantkit").setLevel(logging.WARNING)
    else:
        set_progress_mode(ProgressMode.AUTO)


GATES_PASSED, GATES_FAILED, NO_GATES = "passed", "failed", "no gates set"


def gate_verdict(report: dict) -> tuple[str, str]:
    """(verdict, the human summary's closing line) from a report's ``gates`` section: ``passed``, ``failed`` or
    ``no gates set`` (neither gates.max_drop nor gates.min_sqnr given)."""
    g = report.get("gates") or {}
    limits = [f"{name} {g[key]}{unit}" for key, name, unit in (("max_drop", "--max-drop", " mAP50:95 points"),
                                                                ("min_sqnr", "--min-sqnr", " dB"))
              if g.get(key) is not None]
    if g.get("failures"):
        return GATES_FAILED, "gates: FAILED: " + "; ".join(g["failures"])
    if not limits:
        return NO_GATES, "gates: none set (add --max-drop POINTS with --eval, or --min-sqnr DB, to gate CI)"
    return GATES_PASSED, "gates: passed (" + ", ".join(limits) + ")"


def export_summary(result, error: str | None = None) -> dict:
    """The ``--json`` summary of a finished export (an ``ExportResult``): where the files are, the measured
    SQNR (dB), parity (dB), sizes (bytes), held-out mAP50:95 (fractions) and drop (points), the layers kept FP16
    (names), the INT8 share of the weighted-op MACs counted on model.int8.onnx (0..1, null where not measured),
    the gates with their verdict, notes. ``error``: the gate failure's message when a gate failed (exit 3)."""
    r = result.report
    ev = r.get("evaluation")
    evaluation = None
    if ev:
        evaluation = {"data": ev.get("data"), "fp32_map50_95": ev["fp32_onnx"]["map50_95"],
                      "int8_map50_95": ev["int8_onnx"]["map50_95"], "fp32_map50": ev["fp32_onnx"]["map50"],
                      "int8_map50": ev["int8_onnx"]["map50"], "drop_map50_95_points": ev["drop_map50_95_points"]}
    gates = r.get("gates") or {}
    share = r.get("int8_mac_share") or {}
    out = {
        "summary_version": SUMMARY_VERSION,
        "command": "export",
        "ok": not result.gate_failures,
        "exit_code": 3 if result.gate_failures else 0,
        "out_dir": str(result.out_dir),
        "files": list(result.files),
        "int8_vs_fp32_sqnr_db": r["accuracy"]["int8_vs_fp32_sqnr_db"]["worst_db"],
        "parity_int8_onnx_vs_fakequant_db": r["parity"]["int8_onnx_vs_torch_fakequant"]["worst_db"],
        "sizes_bytes": r["onnx"]["sizes_bytes"],
        "int8_size_ratio": r["onnx"]["int8_size_ratio"],
        "evaluation": evaluation,
        "gates": {"passed": gates.get("passed", True), "failures": gates.get("failures", []),
                  "verdict": gate_verdict(r)[0], "max_drop": gates.get("max_drop"), "min_sqnr": gates.get("min_sqnr")},
        "fp16_layers": [row["name"] for row in r.get("layers", []) if row.get("precision") != "int8"],
        "int8_mac_share": share.get("share"),  # from model.int8.onnx's weighted ops
        "notes": list(r.get("notes", [])),
        "strong": ({k: r["strong"].get(k) for k in ("status", "file", "failure")} if r.get("strong") else None),
    }
    if error is not None:
        out["error"] = error
    return out


def error_summary(command: str, exit_code: int, message: str) -> dict:
    """The ``--json`` summary of a command that failed with ``exit_code`` (the message names the fix)."""
    from quantkit.quote import printable

    message = printable(message)  # UTF-8-clean: a non-UTF-8 file name shows its bytes as \xNN
    return {"summary_version": SUMMARY_VERSION, "command": command, "ok": False, "exit_code": exit_code,
            "error": message}


def summary_line(summary: dict) -> str:
    """``summary`` as one line of JSON (sorted keys, no newlines inside), for stdout."""
    return json.dumps(_finite(summary), sort_keys=True, separators=(", ", ": "), allow_nan=False, default=str)


def _finite(obj):
    """Non-finite floats (an SQNR of identical outputs is inf) as strings: strict JSON has no inf/NaN."""
    if isinstance(obj, float) and (obj != obj or obj in (float("inf"), float("-inf"))):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj
