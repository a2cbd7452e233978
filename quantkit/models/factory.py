"""The model stage's entry: a registered model or a user's ``file.py:factory``, with what the report says of it."""

from __future__ import annotations

import os

from torch import nn

from quantkit.models.loading import build_model
from quantkit.recipe import ModelSpec


def build(spec: ModelSpec) -> tuple[nn.Module, dict, tuple[int, int] | None]:
    """Build the model ``spec`` names (loading ``spec.weights`` with ``weights_only=True``).

    Returns (model, info for the report, default input (height, width) in pixels or None).
    ``file.py:factory`` imports and runs that file.
    """
    model, info = build_model(spec.name, weights=spec.weights, num_classes=spec.num_classes)
    info_dict = {
        "name": info.name,
        "description": info.description,
        "source": info.source.value,
        "num_classes": info.num_classes,
        "weights": os.path.basename(spec.weights) if spec.weights else None,
        "parameters": info.num_parameters,
    }
    if info.random_init:  # say loudly that a registered architecture runs on random weights
        from quantkit.models.loading import RANDOM_INIT_NOTE

        info_dict["random_init"] = True
        info_dict["note"] = RANDOM_INIT_NOTE.format(name=info.name)
    size = getattr(model, "default_input_size", None) or info.input_size
    return model, info_dict, size
