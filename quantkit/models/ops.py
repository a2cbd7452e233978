"""Parameter-free graph ops as modules, so the quantizer can find and wrap them.

A residual ``x + skip`` written as ``Add()(x, skip)`` lets the quantization pass put a Q/DQ pair on the skip
input only, which is what TensorRT needs to fuse the Add into the producing conv's epilogue. ``Concat`` marks a
concatenation whose inputs must share one scale (TensorRT propagates the consumer's Q/DQ backwards through it).
Neither adds state_dict entries, so module trees stay checkpoint-compatible.
"""

from __future__ import annotations

import torch
from torch import nn


class Add(nn.Module):
    """``forward(x, skip) = x + skip``; ``x`` is the main (conv) path, ``skip`` the residual branch."""

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return x + skip


class Concat(nn.Module):
    """``torch.cat(tensors, dim)``."""

    def __init__(self, dim: int = 1):
        super().__init__()
        self.dim = dim

    def forward(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(tensors, self.dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"
