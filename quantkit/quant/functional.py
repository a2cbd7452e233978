"""Expose functional residual adds (``x + y`` in a forward) as :class:`~quantkit.models.ops.Add` modules.

Models built from our blocks already use ``Add``; for a user's model we trace it with ``torch.fx`` and rewrite
every tensor-tensor add into a call of a new ``Add`` submodule, choosing as ``skip`` the input that does not
come straight from a conv (through BN/activations), so TensorRT can fuse the add into that conv. A model fx
cannot trace is returned unchanged with a note; nothing is dropped silently.
"""

from __future__ import annotations

import operator

import torch
from torch import fx, nn

from quantkit.models.ops import Add, Concat

_PASS_THROUGH = (nn.BatchNorm2d, nn.ReLU, nn.ReLU6, nn.SiLU, nn.Hardswish, nn.LeakyReLU, nn.Identity, nn.GELU)
_CONV = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)


class _LeafTracer(fx.Tracer):
    """Keeps quantkit's op modules opaque so they are never re-wrapped."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (Add, Concat)) or super().is_leaf_module(m, qualname)


def _from_conv(modules: dict[str, nn.Module], node: fx.Node) -> bool:
    """True when ``node`` is a conv output, possibly through BN/activation modules or relu functions."""
    while isinstance(node, fx.Node):
        if node.op == "call_module":
            m = modules[node.target]
            if isinstance(m, _CONV):
                return True
            if not isinstance(m, _PASS_THROUGH):
                return False
        elif node.op == "call_function" and node.target in (torch.relu, nn.functional.relu, nn.functional.silu):
            pass
        else:
            return False
        node = node.args[0] if node.args else None
    return False


def expose_residual_adds(model: nn.Module) -> tuple[nn.Module, list[str]]:
    """Return (model, notes). Adds between two tensors become ``Add`` modules named ``qk_add_<i>``."""
    if not any(isinstance(m, _CONV) for m in model.modules()):
        return model, []
    if any(isinstance(m, Add) for m in model.modules()):
        return model, []  # the model marks its residual adds itself (our blocks do); keep its names
    try:
        gm = fx.GraphModule(model, _LeafTracer().trace(model), type(model).__name__)
    except Exception as exc:  # fx raises many types for untraceable code
        return model, [
            f"residual adds not exposed: torch.fx cannot trace {type(model).__name__} ({type(exc).__name__}); "
            "functional adds stay in float. Use quantkit.models.ops.Add in the model to quantize them"
        ]
    count = 0
    modules = dict(gm.named_modules())
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in (operator.add, torch.add, operator.iadd):
            continue
        if len(node.args) != 2 or node.kwargs or not all(isinstance(a, fx.Node) for a in node.args):
            continue
        a, b = node.args
        a_conv = _from_conv(modules, a)
        if not (a_conv or _from_conv(modules, b)):
            continue
        main, skip = (a, b) if a_conv else (b, a)
        name = f"qk_add_{count}"
        count += 1
        gm.add_submodule(name, Add())
        with gm.graph.inserting_before(node):
            new = gm.graph.call_module(name, (main, skip))
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
    if count == 0:
        return model, []
    gm.graph.lint()
    gm.recompile()
    for attr in ("default_input_size",):
        if hasattr(model, attr):
            setattr(gm, attr, getattr(model, attr))
    return gm, [f"exposed {count} functional residual add(s) as Add modules (qk_add_*) via torch.fx"]
