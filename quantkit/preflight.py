"""Checks of the environment a run will write to, done before the first slow step (calibration).

``preflight(recipe, out_dir, force=...)`` raises UsageError, naming the fix, when the output folder cannot or
must not be written (see ``quantkit.output.check_output_dir``), when the calibration cache cannot
be written (``$QUANTKIT_CACHE_DIR`` a file, read-only, under /sys; ``calibration.cache`` a folder), or when
the calibration batch at ``input.size`` cannot fit in memory. Without it, these surface after minutes of
calibration, as crashes.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from quantkit import paths
from quantkit.errors import UsageError
from quantkit.output import check_output_dir

# Estimated peak bytes of a calibration pass per byte of the float32 input batch: activations of a
# detector's first stages (tens of channels at stride 2-4), their fake-quantized copies and histogram scratch.
ACTIVATION_FACTOR = 16


def run_inputs(recipe, *, recipe_path: str | os.PathLike | None = None, calib: str | None = None,
               eval_path: str | None = None) -> list[str]:
    """Every path ``recipe``'s run reads: data, weights, recipe file, model .py file, calibration cache file."""
    name = recipe.model.name or ""
    module_part, sep, _ = name.rpartition(":")
    model_file = module_part if sep and module_part.endswith(".py") else None
    if name.lower().endswith(".onnx"):  # the ONNX front end's model file
        model_file = name
    found = [recipe_path, calib or recipe.calibration.data, eval_path or recipe.evaluation.data,
             recipe.model.weights, model_file, recipe.calibration.cache, recipe.calibration.trt_cache,
             recipe.evaluation.annotations]
    return [str(p) for p in found if p]


def check_cache(recipe, inputs: list[str] = ()) -> None:
    """UsageError when the calibration cache the run will write is unusable (and caching is on): a folder, an
    unwritable place, one of the run's other ``inputs`` or inside an input folder, or an existing file that is
    not a quantkit calibration cache (``calibrate.cache.check_cache_target``)."""
    from quantkit.calibrate.cache import check_cache_target

    c = recipe.calibration
    if not c.use_cache:
        return
    if c.cache:
        p = Path(c.cache)
        if p.is_dir():
            raise UsageError(f"calibration.cache {p} is a folder: pass a file path (e.g. {p / 'calib.json'}), "
                             "or --no-cache")
        others = list(inputs)
        if str(c.cache) in others:  # run_inputs lists the cache itself once; a second listing is a real input
            others.remove(str(c.cache))
        check_cache_target(p, others)
        _writable_folder(p.parent, f"calibration cache {p}", "pass a writable --calib-cache path or --no-cache")
        return
    folder = paths.cache_dir() / "calibration"
    hint = "set QUANTKIT_CACHE_DIR to a writable folder, or pass --no-cache"
    _writable_folder(folder, f"the calibration cache folder {folder}", hint)


def _writable_folder(folder: Path, what: str, hint: str) -> None:
    probe = folder if str(folder) else Path(".")
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        raise UsageError(f"cannot use {what}: {probe} is a file, not a folder; {hint}")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".quantkit-probe-", dir=probe))
    except OSError as exc:
        raise UsageError(f"cannot write {what}: {probe} is not writable ({exc.strerror}); {hint}") from None


def available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), else physical memory, else None."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def estimate_calibration_bytes(size: tuple[int, int], batch: int, channels: int = 3) -> int:
    """Rough peak memory (bytes) of a calibration pass on ``batch`` images of ``size`` (H, W) pixels."""
    return batch * channels * size[0] * size[1] * 4 * ACTIVATION_FACTOR


def calibration_batch(recipe) -> int:
    """Images per calibration batch: ``calibration.batch_size``, capped by ``calibration.max_images``."""
    batch = recipe.calibration.batch_size
    if recipe.calibration.max_images:
        batch = min(batch, recipe.calibration.max_images)
    return batch


def check_memory(recipe, available: int | None = None) -> None:
    """UsageError when ``input.size`` x ``calibration.batch_size`` cannot fit in ``available`` bytes."""
    size = recipe.input.size
    if size is None:
        return  # the model's own default size or the .npy's shape: already in memory-sane territory
    batch = calibration_batch(recipe)
    need = estimate_calibration_bytes(tuple(size), batch)
    available = available_memory_bytes() if available is None else available
    if available is not None and need > available:
        gb = 1024 ** 3
        raise UsageError(
            f"input.size {size[0]}x{size[1]} with calibration.batch_size {batch} needs an estimated "
            f"{need / gb:,.1f} GiB of memory (the float32 input batch alone is {need / ACTIVATION_FACTOR / gb:,.1f} "
            f"GiB), but {available / gb:,.1f} GiB is available: lower --input-size or calibration.batch_size")


def check_model_input_memory(recipe, where: str, shape: list, available: int | None = None,
                             batch: int | None = None) -> None:
    """UsageError when a model's own fixed input ``shape`` [N, ...] (N None when free) cannot be calibrated
    in ``available`` bytes; ``where`` names the input (e.g. "input 'images' of model.onnx"). The batch is the
    larger of the model's fixed N and ``batch`` (default ``calibration.batch_size``)."""
    n, sample = shape[0], [int(d) for d in shape[1:]]  # any rank: (N, C, H, W) images, (N, L) audio frames
    batch = max(int(n or 0), calibration_batch(recipe) if batch is None else batch)
    per_sample = 1
    for d in sample:
        per_sample *= d
    need = batch * per_sample * 4 * ACTIVATION_FACTOR  # estimate_calibration_bytes for any sample shape
    available = available_memory_bytes() if available is None else available
    if available is not None and need > available:
        gb = 1024 ** 3
        raise UsageError(
            f"{where} has the fixed shape {list(shape)}: calibrating it in batches of {batch} needs an estimated "
            f"{need / gb:,.1f} GiB of memory (the float32 input batch alone is {need / ACTIVATION_FACTOR / gb:,.1f} "
            f"GiB), but {available / gb:,.1f} GiB is available: re-export the model at a smaller input size "
            "(or with free H/W and pass --input-size), or lower calibration.batch_size")


def preflight(recipe, out_dir: str | os.PathLike, *, force: bool = False, recipe_path: str | None = None,
              calib: str | None = None, eval_path: str | None = None,
              own_files: tuple[str, ...] | None = None) -> list[str]:
    """Every check that needs no model and no data, in seconds. Returns the run's input paths (for the output)."""
    inputs = run_inputs(recipe, recipe_path=recipe_path, calib=calib, eval_path=eval_path)
    check_output_dir(out_dir, force, inputs, own_files)
    check_cache(recipe, inputs)
    check_memory(recipe)
    return inputs


__all__ = ["preflight", "run_inputs", "check_cache", "check_memory", "check_model_input_memory",
           "estimate_calibration_bytes", "available_memory_bytes"]
