"""A real export's summaries (issue 24): ``--json`` carries the FP16 layers, the INT8 MAC share and the gates
even when a gate fails (exit 3); the human summary's last line is the gate verdict; a calibration set below
MIN_CALIBRATION_IMAGES is warned about on stderr and noted in the report."""

import json

from click.testing import CliRunner

from quantkit.cli import main
from quantkit.data.calib import MIN_CALIBRATION_IMAGES


def runner() -> CliRunner:
    try:
        return CliRunner(mix_stderr=False)
    except TypeError:
        return CliRunner()


def export_args(m, out, *extra):
    return ["export", "--model", m["spec"], "--weights", m["weights"], "--calib", m["npy"], "--out", str(out),
            "--no-cache", *extra]


def test_failed_gate_json_and_human_verdict(user_model, tmp_path):
    out = tmp_path / "gated"
    res = runner().invoke(main, export_args(user_model, out, "--json", "--min-sqnr", "199"))
    assert res.exit_code == 3, res.output
    s = json.loads(res.stdout.strip())
    rep = json.loads((out / "report.json").read_text())  # the independent record the summary must agree with
    assert s["fp16_layers"] == [r["name"] for r in rep["layers"] if r["precision"] != "int8"] and s["fp16_layers"]
    assert s["int8_mac_share"] == rep["int8_mac_share"]["share"] and 0.9 <= s["int8_mac_share"] < 1.0
    assert s["gates"]["verdict"] == "failed" and s["gates"]["min_sqnr"] == 199.0 and s["ok"] is False
    assert s["exit_code"] == 3 and "below --min-sqnr 199.0" in s["error"]
    # 24 calibration rows: warned on stderr, noted in report.json (and so in the summary's notes)
    assert 24 < MIN_CALIBRATION_IMAGES
    assert f"calibration uses only 24 images (fewer than {MIN_CALIBRATION_IMAGES})" in res.stderr
    assert any("calibration uses only 24 images" in n for n in rep["notes"]) and rep["notes"] == s["notes"]

    res = runner().invoke(main, export_args(user_model, out, "--force", "--min-sqnr", "0"))
    assert res.exit_code == 0, res.output
    lines = res.stdout.strip().splitlines()
    assert lines[-1] == "gates: passed (--min-sqnr 0.0 dB)", lines
    assert lines[-2].startswith(f"FP16 layers: {len(s['fp16_layers'])} (INT8 share of conv/linear MACs")
