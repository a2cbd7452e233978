"""Export stage: torch -> ONNX, Q/DQ passes, lint, strongly typed (FP16) variant, NMS, parity.

Entry: :func:`write_graphs` (calibrated ``QuantState`` -> checked ``Graphs`` written into the staging folder).

Named ``exporter`` (not ``export``) so that ``quantkit.export(qmodel, out_dir)``, the public function, never
collides with the package attribute Python sets when the package is imported.
"""

from quantkit.exporter.graphs import write_graphs

__all__ = ["write_graphs"]
