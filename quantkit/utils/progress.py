"""Progress of the long loops (calibration, sensitivity, evaluation) that a terminal *and* a CI log can read.

* On a terminal (stderr is a TTY): a tqdm bar.
* Otherwise (CI, a pipe, a log file): one plain line on stderr at least every :data:`DEFAULT_INTERVAL_S`
  seconds while the loop runs, from a background thread, so even one slow step (a single sensitivity layer
  of a large model) never leaves the log silent; then one closing line. A line reads
  ``quantkit: calibrating 3/10 batch (30%), 12.3 s elapsed, ETA 28.7 s``.
* Quiet: nothing.

A phase that is one long call (``torch.onnx.export``, a plot) gets a :func:`heartbeat`: on a terminal a
spinner-like bar with the elapsed time, otherwise ``quantkit: exporting ONNX (INT8 Q/DQ graph) ..., 10.0 s
elapsed`` every interval, and a closing ``done in`` line when it ran that long.

A loop whose steps cost unequal time passes ``weights`` (relative cost per step) so that its ETA is right: the
ETA is the elapsed time scaled by remaining over finished weight. Once every step is counted, the 100 % line
is printed once (``finishing``), not again every interval until the loop closes.

The process-wide mode is set once by the front end (:func:`set_progress_mode`; ``--quiet`` -> ``QUIET``);
the loops only say whether they want progress at all (their ``progress=`` argument). The line interval can be
changed with ``$QUANTKIT_PROGRESS_INTERVAL`` (seconds), e.g. for a CI system with its own idle timeout.
"""

from __future__ import annotations

import enum
import itertools
import os
import sys
import threading
import time
from typing import Callable, Sequence, TextIO

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


def format_line(desc: str, done: int, total: int | None, unit: str, elapsed_s: float, *, final: bool = False,
                eta_s: float | None = None) -> str:
    """One progress line (without the trailing newline): stage, done/total, elapsed and ETA in seconds.

    ``eta_s``: the remaining time when the caller knows better than the linear estimate (weighted steps)."""
    head = f"quantkit: {desc} {done}/{total if total is not None else '?'} {unit}"
    if total:
        head += f" ({100.0 * done / total:.0f}%)"
    if final:
        return f"{head}, done in {_fmt_s(elapsed_s)}"
    if total and done >= total:  # every step counted: the loop is closing, an "ETA 0.0 s" says nothing
        return f"{head}, {_fmt_s(elapsed_s)} elapsed, finishing"
    if eta_s is None and total and done:
        eta_s = elapsed_s / done * max(total - done, 0)
    eta = "unknown" if eta_s is None else _fmt_s(eta_s)
    return f"{head}, {_fmt_s(elapsed_s)} elapsed, ETA {eta}"


def format_heartbeat(desc: str, elapsed_s: float, *, final: bool = False) -> str:
    """One line of a phase with no step count (a single long call): stage and elapsed seconds."""
    if final:
        return f"quantkit: {desc}, done in {_fmt_s(elapsed_s)}"
    return f"quantkit: {desc} ..., {_fmt_s(elapsed_s)} elapsed"


class Progress:
    """Counts finished steps. Use as a context manager; ``update(n)`` after each step. This base class is the
    quiet one: it counts and says nothing."""

    def __init__(self, total: int | None, desc: str, unit: str) -> None:
        self.total, self.desc, self.unit = total, desc, unit
        self.done = 0

    def update(self, n: int = 1) -> None:
        self.done += n

    def set_total(self, total: int | None, weights: Sequence[float] | None = None) -> None:
        """The step count (and relative step costs) once known, e.g. after a setup that finds the layers."""
        self.total = total

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

    def set_total(self, total: int | None, weights: Sequence[float] | None = None) -> None:
        super().set_total(total)
        self._bar.total = total
        self._bar.refresh()

    def close(self) -> None:
        self._bar.close()


class LineProgress(Progress):
    """Plain lines for logs: one every ``interval_s`` seconds from a daemon thread, and one when closed.

    ``weights``: relative cost of each step (len >= total), for an ETA that knows the late steps are cheaper or
    dearer. ``clock``/``background=False``: tests drive :meth:`tick` by hand on a fake clock."""

    def __init__(self, total: int | None, desc: str, unit: str, *, interval_s: float | None = None,
                 stream: TextIO | None = None, clock: Callable[[], float] = time.monotonic,
                 weights: Sequence[float] | None = None, background: bool = True) -> None:
        super().__init__(total, desc, unit)
        self.interval_s = interval_s or line_interval_s()
        self._stream = stream or sys.stderr  # the stderr of the loop's start (the CLI runner may swap it later)
        self._clock = clock
        self._t0 = clock()
        self._cum = list(itertools.accumulate(float(w) for w in weights)) if weights is not None else None
        self._said_finishing = False
        self._failed = False
        self._t_last = 0.0  # elapsed seconds at the last update
        self.ticks = 0  # periodic lines written so far
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = None
        if background:
            self._thread = threading.Thread(target=self._run, name=f"quantkit-progress-{desc}", daemon=True)
            self._thread.start()

    def set_total(self, total: int | None, weights: Sequence[float] | None = None) -> None:
        super().set_total(total)
        self._cum = list(itertools.accumulate(float(w) for w in weights)) if weights is not None else None

    def elapsed_s(self) -> float:
        return self._clock() - self._t0

    def update(self, n: int = 1) -> None:
        super().update(n)
        self._t_last = self.elapsed_s()

    def _weight(self, k: int) -> float:
        """Weight of the first ``k`` steps (``k`` without weights)."""
        cum = self._cum
        if cum is None or len(cum) < (self.total or 0):
            return float(k)
        return cum[k - 1] if k > 0 else 0.0

    def eta_s(self, elapsed_s: float) -> float | None:
        """Seconds left: the time per unit of weight at the last finished step times the weight left, less the
        time already spent in the current step (but never less than the steps after it need)."""
        done, total = self.done, self.total
        if not total or not done:
            return None
        finished = self._weight(min(done, total))
        if finished <= 0:
            return None
        rate = self._t_last / finished
        remaining = self._weight(total) - finished
        current = self._weight(min(done + 1, total)) - finished
        in_step = max(elapsed_s - self._t_last, 0.0)
        return max(rate * remaining - in_step, rate * (remaining - current))

    def __exit__(self, exc_type, *exc) -> None:
        self._failed = exc_type is not None  # the closing line must not say "done" when the phase failed
        self.close()

    def line(self, final: bool = False) -> str:
        elapsed = self.elapsed_s()
        if final and self._failed:
            return f"quantkit: {self.desc} stopped after {_fmt_s(elapsed)}"
        return format_line(self.desc, self.done, self.total, self.unit, elapsed, final=final,
                           eta_s=None if final else self.eta_s(elapsed))

    def _write(self, line: str) -> None:
        with self._lock:
            try:
                self._stream.write(line + "\n")
                self._stream.flush()
            except (OSError, ValueError):  # a closed pipe must not break the run
                pass

    def tick(self) -> None:
        """The periodic line. Once every step is counted it is written once, not every interval."""
        if self.total is not None and self.done >= self.total:
            if self._said_finishing:
                return
            self._said_finishing = True
        self.ticks += 1
        self._write(self.line())

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.tick()

    def close(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
        if self._closing_line_wanted():
            self._write(self.line(final=True))

    def _closing_line_wanted(self) -> bool:
        return True


class LineHeartbeat(LineProgress):
    """A phase with no step count, for logs: ``quantkit: <desc> ..., 10.0 s elapsed`` every interval; the
    closing ``done in`` line only when at least one such line was written (a short phase stays silent)."""

    def __init__(self, desc: str, **kw) -> None:
        super().__init__(None, desc, "", **kw)

    def line(self, final: bool = False) -> str:
        if final and self._failed:
            return f"quantkit: {self.desc} stopped after {_fmt_s(self.elapsed_s())}"
        return format_heartbeat(self.desc, self.elapsed_s(), final=final)

    def _closing_line_wanted(self) -> bool:
        return bool(self.ticks)  # a short phase that never printed stays silent


class BarHeartbeat(Progress):
    """A phase with no step count, on a terminal: a tqdm line with the elapsed time, redrawn every second."""

    def __init__(self, desc: str) -> None:
        super().__init__(None, desc, "")
        from tqdm import tqdm

        self._bar = tqdm(total=None, desc=desc, file=sys.stderr, leave=False, bar_format="{desc} ... {elapsed}")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"quantkit-heartbeat-{desc}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            try:
                self._bar.refresh()
            except (OSError, ValueError):
                return

    def close(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join(timeout=5.0)
        self._bar.close()


def progress_bar(total: int | None, desc: str, unit: str = "it", *, enabled: bool = True,
                 weights: Sequence[float] | None = None) -> Progress:
    """The progress reporter for one loop under the current mode (see the module docstring).

    ``total``: steps expected (None: unknown, no ETA). ``desc``: the stage (``calibrating``). ``unit``: what a
    step is (``batch``, ``layer``, ``img``). ``enabled=False``: the caller does not want progress (quiet).
    ``weights``: relative cost of each step, when steps are unequal (log lines' ETA; the terminal bar ignores it).
    """
    mode = _mode
    if not enabled or mode is ProgressMode.QUIET:
        return Progress(total, desc, unit)
    if mode is ProgressMode.BAR or (mode is ProgressMode.AUTO and _isatty(sys.stderr)):
        return BarProgress(total, desc, unit)
    return LineProgress(total, desc, unit, weights=weights)


def heartbeat(desc: str, *, enabled: bool = True) -> Progress:
    """The progress reporter for a phase that is one long call (no steps to count), e.g.
    ``with heartbeat("exporting ONNX (INT8 Q/DQ graph)"): torch.onnx.export(...)``: a line every interval in
    logs, an elapsed-time bar on a terminal, nothing when quiet or ``enabled=False``."""
    mode = _mode
    if not enabled or mode is ProgressMode.QUIET:
        return Progress(None, desc, "")
    if mode is ProgressMode.BAR or (mode is ProgressMode.AUTO and _isatty(sys.stderr)):
        return BarHeartbeat(desc)
    return LineHeartbeat(desc)


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False
