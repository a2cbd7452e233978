"""The default PTQ passes' implementations for the ONNX route's target (``onnxin.target.OnnxTarget``), registered
in the one pass registry (``ptq.passes.register_implementation``) when this module is imported (by
``onnxin.route``). The passes, their order, the guard and the report record are the torch route's.

- ``calibration_method``: ``onnxin.method_choice.choose_method``;
- ``fp16_choice``: ``onnxin.fp16_choice.choose_fp16``;
- ``bias_correction``: ``onnxin.bias_correction.correct_biases``. Range choice and learned rounding, which the torch
  route runs in the same pass, change a torch module's weights (learned rounding by autograd): they need
  ``"torch"`` / ``"autograd"``, which the ONNX target lacks, so a recipe that asks for them on this route is refused
  before calibration, naming what is missing.
"""

from __future__ import annotations

from quantkit.onnxin.bias_correction import correct_biases
from quantkit.onnxin.fp16_choice import choose_fp16
from quantkit.onnxin.method_choice import choose_method
from quantkit.ptq.passes import register_implementation

KIND = "onnx"


def _sequential_needs(recipe) -> tuple[str, ...]:
    p = recipe.ptq
    return (("torch",) if p.range_choice else ()) + (("autograd",) if p.adaround else ())


register_implementation("calibration_method", KIND, choose_method)
register_implementation("fp16_choice", KIND, choose_fp16)
register_implementation("bias_correction", KIND, correct_biases, _sequential_needs)

__all__ = ["KIND"]
