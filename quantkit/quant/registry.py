"""Which float module gets which quantized wrapper: an ``isinstance`` registry users can extend.

Lookup walks the module's class hierarchy (most specific first) for a registered float type:

* ``nn.Conv1d``, ``nn.Conv2d``, ``nn.ConvTranspose2d``, ``nn.Linear`` and quantkit's ``Add`` have dedicated wrappers
  (``quantkit.quant.modules``) for exactly those types;
* every other subclass of ``nn.Conv1d/2d/3d``, ``nn.ConvTranspose1d/2d/3d`` or ``nn.Linear`` — the "same"
  padding convs of EfficientNet ports and timm (``Conv2dSame``), a library's ``Linear`` with extra methods, a 3-D or
  1-D transposed conv — gets :class:`QuantWrapper`, which keeps the module's own ``forward``;
* a type registered with :func:`register_quant_module` gets that wrapper, and so do its subclasses.

:class:`QuantWrapper` runs the float class's ``forward`` unchanged and quantizes at the op: when that forward
passes ``self.weight`` to a conv / conv-transpose / linear function, the function's data input goes through
``_input_quantizer`` and the weight through ``_weight_quantizer``. Padding or reshaping the subclass does
first stays where it is, and the exported graph gets its Q/DQ pair right in front of the Conv / Gemm / MatMul,
where TensorRT looks for it. A forward that never hands ``self.weight`` to such a function (it transforms the
weight first, e.g. weight standardization) is refused with the fix — skip the layer or register a wrapper —
unless the layer is skipped (its weight quantizer disabled).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from quantkit.errors import ModelError, UsageError
from quantkit.models.ops import Add
from quantkit.quant.modules import QuantAdd, QuantConv1d, QuantConv2d, QuantConvTranspose2d, QuantLinear, QuantModule

# the torch bases whose subclasses are quantized without registration (their weight feeds one of _OPS)
WEIGHTED_BASES: tuple[type[nn.Module], ...] = (
    nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear)
WEIGHTED_KINDS = tuple(b.__name__ for b in WEIGHTED_BASES)

# functions whose (input, weight, ...) QuantWrapper quantizes when the weight is the module's own
_OPS = frozenset({F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d,
                  F.linear})

# The swap table: float type -> wrapper. Subclasses of a type whose wrapper is ``exact_only`` go to QuantWrapper
# when they are convs / linears (see the module docstring).
QUANT_MODULES: dict[type[nn.Module], type[nn.Module]] = {
    nn.Conv1d: QuantConv1d,
    nn.Conv2d: QuantConv2d,
    nn.ConvTranspose2d: QuantConvTranspose2d,
    nn.Linear: QuantLinear,
    Add: QuantAdd,
}


def weighted_kind(module_or_type) -> str | None:
    """``"Conv2d"``, ``"Linear"``, ... : the torch base a conv / linear module (float or quantized, subclass or
    not) derives from; None for anything else (a residual Add, an activation)."""
    t = module_or_type if isinstance(module_or_type, type) else type(module_or_type)
    return next((b.__name__ for b in WEIGHTED_BASES if issubclass(t, b)), None)


def register_quant_module(float_type: type[nn.Module], quant_type: type[nn.Module]) -> None:
    """Quantize every module of ``float_type`` (and of its subclasses) with ``quant_type``.

    ``quant_type`` subclasses :class:`~quantkit.quant.modules.QuantModule` and ``float_type``, and its
    ``forward`` applies ``self._input_quantizer`` to the data and ``self._weight_quantizer`` to the weight that
    reach the conv / linear op (``QuantModule.from_float(module, name)`` creates both quantizers). Subclasses
    of the torch convs and ``nn.Linear`` need no registration: :class:`QuantWrapper` keeps their own forward.
    Register a type when its forward changes the weight before the op (weight standardization), or to quantize
    a module that is not a torch conv. Example::

        import quantkit
        quantkit.register_quant_module(StdConv2d, MyQuantStdConv2d)

    Raises UsageError when either argument is not a class of the right kind.
    """
    if not (isinstance(float_type, type) and issubclass(float_type, nn.Module)):
        raise UsageError(f"register_quant_module: float_type must be an nn.Module class, got {float_type!r}")
    if not (isinstance(quant_type, type) and issubclass(quant_type, QuantModule)
            and hasattr(quant_type, "from_float")):
        raise UsageError(f"register_quant_module: {quant_type!r} must subclass quantkit.quant.modules.QuantModule "
                         "(it provides from_float and the quantizers)")
    QUANT_MODULES[float_type] = quant_type


def quant_module_for(float_type: type[nn.Module]) -> type[nn.Module] | None:
    """The wrapper for modules of ``float_type`` (see the module docstring), or None: not quantizable."""
    if issubclass(float_type, QuantModule):
        return None  # already wrapped
    for base in float_type.__mro__:
        wrapper = QUANT_MODULES.get(base)
        if wrapper is not None:
            if base is float_type or not getattr(wrapper, "exact_only", False):
                return wrapper
            break  # the nearest registration is for its base only: a conv subclass gets the generic wrapper
    return QuantWrapper if weighted_kind(float_type) else None


def wrap(module: nn.Module, name: str) -> nn.Module:
    """The quantized wrapper of ``module`` (state shared, quantizers added); UsageError if none applies."""
    wrapper = quant_module_for(type(module))
    if wrapper is None:
        raise UsageError(f"{name}: no quantized wrapper for {type(module).__name__}; register one with "
                         "quantkit.register_quant_module")
    return wrapper.from_float(module, name)


class _AtTheOp(TorchFunctionMode):
    """While a QuantWrapper's forward runs: quantize the data and weight of each conv / linear call that uses
    the layer's own weight, and count those calls."""

    def __init__(self, layer: QuantWrapper):
        super().__init__()
        self.layer = layer
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _OPS:
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            if weight is not None and weight is self.layer._parameters.get("weight"):
                self.calls += 1
                return self.layer._quantized_op(func, args, kwargs)
        return func(*args, **kwargs)


class QuantWrapper(QuantModule):
    """Generic wrapper for a conv / linear subclass (or a conv type without a dedicated wrapper): the float
    class's own ``forward``, with the data and weight of its conv / linear op fake-quantized (see the module
    docstring). Made per float class by :meth:`wrapper_class` (``QuantConv2dSame`` for ``Conv2dSame``)."""

    _float_cls: type[nn.Module] | None = None
    _made: dict[type, type] = {}  # float class -> its wrapper class, made once per process

    @classmethod
    def wrapper_class(cls, float_type: type[nn.Module]) -> type[nn.Module]:
        made = QuantWrapper._made.get(float_type)
        if made is None:
            name = f"Quant{float_type.__name__}"
            made = type(name, (QuantWrapper, float_type), {"_float_cls": float_type, "__qualname__": name,
                                                            "__module__": __name__})
            QuantWrapper._made[float_type] = made
        return made

    @classmethod
    def from_float(cls, module: nn.Module, name: str) -> nn.Module:
        if cls._float_cls is None:  # QuantWrapper itself: pick the class made for this module's type
            return cls.wrapper_class(type(module)).from_float(module, name)
        if not isinstance(module._parameters.get("weight"), torch.Tensor):
            raise UsageError(f"{name}: {type(module).__name__} has no weight parameter to quantize; "
                             "keep it out with quantization.skip")
        return super().from_float(module, name)

    def _weight_axis(self) -> int | None:
        if isinstance(self, nn.modules.conv._ConvTransposeNd):  # weight [in, out/groups, k...]
            return 1 if self.groups == 1 else None
        return 0

    def forward(self, *args, **kwargs):
        at_op = _AtTheOp(self)
        with at_op:
            out = self._float_cls.forward(self, *args, **kwargs)
        if at_op.calls:
            return out
        if self._weight_quantizer.enabled:  # the selection wants it INT8 (calibration leaves weight quantizers be)
            layer = self._input_quantizer.name.rsplit(".", 1)[0]
            raise ModelError(
                f"layer {layer} ({self._float_cls.__name__}): its forward never passes self.weight to a conv or "
                "linear function, so quantkit cannot place its quantizers (it may transform the weight first). "
                f"Keep it float with quantization.skip=['{layer}'], or register a quantized wrapper for "
                f"{self._float_cls.__name__} with quantkit.register_quant_module")
        if args:  # a skipped layer is calibrated like every other one (no op to hook: at its entry)
            self._input_quantizer(args[0])
        return out

    def _quantized_op(self, func, args: tuple, kwargs: dict) -> torch.Tensor:
        """``func`` on the quantized data and weight; the other arguments as given."""
        args, kwargs = list(args), dict(kwargs)
        x = args.pop(0) if args else kwargs.pop("input")
        w = args.pop(0) if args else kwargs.pop("weight")
        xq = self._input_quantizer(x)
        self._last_op = (func, tuple(args), dict(kwargs))
        if func is F.linear and x.dim() > 2:  # exported as MatMul(x, W^T): quantize W^T on its output axis 1
            bias = args[0] if args else kwargs.get("bias")
            y = torch.matmul(xq, self._weight_quantizer.forward_along(w.t(), axis=1))
            return y if bias is None else y + bias
        return func(xq, self._weight_quantizer(w), *args, **kwargs)

    def replay(self, *inputs: torch.Tensor) -> torch.Tensor:
        """The last call's conv / linear op on ``inputs[0]`` as it reaches the op (after the subclass's own
        padding), which is what the graph's Conv / Gemm / MatMul node sees."""
        op = getattr(self, "_last_op", None)
        if op is None:
            return self(*inputs)
        func, args, kwargs = op
        return self._quantized_op(func, (inputs[0], self.weight, *args), kwargs)
