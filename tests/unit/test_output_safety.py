"""--out and --force never cost the user data: inputs and foreign files are refused, one writer per target,
stale staging of dead runs is cleaned, a failed commit leaves nothing, a symlinked --out keeps its link."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import signal
import subprocess
import sys

import pytest

from quantkit.errors import UsageError
from quantkit.output import STAGING_MARKER, StagedOutput, _mark, check_output_dir, remove_stale_staging
from quantkit.utils import interrupt
from quantkit.utils.outlock import OutputLock


def previous_output(out, files=None):
    """A folder as `quantkit export` leaves it: files plus a manifest.json listing each of them."""
    files = files or {"model.onnx": b"previous"}
    out.mkdir(parents=True, exist_ok=True)
    listed = {}
    for name, data in files.items():
        (out / name).write_bytes(data)
        listed[name] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    (out / "manifest.json").write_text(json.dumps({"schema": 1, "files": listed}))
    return out


def snapshot(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def imgs(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    (d / "a.png").write_bytes(b"not really a png, but the user's file")
    return d


@pytest.mark.parametrize("where", ["is", "parent", "inside", "weights_inside", "recipe_inside"])
def test_force_refuses_any_folder_holding_an_input(tmp_path, imgs, where):
    weights = tmp_path / "w" / "net.pt"
    weights.parent.mkdir()
    weights.write_bytes(b"weights")
    out = {"is": imgs, "parent": tmp_path, "inside": imgs / "out", "weights_inside": weights.parent,
           "recipe_inside": tmp_path / "w"}[where]
    before = snapshot(tmp_path)
    with pytest.raises(UsageError, match="an input of this run"):
        with StagedOutput(out, force=True, inputs=[str(imgs), str(weights)]):
            pass
    assert snapshot(tmp_path) == before
    assert not [p for p in tmp_path.rglob(".*")]  # no staging, no lock file


def test_force_refuses_a_folder_without_our_manifest(tmp_path):
    out = tmp_path / "docs"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    with pytest.raises(UsageError, match="no manifest.json"):
        check_output_dir(out, force=True)
    assert (out / "thesis.tex").read_text() == "years of work"


def test_force_refuses_our_output_with_foreign_files_added(tmp_path):
    out = previous_output(tmp_path / "out")
    (out / "notes.txt").write_text("mine")
    (out / "sub").mkdir()
    with pytest.raises(UsageError, match="did not write: notes.txt, sub/"):
        check_output_dir(out, force=True)
    (out / "manifest.json").write_text("[1, 2]")  # malformed manifest: not ours either
    with pytest.raises(UsageError, match="unreadable manifest.json"):
        check_output_dir(out, force=True)


def test_force_replaces_a_previous_output(tmp_path):
    out = previous_output(tmp_path / "out")
    with StagedOutput(out, force=True) as stage:
        stage.write_bytes("model.onnx", b"new")
    assert (out / "model.onnx").read_bytes() == b"new" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("case", ["afile_sub", "sys", "root", "cwd"])
def test_unwritable_or_impossible_out_is_refused_up_front(tmp_path, monkeypatch, case):
    (tmp_path / "afile").write_text("x")
    monkeypatch.chdir(tmp_path)
    out, match = {"afile_sub": ("afile/sub", "is a file, not a folder"), "sys": ("/sys/x", "not writable"),
                  "root": ("/", "root"), "cwd": (".", "current folder")}[case]
    if case == "sys" and not os.path.isdir("/sys/kernel"):
        pytest.skip("no /sys here")
    with pytest.raises(UsageError, match=match):
        check_output_dir(out, force=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_failed_commit_leaves_nothing(tmp_path, monkeypatch):
    out = previous_output(tmp_path / "out")
    before = snapshot(out)
    real = os.replace

    def failing(src, dst):
        if str(src).endswith(f".partial-{os.getpid()}"):
            raise OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(UsageError, match="cannot move the new output into place"):
        with StagedOutput(out, force=True) as stage:
            stage.write_bytes("model.onnx", b"new")
    assert snapshot(out) == before  # the previous output was put back
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_symlinked_out_replaces_the_link_target_and_keeps_the_link(tmp_path):
    real = previous_output(tmp_path / "real")
    link = tmp_path / "link"
    link.symlink_to(real)
    with StagedOutput(link, force=True) as stage:
        stage.write_bytes("model.onnx", b"new")
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert (real / "model.onnx").read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]  # no .link.old-PID, no .real.old-PID
    # a link to a foreign folder is refused, the folder untouched
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "x.txt").write_text("keep")
    (tmp_path / "link2").symlink_to(tmp_path / "home")
    with pytest.raises(UsageError, match="no manifest.json"):
        check_output_dir(tmp_path / "link2", force=True)


def _hold_lock(target, ready, release):
    with OutputLock(target):
        ready.set()
        release.wait(30)


def test_second_writer_of_one_target_is_refused(tmp_path):
    target = tmp_path / "out"
    ctx = multiprocessing.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=_hold_lock, args=(target, ready, release))
    proc.start()
    try:
        assert ready.wait(30)
        with pytest.raises(UsageError, match=r"another quantkit run \(pid \d+\) is writing"):
            with StagedOutput(target):
                pass
        assert not target.exists()
    finally:
        release.set()
        proc.join(30)
    with StagedOutput(target) as stage:  # free again once the holder is gone
        stage.write_bytes("a", b"1")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_lock_of_a_killed_holder_is_free(tmp_path):
    target = tmp_path / "out"
    code = ("import os, sys; from quantkit.utils.outlock import OutputLock; OutputLock(sys.argv[1]).acquire(); "
            "os.kill(os.getpid(), 9)")
    subprocess.run([sys.executable, "-c", code, str(target)], env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert (tmp_path / ".out.lock").exists()  # SIGKILL: no cleanup ran, but the kernel dropped the flock
    with StagedOutput(target) as stage:
        stage.write_bytes("a", b"1")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_stale_staging_of_dead_processes_is_removed_and_a_lost_previous_output_restored(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    (tmp_path / f".out.partial-{dead}").mkdir()
    (tmp_path / f".out.partial-{dead}" / "model.onnx").write_bytes(b"8 MB of half an export")
    _mark(tmp_path / f".out.partial-{dead}")
    (tmp_path / f".other.partial-{dead}").mkdir()  # another target's: not ours to judge
    _mark(tmp_path / f".other.partial-{dead}")
    alive = tmp_path / f".out.partial-{os.getppid()}"
    alive.mkdir()
    _mark(alive)
    previous_output(tmp_path / f".out.old-{dead}")  # killed between moving the old output aside and the rename
    _mark(tmp_path / f".out.old-{dead}")
    removed = remove_stale_staging(tmp_path / "out")
    assert len(removed) == 2
    assert (tmp_path / "out" / "model.onnx").read_bytes() == b"previous"
    assert not (tmp_path / "out" / STAGING_MARKER).exists()  # the restored output is as it was
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([alive.name, f".other.partial-{dead}", "out"])


@pytest.fixture
def latch():
    old = {s: signal.getsignal(s) for s in interrupt.SIGNALS}
    interrupt.install()
    yield
    interrupt.install()
    for s, h in old.items():
        signal.signal(s, h)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_before_commit_keeps_previous(tmp_path, latch, sig):
    out = previous_output(tmp_path / "out")
    before = snapshot(out)
    with pytest.raises(KeyboardInterrupt):
        with StagedOutput(out, force=True) as stage:
            stage.write_bytes("model.onnx", b"new")
            os.kill(os.getpid(), sig)
    assert snapshot(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert interrupt.exit_code() == 128 + sig


@pytest.mark.parametrize("point", ["rename", "after_commit"])
def test_signal_inside_or_after_the_commit_finishes_with_the_new_output(tmp_path, latch, monkeypatch, point):
    monkeypatch.setenv(interrupt.TEST_ENV, f"{point}:TERM")
    out = previous_output(tmp_path / "out")
    with StagedOutput(out, force=True) as stage:
        stage.write_bytes("model.onnx", b"new")
    assert interrupt.requested() and interrupt.committed()  # the signal came, and was not an interruption
    assert (out / "model.onnx").read_bytes() == b"new" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_signal_at_commit_start_keeps_previous(tmp_path, latch, monkeypatch):
    monkeypatch.setenv(interrupt.TEST_ENV, "commit")
    out = previous_output(tmp_path / "out")
    before = snapshot(out)
    with pytest.raises(KeyboardInterrupt):
        with StagedOutput(out, force=True) as stage:
            stage.write_bytes("model.onnx", b"new")
    assert snapshot(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_own_files_mark_a_previous_output_of_a_command_without_manifest(tmp_path):
    """`quantkit sensitivity` writes sensitivity.json/.png only: those, and nothing else, may be replaced."""
    out = tmp_path / "sens"
    out.mkdir()
    (out / "sensitivity.json").write_text("{}")
    (out / "sensitivity.png").write_bytes(b"png")
    own = ("sensitivity.json", "sensitivity.png")
    check_output_dir(out, force=True, own_files=own)
    (out / "notes.md").write_text("mine")
    with pytest.raises(UsageError, match="did not write: notes.md"):
        check_output_dir(out, force=True, own_files=own)


def _dead_pid() -> str:
    return subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()


def _tree(root):
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def test_user_folders_named_like_staging_survive_an_export(tmp_path):
    dead = _dead_pid()
    partial, old = tmp_path / f".out.partial-{dead}", tmp_path / f".out.old-{dead}"
    for d in (partial, old):
        d.mkdir()
        (d / "thesis.tex").write_text("years of work\n")
    fake = tmp_path / f".out.partial-{int(dead) + 1}"  # a marker that is not ours: a folder, not our text
    fake.mkdir()
    (fake / STAGING_MARKER).mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / STAGING_MARKER).write_text("x")
    (tmp_path / f".out.old-{int(dead) + 2}").symlink_to(tmp_path / "elsewhere")  # a link is never ours
    before = _tree(tmp_path)
    with StagedOutput(tmp_path / "out") as stage:  # target missing: a stale .old would be restored into it
        assert (stage.staging / STAGING_MARKER).is_file()
        stage.write_text("a.txt", "new")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.txt"]  # no marker in the output
    after = _tree(tmp_path)
    assert {k: v for k, v in after.items() if not k.startswith("out")} == before


def test_a_killed_commit_leaves_a_marked_old_that_the_next_run_restores(tmp_path, monkeypatch):
    out = previous_output(tmp_path / "out")
    stage = StagedOutput(out, force=True)
    stage.__enter__()
    stage.write_text("model.onnx", "new")

    def die(point):
        if point == "rename":
            raise SystemExit("killed")  # stands for SIGKILL between moving the old output aside and the rename
    monkeypatch.setattr(interrupt, "test_point", die)
    with pytest.raises(SystemExit):
        stage.commit()
    monkeypatch.undo()
    stage._lock.release()
    old = tmp_path / f".out.old-{os.getpid()}"
    assert old.is_dir() and (old / STAGING_MARKER).is_file() and not out.exists()
    removed = remove_stale_staging(out)  # our own pid counts as dead here: that run has ended
    assert old in removed and not old.exists() and not stage.staging.exists()
    assert (out / "model.onnx").read_bytes() == b"previous" and not (out / STAGING_MARKER).exists()
