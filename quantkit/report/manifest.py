"""manifest.json: what a CI job needs to trust an output folder, and ``quantkit verify`` to re-check it.

Everything except the ``run`` field is deterministic for the same inputs; ``run`` holds timestamps, wall
time, cache hit/miss and the host name.
"""

from __future__ import annotations

import hashlib
import json
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

from quantkit import __version__
from quantkit.errors import UsageError

MANIFEST = "manifest.json"
SCHEMA = 1


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def package_versions() -> dict[str, str | None]:
    """Versions of the packages that shape the artifacts (None when not installed)."""
    from importlib import metadata

    out = {"python": platform.python_version(), "quantkit": __version__}
    for pkg in ("torch", "onnx", "onnxruntime", "numpy", "tensorrt"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def host_gpu() -> dict | None:
    """The host's NVIDIA GPU name and compute capability via nvidia-smi, or None when there is none."""
    exe = shutil.which("nvidia-smi")
    if not exe:
        return None
    try:
        text = subprocess.run([exe, "--query-gpu=name,compute_cap", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip().splitlines()
    except (subprocess.SubprocessError, OSError):
        return None
    if not text:
        return None
    name, _, cc = text[0].partition(",")
    return {"name": name.strip(), "compute_capability": cc.strip()}


def build_manifest(folder: Path, recipe, report: dict, command_line: list[str], run: dict) -> dict:
    """Hash every file in ``folder`` (except the manifest itself) and record versions, command and recipe."""
    files = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.name != MANIFEST and not p.name.startswith("."):
            files[p.name] = {"sha256": sha256_file(p), "size": p.stat().st_size}
    return {
        "schema": SCHEMA,
        "files": files,
        "versions": package_versions(),
        "command": list(command_line),
        "recipe": recipe.as_dict(),
        "calibration_cache_key": report["calibration"]["cache_key"],
        "gpu": host_gpu(),
        "run": {**run, "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "host": platform.node(), "argv0": sys.argv[0] if sys.argv else None},
    }


def verify(folder: str | Path) -> list[str]:
    """Re-check an output folder against its manifest. Returns a list of problems (empty when intact)."""
    folder = Path(folder)
    mpath = folder / MANIFEST
    if not mpath.is_file():
        raise UsageError(f"{folder} has no {MANIFEST}: pass a folder written by `quantkit export`")
    try:
        manifest = json.loads(mpath.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        return [f"{MANIFEST} is unreadable or malformed ({exc})"]
    problems = []
    for name, meta in sorted(files.items()):
        p = folder / name
        if not p.is_file():
            problems.append(f"{name}: listed in the manifest but missing")
            continue
        if p.stat().st_size != meta.get("size"):
            problems.append(f"{name}: size {p.stat().st_size} != manifest {meta.get('size')}")
        elif sha256_file(p) != meta.get("sha256"):
            problems.append(f"{name}: sha256 differs from the manifest (modified after export)")
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.name != MANIFEST and not p.name.startswith(".") and p.name not in files:
            problems.append(f"{p.name}: present but not listed in the manifest")
    return problems
