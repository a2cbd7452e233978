"""quantkit.ptq: equalization is exact, bias correction recovers a planted shift, learned rounding never loses
to nearest and is what the ONNX int8 initializers hold, range choice minimises the consumer's error."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn
from torch.nn import functional as F

from quantkit.calibrate.driver import apply_calibration, run_calibration
from quantkit.calib_methods import MethodSettings
from quantkit.exporter.onnx_export import export_onnx
from quantkit.exporter.passes import finalize_int8
from quantkit.ptq import ChannelClip, apply_ptq, equalize, equalize_prepared
from quantkit.ptq.adaround import layer_output
from quantkit.ptq.sequential import SequentialOptions, sequential_pass
from quantkit.recipe import PtqSpec, Recipe, load_recipe
from quantkit.quant import prepare
from quantkit.errors import UsageError


class DwNet(nn.Module):
    """stem conv -> ReLU6 -> depthwise -> ReLU -> pointwise -> maxpool -> avgpool -> flatten -> linear."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a1 = nn.ReLU6()
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.a2 = nn.ReLU()
        self.pw = nn.Conv2d(8, 6, 1)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        y = self.pw(self.a2(self.dw(self.a1(self.stem(x)))))
        y = nn.functional.adaptive_avg_pool2d(self.pool(y), 1)
        return self.fc(torch.flatten(y, 1))


def _net(seed=0):
    torch.manual_seed(seed)
    m = DwNet().eval()
    with torch.no_grad():  # very unequal channel ranges, as real BN-folded nets have
        m.stem.weight.mul_(torch.logspace(-2, 1, 8).reshape(8, 1, 1, 1))
        m.dw.weight.mul_(torch.logspace(1, -1, 8).reshape(8, 1, 1, 1))
    return m


def test_equalization_is_exact_and_equalizes_ranges():
    m = _net()
    x = torch.randn(6, 3, 16, 16)
    gm, pairs, notes = equalize(m, [x[:3]])
    kinds = {(p.producer, p.consumer): p.kind for p in pairs}
    assert kinds == {("stem", "dw"): "depthwise", ("dw", "pw"): "dense", ("pw", "fc"): "dense"}
    assert sum(isinstance(mm, ChannelClip) for mm in gm.modules()) == 1  # the ReLU6 became a per-channel clip
    with torch.no_grad():
        a, b = m(x), gm(x)
        rel = float((a - b).norm() / a.norm())
        assert rel <= 1e-5
        # the depthwise consumer's input now has equal per-channel ranges on the equalization data
        seen = {}
        h = gm.dw.register_forward_pre_hook(lambda _m, args: seen.setdefault("x", args[0]))
        gm(x[:3])
        h.remove()
        r = seen["x"].abs().amax(dim=(0, 2, 3))
        r = r[r > 0]  # channels the ReLU6 kept dead on this data stay dead
        assert r.numel() >= 4 and float(r.max() / r.min()) < 1.0 + 1e-4
    assert m.stem.weight.abs().max() > 1.0  # the input model is untouched


def _prepared(model, x, method="max"):
    recipe = Recipe()
    prepared = prepare(model, recipe.quantization)
    settings = MethodSettings(method=method)
    res = run_calibration(prepared.qmodel, [x], settings, progress=False, threads=1)
    apply_calibration(prepared.qmodel, res, settings)
    return prepared, res


class _SamePadConv(nn.Conv2d):
    """A "same"-padding conv subclass with its own forward (EfficientNet ports, timm): the generic wrapper's."""

    def forward(self, x):
        return self._conv_forward(F.pad(x, [1, 1, 1, 1]), self.weight, self.bias)


@pytest.mark.parametrize("layer, x, channel_axis", [
    (nn.Conv2d(3, 4, 3, padding=1), (8, 3, 10, 10), 1),  # NCHW: channels on axis 1
    # a Linear on (N, T, C) tokens (ConvNeXt / transformer MLPs) has its channels on the LAST axis; 320 samples per
    # output feature, 32 features (a size different from T and C)
    (nn.Linear(8, 32), (4, 80, 8), 2),
    # the layers the registry wraps beyond Conv2d / Linear: bias correction skipped them all before (EfficientNet-
    # Lite0 as its package ships it: 45 of its convs were never corrected)
    (_SamePadConv(3, 4, 3), (8, 3, 10, 10), 1),
    (nn.Conv1d(2, 5, 3, padding=1), (8, 2, 40), 1),
    (nn.ConvTranspose2d(3, 4, 2, stride=2), (8, 3, 6, 6), 1),
], ids=["conv", "linear_on_tokens", "conv_subclass", "conv1d", "conv_transpose"])
def test_bias_correction_recovers_a_planted_mean_shift_exactly(layer, x, channel_axis):
    torch.manual_seed(1)
    layer.reset_parameters()
    model = nn.Sequential(layer).eval()
    x = torch.randn(*x)
    channels = layer.bias.shape[0]
    shift = torch.linspace(-1.0, 2.0, channels)
    others = tuple(d for d in range(x.dim()) if d != channel_axis)
    biases = []
    for plant in (False, True):
        prepared, res = _prepared(model, x)
        q = prepared.qmodel.get_submodule("0")
        if plant:
            q.bias.data.add_(shift)
        rep = sequential_pass(prepared.qmodel, prepared.fp32, x, res, SequentialOptions(bias_correction=True))
        assert rep["0"].bias_shift_abs_mean is not None
        biases.append(q.bias.detach().clone())
        with torch.no_grad():  # the quantized layer's channel means now equal FP32's on the data
            dq = prepared.qmodel(x).mean(dim=others) - prepared.fp32(x).mean(dim=others)
        assert float(dq.abs().max()) < 1e-5
    torch.testing.assert_close(biases[1], biases[0], atol=1e-6, rtol=0)  # the planted shift is fully removed


def test_learned_rounding_never_worse_and_exported_int8_weights_are_the_learned_ones():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 5, 1)).eval()
    x = torch.randn(6, 4, 8, 8)
    prepared, res = _prepared(model, x)
    before = {n: prepared.qmodel.get_submodule(n).weight.detach().clone() for n in ("0", "2")}
    seen = {}
    hooks = [prepared.qmodel.get_submodule(n).register_forward_pre_hook(
        lambda m, a, n=n: seen.setdefault(n, a[0].detach().clone())) for n in ("0", "2")]
    rep = sequential_pass(prepared.qmodel, prepared.fp32, x, res,
                          SequentialOptions(adaround=True, adaround_iterations=60, adaround_batch=4))
    for h in hooks:
        h.remove()
    flipped = 0
    for n in ("0", "2"):
        m = prepared.qmodel.get_submodule(n)
        s = m._weight_quantizer.amax / 127
        q_near = torch.clamp(torch.round(before[n] / s), -128, 127)
        q_new = torch.round(m.weight / s)
        torch.testing.assert_close(m.weight, q_new * s, atol=1e-7, rtol=0)  # an exact integer grid point
        xq = m._input_quantizer(seen[n])
        target = layer_output(m, seen[n], before[n])
        m.weight.requires_grad_(False)
        e_near = float(((layer_output(m, xq, q_near * s) - target) ** 2).sum())
        e_new = float(((layer_output(m, xq, q_new * s) - target) ** 2).sum())
        assert e_new <= e_near * (1 + 1e-6)
        assert rep[n].rounding is not None and rep[n].rounding.err_learned <= rep[n].rounding.err_nearest
        flipped += int((q_new != q_near).sum())
    assert flipped > 0  # it learned something (otherwise the export check below would prove nothing)
    onnx_model = finalize_int8(export_onnx(prepared.qmodel, x[:1], opset=17))
    inits = {t.name: numpy_helper.to_array(t) for t in onnx_model.graph.initializer
             if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 4}  # the weights, not zero points
    learned = sorted(torch.round(prepared.qmodel.get_submodule(n).weight /
                                 (prepared.qmodel.get_submodule(n)._weight_quantizer.amax / 127)).to(torch.int8)
                     .numpy().tobytes() for n in ("0", "2"))
    assert sorted(a.tobytes() for a in inits.values()) == learned


def test_range_choice_minimises_the_consumer_error_not_the_tensor_error():
    torch.manual_seed(3)
    # channel 0 carries one huge outlier the consumer ignores; channel 1 small values the consumer reads. The
    # tensor's own error wants the outlier kept (amax ~ max); the consumer's wants it clipped (a percentile).
    conv = nn.Conv2d(2, 1, 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[[[0.0]], [[1.0]]]]))
    model = nn.Sequential(conv).eval()
    x = torch.randn(16, 2, 8, 8) * 0.05
    x[3, 0, 2, 2] = 1000.0
    prepared, res = _prepared(model, x)
    q = prepared.qmodel.get_submodule("0")._input_quantizer
    own_best = min(res.tensors[q.name].values(),
                   key=lambda a: float(((torch.fake_quantize_per_tensor_affine(x, a / 127, 0, -128, 127) - x) ** 2).sum()))
    rep = sequential_pass(prepared.qmodel, prepared.fp32, x, res, SequentialOptions(range_choice=True,
                                                                                    range_choice_images=16))
    chosen = float(q.amax)
    assert chosen < own_best / 4  # clipping channel 0 costs the consumer nothing
    m = prepared.qmodel.get_submodule("0")
    err = lambda a: float(((layer_output(m, torch.fake_quantize_per_tensor_affine(x, a / 127, 0, -128, 127),
                                         m._weight_quantizer(m.weight)) - layer_output(m, x, m.weight)) ** 2).sum())
    assert all(err(chosen) <= err(a) * (1 + 1e-6) for a in res.tensors[q.name].values())
    assert rep["0"].consumer_err_after <= rep["0"].consumer_err_before


def test_apply_ptq_end_to_end_keeps_qdq_structure():
    m = _net(4)
    x = torch.randn(8, 3, 16, 16)
    spec = PtqSpec(equalize=True, range_choice=True, bias_correction=True, adaround=True, adaround_iterations=20,
                   num_images=8)
    recipe = Recipe()
    plain = finalize_int8(export_onnx(_prepared(m, x)[0].qmodel, x[:1], opset=17))
    prepared = prepare(m, recipe.quantization)
    prepared, rep = equalize_prepared(prepared, [x], spec, recipe.quantization)
    settings = MethodSettings(method="entropy")
    res = run_calibration(prepared.qmodel, [x], settings, progress=False, threads=1)
    apply_calibration(prepared.qmodel, res, settings)
    rep = apply_ptq(prepared, res, [x], spec, rep)
    d = rep.as_dict()
    assert len(d["equalized_pairs"]) == 3 and d["rounding_layers"] == 4 and rep.amax
    out = finalize_int8(export_onnx(prepared.qmodel, x[:1], opset=17))
    count = lambda g, op: sum(n.op_type == op for n in g.graph.node)
    for op in ("QuantizeLinear", "DequantizeLinear", "Conv", "Gemm"):
        assert count(out, op) == count(plain, op)


def test_recipe_ptq_fields_validate():
    r = load_recipe(None, ["ptq.adaround=true", "sensitivity.min_int8_share=0.95"])
    assert r.ptq.adaround and r.sensitivity.min_int8_share == 0.95
    with pytest.raises(UsageError):
        load_recipe(None, ["sensitivity.min_int8_share=1.5"])
    with pytest.raises(UsageError):
        load_recipe(None, ["ptq.num_images=0"])
    p = Recipe().ptq  # the default (issue 14): bias correction on; equalization, range choice, rounding off
    assert p.bias_correction and not any((p.equalize, p.range_choice, p.adaround))


def test_int8_share_selection_respects_the_mac_budget_and_ranks_by_gain_per_mac():
    import math

    from quantkit.sensitivity.analysis import LayerSensitivity, SensitivityResult
    from quantkit.sensitivity.select import choose_for_int8_share

    def layer(name, order, without_db):  # all-INT8 SQNR is 10 dB; FP16 on this layer alone gives without_db
        return LayerSensitivity(name, "Conv2d", order, 30.0, without_db, without_db - 10.0)

    # gains (noise power recovered): big 0.05, mid 0.04, small 0.02, none 0
    res = SensitivityResult({"big": layer("big", 0, -10 * math.log10(0.05)),
                             "mid": layer("mid", 1, -10 * math.log10(0.06)),
                             "small": layer("small", 2, -10 * math.log10(0.08)),
                             "none": layer("none", 3, 10.0)}, 10.0, 4)
    macs = {"big": 50.0, "mid": 4.0, "small": 1.0, "none": 45.0}
    sel = choose_for_int8_share(res, macs, 0.95)  # 5 MACs of FP16 allowed: "big" (50) never fits
    assert sel.fp16 == ["small", "mid"] and sel.int8_share == pytest.approx(0.95)
    assert [p["num_fp16"] for p in sel.curve] == [0, 1, 2]
    assert sel.predicted_db == pytest.approx(-10 * math.log10(0.1 - 0.02 - 0.04))
    assert choose_for_int8_share(res, macs, 1.0).fp16 == []
    assert choose_for_int8_share(res, macs, 0.0).fp16 == ["small", "mid", "big"]  # "none" gains nothing
    measured = choose_for_int8_share(res, macs, 0.95, measure=lambda int8: float(len(int8)))
    assert [p["measured_sqnr_db"] for p in measured.curve] == [4.0, 3.0, 2.0]
    with pytest.raises(UsageError):
        choose_for_int8_share(res, macs, 1.2)


def test_bias_correction_leaves_layers_with_too_few_samples_alone():
    from quantkit.ptq.sequential import BIAS_MIN_SAMPLES

    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(4, 3)).eval()
    x = torch.randn(BIAS_MIN_SAMPLES - 1, 4)  # one value per sample and channel: below the minimum
    prepared, res = _prepared(model, x)
    before = prepared.qmodel.get_submodule("0").bias.detach().clone()
    rep = sequential_pass(prepared.qmodel, prepared.fp32, x, res, SequentialOptions(bias_correction=True))
    assert torch.equal(prepared.qmodel.get_submodule("0").bias, before) and rep["0"].bias_shift_abs_mean is None


def test_pipeline_runs_the_passes_only_when_the_recipe_asks(tmp_path):
    from quantkit.pipeline import quantize_recipe
    from quantkit.recipe import apply_overrides

    torch.manual_seed(6)
    npy = tmp_path / "calib.npy"
    np.save(npy, torch.randn(8, 3, 32, 32).numpy())
    base = load_recipe(None, ["calibration.use_cache=false", "ptq.num_images=4", "ptq.bias_correction=false"])
    plain = quantize_recipe(base, model=_net(7), calib=str(npy), progress=False)
    assert not plain.ptq.layers and not plain.ptq.pairs
    on = apply_overrides(base, ["ptq.equalize=true", "ptq.bias_correction=true", "ptq.range_choice=true"])
    state = quantize_recipe(on, model=_net(7), calib=str(npy), progress=False)
    assert state.ptq.pairs and state.ptq.layers and state.ptq.amax
    assert set(state.calibration.chosen_amax) == set(plain.calibration.chosen_amax)



def test_an_accuracy_budget_wins_over_the_default_int8_share():
    """The default recipe selects FP16 layers under min_int8_share 0.95; a user's accuracy budget replaces that
    budget (max_drop only with evaluation data), and null turns the default selection off."""
    from quantkit.recipe import apply_overrides
    from quantkit.sensitivity.run import budget_of

    base = load_recipe(None)
    assert base.sensitivity.min_int8_share == 0.95 and base.ptq.bias_correction
    assert budget_of(base, has_eval=False) == ("min_int8_share", 0.95)
    floor = apply_overrides(base, ["sensitivity.sqnr_floor=20"])
    assert budget_of(floor, has_eval=True) == ("sqnr_floor", 20.0)
    drop = apply_overrides(base, ["gates.max_drop=0.3"])
    assert budget_of(drop, has_eval=True) == ("max_drop", 0.3)
    assert budget_of(drop, has_eval=False) == ("min_int8_share", 0.95)  # no labels: the drop can only gate
    assert budget_of(apply_overrides(base, ["sensitivity.min_int8_share=null"]), has_eval=False) is None


def test_min_int8_share_selection_runs_in_the_pipeline(tmp_path):
    from quantkit.pipeline import quantize_recipe
    from quantkit.sensitivity import analyze_and_select

    torch.manual_seed(8)
    npy = tmp_path / "calib.npy"
    np.save(npy, torch.randn(4, 3, 32, 32).numpy())
    recipe = load_recipe(None, ["calibration.use_cache=false", "sensitivity.min_int8_share=0.9",
                                "sensitivity.num_images=4"])
    state = quantize_recipe(recipe, model=_net(9), calib=str(npy), progress=False, post_ptq=False)
    section = analyze_and_select(state, progress=False).section
    sel = section["selection"]
    assert sel["int8_mac_share"] >= 0.9 and set(sel["fp16_layers"]) | set(sel["int8_layers"]) == set(
        state.model.layout.layers)
    assert state.model.layout.int8 == sel["int8_layers"]


def _deep_bn_stack(seed: int, depth: int = 8, width: int = 16) -> nn.Module:
    """conv -> BN -> ReLU, ``depth`` times, then a 1x1 conv head; BN statistics seeded away from identity."""
    torch.manual_seed(seed)
    layers, cin = [], 3
    for _ in range(depth):
        layers += [nn.Conv2d(cin, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
        cin = width
    m = nn.Sequential(*layers, nn.Conv2d(width, 4, 1))
    for bn in (b for b in m.modules() if isinstance(b, nn.BatchNorm2d)):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.3, 0.3)
    return m.eval()


def test_bias_corrections_are_measured_layer_after_layer_not_all_at_once():
    """Issue 23: on a deep stack each layer's correction must be measured with the layers before it already
    corrected. Oracle: after the pass, every corrected layer's quantized per-channel output mean equals FP32's on
    the same images (to float rounding), at every depth. The all-at-once variant (every shift measured in one
    uncorrected forward, then all subtracted) double-counts the upstream error that upstream corrections already
    remove: its deep layers keep a mean error of the uncorrected size, and its output SQNR is lower."""
    from copy import deepcopy

    from quantkit.sqnr import sqnr_db
    from quantkit.ptq.sequential import fp32_channel_means
    from quantkit.quant.modules import QuantConv2d

    torch.manual_seed(3)
    x, held_out = torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16)
    base, res = _prepared(_deep_bn_stack(1), x)
    names = [n for n, m in base.qmodel.named_modules() if isinstance(m, QuantConv2d)]
    fp = fp32_channel_means(base.fp32, names, x)
    plain = fp32_channel_means(base.qmodel, names, x)

    seq = deepcopy(base)
    sequential_pass(seq.qmodel, seq.fp32, x, res, SequentialOptions(bias_correction=True))
    at_once = deepcopy(base)
    for n in names:
        at_once.qmodel.get_submodule(n).bias.data.sub_((plain[n] - fp[n]).float())

    def mean_err(p):
        q = fp32_channel_means(p.qmodel, names, x)
        return [float((q[n] - fp[n]).abs().max()) for n in names]

    uncorrected, sequential, all_at_once = mean_err(base), mean_err(seq), mean_err(at_once)
    assert max(sequential) < 1e-6 < min(uncorrected[1:])  # every depth matches FP32
    assert all(a > 100 * s for a, s in zip(all_at_once[2:], sequential[2:]))  # deep layers stay off
    with torch.no_grad():
        ref = base.fp32(held_out)
        db = {k: sqnr_db(ref, p.qmodel(held_out)) for k, p in (("seq", seq), ("once", at_once), ("none", base))}
    assert db["seq"] > db["once"] + 0.5 and db["seq"] > db["none"]


def test_range_choice_and_rounding_say_which_layers_they_skip():
    """Range choice and learned rounding take Conv2d / Linear only: another wrapped layer is bias-corrected and
    the report says why nothing else ran (not silently)."""
    torch.manual_seed(3)
    model = nn.Sequential(_SamePadConv(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1)).eval()
    x = torch.randn(8, 3, 10, 10)
    prepared, res = _prepared(model, x)
    rep = sequential_pass(prepared.qmodel, prepared.fp32, x, res,
                          SequentialOptions(range_choice=True, bias_correction=True))
    assert "only bias correction applies" in rep["0"].as_dict()["note"] and rep["0"].bias_shift_abs_mean is not None
    assert "note" not in rep["2"].as_dict() and rep["2"].amax_source is not None
