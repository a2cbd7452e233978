"""What `quantkit export` says while it works and when it ends: progress lines in a non-terminal run, --quiet,
--json, and a missing optional package reported before any work."""

import json

from click.testing import CliRunner

from quantkit.cli import main


def runner() -> CliRunner:
    """stdout and stderr apart: click < 8.2 needs mix_stderr=False, click >= 8.2 removed the argument."""
    try:
        return CliRunner(mix_stderr=False)
    except TypeError:
        return CliRunner()


def export_args(m, out, *extra):
    return ["export", "--model", m["spec"], "--weights", m["weights"], "--calib", m["npy"], "--out", str(out),
            "--no-cache", *extra]


def test_non_terminal_run_prints_progress_lines_estimate_and_one_json_line(user_model, tmp_path, monkeypatch):
    # how long each loop may stay silent is tested per loop, with slow steps, in tests/unit/test_progress.py;
    # this checks the wiring of a real run whose stderr is not a terminal and whose stdout is read by a machine
    monkeypatch.setenv("QUANTKIT_PROGRESS_INTERVAL", "0.5")
    out = tmp_path / "o"
    run = runner().invoke(main, export_args(user_model, out, "--sensitivity", "--json",
                                               "--set", "sensitivity.num_images=4"))
    assert run.exit_code == 0, run.output
    for stage, unit in (("calibrating", "batch"), ("sensitivity", "replay")):
        mine = [s for s in run.stderr.splitlines() if s.startswith(f"quantkit: {stage} ") and f" {unit}" in s]
        assert mine and "done in" in mine[-1], run.stderr
    assert "one forward took" in run.stderr and "expect about" in run.stderr  # the up-front sensitivity estimate
    assert "\r" not in run.stderr  # no terminal bar in a log
    lines = run.stdout.strip().splitlines()
    assert len(lines) == 1, run.stdout  # --json: one line on stdout, nothing else
    summary = json.loads(lines[0])
    report = json.loads((out / "report.json").read_text())
    assert summary["ok"] is True and summary["exit_code"] == 0
    assert summary["int8_vs_fp32_sqnr_db"] == report["accuracy"]["int8_vs_fp32_sqnr_db"]["worst_db"]
    assert summary["sizes_bytes"] == report["onnx"]["sizes_bytes"]
    assert set(summary["files"]) == {p.name for p in out.iterdir()} and "sensitivity.png" in summary["files"]
    # a failure still gives one JSON line, with the exit code; --quiet leaves only the error on stderr
    res = runner().invoke(main, export_args(user_model, out, "--json", "--quiet"))
    assert res.exit_code == 2
    err = json.loads(res.stdout.strip())
    assert err["ok"] is False and err["exit_code"] == 2 and "not empty" in err["error"]
    assert res.stderr.strip().splitlines() == [f"error: {err['error']}"]


def test_missing_matplotlib_fails_before_calibration(user_model, tmp_path, monkeypatch):
    import quantkit.calibrate.driver as driver
    from quantkit.utils import optional_deps

    monkeypatch.setattr(optional_deps, "is_installed", lambda m: m != "matplotlib")

    def no_calibration(*a, **k):
        raise AssertionError("calibration ran before the dependency check")

    monkeypatch.setattr(driver, "run_calibration", no_calibration)
    monkeypatch.setattr("quantkit.calibrate.run.run_calibration", no_calibration)
    out = tmp_path / "o"
    res = runner().invoke(main, export_args(user_model, out, "--sensitivity"))
    assert res.exit_code == 2, res.stderr
    assert "pip install 'quantkit[plot]'" in res.stderr and "matplotlib" in res.stderr
    assert not out.exists()
