"""Python API: ``qmodel = quantkit.quantize(model, calib, recipe)``; ``quantkit.export(qmodel, out_dir)``."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from quantkit.errors import QuantkitError, UsageError
from quantkit.recipe import Recipe

# The messages of the output-folder checks are written for the command line; at the Python API they name the
# Python arguments instead (the CLI flag means nothing to a caller of quantkit.export).
_PY_NAMES = (("--force", "force=True"), ("--out", "out_dir"), ("--calib-cache", "calibration.cache"))


def _python_names(exc: QuantkitError) -> QuantkitError:
    text = str(exc)
    for flag, arg in _PY_NAMES:
        text = text.replace(flag, arg)
    try:
        renamed = type(exc)(text)
    except TypeError:  # an error class with other constructor arguments keeps its CLI wording
        return exc
    renamed.__dict__.update({k: v for k, v in exc.__dict__.items() if k not in renamed.__dict__})
    return renamed


def _check_destination(out_dir, force: bool, inputs=()) -> None:
    """Refuse ``out_dir`` before any work, with the Python argument named in the message."""
    from quantkit.output import check_output_dir, check_path_limits

    if not isinstance(out_dir, (str, Path)) or str(out_dir) == "":
        raise UsageError(f"out_dir must be a folder path (str or pathlib.Path), not {type(out_dir).__name__}")
    if not isinstance(force, bool):
        raise UsageError(f"force must be True or False, not {force!r}")
    try:
        check_path_limits(out_dir)
        check_output_dir(out_dir, force, inputs)
    except QuantkitError as exc:
        raise _python_names(exc) from None


def quantize(model: nn.Module | str, calib: str | Path | None = None, recipe: Recipe | None = None, *,
             out_dir: str | Path | None = None, force: bool = False, progress: bool = True) -> nn.Module:
    """Reparameterize, insert INT8 quantizers and calibrate ``model`` on real data.

    Args:
        model: an ``nn.Module`` (any model of standard layers) or a registered model name / ``file.py:factory``.
        calib: a folder of images (recursive), a float32 NCHW ``.npy``, a dataset YAML, a float32 NCHW numpy array
            or torch tensor, or any iterable of such batches, e.g. a DataLoader (read once, up front) (None: the
            recipe's, or the bundled set for ``trees``).
        recipe: configuration (None: defaults).
        out_dir, force: where :func:`export` will write, checked now, before the minutes of calibration, so that
            a folder that would be refused (not empty without ``force=True``, foreign files, an input of the run)
            fails at once. Optional; ``export`` checks again.
    Returns:
        The fake-quantized torch module (eval mode). ``qmodel.quantkit_state`` keeps what ``export`` needs.
    """
    from dataclasses import replace

    from quantkit.pipeline import quantize_and_select

    if recipe is not None and not isinstance(recipe, Recipe):
        raise UsageError(f"recipe must be a quantkit Recipe (quantkit.load_recipe(...)), not {type(recipe).__name__}")
    if not isinstance(model, (nn.Module, str)):
        raise UsageError(f"model must be an nn.Module or a model name / 'file.py:factory', not {type(model).__name__}")
    if out_dir is not None:
        _check_destination(out_dir, force, [calib] if isinstance(calib, (str, Path)) else [])
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
        raise UsageError("export(qmodel, out_dir): qmodel must be the module returned by quantkit.quantize(...)")
    _check_destination(out_dir, force)
    try:
        return export_state(state, out_dir, force=force, progress=progress, command_line=["quantkit.export(python)"])
    except QuantkitError as exc:
        if type(exc).__name__ == "GateFailure":  # written; the gate's message names no flag
            raise
        raise _python_names(exc) from None
