"""Progress of the long loops (calibration, sensitivity, evaluation) that a terminal *and* a CI log can read.

* On a terminal (stderr is a TTY): a tqdm bar.
* Otherwise (CI, a pipe, a log file): one plain line on stderr at least every :data:`DEFAULT_INTERVAL_S`
  seconds while the loop runs, from a background thread, so even one slow step (a single sensitivity layer
  of a large model) never leaves the log silent; then one closing line. A line reads
  ``quantkit: calibrating 3/10 batch (30%), 12.3 s elapsed, ETA 28.7 s``.
* Quiet: nothing.

The process-wide mode is set once by the front end (:func:`set_progress_mode`; ``--quiet`` -> ``QUIET``);
the loops only say whether they want progress at all (their ``progress=`` argument). The line interval can be
changed with ``$QUANTKIT_PROGRESS_INTERVAL`` (seconds), e.g. for a CI system with its own idle timeout.
"""

from __future__ import annotations

import enum
import os
import sys
import threading
import time
from typing import Callable, TextIO

DEFAULT_INTERVAL_S = 5.0
INTERVAL_ENV = "QUANTKIT_PROGRESS_INTERVAL"


class ProgressMode(str, enum.Enum):
    """``AUTO``: a bar on a terminal, lines otherwise. ``BAR``/``LINES``: force one. ``QUIET``: nothing."""

    AUTO = "auto"
    BAR = "bar"
    LINES = "lines"
    QUIET = "quiet"


_mode = ProgressMode.AUTO


def set_progress_mode(mode: ProgressMode | str) -> None:
    """Set how every later loop reports progress (process-wide). Raises ValueError for an unknown mode."""
    global _mode
    _mode = ProgressMode(mode)


def get_progress_mode() -> ProgressMode:
    return _mode


def line_interval_s() -> float:
    """Seconds between two progress lines: ``$QUANTKIT_PROGRESS_INTERVAL`` (> 0) or 5."""
    try:
        value = float(os.environ.get(INTERVAL_ENV, DEFAULT_INTERVAL_S))
    except ValueError:
        return DEFAULT_INTERVAL_S
    return value if value > 0 else DEFAULT_INTERVAL_S


def _fmt_s(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    m, s = divmod(int(round(seconds)), 60)
    return f"{m} min {s:02d} s" if m < 60 else f"{m // 60} h {m % 60:02d} min"


def format_line(desc: str, done: int, total: int | None, unit: str, elapsed_s: float, *, final: bool = False) -> str:
    """One progress line (without the trailing newline): stage, done/total, elapsed and ETA in seconds."""
    head = f"quantkit: {desc} {done}/{total if total is not None else '?'} {unit}"
    if total:
        head += f" ({100.0 * done / total:.0f}%)"
    if final:
        return f"{head}, done in {_fmt_s(elapsed_s)}"
    eta = "unknown"
    if total and done:
        eta = _fmt_s(elapsed_s / done * max(total - done, 0))
    return f"{head}, {_fmt_s(elapsed_s)} elapsed, ETA {eta}"


class Progress:
    """Counts finished steps. Use as a context manager; ``update(n)`` after each step. This base class is the
    quiet one: it counts and says nothing."""

    def __init__(self, total: int | None, desc: str, unit: str) -> None:
        self.total, self.desc, self.unit = total, desc, unit
        self.done = 0

    def update(self, n: int = 1) -> None:
        self.done += n

    def close(self) -> None:
        pass

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class BarProgress(Progress):
    """A tqdm bar on stderr (terminals)."""

    def __init__(self, total: int | None, desc: str, unit: str) -> None:
        super().__init__(total, desc, unit)
        from tqdm import tqdm

        self._bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, leave=False)

    def update(self, n: int = 1) -> None:
        super().update(n)
        self._bar.update(n)

    def close(self) -> None:
        self._bar.close()


class LineProgress(Progress):
    """Plain lines for logs: one every ``interval_s`` seconds from a daemon thread, and one when closed."""

    def __init__(self, total: int | None, desc: str, unit: str, *, interval_s: float | None = None,
                 stream: TextIO | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(total, desc, unit)
        self.interval_s = interval_s or line_interval_s()
        self._stream = stream or sys.stderr  # the stderr of the loop's start (the CLI runner may swap it later)
        self._clock = clock
        self._t0 = clock()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=f"quantkit-progress-{desc}", daemon=True)
        self._thread.start()

    def _write(self, final: bool = False) -> None:
        stream = self._stream
        line = format_line(self.desc, self.done, self.total, self.unit, self._clock() - self._t0, final=final)
        with self._lock:
            try:
                stream.write(line + "\n")
                stream.flush()
            except (OSError, ValueError):  # a closed pipe must not break the run
                pass

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._write()

    def close(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join(timeout=5.0)
        self._write(final=True)


def progress_bar(total: int | None, desc: str, unit: str = "it", *, enabled: bool = True) -> Progress:
    """The progress reporter for one loop under the current mode (see the module docstring).

    ``total``: steps expected (None: unknown, no ETA). ``desc``: the stage (``calibrating``). ``unit``: what a
    step is (``batch``, ``layer``, ``img``). ``enabled=False``: the caller does not want progress (quiet).
    """
    mode = _mode
    if not enabled or mode is ProgressMode.QUIET:
        return Progress(total, desc, unit)
    if mode is ProgressMode.BAR or (mode is ProgressMode.AUTO and _isatty(sys.stderr)):
        return BarProgress(total, desc, unit)
    return LineProgress(total, desc, unit)


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False
