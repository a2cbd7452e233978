"""End to end: a damaged --calib-cache of ours is reported and recomputed (exit 0), and a user's folder named
like a staging folder survives an export."""

import json
import subprocess
import sys

from click.testing import CliRunner

from quantkit.calibrate.cache import CalibrationCache, is_ours
from quantkit.cli import main


def _export(m, out, *extra):
    args = ["export", "--model", m["spec"], "--weights", m["weights"], "--calib", m["npy"], "--out", str(out),
            "--full-int8", "--set", "ptq.bias_correction=false", *extra]
    res = CliRunner().invoke(main, args)
    return res.exit_code, res.output


def test_damaged_cache_is_recomputed_and_a_staging_named_user_folder_survives(user_model, tmp_path):
    cache = tmp_path / "calib-cache.json"
    code, text = _export(user_model, tmp_path / "first", "--calib-cache", str(cache))
    assert code == 0, text
    good = json.loads(cache.read_text())
    # damaged as the issue found it: a NaN amax and a 5000-digit integer; the schema field still marks it ours
    damaged = cache.read_text().replace('"num_samples": ', '"num_samples": ' + "9" * 5000 + ", \"x\": ", 1)
    tensor = next(iter(good["payload"]["tensors"]))
    method = next(iter(good["payload"]["tensors"][tensor]))
    damaged = damaged.replace(json.dumps(good["payload"]["tensors"][tensor][method]), "NaN", 1)
    cache.write_text(damaged)
    assert is_ours(cache)

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    mine = tmp_path / f".out.partial-{dead}"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine\n")

    code, text = _export(user_model, tmp_path / "out", "--calib-cache", str(cache))
    assert code == 0, text
    assert f"calibration cache {cache} not used: corrupt JSON" in text, text
    assert "cache hit" not in text
    assert json.loads(cache.read_text()) == good  # rewritten with the same, recomputed result
    assert CalibrationCache(cache).load(good["key"]) == good["payload"]
    assert (mine / "notes.txt").read_text() == "mine\n"  # not quantkit's: kept
    assert not (tmp_path / "out" / ".quantkit-staging").exists()
