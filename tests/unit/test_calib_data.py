"""Calibration data loading: real folders and arrays, and every bad input with a clear DataError."""

import numpy as np
import pytest
from PIL import Image

from quantkit.data.calib import open_calibration_data
from quantkit.data.preprocess import Preprocess, letterbox
from quantkit.errors import DataError

PP = Preprocess(size=(64, 64))


def _img(path, w=80, h=40, color=(255, 0, 0)):
    Image.new("RGB", (w, h), color).save(path)


def test_image_folder_letterboxed_batches(tmp_path):
    for i in range(5):
        _img(tmp_path / f"{i}.png")
    data = open_calibration_data(tmp_path, PP, batch_size=2)
    batches = list(data.batches())
    assert [b.shape[0] for b in batches] == [2, 2, 1] and batches[0].shape[1:] == (3, 64, 64)
    b = batches[0][0].numpy()
    assert np.isclose(b[0, 32, 32], 1.0) and np.isclose(b[0, 0, 0], 114 / 255, atol=1e-6)  # image centre / pad
    assert data.fingerprint() == open_calibration_data(tmp_path, PP, batch_size=4).fingerprint()
    _img(tmp_path / "0.png", color=(0, 255, 0))
    assert data.fingerprint() != open_calibration_data(tmp_path, PP).fingerprint()
    assert open_calibration_data(tmp_path, PP).fingerprint() != open_calibration_data(
        tmp_path, Preprocess(size=(64, 64), letterbox=False)).fingerprint()


def test_letterbox_geometry():
    out, info = letterbox(np.zeros((40, 80, 3), np.uint8), (64, 64))
    assert out.shape == (64, 64, 3) and info.ratio == 0.8 and info.pad_y == 16 and info.pad_x == 0
    assert np.allclose(info.to_original(np.array([[0, 16, 64, 48]])), [[0, 0, 80, 40]])


def test_npy_input(tmp_path):
    arr = np.random.default_rng(0).random((5, 3, 32, 32), dtype=np.float32)
    np.save(tmp_path / "c.npy", arr)
    data = open_calibration_data(tmp_path / "c.npy", PP, batch_size=4)
    assert data.input_shape == (3, 32, 32) and data.num_samples == 5
    assert np.array_equal(np.concatenate([b.numpy() for b in data.batches()]), arr)


@pytest.mark.parametrize("case", ["missing", "empty", "corrupt", "text_file", "npy_dtype", "npy_shape", "npy_nan",
                                  "npy_pickle"])
def test_bad_inputs(tmp_path, case):
    target = tmp_path / "data"
    if case == "missing":
        pass
    elif case == "empty":
        target.mkdir()
    elif case == "corrupt":
        target.mkdir()
        _img(target / "ok.png")
        (target / "bad.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    elif case == "text_file":
        target = tmp_path / "data.txt"
        target.write_text("hello")
    elif case == "npy_dtype":
        target = tmp_path / "d.npy"
        np.save(target, np.zeros((2, 3, 32, 32), np.float64))
    elif case == "npy_shape":
        target = tmp_path / "d.npy"
        np.save(target, np.zeros(32, np.float32))  # no sample axis ((3, 32, 32) is 3 samples of (32, 32) now)
    elif case == "npy_nan":
        target = tmp_path / "d.npy"
        a = np.zeros((2, 3, 32, 32), np.float32)
        a[1, 0, 0, 0] = np.nan
        np.save(target, a)
    elif case == "npy_pickle":
        target = tmp_path / "d.npy"
        np.save(target, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DataError) as e:
        data = open_calibration_data(target, PP)
        list(data.batches())
    msg = str(e.value)
    assert str(target.name) in msg or str(target) in msg


def test_spread_subset_is_evenly_spaced_over_the_whole_set(tmp_path):
    """batches(limit, spread=True): the per-layer analysis and the PTQ passes see the whole folder, not its
    first files (a folder sorted by name often groups one scene). Rows 0, 3, 6, 9 of 10; all rows when the limit
    covers the set; the first rows without spread."""
    arr = np.arange(10, dtype=np.float32).reshape(10, 1, 1, 1) * np.ones((1, 3, 4, 4), np.float32)
    np.save(tmp_path / "c.npy", arr)
    data = open_calibration_data(tmp_path / "c.npy", PP, batch_size=3)
    rows = lambda **kw: [float(v) for b in data.batches(**kw) for v in b[:, 0, 0, 0]]  # noqa: E731
    assert rows(limit=4, spread=True) == [0.0, 3.0, 6.0, 9.0]
    assert rows(limit=4) == [0.0, 1.0, 2.0, 3.0]
    assert rows(limit=20, spread=True) == [float(i) for i in range(10)]
    assert rows(limit=1, spread=True) == [0.0]
    for i in range(6):  # image folders: the same rows, decoded per batch
        _img(tmp_path / f"im{i}.png", color=(40 * i, 0, 0))
    folder = open_calibration_data(tmp_path, PP, batch_size=2)
    reds = [round(float(b[k, 0, 32, 32]) * 255) for b in folder.batches(limit=3, spread=True) for k in range(len(b))]
    assert reds == [0, 80, 200]  # files 0, 2 (round(2.5)=2 under banker's rounding), 5
