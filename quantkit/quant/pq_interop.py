"""Move calibrated state between quantkit and pytorch-quantization (2.1.3) models.

Both name their state the same way (``<layer>._input_quantizer._amax``, a scalar; ``<layer>._weight_quantizer._amax``,
``[C,1,1,1]`` for a conv weight, ``[C,1]`` for a linear one), so a plain ``load_state_dict`` almost works. What it
misses, and what these helpers add:

* quantkit's activation quantizers have no ``_amax`` buffer before calibration, so ``load_state_dict`` would call
  every calibrated amax "unexpected"; :func:`load_pq_state` sets them through the quantizer (finite, > 0 checked).
* pytorch-quantization creates a missing ``_amax`` buffer with ``.cuda()`` while loading, which fails without a GPU;
  :func:`load_into_pq` registers CPU buffers of the right shape first.
* a per-tensor weight amax (pq descriptors without ``axis``) is expanded to quantkit's per-channel layout (the
  same scale on every channel, so the quantized weights are identical).
* every key that has no counterpart is listed in one :class:`~quantkit.errors.WeightsError` instead of surfacing
  as a shape error deep inside torch or as a silently dynamic (uncalibrated) pq quantizer.

pytorch-quantization has no residual-add quantizer, so :func:`to_pq_state` leaves quantkit's ``QuantAdd`` amaxes out
unless asked; calibrate those with quantkit after loading a pq state (or insert with ``residual_add=False``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import torch
from torch import nn

from quantkit.errors import CalibrationError, WeightsError
from quantkit.quant.modules import QuantAdd
from quantkit.quant.tensor_quantizer import TensorQuantizer

AMAX = "_amax"
_SHOW = 12  # keys listed per category in an error message


@dataclass
class InteropReport:
    """What a load matched. Key lists are sorted state_dict keys.

    loaded_amax: quantizer amaxes taken from the source state.
    loaded_tensors: float parameters/buffers taken from the source state.
    missing: keys the destination expects and the source lacks (amaxes only for enabled quantizers).
    unexpected: source keys with no place in the destination.
    """

    loaded_amax: list[str] = field(default_factory=list)
    loaded_tensors: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not self.missing and not self.unexpected

    def describe(self) -> str:
        def show(keys: list[str]) -> str:
            more = f" (+{len(keys) - _SHOW} more)" if len(keys) > _SHOW else ""
            return ", ".join(keys[:_SHOW]) + more

        parts = []
        if self.missing:
            parts.append(f"missing from the source ({len(self.missing)}): {show(self.missing)}")
        if self.unexpected:
            parts.append(f"not in the destination ({len(self.unexpected)}): {show(self.unexpected)}")
        return "; ".join(parts) or "all keys matched"


def _module_prefix_hint(keys: list[str]) -> str:
    if keys and all(k.startswith("module.") for k in keys):
        return " (every source key starts with 'module.': strip that DataParallel prefix first)"
    return ""


def _amax_shape(q: TensorQuantizer, owner: nn.Module | None) -> tuple[int, ...] | None:
    """The amax shape quantkit expects for ``q``: () per tensor, keepdim-of-weight per channel (None: unknown)."""
    if not q.is_per_channel:
        return ()
    weight = getattr(owner, "weight", None)
    if weight is None:
        return None if q.amax is None else tuple(q.amax.shape)
    return tuple(s if d == q.axis % weight.dim() else 1 for d, s in enumerate(weight.shape))


def _coerce_amax(key: str, value: torch.Tensor, shape: tuple[int, ...] | None) -> torch.Tensor:
    value = torch.as_tensor(value).detach().to(device="cpu", dtype=torch.float32)
    if not torch.isfinite(value).all() or not (value > 0).all():
        raise CalibrationError(f"{key}: amax must be finite and > 0, got {value.flatten()[:4].tolist()}...; "
                               "recalibrate that layer in the source model before converting")
    if shape is None or tuple(value.shape) == shape:
        return value.clone()
    if value.numel() == 1:  # per-tensor source into a per-channel quantizer: same scale on every channel
        return value.reshape(()).expand(shape).clone() if shape else value.reshape(()).clone()
    raise WeightsError(f"{key}: amax has shape {tuple(value.shape)}, quantkit expects {shape} "
                       "(per-channel weight amax must be on the output-channel axis, activations per tensor)")


def load_pq_state(qmodel: nn.Module, pq_state_dict: Mapping[str, torch.Tensor], *, strict: bool = True) -> InteropReport:
    """Load a pytorch-quantization ``state_dict`` (weights and ``_amax`` buffers) into a quantkit model.

    ``qmodel`` comes from :func:`quantkit.quant.insert.insert_quantizers` on the same float architecture (same
    module names). Quantizer amaxes are set through :class:`TensorQuantizer` (float32, CPU); every other key
    goes through ``load_state_dict``. Quantizers the source has no amax for keep their current amax.

    Raises:
        WeightsError: ``strict`` and a key is missing (an enabled quantizer without amax, a weight) or
            unexpected; the message lists them. Also for an amax or tensor of the wrong shape.
        CalibrationError: a source amax is NaN, Inf or <= 0.
    """
    quantizers = {f"{n}.{AMAX}": (n, q) for n, q in qmodel.named_modules() if isinstance(q, TensorQuantizer)}
    modules = dict(qmodel.named_modules())
    float_keys = [k for k in qmodel.state_dict() if k not in quantizers]
    report = InteropReport()
    report.unexpected = sorted(k for k in pq_state_dict if k not in quantizers and k not in float_keys)
    report.missing = sorted(
        [k for k in float_keys if k not in pq_state_dict]
        + [k for k, (_, q) in quantizers.items() if k not in pq_state_dict and q.enabled]
    )
    if strict and not report.complete:
        raise WeightsError(f"pytorch-quantization state does not match the quantkit model: {report.describe()}"
                           f"{_module_prefix_hint(list(pq_state_dict))}. Insert quantizers into the same float "
                           "architecture, or pass strict=False and calibrate what is missing with quantkit")
    new_amax = {}
    for key, (name, q) in quantizers.items():
        if key in pq_state_dict:
            owner = modules.get(name.rpartition(".")[0])
            new_amax[key] = (q, _coerce_amax(key, pq_state_dict[key], _amax_shape(q, owner)))
    tensors = {k: v for k, v in pq_state_dict.items() if k in float_keys}
    try:
        qmodel.load_state_dict(tensors, strict=False)
    except RuntimeError as exc:  # size mismatches
        raise WeightsError(f"pytorch-quantization weights do not fit the quantkit model: {exc}") from exc
    for q, value in new_amax.values():
        q.amax = value
    report.loaded_amax = sorted(new_amax)
    report.loaded_tensors = sorted(tensors)
    return report


def to_pq_state(qmodel: nn.Module, *, include_adds: bool = False) -> dict[str, torch.Tensor]:
    """quantkit model -> ``state_dict`` for pytorch-quantization modules of the same architecture (CPU copies).

    Every enabled quantizer must have an amax (run calibration first). Disabled quantizers without amax are left
    out; ``QuantAdd`` amaxes are left out unless ``include_adds`` (pq has no residual-add quantizer).

    Raises:
        CalibrationError: an enabled quantizer has no amax; the message lists them.
    """
    state = {k: v.detach().cpu().clone() for k, v in qmodel.state_dict().items()}
    uncalibrated = []
    for name, module in qmodel.named_modules():
        if not isinstance(module, TensorQuantizer):
            continue
        key = f"{name}.{AMAX}"
        owner = qmodel.get_submodule(name.rpartition(".")[0]) if "." in name else qmodel
        if isinstance(owner, QuantAdd) and not include_adds:
            state.pop(key, None)
        elif module.amax is None and module.enabled:
            uncalibrated.append(name)
    if uncalibrated:
        raise CalibrationError(f"{len(uncalibrated)} enabled quantizer(s) have no amax: {uncalibrated[:_SHOW]}; "
                               "run quantkit calibration (run_calibration + apply_calibration) before converting")
    return state


def _is_pq_quantizer(module: nn.Module) -> bool:
    cls = type(module)
    return cls.__name__ == "TensorQuantizer" and cls.__module__.startswith("pytorch_quantization")


def load_into_pq(pq_model: nn.Module, state: Mapping[str, torch.Tensor], *, strict: bool = True) -> InteropReport:
    """Load ``state`` (e.g. :func:`to_pq_state`) into a pytorch-quantization model, on the CPU.

    Quantizers without an ``_amax`` buffer get a CPU buffer of the source's shape first, because pq 2.1.3 would
    create it with ``.cuda()``. Raises WeightsError (``strict``) listing missing/unexpected keys; a pq quantizer
    the state has no amax for would quantize dynamically (per-batch max), so it counts as missing.
    """
    pq_quantizers = {f"{n}.{AMAX}": q for n, q in pq_model.named_modules() if _is_pq_quantizer(q)}
    pq_keys = set(pq_model.state_dict()) | set(pq_quantizers)
    report = InteropReport(
        missing=sorted(k for k in pq_keys if k not in state
                       and not (k in pq_quantizers and pq_quantizers[k]._disabled)),
        unexpected=sorted(k for k in state if k not in pq_keys),
    )
    if strict and not report.complete:
        raise WeightsError(f"state does not match the pytorch-quantization model: {report.describe()}. "
                           "Build the pq model from the same float architecture, or pass strict=False")
    for key, q in pq_quantizers.items():
        if key in state and AMAX not in q._buffers:
            q.register_buffer(AMAX, torch.zeros_like(torch.as_tensor(state[key]), dtype=torch.float32, device="cpu"))
    try:
        pq_model.load_state_dict({k: v for k, v in state.items() if k in pq_keys}, strict=False)
    except RuntimeError as exc:
        raise WeightsError(f"state does not fit the pytorch-quantization model: {exc}") from exc
    report.loaded_amax = sorted(k for k in pq_quantizers if k in state)
    report.loaded_tensors = sorted(k for k in state if k in pq_keys and k not in pq_quantizers)
    return report
