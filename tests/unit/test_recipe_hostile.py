"""Hostile recipes fail fast with a UsageError that names the field: alias bombs, bad bytes, out-of-range and
non-finite numbers. Nothing here may take seconds or gigabytes."""

from __future__ import annotations

import time
import tracemalloc

import pytest

from quantkit.errors import UsageError
from quantkit.recipe import Recipe, apply_overrides, load_recipe
from quantkit.recipe_limits import RANGES, short_repr

BOMB = "\n".join(["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
                 + [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)])


@pytest.mark.parametrize("where", ["value", "unknown_key", "set"])
def test_yaml_alias_bomb_is_refused_quickly_and_small(tmp_path, where):
    text = {"value": "quantization:\n  skip: *a9\n", "unknown_key": "quantization:\n  skp: *a9\n",
            "set": ""}[where]
    p = tmp_path / "bomb.yaml"
    p.write_text("x_anchors:\n" + "\n".join("  " + line for line in BOMB.splitlines()) + "\n" + text)
    tracemalloc.start()
    t0 = time.perf_counter()
    with pytest.raises(UsageError) as info:
        if where == "set":
            apply_overrides(Recipe(), ["quantization.skip=" + "{" + BOMB.replace("\n", ", ") + "}"])
        else:
            load_recipe(p)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert time.perf_counter() - t0 < 5 and peak < 50e6  # 9**10 values if anything expanded them
    assert len(str(info.value)) < 1000


def test_short_repr_is_bounded():
    x = ["x" * 10_000]
    for _ in range(30):
        x = [x] * 9
    assert len(short_repr(x)) <= 200


def test_non_utf8_recipe(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_bytes(b"calibration:\n  method: \xff\xfe entropy\n")
    with pytest.raises(UsageError, match="not UTF-8"):
        load_recipe(p)


@pytest.mark.parametrize("setting, match", [
    ("preprocess.pad_value=300", r"pad_value must be in \[0, 255\]"),
    ("preprocess.pad_value=-1", "pad_value"),
    ("gates.min_sqnr=.nan", "finite"),
    ("gates.max_drop=.nan", "finite"),
    ("gates.max_drop=.inf", "finite"),
    ("sensitivity.sqnr_floor=-.inf", "finite"),
    ("calibration.percentile=.nan", "finite"),
    ("export.parity_min_sqnr=1.0e+400", "finite"),
    ("preprocess.mean=[0, .nan, 0]", "finite"),
    ("preprocess.std=[1, 0, 1]", "std must be > 0"),
    ("preprocess.scale=0", "scale must be > 0"),
    ("calibration.num_bins=4000000000", r"num_bins must be in \[128, 65536\]"),
    ("calibration.batch_size=100000", "batch_size"),
    ("export.nms_iou_threshold=1.5", "nms_iou_threshold"),
    ("evaluation.conf=-0.1", "evaluation.conf"),
    ("sensitivity.num_images=0", "num_images"),
    ("model.num_classes=0", "num_classes"),
])
def test_out_of_range_and_non_finite_values(setting, match):
    with pytest.raises(UsageError, match=match):
        load_recipe(None, [setting])


def test_every_range_admits_the_default():
    r = Recipe()
    for (section, name), (lo, hi, _) in RANGES.items():
        v = getattr(getattr(r, section), name)
        assert v is None or lo <= v <= hi, (section, name)
