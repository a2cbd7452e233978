"""The README's `make demo` figures are rendered from benchmarks/RESULTS.md, never typed by hand (issue 24)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _module():
    spec = importlib.util.spec_from_file_location("demo_figures", ROOT / "benchmarks" / "demo_figures.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_readme_block_is_exactly_what_results_md_holds():
    mod = _module()
    readme = (ROOT / "README.md").read_text()
    fig = mod.results_figures()
    assert mod.render_readme(readme, fig) == readme, (
        "README.md's figures block differs from section demo-figures of benchmarks/RESULTS.md: run "
        "python benchmarks/demo_figures.py --readme")
    # the rendered figures are the measured ones (not a stale copy): spot-check two numbers in the text
    d = fig["default"]
    assert f"{d['int8_map50_95']:.3f}" in readme and f"{d['fp16_layers']} layer(s) FP16" in readme


def test_a_changed_measurement_changes_the_readme_block():
    mod = _module()
    readme = (ROOT / "README.md").read_text()
    fig = json.loads(json.dumps(mod.results_figures()))
    fig["default"]["int8_map50_95"] = 0.0123
    assert "0.012" in mod.render_readme(readme, fig) and mod.render_readme(readme, fig) != readme
    with pytest.raises(SystemExit, match="no section demo-figures"):
        mod.results_figures("# empty results\n")
