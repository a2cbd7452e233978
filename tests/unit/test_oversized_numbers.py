"""Integers past Python's int digit limit (``int('9' * 5000)`` raises ValueError) and other absurd numbers in
recipes, ``--set`` values and ``verify`` manifests are refused as bad input (exit 2 or a verify finding), naming
the key and the file: never an internal error (exit 1)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import pytest

from quantkit.errors import UsageError
from quantkit.recipe import Recipe, apply_overrides, load_recipe, parse_batch, recipe_from_dict
from quantkit.recipe_limits import short_repr
from quantkit.report.manifest import verify

HUGE = "9" * 5000  # past sys.get_int_max_str_digits() (4300): int(HUGE) raises ValueError
HEX = "0x" + "f" * 5000  # hex parses without the limit, but str() of the result raises


def _cli(*args, cwd=None):
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "quantkit", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=120)


def test_the_literals_really_are_past_the_limit():
    with pytest.raises(ValueError, match="limit"):
        int(HUGE)
    with pytest.raises(ValueError, match="limit"):
        str(int(HEX, 16))


@pytest.mark.parametrize("key, value", [
    ("calibration.num_bins", HUGE), ("calibration.num_bins", HEX), ("gates.min_sqnr", HUGE),
    ("model.name", HEX), ("input.size", f"[32, {HUGE}]"), ("preprocess.mean", f"[0, 0, {HEX}]"),
    ("ptq.adaround_iterations", f"-{HUGE}"),
])
def test_recipe_file_names_file_and_key(tmp_path, key, value):
    section, name = key.split(".")
    p = tmp_path / "huge.yaml"
    p.write_text(f"{section}:\n  {name}: {value}\n")
    with pytest.raises(UsageError) as info:
        load_recipe(p)
    msg = str(info.value)
    assert str(p) in msg and key in msg and "integer literal of 5,00" in msg and len(msg) < 400, msg


@pytest.mark.parametrize("item", [f"calibration.num_bins={HUGE}", f"model.name={HEX}", f"input.batch='1:8:{HUGE}'",
                                  f"quantization.skip=[{HUGE}]", "calibration.num_bins=!!int abc",
                                  "model.name=!!timestamp 2001-13-45", "gates.max_drop=!!float x"])
def test_set_values_name_the_key(item):
    key = item.split("=")[0]
    with pytest.raises(UsageError) as info:
        apply_overrides(Recipe(), [item])
    msg = str(info.value)
    assert (key in msg or "batch" in msg) and len(msg) < 400, msg


@pytest.mark.parametrize("item, match", [
    ("input.size=[327680, 32]", r"input.size must be at most 16384"),
    ("input.batch='1:8:100000000'", r"max <= 65,536"),
    ("ptq.adaround_iterations=1000000000000", r"ptq.adaround_iterations must be in \[0, 1000000\]"),
    ("ptq.num_images=1000000000", r"ptq.num_images must be in"),
    ("ptq.range_choice_images=10000000", r"ptq.range_choice_images must be in"),
    ("calibration.max_images=100000000000", r"calibration.max_images must be in"),
    ("sensitivity.eval_images=100000000000", r"sensitivity.eval_images must be in"),
    ("ptq.adaround_seconds=1.0e+300", r"ptq.adaround_seconds must be in"),
    ("preprocess.scale=1.0e+300", r"preprocess.scale must be in"),
    ("preprocess.std=[1, 1.0e-300, 1]", r"preprocess.std must be in \[1e-06"),
    ("preprocess.mean=[0, 1.0e+300, 0]", r"preprocess.mean"),
])
def test_absurd_values_are_refused(item, match):
    with pytest.raises(UsageError, match=match):
        load_recipe(None, [item])


def test_python_api_huge_int_is_a_usage_error():
    with pytest.raises(UsageError, match="model.name: <an integer of about 5,000 digits>"):
        recipe_from_dict({"model": {"name": 10 ** 4999}})
    assert "5,000 digits" in short_repr([10 ** 4999])
    assert parse_batch("1:8:32") == (1, 8, 32)


def test_cli_exit_2_for_recipe_and_set(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"calibration:\n  num_bins: {HUGE}\n")
    for args, names in ((["--recipe", str(recipe)], [str(recipe), "calibration.num_bins"]),
                        (["--set", f"gates.min_sqnr={HUGE}"], ["gates.min_sqnr"])):
        res = _cli("export", *args, "--out", str(tmp_path / "out"))
        assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
        assert all(n in res.stderr for n in names), res.stderr
        assert not (tmp_path / "out").exists()


def _folder(tmp_path, size_literal: str):
    d = tmp_path / "out"
    d.mkdir()
    (d / "model.onnx").write_bytes(b"graph")
    digest = hashlib.sha256(b"graph").hexdigest()
    text = '{"schema": 1, "files": {"model.onnx": {"sha256": "%s", "size": %s}}}' % (digest, size_literal)
    (d / "manifest.json").write_text(text)
    return d


@pytest.mark.parametrize("literal", [HUGE, "-" + HUGE, "1" + "0" * 25])
def test_verify_manifest_with_huge_size_is_one_finding(tmp_path, literal):
    d = _folder(tmp_path, literal)
    before = (d / "manifest.json").read_bytes()
    problems = verify(d)
    assert len(problems) == 1 and "manifest.json" in problems[0] and "'model.onnx'" in problems[0], problems
    assert "integer of" in problems[0] and len(problems[0]) < 400
    assert (d / "manifest.json").read_bytes() == before
    (tmp_path / "ok").mkdir()
    assert verify(_folder(tmp_path / "ok", "5")) == []  # the same folder with a true size verifies


def test_verify_cli_huge_size_is_not_an_internal_error(tmp_path):
    d = _folder(tmp_path, HUGE)
    res = _cli("verify", str(d))
    # a malformed manifest is a verify finding (exit 4, as for every malformed manifest), never exit 1
    assert res.returncode == 4 and "Traceback" not in res.stderr and "model.onnx" in res.stderr, res.stderr
