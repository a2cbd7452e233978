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


def display_path(path: str | os.PathLike) -> str:
    """``path`` for reports: relative (POSIX) when inside the quantkit source tree, so the bundled data reads
    ``calibration/trees`` wherever the repository is checked out; otherwise as given."""
    p = Path(path)
    try:
        return p.resolve().relative_to(ROOT).as_posix()
    except ValueError:
        return str(path)
