"""Progress that CI can read: when stderr is not a terminal, the long loops (calibration, sensitivity,
evaluation) print a plain line at least every interval, even while one step takes many intervals."""

import io
import sys
import threading
import time

import numpy as np
import pytest
import torch
from torch import nn

from quantkit.utils import progress as pg

INTERVAL = 0.2  # seconds, via $QUANTKIT_PROGRESS_INTERVAL (the default is 5 s)
MAX_GAP = 2 * INTERVAL + 0.6  # slack for a busy shared machine


class Recorder(io.TextIOBase):
    """A non-terminal stderr that timestamps every line written to it."""

    def __init__(self):
        self.lines: list[tuple[float, str]] = []
        self._lock = threading.Lock()

    def write(self, s):
        with self._lock:
            for line in s.splitlines():
                if line.strip():
                    self.lines.append((time.monotonic(), line))
        return len(s)

    def isatty(self):
        return False

    def __enter__(self):  # pytest re-installs its own capture before the test body runs: swap in there
        self._saved, sys.stderr = sys.stderr, self
        return self

    def __exit__(self, *exc):
        sys.stderr = self._saved

    def of(self, stage):
        return [(t, line) for t, line in self.lines if line.startswith(f"quantkit: {stage} ")]


@pytest.fixture
def stderr(monkeypatch):
    rec = Recorder()
    monkeypatch.setenv(pg.INTERVAL_ENV, str(INTERVAL))
    pg.set_progress_mode(pg.ProgressMode.AUTO)
    yield rec
    pg.set_progress_mode(pg.ProgressMode.AUTO)


def assert_never_silent(lines, t_start, t_end):
    """A line at least every MAX_GAP seconds from the loop's start to its end, and a closing line."""
    assert lines, "no progress line at all"
    times = [t_start, *(t for t, _ in lines)]
    gaps = np.diff(times)
    assert gaps.max() <= MAX_GAP, (gaps, lines)
    assert t_end - lines[-1][0] <= MAX_GAP
    assert "done in" in lines[-1][1]


def test_default_interval_is_at_most_ten_seconds(monkeypatch):
    monkeypatch.delenv(pg.INTERVAL_ENV, raising=False)
    assert pg.line_interval_s() == pg.DEFAULT_INTERVAL_S <= 10
    monkeypatch.setenv(pg.INTERVAL_ENV, "nonsense")
    assert pg.line_interval_s() == pg.DEFAULT_INTERVAL_S


def test_line_format_has_stage_count_elapsed_and_eta():
    # closed form: 2 of 10 steps in 4 s -> 8 steps left at 2 s each = 16 s
    assert pg.format_line("calibrating", 2, 10, "batch", 4.0) == \
        "quantkit: calibrating 2/10 batch (20%), 4.0 s elapsed, ETA 16.0 s"
    assert pg.format_line("eval", 0, 10, "img", 1.0).endswith("ETA unknown")
    assert pg.format_line("eval", 3, None, "img", 125.0) == "quantkit: eval 3/? img, 2 min 05 s elapsed, ETA unknown"
    assert pg.format_line("eval", 10, 10, "img", 3.25, final=True) == "quantkit: eval 10/10 img (100%), done in 3.2 s"


def test_one_step_longer_than_many_intervals_still_prints_lines(stderr):
    t0 = time.monotonic()
    with stderr, pg.progress_bar(2, "slow", "step") as bar:
        time.sleep(6 * INTERVAL)  # a single step: lines must come from the clock, not from update()
        bar.update()
        bar.update()
    t1 = time.monotonic()
    lines = stderr.of("slow")
    assert len(lines) >= 4, lines
    assert_never_silent(lines, t0, t1)
    assert "0/2 step" in lines[0][1] and "ETA unknown" in lines[0][1]


def test_modes_terminal_bar_quiet_and_disabled(stderr, monkeypatch):
    with stderr:
        _modes(stderr, monkeypatch)


def _modes(stderr, monkeypatch):
    bar = pg.progress_bar(3, "x")
    assert isinstance(bar, pg.LineProgress)
    bar.close()
    monkeypatch.setattr(Recorder, "isatty", lambda self: True)
    bar = pg.progress_bar(3, "x")
    assert isinstance(bar, pg.BarProgress)
    bar.close()
    stderr.lines.clear()
    pg.set_progress_mode("quiet")
    with pg.progress_bar(3, "quiet") as bar:
        time.sleep(2 * INTERVAL)
        bar.update(3)
    assert type(bar) is pg.Progress and bar.done == 3
    pg.set_progress_mode("lines")
    with pg.progress_bar(3, "off", enabled=False):
        time.sleep(2 * INTERVAL)
    assert not stderr.lines
    with pytest.raises(ValueError):
        pg.set_progress_mode("loud")


# --- the three long loops, each with a slow step -------------------------------------------------------------

class Slow(nn.Module):
    def __init__(self, seconds):
        super().__init__()
        self.seconds = seconds

    def forward(self, x):
        time.sleep(self.seconds)
        return x


def _tiny(seconds):
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), Slow(seconds))


@pytest.fixture(scope="module")
def calib_npy(tmp_path_factory):
    from quantkit.data.images import list_images, load_image
    from quantkit.data.preprocess import Preprocess, preprocess_image
    from quantkit.paths import BUNDLED_CALIBRATION

    pp = Preprocess(size=(32, 32))
    arr = np.stack([preprocess_image(load_image(f), pp)[0] for f in list_images(BUNDLED_CALIBRATION)[:8]])
    path = tmp_path_factory.mktemp("progress") / "calib.npy"
    np.save(path, arr.astype(np.float32))
    return str(path)


def _state(calib_npy, seconds):
    from quantkit.pipeline import quantize_recipe
    from quantkit.recipe import load_recipe

    recipe = load_recipe(None, ["calibration.method=max", "calibration.use_cache=false", "calibration.batch_size=2"])
    torch.manual_seed(0)
    return quantize_recipe(recipe, model=_tiny(seconds), calib=calib_npy, progress=False)


def test_calibration_prints_lines_while_slow(stderr, calib_npy):
    from quantkit.calibrate.driver import run_calibration

    state = _state(calib_npy, 0.0)
    state.model.qmodel[-1].seconds = 3 * INTERVAL
    t0 = time.monotonic()
    with stderr:
        run_calibration(state.model.qmodel, state.data.batches(), state.recipe.calibration.settings, total=len(state.data), progress=True,
                        threads=1)
    lines = stderr.of("calibrating")
    assert_never_silent(lines, t0, time.monotonic())
    assert "4/4 batch" in lines[-1][1]


def test_sensitivity_estimates_up_front_and_prints_lines_while_slow(stderr, calib_npy, caplog):
    from quantkit.sensitivity.analysis import analyze

    state = _state(calib_npy, 0.0)
    state.model.qmodel[-1].seconds = INTERVAL  # every replay ends in the slow module
    t0 = time.monotonic()
    with caplog.at_level("INFO", logger="quantkit"), stderr:
        result = analyze(state, num_images=2, progress=True, chunk_size=2)
    lines = stderr.of("sensitivity")
    assert_never_silent(lines, t0, time.monotonic())
    estimate = [r.getMessage() for r in caplog.records if "one forward took" in r.getMessage()]
    assert estimate and "2 layers x 2 configuration(s) x 1 chunk" in estimate[0], caplog.text
    # the estimate bounds the real time: 1 chunk x (2 records + 2 x 2 replays) forwards of >= INTERVAL each
    assert result.seconds >= 6 * INTERVAL


def test_evaluation_prints_lines_while_slow(stderr):
    from quantkit.data.preprocess import Preprocess
    from quantkit.data.coco import CocoDataset
    from quantkit.eval.detection import predict_dataset
    from quantkit.paths import BUNDLED_EVAL

    def predict(x):
        time.sleep(2 * INTERVAL)
        return np.zeros((len(x), 1, 4), np.float32), np.zeros((len(x), 1, 1), np.float32)

    ds = CocoDataset(BUNDLED_EVAL, max_images=3)
    t0 = time.monotonic()
    with stderr:
        predict_dataset(predict, ds, Preprocess(size=(64, 64)), batch_size=1, progress=True)
    lines = stderr.of("evaluating")
    assert_never_silent(lines, t0, time.monotonic())
    assert "3/3 img" in lines[-1][1]


def test_quiet_sets_progress_mode_and_log_level():
    import logging

    from quantkit.cli.summary import configure_output

    logger = logging.getLogger("quantkit")
    old = logger.level
    try:
        configure_output(quiet=True)
        assert pg.get_progress_mode() is pg.ProgressMode.QUIET and logger.level == logging.WARNING
        logger.setLevel(logging.DEBUG)
        configure_output(quiet=True, verbose=True)  # -v wins for the log level
        assert logger.level == logging.DEBUG
        configure_output(quiet=False)
        assert pg.get_progress_mode() is pg.ProgressMode.AUTO
    finally:
        logger.setLevel(old)
        pg.set_progress_mode(pg.ProgressMode.AUTO)
