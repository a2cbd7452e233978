"""Ctrl-C that cannot be lost: a SIGINT latch checked before an output folder is committed.

Python turns SIGINT into KeyboardInterrupt at the next bytecode boundary, but a C extension that checks for
signals inside a long call and then clears the error (seen once in an export: the run went on and committed
its output after Ctrl-C) swallows it. The CLI installs this handler; it records the request and raises as
the default handler does, and :class:`quantkit.export.artifacts.StagedOutput` refuses to commit once a request
was recorded, so an interrupted run never replaces the previous output.
"""

from __future__ import annotations

import signal
import threading

_requested = False


def _handler(signum, frame) -> None:  # noqa: ARG001 - signal handler signature
    global _requested
    _requested = True
    raise KeyboardInterrupt


def install() -> None:
    """Route SIGINT through the latch (main thread only; elsewhere Python does not allow handlers)."""
    global _requested
    _requested = False
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _handler)


def requested() -> bool:
    """True once SIGINT arrived after :func:`install`, even if the KeyboardInterrupt was swallowed."""
    return _requested
