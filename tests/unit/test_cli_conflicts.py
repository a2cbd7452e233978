"""An option and a ``--set`` that give one recipe key different values are refused (exit 2, nothing written),
like ``--full-int8`` with ``--min-int8-share``; the same value given twice is fine."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from quantkit.cli import main
from quantkit.recipe import check_option_conflicts
from quantkit.cli.export import OPTION_KEYS, export_cmd, recipe_overrides
from quantkit.errors import UsageError


def _args(**given):
    a = {p.name: (False if getattr(p, "is_flag", False) else (() if p.multiple else None)) for p in export_cmd.params}
    a.update(given)
    return a


@pytest.mark.parametrize("given, user_set", [
    ({"method": "mse"}, "calibration.method=entropy"),
    ({"max_drop": 0.3}, "gates.max_drop=0.5"),
    ({"skip": ("head.*",)}, "quantization.skip=[backbone.*]"),
    ({"full_int8": True}, "sensitivity.min_int8_share=0.9"),
    ({"no_cache": True}, "calibration.use_cache=true"),
    ({"input_size": "320x320"}, "input.size=[640, 640]"),
    ({"calib": "images/"}, "calibration.data=other/"),
])
def test_option_and_set_that_disagree_are_refused(given, user_set):
    options = recipe_overrides(_args(**given))
    key = user_set.split("=")[0]
    with pytest.raises(UsageError, match="disagree") as info:
        check_option_conflicts([user_set], options, OPTION_KEYS)
    assert key in str(info.value) and OPTION_KEYS[key] in str(info.value)


@pytest.mark.parametrize("given, user_set", [
    ({"method": "entropy"}, "calibration.method=entropy"),
    ({"max_drop": 0.3}, "gates.max_drop=0.30"),
    ({"skip": ("head.*",)}, "quantization.skip=['head.*']"),
    ({"full_int8": True}, "sensitivity.min_int8_share=null"),
    ({"method": "mse"}, "calibration.percentile=99.9"),  # another key of the same section
    ({}, "calibration.method=entropy"),  # no option given: --set alone decides
])
def test_agreeing_or_unrelated_settings_pass(given, user_set):
    check_option_conflicts([user_set], recipe_overrides(_args(**given)), OPTION_KEYS)


def test_cli_refuses_method_against_set_with_exit_2(tmp_path):
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["export", "--method", "mse", "--set", "calibration.method=entropy",
                                    "--out", str(out)])
    assert res.exit_code == 2 and "--method and --set calibration.method=entropy disagree" in res.output, res.output
    assert not out.exists()
    res = CliRunner().invoke(main, ["sensitivity", "--num-images", "4", "--set", "sensitivity.num_images=8",
                                    "--out", str(out)])
    assert res.exit_code == 2 and "--num-images and --set sensitivity.num_images=8 disagree" in res.output
    assert not out.exists()


def test_every_option_key_is_a_recipe_field():
    from dataclasses import fields

    from quantkit.recipe import Recipe

    valid = {f"{s.name}.{f.name}" for s in fields(Recipe) for f in fields(getattr(Recipe(), s.name))}
    assert set(OPTION_KEYS) <= valid, set(OPTION_KEYS) - valid
    every = recipe_overrides(_args(**{"model_opt": "trees", "weights": "w.pt", "num_classes": 2, "calib": "c",
                                      "method": "mse", "batch": "1", "eval_data": "e", "max_drop": 1.0,
                                      "min_sqnr": 1.0, "calib_cache": "c.json", "trt_calib_cache": "t.cache",
                                      "target": "t4", "min_int8_share": 0.9, "eval_annotations": "a.json",
                                      "device": "cpu", "input_size": "64x64", "skip": ("x",), "no_cache": True,
                                      "engine": True, "nms": True, "sensitivity_flag": True}))
    assert {s.split("=")[0] for s in every} == set(OPTION_KEYS)  # the message can name the option of every key


@pytest.mark.parametrize("args, message", [
    (["export", "--bogus"], "error: No such option '--bogus'"),
    (["nosuch"], "error: No such command 'nosuch'"),
    (["export", "--num-classes", "x"], "error: Invalid value for '--num-classes'"),
    (["eval"], "error: Missing argument 'OUT_DIR'"),
    (["export", "--method", "mse", "--set", "calibration.method=entropy"], "error: --method and --set"),
])
def test_every_error_starts_with_lowercase_error(args, message):
    """click's own parser errors and quantkit's errors share one prefix (issue 24: both 'error:' and 'Error:')."""
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 2 and message in res.output and "Error:" not in res.output, res.output
    assert [ln for ln in res.output.splitlines() if ln.lower().startswith("error:")] == \
        [ln for ln in res.output.splitlines() if ln.startswith("error: ")]


def test_cache_miss_message_names_its_path_once(tmp_path, caplog):
    import logging

    from quantkit.calibrate.cache import CalibrationCache

    path = tmp_path / "cal.json"
    with caplog.at_level(logging.INFO, logger="quantkit"):
        assert CalibrationCache(path).load("k" * 64) is None
        path.mkdir()  # unreadable as a file: OSError, whose text repeats the path
        assert CalibrationCache(path).load("k" * 64) is None
    messages = [r.getMessage() for r in caplog.records if "not used" in r.getMessage()]
    assert len(messages) == 2 and all(m.count(str(path)) == 1 for m in messages), messages
