"""Calibration cache: reuse collected histograms / amaxes when nothing that shaped them changed.

A key is built from named components (model weights digest, calibration data digest, recipe
settings, quantkit version, ...). Each component is hashed on its own, so a miss can say *which*
component changed; the key is the hash of those per-component digests.

The cache file is deterministic JSON, written atomically, and carries its schema, its key, the
per-component digests and a sha256 over all of them plus the payload. ``load`` trusts nothing it
cannot verify: a missing, unreadable, corrupt, foreign-schema, mismatched or edited file is a miss,
with a human-readable reason in ``last_reason`` and a log line on ``logging.getLogger("quantkit")``. Corrupt
includes what the json module itself chokes on: NaN/Infinity, integers past Python's digit limit, nesting
past the recursion limit.

A cache file is written only where ``check_cache_target`` allows: nothing there yet, or a file that is
recognizably a quantkit calibration cache by its content (``is_ours``), and never one of the run's inputs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import stat
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Union

from quantkit.errors import UsageError
from quantkit.utils.atomic import atomic_write_text, dumps_json

SCHEMA = "quantkit.calibration-cache/1"
_KEY_SCHEME = 1  # bump when the canonical serialisation below changes

log = logging.getLogger("quantkit")

# What makes a file ours: the schema field, found in the raw bytes so that a damaged file of ours (truncated,
# edited, unparseable) is still recognized, while a user's weights, image or text file never is.
_MARKER = re.compile(rb'"schema"\s*:\s*"quantkit\.calibration-cache/')
_MARKER_SCAN_BYTES = 64 << 20  # a cache of 2048-bin histograms for a few hundred tensors is a few MB

Component = Union[str, bytes, int, float, dict]


def _canonical(name: str, value: Any) -> bytes:
    """Type-tagged bytes of one component, so that "1", 1, 1.0 and True never collide."""
    if isinstance(value, bool):
        return b"bool:" + (b"1" if value else b"0")
    if isinstance(value, int):
        return b"int:" + str(value).encode()
    if isinstance(value, float):
        return b"float:" + value.hex().encode()  # exact, and defined for nan/inf
    if isinstance(value, str):
        return b"str:" + value.encode("utf-8")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return b"bytes:" + bytes(value)
    if isinstance(value, Mapping):
        try:
            return b"dict:" + dumps_json(_plain(value)).encode("utf-8")
        except (TypeError, ValueError) as exc:
            raise UsageError(
                f"cache key component {name!r} is not plain JSON data ({exc}): pass str/int/float/bool "
                "values and lists, or hash it yourself and pass the digest string"
            ) from exc
    raise UsageError(
        f"cache key component {name!r} has type {type(value).__name__}: use str, bytes, int, float or "
        "dict (for a file, pass a digest of its bytes, not its path)"
    )


def _plain(value: Any) -> Any:
    """JSON view of nested data: tuples become lists; keys must be str (int keys sort ambiguously)."""
    if isinstance(value, Mapping):
        if not all(isinstance(k, str) for k in value):
            raise TypeError("dict keys must be str")
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def component_digests(components: Mapping[str, Component]) -> dict[str, str]:
    """sha256 hex digest of each named component (see ``cache_key``)."""
    if not components:
        raise UsageError("a cache key needs at least one component (e.g. weights digest, data digest)")
    out = {}
    for name in sorted(components):
        if not isinstance(name, str) or not name:
            raise UsageError(f"cache key component names must be non-empty strings, got {name!r}")
        out[name] = hashlib.sha256(_canonical(name, components[name])).hexdigest()
    return out


def _key_from_digests(digests: Mapping[str, str]) -> str:
    text = dumps_json({"scheme": _KEY_SCHEME, "components": dict(digests)})
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def cache_key(components: Mapping[str, Component]) -> str:
    """sha256 hex key over the named components, independent of their order.

    Components may be str, bytes, int, float, bool or a dict of plain JSON data; values are
    type-tagged, so ``"1"`` and ``1`` give different keys.
    """
    return _key_from_digests(component_digests(components))


def explain_key(old: Mapping[str, str], new: Mapping[str, str]) -> str:
    """Which components differ between two ``component_digests`` results, in words."""
    changed = sorted(k for k in old.keys() & new.keys() if old[k] != new[k])
    added = sorted(new.keys() - old.keys())
    removed = sorted(old.keys() - new.keys())
    parts = []
    if changed:
        parts.append("changed: " + ", ".join(changed))
    if added:
        parts.append("new: " + ", ".join(added))
    if removed:
        parts.append("no longer present: " + ", ".join(removed))
    return "; ".join(parts) if parts else "no component differs"


def _checksum(key: str, digests: Mapping[str, str] | None, payload: Any) -> str:
    text = dumps_json({"key": key, "components": digests, "payload": payload})
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class CalibrationCache:
    """One calibration result on disk at ``path`` (a JSON file), valid for exactly one key."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.last_reason: str | None = None  # why the last load missed; None after a hit

    def _miss(self, reason: str, level: int = logging.WARNING) -> None:
        self.last_reason = reason
        log.log(level, "calibration cache %s not used: %s", self.path, reason)

    def load(self, key: str, components: Mapping[str, Component] | None = None,
             parse: Callable[[dict], Any] | None = None) -> Any:
        """The payload saved under ``key`` (``parse(payload)`` with ``parse``), or None with the reason in
        ``last_reason``.

        Pass the same ``components`` that made ``key`` to have a key mismatch name what changed. A ``parse``
        that raises KeyError, TypeError, ValueError or AttributeError marks the payload malformed: a miss.
        """
        self.last_reason = None
        if not self.path.exists():
            self._miss("no cache file yet (first run)", logging.INFO)  # _miss names the path once
            return None
        try:
            if not stat.S_ISREG(os.stat(self.path).st_mode):  # a FIFO or device would block or never end
                self._miss("not a regular file")
                return None
            raw = self.path.read_bytes()
        except OSError as exc:
            self._miss(f"cannot read the file ({exc.strerror or type(exc).__name__})")  # str(exc) repeats the path
            return None
        try:
            doc = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant, parse_float=_finite_float)
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            # ValueError: bad JSON, NaN/Infinity, an integer past the digit limit; RecursionError: deep nesting
            self._miss(f"corrupt JSON ({_short(exc)}); it will be recomputed and overwritten")
            return None
        problem = _schema_problem(doc)
        if problem:
            self._miss(f"wrong schema: {problem}; it will be recomputed and overwritten")
            return None
        if doc["key"] != key:
            what = "the inputs differ"
            if components is not None and doc["components"] is not None:
                what = explain_key(doc["components"], component_digests(components))
            self._miss(f"key mismatch: cached for other inputs ({what})")
            return None
        try:
            intact = _checksum(doc["key"], doc["components"], doc["payload"]) == doc["sha256"]
        except (TypeError, ValueError, RecursionError):
            intact = False
        if not intact:
            self._miss("checksum mismatch: the file was edited or damaged; it will be recomputed")
            return None
        payload = doc["payload"]
        if parse is not None:
            try:
                payload = parse(payload)
            except (KeyError, TypeError, ValueError, AttributeError, RecursionError) as exc:
                self._miss(f"malformed payload ({type(exc).__name__}: {_short(exc)}); it will be recomputed")
                return None
        log.info("calibration cache hit: %s", self.path)
        return payload

    def save(self, key: str, payload: dict, components: Mapping[str, Component] | None = None) -> Path:
        """Write ``payload`` (plain JSON data, no NaN/Inf) under ``key``, atomically and deterministically.

        With ``components``, their digests are stored too (so a later miss can be explained) and
        they must produce ``key``.
        """
        if not isinstance(payload, Mapping):
            raise UsageError(f"cache payload must be a dict, got {type(payload).__name__}")
        digests = None
        if components is not None:
            digests = component_digests(components)
            if _key_from_digests(digests) != key:
                raise UsageError("cache key does not match its components: build it with cache_key(components)")
        try:
            plain = json.loads(dumps_json(_plain(payload)))  # what a reader will see after a round trip
        except (TypeError, ValueError) as exc:
            raise UsageError(f"cache payload is not plain JSON data without NaN/Inf ({exc})") from exc
        if (self.path.exists() or self.path.is_symlink()) and not is_ours(self.path):  # last line of defence
            raise UsageError(f"calibration cache {self.path} already exists and is not a quantkit calibration cache: "
                             "it was left untouched; pass a new file path for the cache, or --no-cache")
        doc = {
            "schema": SCHEMA,
            "key": key,
            "components": digests,
            "sha256": _checksum(key, digests, plain),
            "payload": plain,
        }
        return atomic_write_text(self.path, dumps_json(doc))


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not a number a calibration cache may hold")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999 parses to inf
        raise ValueError(f"number {text[:40]} is out of range")
    return value


def _short(exc: BaseException, limit: int = 200) -> str:
    """An exception's message capped at ``limit`` characters (it may quote the file's content)."""
    text = str(exc) or type(exc).__name__
    return text if len(text) <= limit else text[:limit] + "..."


def is_ours(path: str | os.PathLike) -> bool:
    """True when the regular file at ``path`` is a quantkit calibration cache, possibly a damaged one: its bytes
    hold the cache's schema field. Reads at most 64 MiB from each end."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # opening a FIFO must not block
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            return False
        with os.fdopen(fd, "rb") as fh:
            head = fh.read(_MARKER_SCAN_BYTES)
            tail = b""
            size = os.fstat(fh.fileno()).st_size
            if size > _MARKER_SCAN_BYTES:  # the schema key sorts near the end of the file
                fh.seek(max(_MARKER_SCAN_BYTES, size - _MARKER_SCAN_BYTES))
                tail = fh.read()
    except OSError:
        return False
    return bool(_MARKER.search(head) or _MARKER.search(tail))


def check_cache_target(path: str | os.PathLike, inputs: list[str | os.PathLike | None] | tuple = (),
                       what: str = "--calib-cache") -> None:
    """UsageError, before any work, unless the calibration cache may be written at ``path``: nothing is there
    yet, or a quantkit calibration cache (``is_ours``) is; and ``path`` is none of the run's ``inputs`` (files
    or folders, compared by identity after resolving links) nor lies inside an input folder."""
    p = Path(path)
    fix = "pass a new file path for the cache (e.g. calib-cache.json beside your --out), or --no-cache"
    real = Path(os.path.realpath(os.path.abspath(p)))
    for raw in inputs:
        if raw is None or str(raw) == "":
            continue
        q = Path(raw)
        same = False
        try:
            same = p.exists() and q.exists() and os.path.samefile(p, q)
        except OSError:
            pass
        q_real = Path(os.path.realpath(os.path.abspath(q)))
        if same or real == q_real:
            raise UsageError(f"{what} {p} is an input of this run ({raw}): quantkit would overwrite it with its "
                             f"calibration cache; {fix}")
        if q_real.is_dir() and real.is_relative_to(q_real):
            raise UsageError(f"{what} {p} lies inside an input folder of this run ({raw}): the cache would "
                             f"overwrite or add to its files; {fix}")
    if not p.exists() and not p.is_symlink():
        return
    if p.is_dir():
        raise UsageError(f"{what} {p} is a folder: pass a file path (e.g. {p / 'calib.json'}), or --no-cache")
    if not is_ours(p):
        raise UsageError(f"{what} {p} already exists and is not a quantkit calibration cache: quantkit would "
                         f"overwrite it; {fix} (delete or move the file yourself if you no longer need it)")


def _schema_problem(doc: Any) -> str | None:
    if not isinstance(doc, dict):
        return f"top level is {type(doc).__name__}, not an object"
    if doc.get("schema") != SCHEMA:
        return f"schema {doc.get('schema')!r}, expected {SCHEMA!r}"
    for field, kind in (("key", str), ("sha256", str), ("payload", dict)):
        if not isinstance(doc.get(field), kind):
            return f"field {field!r} missing or not a {kind.__name__}"
    comps = doc.get("components", "missing")
    if comps is not None and not (isinstance(comps, dict) and all(isinstance(v, str) for v in comps.values())):
        return "field 'components' missing or malformed"
    return None
