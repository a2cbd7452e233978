"""Bad inputs that used to crash (exit 1) are refused with the fix named: images, weights, models, parity."""

from __future__ import annotations

import math
import struct
import textwrap
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from quantkit.data.images import load_image
from quantkit.errors import DataError, ExportError, ModelError, WeightsError
from quantkit.exporter.parity import ParityResult, judge, strong_failure
from quantkit.models.checks import check_float32, check_outputs
from quantkit.models.loading import build_model, read_state_dict


def _png_header_only(path, width, height):
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def test_decompression_bomb_is_a_data_error(tmp_path):
    p = tmp_path / "bomb.png"
    _png_header_only(p, 20000, 10000)  # 200 Mpx claimed in 60 bytes
    with pytest.raises(DataError, match="too large to decode safely.*downscale"):
        load_image(p)


def test_16bit_png_equals_its_8bit_version(tmp_path):
    rng = np.random.default_rng(0)
    gray8 = rng.integers(0, 256, (24, 32), dtype=np.uint8)
    Image.fromarray(gray8).save(tmp_path / "g8.png")
    Image.fromarray(gray8.astype(np.uint16) * 257).save(tmp_path / "g16.png")  # the same picture, 16 bits
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    a, b = load_image(tmp_path / "g8.png"), load_image(tmp_path / "g16.png")
    assert b.dtype == np.uint8 and b.shape == (24, 32, 3)
    np.testing.assert_array_equal(a, b)  # used to be all 255


@pytest.mark.parametrize("case, match", [("int_key", "key 0 of type int"), ("sparse", "sparse_coo tensor")])
def test_odd_state_dicts_are_weights_errors(tmp_path, case, match):
    # built here, not in the parametrize list: a sparse tensor kept alive for the session would trip
    # test_calibration_memory's count of live tensor storages (sparse tensors have none)
    state = {0: torch.zeros(2)} if case == "int_key" else {"w": torch.eye(3).to_sparse()}
    torch.save(state, tmp_path / "w.pt")
    with pytest.raises(WeightsError, match=match):
        read_state_dict(tmp_path / "w.pt")


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64, torch.bfloat16])
def test_non_float32_model_is_told_to_convert(dtype):
    with pytest.raises(ModelError, match=r"model.float\(\)"):
        check_float32(nn.Conv2d(3, 4, 3).to(dtype))
    check_float32(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))  # int64 num_batches_tracked is fine


def test_scalar_output_is_refused():
    check_outputs((torch.zeros(2, 3), [torch.zeros(2)], {"a": torch.zeros(1, 1)}))
    with pytest.raises(ModelError, match="scalar"):
        check_outputs((torch.zeros(2, 3), {"loss": torch.tensor(1.0)}))


def test_factory_calling_sys_exit_is_a_model_error(tmp_path):
    (tmp_path / "net.py").write_text(textwrap.dedent("""
        import sys
        def build():
            sys.exit(5)
    """))
    (tmp_path / "bad_import.py").write_text("raise SystemExit(3)\ndef build(): pass\n")
    with pytest.raises(ModelError, match="SystemExit: 5"):
        build_model(f"{tmp_path / 'net.py'}:build")
    with pytest.raises(ModelError, match="SystemExit"):
        build_model(f"{tmp_path / 'bad_import.py'}:build")


def _pr(**v):
    return ParityResult(per_output=v, overall=min(v.values()))


def test_parity_rule_with_nothing_quantized():
    """--skip '*': torch's INT8-vs-FP32 SQNR is inf, onnxruntime's ~130 dB of float noise: not a failure."""
    from quantkit.exporter.graphs import check_parity

    check_parity(_pr(y=130.0), _pr(y=130.0), _pr(y=math.inf), floor=30)  # no exception
    check_parity(_pr(y=math.inf), _pr(y=math.inf), _pr(y=math.inf), floor=30)
    assert judge(None, _pr(y=130.0), _pr(y=math.inf)) == []
    assert strong_failure(_pr(y=math.inf), _pr(y=71.0)) is None  # the strong graph: FP16 noise only
    assert strong_failure(_pr(y=30.0), _pr(y=20.0))  # 10 dB further from FP32 than INT8 noise explains
    # what the rule is for still fails: onnxruntime clearly less accurate than torch, or NaN, or below the floor
    assert judge(None, _pr(y=20.0), _pr(y=30.0))
    assert judge(None, _pr(y=math.nan), _pr(y=30.0))
    with pytest.raises(ExportError):
        check_parity(_pr(y=10.0), _pr(y=30.0), _pr(y=30.0), floor=30)