"""A calibration set below MIN_CALIBRATION_IMAGES (32) is warned about, on both routes, and documented in
``--help`` and the README (issue 24); at the threshold and above, nothing is said."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from quantkit.cli import main
from quantkit.data.calib import MIN_CALIBRATION_IMAGES, small_set_note
from quantkit.data.preprocess import Preprocess
from quantkit.data.sources import open_calibration_source
from quantkit.recipe import load_recipe
from onnx_toy import toy_data, toy_onnx

README = Path(__file__).resolve().parents[2] / "README.md"


def _data(n: int):
    return open_calibration_source(np.zeros((n, 3, 8, 8), np.float32), Preprocess(size=(8, 8)))


@pytest.mark.parametrize("n, warned", [(1, True), (8, True), (31, True), (32, False), (200, False)])
def test_threshold(n, warned):
    assert MIN_CALIBRATION_IMAGES == 32
    note = small_set_note(_data(n))
    assert (note is not None) is warned
    if warned:
        assert f"only {n} image" in note and "fewer than 32" in note and "--calib" in note


def test_max_images_counts_what_is_used():
    data = open_calibration_source(np.zeros((100, 3, 8, 8), np.float32), Preprocess(size=(8, 8)), max_images=10)
    assert "only 10 images" in small_set_note(data)


def test_onnx_route_warns_and_notes(tmp_path, caplog):
    from quantkit.pipeline_onnx import run_onnx_export

    model, npy = tmp_path / "toy.onnx", tmp_path / "calib.npy"
    model.write_bytes(toy_onnx(fold=False))
    np.save(npy, toy_data(16))
    recipe = load_recipe(None, [f"model.name='{model}'", f"calibration.data='{npy}'", "calibration.use_cache=false"])
    with caplog.at_level(logging.WARNING, logger="quantkit"):
        res = run_onnx_export(recipe, tmp_path / "out", progress=False)
    assert "calibration uses only 16 images (fewer than 32)" in caplog.text
    assert any("only 16 images" in n for n in res.report["notes"])


def test_documented_in_help_and_readme():
    text = CliRunner().invoke(main, ["export", "--help"]).output
    assert "Fewer than 32 images" in " ".join(text.split())
    assert "fewer than 32 calibration images" in README.read_text()
