"""``quantkit models`` answers from the registry (no network built, no RANDOM-weights warning); ``quantkit layers``
builds the network for its names but does not warn about weights it never uses. The registry's counts are
checked against the built modules (the oracle)."""

from __future__ import annotations

import logging

import pytest
from click.testing import CliRunner

from quantkit import models
from quantkit.cli import main
from quantkit.models.loading import build_model
from quantkit.models.registry import count_parameters, list_models
from quantkit.pipeline import list_layers
from quantkit.pipeline import list_models as pipeline_models


@pytest.mark.parametrize("entry", list_models(), ids=lambda e: e.name)
def test_registry_counts_equal_the_built_models(entry):
    assert entry.parameters is not None
    built, _ = build_model(entry.name, warn_random_init=False)
    assert count_parameters(built) == entry.parameters


def test_models_builds_nothing_and_warns_nothing(monkeypatch, caplog):
    def refuse(*a, **k):
        raise AssertionError("quantkit models built a network")

    monkeypatch.setattr(models, "build_model", refuse)
    with caplog.at_level(logging.WARNING, logger="quantkit"):
        rows = pipeline_models()
        res = CliRunner().invoke(main, ["models"])
    assert res.exit_code == 0, res.output
    assert [r["parameters"] for r in rows] == [e.parameters for e in list_models()]
    assert "19,053,888" in res.output and "RANDOM" not in res.output and not caplog.records


def test_layers_lists_names_without_the_random_weights_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="quantkit"):
        res = CliRunner().invoke(main, ["layers", "yolo_nas_s"])
    assert res.exit_code == 0, res.output
    assert "backbone.stem.conv.rbr_reparam\tConv2d" in res.output and "RANDOM" not in res.output
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


def test_export_still_warns_about_random_weights(caplog):
    with caplog.at_level(logging.WARNING, logger="quantkit"):
        build_model("yolo_nas_s")
    assert "RANDOM initial weights" in caplog.text
    assert list_layers("trees")  # the bundled model ships weights: listing works the same
