"""Where the bundled data lives: the repository (or source tree) that contains the ``quantkit`` package."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

BUNDLED_MODEL = "trees"
BUNDLED_CALIBRATION = ROOT / "calibration" / "trees"
BUNDLED_EVAL = ROOT / "evaldata" / "trees_holdout"


def cache_dir() -> Path:
    """Calibration cache folder: $QUANTKIT_CACHE_DIR, else $XDG_CACHE_HOME/quantkit, else ~/.cache/quantkit."""
    env = os.environ.get("QUANTKIT_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "quantkit"
