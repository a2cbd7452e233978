"""An output folder that appears whole or not at all, and never at the cost of the user's files.

Artifacts are written into a hidden staging folder ``.NAME.partial-PID`` beside the target; only when every
file is written is the staging folder renamed into place (the previous output is moved aside to
``.NAME.old-PID`` first and deleted after). An exception, Ctrl-C or SIGTERM removes the staging folder, so the
target holds either the previous complete output or the new one. Staging folders of runs that died (SIGKILL,
power loss) are removed, or restored when they hold the only copy of the previous output, by the next run on
the same target — only those that carry quantkit's marker file (``STAGING_MARKER``, written when quantkit makes
the folder and taken out before it becomes the output): a user's folder that merely has such a name is kept.

What ``--force`` may replace (``check_output_dir``): only a previous quantkit output — a folder whose
manifest.json lists every file in it — and never a folder that is, contains or lies inside one of the run's
inputs (calibration/evaluation data, weights, recipe, model file, calibration cache). A symlinked ``--out`` is
followed: the link's target is checked and replaced, the link itself stays. One run at a time writes a
target (``quantkit.utils.outlock``): a second one fails with exit 2 instead of silently replacing the first.

A full disk (ENOSPC, EDQUOT) while the folder is staged is a StorageError naming the folder and the fix; the
staging folder is removed and the previous output stays as it was. An ``--out`` whose path (with the staging
folder's and the artifacts' names added) would pass PATH_MAX, or with a component over NAME_MAX, is refused
before any work.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Iterable

from quantkit.errors import StorageError, UsageError, is_disk_full
from quantkit.utils import interrupt
from quantkit.utils.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text
from quantkit.utils.outlock import OutputLock
from quantkit.quote import cap, qcap

PathLike = str | os.PathLike

STAGING_MARKER = ".quantkit-staging"  # inside a staging folder quantkit made; proof that it may remove it
_MARKER_TEXT = "quantkit staging folder: removed by the next quantkit run on this --out\n"

# The longest name quantkit writes inside --out, as atomic_write's temp file: ".NAME.<8 random>.tmp".
_LONGEST_ARTIFACT = len(".model.int8.strong.nms.onnx.abcdefgh.tmp")


def disk_full_error(out: PathLike, folder: PathLike, exc: OSError) -> StorageError:
    """The StorageError for a full disk while writing ``out`` (its staging folder lies in ``folder``)."""
    usage = ""
    try:
        st = os.statvfs(folder)
        usage = f", {st.f_bavail * st.f_frsize / 1e6:,.1f} MB free there now"
    except OSError:
        pass
    return StorageError(f"no space left on the disk holding --out {cap(out)} ({exc.strerror}{usage}): free space "
                        f"in {cap(folder)} or choose an --out on a disk with room, then rerun. Nothing was written: "
                        "the partial output was removed and any previous output there is unchanged")


def _pathconf(path: str, name: str, default: int) -> int:
    try:
        value = os.pathconf(path, name)
    except (OSError, ValueError, AttributeError):
        return default
    return value if value and value > 0 else default


def check_path_limits(out: PathLike) -> None:
    """StorageError, before any work, when ``out`` cannot be written for its length: a component longer than
    NAME_MAX (the last one with the staging folder's ``.NAME.partial-PID`` decoration), or a path that with the
    staging folder and the longest artifact name passes PATH_MAX (bytes, as the file system counts them)."""
    for absolute in dict.fromkeys((os.path.abspath(out), str(resolve_target(out)))):
        probe = absolute
        while probe and not os.path.exists(probe) and os.path.dirname(probe) != probe:
            probe = os.path.dirname(probe)
        name_max = _pathconf(probe, "PC_NAME_MAX", 255)
        path_max = _pathconf(probe, "PC_PATH_MAX", 4096)
        parts = [c for c in absolute.split(os.sep) if c]
        for part in parts:
            n = len(os.fsencode(part))
            if n > name_max:
                raise StorageError(f"--out {cap(out)}: the name {qcap(part, 60)} is {n} bytes, longer than this "
                                   f"file system allows for one name (NAME_MAX {name_max}): choose a shorter --out")
        staging = f".{parts[-1]}.partial-{os.getpid()}" if parts else ""
        extra = len(os.fsencode(staging)) - len(os.fsencode(parts[-1] if parts else ""))
        if len(os.fsencode(staging)) > name_max:
            raise StorageError(f"--out {cap(out)}: its last name is too long for quantkit's staging folder beside it "
                               f"(.NAME.partial-PID, {extra} bytes more; NAME_MAX {name_max}): keep the folder name "
                               f"under {name_max - extra} bytes")
        longest = len(os.fsencode(os.path.join(os.path.dirname(absolute), staging))) + 1 + _LONGEST_ARTIFACT
        if longest >= path_max:
            raise StorageError(f"--out {cap(out)} is {len(os.fsencode(absolute))} bytes long; with quantkit's staging "
                               f"folder and file names in it a path would reach {longest} bytes, past this system's "
                               f"PATH_MAX of {path_max}: choose a shorter --out")


def resolve_target(out: PathLike) -> Path:
    """The folder really written: ``out`` made absolute with every symlink followed (a link's target)."""
    return Path(os.path.realpath(os.path.abspath(out)))


def check_output_dir(out: PathLike, force: bool, inputs: Iterable[PathLike | None] = (),
                     own_files: Iterable[str] | None = None) -> None:
    """Refuse an output folder the run must not write or replace. Raises UsageError naming the fix.

    ``inputs``: every path the run reads (calibration/evaluation data, weights, recipe, model .py file,
    calibration cache file); ``--out`` must not be one, contain one, or lie inside an input folder — with or
    without ``force``. A non-empty ``out`` needs ``force``, and then must be a previous output of ours: by
    default a folder whose manifest.json lists every other file in it; ``own_files`` instead names the only
    files a command writes (for commands without a manifest). The nearest existing parent must be a writable
    folder (probed by creating a temporary folder there, which also catches read-only mounts and /sys).
    """
    check_path_limits(out)
    target = resolve_target(out)
    if target.parent == target:
        raise UsageError(f"--out {out} is the file system root: pass a new folder such as ./out")
    cwd = Path(os.path.realpath(os.getcwd()))
    if cwd == target or cwd.is_relative_to(target):
        raise UsageError(f"--out {out} is the current folder or one of its parents: an export replaces --out as a "
                         "whole, so pass a new folder such as ./out")
    check_not_an_input(out, inputs)
    probe = target
    while not probe.exists():
        probe = probe.parent
    if probe == target and not target.is_dir():
        raise UsageError(f"output path {out} is a file: pass a folder to --out")
    if probe != target and not probe.is_dir():
        raise UsageError(f"cannot create --out {out}: {probe} is a file, not a folder; choose another --out")
    if probe == target:
        _check_existing(target, out, force, own_files)
        probe = target.parent
    _probe_writable(probe, f"--out {out}")


def check_not_an_input(out: PathLike, inputs: Iterable[PathLike | None]) -> None:
    """UsageError when ``out`` is, contains, or lies inside a folder of, one of the run's ``inputs``."""
    target = resolve_target(out)
    for raw in inputs:
        if raw is None or str(raw) == "":
            continue
        p = resolve_target(raw)
        if p == target:
            why = "is"
        elif p.is_relative_to(target):
            why = "contains"
        elif p.is_dir() and target.is_relative_to(p):
            why = "is inside"
        else:
            continue
        raise UsageError(f"--out {out} {why} an input of this run ({raw}): quantkit would overwrite or delete it; "
                         "choose an --out folder apart from the calibration/evaluation data, weights, recipe, "
                         "model file and calibration cache")


def _check_existing(target: Path, out: PathLike, force: bool, own_files: Iterable[str] | None) -> None:
    try:
        entries = sorted(target.iterdir())
    except OSError as exc:
        raise UsageError(f"cannot read output folder {out}: {exc.strerror}; choose another --out") from None
    if not entries:
        return
    if not force:
        raise UsageError(f"output folder {out} is not empty: pass --force to replace it, or choose another --out")
    why = foreign_content(target, entries, own_files)
    if why:
        raise UsageError(f"--force replaces only a previous quantkit output, and {out} {why}; "
                         "move those files away or choose another --out")


def foreign_content(target: Path, entries: list[Path], own_files: Iterable[str] | None) -> str | None:
    """Why ``target`` is not (only) a previous output of ours, or None when it is."""
    from quantkit.report.manifest import MANIFEST, listed_files

    if own_files is not None:
        ours = set(own_files)
    else:
        if not (target / MANIFEST).is_file():
            return f"has no {MANIFEST} (it was not written by `quantkit export`)"
        try:
            ours = set(listed_files(target)) | {MANIFEST}
        except UsageError as exc:
            return f"has an unreadable {MANIFEST} ({exc})"
    extra = [e.name + ("/" if e.is_dir() else "") for e in entries
             if e.name not in ours or e.is_symlink() or not e.is_file()]
    if extra:
        shown = ", ".join(extra[:5]) + (f" and {len(extra) - 5} more" if len(extra) > 5 else "")
        return f"holds files quantkit did not write: {shown}"
    return None


def _probe_writable(folder: Path, what: str) -> None:
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".quantkit-probe-", dir=folder))
    except OSError as exc:
        raise UsageError(f"cannot write {what}: {folder} is not writable ({exc.strerror}); "
                         "choose a writable folder") from None


def remove_stale_staging(target: Path) -> list[Path]:
    """Remove ``.NAME.partial-PID`` / ``.NAME.old-PID`` beside ``target`` left by dead processes.

    A stale ``.old`` while ``target`` is missing is the previous output of a run killed mid-commit: it is moved
    back into place rather than deleted. Call with the target's lock held. Returns what was removed/restored.
    """
    done = []
    prefix = f".{target.name}."
    for p in sorted(target.parent.glob(f".{_glob_escape(target.name)}.*-*")):
        kind, _, pid = p.name[len(prefix):].rpartition("-")
        if kind not in ("partial", "old") or not pid.isdigit() or _alive(int(pid)) or not is_our_staging(p):
            continue
        if kind == "old" and not target.exists() and not target.is_symlink():
            os.replace(p, target)
            _unmark(target)
        else:
            shutil.rmtree(p, ignore_errors=True)
        done.append(p)
    return done


def is_our_staging(folder: Path) -> bool:
    """True when ``folder`` is a plain folder (not a link) of this user holding quantkit's staging marker, a
    plain file with quantkit's text: only then may a later run remove or restore it."""
    try:
        st = os.lstat(folder)
        if not stat.S_ISDIR(st.st_mode) or (hasattr(os, "getuid") and st.st_uid != os.getuid()):
            return False
        marker = folder / STAGING_MARKER
        mst = os.lstat(marker)
        if not stat.S_ISREG(mst.st_mode) or mst.st_size != len(_MARKER_TEXT):
            return False
        return marker.read_text(encoding="utf-8") == _MARKER_TEXT
    except (OSError, UnicodeDecodeError):
        return False


def _mark(folder: Path) -> None:
    (folder / STAGING_MARKER).write_text(_MARKER_TEXT, encoding="utf-8")


def _unmark(folder: Path) -> None:
    try:
        (folder / STAGING_MARKER).unlink()
    except FileNotFoundError:
        pass


def _glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # ours, from an earlier StagedOutput of this process that ended: safe to reuse
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class StagedOutput:
    """Context manager: ``with StagedOutput(out, force, inputs) as stage: stage.write_bytes("model.onnx", b)``.

    Holds the target's lock from ``__enter__`` to the end of ``__exit__``; the new folder is committed on a
    clean exit. See the module docstring for ``inputs`` and ``own_files``.
    """

    def __init__(self, out: PathLike, force: bool = False, inputs: Iterable[PathLike | None] = (),
                 own_files: Iterable[str] | None = None):
        self.out = Path(out)
        self.force = force
        self.inputs = list(inputs)
        self.own_files = None if own_files is None else frozenset(own_files)
        self.files: dict[str, Path] = {}
        self.staging: Path | None = None
        self.target: Path | None = None
        self._lock: OutputLock | None = None

    def __enter__(self) -> "StagedOutput":
        check_output_dir(self.out, self.force, self.inputs, self.own_files)
        self.target = resolve_target(self.out)
        try:
            self.target.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"cannot create the parent folder of --out {self.out}: {exc.strerror}") from None
        self._lock = OutputLock(self.target)
        self._lock.acquire()
        try:
            check_output_dir(self.out, self.force, self.inputs, self.own_files)  # again, under the lock
            remove_stale_staging(self.target)
            interrupt.begin_output()
            staging = self.target.parent / f".{self.target.name}.partial-{os.getpid()}"
            if staging.exists() or staging.is_symlink():
                if not is_our_staging(staging):  # our pid, but not our folder: never delete it
                    raise UsageError(f"{staging} exists and was not made by quantkit: move it away and retry")
                shutil.rmtree(staging)
            staging.mkdir()
            self.staging = staging
            _mark(staging)
        except BaseException as exc:
            self._release()
            if is_disk_full(exc):
                raise disk_full_error(self.out, self.target.parent, exc) from None
            raise
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
        """Move the staging folder into place. Called on success only; refused after a Ctrl-C/SIGTERM.

        The swap runs with SIGINT/SIGTERM deferred: a signal during or after it lets the run finish with the
        new output in place (see utils.interrupt). A failed rename puts the previous output back.
        """
        interrupt.test_point("commit")
        target, old = self.target, None
        with interrupt.deferred():
            if interrupt.requested():
                raise KeyboardInterrupt("interrupted before the output was committed")
            if target.exists():
                _check_existing(target, self.out, self.force, self.own_files)  # changed while we worked?
                old = target.parent / f".{target.name}.old-{os.getpid()}"
                if old.exists() or old.is_symlink():
                    if not is_our_staging(old):
                        raise UsageError(f"{old} exists and was not made by quantkit: move it away and retry")
                    shutil.rmtree(old)
                _rename(target, old, self.out)
                _mark(old)  # a run killed from here on leaves it for the next run to restore or remove
            try:
                interrupt.test_point("rename")
                _unmark(self.staging)  # the marker never reaches the output
                os.replace(self.staging, target)
            except OSError as exc:
                if old is not None:
                    os.replace(old, target)
                    _unmark(target)
                raise UsageError(f"cannot move the new output into place at {self.out}: {exc.strerror}; "
                                 "nothing was changed. Choose another --out") from None
            self.staging = None
            interrupt.mark_committed()
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        interrupt.test_point("after_commit")
        return self.out

    def _release(self) -> None:
        if self.staging is not None:
            shutil.rmtree(self.staging, ignore_errors=True)
            self.staging = None
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            if exc_type is None:
                self.commit()
        except OSError as err:
            if not is_disk_full(err):
                raise
            exc = err
        finally:
            self._release()
        if is_disk_full(exc):  # after _release: the staging folder is gone when the message says so
            raise disk_full_error(self.out, self.target.parent, exc) from None
        return False


def _rename(src: Path, dst: Path, out: PathLike) -> None:
    try:
        os.replace(src, dst)
    except OSError as exc:
        raise UsageError(f"cannot move the previous output {out} aside: {exc.strerror}; nothing was changed") from None
