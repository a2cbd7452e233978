"""Checks of a user's model that turn later crashes into one clear ModelError (issue 17)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from quantkit.errors import ModelError
from quantkit.quote import qcap


def check_float32(model: nn.Module) -> None:
    """ModelError unless every floating-point parameter and buffer is float32 (quantkit calibrates, fake-quantizes
    and exports in float32; a half or double model fails later with a misleading dtype error)."""
    for kind, items in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, t in items:
            if t.is_floating_point() and t.dtype != torch.float32:
                raise ModelError(f"the model's {kind} {qcap(name)} is {str(t.dtype).replace('torch.', '')}: quantkit "
                                 "quantizes float32 models; convert it with model.float() (e.g. return "
                                 "model.float() from the factory) and let quantkit produce the FP16/INT8 graphs")


def check_outputs(outputs: Any) -> None:
    """ModelError when an output tensor has no batch axis (0-dim): parity checks, dynamic batch and evaluation
    split and concatenate outputs along axis 0."""
    flat = outputs if isinstance(outputs, (list, tuple)) else (outputs.values() if isinstance(outputs, dict)
                                                                 else [outputs])
    for k, t in enumerate(flat):
        if isinstance(t, (list, tuple, dict)):
            check_outputs(t)
        elif isinstance(t, torch.Tensor) and t.dim() == 0:
            raise ModelError(f"model output {k} is a scalar (0-dim tensor): quantkit needs every output to keep the "
                             "batch axis first; return per-sample values (e.g. x.mean(dim=(1, 2, 3)) instead of "
                             "x.mean())")


def forward_arguments_hint(model, inputs) -> str | None:
    """How to feed a forward that takes several required arguments from a one-array data set (None: it does
    not, or the data already names its inputs)."""
    import inspect

    if inputs:
        return None
    try:
        params = list(inspect.signature(type(model).forward).parameters.values())[1:]  # without self
    except (TypeError, ValueError):
        return None
    required = [p.name for p in params if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD,
                                                                                 p.KEYWORD_ONLY)]
    if len(required) < 2:
        return None
    return (f"{type(model).__name__}.forward takes {len(required)} inputs ({', '.join(required)}) and a .npy or an "
            f"image folder gives one: pass --calib FILE.npz with one array per input, named after it "
            f"(numpy.savez('calib.npz', {', '.join(f'{n}=...' for n in required)}); an input the model ignores may "
            "be zeros of shape (N, 1))")
