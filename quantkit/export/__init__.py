"""Export stage: torch -> ONNX, Q/DQ passes, lint, strongly typed (FP16) variant, NMS, parity.

Entry: :func:`write_graphs` (calibrated ``QuantState`` -> checked ``Graphs`` written into the staging folder).

``quantkit.export`` is both this package and the public function ``quantkit.export(qmodel, out_dir)``: once the
package is imported, the attribute ``quantkit.export`` is this module, so the module itself is made callable
and forwards to :func:`quantkit.api.export`.
"""

import sys
import types

from quantkit.export.graphs import write_graphs

__all__ = ["write_graphs"]


class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs):
        from quantkit.api import export

        return export(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
