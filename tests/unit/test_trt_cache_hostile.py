"""Hostile ``--trt-calib-cache`` files: scales that are no scale (0, negative, float32 subnormal, inf, NaN), absurd
scales (FP16 underflow, amax past FP16's range) and duplicate tensor lines are refused naming the tensor, before
anything is written. The caches are built here from a real export's own cache."""

from __future__ import annotations

import hashlib
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

from quantkit.calibrate.trt_cache import MAX_SCALE, MIN_SCALE, amax_from_cache, parse_cache, read_cache
from quantkit.errors import QuantkitError, UsageError
from quantkit.recipe import load_recipe
from onnx_toy import toy_data, toy_onnx

HEADER = "TRT-8601-EntropyCalibration2"


def bits(value: float) -> str:
    """The cache's hex for a float32 value, by struct (independent of the module under test)."""
    return struct.pack(">f", value).hex()


@pytest.mark.parametrize("hexval, why", [
    ("00000000", "0"), ("80000000", "-0"), ("bc010204", "negative"), ("00000001", "smallest float32 subnormal"),
    ("007fffff", "largest float32 subnormal"), ("7f800000", "inf"), ("ff800000", "-inf"), ("7fc00000", "NaN"),
])
def test_non_scales_are_refused_naming_the_tensor(hexval, why):
    text = f"{HEADER}\ngood: 3c010204\n/block3/conv/Relu_output_0: {hexval}\n"
    with pytest.raises(UsageError, match=r"line 3: tensor '/block3/conv/Relu_output_0' has scale") as info:
        parse_cache(text)
    assert "finite and > 0" in str(info.value), why


@pytest.mark.parametrize("second", ["3c010204", "3d010204"])
def test_duplicate_tensor_lines_are_refused_not_last_wins(second):
    text = f"{HEADER}\n/a/Relu_output_0: 3c010204\nother: 3c010204\n/a/Relu_output_0: {second}\n"
    with pytest.raises(UsageError, match=r"lines 2 and 4 both give tensor '/a/Relu_output_0'"):
        parse_cache(text)


def test_long_names_are_quoted_bounded():
    name = "n" * 1_000_000
    with pytest.raises(UsageError) as info:
        parse_cache(f"{HEADER}\n{name}: 00000000\n")
    assert len(str(info.value)) < 500 and "1,000,000 characters" in str(info.value)


@pytest.mark.parametrize("scale", [1e-30, 1e-9, MIN_SCALE / 2, 520.0, 1e4, 1e30])
def test_absurd_scales_of_quantized_tensors_are_refused(scale):
    assert float(np.float32(scale)) >= np.finfo(np.float32).tiny  # a normal float32: parse_cache accepts it
    _, scales = parse_cache(f"{HEADER}\nx: {bits(scale)}\ny: 3c010204\n")
    with pytest.raises(UsageError, match=r"tensor 'x' has scale .* outside"):
        amax_from_cache(scales, ["y", "x"], {"x", "y"})
    amax_from_cache(scales, ["y"], {"x", "y"})  # a line for a tensor quantkit does not quantize is ignored


@pytest.mark.parametrize("scale", [MIN_SCALE, 1e-4, 1 / 127, 5.0, 500.0, 65504 / 127 * (1 - 1e-6)])
def test_plausible_scales_pass_with_amax_127_times_scale(scale):
    _, scales = parse_cache(f"{HEADER}\nx: {bits(scale)}\n")
    amax = amax_from_cache(scales, ["x"], {"x"})["x"]
    assert amax == float(np.float32(np.float32(scale) * np.float32(127)))
    assert amax <= 65504 and MAX_SCALE * 127 == pytest.approx(65504)


# ----------------------------------------------------------------------------- through the ONNX route, end to end

@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A toy ONNX export whose own calibration.cache is the template of the hostile caches."""
    from quantkit.pipeline_onnx import run_onnx_export

    root = tmp_path_factory.mktemp("trt")
    model, npy = root / "toy.onnx", root / "calib.npy"
    model.write_bytes(toy_onnx(fold=False))
    np.save(npy, toy_data(16))
    run_onnx_export(_recipe(model, npy), root / "out", progress=False)
    return model, npy, root / "out" / "calibration.cache"


def _recipe(model, npy):
    return load_recipe(None, [f"model.name='{model}'", f"calibration.data='{npy}'", "calibration.use_cache=false"])


def _edited(cache, tmp_path, how: str):
    header, scales = read_cache(cache)
    victim = sorted(scales)[0]
    lines = [header] + [f"{n}: {bits(s)}" for n, s in sorted(scales.items())]
    if how == "duplicate":
        lines.append(f"{victim}: {bits(scales[victim] * 2)}")
    else:
        lines[1] = f"{victim}: {how}"
    p = tmp_path / f"{how}.cache"
    p.write_text("\n".join(lines) + "\n")
    return p, victim


@pytest.mark.parametrize("how", ["00000001", "00000000", "7fc00000", bits(1e4), bits(1e-12), "duplicate"])
def test_export_refuses_hostile_cache_and_writes_nothing(exported, tmp_path, how):
    from quantkit.pipeline_onnx import run_onnx_export

    model, npy, cache = exported
    hostile, victim = _edited(cache, tmp_path, how)
    before = hashlib.sha256(hostile.read_bytes()).hexdigest()
    out = tmp_path / "out"
    with pytest.raises(QuantkitError) as info:
        run_onnx_export(_recipe(model, npy), out, progress=False, trt_cache=str(hostile))
    assert info.value.exit_code == 2 and repr(victim) in str(info.value), str(info.value)
    assert not out.exists() and hashlib.sha256(hostile.read_bytes()).hexdigest() == before


def test_cli_exit_2_on_a_subnormal_scale(exported, tmp_path):
    model, npy, cache = exported
    hostile, victim = _edited(cache, tmp_path, "00000001")
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "quantkit", "export", str(model), "--calib", str(npy), "--no-cache",
                          "--trt-calib-cache", str(hostile), "--out", str(tmp_path / "out")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 2 and victim in res.stderr and "subnormal" in res.stderr, res.stderr[-2000:]
    assert not (tmp_path / "out").exists()
