"""Where the torch passes run (calibration, sensitivity, torch evaluation): ``cpu`` (default) or ``cuda``.

ONNX export, parity and onnxruntime evaluation stay on the CPU whatever the device: only the torch forward
loops move. ``resolve_device`` checks the request before any work starts; ``on_device`` moves modules there for
one block and back in ``finally``, so the module the rest of the pipeline sees is always on the CPU.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from quantkit.errors import UsageError

DEVICES = ("cpu", "cuda")


def resolve_device(name: str | torch.device | None) -> torch.device:
    """``None``/``"cpu"`` -> cpu; ``"cuda"`` or ``"cuda:N"`` -> that GPU, checked to exist.

    Raises UsageError (before any work) for an unknown name or when CUDA is not available here.
    """
    if name is None:
        return torch.device("cpu")
    text = str(name).strip().lower()
    kind, _, index = text.partition(":")
    if kind not in DEVICES or (index and (kind != "cuda" or not index.isdigit())):
        raise UsageError(f"device {name!r} is not one of cpu, cuda, cuda:N: pass --device cpu or --device cuda")
    if kind == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UsageError(f"device {name!r} requested but CUDA is not available here (torch {torch.__version__}, "
                         f"built for CUDA {torch.version.cuda}): use --device cpu, or install a CUDA build of "
                         "torch on a machine with an NVIDIA GPU")
    dev = torch.device(text if index else "cuda")
    if index and int(index) >= torch.cuda.device_count():
        raise UsageError(f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s) here; use cuda:0..")
    return dev


def device_label(dev: torch.device) -> str:
    """Human-readable device for reports: ``cpu`` or ``cuda:0 (NVIDIA H200)``."""
    if dev.type != "cuda":
        return "cpu"
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    return f"cuda:{index} ({torch.cuda.get_device_name(index)})"


def module_device(module: nn.Module) -> torch.device:
    """The device of ``module``'s first parameter or buffer (cpu for a module without any)."""
    for t in (*module.parameters(), *module.buffers()):
        return t.device
    return torch.device("cpu")


@contextmanager
def on_device(device: torch.device | str | None, *modules: nn.Module) -> Iterator[torch.device]:
    """Move ``modules`` to ``device`` for the block, then back to where each was (in ``finally``).

    ``None`` or the modules' current device moves nothing (the CPU path stays exactly as without it).
    """
    dev = resolve_device(device) if not isinstance(device, torch.device) else device
    homes = [module_device(m) for m in modules]
    moved = [m for m, home in zip(modules, homes) if home != dev]
    try:
        for m in moved:
            m.to(dev)
        yield dev
    finally:
        for m, home in zip(modules, homes):
            if any(m is x for x in moved):
                m.to(home)
