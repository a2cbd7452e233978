"""Models whose forward returns a dict, a named tuple or nested lists of tensors (torchvision's segmentation
models return ``{"out": ..., "aux": ...}``; many packages return a dataclass-like mapping).

Every stage compares, splits and exports outputs as a flat sequence of tensors, so such a model is given, as it
is, a forward that returns its tensors flattened in the structure's own order (``torch.utils._pytree``: dict
insertion order, tuple / list order, named-tuple field order), each named after its path (``out``, ``aux``,
``heads_0``; a tuple's items ``output_0``, ``output_1_mask``). The graphs' outputs take those names. The user's object is not changed: a view sharing its
modules, parameters and buffers carries the flattening (a torch.fx ``GraphModule`` gets its output node
rewritten instead, which survives the copies the passes make).
"""

from __future__ import annotations

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from quantkit.errors import ModelError

NAMES_ATTR = "_quantkit_output_names"


def is_flat(out) -> bool:
    """A tensor, or a tuple / list of tensors: what every stage takes as it is."""
    return isinstance(out, torch.Tensor) or (isinstance(out, (tuple, list)) and not hasattr(out, "_fields")
                                             and all(isinstance(t, torch.Tensor) for t in out))


def _key(k) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def output_names(out) -> list[str]:
    """Names of the tensors of a structured output, in flattening order; ModelError for a leaf that is not a
    tensor (an int, a string: nothing a graph can return)."""
    leaves, _ = pytree.tree_flatten_with_path(out)
    names = []
    for path, leaf in leaves:
        name = "_".join(_key(k) for k in path) or "output"
        if not isinstance(leaf, torch.Tensor):
            raise ModelError(f"model output '{name}' is a {type(leaf).__name__}, not a tensor: quantkit exports "
                             "tensors; return only tensors from forward (drop or wrap the others)")
        name = name.replace("/", "_").replace(" ", "_")
        names.append(f"output_{name}" if name[0].isdigit() else name)  # a tuple's items: output_0, output_1_a
    seen: dict[str, int] = {}
    for i, n in enumerate(names):  # keys that collide once joined (a "a_b" key beside a["b"]) get a suffix
        seen[n] = seen.get(n, 0) + 1
        if seen[n] > 1:
            names[i] = f"{n}_{seen[n] - 1}"
    return names


def _flat_tuple(out):
    return tuple(pytree.tree_leaves(out))


def flatten_outputs(model: nn.Module, names: list[str]) -> nn.Module:
    """``model`` returning its outputs flattened (see the module docstring), named ``names``."""
    if isinstance(model, fx.GraphModule):
        out_node = next(n for n in model.graph.nodes if n.op == "output")
        out_node.args = (tuple(pytree.tree_leaves(out_node.args[0])),)
        model.graph.lint()
        model.recompile()
        setattr(model, NAMES_ATTR, list(names))
        model.meta.setdefault("_user_preserved_attributes", {})[NAMES_ATTR] = list(names)
        return model
    cls = type(model)

    def forward(self, *args, **kwargs):
        return _flat_tuple(cls.forward(self, *args, **kwargs))

    view = cls.__new__(type(cls.__name__, (cls,), {"forward": forward, "__module__": cls.__module__,
                                                   "__qualname__": cls.__qualname__}))
    view.__dict__ = dict(model.__dict__)  # the same _modules / _parameters / _buffers dicts, own attributes
    setattr(view, NAMES_ATTR, list(names))
    return view
