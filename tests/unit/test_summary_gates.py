"""The export summary answers a deployment engineer's questions: ``--json`` carries the FP16 layers, the INT8 MAC
share and the gates with their verdict; the human summary ends with the gate verdict (issue 24)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from quantkit.cli.export import _print_summary
from quantkit.cli.summary import export_summary, gate_verdict, summary_line


@dataclass
class FakeResult:
    report: dict
    out_dir: Path = Path("out")
    files: list = field(default_factory=lambda: ["model.onnx"])
    gate_failures: list = field(default_factory=list)


def report(max_drop=None, min_sqnr=None, failures=(), share=0.9537):
    return {
        "accuracy": {"int8_vs_fp32_sqnr_db": {"worst_db": 21.5}},
        "parity": {"int8_onnx_vs_torch_fakequant": {"worst_db": 40.0}},
        "onnx": {"sizes_bytes": {"model.onnx": 100, "model.int8.onnx": 30}, "int8_size_ratio": 0.3},
        "layers": [{"name": "backbone.conv1", "precision": "int8"}, {"name": "head.cls", "precision": "fp16"},
                   {"name": "neck.add", "precision": "fp16"}],
        "int8_mac_share": None if share is None else {"share": share, "int8_macs": 9537, "total_macs": 10000},
        "gates": {"max_drop": max_drop, "min_sqnr": min_sqnr, "failures": list(failures), "passed": not failures},
        "notes": [],
    }


@pytest.mark.parametrize("gates, verdict, line", [
    ({}, "no gates set", "gates: none set"),
    ({"min_sqnr": 20.0}, "passed", "gates: passed (--min-sqnr 20.0 dB)"),
    ({"max_drop": 0.3, "min_sqnr": 20.0}, "passed", "gates: passed (--max-drop 0.3 mAP50:95 points, --min-sqnr 20.0 dB)"),
    ({"min_sqnr": 30.0, "failures": ["INT8-vs-FP32 SQNR 21.5 dB is below --min-sqnr 30.0 dB"]}, "failed",
     "gates: FAILED: INT8-vs-FP32 SQNR 21.5 dB is below --min-sqnr 30.0 dB"),
])
def test_json_and_human_summary_state_the_verdict(gates, verdict, line, capsys):
    rep = report(**gates)
    result = FakeResult(rep, gate_failures=list(gates.get("failures", [])))
    s = json.loads(summary_line(export_summary(result)))
    assert s["fp16_layers"] == ["head.cls", "neck.add"]
    assert s["int8_mac_share"] == 0.9537
    assert s["gates"]["verdict"] == verdict and s["gates"]["passed"] is (verdict != "failed")
    assert s["gates"]["failures"] == list(gates.get("failures", []))
    assert s["gates"]["min_sqnr"] == gates.get("min_sqnr") and s["gates"]["max_drop"] == gates.get("max_drop")
    assert s["ok"] is (verdict != "failed") and s["exit_code"] == (3 if verdict == "failed" else 0)
    _print_summary(result)
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith(line) and gate_verdict(rep) == (verdict, lines[-1])
    assert "FP16 layers: 2 (INT8 share of conv/linear MACs 95.37 %)" in lines[-2]


def test_summary_without_a_measured_share():
    s = export_summary(FakeResult(report(share=None)), error=None)
    assert s["int8_mac_share"] is None and s["fp16_layers"] == ["head.cls", "neck.add"] and "error" not in s
    failed = export_summary(FakeResult(report(min_sqnr=30.0, failures=["x"]), gate_failures=["x"]), error="x (...)")
    assert failed["error"] == "x (...)" and failed["ok"] is False
