"""Learned weight rounding (AdaRound, Nagel et al. 2020) for one layer, on its recorded inputs.

Each weight picks floor or ceil of ``w / s`` (``s``: the layer's per-channel weight scale, unchanged), through a
rectified sigmoid ``h(V)``; the loss is the layer's output reconstruction error against the FP32 target plus a
regulariser that pushes ``h`` to 0 or 1 (its exponent annealed from 20 to 2 after a 20 % warm-up). The result is
a float weight equal to ``s * q`` with integer ``q`` in [-128, 127]: fake-quantizing it reproduces ``q``
exactly, so the export's int8 initializers are the learned integers.

Guarantee: the learned rounding is kept only when its reconstruction error on the layer's data is not larger
than nearest rounding's; otherwise the layer keeps nearest rounding (reported).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from quantkit.quant.tensor_quantizer import QMAX, QMIN

ZETA, GAMMA = 1.1, -0.1
REG_WEIGHT = 0.01
WARMUP = 0.2


@dataclass
class RoundingResult:
    """Outcome for one layer. Errors are relative (``||y - y_fp32||^2 / ||y_fp32||^2``) on the layer's data."""

    err_nearest: float
    err_learned: float
    kept: bool
    iterations: int
    flipped: int  # weights whose integer differs from nearest rounding

    def as_dict(self) -> dict:
        return {"err_nearest": float(f"{self.err_nearest:.6g}"), "err_learned": float(f"{self.err_learned:.6g}"),
                "kept": self.kept, "iterations": self.iterations, "flipped": self.flipped}


def layer_output(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The conv / linear ``layer`` applied to ``x`` with ``weight`` (its own bias), no quantizers."""
    if isinstance(layer, nn.Conv2d):
        return layer._conv_forward(x, weight, layer.bias)
    if isinstance(layer, nn.Linear):
        return F.linear(x, weight, layer.bias)
    raise TypeError(f"learned rounding supports Conv2d and Linear, not {type(layer).__name__}")


def _h(v: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def _rel_err(y: torch.Tensor, t: torch.Tensor) -> float:
    return float(((y - t) ** 2).sum() / (t ** 2).sum().clamp_min(1e-30))


def learn_rounding(layer: nn.Module, scale: torch.Tensor, x: torch.Tensor, target: torch.Tensor, *,
                   iterations: int = 500, seconds: float = 0.0, batch: int = 4, lr: float = 1e-2,
                   seed: int = 0) -> tuple[torch.Tensor, RoundingResult]:
    """Learn the rounding of ``layer.weight`` for inputs ``x`` (as the quantized model sees them) and
    ``target`` (the FP32 layer output). Returns (float weight ``s*q`` to install, result).

    scale: per-output-channel weight scale broadcastable to the weight (``amax / 127``).
    iterations: optimiser steps (deterministic). seconds: if > 0, also stop after this much wall time
    (then the result depends on the machine's speed). batch: samples (first-axis rows of ``x``) per step.
    """
    w = layer.weight.detach()
    s = scale.detach().to(w.dtype)
    w_floor = torch.floor(w / s)
    rest = (w / s - w_floor).clamp(0.0, 1.0)
    p = ((rest - GAMMA) / (ZETA - GAMMA)).clamp(1e-4, 1 - 1e-4)
    v = torch.log(p / (1 - p)).requires_grad_(True)
    opt = torch.optim.Adam([v], lr=lr)
    gen = torch.Generator().manual_seed(seed)
    n = x.shape[0]
    norm = (target ** 2).mean().clamp_min(1e-30)
    t0 = time.perf_counter()
    done = 0
    with torch.enable_grad():
        for it in range(iterations):
            if seconds > 0 and time.perf_counter() - t0 > seconds:
                break
            idx = torch.randperm(n, generator=gen)[: min(batch, n)]
            h = _h(v)
            wq = s * torch.clamp(w_floor + h, QMIN, QMAX)
            rec = ((layer_output(layer, x[idx], wq) - target[idx]) ** 2).mean() / norm
            frac = it / max(iterations - 1, 1)
            if frac < WARMUP:
                loss = rec
            else:
                beta = 20.0 + (2.0 - 20.0) * (frac - WARMUP) / (1 - WARMUP)
                loss = rec + REG_WEIGHT * (1 - (2 * h - 1).abs().pow(beta)).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            done += 1
    with torch.no_grad():
        q_near = torch.clamp(torch.round(w / s), QMIN, QMAX)
        q_learn = torch.clamp(w_floor + (v.detach() >= 0).to(w.dtype), QMIN, QMAX)
        e_near = _rel_err(layer_output(layer, x, s * q_near), target)
        e_learn = _rel_err(layer_output(layer, x, s * q_learn), target)
    kept = e_learn <= e_near
    q = q_learn if kept else q_near
    res = RoundingResult(e_near, e_learn, kept, done, int((q != q_near).sum()))
    return (s * q).detach(), res
