"""Python API: ``qmodel = quantkit.quantize(model, calib, recipe)``; ``quantkit.export(qmodel, out_dir)``."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from quantkit.errors import UsageError
from quantkit.recipe import Recipe


def quantize(model: nn.Module | str, calib: str | Path | None = None, recipe: Recipe | None = None, *,
             progress: bool = True) -> nn.Module:
    """Reparameterize, insert INT8 quantizers and calibrate ``model`` on real data.

    Args:
        model: an ``nn.Module`` (any model of standard layers) or a registered model name / ``file.py:factory``.
        calib: a folder of images (recursive), a float32 NCHW ``.npy``, a dataset YAML, a float32 NCHW numpy array
            or torch tensor, or any iterable of such batches, e.g. a DataLoader (read once, up front) (None: the
            recipe's, or the bundled set for ``trees``).
        recipe: configuration (None: defaults).
    Returns:
        The fake-quantized torch module (eval mode). ``qmodel.quantkit_state`` keeps what ``export`` needs.
    """
    from dataclasses import replace

    from quantkit.pipeline import quantize_and_select

    recipe = recipe or Recipe()
    if isinstance(model, str):
        recipe = replace(recipe, model=replace(recipe.model, name=model))
        state = quantize_and_select(recipe, calib=calib, progress=progress)  # issue 15: not str(): arrays, loaders
    else:
        if calib is None and recipe.calibration.data is None:
            raise UsageError("quantize(model, calib): pass calibration data (a folder of images or a .npy)")
        state = quantize_and_select(recipe, model=model, progress=progress,  # issue 15: arrays and loaders pass as is
                                calib=calib if calib is not None else recipe.calibration.data)
    qmodel = state.model.qmodel
    qmodel.quantkit_state = state
    return qmodel


def export(qmodel: nn.Module, out_dir: str | Path, *, force: bool = False, progress: bool = True):
    """Write FP32 / INT8 Q/DQ ONNX, reports and manifest of a module returned by :func:`quantize`.

    Returns the :class:`~quantkit.pipeline.ExportResult`; raises GateFailure after writing when a gate fails.
    """
    from quantkit.pipeline import export_state

    state = getattr(qmodel, "quantkit_state", None)
    if state is None:
        raise UsageError("export() takes the module returned by quantkit.quantize(...)")
    return export_state(state, out_dir, force=force, progress=progress, command_line=["quantkit.export(python)"])
