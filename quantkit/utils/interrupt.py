"""Ctrl-C and SIGTERM that cannot be lost, and cannot half-replace an output folder.

Python turns SIGINT into KeyboardInterrupt at the next bytecode boundary, but a C extension that checks for
signals inside a long call and then clears the error (seen once in an export: the run went on and committed
its output after Ctrl-C) swallows it. The CLI installs this handler for SIGINT and SIGTERM (a job scheduler's
stop, ``kill``); it records the request and raises KeyboardInterrupt, so both clean up the same way, and
:class:`quantkit.output.StagedOutput` refuses to commit once a request was recorded.

The commit itself runs inside :func:`deferred`: the signals are blocked for the few renames, and a signal that
arrives after the new output is in place is recorded and otherwise ignored — the run finishes and exits 0 with
the new output. So an interrupted run ends in one of two states only: previous output intact and a non-zero
exit, or new output in place and a normal exit. Never "interrupted" with the new output in place.

``QUANTKIT_TEST_INTERRUPT=POINT[:TERM]`` (tests only) makes the process signal itself when it reaches
``test_point(POINT)``: ``calibration`` (after the first calibration batch), ``commit`` (before the commit),
``rename`` (inside the commit, between moving the old output aside and moving the new one in), ``after_commit``.
"""

from __future__ import annotations

import os
import signal
import threading
from contextlib import contextmanager

SIGNALS = (signal.SIGINT, signal.SIGTERM)
TEST_ENV = "QUANTKIT_TEST_INTERRUPT"

_requested = False
_signum: int | None = None
_committed = False
_deferring = False


def _handler(signum, frame) -> None:  # noqa: ARG001 - signal handler signature
    global _requested, _signum
    _requested = True
    _signum = _signum or signum
    if _committed or _deferring:
        return  # the output is (being) committed: finish the run normally
    raise KeyboardInterrupt


def install() -> None:
    """Route SIGINT and SIGTERM through the latch (main thread only; elsewhere Python allows no handlers)."""
    global _requested, _signum, _committed
    _requested, _signum, _committed = False, None, False
    if threading.current_thread() is threading.main_thread():
        for s in SIGNALS:
            signal.signal(s, _handler)


def requested() -> bool:
    """True once SIGINT/SIGTERM arrived after :func:`install`, even if the KeyboardInterrupt was swallowed."""
    return _requested


def exit_code() -> int:
    """The shell's convention for a run ended by a signal: 128 + signal number (130 SIGINT, 143 SIGTERM)."""
    return 128 + int(_signum or signal.SIGINT)


def signal_name() -> str:
    return signal.Signals(_signum or signal.SIGINT).name


def begin_output() -> None:
    """A new output is being staged: signals interrupt again until it is committed."""
    global _committed
    _committed = False


def mark_committed() -> None:
    """The new output is in place: from now on a signal no longer interrupts the run."""
    global _committed
    _committed = True


def committed() -> bool:
    return _committed


@contextmanager
def deferred():
    """Block SIGINT/SIGTERM (delivered when the block ends) while the output folder is being swapped."""
    global _deferring
    _deferring = True
    old = None
    if hasattr(signal, "pthread_sigmask") and threading.current_thread() is threading.main_thread():
        old = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    try:
        yield
    finally:
        _deferring = False
        if old is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)


def test_point(name: str) -> None:
    """Signal this process at a named point when ``$QUANTKIT_TEST_INTERRUPT`` asks for it (deterministic tests)."""
    spec = os.environ.get(TEST_ENV)
    if not spec:
        return
    point, _, sig = spec.partition(":")
    if point == name:
        os.kill(os.getpid(), signal.SIGTERM if sig.upper() in ("TERM", "SIGTERM") else signal.SIGINT)
