"""The calibration stage's entry: one pass over the data (or the cached result of an identical one), then
every activation quantizer's amax set from the recipe's method.

The cache key covers everything that determines the histograms: the reparameterized weights, the model's code,
the quantizer layout, which layers are INT8, the data bytes and preprocessing, the method settings and
quantkit's version.
"""

from __future__ import annotations

import hashlib
import json
import logging

import torch
from torch import nn

from quantkit import paths
from quantkit.version import __version__
from quantkit.calibrate.driver import CalibrationResult, apply_calibration, run_calibration
from quantkit.calib_methods import MethodSettings
from quantkit.data.calib import CalibrationData
from quantkit.quant.tensor_quantizer import TensorQuantizer
from quantkit.recipe import CalibrationSpec
from quantkit.state import Calibration, PreparedModel

log = logging.getLogger("quantkit")


def weights_digest(model: nn.Module) -> str:
    """sha256 over the names, shapes and bytes of every state_dict tensor (reparameterized weights)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        if t is None:
            continue
        t = t.detach().cpu().contiguous()
        h.update(name.encode())
        h.update(json.dumps([list(t.shape), str(t.dtype)]).encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return h.hexdigest()


def code_digest(model: nn.Module) -> str:
    """sha256 over the module tree (repr) and the forward source of every module class in it.

    Weights alone do not determine activations: two models with the same parameters but different forward
    code (a user's edit to their model file) must not share a calibration.
    """
    import inspect

    h = hashlib.sha256(repr(model).encode())
    for cls in sorted({type(m) for m in model.modules()}, key=lambda c: f"{c.__module__}.{c.__qualname__}"):
        h.update(f"{cls.__module__}.{cls.__qualname__}".encode())
        code = getattr(cls, "code", None) if isinstance(getattr(cls, "code", None), str) else None
        try:
            code = code or inspect.getsource(cls.forward)
        except (OSError, TypeError):
            code = ""
        h.update(code.encode())
    if hasattr(model, "code") and isinstance(model.code, str):  # torch.fx GraphModule: generated forward
        h.update(model.code.encode())
    return h.hexdigest()


def calibration_key_components(model: PreparedModel, data: CalibrationData, settings: MethodSettings,
                               device: str = "cpu") -> dict:
    """Everything that determines the calibration histograms (and hence every method's amax).

    The pass runs with the INT8 layers' weights fake-quantized and the float layers' weights exact, so which
    layers are INT8 changes the activations downstream: the enabled weight quantizers are part of the key.
    """
    quantizers = [(n, m) for n, m in model.qmodel.named_modules() if isinstance(m, TensorQuantizer)]
    layout = [n for n, m in quantizers if not m.is_per_channel]
    int8_weights = [n for n, m in quantizers if n.endswith("_weight_quantizer") and m.enabled]
    return {
        "weights": weights_digest(model.fp32),
        "model_code": code_digest(model.fp32),
        "quantizer_layout": json.dumps(layout),
        "int8_weights": json.dumps(int8_weights),
        "data": data.fingerprint(),
        "preprocess": json.dumps(data.preprocess.as_dict() if data.preprocess else None, sort_keys=True),
        "settings": json.dumps({"num_bins": settings.num_bins, "percentile": settings.percentile,
                                "start_bin": settings.start_bin, "num_bits": settings.num_bits}, sort_keys=True),
        "quantkit_version": __version__,
        # GPU kernels sum differently; the CPU key is unchanged so existing caches stay valid
        **({"device": device} if device != "cpu" else {}),
    }


def calibrate_cached(model: PreparedModel, data: CalibrationData, spec: CalibrationSpec, *,
                     progress: bool = True, device: str = "cpu") -> tuple[CalibrationResult, dict]:
    """Calibrate on ``device`` ("cpu", "cuda"), reusing a cached result with the same content key.
    Returns (result, cache info for the report)."""
    from quantkit.calibrate.cache import CalibrationCache, cache_key, check_cache_target

    settings = spec.settings
    components = calibration_key_components(model, data, settings, device=device)
    key = cache_key(components)
    info = {"key": key, "hit": False, "path": None, "reason": None}
    cache = None
    if spec.use_cache:
        path = spec.cache or str(paths.cache_dir() / "calibration" / f"{key[:24]}.json")
        if spec.cache:  # a file the user named: written only when absent or one of ours (before any work)
            check_cache_target(path)
        cache = CalibrationCache(path)
        info["path"] = str(path)
        payload = cache.load(key, components, parse=CalibrationResult.from_dict)
        if payload is not None:  # the cache logs the hit, or the reason for a miss
            info["hit"] = True
            return payload, info
        info["reason"] = getattr(cache, "last_reason", None)
    log.info("calibrating on %d inputs from %s", data.num_samples, data.source)
    result = run_calibration(model.qmodel, data.batches(), settings, total=len(data), progress=progress,
                             threads=1 if spec.deterministic else None, device=device)
    if cache is not None:
        cache.save(key, result.as_dict(), components)
    return result, info


def calibrate(model: PreparedModel, data: CalibrationData, spec: CalibrationSpec, *, progress: bool = True,
              device: str = "cpu") -> Calibration:
    """Calibrate ``model.qmodel`` on ``data`` (or reuse the cache) on ``device`` and set every activation amax by
    ``spec``'s method. Raises CalibrationError naming the layer when an amax is 0, NaN or Inf."""
    result, cache = calibrate_cached(model, data, spec, progress=progress, device=device)
    chosen = apply_calibration(model.qmodel, result, spec.settings)
    return Calibration(result=result, chosen_amax=chosen, cache=cache)
