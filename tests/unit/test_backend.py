"""Deployment backends behind one interface (issue 22): a minimal backend registered here is used by both routes
for the build scripts and for ``--engine``, checked before calibrating, and its files are part of the atomic
output folder; an unknown backend is exit 2 naming the registered ones. TensorRT's own build script is unchanged
(byte-compared with the plan it rendered before the interface)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

import quantkit
from quantkit.engine.backend import BuildRequest, backends, get_backend, register_backend
from quantkit.errors import DependencyError, QuantkitError
from quantkit.recipe import Recipe, load_recipe
from onnx_toy import toy_data, toy_onnx


class Listing:
    """A minimal backend: writes deploy.txt naming the graphs it was handed; 'builds' a deploy.json."""

    name = "listing"

    def __init__(self):
        self.calls = []
        self.refuse = False

    def check_possible(self, recipe):
        self.calls.append("check")
        if self.refuse and recipe.export.engine:
            raise DependencyError("listing: the deploy tool is not installed here")

    def write_scripts(self, stage, recipe, req: BuildRequest):
        self.calls.append("scripts")
        stage.write_text("deploy.txt", f"{req.weak_onnx} {req.strong_onnx} {list(req.fp16_nodes)} {req.batch} "
                                       f"{list(req.sample_shape)}\n")

    def build(self, stage, recipe, req: BuildRequest) -> dict:
        self.calls.append("build")
        stage.write_text("deploy.json", json.dumps({"built_from": req.weak_onnx}))
        return {"backend": self.name, "onnx": req.weak_onnx}


@pytest.fixture()
def listing():
    b = Listing()
    register_backend(b)
    yield b
    from quantkit.engine import backend as mod

    mod._BACKENDS.pop("listing", None)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    d = tmp_path_factory.mktemp("be")
    (d / "toy.onnx").write_bytes(toy_onnx())
    np.save(d / "calib.npy", toy_data(16))
    return d / "toy.onnx", d / "calib.npy"


def test_onnx_route_uses_the_registered_backend(toy, listing, tmp_path):
    from quantkit.pipeline_onnx import run_onnx_export

    model, npy = toy
    recipe = load_recipe(None, [f"model.name='{model}'", f"calibration.data='{npy}'", "calibration.use_cache=false",
                                "export.backend=listing", "export.engine=true"])
    res = run_onnx_export(recipe, tmp_path / "out", progress=False)
    assert listing.calls == ["check", "scripts", "build"]
    out = tmp_path / "out"
    assert (out / "deploy.txt").read_text().startswith("model.int8.onnx ")
    assert not (out / "build_engine.sh").exists() and (out / "deploy.json").exists()
    assert res.report["engine"] == {"backend": "listing", "onnx": "model.int8.onnx"}
    manifest = json.loads((out / "manifest.json").read_text())
    assert "deploy.txt" in json.dumps(manifest) and "deploy.json" in json.dumps(manifest)


def test_check_possible_runs_before_calibrating_and_writes_nothing(toy, listing, tmp_path, monkeypatch):
    import quantkit.pipeline_onnx as po

    model, npy = toy
    listing.refuse = True
    monkeypatch.setattr(po, "quantize_onnx", lambda *a, **k: pytest.fail("calibrated before the backend check"))
    recipe = load_recipe(None, [f"model.name='{model}'", f"calibration.data='{npy}'", "export.backend=listing",
                                "export.engine=true"])
    with pytest.raises(QuantkitError, match="deploy tool") as e:
        po.run_onnx_export(recipe, tmp_path / "out", progress=False)
    assert e.value.exit_code == 2 and not (tmp_path / "out").exists()


def test_torch_route_uses_the_registered_backend(listing, tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1)).eval()
    x = np.random.default_rng(0).standard_normal((8, 3, 16, 16)).astype(np.float32)
    recipe = load_recipe(None, ["export.backend=listing", "sensitivity.min_int8_share=null"])
    q = quantkit.quantize(net, x, recipe, progress=False)
    quantkit.export(q, tmp_path / "out", progress=False)
    assert listing.calls[-1] == "scripts"  # no --engine: scripts only
    text = (tmp_path / "out" / "deploy.txt").read_text()
    assert text.startswith("model.int8.onnx model.int8.strong.onnx [] (1, 1, 1) [3, 16, 16]") or \
        text.startswith("model.int8.onnx None [] (1, 1, 1) [3, 16, 16]"), text


def test_unknown_backend_is_exit_2_naming_the_registered_ones(tmp_path):
    with pytest.raises(QuantkitError, match="unknown export.backend 'nope': one of tensorrt") as e:
        get_backend("nope")
    assert e.value.exit_code == 2
    assert "tensorrt" in backends()
    with pytest.raises(TypeError):
        register_backend(object())


def test_tensorrt_script_is_the_plan_it_always_rendered(tmp_path):
    """Oracle: the script the pre-interface code rendered (plan_build + write_dispatch_script directly)."""
    from quantkit.engine.config import plan_build
    from quantkit.engine.dispatch import render_dispatch_script

    class Stage:
        files = {}

        def path(self, name):
            return tmp_path / name

    req = BuildRequest("model.int8.onnx", "model.int8.strong.onnx", ("conv1",), (1, 4, 8), (3, 64, 64))
    get_backend("tensorrt").write_scripts(Stage(), Recipe(), req)
    weak = plan_build("10.0", onnx_is_strong=False, target="t4", batch=(1, 4, 8), fp16_layers=["conv1"],
                      chw=(3, 64, 64))
    strong = plan_build("10.12", onnx_is_strong=True, target="t4", batch=(1, 4, 8), chw=(3, 64, 64))
    assert (tmp_path / "build_engine.sh").read_text() == render_dispatch_script(weak, strong)
