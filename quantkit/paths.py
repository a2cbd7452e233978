"""Where the bundled data lives, for an installed wheel and for a source checkout alike.

The repository's top-level ``calibration/``, ``evaldata/`` and ``recipes/`` folders are the single source of the
bundled data. A wheel (or an install from the sdist) carries copies of them inside the package, as
``quantkit/_bundled/<folder>/`` (``setup.py``'s build hook puts them there), found with ``importlib.resources``.
A source checkout (``pip install -e .``, or the repository on ``PYTHONPATH``) has no such copies and reads the
top-level folders directly.

Reports name bundled data by its path inside the bundle (``calibration/trees``), never by where quantkit is
installed, so report.json does not depend on the install location.
"""

from __future__ import annotations

import importlib.resources
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the checkout (or site-packages, for an installed wheel)

BUNDLE_DIR = "_bundled"  # package folder that holds the copies inside a wheel
BUNDLED_FOLDERS = ("calibration", "evaldata", "recipes")


def bundle_root() -> Path:
    """The folder that holds ``calibration/``, ``evaldata/`` and ``recipes/``: the package's ``_bundled``
    folder when quantkit was installed from a wheel or sdist, else the source checkout."""
    res = importlib.resources.files("quantkit").joinpath(BUNDLE_DIR)
    if isinstance(res, Path) and res.is_dir():
        return res.resolve()
    return ROOT


def bundled_path(relative: str) -> Path:
    """Absolute path of bundled data, e.g. ``bundled_path("calibration/trees")`` (it may not exist)."""
    return bundle_root() / relative


BUNDLED_MODEL = "trees"
BUNDLED_CALIBRATION = bundled_path("calibration/trees")
BUNDLED_EVAL = bundled_path("evaldata/trees_holdout")
BUNDLED_RECIPES = bundled_path("recipes")


def cache_dir() -> Path:
    """Calibration cache folder: $QUANTKIT_CACHE_DIR, else $XDG_CACHE_HOME/quantkit, else ~/.cache/quantkit."""
    env = os.environ.get("QUANTKIT_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "quantkit"


def display_path(path: str | os.PathLike) -> str:
    """``path`` for reports: bundled data as its POSIX path inside the bundle (``calibration/trees``) wherever
    quantkit is installed; other paths inside the source checkout relative to it; anything else as given."""
    p = Path(path)
    resolved = p.resolve()
    for base in dict.fromkeys((bundle_root(), ROOT)):  # the bundle first: inside a wheel ROOT is site-packages
        try:
            return resolved.relative_to(base).as_posix()
        except ValueError:
            continue
    return str(path)
