"""The ONNX route chooses the calibration method per network like the torch route (issue 22/23): measured on the
guard's held-out check images, the best worst-output SQNR wins. Oracle: each fixed-method export's own float Q/DQ
twin, run here in onnxruntime on the same check rows."""

from __future__ import annotations

import json

import numpy as np
import pytest

from quantkit.exporter import parity
from quantkit.onnxin.route import quantize_onnx
from quantkit.ptq.guard import split_rows
from quantkit.recipe import load_recipe
from onnx_toy import toy_data, toy_onnx


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    d = tmp_path_factory.mktemp("mc")
    (d / "toy.onnx").write_bytes(toy_onnx(fold=False))
    x = toy_data(16)
    x[3] *= 6.0  # one image with rare large activations: max and the clipping rules then differ clearly
    np.save(d / "calib.npy", x)
    return d / "toy.onnx", d / "calib.npy", x


def _recipe(model, npy, *extra):  # the method choice alone (the steps after it have their own tests)
    return load_recipe(None, [f"model.name='{model}'", f"calibration.data='{npy}'", "calibration.use_cache=false",
                              "sensitivity.min_int8_share=null", "ptq.bias_correction=false", *extra])


def _worst_db(res, fp32_bytes, x_check):
    names = [o.name for o in res.sim.graph.output]
    ref = [parity.run_session(parity.session(fp32_bytes, 1), x_check)]
    got = [parity.run_session(parity.session(res.sim.SerializeToString(), 1), x_check)]
    return float(parity.compare_outputs(ref, got, names).worst)  # the step's measure: every output's raw SQNR


def test_auto_keeps_the_rule_with_the_best_check_sqnr(toy):
    model, npy, x = toy
    auto = quantize_onnx(str(model), str(npy), _recipe(model, npy), progress=False)
    _, check = split_rows(len(x))
    assert check and auto.passes["check_images"] == len(check)
    x_check = x[check]
    scores = {}
    for m in ("mse", "entropy", "percentile", "max"):
        fixed = quantize_onnx(str(model), str(npy), _recipe(model, npy, f"calibration.method={m}"), progress=False)
        scores[m] = _worst_db(fixed, auto.fp32_bytes, x_check)
    step = auto.passes["steps"][0]
    by = step["measured"]["check_sqnr_db_by_method"]
    chosen = step["measured"]["method"]
    assert {k.split("_")[0].split("(")[0] for k in by} == set(scores)
    clip = max(("mse", "entropy", "percentile"), key=lambda k: (round(scores[k], 3), -list(scores).index(k)))
    best = clip if scores[clip] - scores["max"] >= 1.0 else "max"  # the default clip_margin_db
    assert chosen.startswith(best), (chosen, scores)
    assert auto.settings.method.value == best
    assert auto.act_scales != quantize_onnx(str(model), str(npy), _recipe(model, npy, "calibration.method=max"),
                                            progress=False).act_scales or best == "max"


def test_fixed_method_skips_the_choice_and_tiny_sets_say_unchecked(toy, tmp_path):
    model, npy, x = toy
    fixed = quantize_onnx(str(model), str(npy), _recipe(model, npy, "calibration.method=entropy"), progress=False)
    step = fixed.passes["steps"][0]  # the one guard lists every registered pass, as on the torch route
    assert step["name"] == "calibration_method" and not step["tried"] and step["verdict"] == "off in the recipe"
    assert fixed.settings.method.value == "entropy"
    np.save(tmp_path / "three.npy", x[:3])
    few = quantize_onnx(str(model), str(tmp_path / "three.npy"), _recipe(model, tmp_path / "three.npy"),
                        progress=False)
    step = few.passes["steps"][0]
    assert few.passes["check_images"] == 0 and step["verdict"] == "no change" and "too few" in step["measured"]["note"]
    assert few.settings.method.value == "max"


def test_the_choice_is_in_report_json_and_md(toy, tmp_path):
    from quantkit.pipeline_onnx import run_onnx_export

    model, npy, _ = toy
    out = tmp_path / "out"
    res = run_onnx_export(_recipe(model, npy), out, progress=False)
    rep = json.loads((out / "report.json").read_text())
    assert rep["passes"]["steps"][0]["name"] == "calibration_method"
    assert rep["calibration"]["method"] == res.report["passes"]["steps"][0]["measured"]["method"]
    assert "Calibration methods on the check images" in (out / "report.md").read_text()
