"""One pass registry and one guard for both routes (issue 22): the ONNX route runs the registered passes on its
``OnnxTarget`` through ``ptq.guard.run_passes``. Oracles: a pass registered here runs on the ONNX route and is
reported; one that hurts is reverted and the exported graph is byte-identical to an export without it; the kept
one's node is float in model.int8.onnx (graph coverage) with the pass's reason; a pass or recipe step needing torch
or autograd is refused before calibration, naming the route."""

from __future__ import annotations

import numpy as np
import pytest

from quantkit.errors import UsageError
from quantkit.exporter.coverage import graph_coverage
from quantkit.onnxin.route import quantize_onnx
from quantkit.ptq.passes import PassResult, register_pass, unregister_pass
from quantkit.recipe import load_recipe
from onnx_toy import toy_data, toy_onnx


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    d = tmp_path_factory.mktemp("op")
    (d / "toy.onnx").write_bytes(toy_onnx())
    np.save(d / "calib.npy", toy_data(32, seed=5))
    return d / "toy.onnx", d / "calib.npy"


def _recipe(model, npy, *extra):
    return load_recipe(None, [f"model.name='{model}'", f"calibration.data='{npy}'", "calibration.use_cache=false",
                              "calibration.method=max", "sensitivity.min_int8_share=null",
                              "ptq.bias_correction=false", *extra])


class _FloatFirst:
    """Keeps every INT8 node float (the outputs then equal FP32's: fidelity rises to infinite SQNR)."""

    name, needs = "float_first", ()

    def enabled(self, recipe):
        return True

    def apply(self, target, data):
        nodes = list(target.layout.int8)
        target.layout.int8 = []
        target.layout.reasons = {**target.layout.reasons, **{n: "float_first: a test pass" for n in nodes}}
        return PassResult(self.name, changed=f"{len(nodes)} nodes float", measured={"nodes": nodes})


class _CoarseScales:
    """Multiplies every activation scale by 50 (coarse INT8 steps: fidelity falls)."""

    name, needs = "coarse_scales", ()

    def enabled(self, recipe):
        return True

    def apply(self, target, data):
        assert target.data is data.fit and data.measure is not None  # it fits on the fit rows only
        target.act_scales = {t: s * 50.0 for t, s in target.act_scales.items()}
        return PassResult(self.name, changed="scales x50")


@pytest.fixture
def registered():
    names = []

    def add(p):
        register_pass(p)
        names.append(p.name)

    yield add
    for n in names:
        unregister_pass(n)


def _step(res, name):
    return next(s for s in res.passes["steps"] if s["name"] == name)


def test_a_registered_pass_runs_on_the_onnx_route_and_is_kept_when_it_helps(toy, registered):
    model, npy = toy
    registered(_FloatFirst())
    res = quantize_onnx(str(model), str(npy), _recipe(model, npy), progress=False)
    step = _step(res, "float_first")
    assert step["tried"] and step["kept"] and step["check_sqnr_db_after"] == "inf" != step["check_sqnr_db_before"]
    nodes = step["measured"]["nodes"]
    assert nodes and not set(nodes) & set(res.layout.int8)
    assert all(res.layout.reasons[n] == "float_first: a test pass" for n in nodes)
    float_ops = {op.node for op in graph_coverage(res.int8).ops if not op.int8}
    assert set(n for n in nodes if n in {op.node for op in graph_coverage(res.int8).ops}) <= float_ops


def test_a_pass_that_hurts_is_reverted_exactly(toy, registered):
    model, npy = toy
    plain = quantize_onnx(str(model), str(npy), _recipe(model, npy), progress=False)
    registered(_CoarseScales())
    res = quantize_onnx(str(model), str(npy), _recipe(model, npy), progress=False)
    step = _step(res, "coarse_scales")
    assert step["tried"] and not step["kept"] and step["verdict"].startswith("reverted")
    assert step["check_sqnr_db_after"] < step["check_sqnr_db_before"]
    assert res.act_scales == plain.act_scales
    assert res.int8.SerializeToString() == plain.int8.SerializeToString()


def test_a_pass_needing_torch_is_refused_before_calibration(toy, registered, monkeypatch):
    model, npy = toy

    class _TorchOnly(_FloatFirst):
        name, needs = "torch_only", ("torch",)

    registered(_TorchOnly())
    import quantkit.onnxin.calibrate as ocal

    def boom(*a, **k):
        raise AssertionError("calibrated before refusing")

    monkeypatch.setattr(ocal, "calibrate_onnx_cached", boom)
    with pytest.raises(UsageError, match="torch_only.*needs torch.*ONNX route"):
        quantize_onnx(str(model), str(npy), _recipe(model, npy), progress=False)


@pytest.mark.parametrize("setting,missing", [("ptq.adaround=true", "autograd"), ("ptq.range_choice=true", "torch")])
def test_torch_only_steps_of_the_sequential_pass_are_refused(toy, setting, missing):
    model, npy = toy
    with pytest.raises(UsageError, match=f"needs .*{missing}.*ONNX route"):
        quantize_onnx(str(model), str(npy), _recipe(model, npy, "ptq.bias_correction=true", setting), progress=False)


def test_both_targets_give_the_guard_what_it_needs(toy):
    from quantkit.onnxin.target import OnnxTarget
    from quantkit.ptq.guard import TorchOps, guard_ops
    from quantkit.ptq.passes import GuardedTarget, target_capabilities, target_kind

    assert issubclass(OnnxTarget, GuardedTarget) and issubclass(TorchOps, GuardedTarget)
    assert target_kind(OnnxTarget) == "onnx" and target_capabilities(OnnxTarget) == {"onnx"}

    class _State:  # the torch state has none of the three itself: the guard wraps it
        pass

    assert isinstance(guard_ops(_State()), TorchOps)
