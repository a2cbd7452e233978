"""quantkit.ptq.passes / guard: the pass protocol and registry, the fit/check split, the guard that keeps a pass
only when it raises the held-out output SQNR (and restores the state exactly otherwise), and the per-network
calibration-method choice."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from quantkit.calibrate.driver import apply_calibration
from quantkit.calib_methods import CalibMethod, MethodSettings
from quantkit.errors import UsageError
from quantkit.sqnr import sqnr_db
from quantkit.ptq import registered_passes
from quantkit.ptq.guard import RowView, run_passes, split_rows
from quantkit.ptq.passes import PassResult, register_pass, unregister_pass
from quantkit.recipe import load_recipe


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                      nn.Conv2d(8, 4, 1)).eval()
    with torch.no_grad():  # unequal channel ranges: calibration methods then differ
        m[0].weight.mul_(torch.logspace(-1, 1, 8).reshape(8, 1, 1, 1))
    return m


def _state(tmp_path, n=12, overrides=()):
    from quantkit.pipeline import quantize_recipe

    torch.manual_seed(1)
    x = torch.randn(n, 3, 16, 16)
    x[:, :, 0, 0] *= 20  # rare outliers: max calibration wastes range on them
    npy = tmp_path / "calib.npy"
    np.save(npy, x.numpy())
    recipe = load_recipe(None, ["calibration.use_cache=false", "sensitivity.min_int8_share=null",
                                "ptq.bias_correction=false", *overrides])
    return quantize_recipe(recipe, model=_net(), calib=str(npy), progress=False, post_ptq=False)


def _sd_bytes(m: nn.Module) -> dict:
    return {k: v.detach().numpy().tobytes() for k, v in m.state_dict().items() if v is not None}


def test_split_is_disjoint_deterministic_and_spread():
    fit, check = split_rows(56)
    assert len(check) == 8 and not set(fit) & set(check) and sorted(fit + check) == list(range(56))
    assert split_rows(56) == (fit, check)
    assert check[0] > 0 and check[-1] < 55  # neither end of the set ...
    assert max(np.diff(check)) - min(np.diff(check)) <= 1  # ... and evenly spread
    assert split_rows(3)[1] == [] and split_rows(4)[1] == [2]  # too few images: nothing held out


def test_row_view_serves_exactly_its_rows(tmp_path):
    state = _state(tmp_path)
    full = torch.cat(list(state.data.batches()))
    view = RowView(state.data, [1, 5, 7, 10])
    assert view.num_samples == 4
    assert torch.equal(torch.cat(list(view.batches())), full[[1, 5, 7, 10]])
    assert torch.equal(torch.cat(list(view.batches(limit=2, spread=True))), full[[1, 10]])


class _Scale:
    """A minimal example pass: multiplies the last conv's weight by ``factor``."""

    needs = ("torch",)

    def __init__(self, name, factor):
        self.name, self.factor = name, factor

    def enabled(self, recipe):
        return True

    def apply(self, target, data):
        # the pass fits on the fit rows only: the state's data is that view while it runs
        assert target.data is data.fit and not set(data.fit.rows) & set(target.passes_check_rows)
        assert data.fit.num_samples + len(target.passes_check_rows) == data.fit._data.num_samples
        target.model.qmodel.get_submodule("4").weight.data.mul_(self.factor)
        return PassResult(self.name, changed=f"scaled by {self.factor}", measured={"factor": self.factor})


def test_a_registered_example_pass_runs_is_reported_and_a_hurtful_one_is_reverted_exactly(tmp_path):
    state = _state(tmp_path)
    state.passes_check_rows = split_rows(state.data.num_samples)[1]
    before = _sd_bytes(state.model.qmodel)
    register_pass(_Scale("halve", 0.5))
    try:
        assert [p.name for p in registered_passes()][-1] == "halve"
        with pytest.raises(UsageError, match="already registered"):
            register_pass(_Scale("halve", 2.0))
        results = run_passes(state, [p for p in registered_passes() if p.name == "halve"])
    finally:
        unregister_pass("halve")
    (r,) = results
    assert r.tried and r.kept is False and r.verdict.startswith("reverted") and r.db_after < r.db_before
    assert _sd_bytes(state.model.qmodel) == before  # restored exactly
    assert state.passes["steps"] == results and state.passes["check_images"] == 3
    assert "halve" not in [p.name for p in registered_passes()]


def test_a_pass_that_helps_is_kept_and_a_pass_the_target_cannot_run_is_refused(tmp_path):
    state = _state(tmp_path)
    state.passes_check_rows = split_rows(state.data.num_samples)[1]
    state.model.qmodel.get_submodule("4").weight.data.mul_(0.5)  # planted damage the pass undoes
    (r,) = run_passes(state, [_Scale("double", 2.0)])
    assert r.kept and r.verdict == "kept" and r.db_after > r.db_before
    needy = _Scale("needs_gpu", 1.0)
    needy.needs = ("torch", "cuda_graphs")
    with pytest.raises(UsageError, match="needs cuda_graphs"):
        run_passes(state, [needy])


@pytest.mark.parametrize("margin", [0.0, 1.0, 100.0])
def test_calibration_method_is_chosen_by_held_out_sqnr(tmp_path, margin):
    """The method the pass keeps is max unless a clipping rule's worst-output SQNR on the check images (computed
    here directly) beats max's by the margin; with margin 0 the best rule wins, with 100 max always stays."""
    state = _state(tmp_path, overrides=[f"calibration.clip_margin_db={margin}"])
    assert state.recipe.calibration.method is CalibMethod.AUTO
    _, check = split_rows(state.data.num_samples)
    x = torch.cat(list(state.data.batches()))[check]
    ref = state.model.fp32(x).detach()
    oracle = {}
    for m in (CalibMethod.MSE, CalibMethod.ENTROPY, CalibMethod.PERCENTILE, CalibMethod.MAX):
        s = MethodSettings(m)
        apply_calibration(state.model.qmodel, state.calibration.result, s)
        with torch.no_grad():
            oracle[m.value if m is not CalibMethod.PERCENTILE else "percentile_99.99"] = sqnr_db(
                ref, state.model.qmodel(x))
    apply_calibration(state.model.qmodel, state.calibration.result, MethodSettings(CalibMethod.MAX))  # the start
    clip = max((k for k in oracle if k != "max"), key=oracle.get)
    want = clip if oracle[clip] - oracle["max"] >= margin else "max"
    results = run_passes(state, [p for p in registered_passes() if p.name == "calibration_method"])
    by = results[0].measured["check_sqnr_db_by_method"]
    assert by == pytest.approx({k: round(v, 3) for k, v in oracle.items()}, abs=1e-3)
    assert results[0].measured["method"] == want and results[0].measured["clip_margin_db"] == margin
    assert (state.calibration.method or "max") == want
    assert results[0].kept == (want != "max")
    if margin == 0.0:  # the toy net's clipping rules beat max: the test would prove nothing otherwise
        assert want != "max"


def test_pick_method_closed_form():
    from quantkit.ptq.default_passes import pick_method, pick_reason

    scores = {"mse": 20.9, "entropy": 19.0, "percentile_99.99": 20.5, "max": 20.0}
    assert pick_method(scores, 1.0) == "max"  # mse leads by 0.9 dB: inside the margin
    assert pick_method({**scores, "mse": 21.0}, 1.0) == "mse"  # leads by exactly the margin
    assert pick_method(scores, 0.0) == "mse"
    assert pick_method({**scores, "max": 25.0}, 0.0) == "max"
    assert pick_method({"mse": 3.0, "entropy": 3.0, "max": 1.0}, 1.0) == "mse"  # ties: the earlier candidate
    no_max = {k: v for k, v in scores.items() if k != "max"}
    assert pick_method(no_max, 1.0) == "mse"  # max failed on the histograms: the best wins
    assert pick_reason(scores, "max", 1.0) == ("max: the best clipping rule (mse) led it by 0.90 dB, under the 1 dB "
                                               "margin")
    assert pick_reason(scores, "mse", 0.0) == "mse: led max by 0.90 dB (margin 0 dB)"


def test_a_fixed_method_is_honoured_and_auto_is_no_calibrator_rule(tmp_path):
    state = _state(tmp_path, overrides=["calibration.method=max"])
    (r,) = run_passes(state, [p for p in registered_passes() if p.name == "calibration_method"])
    assert not r.tried and r.verdict == "off in the recipe" and state.calibration.method is None
    with pytest.raises(UsageError, match="auto"):
        MethodSettings(CalibMethod.AUTO)
    assert load_recipe(None).calibration.settings.method is CalibMethod.MAX  # the start; too few to choose


def test_the_default_export_steps_run_guarded_in_order_and_chain_their_db(tmp_path):
    """quantize_and_select runs calibration_method -> fp16_choice -> bias_correction; a kept step's 'after' is
    the next step's 'before', a reverted one leaves the state as measured before it."""
    from quantkit.pipeline import quantize_and_select

    torch.manual_seed(1)
    np.save(tmp_path / "c.npy", torch.randn(12, 3, 16, 16).numpy())
    recipe = load_recipe(None, ["calibration.use_cache=false", "sensitivity.min_int8_share=0.8",
                                "sensitivity.num_images=4", "ptq.num_images=8"])
    state = quantize_and_select(recipe, model=_net(), calib=str(tmp_path / "c.npy"), progress=False)
    steps = state.passes["steps"]
    assert [s.name for s in steps] == ["calibration_method", "fp16_choice", "bias_correction"]
    assert all(s.tried and s.db_before is not None for s in steps)
    for a, b in zip(steps, steps[1:]):  # each step is judged against the state the previous one left
        assert b.db_before == (a.db_after if a.kept else a.db_before)
    assert all(s.db_after > s.db_before for s in steps if s.kept)
    assert all(s.kept or s.verdict in ("no change", "reverted: no gain on the check images") for s in steps)
    from quantkit.ptq.guard import Checker

    last = steps[-1]  # the state left is the one last kept: measured afresh, its check SQNR is the same (to
    # float summation order: a restored copy's tensors sit at other addresses, and kernels may sum differently)
    assert Checker(state, split_rows(12)[1])() == pytest.approx(last.db_after if last.kept else last.db_before,
                                                                abs=1e-3)


def test_too_few_images_to_hold_out_runs_the_steps_unchecked_and_says_so(tmp_path):
    state = _state(tmp_path, n=3)
    state.passes_check_rows = []
    (r,) = run_passes(state, [_Scale("double", 2.0)])
    assert r.kept and r.verdict.startswith("kept unchecked: 3 calibration image(s)") and r.db_before is None
    assert state.passes["check_images"] == 0 and state.passes["fit_images"] == 3


def test_every_step_off_runs_no_check_forward(tmp_path):
    """--full-int8 with a fixed method and bias correction off: nothing to judge, so the guard measures nothing."""
    state = _state(tmp_path, overrides=["calibration.method=max"])
    results = run_passes(state, registered_passes())
    assert [r.verdict for r in results] == ["off in the recipe"] * len(results) and results
    assert state.passes["forwards"] == 0
