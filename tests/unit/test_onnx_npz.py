"""`.npz` calibration data on the ONNX route (issue 22): arrays keyed by ONNX input name. Oracle: the same array
as a .npy gives the same calibration and a byte-identical INT8 graph."""

from __future__ import annotations

import json

import numpy as np
import pytest

from quantkit.errors import QuantkitError
from quantkit.pipeline_onnx import run_onnx_export
from quantkit.recipe import load_recipe
from onnx_toy import toy_data, toy_onnx


def _recipe(model, data, *extra):
    return load_recipe(None, [f"model.name='{model}'", f"calibration.data='{data}'", "calibration.use_cache=false",
                              *extra])


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("npz")
    model, dyn, npy = root / "toy.onnx", root / "dyn.onnx", root / "calib.npy"
    model.write_bytes(toy_onnx(fold=False))
    dyn.write_bytes(toy_onnx(dynamic_hw=True))
    arr = toy_data(16)
    np.save(npy, arr)
    ref = root / "ref"
    run_onnx_export(_recipe(model, npy), ref, progress=False)
    return model, dyn, arr, ref


@pytest.mark.parametrize("keyed", [True, False])
def test_npz_keyed_by_input_name_matches_the_npy(toy, tmp_path, keyed):
    model, _, arr, ref = toy
    npz = tmp_path / "calib.npz"
    np.savez(npz, **{"images": arr}) if keyed else np.savez(npz, arr)  # arr_0: no name given
    out = tmp_path / "out"
    res = run_onnx_export(_recipe(model, npz), out, progress=False)
    assert (out / "model.int8.onnx").read_bytes() == (ref / "model.int8.onnx").read_bytes()
    got, want = (json.loads((d / "calibration.json").read_text()) for d in (out, ref))
    assert got["amax"] == want["amax"] and got["data_fingerprint"] == want["data_fingerprint"]
    assert res.report["calibration"]["data"].endswith("calib.npz") and res.report["calibration"]["kind"] == "npz"


def test_npz_shape_fixes_free_dims(toy, tmp_path):
    _, dyn, arr, _ = toy
    npz = tmp_path / "calib.npz"
    np.savez(npz, images=arr[:4])
    res = run_onnx_export(_recipe(dyn, npz), tmp_path / "out", progress=False)
    assert res.report["input"]["shape"] == [1, *arr.shape[1:]]


def test_bad_npz_is_exit_2_naming_the_input(toy, tmp_path):
    model, _, arr, _ = toy
    cases = {}
    np.savez(tmp_path / "wrong_key.npz", pixels=arr)
    cases["wrong_key.npz"] = "'images'"
    np.savez(tmp_path / "two.npz", images=arr, mask=arr)
    cases["two.npz"] = "input names ['images']"
    np.savez(tmp_path / "empty.npz")
    cases["empty.npz"] = "holds no arrays"
    np.savez(tmp_path / "objects.npz", images=np.array([{"a": 1}], dtype=object))
    cases["objects.npz"] = "no object arrays"
    (tmp_path / "notzip.npz").write_bytes(b"PK\x03\x04 not really a zip")
    cases["notzip.npz"] = "not a readable .npz"
    np.savez(tmp_path / "int.npz", images=(arr * 255).astype(np.uint8))
    cases["int.npz"] = "holds uint8 values for the model's float32 input"
    for k, (name, message) in enumerate(cases.items()):
        out = tmp_path / f"out{k}"
        with pytest.raises(QuantkitError) as e:
            run_onnx_export(_recipe(model, tmp_path / name), out, progress=False)
        assert e.value.exit_code == 2 and message in str(e.value), (name, str(e.value))
        assert not out.exists()
