"""Registered models: name -> lazy factory, description, default input size and class count.

Factories are ``"module:function"`` strings, imported only when a model is built, so listing models stays
cheap. Each factory takes ``num_classes`` as a keyword (the bundled detector may ignore it when it ships
its own trained head; see :func:`quantkit.models.loading.build_model`).
"""

from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass
from typing import Callable

from torch import nn

from quantkit.errors import ModelError, UsageError


@dataclass(frozen=True)
class ModelEntry:
    """One registered model.

    Attributes:
        name: registry key used on the CLI and in recipes.
        factory: ``"module:function"`` building the nn.Module.
        description: one line for ``quantkit models``.
        input_size: default (H, W) in pixels; both multiples of 32 for YOLO-NAS.
        num_classes: default number of classes.
        ships_weights: the factory loads trained weights itself; without it, a model built with no weights
            file runs on its random initial weights (``quantkit.models.loading`` warns loudly).
        parameters: exact parameter count of the model as built with the default ``num_classes`` (raw, before
            fusion, as super-gradients counts), so ``quantkit models`` answers without building it; None: build
            to count. ``tests/unit/test_model_registry_counts.py`` builds each model to check it.
    """

    name: str
    factory: str
    description: str
    input_size: tuple[int, int]
    num_classes: int
    ships_weights: bool = False
    parameters: int | None = None

    def resolve_factory(self) -> Callable[..., nn.Module]:
        """Import and return the factory function (ModelError if it cannot be imported)."""
        return import_factory(self.factory)


_ENTRIES: tuple[ModelEntry, ...] = (
    ModelEntry(
        "yolo_nas_s",
        "quantkit.models.yolo_nas:yolo_nas_s",
        "YOLO-NAS S (super-gradients 3.7.1 layout, 19.05 M params raw / 12.18 M fused), random init",
        (640, 640),
        80,
        parameters=19_053_888,
    ),
    ModelEntry(
        "yolo_nas_m",
        "quantkit.models.yolo_nas:yolo_nas_m",
        "YOLO-NAS M (super-gradients 3.7.1 layout, 51.18 M params raw / 31.92 M fused), random init",
        (640, 640),
        80,
        parameters=51_182_658,
    ),
    ModelEntry(
        "yolo_nas_l",
        "quantkit.models.yolo_nas:yolo_nas_l",
        "YOLO-NAS L (super-gradients 3.7.1 layout, 66.98 M params raw / 42.02 M fused), random init",
        (640, 640),
        80,
        parameters=66_976_392,
    ),
    ModelEntry(
        "trees",
        "quantkit.models.bundled:tree_detector",
        "bundled YOLO-NAS-style tree detector trained on DeepForest aerial images",
        (320, 320),
        1,
        ships_weights=True,
        parameters=1_902_433,
    ),
)

_BY_NAME: dict[str, ModelEntry] = {e.name: e for e in _ENTRIES}


def list_models() -> list[ModelEntry]:
    """All registered models, in registration order."""
    return list(_ENTRIES)


def get_entry(name: str) -> ModelEntry:
    """The entry registered as ``name``; UsageError listing the names (and the closest match) otherwise."""
    entry = _BY_NAME.get(name)
    if entry is not None:
        return entry
    close = difflib.get_close_matches(name, list(_BY_NAME), n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    raise UsageError(
        f"unknown model '{name}'.{hint} Registered models: {', '.join(_BY_NAME)}; "
        "or pass a user model as path/to/file.py:factory"
    )


def import_factory(target: str) -> Callable[..., nn.Module]:
    """Import ``"package.module:function"`` and return the callable."""
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise UsageError(f"factory '{target}' must look like 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelError(f"cannot import {module_name} for factory '{target}': {exc}") from exc
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ModelError(f"{module_name} has no callable '{attr}' (factory '{target}')")
    return factory


def count_parameters(model: nn.Module) -> int:
    """Number of parameter elements (shared parameters counted once)."""
    return sum(p.numel() for p in model.parameters())
