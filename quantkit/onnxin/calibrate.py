"""Calibration in onnxruntime: one pass over the data, every needed intermediate tensor a graph output.

The tensors feed the torch route's own machinery unchanged: each is passed (``torch.from_numpy``) through a
``TensorQuantizer`` in calibration mode, so ``run_calibration`` attaches the same ``HistogramCollector``s and
computes the same per-method amax with the same search code, and ``apply_calibration`` applies the same checks
(amax 0 / NaN / Inf is an error naming the tensor). The result is cached like the torch route's, keyed by the
ONNX bytes, the INT8 weight selection, the data and the settings.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging

import numpy as np
import onnx
import torch
from torch import nn

from quantkit import paths
from quantkit.version import __version__
from quantkit.calibrate.driver import CalibrationResult, apply_calibration, run_calibration
from quantkit.calib_methods import MethodSettings
from quantkit.data.calib import CalibrationData
from quantkit.quant.tensor_quantizer import TensorQuantizer

log = logging.getLogger("quantkit")


def with_outputs(model: onnx.ModelProto, tensors: list[str]) -> onnx.ModelProto:
    """A copy of ``model`` whose graph outputs are ``tensors`` (types left to onnxruntime)."""
    m = copy.deepcopy(model)
    del m.graph.output[:]
    for t in tensors:
        m.graph.output.append(onnx.helper.make_empty_tensor_value_info(t))
    return m


class OrtTensors(nn.Module):
    """Runs an onnxruntime session and hands each requested tensor to a per-tensor ``TensorQuantizer``.

    Module names are ``t<i>`` (torch forbids '.' in them, ONNX names often have it); ``names[i]`` is the tensor.
    """

    def __init__(self, model: onnx.ModelProto, tensors: list[str], threads: int | None):
        super().__init__()
        from quantkit.exporter import parity

        self.names = list(tensors)
        self.sess = parity.session(with_outputs(model, self.names), threads)
        self.inputs = self.sess.get_inputs()  # several: x is packed (N, F), split by ort_feeds
        inp = self.inputs[0]
        self.input_name = inp.name
        b = inp.shape[0] if inp.shape else None
        self.fixed_batch = b if isinstance(b, int) and b > 0 else None
        for i, t in enumerate(self.names):
            self.add_module(f"t{i}", TensorQuantizer(axis=None, name=t))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        arr = x.detach().cpu().numpy().astype(np.float32, copy=False)
        b = self.fixed_batch
        try:
            if b is None or arr.shape[0] == b:
                outs = self.sess.run(None, self._feeds(arr))
            else:  # a graph with a fixed batch: run in chunks, then rebuild the batch the torch route would see
                if arr.shape[0] % b:
                    raise ValueError(f"batch of {arr.shape[0]} is not a multiple of the graph's fixed batch {b}")
                parts = [self.sess.run(None, self._feeds(arr[i:i + b])) for i in range(0, arr.shape[0], b)]
                outs = [np.concatenate([p[k] for p in parts]) for k in range(len(parts[0]))]
        except ValueError:
            raise
        except Exception as exc:  # onnxruntime's exception types are not RuntimeError; the driver maps ValueError
            raise ValueError(str(exc).splitlines()[0][:300]) from exc
        return [getattr(self, f"t{i}")(torch.from_numpy(np.ascontiguousarray(o))) for i, o in enumerate(outs)]

    def _feeds(self, arr: np.ndarray) -> dict[str, np.ndarray]:
        from quantkit.data.inputs import ort_feeds  # each input in its declared type (integer ids too)

        return ort_feeds(self.inputs, arr)

    def rename(self, result: CalibrationResult) -> CalibrationResult:
        """Quantizer names (t<i>) -> ONNX tensor names."""
        return CalibrationResult({self.names[int(k[1:])]: v for k, v in result.tensors.items()}, result.num_samples)


def calibrate_onnx(model: onnx.ModelProto, tensors: list[str], data: CalibrationData, settings: MethodSettings, *,
                   progress: bool = True, threads: int | None = 1) -> CalibrationResult:
    """One onnxruntime pass over ``data``: every method's amax for each of ``tensors`` (keyed by tensor name)."""
    mod = OrtTensors(model, tensors, threads)
    res = run_calibration(mod, data.batches(), settings, total=len(data), progress=progress, threads=threads)
    return mod.rename(res)


def chosen_amax(result: CalibrationResult, tensors: list[str], settings: MethodSettings) -> dict[str, float]:
    """tensor -> amax of the configured method, with the torch route's checks (``apply_calibration``)."""
    holder = nn.Module()
    for i, t in enumerate(tensors):
        holder.add_module(f"t{i}", TensorQuantizer(axis=None, name=t))
    renamed = CalibrationResult({f"t{i}": result.tensors[t] for i, t in enumerate(tensors) if t in result.tensors},
                                result.num_samples)
    chosen = apply_calibration(holder, renamed, settings)
    return {tensors[int(k[1:])]: v for k, v in chosen.items()}


def key_components(onnx_bytes: bytes, tensors: list[str], int8_weights: list[str], data: CalibrationData,
                   settings: MethodSettings) -> dict:
    """What determines the histograms: the ONNX file, tensors calibrated, INT8 weights, data, settings."""
    return {
        "onnx": hashlib.sha256(onnx_bytes).hexdigest(),
        "tensors": json.dumps(tensors),
        "int8_weights": json.dumps(sorted(int8_weights)),
        "data": data.fingerprint(),
        "preprocess": json.dumps(data.preprocess.as_dict() if data.preprocess else None, sort_keys=True),
        "settings": json.dumps({"num_bins": settings.num_bins, "percentile": settings.percentile,
                                "start_bin": settings.start_bin, "num_bits": settings.num_bits}, sort_keys=True),
        "quantkit_version": __version__,
        "onnxruntime_version": _ort_version(),  # it runs the clean-up and the pass: its numerics shape the histograms
        "route": "onnx",
    }


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def calibrate_onnx_cached(model: onnx.ModelProto, onnx_bytes: bytes, tensors: list[str], int8_weights: list[str],
                          data: CalibrationData, settings: MethodSettings, *, cache_path: str | None,
                          use_cache: bool, progress: bool = True, threads: int | None = 1
                          ) -> tuple[CalibrationResult, dict]:
    """``calibrate_onnx`` behind the content-keyed calibration cache. Returns (result, cache info)."""
    from quantkit.calibrate.cache import CalibrationCache, cache_key, check_cache_target

    components = key_components(onnx_bytes, tensors, int8_weights, data, settings)
    key = cache_key(components)
    info = {"key": key, "hit": False, "path": None, "reason": None}
    cache = None
    if use_cache:
        path = cache_path or str(paths.cache_dir() / "calibration" / f"{key[:24]}.json")
        if cache_path:  # a file the user named: written only when absent or one of ours (before any work)
            check_cache_target(path)
        cache = CalibrationCache(path)
        info["path"] = str(path)
        payload = cache.load(key, components, parse=CalibrationResult.from_dict)
        if payload is not None:
            info["hit"] = True
            return payload, info
        info["reason"] = cache.last_reason
    log.info("calibrating in onnxruntime on %d inputs from %s (%d tensors)", data.num_samples, data.source,
             len(tensors))
    result = calibrate_onnx(model, tensors, data, settings, progress=progress, threads=threads)
    if cache is not None:
        cache.save(key, result.as_dict(), components)
    return result, info
