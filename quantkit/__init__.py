"""quantkit: INT8 post-training quantization and TensorRT-ready Q/DQ ONNX export.

Public API (imported lazily so that ``import quantkit`` stays cheap)::

    qmodel = quantkit.quantize(model, calib, recipe)
    quantkit.export(qmodel, out_dir, ...)
    quantkit.register_quant_module(FloatType, QuantType)   # a wrapper for a custom layer type
"""

from __future__ import annotations

import os as _os

from quantkit.version import __version__  # noqa: E402  (one place for the number)

# onnxruntime's Linux wheels (seen with 1.32) start a telemetry SDK on import that leaves a `.ses` file in $TMPDIR
# after every run; nothing in quantkit asked for it. Off unless the user set the variable themselves.
_os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

__all__ = ["__version__", "quantize", "export", "load_recipe", "Recipe", "register_quant_module"]


def __getattr__(name):  # PEP 562 lazy attributes
    if name == "quantize":
        from quantkit.api import quantize

        return quantize
    if name == "export":
        from quantkit.api import export

        return export
    if name == "register_quant_module":
        from quantkit.quant.registry import register_quant_module

        return register_quant_module
    if name in ("load_recipe", "Recipe"):
        from quantkit import recipe

        return getattr(recipe, name)
    raise AttributeError(name)
