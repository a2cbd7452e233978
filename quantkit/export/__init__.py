"""ONNX export: torch -> ModelProto, Q/DQ passes, lint, strong (FP16) variant, NMS, parity.

``quantkit.export`` is both this package and the public function ``quantkit.export(qmodel, out_dir)``: once the
package is imported, the attribute ``quantkit.export`` is this module, so the module itself is made callable
and forwards to :func:`quantkit.api.export`.
"""

import sys
import types


class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs):
        from quantkit.api import export

        return export(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
