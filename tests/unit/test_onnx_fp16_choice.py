"""The ONNX route's automatic FP16 choice (issue 22/23): the torch route's selection fed with recoveries replayed in
onnxruntime, kept only when the held-out check SQNR rises. Oracles: each replay re-measured here from the route's
own float Q/DQ twin (onnxruntime) with that node float; the guard re-measured on the check rows. The toy's sigmoid
score output is judged on its clipped logit (``parity.ParityResult.judged_db``), as the choice reads it."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

import quantkit.onnxin.fp16_choice as fc
from quantkit.exporter import parity
from quantkit.exporter.coverage import graph_coverage
from quantkit.onnxin.qdq import simulate_qdq
from quantkit.onnxin.route import quantize_onnx
from quantkit.ptq.guard import split_rows
from quantkit.recipe import load_recipe
from onnx_toy import toy_data, toy_onnx


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    d = tmp_path_factory.mktemp("fc")
    (d / "toy.onnx").write_bytes(toy_onnx())
    x = toy_data(32)
    np.save(d / "calib.npy", x)
    return d / "toy.onnx", d / "calib.npy", x


def _recipe(model, npy, *extra):
    return load_recipe(None, [f"model.name='{model}'", f"calibration.data='{npy}'", "calibration.use_cache=false",
                              "calibration.method=max", "ptq.bias_correction=false", *extra])


def _step(passes):  # the one guard lists every registered pass: pick the FP16 choice's
    return next(s for s in passes["steps"] if s["name"] == "fp16_choice")


def _worst(res, int8_nodes, x):
    import copy

    lay = copy.copy(res.layout)
    lay.int8 = list(int8_nodes)
    sim = simulate_qdq(onnx.load_from_string(res.fp32_bytes), lay, res.act_scales, res.weight_scales)
    names = [o.name for o in sim.graph.output]
    ref = [parity.run_session(parity.session(res.fp32_bytes, 1), x)]
    got = [parity.run_session(parity.session(sim.SerializeToString(), 1), x)]
    r = parity.compare_outputs(ref, got, names, parity.sigmoid_outputs(sim))  # the sigmoid score: its logit
    return float(min(r.judged_db(n) for n in names))


def test_replays_and_guard_match_an_independent_measurement(toy):
    model, npy, x = toy
    res = quantize_onnx(str(model), str(npy), _recipe(model, npy, "sensitivity.min_int8_share=0.5"),
                        progress=False)
    step = _step(res.passes)
    assert step["name"] == "fp16_choice"
    sel, layers = res.sensitivity["selection"], res.sensitivity["analysis"]["layers"]
    fit, check = split_rows(len(x))
    chosen = step["measured"]["fp16_layers"]  # the selection's, less the nodes float before it (decode MatMul)
    assert set(chosen) <= set(sel["fp16_layers"]) and "/MatMul" not in chosen
    every = [n for n in res.layout.candidates if n in res.layout.int8 or n in chosen]
    # the replays: worst-output SQNR with one node float, on the fit images the choice used (8, spread)
    from quantkit.ptq.guard import RowView

    class _Cal:  # the rows RowView picks, from the array itself
        array, batch_size, num_samples = x, 32, len(x)

    fit_x = np.concatenate([b.numpy() for b in RowView(_Cal, fit).batches(limit=8, spread=True)])
    base = _worst(res, every, fit_x)
    assert res.sensitivity["analysis"]["int8_sqnr_db"] == pytest.approx(base, abs=1e-3)
    replayed = [r for r in layers if r["replayed"]]
    assert replayed and step["measured"]["replayed"] == len(replayed)
    for r in replayed:
        assert r["without_sqnr_db"] == pytest.approx(_worst(res, [n for n in every if n != r["name"]], fit_x),
                                                     abs=1e-3), r["name"]
    # the guard: kept exactly when the check SQNR rose, and then those nodes are float in the graph with a reason
    before, after = _worst(res, every, x[check]), _worst(res, [n for n in every if n not in chosen], x[check])
    if chosen:
        assert step["check_sqnr_db_before"] == pytest.approx(before, abs=1e-3)
        assert step["check_sqnr_db_after"] == pytest.approx(after, abs=1e-3)
        assert step["kept"] == (after > before)
    kept = chosen if step["kept"] else []
    assert sorted(n for n in every if n not in res.layout.int8) == sorted(kept)
    float_ops = {op.node for op in graph_coverage(res.int8).ops if not op.int8}
    assert set(kept) <= float_ops
    assert all(res.layout.reasons[n].startswith("selection: recovers") for n in kept)


def test_kept_choice_is_in_the_report_with_reasons(toy, tmp_path):
    from quantkit.pipeline_onnx import run_onnx_export

    model, npy, _ = toy
    run_onnx_export(_recipe(model, npy, "sensitivity.min_int8_share=0.5"), tmp_path / "out", progress=False)
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    step = _step(rep["passes"])
    assert step["name"] == "fp16_choice" and "sensitivity" in rep
    md = (tmp_path / "out" / "report.md").read_text()
    assert "fp16_choice" in md
    float_ops = rep["coverage"]["float_ops"]
    assert rep["coverage"]["error"] is None and not rep["coverage"]["unexplained"]
    assert all(o["reason"] for o in float_ops)  # every float weighted op says why
    for n in (step["measured"]["fp16_layers"] if step["kept"] else []):
        assert any(o["node"] == n and o["reason"].startswith("selection:") for o in float_ops)
    assert not any("automatic FP16 choice" in n for n in rep["notes"])


def test_full_int8_runs_no_choice(toy):
    model, npy, _ = toy
    res = quantize_onnx(str(model), str(npy), _recipe(model, npy, "sensitivity.min_int8_share=null"),
                        progress=False)
    assert res.sensitivity is None and not _step(res.passes)["tried"]
    assert _step(res.passes)["verdict"] == "off in the recipe" and not res.layout.reasons


def test_a_larger_graph_is_screened_by_blocks(toy, monkeypatch):
    """Beyond MAX_CANDIDATES nodes only the opened blocks' nodes are replayed one by one."""
    model, npy, _ = toy
    monkeypatch.setattr(fc, "MAX_CANDIDATES", 2)
    monkeypatch.setattr(fc, "BLOCKS", 2)
    res = quantize_onnx(str(model), str(npy), _recipe(model, npy, "sensitivity.min_int8_share=0.5"),
                        progress=False)
    m = _step(res.passes)["measured"]
    assert len(m["blocks"]) == 2 and sum(b["nodes"] for b in m["blocks"]) > 2
    assert m["replayed"] <= max(2, max(b["nodes"] for b in m["blocks"]))
    opened = [b for b in m["blocks"] if b["opened"]]
    assert len(opened) == 1 and m["replayed"] == opened[0]["nodes"]
    gains = [b["noise_gain"] for b in m["blocks"]]
    assert all(np.isfinite(gains))


def test_screen_opens_the_block_with_most_gain_per_mac():
    macs = {n: 1.0 for n in "abcdef"}
    gains = {("a", "b", "c"): 0.1, ("d", "e", "f"): 0.5}
    old = fc.MAX_CANDIDATES, fc.BLOCKS
    try:
        fc.MAX_CANDIDATES, fc.BLOCKS = 3, 2
        nodes, info = fc._screen(list("abcdef"), macs, lambda b: gains[tuple(b)])
    finally:
        fc.MAX_CANDIDATES, fc.BLOCKS = old
    assert nodes == ["d", "e", "f"] and [b["opened"] for b in info["blocks"]] == [False, True]


def test_hybrid_cache_round_trips_the_chosen_fp16_nodes(toy, tmp_path):
    """The default's calibration.cache has no scale for the FP16 nodes' inputs; read back it gives the same graph."""
    from quantkit.pipeline_onnx import run_onnx_export

    model, npy, _ = toy
    recipe = _recipe(model, npy, "sensitivity.min_int8_share=0.5")
    res = run_onnx_export(recipe, tmp_path / "a", progress=False)
    assert _step(res.report["passes"])["kept"]  # the toy's choice is kept (else this test proves nothing)
    back = run_onnx_export(recipe, tmp_path / "b", progress=False, trt_cache=str(tmp_path / "a" / "calibration.cache"))
    assert (tmp_path / "b" / "model.int8.onnx").read_bytes() == (tmp_path / "a" / "model.int8.onnx").read_bytes()
    assert sorted(back.report["calibration"]["trt_cache"]["kept_fp16_nodes"]) == sorted(
        n for n in _step(res.report["passes"])["measured"]["fp16_layers"])


def test_report_md_gives_each_fp16_node_its_reason(toy, tmp_path):
    from quantkit.pipeline_onnx import run_onnx_export

    model, npy, _ = toy
    res = run_onnx_export(_recipe(model, npy, "sensitivity.min_int8_share=0.5", "quantization.skip=['/c2/Conv']"),
                          tmp_path / "o", progress=False)
    md = (tmp_path / "o" / "report.md").read_text()
    assert "no reason recorded" not in md
    rows = {r["name"]: r for r in res.report["layers"]}
    assert "quantization.skip" in rows["/c2/Conv"]["why"]
    for n in _step(res.report["passes"])["measured"]["fp16_layers"]:
        assert rows[n]["why"].startswith("selection: recovers") and rows[n]["why"] in md


def test_sensitivity_flag_replays_every_node_with_its_damage(toy, tmp_path):
    """--sensitivity on the ONNX route (it was refused): every node replayed, damage = only it INT8 (re-measured
    here), the chart written; with --full-int8 the analysis still runs and nothing is chosen."""
    from quantkit.pipeline_onnx import run_onnx_export

    model, npy, x = toy
    res = run_onnx_export(_recipe(model, npy, "sensitivity.enabled=true", "sensitivity.min_int8_share=null"),
                          tmp_path / "o", progress=False)
    rep = res.report
    assert (tmp_path / "o" / "sensitivity.png").is_file() and not _step(rep["passes"])["changed"]
    assert "selection" not in rep["sensitivity"] and rep["coverage"]["float_ops"][0]["node"] == "/MatMul"
    layers = rep["sensitivity"]["analysis"]["layers"]
    assert all(r["replayed"] for r in layers if r["type"] != "MatMul")
    fit, _ = split_rows(len(x))
    from quantkit.ptq.guard import RowView

    class _Cal:
        array, batch_size, num_samples = x, 32, len(x)

    fit_x = np.concatenate([b.numpy() for b in RowView(_Cal, fit).batches(limit=8, spread=True)])
    from quantkit.onnxin.route import quantize_onnx as q

    full = q(str(model), str(npy), _recipe(model, npy, "sensitivity.min_int8_share=null"), progress=False)
    for r in layers:
        if r["replayed"]:
            assert r["damage_sqnr_db"] == pytest.approx(_worst(full, [r["name"]], fit_x), abs=1e-3), r["name"]


def test_an_sqnr_floor_is_met_on_the_onnx_route(toy):
    """sensitivity.sqnr_floor (the accuracy budget without labels) on the ONNX route (it was ignored there): the
    choice keeps nodes FP16 until the worst output on the fit images reaches the floor, re-measured here from the
    route's own twin with the final placement; the user's budget is kept whatever the check says."""
    model, npy, x = toy
    full = quantize_onnx(str(model), str(npy), _recipe(model, npy, "sensitivity.min_int8_share=null"),
                         progress=False)
    fit, _ = split_rows(len(x))
    from quantkit.ptq.guard import RowView

    class _Cal:
        array, batch_size, num_samples = x, 32, len(x)

    fit_x = np.concatenate([b.numpy() for b in RowView(_Cal, fit).batches(limit=8, spread=True)])
    base = _worst(full, full.layout.int8, fit_x)
    floor = round(base + 6.0, 1)  # well above full INT8: some nodes must leave INT8
    res = quantize_onnx(str(model), str(npy), _recipe(model, npy, "sensitivity.min_int8_share=null",
                                                      f"sensitivity.sqnr_floor={floor}"), progress=False)
    step = _step(res.passes)
    budget = step["measured"]["budget"]
    assert step["kept"] and step["verdict"] == "kept: the recipe's budget requires it"
    assert budget["sqnr_floor_db"] == floor and step["measured"]["fp16_layers"]
    got = _worst(res, res.layout.int8, fit_x)
    assert got == pytest.approx(budget["measured_db"], abs=1e-3)
    assert budget["met"] == (got >= floor - 1e-6) and budget["met"]
    assert res.sensitivity["selection"]["metric"] == "sqnr_db"
    assert all(res.layout.reasons[n] for n in step["measured"]["fp16_layers"])
