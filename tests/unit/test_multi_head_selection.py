"""The FP16 choice on a network with several heads (issue 23: on MTCNN's ONet, modelopt kept the three tiny heads
float; quantkit's choice, reading only the worst output, could not see a head that recovers its own output).
Closed-form: the per-output noise average, and a selection that keeps such a head where the worst-output
reading would not."""

import math

import numpy as np
import torch

from quantkit.sqnr import SqnrAccumulator
from quantkit.sensitivity.analysis import LayerSensitivity, SensitivityResult, _mean_recovery
from quantkit.sensitivity.select import choose_for_int8_share


def _acc(noise_std: list[float]) -> SqnrAccumulator:
    acc = SqnrAccumulator()
    ref = [torch.ones(1000), torch.ones(1000)]
    rng = np.random.default_rng(0)
    signs = [torch.from_numpy(np.sign(rng.standard_normal(1000))).float() for _ in ref]
    acc.update(ref, [r + s * sd for r, s, sd in zip(ref, signs, noise_std)])
    return acc


def test_mean_recovery_is_the_average_noise_ratio_in_closed_form():
    int8, without = _acc([0.1, 0.01]), _acc([0.1, 0.001])  # output 0 (the worst) unchanged, output 1 recovered
    gain, db = _mean_recovery(int8, without)
    na, nb = (0.01 + 1e-4) / 2, (0.01 + 1e-6) / 2  # noise-to-signal power ratios, averaged
    assert math.isclose(gain, na - nb, rel_tol=1e-4) and math.isclose(db, 10 * math.log10(na / nb), rel_tol=1e-4)
    one = SqnrAccumulator()
    one.update([torch.ones(4)], [torch.ones(4) * 1.1])
    assert _mean_recovery(one, one) == (None, None)  # one output: the worst-output figures already say it


def _result(head_mean: bool) -> SensitivityResult:
    base = 20.0
    layers = {
        "body": LayerSensitivity("body", "Conv2d", 0, None, base + 0.02, 0.02),
        # recovers nothing on the worst output, 1 dB averaged over the outputs (its own head)
        "head_b": LayerSensitivity("head_b", "Linear", 1, None, base, 0.0,
                                   mean_noise_gain=0.002 if head_mean else None,
                                   mean_recovery_db=1.0 if head_mean else None),
    }
    return SensitivityResult(layers, base, 8, None, None, 0, 0.0, [])


def test_a_head_that_recovers_its_own_output_is_kept_fp16():
    macs = {"body": 1000.0, "head_b": 1.0}
    sel = choose_for_int8_share(_result(True), macs, 0.95)
    assert sel.fp16 == ["head_b"] and "averaged over the outputs" in sel.reasons["head_b"]
    # the worst-output reading alone (no per-output measurement) keeps nothing: the test can fail
    assert choose_for_int8_share(_result(False), macs, 0.95).fp16 == []
