"""Model stage: the registry, QA-RepVGG, YOLO-NAS S/M/L, the bundled tree detector, checkpoint loading.

Entry: :func:`build` (``ModelSpec`` -> model, report info, default input size).
"""

from quantkit.models.factory import build
from quantkit.models.loading import build_model
from quantkit.models.registry import count_parameters, list_models

__all__ = ["build", "build_model", "list_models", "count_parameters"]
