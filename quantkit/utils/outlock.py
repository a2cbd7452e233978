"""One writer per output folder: an advisory lock file ``.NAME.lock`` beside the target.

Why ``flock`` on a lock file rather than an ``O_EXCL`` file or a rename that fails when the target exists:
the kernel drops an ``flock`` when its holder dies, SIGKILL included, so a crashed run never leaves a lock
that blocks the next one (an ``O_EXCL`` file would need PID-liveness guesses, racy when two runs find the same
stale file), and the lock covers the whole write — check, staging, commit — whereas a failing rename only
guards the last step, and Linux's ``rename`` replaces an empty directory silently. The file is unlinked on
release; a run that locked a file which has since been unlinked (the release race) sees the inode change and
locks afresh, so two runs can never both hold the lock on one path.

Holding is re-entrant within one process (the pipeline takes the lock before calibration and the staged
output takes it again at commit): ``flock`` locks belong to the open file, so a second ``open`` in the same
process would otherwise block itself.
"""

from __future__ import annotations

import os
from pathlib import Path

from quantkit.errors import UsageError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory locks; runs are then not serialized
    fcntl = None

_held: dict[str, list] = {}  # lock path -> [fd, depth]


def lock_path(target: Path) -> Path:
    return target.parent / f".{target.name}.lock"


class OutputLock:
    """``with OutputLock(target):`` — exclusive right to write ``target`` (a resolved path). UsageError if taken."""

    def __init__(self, target: str | os.PathLike):
        self.path = lock_path(Path(target))
        self._created: list[Path] = []  # parent folders made for the lock file, removed again if left empty

    def __enter__(self) -> "OutputLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> bool:
        self.release()
        return False

    def acquire(self) -> None:
        key = str(self.path)
        if key in _held:
            _held[key][1] += 1
            return
        if fcntl is None:  # pragma: no cover
            _held[key] = [None, 1]
            return
        missing = [p for p in [self.path.parent, *self.path.parent.parents] if not p.exists()]
        for p in reversed(missing):
            try:
                p.mkdir()
                self._created.append(p)
            except FileExistsError:
                pass
            except OSError as exc:
                self._remove_created()
                raise UsageError(f"cannot create the folder {p}: {exc.strerror}. Choose a writable --out") from None
        for _ in range(100):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                self._remove_created()
                raise UsageError(f"cannot create the lock file {self.path}: {exc.strerror}. "
                                 "Choose an --out in a writable folder") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = _read_pid(fd)
                os.close(fd)
                self._remove_created()
                who = f" (pid {holder})" if holder else ""
                raise UsageError(f"another quantkit run{who} is writing {self.path.parent / self.path.name[1:-5]}: "
                                 "wait for it to finish or choose another --out") from None
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                try:
                    os.ftruncate(fd, 0)
                    os.write(fd, f"{os.getpid()}\n".encode())
                except OSError:
                    pass  # the pid only names the holder in a message: a full disk must not stop the lock
                _held[key] = [fd, 1]
                return
            os.close(fd)  # the holder released and unlinked it between our open and flock: take a fresh one
        raise UsageError(f"cannot lock {self.path}: it keeps changing; is another program removing it?")

    def release(self) -> None:
        key = str(self.path)
        entry = _held.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] > 0:
            return
        del _held[key]
        if entry[0] is not None:
            try:
                os.unlink(self.path)  # while still locked: see the module docstring for why this is safe
            except FileNotFoundError:
                pass
            os.close(entry[0])
        self._remove_created()

    def _remove_created(self) -> None:
        for p in reversed(self._created):  # deepest first; a folder that now holds the output stays
            try:
                p.rmdir()
            except OSError:
                break
        self._created = []


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode().strip()
        return int(text) if text.isdigit() else None
    except (OSError, UnicodeDecodeError):
        return None
