"""Quantization stage: TensorQuantizer, the float -> quantized swap table, insertion by selection.

Entry: :func:`prepare` (model + ``QuantizationSpec`` -> ``PreparedModel``).
"""

from quantkit.quant.preparation import prepare

__all__ = ["prepare"]
