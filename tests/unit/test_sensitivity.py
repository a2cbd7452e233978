"""Sensitivity analysis, budgeted FP16 selection and the sensitivity plot, on tiny models with real image tiles.

Oracles: the plain (un-replayed) forward of the fake-quant model for every configuration, SQNR computed by
``make_measure`` against the separate FP32 model, and ``evaluate_detection`` for mAP.
"""

import math

import numpy as np
import pytest
import torch
from torch import nn

from quantkit.data.images import list_images, load_image
from quantkit.data.preprocess import Preprocess, preprocess_image
from quantkit.data.coco import CocoDataset
from quantkit.models.ops import Add
from quantkit.paths import BUNDLED_CALIBRATION, BUNDLED_EVAL
from quantkit.pipeline import quantize_recipe
from quantkit.quant.insert import set_precision
from quantkit.quant.tensor_quantizer import TensorQuantizer
from quantkit.recipe import load_recipe
from quantkit.sensitivity import analysis
from quantkit.sensitivity.analysis import Metric, Replayer, analyze, make_measure
from quantkit.sensitivity.cost_model import layer_costs
from quantkit.sensitivity.select import choose_fp16_layers
from quantkit.utils.atomic import dumps_json


class Fragile(nn.Module):
    """``spike`` puts a +500 outlier on channel 0 of ``fragile``'s input (its weights ignore that channel), so
    the calibrated input scale of ``fragile`` rounds every ordinary activation to zero: quantizing it alone
    destroys the output. Also: an in-place ReLU, an activation module shared by two calls, a residual Add."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.relu_ = nn.ReLU(inplace=True)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.act = nn.SiLU()
        self.spike = nn.Conv2d(8, 8, 1)
        self.fragile = nn.Conv2d(8, 8, 3, padding=1)
        self.add = Add()
        self.out = nn.Conv2d(8, 4, 1)
        with torch.no_grad():
            self.spike.bias[0] = 500.0
            self.fragile.weight[:, 0] = 0.0

    def forward(self, x):
        y = self.relu_(self.c1(x))
        y = self.act(self.c2(y))
        z = self.add(self.fragile(self.spike(y)), y)
        return self.out(self.act(z))


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny tensors: thread hand-offs cost more than they save (6x slower with 2 threads on a busy 2-core box)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _tiles(n: int, size: int) -> np.ndarray:
    pp = Preprocess(size=(size, size))
    return np.stack([preprocess_image(load_image(f), pp)[0] for f in list_images(BUNDLED_CALIBRATION)[:n]])


@pytest.fixture(scope="module")
def state(tmp_path_factory):
    d = tmp_path_factory.mktemp("sens")
    np.save(d / "calib.npy", _tiles(8, 32).astype(np.float32))
    torch.manual_seed(0)
    recipe = load_recipe(None, ["calibration.method=max", "calibration.use_cache=false",
                                  "ptq.bias_correction=false"])
    return quantize_recipe(recipe, model=Fragile(), calib=str(d / "calib.npy"), progress=False)


def _flags(qmodel):
    return [(n, q._disabled) for n, q in qmodel.named_modules() if isinstance(q, TensorQuantizer)]


def test_replay_matches_plain_forward_for_every_configuration(state):
    q, names = state.model.qmodel, list(state.model.layout.layers)
    x = next(state.data.batches(limit=4))
    modules = [q.get_submodule(n) for n in names]
    try:
        with Replayer(q, modules) as rp:
            set_precision(q, set())
            fp = rp.record(x)
            set_precision(q, set(names))
            qi = rp.record(x)
            reused = {id(n.output) for n in fp.nodes if n.usable}
            assert reused, "the record keeps prefix outputs"
            c1 = fp.nodes[fp.tree[(-1, id(q.c1), 0)]]
            assert not c1.usable  # its output was overwritten by the in-place ReLU
            for n, m in zip(names, modules):
                for rec, enabled in ((fp, {n}), (qi, set(names) - {n})):
                    set_precision(q, enabled)
                    got = rp.replay(x, rec, rp.start_of(rec, m))
                    rp._mode = None
                    with torch.no_grad():
                        want = q(x)
                    assert torch.equal(got, want), (n, enabled)
        assert not any("forward" in m.__dict__ for m in q.modules())  # wrappers removed
    finally:
        set_precision(q, set(state.model.layout.int8))


def test_recovery_only_analysis_equals_the_full_one_on_recovery(state):
    """damage=False (the default export's min_int8_share selection) skips half the replays: the recovery
    numbers and the execution order are exactly those of the full analysis, damage is None, and the chart and
    the selection still work."""
    from quantkit.report.plots import sensitivity_bar_chart_bytes
    from quantkit.sensitivity.select import choose_for_int8_share

    full = analyze(state, num_images=8, progress=False)
    part = analyze(state, num_images=8, progress=False, damage=False)
    assert part.int8_sqnr_db == full.int8_sqnr_db
    for n, s in full.layers.items():
        p = part.layers[n]
        assert p.damage_sqnr_db is None and (p.order, p.without_sqnr_db, p.recovery_sqnr_db) == (
            s.order, s.without_sqnr_db, s.recovery_sqnr_db)
    assert part.ranking()[0] == "fragile"  # most recovery first
    assert sensitivity_bar_chart_bytes(part, fp16=["fragile"])[:4] == b"\x89PNG"
    macs = {n: 1.0 for n in part.layers}
    assert choose_for_int8_share(part, macs, 0.5).fp16 == choose_for_int8_share(full, macs, 0.5).fp16
    assert part.as_dict()["layers"][0]["damage_sqnr_db"] is None


def test_fragile_layer_ranked_first_and_numbers_match_plain_measurement(state):
    res = analyze(state, num_images=8, progress=False)
    assert res.ranking()[0] == "fragile"
    frag = res.layers["fragile"]
    others = [s for n, s in res.layers.items() if n != "fragile"]
    assert frag.damage_sqnr_db < min(s.damage_sqnr_db for s in others) - 10
    assert frag.recovery_sqnr_db == max(s.recovery_sqnr_db for s in res.layers.values())
    measure = make_measure(state, Metric.SQNR_DB, num_images=8)  # plain forwards, FP32 model as reference
    names = set(res.layers)
    assert res.int8_sqnr_db == pytest.approx(measure(names), abs=1e-6)
    for n, s in res.layers.items():
        assert s.damage_sqnr_db == pytest.approx(measure({n}), abs=1e-6), n
        assert s.without_sqnr_db == pytest.approx(measure(names - {n}), abs=1e-6), n


def test_selection_keeps_fragile_fp16_and_meets_the_measured_floor(state):
    res = analyze(state, num_images=8, progress=False)
    costs = layer_costs(state.model.fp32, next(state.data.batches(limit=1)), res.layers)
    floor = res.int8_sqnr_db + 0.5 * (res.layers["fragile"].without_sqnr_db - res.int8_sqnr_db)
    measure = make_measure(state, Metric.SQNR_DB, num_images=8)
    sel = choose_fp16_layers(res, costs, sqnr_floor_db=floor, measure=measure)
    assert sel.fp16 == ["fragile"], sel.as_dict()
    assert sel.met and sel.measured >= floor
    assert sel.measured == pytest.approx(measure(set(sel.int8)), abs=1e-9)
    assert sel.estimated_ms["int8"] < sel.estimated_ms["hybrid"] < sel.estimated_ms["fp16"]
    assert "recovers" in sel.reasons["fragile"] and "ms (estimated)" in sel.reasons["fragile"]
    assert "roofline" in sel.as_dict()["estimated_ms_label"]


def test_verification_adds_layers_until_the_measurement_meets_the_budget(state):
    res = analyze(state, num_images=8, progress=False)
    costs = layer_costs(state.model.fp32, next(state.data.batches(limit=1)), res.layers)
    names = set(res.layers)
    # a stricter judge than the prediction: the budget holds only with at least 3 layers in FP16
    sel = choose_fp16_layers(res, costs, max_drop_points=None, sqnr_floor_db=res.int8_sqnr_db + 1.0,
                             measure=lambda int8: 100.0 if len(names - set(int8)) >= 3 else 0.0)
    assert sel.met and len(sel.fp16) >= 3 and sel.measured == 100.0
    counts = [m["num_fp16"] for m in sel.measurements]
    assert counts == sorted(counts) and not sel.measurements[-2]["met"]
    assert set(sel.int8) | set(sel.fp16) == names and not set(sel.int8) & set(sel.fp16)
    with pytest.raises(Exception, match="exactly one budget"):
        choose_fp16_layers(res, costs)
    with pytest.raises(Exception, match="evaluation data"):
        choose_fp16_layers(res, costs, max_drop_points=0.5)


def test_precision_restored_after_success_and_after_an_error(state, monkeypatch):
    q = state.model.qmodel
    set_precision(q, {"c2", "fragile"})
    before = _flags(q)
    analyze(state, num_images=4, progress=False)
    assert _flags(q) == before
    calls = {"n": 0}
    real = analysis.SqnrAccumulator.update

    def failing(self, ref, test):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("boom")
        return real(self, ref, test)

    monkeypatch.setattr(analysis.SqnrAccumulator, "update", failing)
    with pytest.raises(RuntimeError, match="boom"):
        analyze(state, num_images=4, progress=False)
    assert _flags(q) == before
    assert not any("forward" in m.__dict__ for m in q.modules())
    set_precision(q, set(state.model.layout.int8))


def test_as_dict_is_deterministic_and_json_ready(state):
    a = analyze(state, num_images=4, progress=False).as_dict()
    b = analyze(state, num_images=4, progress=False).as_dict()
    assert dumps_json(a) == dumps_json(b)
    assert a["ranking"] == [layer["name"] for layer in a["layers"]]
    assert a["num_images"] == 4 and a["int8_drop_points"] is None


def test_bar_chart_is_deterministic_png(state, tmp_path):
    pytest.importorskip("matplotlib")
    from quantkit.report.plots import sensitivity_bar_chart

    res = analyze(state, num_images=4, progress=False)
    p1, p2 = sensitivity_bar_chart(res, tmp_path / "a.png"), sensitivity_bar_chart(res, tmp_path / "b.png")
    data = p1.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data == p2.read_bytes()


class TinyDetector(nn.Module):
    """Fixed 32 px anchors on a stride-8 grid, offsets and tree scores from two small conv paths: random
    weights, but its boxes overlap real tree crowns often enough for a non-zero mAP."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, stride=4, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.reg = nn.Conv2d(8, 4, 1)
        self.cls = nn.Conv2d(8, 1, 1)

    def forward(self, x):
        f = torch.relu(self.c2(torch.relu(self.c1(x))))
        n, _, h, w = f.shape
        ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        centers = torch.stack([xs, ys], -1).reshape(1, -1, 2).float() * 8 + 4
        anchors = torch.cat([centers - 16, centers + 16], -1)
        boxes = anchors + 4 * torch.tanh(self.reg(f)).flatten(2).transpose(1, 2)
        return boxes, torch.sigmoid(self.cls(f)).flatten(2).transpose(1, 2)


def test_map_sensitivities_match_evaluate_detection(tmp_path):
    from quantkit.eval.detection import evaluate_detection, torch_predictor

    np.save(tmp_path / "calib.npy", _tiles(4, 320).astype(np.float32))
    torch.manual_seed(3)
    recipe = load_recipe(None, ["calibration.method=max", "calibration.use_cache=false",
                                  "ptq.bias_correction=false"])
    st = quantize_recipe(recipe, model=TinyDetector(), calib=str(tmp_path / "calib.npy"), progress=False)
    ds = CocoDataset(BUNDLED_EVAL, max_images=4)
    res = analyze(st, num_images=2, dataset=ds, progress=False)
    ev = st.recipe.evaluation
    fp32 = evaluate_detection(torch_predictor(st.model.fp32), ds, st.pp, conf=ev.conf, iou=ev.iou, progress=False)
    assert fp32.map50_95 > 0.001 and res.fp32_map50_95 == pytest.approx(fp32.map50_95, abs=1e-9)
    measure = make_measure(st, Metric.MAP_DROP_POINTS, dataset=ds)
    assert res.int8_drop_points == pytest.approx(measure(set(res.layers)), abs=1e-6)
    for n, s in res.layers.items():
        assert s.damage_map_points == pytest.approx(measure({n}), abs=1e-6), n
        assert s.recovery_map_points == pytest.approx(res.int8_drop_points - measure(set(res.layers) - {n}),
                                                      abs=1e-6), n
    assert math.isfinite(res.as_dict()["int8_drop_points"])
    costs = layer_costs(st.model.fp32, next(st.data.batches(limit=1))[:1], res.layers)
    budget = res.int8_drop_points / 2
    sel = choose_fp16_layers(res, costs, max_drop_points=budget, measure=measure)
    assert sel.met and sel.measured <= budget and sel.fp16
    assert sel.measured == pytest.approx(measure(set(sel.int8)), abs=1e-9)
    assert "mAP points" in next(iter(sel.reasons.values()))


def test_cli_writes_json_png_and_keeps_the_fragile_layer_fp16(tmp_path):
    import inspect
    import json

    from click.testing import CliRunner

    from quantkit.cli import main

    (tmp_path / "net.py").write_text("import torch\nfrom torch import nn\nfrom quantkit.models.ops import Add\n\n"
                                     + inspect.getsource(Fragile) + "\n\ndef build(num_classes=None):\n"
                                     "    torch.manual_seed(0)\n    return Fragile()\n")
    np.save(tmp_path / "calib.npy", _tiles(8, 32).astype(np.float32))
    args = ["sensitivity", "--model", f"{tmp_path / 'net.py'}:build", "--calib", str(tmp_path / "calib.npy"),
            "--num-images", "8", "--set", "calibration.method=max", "--set", "calibration.use_cache=false",
            "--set", "ptq.bias_correction=false"]
    res = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "a"), "--sqnr-floor", "30"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "a" / "sensitivity.json").read_text())
    assert doc["sensitivity"]["ranking"][0] == "fragile"
    assert "fragile" in doc["selection"]["fp16_layers"] and doc["selection"]["measured"] >= 30
    assert (tmp_path / "a" / "sensitivity.png").read_bytes()[:4] == b"\x89PNG"
    rows = res.output.splitlines()
    header = next(i for i, r in enumerate(rows) if r.lstrip().startswith("#  layer"))
    assert rows[header + 1].split()[1] == "fragile" and "not measured" in res.output
    res2 = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "a")], catch_exceptions=False)
    assert res2.exit_code == 2 and "not empty" in res2.output  # refuses to overwrite without --force


def test_fixed_fp16_layers_stay_fp16_and_count_toward_the_budget(state):
    res = analyze(state, num_images=8, progress=False)
    costs = layer_costs(state.model.fp32, next(state.data.batches(limit=1)), res.layers)
    floor = res.int8_sqnr_db + 0.5 * (res.layers["fragile"].without_sqnr_db - res.int8_sqnr_db)
    sel = choose_fp16_layers(res, costs, sqnr_floor_db=floor, fixed_fp16=["c1", "fragile"])
    assert set(sel.fp16) == {"c1", "fragile"} and "caller" in sel.reasons["c1"]
    assert sel.measured is None and sel.met is None  # nothing measured without a measure callable
    with pytest.raises(Exception, match="not analysed layers"):
        choose_fp16_layers(res, costs, sqnr_floor_db=floor, fixed_fp16=["nope"])
