"""Build hook (metadata lives in pyproject.toml).

Ships the repository's bundled data inside the package: the top-level ``calibration/``, ``evaldata/`` and
``recipes/`` folders stay the single source (tests and benchmarks use them there) and are copied into the build as
``quantkit/_bundled/<folder>/``, where ``quantkit.paths`` finds them with ``importlib.resources``. Editable installs
skip the copy: the checkout's folders are read directly. ``MANIFEST.in`` puts the folders into the sdist, so a
wheel built from the sdist carries them too.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
BUNDLED_FOLDERS = ("calibration", "evaldata", "recipes")  # keep in sync with quantkit/paths.py


class BuildPyWithBundledData(build_py):
    """``build_py`` that also copies the bundled data folders into ``<build_lib>/quantkit/_bundled/``."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        dest_root = Path(self.build_lib) / "quantkit" / "_bundled"
        for name in BUNDLED_FOLDERS:
            src = HERE / name
            if not src.is_dir():
                raise SystemExit(f"bundled data folder {src} is missing: build from a full checkout or sdist")
            dest = dest_root / name
            if dest.exists():
                shutil.rmtree(dest)
            shutil.copytree(src, dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ".*"))


setup(cmdclass={"build_py": BuildPyWithBundledData})
