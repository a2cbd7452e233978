"""`quantkit sensitivity` and `quantkit export` keep the same FP16 layers for the same model and settings
(issue 24: 20 against 10 on the bundled detector). The sensitivity command used to analyse the model after the
PTQ passes (bias correction), which export runs only after its FP16 choice; so its per-layer SQNRs, and the
layers its MAC budget bought, were those of another model."""

import json

import numpy as np
import pytest
import torch

NET_PY = '''
import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.act = nn.ReLU()

    def forward(self, x):
        return x + self.act(self.conv(x))


def build():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), Block(8), nn.Conv2d(8, 16, 3, stride=2, padding=1),
                         nn.ReLU(), Block(16), Block(16), nn.Conv2d(16, 4, 1))
'''


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("agree")
    (d / "net.py").write_text(NET_PY)
    ns = {}
    exec(compile(NET_PY, str(d / "net.py"), "exec"), ns)
    torch.manual_seed(0)
    torch.save(ns["build"]().state_dict(), d / "net.pt")
    from quantkit.data.images import list_images, load_image
    from quantkit.data.preprocess import Preprocess, preprocess_image
    from quantkit.paths import BUNDLED_CALIBRATION

    pp = Preprocess(size=(32, 32))
    arr = np.stack([preprocess_image(load_image(f), pp)[0] for f in list_images(BUNDLED_CALIBRATION)[:8]])
    np.save(d / "calib.npy", arr.astype(np.float32))
    return d


def _recipe(d, *extra):
    from quantkit.recipe import load_recipe

    return load_recipe(None, [f"model.name={d / 'net.py'}:build", f"model.weights={d / 'net.pt'}",
                              f"calibration.data={d / 'calib.npy'}", "calibration.use_cache=false",
                              "sensitivity.num_images=4", "ptq.bias_correction=true", *extra])


def test_sensitivity_command_and_export_keep_the_same_fp16_layers(tiny, tmp_path):
    from quantkit.pipeline import quantize_and_select, run_sensitivity

    recipe = _recipe(tiny, "sensitivity.min_int8_share=0.8")
    exported = quantize_and_select(recipe, progress=False)
    run = run_sensitivity(recipe, tmp_path / "sens", progress=False)
    doc = json.loads((tmp_path / "sens" / "sensitivity.json").read_text())
    assert exported.ptq.enabled.get("bias_correction"), "the settings must include a PTQ pass for this to test"
    # the same model analysed: the all-INT8 SQNR and every layer's recovery agree exactly
    ana = exported.selection.sensitivity.as_dict()
    assert doc["sensitivity"]["int8_sqnr_db"] == ana["int8_sqnr_db"]
    # every layer export replayed (its bounded choice replays only the best-ranked candidates) recovers the same
    replayed = {r["name"]: r["recovery_sqnr_db"] for r in ana["layers"] if r.get("replayed", True)}
    assert replayed and {r["name"]: r["recovery_sqnr_db"] for r in doc["sensitivity"]["layers"]
                         if r["name"] in replayed} == replayed
    # and so the same FP16 layers, in the JSON and in the printed summary
    fp16 = exported.selection.choice.fp16
    assert fp16, "a budget that keeps no layer FP16 tests nothing"
    assert doc["selection"]["fp16_layers"] == fp16
    assert f"FP16 layers ({len(fp16)}): {', '.join(fp16)}" in run.summary
