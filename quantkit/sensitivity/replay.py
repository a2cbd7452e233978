"""Prefix replay: re-run a forward from one module's first call on, reusing a recorded pass for the rest.

``Replayer`` wraps every submodule's ``forward``; ``record`` keeps a full pass's reusable call outputs and
``replay`` returns them for every call that ended before a given clock, so a sensitivity configuration that
changes one layer costs only the part of the forward from that layer on. Used by
``quantkit.sensitivity.analysis``.
"""

from __future__ import annotations

import bisect
import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from quantkit.quant.tensor_quantizer import TensorQuantizer

if TYPE_CHECKING:
    from typing_extensions import Self


def _tensors(x):
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (tuple, list)):
        for v in x:
            yield from _tensors(v)
    elif isinstance(x, dict):
        for v in x.values():
            yield from _tensors(v)


@dataclass
class _Node:
    start: int
    parent: int
    end: int = -1
    output: object = None
    versions: list = field(default_factory=list)
    usable: bool = False
    mutates: bool = False  # the call modified one of its inputs in place (itself, or a module inside it)


@dataclass
class Record:
    """One recorded forward: call tree keyed (parent node, module id, k-th call in parent), clock per call."""

    tree: dict = field(default_factory=dict)
    nodes: list = field(default_factory=list)
    first_start: dict = field(default_factory=dict)  # module id -> clock of its first call
    output: object = None
    first_time: dict = field(default_factory=dict)  # module id -> time.perf_counter() at its first call
    t_start: float = 0.0  # time.perf_counter() around the recorded forward
    t_end: float = 0.0

    def tail_fraction(self, module_id: int) -> float | None:
        """Share of the recorded forward's wall time from the module's first call to the end: about what a
        replay from that module costs, as a fraction of a full forward (None: never called)."""
        t = self.first_time.get(module_id)
        span = self.t_end - self.t_start
        if t is None or span <= 0:
            return None
        return min(max((self.t_end - t) / span, 0.0), 1.0)


class Replayer:
    """Wraps the ``forward`` of every submodule of ``model`` (quantizers excluded) until ``close()``.

    ``record(x)`` runs a full forward and keeps the outputs that a later ``replay`` could reuse (calls that
    end before some cut module starts, inside a parent that is still running then). ``replay(x, rec, start)``
    returns ``rec``'s output for every call that ended before clock ``start`` without computing it.
    Outputs modified in place during the recorded pass are never reused (``tensor._version`` check), nor calls
    that modify one of their inputs in place (reusing one would lose its effect on a recomputed input, as on
    torchvision's VGG-BN slices in CRAFT: a slice starts with ``ReLU(inplace=True)`` on the previous slice's output,
    which is also kept as a skip); calls the record does not know (data-dependent control flow) simply run. Works on any eager module, no tracing.
    """

    def __init__(self, model: nn.Module, cut_modules: list[nn.Module]):
        self.model = model
        self._cut_ids = [id(m) for m in cut_modules]
        self._patched: list[tuple[nn.Module, object]] = []
        self._mode: str | None = None
        self._rec = Record()
        self._limit = -1
        self._clock = 0
        self._stack: list = []
        for name, m in model.named_modules():
            if name and not isinstance(m, TensorQuantizer):
                old = m.__dict__.get("forward")
                try:
                    m.forward = self._wrap(id(m), m.forward)
                except (AttributeError, RuntimeError, TypeError):  # e.g. TorchScript modules: they just run
                    continue
                self._patched.append((m, old))

    def close(self) -> None:
        for m, old in self._patched:
            if old is None:
                m.__dict__.pop("forward", None)
            else:
                m.forward = old
        self._patched = []

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start_of(self, rec: Record, module: nn.Module) -> int | None:
        """Clock of ``module``'s first call in ``rec`` (None: never called)."""
        return rec.first_start.get(id(module))

    def _run(self, mode: str, rec: Record, limit: int, x: torch.Tensor):
        self._mode, self._rec, self._limit, self._clock = mode, rec, limit, 0
        self._stack = [(-1, {})]
        try:
            with torch.no_grad():
                return self.model(x)
        finally:
            self._mode = None

    def record(self, x: torch.Tensor) -> Record:
        rec = Record()
        rec.t_start = time.perf_counter()
        rec.output = self._run("record", rec, -1, x)
        rec.t_end = time.perf_counter()
        starts = sorted(rec.first_start[i] for i in self._cut_ids if i in rec.first_start)
        for node in rec.nodes:
            parent_end = rec.nodes[node.parent].end if node.parent >= 0 else math.inf
            i = bisect.bisect_right(starts, node.end)
            keep = i < len(starts) and starts[i] < parent_end
            node.usable = keep and not node.mutates and all(t._version == v for t, v in node.versions)
            if not node.usable:
                node.output, node.versions = None, []
        return rec

    def replay(self, x: torch.Tensor, rec: Record, start: int):
        return self._run("replay", rec, start, x)

    def _wrap(self, mid: int, forward):
        def wrapped(*args, **kwargs):
            if self._mode is None:
                return forward(*args, **kwargs)
            parent, counts = self._stack[-1]
            k = counts.get(mid, 0)
            counts[mid] = k + 1
            rec = self._rec
            if self._mode == "record":
                nid = len(rec.nodes)
                rec.tree[(parent, mid, k)] = nid
                node = _Node(start=self._clock, parent=parent)
                rec.nodes.append(node)
                if mid not in rec.first_start:
                    rec.first_start[mid] = self._clock
                    rec.first_time[mid] = time.perf_counter()
                self._clock += 1
            else:
                nid = rec.tree.get((parent, mid, k)) if parent is not None else None
                node = rec.nodes[nid] if nid is not None else None
                if node is not None and node.usable and node.end < self._limit:
                    if any(t._version != v for t, v in node.versions):
                        raise RuntimeError("a replayed output was modified in place; please report this model")
                    return node.output
            before = [(t, t._version) for t in _tensors((args, kwargs))] if self._mode == "record" else ()
            self._stack.append((nid, {}))
            try:
                out = forward(*args, **kwargs)
            finally:
                self._stack.pop()
            if self._mode == "record":
                node.end = self._clock
                self._clock += 1
                node.output = out
                node.versions = [(t, t._version) for t in _tensors(out)]
                # a call that modifies its input in place (ReLU(inplace=True), or a Sequential starting with one)
                # is never reused: when its input is recomputed in a replay, the modification must happen again
                node.mutates = any(t._version != v for t, v in before)
            return out

        return wrapped
