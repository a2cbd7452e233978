"""The installable product: bundled data found wherever quantkit is installed, shipped recipes by name,
no silent skip of the held-out evaluation, optional dependencies checked before any work, the --json line."""

import json
import logging
import math
from pathlib import Path

import pytest

from quantkit import paths
from quantkit.errors import DependencyError, UsageError
from quantkit.eval.plan import plan_evaluation
from quantkit.recipe import load_recipe
from quantkit.recipe_library import format_recipe_list, resolve_recipe, shipped_recipes
from quantkit.utils import optional_deps

REPO = Path(__file__).resolve().parents[2]


def test_checkout_reads_the_top_level_folders():
    # a source checkout has no quantkit/_bundled: the repository's own folders are the bundle
    assert not (REPO / "quantkit" / paths.BUNDLE_DIR).exists()
    assert paths.bundle_root() == REPO
    assert paths.BUNDLED_CALIBRATION == REPO / "calibration" / "trees"
    assert paths.display_path(paths.BUNDLED_EVAL) == "evaldata/trees_holdout"


def test_installed_layout_is_found_and_named_by_its_bundle_path(tmp_path, monkeypatch):
    # what a wheel installs: site-packages/quantkit/_bundled/<folder>/
    pkg = tmp_path / "site-packages" / "quantkit"
    (pkg / paths.BUNDLE_DIR / "calibration" / "trees").mkdir(parents=True)
    monkeypatch.setattr(paths.importlib.resources, "files", lambda name: pkg)
    assert paths.bundle_root() == (pkg / paths.BUNDLE_DIR).resolve()
    data = paths.bundled_path("calibration/trees")
    assert data.is_dir()
    assert paths.display_path(data) == "calibration/trees"  # independent of the install location
    assert paths.display_path(tmp_path / "elsewhere") == str(tmp_path / "elsewhere")


def test_shipped_recipes_by_name_and_a_file_path_wins(tmp_path, monkeypatch):
    names = [r.name for r in shipped_recipes()]
    assert names == sorted(p.stem for p in (REPO / "recipes").glob("*.yaml"))
    assert {"trees", "yolo_nas_s", "default"} <= set(names)
    assert load_recipe("trees") == load_recipe(REPO / "recipes" / "trees.yaml") == load_recipe("trees.yaml")
    assert load_recipe("trees").quantization.skip  # the shipped trees recipe keeps the heads FP16
    text = format_recipe_list()
    assert all(n in text for n in names) and "--recipe NAME" in text
    monkeypatch.chdir(tmp_path)
    Path("trees").write_text("calibration:\n  method: mse\n")  # a file called like a shipped recipe
    assert resolve_recipe("trees") == Path("trees")
    assert load_recipe("trees").calibration.method == "mse"
    with pytest.raises(UsageError, match="shipped names.*yolo_nas_s"):
        load_recipe("yolo_nas_xl")
    with pytest.raises(UsageError, match="neither an existing YAML file"):
        load_recipe("some/dir/trees.yaml")  # a path that does not exist is not looked up by name


def test_missing_bundled_eval_is_logged_and_noted(monkeypatch, tmp_path, caplog):
    recipe = load_recipe(None)
    plan = plan_evaluation(recipe)
    assert plan.path == str(paths.BUNDLED_EVAL) and plan.note is None
    monkeypatch.setattr(paths, "BUNDLED_EVAL", tmp_path / "gone")
    with caplog.at_level(logging.WARNING, logger="quantkit"):
        plan = plan_evaluation(recipe)
    assert plan.path is None and "held-out evaluation skipped" in plan.note and "missing" in plan.note
    assert plan.note in caplog.text
    monkeypatch.setattr(optional_deps, "is_installed", lambda m: False)
    monkeypatch.setattr("quantkit.eval.plan.is_installed", lambda m: False)
    monkeypatch.setattr(paths, "BUNDLED_EVAL", REPO / "evaldata" / "trees_holdout")
    assert "quantkit[eval]" in plan_evaluation(recipe).note  # no scorer installed: said, not silent
    explicit = plan_evaluation(load_recipe(None, ["evaluation.data=somewhere"]))
    assert explicit.explicit and explicit.path == "somewhere" and explicit.note is None
    assert plan_evaluation(load_recipe(None, ["model.name=yolo_nas_s"])).path is None


def test_missing_bundled_eval_reaches_the_report_notes(monkeypatch, tmp_path):
    from quantkit.pipeline import quantize_recipe

    monkeypatch.setattr(paths, "BUNDLED_EVAL", tmp_path / "gone")
    recipe = load_recipe(None, ["calibration.max_images=2", "calibration.use_cache=false", "calibration.method=max"])
    state = quantize_recipe(recipe, progress=False)
    assert state.eval_path is None
    assert any("held-out evaluation skipped" in n for n in state.model.layout.notes)  # -> report.json notes


def test_optional_deps_are_checked_from_the_recipe(monkeypatch):
    monkeypatch.setattr(optional_deps, "is_installed", lambda m: False)
    optional_deps.check_optional_deps(load_recipe(None), evaluation=False)  # needs nothing optional
    with pytest.raises(DependencyError, match=r"matplotlib \(for the sensitivity chart\).*quantkit\[plot\]"):
        optional_deps.check_optional_deps(load_recipe(None, ["sensitivity.enabled=true"]), evaluation=False)
    with pytest.raises(DependencyError, match=r"faster_coco_eval.*matplotlib.*quantkit\[plot,eval\]|"
                                              r"matplotlib.*faster_coco_eval.*quantkit\[plot,eval\]"):
        optional_deps.check_optional_deps(load_recipe(None, ["gates.max_drop=0.5"]), evaluation=True)
    with pytest.raises(DependencyError, match="matplotlib"):
        optional_deps.check_optional_deps(load_recipe(None), evaluation=False, plot=True)
    # an automatic selection without evaluation data only gates on SQNR when a floor is set
    assert optional_deps.needed_deps(load_recipe(None, ["gates.max_drop=0.5"]), evaluation=False) == []
    monkeypatch.undo()
    assert optional_deps.is_installed("json") and not optional_deps.is_installed("quantkit_no_such_module")


def test_summary_line_is_one_line_of_strict_json():
    from quantkit.cli.summary import error_summary, summary_line

    line = summary_line({"a": math.inf, "b": [1.5, -math.inf], "c": "x\ny"})
    assert "\n" not in line
    assert json.loads(line) == {"a": "inf", "b": [1.5, "-inf"], "c": "x\ny"}
    err = json.loads(summary_line(error_summary("export", 2, "no data")))
    assert err == {"summary_version": 1, "command": "export", "ok": False, "exit_code": 2, "error": "no data"}
