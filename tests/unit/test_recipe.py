import pytest

from quantkit.errors import UsageError
from quantkit.recipe import Recipe, apply_overrides, load_recipe, parse_batch, recipe_from_dict


def test_defaults_and_roundtrip(tmp_path):
    r = load_recipe()
    assert r.calibration.method == "auto" and r.model.name == "trees"  # chosen per network by the export
    assert r.ptq.bias_correction and r.sensitivity.min_int8_share == 0.95  # issue 14: the default methods
    p = tmp_path / "r.yaml"
    p.write_text(r.to_yaml())
    assert load_recipe(p) == r


def test_unknown_key_lists_valid_keys():
    with pytest.raises(UsageError) as e:
        recipe_from_dict({"calibration": {"methd": "mse"}})
    msg = str(e.value)
    assert "calibration.methd" in msg and "did you mean 'method'" in msg and "num_bins" in msg


def test_unknown_section_and_bad_values():
    with pytest.raises(UsageError, match="valid sections"):
        recipe_from_dict({"calib": {}})
    with pytest.raises(UsageError, match="one of: max, percentile, entropy, mse"):
        recipe_from_dict({"calibration": {"method": "kl"}})
    with pytest.raises(UsageError, match="expected an integer"):
        recipe_from_dict({"calibration": {"batch_size": "eight"}})
    with pytest.raises(UsageError, match="multiples of 32"):
        recipe_from_dict({"input": {"size": [300, 320]}})


def test_set_overrides_parse_yaml_values():
    r = apply_overrides(Recipe(), ["calibration.method=mse", "quantization.skip=[head.*, 'type:Linear']",
                                   "input.size=[320, 320]", "gates.max_drop=0.3"])
    assert r.calibration.method == "mse"
    assert r.quantization.skip == ("head.*", "type:Linear")
    assert r.input.size == (320, 320) and r.gates.max_drop == 0.3
    with pytest.raises(UsageError, match="valid keys of 'gates'"):
        apply_overrides(Recipe(), ["gates.max_dorp=1"])
    with pytest.raises(UsageError, match="section.key=value"):
        apply_overrides(Recipe(), ["calibration.method"])


def test_parse_batch():
    assert parse_batch("4") == (4, 4, 4)
    assert parse_batch("1:8:32") == (1, 8, 32)
    for bad in ("0", "8:1:32", "a:b:c", "1:2"):
        with pytest.raises(UsageError):
            parse_batch(bad)


def test_shipped_recipes_load():
    from pathlib import Path

    for p in sorted(Path(__file__).resolve().parents[2].joinpath("recipes").glob("*.yaml")):
        load_recipe(p)
