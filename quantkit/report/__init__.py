"""Report stage: report.json / report.md / report.html, plots, calibration.json, manifest.json, gates.

Entry: :func:`write` (``ReportInputs`` -> files in the staging folder; returns the report and gate failures).
"""

from quantkit.report.build import ReportInputs, write

__all__ = ["ReportInputs", "write"]
