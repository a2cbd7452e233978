"""Report sections: per-layer INT8 error (against direct computations), histograms (against numpy), FP16
reasons, INT8 MAC share (closed form), deterministic PNG charts, and the --device plumbing on the CPU."""

import math
import struct
import zlib

import numpy as np
import pytest
import torch
from torch import nn

from quantkit.calibrate.driver import apply_calibration, run_calibration
from quantkit.calib_methods import MethodSettings
from quantkit.errors import UsageError
from quantkit.eval.layer_sqnr import measure_layer_errors
from quantkit.sqnr import sqnr_db
from quantkit.quant.insert import insert_quantizers
from quantkit.report.sections import (VisualInputs, add_to_report, build_visual_sections, fp16_reasons,
                                      int8_mac_share)
from quantkit.utils.device import on_device, resolve_device

pytest.importorskip("matplotlib")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.act = nn.ReLU(inplace=True)  # in place: the FP32 output must be copied before it runs
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(self.act(self.conv2(self.act(self.conv1(x)))))


def _quantized(skip=()):
    torch.manual_seed(0)
    fp32 = Net().eval()
    qmodel, layout = insert_quantizers(fp32, ("*",), tuple(skip))
    batches = [torch.randn(4, 3, 16, 16) * 2 for _ in range(2)]
    settings = MethodSettings(method="max")
    calib = run_calibration(qmodel, batches, settings, progress=False)
    chosen = apply_calibration(qmodel, calib, settings)
    return fp32, qmodel, layout, calib, chosen, batches


def test_layer_errors_match_direct_computation():
    fp32, qmodel, layout, calib, chosen, batches = _quantized(skip=["head"])
    amax = chosen["conv1._input_quantizer"]
    res = measure_layer_errors(fp32, qmodel, layout.layers, layout.int8, batches, chosen,
                               hist_upper={"conv1._input_quantizer": amax})
    x = torch.cat(batches)
    with torch.no_grad():
        want_out = sqnr_db(fp32.conv1(x), qmodel.conv1(x))
        scale = torch.tensor(amax / 127)
        want_in = sqnr_db(x, torch.fake_quantize_per_tensor_affine(x, scale, 0, -128, 127))
    rows = {r.name: r for r in res.layers}
    assert res.num_samples == 8
    assert rows["conv1"].output_sqnr_db == pytest.approx(want_out, abs=1e-6) and want_out > 25
    assert rows["conv1"].input_quant_sqnr_db == pytest.approx(want_in, abs=1e-6)
    assert rows["head"].precision == "fp16" and rows["conv1"].precision == "int8"
    counts = np.asarray(res.histograms["conv1._input_quantizer"].counts)
    want_hist, _ = np.histogram(np.minimum(x.abs().numpy(), amax), bins=256, range=(0, amax))
    assert counts.sum() == x.numel() and np.abs(counts - want_hist).sum() <= 0.001 * x.numel()  # edge rounding


def test_fp16_reasons_name_the_pattern_or_the_selection():
    _, _, layout, *_ = _quantized(skip=["head", "conv*2"])
    layout.reasons["conv2"] = "selection: recovers 3.1 dB for 0.002 ms"
    why = fp16_reasons(layout, ("*",), ("head", "conv*2"))
    assert why == {"conv2": "selection: recovers 3.1 dB for 0.002 ms", "head": "recipe: matches quantization.skip 'head'"}
    _, _, layout2, *_ = _quantized()
    layout2.int8 = ["conv1"]  # the caller changed precision without a recorded reason
    assert "no recipe pattern" in fp16_reasons(layout2, ("*",), ())["conv2"]


def test_int8_mac_share_closed_form():
    fp32, _, layout, *_ = _quantized(skip=["head"])
    from quantkit.sensitivity.cost_model import layer_costs

    costs = layer_costs(fp32, torch.zeros(1, 3, 16, 16), layout.layers)
    macs = {"conv1": 8 * 16 * 16 * 3 * 9, "conv2": 8 * 8 * 8 * 8 * 9, "head": 4 * 8 * 8 * 8}
    share = int8_mac_share(costs, layout)
    assert share["total_macs"] == sum(macs.values())
    assert share["int8_macs"] == macs["conv1"] + macs["conv2"]
    assert share["share"] == round((macs["conv1"] + macs["conv2"]) / sum(macs.values()), 4)


def _png_chunks(data: bytes) -> list[bytes]:
    out, i = [], 8
    while i < len(data):
        (n,) = struct.unpack(">I", data[i : i + 4])
        out.append(data[i + 4 : i + 8])
        i += 12 + n
    return out


def test_sections_charts_are_deterministic_pngs_and_fill_the_report():
    fp32, qmodel, layout, calib, chosen, batches = _quantized(skip=["head"])

    def build():
        return build_visual_sections(VisualInputs(fp32=fp32, qmodel=qmodel, layout=layout, calib=calib,
                                                  chosen_amax=chosen, method="max", batches=batches, skip=("head",)))

    a, b = build(), build()
    assert set(a.files) == {"layer_sqnr.png", "calibration.png"} and a.files == b.files and a.report == b.report
    for png in a.files.values():
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        assert not {b"tEXt", b"iTXt", b"zTXt", b"tIME"} & set(_png_chunks(png))  # no software/time metadata
    assert a.report["runtime"]["device"] == "cpu"
    assert [t["layer"] for t in a.report["layer_errors"]["worst_tensors"]][0] in ("conv1", "conv2")
    report = {"layers": [{"name": n, "precision": layout.precision(n)} for n in layout.layers],
              "plots": [{"file": "sensitivity.png", "title": "s"}]}
    add_to_report(report, a)
    assert report["layers"][-1]["why"] == "recipe: matches quantization.skip 'head'"
    assert "why" not in report["layers"][0]
    assert [p["file"] for p in report["plots"]] == ["layer_sqnr.png", "calibration.png", "sensitivity.png"]
    assert 0 < report["int8_mac_share"]["share"] < 1


def test_sensitivity_chart_marks_fp16_and_is_deterministic():
    from quantkit.report.plots import _noise_points, sensitivity_bar_chart_bytes
    from quantkit.sensitivity.analysis import LayerSensitivity, SensitivityResult

    layers = {n: LayerSensitivity(n, "Conv2d", i, d, 30.0, 1.0, m, 0.1)
              for i, (n, d, m) in enumerate([("a", 20.0, 0.5), ("b", 35.0, -0.1), ("c", math.inf, 0.0)])}
    res = SensitivityResult(layers, 18.0, 8, 0.5, 0.45, 4)
    one, two = sensitivity_bar_chart_bytes(res, fp16=["a"]), sensitivity_bar_chart_bytes(res, fp16=["a"])
    assert one == two and one != sensitivity_bar_chart_bytes(res)
    assert _noise_points([0.5, -0.1, 0.0]) == pytest.approx(1.4826 * 0.1)


def test_device_cpu_is_the_default_path_and_cuda_fails_up_front():
    fp32, qmodel, layout, calib, chosen, batches = _quantized()
    settings = MethodSettings(method="entropy")
    again = run_calibration(qmodel, batches, settings, progress=False, device="cpu")
    assert again.tensors == run_calibration(qmodel, batches, settings, progress=False).tensors
    with pytest.raises(UsageError, match="cpu, cuda"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="CUDA is not available"):
            resolve_device("cuda")
        with pytest.raises(UsageError, match="CUDA is not available"):
            run_calibration(qmodel, batches, settings, progress=False, device="cuda")
    with on_device("cpu", qmodel) as dev:
        assert dev.type == "cpu"


def test_recipe_device_is_validated():
    from quantkit.recipe import load_recipe

    assert load_recipe(None, ["runtime.device=cuda:1"]).runtime.device == "cuda:1"
    with pytest.raises(UsageError, match="runtime.device"):
        load_recipe(None, ["runtime.device=gpu"])


def test_cli_device_cuda_without_cuda_exits_2_writing_nothing(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here: the error path cannot be reached")
    from click.testing import CliRunner

    from quantkit.cli import main

    res = CliRunner().invoke(main, ["export", "--device", "cuda", "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "CUDA is not available" in res.output and not (tmp_path / "o").exists()
