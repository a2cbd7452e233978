"""`pip install quantkit` without extras: the default export needs no optional package (``needed_deps`` says so),
so a missing matplotlib must not fail it after the work is done. The charts are left out and the report says why;
every figure is still in report.json."""

from __future__ import annotations

import json
import sys

from click.testing import CliRunner

from quantkit.cli import main


def test_default_export_without_matplotlib_writes_everything_but_the_charts(user_model, tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError, as when not installed
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["export", "--model", user_model["spec"], "--weights", user_model["weights"],
                                    "--calib", user_model["npy"], "--out", str(out), "--no-cache"],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert not list(out.glob("*.png"))
    report = json.loads((out / "report.json").read_text())
    assert any("matplotlib is not installed" in n for n in report["notes"])
    assert report["layer_errors"]["layers"] and report["latency_estimate"]["ms"]
    assert not report.get("plots")
    assert "matplotlib is not installed" in (out / "report.md").read_text()
