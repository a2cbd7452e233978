"""The export command's accuracy defaults and the switches that turn them off (issue 14)."""

import pytest
from click.testing import CliRunner

from quantkit.cli import main
from quantkit.cli.export import recipe_overrides
from quantkit.errors import UsageError
from quantkit.recipe import load_recipe
from quantkit.sensitivity.run import budget_of


def _args(**given):
    """Every export option at its 'not given' value, then ``given``."""
    from quantkit.cli.export import export_cmd

    a = {p.name: (False if getattr(p, "is_flag", False) else (() if p.multiple else None)) for p in export_cmd.params}
    a.update(given)
    return a


def test_full_int8_turns_the_share_selection_off_and_contradictions_are_refused():
    default = load_recipe(None, recipe_overrides(_args()))
    assert budget_of(default, has_eval=False) == ("min_int8_share", 0.95) and default.ptq.bias_correction
    full = load_recipe(None, recipe_overrides(_args(full_int8=True)))
    assert full.sensitivity.min_int8_share is None and budget_of(full, has_eval=False) is None
    assert load_recipe(None, recipe_overrides(_args(min_int8_share=0.9))).sensitivity.min_int8_share == 0.9
    with pytest.raises(UsageError, match="contradict"):
        recipe_overrides(_args(full_int8=True, min_int8_share=0.9))


def test_export_help_states_the_default_methods_and_how_to_turn_them_off():
    text = CliRunner().invoke(main, ["export", "--help"]).output
    assert "--full-int8" in text and "bias correction" in text and ">= 95 %" in text and "[default: 0.95" in text
