"""Weights files quantkit must refuse with a WeightsError naming the key (or record) and the fix: meta tensors,
quantized tensors, and zip archives whose declared record sizes would make torch allocate far more than the
file holds (checked from the zip directory, before torch.load reads any data)."""

from __future__ import annotations

import hashlib
import struct
import warnings
import zipfile

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from quantkit.cli import main
from quantkit.errors import WeightsError
from quantkit.models import loading
from quantkit.models.loading import read_state_dict

NET_PY = "from torch import nn\n\ndef build():\n    return nn.Conv2d(3, 8, 3)\n"


def conv_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {k: v.clone() for k, v in nn.Conv2d(3, 8, 3).state_dict().items()}


def no_torch_load(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("torch.load ran on a file the size check must refuse")

    monkeypatch.setattr(loading.torch, "load", refuse)


def test_meta_tensor_names_the_key(tmp_path):
    state = conv_state()
    state["weight"] = torch.empty_like(state["weight"], device="meta")
    torch.save(state, tmp_path / "w.pt")
    with pytest.raises(WeightsError, match=r"'weight' is a meta tensor.*save the state_dict of a model whose"):
        read_state_dict(tmp_path / "w.pt")


def test_quantized_tensor_names_the_key_and_the_dequantize_fix(tmp_path):
    state = conv_state()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch deprecates creating quantized tensors; files with them exist
        state["bias"] = torch.quantize_per_tensor(state["bias"], 0.01, 0, torch.qint8)
    torch.save(state, tmp_path / "w.pt")
    with pytest.raises(WeightsError, match=r"'bias' is a quantized qint8 tensor.*dequantize"):
        read_state_dict(tmp_path / "w.pt")


def declare_record_size(archive: bytes, suffix: str, size: int) -> bytes:
    """``archive`` with the central-directory entry of the member ending in ``suffix`` declaring ``size`` bytes
    uncompressed (its data unchanged): what a damaged or hostile file looks like to torch's reader."""
    data = bytearray(archive)
    pos = data.find(b"PK\x01\x02")
    patched = False
    while pos >= 0:
        name_len, extra_len, comment_len = struct.unpack_from("<HHH", data, pos + 28)
        name = bytes(data[pos + 46:pos + 46 + name_len]).decode()
        if name.endswith(suffix):
            struct.pack_into("<I", data, pos + 24, size)
            patched = True
        pos = data.find(b"PK\x01\x02", pos + 46 + name_len + extra_len + comment_len)
    assert patched, f"no member ending in {suffix}"
    return bytes(data)


def test_archive_declaring_gigabytes_is_refused_before_torch_load(tmp_path, monkeypatch):
    good = tmp_path / "good.pt"
    torch.save(conv_state(), good)
    hostile = tmp_path / "hostile.pt"
    hostile.write_bytes(declare_record_size(good.read_bytes(), "data/0", 0xF0000000))  # ~4 GB declared
    with zipfile.ZipFile(hostile) as zf:  # the oracle: the zip directory itself says so
        assert max(m.file_size for m in zf.infolist()) == 0xF0000000
    digest = hashlib.sha256(hostile.read_bytes()).hexdigest()
    no_torch_load(monkeypatch)
    with pytest.raises(WeightsError, match=r"declares 4,026,5\d\d,\d\d\d bytes of records .*'good/data/0'"):
        read_state_dict(hostile)
    assert hashlib.sha256(hostile.read_bytes()).hexdigest() == digest


def test_highly_compressible_member_is_refused_before_torch_load(tmp_path, monkeypatch):
    """A deflated member of 48 MB of zeros in a file of ~50 KB (a zip bomb in torch's clothes)."""
    bomb = tmp_path / "bomb.pt"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
        with zf.open("archive/data/0", "w") as fh:
            zero = bytes(1 << 20)
            for _ in range(48):
                fh.write(zero)
    assert bomb.stat().st_size < 200_000
    no_torch_load(monkeypatch)
    with pytest.raises(WeightsError, match="refuses to inflate"):
        read_state_dict(bomb)


def test_ordinary_archives_pass_the_size_check(tmp_path):
    """The check never refuses what torch.save writes: records stored, declared size = data size."""
    for n in (1, 300_000):  # a tiny file (slack) and a ~1.2 MB one (ratio)
        p = tmp_path / f"w{n}.pt"
        torch.save({"w": torch.arange(n, dtype=torch.float32)}, p)
        loading.check_archive_sizes(p)
        state, _ = read_state_dict(p)
        assert torch.equal(state["w"], torch.arange(n, dtype=torch.float32))


@pytest.mark.parametrize("case", ["meta", "size"])
def test_cli_exit_2_and_nothing_written(tmp_path, case):
    (tmp_path / "net.py").write_text(NET_PY)
    w = tmp_path / "w.pt"
    state = conv_state()
    if case == "meta":
        state["weight"] = torch.empty_like(state["weight"], device="meta")
        torch.save(state, w)
    else:
        torch.save(state, tmp_path / "ok.pt")
        w.write_bytes(declare_record_size((tmp_path / "ok.pt").read_bytes(), "data/0", 0xF0000000))
    import numpy as np

    np.save(tmp_path / "calib.npy", np.zeros((2, 3, 8, 8), np.float32))
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["export", "--model", f"{tmp_path / 'net.py'}:build", "--weights", str(w),
                                    "--calib", str(tmp_path / "calib.npy"), "--out", str(out), "--no-cache"])
    assert res.exit_code == 2, res.output
    assert ("meta tensor" if case == "meta" else "refuses to inflate") in res.output
    assert not out.exists()
