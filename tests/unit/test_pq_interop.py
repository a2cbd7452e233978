"""Model-level interop with pytorch-quantization 2.1.3, the design card's package, used as the oracle.

(a) pq calibrates a small CNN (dense, depthwise and pointwise convs, a linear) on the shipped tree tiles with its
    own HistogramCalibrator (activations) and MaxCalibrator (per-channel weights); its state loads into quantkit's
    quantized copy, quantkit exports Q/DQ ONNX, and every ONNX scale equals pq's amax / 127 in float32, bit for
    bit; onnxruntime's output matches pq's torch output.
(b) quantkit calibrates; its state loads into pq modules, whose forward matches quantkit's fake-quant forward.
Plus the helpers' error paths: unmatched keys are listed, bad amaxes refused.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from quantkit.calibrate.driver import apply_calibration, run_calibration
from quantkit.calib_methods import CalibMethod, MethodSettings
from quantkit.data.images import list_images, load_image
from quantkit.data.preprocess import Preprocess, preprocess_image
from quantkit.errors import CalibrationError, WeightsError
from quantkit.exporter.onnx_export import export_onnx
from quantkit.exporter.passes import finalize_int8
from quantkit.quant.insert import insert_quantizers
from quantkit.quant.pq_interop import load_into_pq, load_pq_state, to_pq_state

pq_nn = pytest.importorskip("pytorch_quantization.nn", reason="pytorch-quantization is the oracle")
from pytorch_quantization.tensor_quant import QuantDescriptor  # noqa: E402

ort = pytest.importorskip("onnxruntime")

TILES = Path(__file__).resolve().parents[2] / "calibration" / "trees"
SIZE = 96  # px; the tiles are 320x320, downscaled to keep the test fast
LAYERS = ("stem", "dw", "pw", "down", "fc")


class SmallNet(nn.Module):
    """Dense 3x3 stride 2, depthwise 3x3, pointwise 1x1, dense 3x3 stride 2, global pool, linear."""

    def __init__(self, conv=nn.Conv2d, linear=nn.Linear):
        super().__init__()
        self.stem = conv(3, 16, 3, stride=2, padding=1)
        self.dw = conv(16, 16, 3, padding=1, groups=16)
        self.pw = conv(16, 32, 1)
        self.down = conv(32, 32, 3, stride=2, padding=1)
        self.fc = linear(32, 10)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(self.dw(x))
        x = nn.functional.hardswish(self.pw(x))  # signed activations into `down`
        x = torch.relu(self.down(x))
        return self.fc(x.mean(dim=(2, 3)))


def _pq_net() -> SmallNet:
    act = QuantDescriptor(num_bits=8, calib_method="histogram")
    w = QuantDescriptor(num_bits=8, axis=(0,), calib_method="max")

    def conv(*a, **k):
        return pq_nn.QuantConv2d(*a, quant_desc_input=act, quant_desc_weight=w, **k)

    def linear(*a, **k):
        return pq_nn.QuantLinear(*a, quant_desc_input=act, quant_desc_weight=w, **k)

    return SmallNet(conv, linear)


def _pq_quantizers(model: nn.Module):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, pq_nn.TensorQuantizer)]


@pytest.fixture(scope="module")
def images() -> list[torch.Tensor]:
    files = list_images(TILES)[:16]
    assert len(files) == 16, "the shipped calibration tiles are missing"
    pp = Preprocess(size=(SIZE, SIZE))
    arr = np.stack([preprocess_image(load_image(f), pp)[0] for f in files])
    return list(torch.from_numpy(arr).split(4))


@pytest.fixture(scope="module")
def float_model() -> SmallNet:
    torch.manual_seed(0)
    return SmallNet().eval()


def _sqnr_db(ref: np.ndarray, test: np.ndarray) -> float:
    ref, test = np.asarray(ref, np.float64), np.asarray(test, np.float64)
    noise = ((ref - test) ** 2).sum()
    return math.inf if noise == 0 else 10 * math.log10((ref**2).sum() / noise)


@pytest.fixture(scope="module")
def pq_calibrated(float_model, images) -> SmallNet:
    """pq's documented PTQ flow: calib mode, forward over the data, load_calib_amax, quant mode."""
    pq = _pq_net()
    pq.load_state_dict(float_model.state_dict(), strict=True)
    pq.eval()
    for _, q in _pq_quantizers(pq):
        q.disable_quant()
        q.enable_calib()
    with torch.no_grad():
        for batch in images:
            pq(batch)
    for name, q in _pq_quantizers(pq):
        if name.endswith("_weight_quantizer"):
            q.load_calib_amax()
        else:
            q.load_calib_amax("percentile", percentile=99.9)
        q.disable_calib()
        q.enable_quant()
    return pq


def _onnx_scales(model: onnx.ModelProto) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Conv/Gemm node name -> (input scale, weight scale), read from the DequantizeLinear feeding each."""
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    out = {}
    for node in model.graph.node:
        if node.op_type not in ("Conv", "Gemm"):
            continue
        dq_x, dq_w = producer[node.input[0]], producer[node.input[1]]
        assert dq_x.op_type == dq_w.op_type == "DequantizeLinear", node.name
        assert inits[dq_w.input[0]].dtype == np.int8  # weights folded to int8 by finalize_int8
        out[node.name] = (inits[dq_x.input[1]], inits[dq_w.input[1]])
    return out


def test_pq_state_exports_with_pq_scales_and_matches_pq(float_model, pq_calibrated, images):
    qmodel, _ = insert_quantizers(float_model)
    state = pq_calibrated.state_dict()
    amax_keys = [k for k in state if k.endswith("._amax")]
    assert len(amax_keys) == 2 * len(LAYERS)
    report = load_pq_state(qmodel, state)
    assert report.complete and report.loaded_amax == sorted(amax_keys)

    example = images[0][:1]
    model = finalize_int8(export_onnx(qmodel, example))
    scales = _onnx_scales(model)
    assert len(scales) == len(LAYERS)
    for layer in LAYERS:
        node = next(n for n in scales if n.startswith(f"/{layer}/"))
        x_scale, w_scale = scales[node]
        pq_x = state[f"{layer}._input_quantizer._amax"].numpy().astype(np.float32)
        pq_w = state[f"{layer}._weight_quantizer._amax"].numpy().astype(np.float32).reshape(-1)
        assert x_scale.dtype == w_scale.dtype == np.float32
        np.testing.assert_array_equal(x_scale.reshape(()), pq_x / np.float32(127), err_msg=layer)
        np.testing.assert_array_equal(w_scale.reshape(-1), pq_w / np.float32(127), err_msg=layer)

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    batch = images[1]
    # the exported graph has a fixed batch of 1: feed images one at a time
    got = np.concatenate([sess.run(None, {"images": x[None].numpy()})[0] for x in batch])
    with torch.no_grad():
        ref_pq = pq_calibrated(batch).numpy()
        ref_fp32 = float_model(batch).numpy()
    sqnr = _sqnr_db(ref_pq, got)
    assert sqnr >= 60.0, sqnr  # measured ~147 dB: same int8 grid, float rounding only (issue 7 asks >= 40)
    # quantization is active, so the match above is not FP32 meeting FP32: pq's int8 output is far from FP32
    # (~55 dB here) compared with how close onnxruntime is to pq
    assert _sqnr_db(ref_fp32, ref_pq) < sqnr - 30.0


def test_quantkit_state_loads_into_pq_and_forward_matches(float_model, images):
    qmodel, layout = insert_quantizers(float_model)
    settings = MethodSettings(method=CalibMethod.ENTROPY)
    result = run_calibration(qmodel, images, settings, progress=False)
    chosen = apply_calibration(qmodel, result, settings)
    assert len(chosen) == len(LAYERS)

    pq = _pq_net().eval()
    state = to_pq_state(qmodel)
    report = load_into_pq(pq, state)  # would call .cuda() (and fail here) without CPU buffers first
    assert report.complete and len(report.loaded_amax) == 2 * len(LAYERS)
    for name, q in _pq_quantizers(pq):
        assert q.amax.device.type == "cpu"
        torch.testing.assert_close(q.amax, qmodel.get_submodule(name).amax, rtol=0, atol=0)
    with torch.no_grad():
        for batch in images[:2]:
            ours, theirs = qmodel(batch).numpy(), pq(batch).numpy()
            assert _sqnr_db(theirs, ours) >= 60.0  # measured ~145 dB: same grid, float rounding only
            assert _sqnr_db(float_model(batch).numpy(), ours) < 45.0  # really quantized


def test_load_pq_state_lists_unmatched_keys(float_model, pq_calibrated):
    qmodel, _ = insert_quantizers(float_model)
    state = dict(pq_calibrated.state_dict())
    del state["dw._input_quantizer._amax"]
    state["head.weight"] = torch.zeros(1)
    with pytest.raises(WeightsError) as err:
        load_pq_state(qmodel, state)
    assert "dw._input_quantizer._amax" in str(err.value) and "head.weight" in str(err.value)
    assert qmodel.pw._input_quantizer.amax is None  # nothing half-loaded

    report = load_pq_state(qmodel, state, strict=False)
    assert report.missing == ["dw._input_quantizer._amax"] and report.unexpected == ["head.weight"]
    assert qmodel.dw._input_quantizer.amax is None
    assert float(qmodel.pw._input_quantizer.amax) == float(state["pw._input_quantizer._amax"])

    prefixed = {f"module.{k}": v for k, v in pq_calibrated.state_dict().items()}
    with pytest.raises(WeightsError, match="DataParallel"):
        load_pq_state(qmodel, prefixed)


def test_per_tensor_weight_amax_expands_and_bad_amax_is_refused(float_model, pq_calibrated):
    qmodel, _ = insert_quantizers(float_model)
    state = dict(pq_calibrated.state_dict())
    state["pw._weight_quantizer._amax"] = torch.tensor(0.75)
    load_pq_state(qmodel, state)
    assert qmodel.pw._weight_quantizer.amax.shape == (32, 1, 1, 1)
    assert torch.all(qmodel.pw._weight_quantizer.amax == 0.75)

    state["pw._weight_quantizer._amax"] = torch.ones(16, 1, 1, 1)  # wrong channel count
    with pytest.raises(WeightsError, match=r"pw._weight_quantizer._amax.*\(32, 1, 1, 1\)"):
        load_pq_state(qmodel, state)
    state["pw._weight_quantizer._amax"] = torch.tensor(0.75)
    state["stem._input_quantizer._amax"] = torch.tensor(float("nan"))
    with pytest.raises(CalibrationError, match="stem._input_quantizer._amax"):
        load_pq_state(qmodel, state)


def test_to_pq_state_refuses_uncalibrated_and_load_into_pq_lists_keys(float_model):
    qmodel, _ = insert_quantizers(float_model)
    with pytest.raises(CalibrationError, match="stem._input_quantizer"):
        to_pq_state(qmodel)
    for _, m in qmodel.named_modules():
        if hasattr(m, "_input_quantizer"):
            m._input_quantizer.amax = 1.0
    state = to_pq_state(qmodel)
    del state["fc._input_quantizer._amax"]
    with pytest.raises(WeightsError, match="fc._input_quantizer._amax"):
        load_into_pq(_pq_net(), state)
