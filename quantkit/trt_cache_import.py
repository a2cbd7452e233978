"""``--trt-calib-cache`` on the torch route: activation scales from a TensorRT calibration cache.

The same rules as the ONNX route (``onnxin.trt_import``), on the torch model's quantizers: each layer's input
quantizer is joined to the ONNX tensor it reads in the exported INT8 graph (``exporter.tensor_names``), and takes
that tensor's scale from the cache (amax = scale * 127). A layer whose input tensor has no line in the cache
belongs to a layer the source kept FP16 (quantkit's default, hybrid export writes no scale for those):
``calibration.trt_cache_missing`` ``fp16`` (default) keeps it FP16, ``calibrate`` keeps the amax calibrated from
``--calib``. The cache's scales are used as they are: the calibration-method choice, the automatic FP16 choice
and bias correction do not run. ``Calibration.trt_cache`` (report.json ``calibration.trt_cache``,
calibration.json ``trt_cache``) says which tensors came from the cache, were kept FP16 or calibrated.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from quantkit.calibrate.trt_cache import CacheImport, import_scales
from quantkit.quant.insert import set_precision
from quantkit.state import QuantState

log = logging.getLogger("quantkit")

METHOD = "trt-calibration-cache"


def import_trt_cache(state: QuantState, path: str) -> tuple[QuantState, CacheImport]:
    """A new state whose INT8 layers' input amax come from the cache at ``path`` (see the module docstring): its
    own copy of the fake-quant model and layout, and a new calibration record; ``state`` is not changed. Returns
    (that state, what came from where). UsageError naming the fix when the cache is not this model's."""
    import copy
    from dataclasses import replace

    from quantkit.exporter.tensor_names import input_tensor_names

    recipe = state.recipe
    model = replace(state.model, qmodel=copy.deepcopy(state.model.qmodel), layout=copy.deepcopy(state.model.layout))
    mode = recipe.calibration.trt_cache_missing
    example = next(state.data.batches(limit=1))[:1]
    tensor_of, graph_tensors = input_tensor_names(model.qmodel, list(model.layout.layers), example,
                                                  opset=recipe.export.opset, inputs=state.data.inputs,
                                                  dtypes=state.data.dtypes)
    out = import_scales(path, tensor_of, list(model.layout.int8), graph_tensors, mode=mode, what="this model",
                        fix="Pass the cache written for this model's export, or drop --trt-calib-cache")
    missing = out.kept_fp16 if mode == "fp16" else [n for n in model.layout.int8
                                                     if tensor_of.get(n) in set(out.calibrated)]
    if out.kept_fp16:
        model.layout.int8 = [n for n in model.layout.int8 if n not in set(out.kept_fp16)]
        for n in out.kept_fp16:
            model.layout.reasons[n] = f"no scale in {Path(path).name}: kept FP16, as the source did"
        set_precision(model.qmodel, set(model.layout.int8))
    from_cache, amax = out.from_cache, out.amax
    modules = dict(model.qmodel.named_modules())
    chosen = dict(state.calibration.chosen_amax)
    for n in model.layout.int8:
        t = tensor_of.get(n)
        if t in amax:
            modules[n]._input_quantizer.amax = torch.tensor(amax[t])
            chosen[f"{n}._input_quantizer"] = amax[t]
    key = out.cache_info["key"]
    calibration = replace(state.calibration, chosen_amax=chosen, method=METHOD, trt_cache=out.as_dict(str(path)),
                          cache={**state.calibration.cache, "key": key + "+" + str(state.calibration.cache.get("key"))})
    note = (f"--trt-calib-cache: {len(from_cache)} tensor scale(s) from {Path(path).name}; the calibration-method "
            "choice, the FP16 choice and bias correction did not run (the cache's scales are used as they are)")
    if missing:
        what = (f"kept {len(missing)} layer(s) FP16 ({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}), "
                "as the source did" if mode == "fp16"
                else f"kept the amax of those {len(missing)} layer(s) calibrated from {state.data.source}")
        note += (f"; {len(missing)} INT8 layer(s) read a tensor with no scale there (layers the source kept FP16): "
                 f"{what} (calibration.trt_cache_missing={mode})")
    model.layout.notes.append(note)
    log.info("%s", note)
    return replace(state, model=model, calibration=calibration), out
