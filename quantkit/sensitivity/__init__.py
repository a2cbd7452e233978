"""Sensitivity stage: per-layer INT8 damage and recovery, the T4 cost model, budgeted FP16 selection.

Entry: :func:`analyze_and_select` (calibrated ``QuantState`` -> ``SensitivityOutcome``, applied to the model).
"""

from quantkit.sensitivity.run import analyze_and_select, latency_estimate

__all__ = ["analyze_and_select", "latency_estimate"]
