"""The Python API checks its destination and arguments before any work, and its errors name Python arguments
(``out_dir``, ``force=True``), not command-line flags a caller of ``quantkit.export`` never typed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import quantkit
from quantkit.errors import UsageError


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1)).eval()


@pytest.fixture()
def calib(tmp_path):
    p = tmp_path / "calib.npy"
    np.save(p, np.random.default_rng(0).standard_normal((4, 3, 16, 16)).astype(np.float32))
    return p


def _no_work(monkeypatch):
    import quantkit.pipeline as pipeline

    def boom(*a, **k):
        raise AssertionError("quantize started work before checking out_dir")

    monkeypatch.setattr(pipeline, "quantize_and_select", boom)


def test_quantize_refuses_a_non_empty_out_dir_before_any_work(tmp_path, calib, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    _no_work(monkeypatch)
    with pytest.raises(UsageError) as err:
        quantkit.quantize(_net(), calib, out_dir=out)
    msg = str(err.value)
    assert "force=True" in msg and "out_dir" in msg and "--force" not in msg and "--out" not in msg
    assert (out / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("kwargs, match", [
    ({"recipe": {"calibration": {}}}, "recipe must be a quantkit Recipe"),
    ({"out_dir": 3}, "out_dir must be a folder path"),
    ({"out_dir": "o", "force": "yes"}, "force must be True or False"),
])
def test_quantize_names_the_bad_argument(calib, monkeypatch, kwargs, match):
    _no_work(monkeypatch)
    with pytest.raises(UsageError, match=match):
        quantkit.quantize(_net(), calib, **kwargs)


def test_quantize_refuses_a_non_module(calib, monkeypatch):
    _no_work(monkeypatch)
    with pytest.raises(UsageError, match="model must be an nn.Module"):
        quantkit.quantize(np.zeros(3), calib)


def test_export_names_python_arguments_and_keeps_foreign_files(tmp_path, calib):
    qmodel = quantkit.quantize(_net(), calib, quantkit.load_recipe(None, ["sensitivity.min_int8_share=null"]),
                               progress=False)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UsageError) as err:
        quantkit.export(qmodel, out, progress=False)
    assert "force=True" in str(err.value) and "--force" not in str(err.value)
    with pytest.raises(UsageError) as err:  # force replaces only a previous quantkit output
        quantkit.export(qmodel, out, force=True, progress=False)
    assert "out_dir" in str(err.value) and "--out" not in str(err.value)
    assert (out / "notes.txt").read_text() == "mine"
    with pytest.raises(UsageError, match="qmodel must be the module returned by quantkit.quantize"):
        quantkit.export(_net(), tmp_path / "fresh")
