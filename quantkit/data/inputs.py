"""Several named model inputs carried as one packed tensor (N, F) through every stage.

A ``.npz`` holds one float32 array (N, ...) per model input. Calibration, the PTQ passes, sensitivity and the
parity checks all move one tensor per batch, so the inputs travel packed side by side (each sample's inputs
flattened, in the file's order; ``CalibrationData.inputs`` names and shapes them) and are unpacked only where
they meet the model:

* :func:`adapt_model` gives the user's model a ``forward(packed)`` that unpacks by name and calls its own
  ``forward(**inputs)`` (the keys matched to the forward's arguments, checked up front);
* :func:`export_view` is the module the ONNX exporter traces: ``forward(*inputs)`` with the real inputs, so
  model.onnx and model.int8.onnx take the named inputs a deployment feeds;
* :func:`ort_feeds` splits a packed array into onnxruntime feeds by the session's input names and shapes.
"""

from __future__ import annotations

import inspect
import math

import numpy as np
import torch
from torch import nn

from quantkit.data.dtypes import ort_dtype, torch_dtype
from quantkit.errors import DataError

Inputs = tuple[tuple[str, tuple[int, ...]], ...]  # (name, per-sample shape) in packed order
Dtypes = tuple[str | None, ...] | None  # CalibrationData.dtypes: an integer input's dtype, None for float32


def unpack(packed: torch.Tensor, inputs: Inputs, dtypes: Dtypes = None) -> dict[str, torch.Tensor]:
    """Named tensors (N, *shape) from a packed batch (N, F); an input with a dtype in ``dtypes`` (packed order,
    None for float) is cast back to it."""
    parts, start = {}, 0
    for k, (name, shape) in enumerate(inputs):
        size = math.prod(shape)
        parts[name] = _cast(packed[:, start:start + size].reshape(-1, *shape), dtypes[k] if dtypes else None)
        start += size
    return parts


def _cast(x: torch.Tensor, dtype: str | None) -> torch.Tensor:
    return x if dtype is None or x.dtype != torch.float32 else x.to(torch_dtype(dtype))


def _check_names(model: nn.Module, inputs: Inputs) -> None:
    """The .npz keys must name the forward's arguments: every required one, no unknown one."""
    params = [p for p in inspect.signature(type(model).forward).parameters.values()][1:]  # without self
    names = [n for n, _ in inputs]
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return
    accepted = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    required = [p.name for p in params if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    unknown = [n for n in names if n not in accepted]
    missing = [n for n in required if n not in names]
    if unknown or missing:
        raise DataError(f"the .npz arrays {names} do not match {type(model).__name__}.forward({', '.join(accepted)})"
                        + (f": no argument named {unknown}" if unknown else "")
                        + (f": nothing for {missing}" if missing else "")
                        + ". Save one array per forward argument, named after it: numpy.savez(path, "
                        + ", ".join(f"{a}=..." for a in (required or accepted)) + ")")


def adapt_model(model: nn.Module, inputs: Inputs | None, dtypes: Dtypes = None) -> nn.Module:
    """Give ``model`` (in place; returned) a ``forward(packed)`` that calls its own forward with the named inputs
    (``inputs``; None: its one input), each cast back to its integer dtype when ``dtypes`` names one.

    The class is swapped for a subclass, so module names, parameters and state dict stay the user's (layer names
    in the report are unchanged) and copies keep the adapter; torch.fx traces through the unpacking."""
    if inputs:
        _check_names(model, inputs)
    base = type(model)

    def forward(self, packed: torch.Tensor):
        if not inputs:  # one input saved as integers (token ids): the model gets them as such
            return base.forward(self, _cast(packed, dtypes[0]))
        return base.forward(self, **unpack(packed, inputs, dtypes))

    model.__class__ = type(base.__name__, (base,), {"forward": forward, "__module__": base.__module__,
                                                     "_quantkit_base": base, "_quantkit_inputs": inputs})
    return model


def _export_module(model: nn.Module, inputs: Inputs | None) -> nn.Module:
    """``model`` with ``forward(*named inputs)`` (``inputs`` None: its one input, as saved): a subclass instance
    sharing its modules, parameters and buffers (no wrapper scope), so ONNX initializers and node names are the
    model's own (``c1.weight``, ``/c1/Conv``)."""
    cls, names = type(model), [n for n, _ in inputs or ()]
    base = getattr(cls, "_quantkit_base", None)

    def forward(self, *xs: torch.Tensor):
        if base is not None:  # the user's own forward: a graph without packing ops
            out = base.forward(self, **dict(zip(names, xs))) if names else base.forward(self, *xs)
            if getattr(self, "_quantkit_output_names", None):  # a structured output, flattened (models.outputs)
                from torch.utils._pytree import tree_leaves

                out = tuple(tree_leaves(out))
            return out
        # a torch.fx rewrite of the adapted model (residual adds as modules) traced the unpacking into its graph
        return cls.forward(self, torch.cat([x.reshape(x.shape[0], -1).float() for x in xs], dim=1))

    view = cls.__new__(type(cls.__name__, (cls,), {"forward": forward, "__module__": cls.__module__}))
    view.__dict__ = model.__dict__.copy()  # the same _modules / _parameters / _buffers dicts
    return view


def export_view(model: nn.Module, example: torch.Tensor, inputs: Inputs | None, dtypes: Dtypes = None):
    """(module, example args, input names) for the exporter: the model itself for one float input, else a view
    of it that takes the named inputs, each in its saved dtype (the graphs' inputs then are int64 token ids, not
    floats)."""
    if not inputs and not dtypes:
        return model, (example,), None
    if not inputs:
        return _export_module(model, None), (_cast(example, dtypes[0]),), None
    return _export_module(model, inputs), tuple(unpack(example, inputs, dtypes).values()), [n for n, _ in inputs]


def ort_feeds(session_inputs, x: np.ndarray) -> dict[str, np.ndarray]:
    """onnxruntime feeds for ``x``: the array itself for a one-input graph, else ``x`` (N, F) split in the
    graph's input order by each input's per-sample shape (the order and shapes the export wrote); each in the
    type the graph declares (an integer input gets the whole numbers it was calibrated with,
    ``quantkit.data.dtypes``)."""
    if len(session_inputs) == 1:
        return {session_inputs[0].name: x.astype(ort_dtype(session_inputs[0].type), copy=False)}
    feeds, start = {}, 0
    for inp in session_inputs:
        shape = [int(d) for d in inp.shape[1:]]
        size = math.prod(shape)
        feeds[inp.name] = x[:, start:start + size].reshape(x.shape[0], *shape).astype(ort_dtype(inp.type), copy=False)
        start += size
    return feeds
