"""--calib-cache never overwrites a file that is not a quantkit cache, nor one of the run's inputs, and a damaged
cache of ours (NaN, an over-long integer, deep nesting) is reported and recomputed, never an internal error."""

from __future__ import annotations

import hashlib
import logging

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from quantkit.calibrate.cache import CalibrationCache, cache_key, check_cache_target, is_ours
from quantkit.calibrate.driver import CalibrationResult
from quantkit.cli import main
from quantkit.errors import UsageError

COMPONENTS = {"weights": "w" * 64, "data": "d" * 64}
PAYLOAD = {"tensors": {"stem.input": {"max": 2.5, "entropy": 2.0}}, "num_samples": 4}


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _saved(path) -> tuple[CalibrationCache, str]:
    cache = CalibrationCache(path)
    key = cache_key(COMPONENTS)
    cache.save(key, PAYLOAD, COMPONENTS)
    return cache, key


@pytest.fixture()
def run_files(tmp_path):
    """A user's run: model file, weights, a calibration image folder, an ONNX and an unrelated text file."""
    (tmp_path / "net.py").write_text("def build():\n    raise AssertionError('not reached: preflight first')\n")
    (tmp_path / "net.pt").write_bytes(b"PK\x03\x04 weights the user cannot recreate")
    calib = tmp_path / "calib"
    calib.mkdir()
    for i in range(2):
        Image.fromarray(np.full((16, 16, 3), 40 * i, np.uint8)).save(calib / f"img{i}.png")
    (tmp_path / "model.onnx").write_bytes(b"\x08\x07 not really onnx, never read: refused before")
    (tmp_path / "notes.txt").write_text("my thesis, chapter 3\n")
    return tmp_path


def _export(files, cache, *extra):
    args = ["export", "--model", f"{files / 'net.py'}:build", "--weights", str(files / "net.pt"),
            "--calib", str(files / "calib"), "--out", str(files / "out"), "--calib-cache", str(cache), *extra]
    res = CliRunner().invoke(main, args)
    return res.exit_code, res.output


@pytest.mark.parametrize("victim, says", [
    ("net.pt", "is an input of this run"),
    ("net.py", "is an input of this run"),
    ("calib/img0.png", "lies inside an input folder"),
    ("notes.txt", "is not a quantkit calibration cache"),
])
def test_export_never_overwrites_a_file_with_the_cache(run_files, victim, says):
    target = run_files / victim
    before = {p: _sha(p) for p in run_files.rglob("*") if p.is_file()}
    code, text = _export(run_files, target)
    assert code == 2, text
    assert says in text and str(target) in text and "--no-cache" in text, text
    assert {p: _sha(p) for p in run_files.rglob("*") if p.is_file()} == before  # every file byte-identical
    assert not (run_files / "out").exists()


def test_onnx_route_never_overwrites_its_model_with_the_cache(run_files):
    model = run_files / "model.onnx"
    before = _sha(model)
    res = CliRunner().invoke(main, ["export", str(model), "--calib", str(run_files / "calib"), "--out",
                                    str(run_files / "out"), "--calib-cache", str(model)])
    assert res.exit_code == 2 and "is an input of this run" in res.output and str(model) in res.output, res.output
    assert _sha(model) == before and not (run_files / "out").exists()


def test_a_symlink_or_hard_link_to_an_input_is_the_input(run_files):
    (run_files / "link.json").symlink_to(run_files / "net.pt")
    (run_files / "hard.json").hardlink_to(run_files / "net.pt")
    for name in ("link.json", "hard.json"):
        with pytest.raises(UsageError, match="is an input of this run"):
            check_cache_target(run_files / name, [str(run_files / "net.pt")])


def test_a_new_cache_inside_the_calibration_folder_is_refused(run_files):
    with pytest.raises(UsageError, match="inside an input folder"):
        check_cache_target(run_files / "calib" / "cache.json", [str(run_files / "calib")])


def test_absent_or_our_own_cache_may_be_written(tmp_path):
    check_cache_target(tmp_path / "new.json", [str(tmp_path / "other.pt")])
    _saved(tmp_path / "ours.json")
    assert is_ours(tmp_path / "ours.json")
    check_cache_target(tmp_path / "ours.json")
    (tmp_path / "foreign.json").write_text('{"schema": "somebody-else/1", "key": "x"}')
    assert not is_ours(tmp_path / "foreign.json")
    with pytest.raises(UsageError, match="not a quantkit calibration cache"):
        check_cache_target(tmp_path / "foreign.json")


def test_save_itself_refuses_a_foreign_file(tmp_path):
    p = tmp_path / "data.json"
    p.write_text('{"my": "data"}')
    with pytest.raises(UsageError, match="left untouched"):
        CalibrationCache(p).save(cache_key(COMPONENTS), PAYLOAD, COMPONENTS)
    assert p.read_text() == '{"my": "data"}'


def _damaged(tmp_path, how: str):
    """A cache of ours whose text was damaged ``how``: its schema marker stays, so it may be replaced."""
    cache, key = _saved(tmp_path / "cache.json")
    text = cache.path.read_text()
    if how == "nan":
        text = text.replace("2.5", "NaN")
    elif how == "nan_string":  # checksum recomputed, as a careless tool would: the payload check still holds
        import json

        from quantkit.calibrate.cache import _checksum
        doc = json.loads(text)
        doc["payload"]["tensors"]["stem.input"]["max"] = "nan"
        doc["sha256"] = _checksum(doc["key"], doc["components"], doc["payload"])
        text = json.dumps(doc)
    elif how == "huge_int":
        text = text.replace('"num_samples": 4', '"num_samples": ' + "9" * 5000)
    elif how == "nested":
        text = text.replace('"num_samples": 4', '"num_samples": ' + "[" * 100_000 + "]" * 100_000)
    elif how == "inf":
        text = text.replace("2.5", "1e999")
    cache.path.write_text(text)
    assert is_ours(cache.path)
    return cache, key


@pytest.mark.parametrize("how", ["nan", "nan_string", "huge_int", "nested", "inf"])
def test_damaged_cache_of_ours_is_a_reported_miss(tmp_path, caplog, how):
    cache, key = _damaged(tmp_path, how)
    with caplog.at_level(logging.WARNING, logger="quantkit"):
        got = cache.load(key, COMPONENTS, parse=CalibrationResult.from_dict)
    assert got is None and cache.last_reason
    assert str(cache.path) in caplog.text and "not used" in caplog.text
    assert len(cache.last_reason) < 400  # the damaged content is not quoted whole
    check_cache_target(cache.path)  # recognizably ours: it may be replaced by the recomputed result
    cache.save(key, PAYLOAD, COMPONENTS)
    assert cache.load(key, COMPONENTS, parse=CalibrationResult.from_dict).tensors == PAYLOAD["tensors"]


@pytest.mark.parametrize("content", [b"[" * 100_000 + b"]" * 100_000, b'{"n": ' + b"9" * 5000 + b"}",
                                     b'{"amax": NaN}'])
def test_foreign_corrupt_file_is_a_miss_and_never_replaced(tmp_path, content):
    p = tmp_path / "cache.json"
    p.write_bytes(content)
    assert CalibrationCache(p).load(cache_key(COMPONENTS)) is None  # load never raises
    with pytest.raises(UsageError, match="not a quantkit calibration cache"):
        check_cache_target(p)
    assert p.read_bytes() == content


def test_a_fifo_is_neither_read_nor_replaced(tmp_path):
    import os

    p = tmp_path / "fifo.json"
    os.mkfifo(p)
    cache = CalibrationCache(p)
    assert cache.load(cache_key(COMPONENTS)) is None and "regular" in cache.last_reason
    with pytest.raises(UsageError, match="not a quantkit calibration cache"):
        check_cache_target(p)


def test_build_never_overwrites_its_onnx_with_the_timing_cache(tmp_path):
    onnx_file = tmp_path / "model.int8.onnx"
    onnx_file.write_bytes(b"\x08\x07 the graph")
    (tmp_path / "alias.cache").hardlink_to(onnx_file)
    for cache in (onnx_file, tmp_path / "alias.cache"):
        res = CliRunner().invoke(main, ["build", str(onnx_file), "--timing-cache", str(cache)])
        assert res.exit_code == 2 and "is the ONNX being built" in res.output, res.output
    assert onnx_file.read_bytes() == b"\x08\x07 the graph"
