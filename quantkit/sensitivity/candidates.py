"""Which layers the FP16 choice replays: a cheap one-pass signal ranks them, only the best few are measured.

Replaying every layer (``analysis.analyze``) costs about one forward per layer and chunk of images: on
YOLO-NAS S at 640x640 a 240-layer replay made the default export 2.9x the ``--full-int8`` export. Most layers
recover nothing worth an FP16 slot, and one all-INT8 forward and backward already say which ones might.

With every layer INT8, a forward hook re-runs each layer L float on the same input: ``delta_L`` = its INT8
output minus its float output is the error L injects itself (its local SQNR comes from the same two tensors).
Let ``e`` be the model's output error against FP32 (each output scaled by its signal power over the images) and
``g_L`` the gradient of ``|e|^2 / 2`` with respect to L's output (one backward, through the fake-quant STE).
Keeping L float removes ``J delta_L`` from ``e`` (``J``: how L's output reaches the model's outputs), so the noise
power falls by ``2 <e, J delta_L> - |J delta_L|^2``; to first order, and when L's error is independent of the rest
(``<e, J delta_L> ~ |J delta_L|^2``), that is ``<g_L, delta_L>``: the ``gain`` estimate, in the selection's units
(noise power over signal power). It is negative when L's error cancels others' — the layers whose replayed
recovery is negative. On the bundled detector its top 16 by gain per MAC hold the 4 layers the full replay's
greedy choice keeps (predicted 26.70 dB, against 26.72 dB from replaying all 90 layers and keeping 10).
A model no gradient flows through (an op without a derivative) is ranked by each layer's local noise-to-signal
ratio instead, the additive-noise model's estimate, with a warning.

Candidates: layers with a positive estimated gain whose cost (MACs plus the MAC-equivalent charge of a residual
Add's broken conv+add fusion) fits the MAC-share budget left, best gain per cost first, at most
``MAX_CANDIDATES``. Cost of the signal: one FP32 forward plus one INT8 forward (each layer run twice) and one
backward per chunk — about four forwards, against one forward per candidate for the replay.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from quantkit.quant.insert import set_precision
from quantkit.quant.tensor_quantizer import TensorQuantizer
from quantkit.sensitivity.replay import _tensors

if TYPE_CHECKING:  # pragma: no cover
    from quantkit.state import QuantState

log = logging.getLogger("quantkit")

# How many layers the default FP16 choice replays. 16 keeps the choice's cost at ~16 forwards per chunk of
# images whatever the network's depth (240 layers on YOLO-NAS S: a 15x cut), and is several times the FP16 slots
# the 0.95 MAC-share budget buys once the minimum recovery and the Add charge apply (4 on the bundled detector;
# 10 before, six of them under 0.05 dB); benchmarks/RESULTS.md `fp16-choice-time-*` has the time ratios.
MAX_CANDIDATES = 16


@dataclass(frozen=True)
class Signal:
    """One layer's one-pass signal. ``local_sqnr_db``: its INT8 output against its float output on the same input
    (dB; +inf: identical). ``gain``: first-order estimate of the output noise power (normalised, as the selection's
    gains) removed by keeping it float; may be negative (its error cancels others'); 0 when no gradient reached it."""

    local_sqnr_db: float
    gain: float


def one_pass_signals(state: QuantState, *, num_images: int = 8, chunk_size: int = 2,
                     device: str | torch.device | None = None) -> dict[str, Signal]:
    """Layer name -> :class:`Signal`, from one all-INT8 forward and backward per chunk of ``num_images`` calibration
    inputs spread over the set (see the module docstring). The qmodel's precision and its parameters'
    ``requires_grad`` are restored in ``finally``; the models are moved back after. ``chunk_size``: inputs per
    pass; memory ~ chunk x (the activations twice plus the autograd graph)."""
    from quantkit.sensitivity.analysis import _chunks, _quantizer_flags
    from quantkit.utils.device import module_device, on_device, resolve_device

    qmodel, fp32, names = state.model.qmodel, state.model.fp32, list(state.model.layout.layers)
    dev = module_device(qmodel) if device is None else resolve_device(device)
    batches = list(_chunks(state.data.batches(limit=num_images, spread=True), chunk_size))
    signal = {n: 0.0 for n in names}
    noise = {n: 0.0 for n in names}
    dot = {n: 0.0 for n in names}
    busy = [False]  # the float re-run of a layer must not trigger its own hook

    def hook(name: str):
        def run(m: nn.Module, args, kwargs, out):
            if busy[0]:
                return
            busy[0] = True
            qs = [q for q in m.children() if isinstance(q, TensorQuantizer)]
            flags = [q._disabled for q in qs]
            try:
                for q in qs:
                    q.disable()
                with torch.no_grad():
                    ref = m.forward(*args, **kwargs)
            finally:
                for q, d in zip(qs, flags):
                    q._disabled = d
                busy[0] = False
            for r, t in zip(_tensors(ref), _tensors(out)):
                r, delta = r.detach().float(), (t.detach().float() - r.detach().float())
                signal[name] += float(torch.sum(r * r, dtype=torch.float64))
                noise[name] += float(torch.sum(delta * delta, dtype=torch.float64))
                if t.requires_grad:  # d(loss)/d(out) . delta: first-order noise removed by this layer in float;
                    # a hook registered before later in-place ops sees the gradient of this value
                    t.register_hook(lambda g, d=delta: _add(dot, name, g, d))
        return run

    saved, params = _quantizer_flags(qmodel), [(p, p.requires_grad) for p in qmodel.parameters()]
    handles = []
    backward_ran = False
    try:
        with torch.no_grad(), on_device(dev, fp32):
            refs = [_flat(fp32(x.to(dev))) for x in batches]
        power = [sum(float(torch.sum(r[k].double() ** 2)) for r in refs) for k in range(len(refs[0]))] if refs else []
        set_precision(qmodel, set(names))
        for p, _ in params:
            p.requires_grad_(False)  # only activation gradients are needed
        for n in names:
            handles.append(qmodel.get_submodule(n).register_forward_hook(hook(n), with_kwargs=True))
        with on_device(dev, qmodel), torch.enable_grad():
            for x, ref in zip(batches, refs):
                x = x.to(dev).requires_grad_(True)
                outs = _flat(qmodel(x))
                # noise power of every output relative to its signal power over all images: the worst-output
                # SQNR the selection reads is one of these, and each output counts at its own scale
                loss = sum(0.5 * torch.sum((o.float() - r.float()) ** 2) / max(pw, 1e-30)
                           for o, r, pw in zip(outs, ref, power) if o.requires_grad)
                try:
                    if isinstance(loss, torch.Tensor) and loss.requires_grad:
                        loss.backward()
                        backward_ran = True
                except RuntimeError as exc:  # an op without a derivative: rank by local error alone
                    log.warning("FP16 choice: no gradient through the model (%s); ranking candidates by each "
                                "layer's local INT8 error instead", str(exc).splitlines()[0][:200])
                    backward_ran = False
                    break
    finally:
        for h in handles:
            h.remove()
        for q, disabled in saved:
            q._disabled = disabled
        for p, rg in params:
            p.requires_grad_(rg)
    if not backward_ran:  # no gradient reached the layers (detached outputs, no derivative): local NSR as the gain,
        # the additive-noise model's estimate, so candidates are still the noisiest layers rather than none
        return {n: Signal(_db(signal[n], noise[n]), noise[n] / signal[n] if signal[n] > 0 else 0.0) for n in names}
    return {n: Signal(_db(signal[n], noise[n]), dot[n]) for n in names}


def _add(dot: dict, name: str, g: torch.Tensor, delta: torch.Tensor) -> None:
    dot[name] += float(torch.sum(g.float() * delta, dtype=torch.float64))


def _flat(out) -> list[torch.Tensor]:
    return [t for t in _tensors(out) if t.is_floating_point()]


def _db(signal: float, noise: float) -> float:
    if not math.isfinite(noise):
        return -math.inf
    if noise == 0.0:
        return math.inf
    return -math.inf if signal == 0.0 else 10.0 * math.log10(signal / noise)


def pick_candidates(signals: dict[str, Signal], cost: dict[str, float], budget: float, *,
                    cap: int = MAX_CANDIDATES, exclude=()) -> list[str]:
    """The ``cap`` layers most worth replaying, best first: estimated gain (``Signal.gain``) per unit of ``cost``
    (MACs plus MAC-equivalents; at least 1), among the layers with a positive estimated gain whose cost fits
    ``budget`` (the MAC-equivalents the MAC-share budget has left). ``exclude``: layers already FP16. Ties break by
    name, so the pick is deterministic."""
    if cap < 0:
        raise ValueError(f"cap must be >= 0, got {cap}")
    skip = set(exclude)
    fits = [n for n, s in signals.items() if n not in skip and s.gain > 0.0 and cost.get(n, 0.0) <= budget + 1e-9]
    fits.sort(key=lambda n: (-signals[n].gain / max(cost.get(n, 0.0), 1.0), n))
    return fits[:cap]
