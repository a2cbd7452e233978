"""PTQ passes behind one small protocol, and the ordered registry of the default ones.

A pass is an object with a ``name``, the target capabilities it ``needs`` (``"torch"``, ``"autograd"``), an
``enabled(recipe)`` test and ``apply(target, data) -> PassResult``. ``target`` is what is being quantized: on the
torch route the ``state.QuantState`` (its fake-quant model, calibration and layout; capabilities ``torch``,
``autograd``), on the ONNX route an ``onnxin.target.OnnxTarget`` (the graph, its placement and scales, run in
onnxruntime; capability ``onnx``). A default pass runs on a target of another kind through the implementation its
front end registered (:func:`register_implementation`); ``data`` is a :class:`PassData`: the *fit* part of the
calibration set (the passes fit on it) and a ``measure()`` that returns the current INT8-vs-FP32 output SQNR on
the *check* part (never fitted on). The guard (``quantkit.ptq.guard``) runs the passes in order and keeps each one
only when the check SQNR improved; otherwise it restores the state exactly.

Adding a pass::

    from quantkit.ptq.passes import PassResult, register_pass

    class MyPass:
        name, needs = "my_pass", ("torch",)
        def enabled(self, recipe): return True
        def apply(self, target, data):
            ...  # change target.model.qmodel (weights, biases, amax) using data.fit
            return PassResult(self.name, changed="what changed, in words", measured={"x": 1.0})

    register_pass(MyPass())          # appended after the defaults; before="bias_correction" to go earlier
"""

from __future__ import annotations

import math

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, runtime_checkable

from quantkit.errors import UsageError


@dataclass
class PassResult:
    """What one pass did. ``changed``: what it changed, in words ("" or None: nothing). ``measured``: what it
    measured (JSON-ready). The guard fills ``db_before``/``db_after`` (worst-output SQNR in dB against FP32 on the
    check images; a pass that measured its final state with ``data.measure`` may set ``db_after`` itself, saving a
    forward), ``kept`` and ``verdict``; ``seconds`` is wall time (run record only, not in report.json)."""

    name: str
    changed: str | None = None
    measured: dict = field(default_factory=dict)
    tried: bool = True
    required: bool = False  # the recipe demands the change (e.g. an accuracy budget the user set): never reverted
    kept: bool | None = None
    verdict: str = ""
    db_before: float | None = None
    db_after: float | None = None
    seconds: float = 0.0

    def as_dict(self) -> dict:
        """JSON-ready: dB rounded to 0.001, an infinite SQNR (outputs identical to FP32) as "inf"."""
        return {"name": self.name, "tried": self.tried, "kept": self.kept, "verdict": self.verdict,
                "changed": self.changed or None, "check_sqnr_db_before": json_db(self.db_before),
                "check_sqnr_db_after": json_db(self.db_after), "measured": json_db(self.measured)}

    def log_line(self) -> str:
        if not self.tried:
            return f"{self.name}: not tried ({self.verdict})"
        if self.db_before is None or self.db_after is None:
            return f"{self.name}: {self.verdict}"
        return f"{self.name}: {self.verdict} ({self.db_before:.2f} -> {self.db_after:.2f} dB on the check images)"


def json_db(v):
    """``v`` with every float rounded to 0.001 and made JSON-safe (+/-inf as "inf"/"-inf", NaN as None), through
    nested dicts and lists."""
    if isinstance(v, dict):
        return {k: json_db(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [json_db(x) for x in v]
    if isinstance(v, float) or (hasattr(v, "dtype") and getattr(v, "ndim", 1) == 0):
        f = float(v)
        if math.isnan(f):
            return None
        return ("inf" if f > 0 else "-inf") if math.isinf(f) else round(f, 3)
    return v


def passes_json(record: dict) -> dict:
    """report.json ``passes`` from the guard's record (``ptq.guard.run_passes`` sets it on the target): its fields,
    each step's :meth:`PassResult.as_dict`."""
    return {**{k: v for k, v in record.items() if k != "steps"}, "steps": [r.as_dict() for r in record["steps"]]}


@dataclass
class PassData:
    """What a pass gets besides the target. ``fit``: the calibration images it may fit on (a view with
    ``batches(limit, spread=)`` and ``num_samples``, like ``data.calib.CalibrationData``). ``measure()``: the
    target's current worst-output SQNR (dB) against FP32 on the check images (None when the set was too small to
    split). ``extras``: pipeline context (evaluation data sets, progress flag)."""

    fit: Any
    measure: Callable[[], float] | None = None
    extras: dict = field(default_factory=dict)
    current_db: float | None = None  # the check SQNR of the state as the pass receives it (already measured)


@runtime_checkable
class PtqPass(Protocol):
    """The protocol every PTQ pass follows (see the module docstring)."""

    name: str
    needs: tuple[str, ...]

    def enabled(self, recipe) -> bool: ...

    def apply(self, target, data: PassData) -> PassResult: ...


@runtime_checkable
class GuardedTarget(Protocol):
    """What the guard (``ptq.guard.run_passes``) needs of a target besides ``recipe`` and ``data``: ``checker(rows)``
    (a callable returning the worst output's SQNR in dB against FP32 on calibration ``rows``, with a ``count`` of
    forwards run), ``snapshot()`` of everything a pass may change, and ``restore(snapshot)``. The ONNX route's
    ``OnnxTarget`` has them itself; ``ptq.guard.TorchOps`` gives them to the torch route's ``QuantState``."""

    def checker(self, rows: list[int]) -> Callable[[], float]: ...

    def snapshot(self) -> Any: ...

    def restore(self, snap: Any) -> None: ...


_REGISTRY: list[PtqPass] = []


def register_pass(p: PtqPass, *, before: str | None = None) -> PtqPass:
    """Add ``p`` to the ordered registry (at the end, or before the pass named ``before``). Returns ``p``."""
    if not isinstance(p, PtqPass):
        raise UsageError(f"{p!r} is not a PTQ pass: it needs name, needs, enabled(recipe) and apply(target, data)")
    if any(q.name == p.name for q in _REGISTRY):
        raise UsageError(f"a PTQ pass named {p.name!r} is already registered: pick another name "
                         "(or unregister_pass it first)")
    names = [q.name for q in _REGISTRY]
    if before is not None and before not in names:
        raise UsageError(f"no registered pass {before!r} to insert before; registered: {', '.join(names)}")
    _REGISTRY.insert(names.index(before) if before else len(_REGISTRY), p)
    return p


def unregister_pass(name: str) -> None:
    """Remove the registered pass called ``name`` (no error when absent)."""
    _REGISTRY[:] = [q for q in _REGISTRY if q.name != name]


def registered_passes() -> list[PtqPass]:
    """The passes in the order they run."""
    return list(_REGISTRY)


@dataclass(frozen=True)
class Implementation:
    """How a default pass runs on a target of another ``kind`` (the ONNX route's graph): ``apply(target, data) ->
    PassResult`` and the capabilities it needs for a recipe (``needs(recipe) -> tuple``)."""

    apply: Callable
    needs: Callable = lambda recipe: ()


_IMPLEMENTATIONS: dict[tuple[str, str], Implementation] = {}


def register_implementation(pass_name: str, kind: str, apply: Callable, needs: Callable | None = None) -> None:
    """Run the registered pass ``pass_name`` on targets whose ``kind`` is ``kind`` with ``apply`` instead of the
    pass's own (``ptq.guard.run_passes`` picks it; replaces a previous one). A front end registers its target's
    implementations of the default passes this way, so one registry and one guard serve every route."""
    _IMPLEMENTATIONS[(pass_name, kind)] = Implementation(apply, needs or (lambda recipe: ()))


def target_kind(target) -> str:
    """``target.kind`` (the ONNX route's ``"onnx"``), else ``"torch"`` (the prepared torch state)."""
    return getattr(target, "kind", "torch")


def implementation_for(pass_name: str, target) -> Implementation | None:
    """The implementation of ``pass_name`` registered for ``target``'s kind, or None (the pass's own ``apply``)."""
    return _IMPLEMENTATIONS.get((pass_name, target_kind(target)))


def pass_needs(p, recipe, target) -> tuple[str, ...]:
    """What pass ``p`` needs from ``target`` for ``recipe``: its registered implementation's, else its own."""
    impl = implementation_for(p.name, target)
    if impl is not None:
        return tuple(impl.needs(recipe))
    return tuple(p.needs_for(recipe) if hasattr(p, "needs_for") else p.needs)


def refuse_unrunnable(passes, recipe, target) -> None:
    """UsageError for the first enabled pass of ``passes`` that ``target`` cannot run (before any work is done)."""
    for p in passes:
        if p.enabled(recipe):
            check_needs(p.label(recipe) if hasattr(p, "label") else p.name, pass_needs(p, recipe, target), target)


def target_capabilities(target) -> set[str]:
    """What ``target`` can do for a pass: a torch fake-quant model runs ("torch") and differentiates
    ("autograd"); a target may declare its own with a ``capabilities`` attribute."""
    caps = getattr(target, "capabilities", None)
    if caps is not None:
        return set(caps)
    return {"torch", "autograd"} if hasattr(getattr(target, "model", None), "qmodel") else set()


def check_needs(name: str, needs, target) -> None:
    """UsageError naming the pass ``name`` and what ``target`` lacks of ``needs``, before the pass runs."""
    missing = [n for n in needs if n not in target_capabilities(target)]
    if missing:
        route = getattr(target, "route_name", "this model route")
        raise UsageError(f"PTQ pass {name!r} needs {', '.join(missing)}, which {route} cannot provide "
                         f"(e.g. learned rounding needs autograd): turn the pass off in the recipe")


__all__ = ["PassResult", "PassData", "PtqPass", "register_pass", "unregister_pass", "registered_passes",
           "target_capabilities", "check_needs", "register_implementation", "implementation_for", "pass_needs",
           "refuse_unrunnable", "target_kind", "GuardedTarget", "passes_json"]
