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
from quantkit.quant.registry import WEIGHTED_BASES

_PASS_THROUGH = (nn.BatchNorm2d, nn.ReLU, nn.ReLU6, nn.SiLU, nn.Hardswish, nn.LeakyReLU, nn.Identity, nn.GELU)
_LINEAR_PASS = (nn.BatchNorm2d, nn.Identity)  # folded into the conv: the add can still fuse
_CONV = WEIGHTED_BASES  # convs of any dimension and linears, subclasses included


class _LeafTracer(fx.Tracer):
    """Keeps quantkit's op modules opaque so they are never re-wrapped, and every conv / linear (subclasses
    included): traced through, a subclass's conv would become an inline call that no quantizer wraps."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (Add, Concat, *_CONV)) or super().is_leaf_module(m, qualname)


def _conv_distance(modules: dict[str, nn.Module], node: fx.Node) -> int | None:
    """0 when ``node`` is a conv output (through BN/Identity only), 1 when through activations too, else None.

    TensorRT fuses an Add into the epilogue of the conv that feeds it directly, so that input is the "main" one.
    """
    through_act = 0
    while isinstance(node, fx.Node):
        if node.op == "call_module":
            m = modules[node.target]
            if isinstance(m, _CONV):
                return through_act
            if not isinstance(m, _PASS_THROUGH):
                return None
            if not isinstance(m, _LINEAR_PASS):
                through_act = 1
        elif node.op == "call_function" and node.target in (torch.relu, nn.functional.relu, nn.functional.silu):
            through_act = 1
        else:
            return None
        node = node.args[0] if node.args else None
    return None


def _rewrite(model: nn.Module) -> tuple[nn.Module, int]:
    """Trace ``model`` with torch.fx and turn its residual adds into ``Add`` modules. Raises when fx cannot trace."""
    gm = fx.GraphModule(model, _LeafTracer().trace(model), type(model).__name__)
    count = 0
    modules = dict(gm.named_modules())
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in (operator.add, torch.add, operator.iadd):
            continue
        if len(node.args) != 2 or node.kwargs or not all(isinstance(a, fx.Node) for a in node.args):
            continue
        a, b = node.args
        da, db = _conv_distance(modules, a), _conv_distance(modules, b)
        if da is None and db is None:
            continue
        main, skip = (a, b) if db is None or (da is not None and da <= db) else (b, a)
        name = f"qk_add_{count}"
        count += 1
        add = Add()
        gm.add_submodule(name, add)
        modules[name] = add  # later adds look back through this one (chained residuals)
        with gm.graph.inserting_before(node):
            new = gm.graph.call_module(name, (main, skip))
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
    if count:
        gm.graph.lint()
        gm.recompile()
    return gm, count


def _preserve(gm: fx.GraphModule, attrs: dict) -> None:
    """Set plain attributes on ``gm`` so that they also survive ``copy.deepcopy`` (which rebuilds a GraphModule
    from its graph; torch.fx restores what ``meta["_user_preserved_attributes"]`` lists)."""
    for key, value in attrs.items():
        setattr(gm, key, value)
    gm.meta.setdefault("_user_preserved_attributes", {}).update(attrs)


def _rewrite_children(parent: nn.Module, prefix: str, stats: dict) -> None:
    """Per-submodule fallback: rewrite every child fx can trace in place, recurse into those it cannot."""
    for name, child in list(parent.named_children()):
        qual = f"{prefix}{name}"
        if isinstance(child, (Add, Concat)) or not any(isinstance(m, _CONV) for m in child.modules()):
            continue
        if isinstance(child, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
            _rewrite_children(child, qual + ".", stats)  # parents index and iterate containers: keep them
            continue
        try:
            gm, count = _rewrite(child)
        except Exception:  # fx raises many types for untraceable code
            stats["untraceable"].append(qual)
            _rewrite_children(child, qual + ".", stats)
            continue
        if count:
            # plain attributes the parent's forward may read from its children (Ultralytics routes its layers by
            # ``m.f`` / ``m.i``) survive the swap
            _preserve(gm, {key: value for key, value in vars(child).items()
                           if not key.startswith("_") and not hasattr(gm, key)
                           and isinstance(value, (bool, int, float, str, list, tuple, type(None)))})
            setattr(parent, name, gm)
            stats["adds"] += count
            stats["traced"] += 1


def expose_residual_adds(model: nn.Module) -> tuple[nn.Module, list[str]]:
    """Return (model, notes). Adds between two tensors become ``Add`` modules named ``qk_add_<i>``.

    Paths, recorded in the note: torch.fx over the whole model; when that fails (data-dependent control flow,
    a detector's post-processing), torch.fx over each submodule it can trace, recursing into those it cannot,
    so the residual blocks are still rewritten; adds in code fx cannot trace at any level stay float, named.
    """
    if not any(isinstance(m, _CONV) for m in model.modules()):
        return model, []
    if any(isinstance(m, Add) for m in model.modules()):
        return model, []  # the model marks its residual adds itself (our blocks do); keep its names
    try:
        gm, count = _rewrite(model)
    except Exception as exc:  # fx raises many types for untraceable code
        stats = {"adds": 0, "traced": 0, "untraceable": []}
        _rewrite_children(model, "", stats)
        why = f"torch.fx cannot trace {type(model).__name__} as a whole ({type(exc).__name__})"
        if not stats["adds"]:
            return model, [f"residual adds not exposed: {why}, nor any submodule with adds; functional adds stay "
                           "in float. Use quantkit.models.ops.Add in the model to quantize them"]
        left = stats["untraceable"]
        return model, [f"exposed {stats['adds']} functional residual add(s) as Add modules (qk_add_*) via torch.fx "
                       f"per submodule ({stats['traced']} submodule(s) traced; {why})"
                       + (f"; not traceable, so any add written directly in their forward stays float: "
                          f"{', '.join(left[:5])}{f' (+{len(left) - 5} more)' if len(left) > 5 else ''}" if left else "")]
    if count == 0:
        return model, []
    _preserve(gm, {a: getattr(model, a) for a in ("default_input_size",) if hasattr(model, a)})
    return gm, [f"exposed {count} functional residual add(s) as Add modules (qk_add_*) via torch.fx (whole model)"]


def adds_path(notes: list[str]) -> str:
    """Which path exposed the residual adds, from ``expose_residual_adds``'s notes (for reports and the zoo)."""
    for n in notes:
        if "via torch.fx per submodule" in n:
            return "fx per submodule"
        if "via torch.fx (whole model)" in n:
            return "fx"
        if n.startswith("residual adds not exposed"):
            return "none (untraceable)"
    return "not needed"
