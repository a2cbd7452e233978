"""File names that are not UTF-8 (bytes on Linux), label files with NaN/Inf class ids and unreadable sub-folders of
the calibration data: used, or refused with a clear error naming the file or folder — never an internal error,
never a crash while printing or writing JSON, never calibration on part of the data in silence."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from quantkit.cli import main
from quantkit.data.calib import open_calibration_data
from quantkit.data.preprocess import Preprocess
from quantkit.data.yolo import read_labels
from quantkit.errors import DataError
from quantkit.recipe import PreprocessSpec
from quantkit.quote import cap, printable, qcap

NET_PY = """
import torch
from torch import nn

def build():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1))
"""
LATIN1 = os.fsdecode(b"caf\xe9-\xff.png")  # "café" in Latin-1, as an old camera or a Windows share names it


def write_image(path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(path, format="PNG")


def runner() -> CliRunner:
    try:
        return CliRunner(mix_stderr=False)
    except TypeError:
        return CliRunner()


@pytest.fixture
def net(tmp_path):
    (tmp_path / "net.py").write_text(NET_PY)
    return f"{tmp_path / 'net.py'}:build"


def test_printable_escapes_undecodable_bytes_and_keeps_text():
    assert printable("café ✓") == "café ✓"
    assert printable(LATIN1) == "caf\\xe9-\\xff.png"
    assert printable(Path("/d") / LATIN1) == "/d/caf\\xe9-\\xff.png"
    assert printable(LATIN1).encode("utf-8")  # encodable: JSON, Markdown, a terminal


def test_non_utf8_image_name_is_calibrated_on_and_hashed_by_its_bytes(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for d, odd in ((a, LATIN1), (b, "cafe.png")):
        d.mkdir()
        write_image(d / "ok.png", 0)
        write_image(d / odd, 1)
    pp = Preprocess.at_size(PreprocessSpec(), (16, 16))
    da, db = open_calibration_data(a, pp, 2), open_calibration_data(b, pp, 2)
    assert da.num_samples == 2 and os.fsencode(da.files[0].name) == b"caf\xe9-\xff.png"
    xa, xb = next(da.batches()), next(db.batches())
    assert np.array_equal(xa.numpy(), xb.numpy())  # the same pixels, in the same order (sorted names)
    assert da.fingerprint() != db.fingerprint()  # the name is part of the key, as its bytes


def test_export_with_a_non_utf8_image_name_writes_utf8_reports(tmp_path, net):
    calib = tmp_path / "calib"
    calib.mkdir()
    write_image(calib / "ok.png", 0)
    write_image(calib / LATIN1, 1)
    out = tmp_path / "out"
    res = runner().invoke(main, ["export", "--model", net, "--calib", str(calib), "--input-size", "32x32",
                                 "--out", str(out), "--no-cache", "--json"])
    assert res.exit_code == 0, res.output
    json.loads(res.stdout.strip().splitlines()[-1])
    for name in ("report.json", "manifest.json", "calibration.json"):
        json.loads((out / name).read_bytes().decode("utf-8"))
    (out / "report.md").read_bytes().decode("utf-8")
    assert json.loads((out / "report.json").read_text())["calibration"]["num_samples"] == 2  # both images used


def test_corrupt_non_utf8_image_is_a_data_error_printed_with_its_bytes(tmp_path, net):
    calib = tmp_path / "calib"
    calib.mkdir()
    write_image(calib / "ok.png", 0)
    (calib / LATIN1).write_bytes(b"not an image")
    args = ["export", "--model", net, "--calib", str(calib), "--input-size", "32x32", "--out", str(tmp_path / "o"),
            "--no-cache"]
    res = runner().invoke(main, args)
    assert res.exit_code == 2 and "cannot read image" in res.stderr and "caf\\xe9-\\xff.png" in res.stderr
    assert "\\udc" not in res.stderr and "internal error" not in res.stderr
    res = runner().invoke(main, [*args, "--json"])
    err = json.loads(res.stdout.strip())
    assert res.exit_code == 2 and err["exit_code"] == 2 and "caf\\xe9-\\xff.png" in err["error"]
    assert not (tmp_path / "o").exists()


def test_non_utf8_calib_folder_is_a_clear_usage_error(tmp_path, net):
    calib = tmp_path / os.fsdecode(b"d\xff")
    calib.mkdir()
    write_image(calib / "ok.png", 0)
    res = runner().invoke(main, ["export", "--model", net, "--calib", str(calib), "--out", str(tmp_path / "o"),
                                 "--no-cache"])
    assert res.exit_code == 2, res.output
    assert "is not valid UTF-8" in res.stderr and "d\\xff" in res.stderr and "rename it" in res.stderr


@pytest.mark.parametrize("cls", ["nan", "inf", "-inf", "1e999", "NaN"])
def test_nan_or_inf_class_id_is_a_data_error_naming_file_and_line(tmp_path, cls):
    p = tmp_path / "x.txt"
    p.write_text(f"0 0.5 0.5 0.2 0.2\n{cls} 0.5 0.5 0.2 0.2\n")
    with pytest.raises(DataError, match=rf"label file {p} line 2 .*class {cls} is not a class index 0\.\.2"):
        read_labels(p, 3)


def test_label_file_not_utf8_is_a_data_error(tmp_path):
    p = tmp_path / "x.txt"
    p.write_bytes(b"0 0.5 0.5 0.2 0.2\n\xff\xfe 1\n")
    with pytest.raises(DataError, match=r"x.txt is not UTF-8 text"):
        read_labels(p, 3)


def test_nan_class_in_a_dataset_yaml_fails_the_cli_with_exit_2(tmp_path, net):
    root = tmp_path / "ds"
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        write_image(root / "images" / split / "a.png", 0)
        (root / "labels" / split / "a.txt").write_text("nan 0.5 0.5 0.2 0.2\n")
    (root / "data.yaml").write_text("train: images/train\nval: images/val\nnames: [tree]\n")
    res = runner().invoke(main, ["export", "--model", net, "--data", str(root / "data.yaml"), "--input-size",
                                 "32x32", "--out", str(tmp_path / "o"), "--no-cache"])
    assert res.exit_code == 2, res.output
    assert "a.txt line 1" in res.stderr and "class nan is not a class index" in res.stderr
    assert not (tmp_path / "o").exists()


def test_cap_bounds_quoted_user_content():
    huge = "n" * 50_000_000
    assert cap(huge) == "n" * 200 + "... (50000000 chars)"
    assert qcap(huge, 10) == "'nnnnnnnnnn'... (50000000 chars)"
    assert cap("short") == "short" and qcap("short") == "'short'"


if not hasattr(os, "fsencode") or os.name != "posix":  # pragma: no cover
    pytestmark = pytest.mark.skip(reason="byte file names are a POSIX matter")


# ------------------------------------------------------------------------------ unreadable calibration folders


def calib_tree(root: Path) -> Path:
    """``root/calib`` with two images at the top and two in ``night/`` (half the data set)."""
    calib = root / "calib"
    (calib / "night").mkdir(parents=True)
    for i, p in enumerate((calib / "a.png", calib / "b.png", calib / "night" / "c.png", calib / "night" / "d.png")):
        write_image(p, i)
    return calib


@pytest.mark.parametrize("where", ["sub", "top"])
def test_unreadable_calib_folder_is_a_data_error_naming_it(tmp_path, monkeypatch, where):
    """Simulated (tests run as root, for whom chmod 000 still reads): scandir of one folder is refused."""
    from quantkit.data.images import list_images

    calib = calib_tree(tmp_path)
    victim = calib / "night" if where == "sub" else calib
    real = os.scandir

    def scandir(path="."):
        if Path(os.fsdecode(path)) == victim:
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    match = (f"cannot read the folder {victim} inside {calib} \\(Permission denied\\)" if where == "sub"
             else f"cannot read the data folder {calib} \\(Permission denied\\)")
    with pytest.raises(DataError, match=match):
        list_images(calib)
    monkeypatch.setattr(os, "scandir", real)
    assert len(list_images(calib)) == 4  # the same tree, readable: all four images


def test_unreadable_calib_subfolder_fails_the_cli(tmp_path, monkeypatch, net):
    calib = calib_tree(tmp_path)
    real = os.scandir

    def scandir(path="."):
        if Path(os.fsdecode(path)) == calib / "night":
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    res = runner().invoke(main, ["export", "--model", net, "--calib", str(calib), "--input-size", "32x32",
                                 "--out", str(tmp_path / "o"), "--no-cache"])
    assert res.exit_code == 2 and f"cannot read the folder {calib / 'night'}" in res.stderr, res.output
    assert not (tmp_path / "o").exists()


def test_chmod_000_calib_subfolder_is_a_data_error(tmp_path):
    from quantkit.data.images import list_images

    calib = calib_tree(tmp_path)
    os.chmod(calib / "night", 0)
    try:
        try:
            os.listdir(calib / "night")
        except PermissionError:
            pass
        else:
            pytest.skip("this user reads a chmod 000 folder anyway (root with CAP_DAC_OVERRIDE); the "
                        "scandir-level tests above cover it")
        with pytest.raises(DataError, match="cannot read the folder .*night"):
            list_images(calib)
    finally:
        os.chmod(calib / "night", 0o755)
