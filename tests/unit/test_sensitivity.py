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
from quantkit.sensitivity.analysis import Metric, Replayer, analyze
from quantkit.sensitivity.measure import make_measure
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


class Sliced(nn.Module):
    """torchvision's vgg*_bn cut into slices as CRAFT (easyocr) does: a slice ends at a conv, the next starts with
    ``ReLU(inplace=True)`` on it, and the first slice's output is also kept as a skip, so the skip is post-ReLU
    through the in-place op."""

    def __init__(self):
        super().__init__()
        self.s1 = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1))
        self.s2 = nn.Sequential(nn.ReLU(inplace=True), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(inplace=True))
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        h = self.s1(x)
        skip = h
        h = self.s2(h)
        return self.head(torch.cat([h, skip], 1))


def test_replay_keeps_in_place_effects_on_recomputed_skips(tmp_path):
    """Oracle: the plain forward with the same precisions. Reusing the cached in-place ReLU at the start of s2
    lost its effect on the recomputed s1 output (the skip), so replays from s2.1 read a pre-ReLU skip: on CRAFT
    one VGG conv kept float 'cost' 20 dB and the FP16 choice kept layers that lowered the check SQNR 8 dB."""
    np.save(tmp_path / "calib.npy", _tiles(8, 32).astype(np.float32))
    torch.manual_seed(0)
    recipe = load_recipe(None, ["calibration.method=max", "calibration.use_cache=false", "ptq.bias_correction=false"])
    st = quantize_recipe(recipe, model=Sliced().eval(), calib=str(tmp_path / "calib.npy"), progress=False)
    q, names = st.model.qmodel, list(st.model.layout.layers)
    x = next(st.data.batches(limit=4))
    modules = [q.get_submodule(n) for n in names]
    with Replayer(q, modules) as rp:
        set_precision(q, set(names))
        rec = rp.record(x)
        for n, m in zip(names, modules):
            set_precision(q, set(names) - {n})
            got = rp.replay(x, rec, rp.start_of(rec, m))
            rp._mode = None
            with torch.no_grad():
                want = q(x)
            assert torch.equal(got, want), n


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


# ---- the bounded FP16 choice: candidate cap, minimum recovery, the Add fusion charge (issue 23) -------------


def _result(recoveries: dict[str, float], types: dict[str, str] | None = None, base_db: float = 20.0):
    """A recovery-only SensitivityResult with the given per-layer recoveries (dB) over a ``base_db`` all-INT8 SQNR."""
    from quantkit.sensitivity.analysis import LayerSensitivity, SensitivityResult

    layers = {n: LayerSensitivity(n, (types or {}).get(n, "Conv2d"), i, None, base_db + r, r)
              for i, (n, r) in enumerate(recoveries.items())}
    return SensitivityResult(layers, base_db, 8)


def test_pick_candidates_ranks_by_estimated_gain_per_mac_caps_and_skips_what_cannot_fit():
    from quantkit.sensitivity.candidates import Signal, pick_candidates

    gain = {"a": 1e-1, "b": 1e-2, "c": 1e-3, "d": 1e-1, "e": 0.0, "f": 1.0, "g": -1.0}
    sig = {n: Signal(30.0, v) for n, v in gain.items()}
    cost = {"a": 40.0, "b": 1.0, "c": 0.0, "d": 60.0, "e": 1.0, "f": 1.0, "g": 1.0}
    # per unit cost: b 1e-2, a 2.5e-3, c 1e-3 (cost floored at 1); d (1.7e-3) does not fit a budget of 50;
    # e and g are estimated to gain nothing; f is already FP16
    assert pick_candidates(sig, cost, 50.0, cap=16, exclude=["f"]) == ["b", "a", "c"]
    assert pick_candidates(sig, cost, 50.0, cap=2, exclude=["f"]) == ["b", "a"]
    assert pick_candidates(sig, cost, 100.0, cap=16, exclude=["f"]) == ["b", "a", "d", "c"]
    assert pick_candidates(sig, cost, 50.0, cap=0) == []
    two = {"y": Signal(0.0, 1.0), "x": Signal(0.0, 1.0)}
    assert pick_candidates(two, {"x": 1.0, "y": 1.0}, 5.0, cap=1) == ["x"]  # ties by name
    with pytest.raises(ValueError, match="cap"):
        pick_candidates(sig, cost, 50.0, cap=-1)


def _with_precision(q, int8, fn):
    saved = _flags(q)
    try:
        set_precision(q, set(int8))
        with torch.no_grad():
            return fn()
    finally:
        for (_, m), (_, d) in zip(((n, m) for n, m in q.named_modules() if isinstance(m, TensorQuantizer)), saved):
            m._disabled = d


def test_one_pass_signals_match_plain_forwards_and_flag_the_fragile_layer(state):
    from quantkit.sensitivity.candidates import one_pass_signals

    q, names = state.model.qmodel, set(state.model.layout.layers)
    before = _flags(q)
    sig = one_pass_signals(state, num_images=8)
    assert _flags(q) == before and all(p.requires_grad for p in q.parameters())  # state restored
    assert min(sig, key=lambda n: sig[n].local_sqnr_db) == "fragile" == max(sig, key=lambda n: sig[n].gain)
    xs = torch.cat([b for b in state.data.batches(limit=8, spread=True)])
    # local SQNR of the first conv: its input is the image in any configuration, so it is the INT8 conv against
    # the float conv on the same images
    c1 = q.get_submodule("c1")
    yq, yf = _with_precision(q, {"c1"}, lambda: c1(xs)), _with_precision(q, set(), lambda: c1(xs))
    want = 10 * math.log10(float((yf.double() ** 2).sum()) / float(((yf - yq).double() ** 2).sum()))
    assert sig["c1"].local_sqnr_db == pytest.approx(want, abs=1e-3)
    # gain of the last layer: the gradient of |e|^2/2P at the model's output is e/P, and the error it injects is
    # the all-INT8 output minus the output with only it float: gain = <e, delta> / P from three plain forwards
    with torch.no_grad():
        ref = state.model.fp32(xs).double()
    all8 = _with_precision(q, names, lambda: q(xs)).double()
    no_out = _with_precision(q, names - {"out"}, lambda: q(xs)).double()
    want = float(((all8 - ref) * (all8 - no_out)).sum() / (ref ** 2).sum())
    assert sig["out"].gain == pytest.approx(want, rel=1e-3)


def test_capped_analysis_replays_only_the_candidates_with_the_full_analysis_numbers(state):
    from quantkit.sensitivity.select import choose_for_int8_share

    full = analyze(state, num_images=8, progress=False, damage=False)
    part = analyze(state, num_images=8, progress=False, damage=False, replay=["fragile", "c2"])
    for n in ("fragile", "c2"):
        assert part.layers[n].replayed and part.layers[n].recovery_sqnr_db == full.layers[n].recovery_sqnr_db
    for n in set(full.layers) - {"fragile", "c2"}:
        s = part.layers[n]
        assert not s.replayed and s.recovery_sqnr_db == 0.0 and s.order == full.layers[n].order
    assert part.ranking()[:2] == ["fragile", "c2"]  # replayed layers first, by recovery
    assert any("2 of" in note for note in part.notes)
    macs = {n: 1.0 for n in part.layers}
    sel = choose_for_int8_share(part, macs, 0.0, min_recovery_db=0.0)  # unlimited budget: only what was replayed
    assert set(sel.fp16) <= {"fragile", "c2"} and "fragile" in sel.fp16
    assert sel.as_dict()["candidates"] == [n for n in part.layers if n in ("fragile", "c2")]
    with pytest.raises(Exception, match="not quantizable layers"):
        analyze(state, num_images=4, progress=False, damage=False, replay=["nope"])


def test_a_layer_stays_fp16_only_above_the_minimum_recovery():
    from quantkit.sensitivity.select import MIN_RECOVERY_DB, choose_for_int8_share

    assert MIN_RECOVERY_DB == 0.05
    res = _result({"small": 0.04, "enough": 0.06, "big": 3.0, "worse": -0.5, "other": 0.0})
    macs = {n: 1.0 for n in res.layers}  # share 0: room for every layer, so only the minimum decides
    sel = choose_for_int8_share(res, macs, 0.0)
    assert sel.fp16 == ["big", "enough"]  # best gain per MAC first; 0.04 dB is under the minimum
    assert sel.min_recovery_db == 0.05 and sel.as_dict()["min_recovery_db"] == 0.05
    assert choose_for_int8_share(res, macs, 0.0, min_recovery_db=0.0).fp16 == ["big", "enough", "small"]
    assert choose_for_int8_share(res, macs, 0.0, min_recovery_db=1.0).fp16 == ["big"]


def test_an_fp16_add_is_charged_for_the_conv_add_fusion_it_breaks():
    from quantkit.sensitivity.cost_model import T4, Precision, estimate_latency_ms, layer_costs, mac_equivalents
    from quantkit.sensitivity.select import choose_for_int8_share, weighted_macs

    class Res(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(128, 128, 3, padding=1)
            self.add = Add()

        def forward(self, x):
            return self.add(self.conv(x), x)

    table = layer_costs(Res().eval(), torch.zeros(1, 128, 8, 8), ["conv", "add"])
    e = 128 * 8 * 8  # output elements of the add
    add = table.layers["add"]
    # INT8: fused into the conv's epilogue, reads the skip operand only (1 B); FP16: its own kernel, reads both
    # operands and writes the output (2 B each); memory-bound at 320 GB/s x 0.30
    assert add.bytes(Precision.INT8) == e and add.bytes(Precision.FP16) == 2 * 3 * e
    extra_ms = 1e3 * (6 * e - e) / (320e9 * 0.30)
    assert add.fp16_extra_ms() == pytest.approx(extra_ms, rel=1e-12)
    assert estimate_latency_ms(table, ["conv"]) - estimate_latency_ms(table, ["conv", "add"]) == pytest.approx(
        extra_ms, rel=1e-9)
    per_mac_ms = 1e3 * 2 * (1 / 65e12 - 1 / 130e12) / 0.30  # a compute-bound conv MAC moved to FP16
    assert T4.fp16_extra_ms_per_mac() == pytest.approx(per_mac_ms, rel=1e-12)
    charge = mac_equivalents(table)
    assert set(charge) == {"add"} and charge["add"] == pytest.approx(extra_ms / per_mac_ms, rel=1e-9)
    assert charge["add"] == pytest.approx(1015.625 * e, rel=1e-9)  # 5 B/elt at 96 GB/s vs 19.5 T MAC/s

    # the MAC-share budget: the add recovers the most, but its charge (0.88x the conv's MACs) does not fit a 10 %
    # budget; uncharged it would be "free"
    macs = weighted_macs(table)
    assert set(macs) == {"conv"}
    res = _result({"conv": 0.5, "add": 6.0}, {"add": "Add"})
    assert charge["add"] == pytest.approx(1015.625 / (128 * 9) * macs["conv"], rel=1e-9)
    assert choose_for_int8_share(res, macs, 0.9).fp16 == ["add"]  # uncharged: free
    assert choose_for_int8_share(res, macs, 0.9, charges=charge).fp16 == []
    roomy = 1.0 - 1.01 * charge["add"] / macs["conv"]
    sel = choose_for_int8_share(res, macs, roomy, charges=charge)
    assert sel.fp16 == ["add"] and sel.int8_share == 1.0  # the reported share counts conv MACs only
    assert "fusion" in sel.reasons["add"]


def test_without_a_gradient_the_signal_falls_back_to_each_layers_local_noise(state, monkeypatch, caplog):
    from quantkit.sensitivity.candidates import one_pass_signals

    def no_derivative(*_a, **_k):
        raise RuntimeError("derivative for aten::something is not implemented")

    monkeypatch.setattr(torch.Tensor, "backward", no_derivative)
    q = state.model.qmodel
    before = _flags(q)
    sig = one_pass_signals(state, num_images=4)
    assert _flags(q) == before and all(p.requires_grad for p in q.parameters())
    assert "local INT8 error" in caplog.text
    for s in sig.values():  # the gain is the local noise-to-signal ratio, 10^(-dB/10)
        assert s.gain == pytest.approx(10 ** (-s.local_sqnr_db / 10), rel=1e-9) if math.isfinite(s.local_sqnr_db) \
            else s.gain == 0.0
    assert max(sig, key=lambda n: sig[n].gain) == "fragile"
