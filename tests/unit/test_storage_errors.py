"""A full disk and over-long --out paths are the user's environment, not bugs: exit 2 naming the folder and the fix,
the previous output byte-identical, no staging folder or lock file left behind. (A real full file system:
tests/integration/test_full_disk.py.)"""

from __future__ import annotations

import errno
import hashlib
import os
import pathlib
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from quantkit.cli import main
from quantkit.errors import StorageError
from quantkit.output import StagedOutput, check_path_limits
from onnx_toy import toy_data, toy_onnx

NET_PY = """
import torch
from torch import nn

def build():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1))
"""


def tree_hashes(folder: pathlib.Path) -> dict[str, str]:
    """relative path -> sha256 of every file under ``folder`` (hidden ones included)."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    (d / "toy.onnx").write_bytes(toy_onnx())
    np.save(d / "calib.npy", toy_data(4))
    (d / "net.py").write_text(NET_PY)
    return d


def route_args(route: str, inputs: pathlib.Path) -> list[str]:
    model = [str(inputs / "toy.onnx")] if route == "onnx" else ["--model", f"{inputs / 'net.py'}:build"]
    return ["export", *model, "--calib", str(inputs / "calib.npy"), "--no-cache"]


def run(args: list[str]):
    res = CliRunner().invoke(main, args)
    return res.exit_code, res.output


@pytest.fixture(scope="module")
def previous(inputs, tmp_path_factory):
    """route -> a folder holding a complete previous export of that route."""
    done = {}
    for route in ("onnx", "torch"):
        out = tmp_path_factory.mktemp(f"prev-{route}") / "out"
        code, text = run([*route_args(route, inputs), "--out", str(out)])
        assert code == 0, text
        done[route] = out
    return done


@pytest.mark.parametrize("route,victim", [("onnx", "model.int8.onnx"), ("onnx", "report.json"),
                                          ("torch", "model.onnx"), ("torch", "manifest.json")])
def test_disk_full_while_writing_exits_2_and_keeps_the_previous_output(inputs, previous, tmp_path, monkeypatch,
                                                                      route, victim):
    import quantkit.utils.atomic as atomic

    work = tmp_path / "work"
    work.mkdir()
    out = work / "out"
    for p in previous[route].iterdir():  # a previous output of this route, as `export` left it
        (out / p.name).parent.mkdir(exist_ok=True)
        (out / p.name).write_bytes(p.read_bytes())
    before = tree_hashes(work)
    real_fdopen = atomic.os.fdopen
    hit = []

    class FullDisk:
        """A file object whose write stores half the bytes, then fails as a full disk does."""

        def __init__(self, fh):
            self.fh = fh

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()
            return False

        def write(self, data):
            self.fh.write(data[: len(data) // 2])
            self.fh.flush()
            hit.append(self.fh.name)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def fdopen(fd, *a, **k):
        fh = real_fdopen(fd, *a, **k)
        path = os.readlink(f"/proc/self/fd/{fd}") if os.path.exists(f"/proc/self/fd/{fd}") else ""
        return FullDisk(fh) if os.path.basename(path).startswith(f".{victim}.") else fh

    monkeypatch.setattr(atomic.os, "fdopen", fdopen)
    code, text = run([*route_args(route, inputs), "--out", str(out), "--force"])
    assert hit, f"{victim} was never written"
    assert code == 2, text
    assert "no space left on the disk holding --out" in text and str(out) in text and "free space" in text
    assert "internal error" not in text
    assert tree_hashes(work) == before  # previous output byte-identical; no staging, temp or lock file left
    assert sorted(p.name for p in work.iterdir()) == ["out"]


def test_disk_full_creating_the_staging_folder(tmp_path, monkeypatch):
    real_mkdir = pathlib.Path.mkdir

    def mkdir(self, *a, **k):
        if ".partial-" in self.name:
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real_mkdir(self, *a, **k)

    monkeypatch.setattr(pathlib.Path, "mkdir", mkdir)
    with pytest.raises(StorageError, match="no space left on the disk holding --out") as e:
        with StagedOutput(tmp_path / "out"):
            pass
    assert e.value.exit_code == 2 and list(tmp_path.iterdir()) == []


def test_disk_full_outside_out_is_exit_2_naming_the_file(capsys):
    """ENOSPC met outside --out (calibration cache, TMPDIR): the CLI boundary names the file and the fix."""
    from quantkit.cli.common import run_guarded

    def body():
        raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT), "/scratch/tmp/onnx-xyz.bin")

    with pytest.raises(SystemExit) as e:
        run_guarded(body)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "/scratch/tmp/onnx-xyz.bin" in err and "TMPDIR" in err
    assert "internal error" not in err


@pytest.mark.parametrize("route", ["onnx", "torch"])
@pytest.mark.parametrize("case", ["name_max", "staging_name", "path_max"])
def test_over_long_out_is_refused_before_any_work(inputs, tmp_path, monkeypatch, route, case):
    import quantkit.models
    import quantkit.pipeline_onnx as onnx_export

    def no_work(*a, **k):
        raise AssertionError("work started before the --out check")

    monkeypatch.setattr(onnx_export, "quantize_onnx", no_work)
    monkeypatch.setattr(quantkit.models, "build", no_work)
    name_max = os.pathconf(tmp_path, "PC_NAME_MAX")
    path_max = os.pathconf(tmp_path, "PC_PATH_MAX")
    out, match = {
        "name_max": (tmp_path / ("n" * (name_max + 1)) / "out", "NAME_MAX"),
        "staging_name": (tmp_path / ("s" * (name_max - 3)), "staging folder"),
        "path_max": (tmp_path.joinpath(*["p" * 200] * (path_max // 201 + 1)), "PATH_MAX"),
    }[case]
    code, text = run([*route_args(route, inputs), "--out", str(out)])
    assert code == 2 and match in text, text
    assert list(tmp_path.iterdir()) == []
    assert len(text) < 1500  # the path is quoted capped, not whole


def test_path_limits_accept_ordinary_paths(tmp_path):
    check_path_limits(tmp_path / "out")
    check_path_limits("out")
    check_path_limits(tmp_path / ("x" * 200))  # long but room left for ".NAME.partial-PID"


def test_disk_full_never_passes_for_other_errors(tmp_path):
    """Only ENOSPC/EDQUOT become StorageError: a permission error inside the stage stays what it was."""
    with pytest.raises(PermissionError):
        with StagedOutput(tmp_path / "out"):
            raise PermissionError(errno.EACCES, "Permission denied")
    assert list(tmp_path.iterdir()) == []


if sys.platform != "linux":  # pragma: no cover
    pytestmark = pytest.mark.skip(reason="the fault injection reads /proc/self/fd (Linux)")
