"""An output folder that appears whole or not at all.

Artifacts are written into a hidden staging folder beside ``out``; only when every file is written is the
staging folder renamed into place (the previous ``out`` is moved aside first and deleted after). An exception
or Ctrl-C removes the staging folder, so ``out`` holds either the previous complete output or nothing new.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from quantkit.errors import UsageError
from quantkit.utils import interrupt
from quantkit.utils.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text


def check_output_dir(out: Path, force: bool) -> None:
    """Refuse a non-empty or unwritable output folder unless ``force``. Raises UsageError naming the fix."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"output path {out} is a file: pass a folder to --out")
    if out.exists() and any(out.iterdir()) and not force:
        raise UsageError(f"output folder {out} is not empty: pass --force to replace it, or choose another --out")
    parent = out.parent if out.parent != Path("") else Path(".")
    probe = parent
    while not probe.exists():
        probe = probe.parent
    if not os.access(probe, os.W_OK):
        raise UsageError(f"cannot write to {probe}: choose a writable --out folder")


class StagedOutput:
    """Context manager: ``with StagedOutput(out, force) as stage: stage.write_bytes("model.onnx", b)``."""

    def __init__(self, out: str | Path, force: bool = False):
        self.out = Path(out)
        self.force = force
        self.files: dict[str, Path] = {}
        self.staging: Path | None = None

    def __enter__(self) -> "StagedOutput":
        check_output_dir(self.out, self.force)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.staging = self.out.parent / f".{self.out.name}.partial-{os.getpid()}"
        shutil.rmtree(self.staging, ignore_errors=True)
        self.staging.mkdir()
        return self

    def path(self, name: str) -> Path:
        return self.staging / name

    def write_bytes(self, name: str, data: bytes) -> Path:
        self.files[name] = atomic_write_bytes(self.staging / name, data)
        return self.files[name]

    def write_text(self, name: str, text: str) -> Path:
        self.files[name] = atomic_write_text(self.staging / name, text)
        return self.files[name]

    def write_json(self, name: str, obj) -> Path:
        self.files[name] = atomic_write_json(self.staging / name, obj)
        return self.files[name]

    def commit(self) -> Path:
        """Move the staging folder into place. Called on success only; refused after a Ctrl-C (see utils.interrupt)."""
        if interrupt.requested():
            raise KeyboardInterrupt("interrupted before the output was committed")
        old = None
        if self.out.exists():
            old = self.out.parent / f".{self.out.name}.old-{os.getpid()}"
            os.replace(self.out, old)
        os.replace(self.staging, self.out)
        self.staging = None
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.out

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            try:
                self.commit()
            except KeyboardInterrupt:
                shutil.rmtree(self.staging, ignore_errors=True)
                raise
        elif self.staging is not None:
            shutil.rmtree(self.staging, ignore_errors=True)
        return False
