"""torch -> ONNX with the legacy (TorchScript) exporter at opset 17, which TensorRT 8.6 and 10.x read.

The dynamo exporter emits opset 18 only (FACTS.md); the legacy one still ships in torch 2.13 and turns
``fake_quantize_per_{tensor,channel}_affine`` into QuantizeLinear/DequantizeLinear pairs. Its deprecation
warning is silenced here because choosing it is deliberate.
"""

from __future__ import annotations

import io
import logging
import warnings

import onnx
import torch
from torch import nn

from quantkit.errors import ExportError

INPUT_NAME = "images"
log = logging.getLogger("quantkit")


def output_names(model: nn.Module, example: torch.Tensor) -> list[str]:
    """``["boxes", "scores"]`` for a detector returning (boxes [B,A,4], scores [B,A,C]); the names of a
    structured output's tensors (``models.outputs``: dict keys, field names); else output[_i]."""
    named = getattr(model, "_quantkit_output_names", None)
    if named:
        return list(named)
    with torch.no_grad():
        out = model(example)
    if isinstance(out, torch.Tensor):
        return ["output"]
    if (isinstance(out, (tuple, list)) and len(out) == 2 and all(isinstance(o, torch.Tensor) for o in out)
            and out[0].dim() == 3 and out[0].shape[-1] == 4 and out[1].dim() == 3 and out[0].shape[1] == out[1].shape[1]):
        return ["boxes", "scores"]
    if isinstance(out, (tuple, list)) and all(isinstance(o, torch.Tensor) for o in out):
        return [f"output_{i}" for i in range(len(out))]
    raise ExportError(f"model output of type {type(out).__name__} is not a tensor or a flat tuple of tensors; "
                      "wrap the model so that forward returns tensors")


def export_onnx(model: nn.Module, example: torch.Tensor, *, opset: int = 17, dynamic_batch: bool = False,
                inputs=None, dtypes=None) -> onnx.ModelProto:
    """Export ``model`` (eval mode) traced on ``example`` (float32 (1, ...)). Returns the ModelProto, unchecked.

    ``inputs``: the named inputs of a packed ``example`` (``CalibrationData.inputs``): the graph takes them by
    name (``quantkit.data.inputs.export_view``); None: one input, named ``images``. ``dtypes``
    (``CalibrationData.dtypes``): inputs saved as integers are integer graph inputs."""
    from quantkit.data.inputs import export_view

    model = model.eval()
    names = output_names(model, example)
    module, args, input_names = export_view(model, example, inputs, dtypes)
    input_names = input_names or [INPUT_NAME]
    dynamic_axes = None
    if dynamic_batch:
        dynamic_axes = {**{i: {0: "batch"} for i in input_names}, **{n: {0: "batch"} for n in names}}
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(
                module, args, buf, dynamo=False, opset_version=opset, input_names=input_names,
                output_names=names, dynamic_axes=dynamic_axes, do_constant_folding=True,
            )
        except Exception as exc:  # the exporter raises many internal types
            raise ExportError(f"torch.onnx.export failed: {type(exc).__name__}: {exc}") from exc
    return keep_declared_inputs(onnx.load_from_string(buf.getvalue()), input_names, args, dynamic_batch)


def keep_declared_inputs(model: onnx.ModelProto, names: list[str], args, dynamic_batch: bool) -> onnx.ModelProto:
    """The graph with every named input, in order, even one the model never reads (the exporter drops those:
    a ``forward(input, text)`` that ignores ``text``). The graphs then take exactly the inputs ``forward`` takes
    and the ``.npz`` gives, which every stage feeds them; TensorRT 8.6+ keeps such an input with a warning."""
    have = {i.name: i for i in model.graph.input}
    missing = [n for n in names if n not in have]
    if not missing:
        return model
    declared = []
    for name, arg in zip(names, args):
        if name in have:
            declared.append(have[name])
        else:
            dims = ["batch" if dynamic_batch else int(arg.shape[0]), *(int(d) for d in arg.shape[1:])]
            declared.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, dims))
    rest = [i for i in model.graph.input if i.name not in set(names)]
    del model.graph.input[:]
    model.graph.input.extend(declared + rest)
    log.info("the model does not read input(s) %s: the graphs keep them as inputs (unused), so they take the "
             "inputs forward takes", ", ".join(missing))
    return model
