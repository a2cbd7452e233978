"""manifest.json: what a CI job needs to trust an output folder, and ``quantkit verify`` to re-check it.

Everything except the ``run`` field is deterministic for the same inputs; ``run`` holds timestamps, wall
time, cache hit/miss and the host name.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import reprlib
import shutil
import subprocess
import sys
import time
from pathlib import Path

from quantkit.version import __version__
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


class _Oversized:
    """An integer literal with more digits than any file size (int() would refuse past 4300 digits)."""

    def __init__(self, digits: int) -> None:
        self.digits = digits

    def __repr__(self) -> str:
        return f"<an integer of {self.digits:,} digits>"


def _bounded_int(text: str) -> int | _Oversized:
    """JSON integers up to 20 digits (any 64-bit size); longer ones stay unparsed so the entry is named."""
    digits = len(text.lstrip("-"))
    return int(text) if digits <= 20 else _Oversized(digits)


def _load(folder: Path) -> dict:
    """manifest.json of ``folder`` as a dict whose ``files`` maps plain names to {sha256, size}; UsageError else."""
    mpath = folder / MANIFEST
    if not mpath.is_file():
        raise UsageError(f"{folder} has no {MANIFEST}: pass a folder written by `quantkit export`")
    try:
        manifest = json.loads(mpath.read_bytes().decode("utf-8"), parse_int=_bounded_int)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise UsageError(f"{mpath} is not valid UTF-8 JSON ({type(exc).__name__}): re-export the folder") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict):
        raise UsageError(f"{mpath} is malformed: 'files' must map file names to their sha256 and size; "
                         "re-export the folder")
    for name, meta in files.items():
        if (not isinstance(meta, dict) or not isinstance(meta.get("sha256"), str)
                or not isinstance(meta.get("size"), int) or isinstance(meta.get("size"), bool)):
            raise UsageError(f"{mpath} is malformed: entry {name[:80]!r} needs a sha256 string and an integer size "
                             f"(got size {_short(meta.get('size') if isinstance(meta, dict) else meta)}); "
                             "re-export the folder")
    return manifest


def _short(value) -> str:
    """A bounded repr: manifests come from anywhere, and their values may be huge."""
    return reprlib.repr(value)[:80]


def _plain_name(name: str) -> bool:
    """A file directly inside the folder: no separators, no '..', nothing hidden (exports write none)."""
    return bool(name) and name not in (".", "..") and "/" not in name and "\\" not in name and "\0" not in name \
        and not name.startswith(".")


def listed_files(folder: str | Path) -> list[str]:
    """The file names manifest.json of ``folder`` lists (UsageError when it is missing or malformed)."""
    return list(_load(Path(folder))["files"])


def verify(folder: str | Path) -> list[str]:
    """Re-check an output folder against its manifest. Returns a list of problems (empty when intact).

    Judges only what is inside ``folder``: a listed name that is not a plain file name (``../x``, ``a/b``,
    hidden) is a problem, never followed; anything present but not listed — subfolders, hidden files,
    symlinks included — is a problem too. A malformed manifest is one problem; raises UsageError when there is none.
    """
    folder = Path(folder)
    if not (folder / MANIFEST).is_file():
        raise UsageError(f"{folder} has no {MANIFEST}: pass a folder written by `quantkit export`")
    try:
        files = _load(folder)["files"]
    except UsageError as exc:
        return [str(exc)]
    problems = []
    for name, meta in sorted(files.items()):
        if not _plain_name(name):
            problems.append(f"{name[:200]!r}: not a plain file name inside the folder (not followed)")
            continue
        p = folder / name
        if p.is_symlink() or not p.is_file():
            problems.append(f"{name}: listed in the manifest but missing" if not p.exists() and not p.is_symlink()
                            else f"{name}: listed in the manifest but not a regular file")
            continue
        if p.stat().st_size != meta["size"]:
            problems.append(f"{name}: size {p.stat().st_size} != manifest {meta['size']}")
        elif sha256_file(p) != meta["sha256"]:
            problems.append(f"{name}: sha256 differs from the manifest (modified after export)")
    for root, dirs, names in os.walk(folder):  # does not follow symlinked folders (reported as entries)
        base = Path(root)
        for n in sorted(dirs):
            p = base / n
            if p.is_symlink() or not any(p.iterdir()):
                problems.append(f"{p.relative_to(folder).as_posix()}{'' if p.is_symlink() else '/'}: "
                                "present but not listed in the manifest")
        for n in sorted(names):
            rel = (base / n).relative_to(folder).as_posix()
            if rel != MANIFEST and not (rel in files and _plain_name(rel)):
                problems.append(f"{rel}: present but not listed in the manifest")
    return problems
