"""Fault injection on a real file system: `quantkit export --force` onto a tiny tmpfs that fills up mid-write.

Needs permission to mount (root, or a CAP_SYS_ADMIN container); skipped with the reason elsewhere. Each route's
export is a toy (a 2-conv net / a small ONNX, 4 calibration inputs): seconds.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from quantkit.cli import main

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from onnx_toy import toy_data, toy_onnx  # noqa: E402

NET_PY = """
import torch
from torch import nn

def build():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1))
"""
SIZE = "1m"  # the tmpfs: room for one export of either route (under 300 KB) and a filler
LEFT_FREE = 16 * 1024  # bytes left after the filler: the lock and a few small files fit, the graphs do not


def hashes(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def tiny_fs(tmp_path):
    """A freshly mounted ``SIZE`` tmpfs, unmounted afterwards; skip when mounting is not permitted."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no `mount` command here: cannot build a tiny file system")
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={SIZE}", "tmpfs", str(mnt)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here (needs root/CAP_SYS_ADMIN): {res.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def fill(mnt: Path, leave: int) -> Path:
    """Fill ``mnt`` with one file until the disk is full, then shrink it to leave ``leave`` bytes free."""
    filler = mnt / "filler.bin"
    chunk = b"\xa5" * 4096
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        while os.write(fd, chunk) > 0:  # unbuffered: the ENOSPC comes here, not at close
            pass
    except OSError:
        pass
    finally:
        os.close(fd)
    size = filler.stat().st_size
    os.truncate(filler, max(0, size - leave))
    return filler


@pytest.mark.parametrize("route", ["onnx", "torch"])
def test_export_onto_a_full_tmpfs_exits_2_and_keeps_the_previous_output(tiny_fs, tmp_path, route):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    (inputs / "toy.onnx").write_bytes(toy_onnx())
    np.save(inputs / "calib.npy", toy_data(4))
    (inputs / "net.py").write_text(NET_PY)
    model = [str(inputs / "toy.onnx")] if route == "onnx" else ["--model", f"{inputs / 'net.py'}:build"]
    out = tiny_fs / "out"
    args = ["export", *model, "--calib", str(inputs / "calib.npy"), "--no-cache", "--out", str(out)]
    first = CliRunner().invoke(main, args)
    assert first.exit_code == 0, first.output
    filler = fill(tiny_fs, LEFT_FREE)
    before = hashes(tiny_fs)
    second = CliRunner().invoke(main, [*args, "--force"])
    assert second.exit_code == 2, second.output
    assert "no space left on the disk holding --out" in second.output and str(out) in second.output
    assert "internal error" not in second.output
    assert hashes(tiny_fs) == before  # previous output and the filler byte-identical, nothing else left
    assert sorted(p.name for p in tiny_fs.iterdir()) == sorted(["out", filler.name])
    os.unlink(filler)  # with room again the same command succeeds
    third = CliRunner().invoke(main, [*args, "--force"])
    assert third.exit_code == 0, third.output
