"""Insert quantizers into a model according to a selection of layer names / types.

Every layer the registry (``quantkit.quant.registry``: convs and linears, their subclasses included, and
residual Adds) can wrap is wrapped (so one calibration covers all of them); layers the
selection leaves out keep their quantizers disabled, which exports them without Q/DQ (they run FP16 in
TensorRT). Patterns are ``fnmatch`` globs over module names (``neck.*``) or ``type:Name`` over module type
names (``type:Linear``); a pattern that matches nothing is an error, never silently ignored.
"""

from __future__ import annotations

import copy
import difflib
import fnmatch
from dataclasses import dataclass, field

from torch import Tensor, nn

from quantkit.errors import UsageError
from quantkit.quant.modules import QUANT_TYPES
from quantkit.quant.registry import QuantWrapper, quant_module_for, wrap
from quantkit.quant.tensor_quantizer import TensorQuantizer
from quantkit.quote import cap


@dataclass
class QuantLayout:
    """Which layers were wrapped and which of them run INT8.

    layers: module name -> layer type name (float type), for every wrapped layer, in module order.
    int8: module names whose quantizers are enabled.
    pattern_hits: pattern -> matched module names (for the report).
    notes: anything the insertion could not do (e.g. functional adds that could not be exposed).
    reasons: module name -> why it has its precision (set by automatic selection).
    """

    layers: dict[str, str] = field(default_factory=dict)
    int8: list[str] = field(default_factory=list)
    pattern_hits: dict[str, list[str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    reasons: dict[str, str] = field(default_factory=dict)

    def precision(self, name: str) -> str:
        return "int8" if name in self.int8 else "fp16"

    def as_dict(self) -> dict:
        return {
            "layers": {n: {"type": t, "precision": self.precision(n)} for n, t in self.layers.items()},
            "pattern_hits": self.pattern_hits,
            "notes": list(self.notes),
        }


def _matches(pattern: str, name: str, type_name: str) -> bool:
    if pattern.startswith("type:"):
        return fnmatch.fnmatchcase(type_name, pattern[5:])
    return fnmatch.fnmatchcase(name, pattern)


def _closest(pattern: str, names: list[str], types: list[str]) -> str:
    if pattern.startswith("type:"):
        close = difflib.get_close_matches(pattern[5:], sorted(set(types)), n=3, cutoff=0.3)
        return ", ".join(f"type:{c}" for c in close) or ", ".join(f"type:{t}" for t in sorted(set(types)))
    stem = pattern.replace("*", "").replace("?", "")
    close = difflib.get_close_matches(stem, names, n=5, cutoff=0.3)
    return ", ".join(cap(c, 80) for c in close or names[:5])  # names come from the user's model: bounded


def select_layers(candidates: dict[str, str], quantize: tuple[str, ...], skip: tuple[str, ...]) -> tuple[list[str], dict]:
    """Resolve patterns over ``candidates`` (name -> type name). Returns (int8 names, pattern hits).

    Raises UsageError for a pattern that matches no quantizable layer, listing the closest layer names.
    """
    names = list(candidates)
    types = list(candidates.values())
    hits: dict[str, list[str]] = {}
    for pattern in (*quantize, *skip):
        matched = [n for n, t in candidates.items() if _matches(pattern, n, t)]
        if not matched:
            raise UsageError(
                f"pattern '{cap(pattern, 80)}' matches no quantizable layer; closest: {_closest(pattern, names, types)}. "
                "Run `quantkit layers MODEL` to list layer names"
            )
        hits[pattern] = matched
    chosen = [n for n in names if any(n in hits[p] for p in quantize) and not any(n in hits[p] for p in skip)]
    return chosen, hits


def quantizable_layers(model: nn.Module) -> dict[str, str]:
    """Name -> type name of every module the registry can wrap (subclasses of convs and linears included), in
    module order. ``type:`` patterns match these names (``type:Conv2dSame``)."""
    return {n: type(m).__name__ for n, m in model.named_modules() if n and _wrappable(m)}


def _wrappable(m: nn.Module) -> bool:
    wrapper = quant_module_for(type(m))
    # a conv / linear subclass that keeps its weight elsewhere (a buffer, a computed property) has nothing to wrap
    return wrapper is not None and (wrapper is not QuantWrapper or isinstance(m._parameters.get("weight"), Tensor))


def insert_quantizers(
    model: nn.Module,
    quantize: tuple[str, ...] = ("*",),
    skip: tuple[str, ...] = (),
    residual_add: bool = True,
) -> tuple[nn.Module, QuantLayout]:
    """Return a deep copy of ``model`` with quantized wrappers and the resulting layout.

    ``residual_add=False`` leaves residual Adds unwrapped (they then stay in float in the export).
    """
    qmodel = copy.deepcopy(model)
    candidates = quantizable_layers(qmodel)
    if not residual_add:
        candidates = {n: t for n, t in candidates.items() if t != "Add"}
    chosen, hits = select_layers(candidates, quantize, skip)
    layout = QuantLayout(layers=dict(candidates), int8=chosen, pattern_hits=hits)
    for name in candidates:
        parent_name, _, child = name.rpartition(".")
        parent = qmodel.get_submodule(parent_name) if parent_name else qmodel
        module = getattr(parent, child)
        setattr(parent, child, wrap(module, name))
    set_precision(qmodel, set(chosen))
    return qmodel, layout


def set_precision(qmodel: nn.Module, int8_layers: set[str]) -> None:
    """Enable the quantizers of ``int8_layers`` and disable all others (those layers then run in float)."""
    for name, m in qmodel.named_modules():
        if isinstance(m, QUANT_TYPES):
            for q in m.children():
                if isinstance(q, TensorQuantizer):
                    q.enable() if name in int8_layers else q.disable()
