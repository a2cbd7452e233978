"""--device cuda against the CPU path: the same calibration histograms' amax, layer errors and mAP, within
what float summation order can move (GPU convolutions sum in another order than oneDNN)."""

import math

import pytest
import torch

from quantkit import paths
from quantkit.calibrate.driver import run_calibration
from quantkit.calib_methods import MethodSettings
from quantkit.recipe import load_recipe

pytestmark = pytest.mark.cuda_only


@pytest.fixture(scope="module")
def prepared():
    from quantkit import models, quant
    from quantkit.data import open_data

    recipe = load_recipe(None, ["calibration.max_images=16"])
    built, info, size = models.build(recipe.model)
    model = quant.prepare(built, recipe.quantization, info, size)
    data, pp = open_data(str(paths.BUNDLED_CALIBRATION), recipe.calibration, recipe.preprocess, size)
    return recipe, model, data, pp


@pytest.mark.parametrize("method", ["max", "entropy", "mse", "percentile"])
def test_cuda_amax_matches_cpu(prepared, method):
    _, model, data, _ = prepared
    settings = MethodSettings(method=method)
    cpu = run_calibration(model.qmodel, data.batches(), settings, progress=False, threads=1)
    gpu = run_calibration(model.qmodel, data.batches(), settings, progress=False, device="cuda")
    assert next(model.qmodel.parameters()).device.type == "cpu"  # moved back
    assert cpu.tensors.keys() == gpu.tensors.keys()
    worst = 0.0
    for name, methods in cpu.tensors.items():
        for key, a in methods.items():
            b = gpu.tensors[name][key]
            worst = max(worst, abs(a - b) / max(abs(a), 1e-12))
    # max is exact up to conv rounding; histogram methods can move by a bin or two (2048 bins per range)
    assert worst < (1e-4 if method == "max" else 5e-3), worst


def test_cuda_layer_errors_and_eval_match_cpu(prepared):
    from quantkit.calibrate.driver import apply_calibration
    from quantkit.data.coco import CocoDataset
    from quantkit.eval.detection import evaluate_detection, torch_predictor
    from quantkit.eval.layer_sqnr import measure_layer_errors
    from quantkit.utils.device import on_device

    recipe, model, data, pp = prepared
    settings = MethodSettings(method="entropy")
    calib = run_calibration(model.qmodel, data.batches(), settings, progress=False, threads=1)
    chosen = apply_calibration(model.qmodel, calib, settings)
    batches = list(data.batches(limit=4))
    layers, int8 = model.layout.layers, model.layout.int8
    cpu = measure_layer_errors(model.fp32, model.qmodel, layers, int8, batches, chosen)
    gpu = measure_layer_errors(model.fp32, model.qmodel, layers, int8, batches, chosen, device="cuda")
    for a, b in zip(cpu.layers, gpu.layers):
        if math.isfinite(a.output_sqnr_db):
            assert b.output_sqnr_db == pytest.approx(a.output_sqnr_db, abs=1.0), a.name
    ds = CocoDataset(paths.BUNDLED_EVAL, max_images=8)
    m_cpu = evaluate_detection(torch_predictor(model.fp32), ds, pp, progress=False)
    with on_device("cuda", model.fp32) as dev:
        m_gpu = evaluate_detection(torch_predictor(model.fp32, dev), ds, pp, progress=False)
    assert m_gpu.map50_95 == pytest.approx(m_cpu.map50_95, abs=0.005)
