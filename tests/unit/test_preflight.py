"""Environment errors are found before calibration, in milliseconds: cache folder, cache file, --out, memory."""

from __future__ import annotations

import os

import pytest

from quantkit.errors import UsageError
from quantkit.recipe import load_recipe
from quantkit.preflight import (ACTIVATION_FACTOR, check_memory, estimate_calibration_bytes, preflight,
                                      run_inputs)


@pytest.fixture
def cache_env(monkeypatch, tmp_path):
    def set_to(path):
        monkeypatch.setenv("QUANTKIT_CACHE_DIR", str(path))
    set_to(tmp_path / "cache")
    return set_to


def test_clean_environment_passes_and_writes_nothing(tmp_path, cache_env):
    inputs = preflight(load_recipe(None, ["model.weights=w.pt"]), tmp_path / "out", recipe_path="r.yaml")
    assert inputs == ["r.yaml", "w.pt"]
    assert sorted(os.listdir(tmp_path)) == []


@pytest.mark.parametrize("case", ["file", "sys", "unwritable"])
def test_unusable_cache_dir(tmp_path, cache_env, case):
    if case == "file":
        (tmp_path / "f").write_text("x")
        cache_env(tmp_path / "f")
        match = "is a file"
    elif case == "sys":
        if not os.path.isdir("/sys/kernel"):
            pytest.skip("no /sys here")
        cache_env("/sys/quantkit-cache")
        match = "not writable"
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only folders")
        (tmp_path / "ro").mkdir(mode=0o555)
        cache_env(tmp_path / "ro")
        match = "not writable"
    with pytest.raises(UsageError, match=match) as info:
        preflight(load_recipe(), tmp_path / "out")
    assert "QUANTKIT_CACHE_DIR" in str(info.value) and "--no-cache" in str(info.value)
    preflight(load_recipe(None, ["calibration.use_cache=false"]), tmp_path / "out")  # no cache: no problem


def test_cache_path_that_is_a_folder(tmp_path, cache_env):
    (tmp_path / "c").mkdir()
    with pytest.raises(UsageError, match="is a folder: pass a file path"):
        preflight(load_recipe(None, [f"calibration.cache={tmp_path / 'c'}"]), tmp_path / "out")


def test_out_holding_the_cache_file_or_recipe_is_refused(tmp_path, cache_env):
    (tmp_path / "o").mkdir()
    with pytest.raises(UsageError, match="an input of this run"):
        preflight(load_recipe(None, [f"calibration.cache={tmp_path / 'o' / 'c.json'}"]), tmp_path / "o", force=True)
    with pytest.raises(UsageError, match="an input of this run"):
        preflight(load_recipe(), tmp_path / "o", force=True, recipe_path=str(tmp_path / "o" / "r.yaml"))


def test_run_inputs_of_a_user_model():
    r = load_recipe(None, ["model.name=nets/net.py:build", "calibration.data=imgs", "evaluation.data=ev"])
    assert run_inputs(r) == ["imgs", "ev", "nets/net.py"]


def test_memory_estimate_refuses_huge_inputs_with_the_number():
    # 16384 px a side is the largest input.size a recipe accepts (recipe_limits); its memory is still refused here
    r = load_recipe(None, ["input.size=[16384, 16384]"])
    need = estimate_calibration_bytes((16384, 16384), 8)
    assert need == 8 * 3 * 16384 * 16384 * 4 * ACTIVATION_FACTOR
    with pytest.raises(UsageError, match=r"needs an estimated 384.0 GiB .* input batch alone is 24.0 GiB"):
        check_memory(r, available=64 * 1024 ** 3)
    check_memory(load_recipe(None, ["input.size=[640, 640]"]), available=2 * 1024 ** 3)  # 0.6 GiB: fine
    check_memory(load_recipe(None, ["input.size=[16384, 16384]", "calibration.batch_size=1"]),
                 available=2 * 1024 ** 4)
