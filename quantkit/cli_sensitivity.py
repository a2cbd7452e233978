"""``quantkit sensitivity``: per-layer INT8 sensitivity, the T4 cost estimate and (with a budget) the FP16 choice.

Thin: options become recipe overrides; the work is in ``quantkit.sensitivity``. Registered on
``quantkit.cli.main`` when this module is imported.
"""

from __future__ import annotations

import math

import click

from quantkit.cli import _setup_logging, _yaml_str, main, run_guarded

SENSITIVITY_EPILOG = """\b
Examples:
  quantkit sensitivity --out sens/                                # bundled detector, SQNR + held-out mAP
  quantkit sensitivity yolo_nas_s --weights ckpt.pth --calib images/ --out sens/ --num-images 8
  quantkit sensitivity --eval evaldata/trees_holdout --max-drop 0.5 --out sens/   # also pick FP16 layers
  quantkit sensitivity --model net.py:build --calib data.npy --sqnr-floor 30 --out sens/

\b
Writes sensitivity.json (analysis, cost estimate, selection) and sensitivity.png into --out.
Latencies are ESTIMATES from a T4 roofline model, not measurements."""


@main.command("sensitivity", epilog=SENSITIVITY_EPILOG)
@click.argument("model_arg", metavar="[MODEL]", required=False)
@click.option("--model", "model_opt", help="Registered model name or path/to/file.py:factory.")
@click.option("--weights", type=click.Path(dir_okay=False), help="State dict or checkpoint (.pt/.pth).")
@click.option("--calib", type=click.Path(), help="Folder of images, or a float32 NCHW .npy.")
@click.option("--eval", "eval_data", type=click.Path(), help="COCO-format folder for mAP sensitivities.")
@click.option("--eval-images", type=int, help="Images of --eval scored per layer (0: all). [default: recipe's "
              "sensitivity.eval_images, 8]")
@click.option("--out", "out_dir", default="sensitivity", show_default=True, type=click.Path(file_okay=False),
              help="Output folder (must be empty unless --force).")
@click.option("--num-images", type=int, help="Calibration images for the SQNR sensitivities [recipe: 16].")
@click.option("--recipe", "recipe_path", type=click.Path(dir_okay=False),
              help="YAML recipe file, or a shipped recipe's name (`quantkit recipes`).")
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE", help="Override a recipe field.")
@click.option("--max-drop", type=float, help="Choose FP16 layers so the measured mAP50:95 drop stays <= this (points).")
@click.option("--sqnr-floor", type=float, help="Choose FP16 layers so the measured output SQNR stays >= this (dB).")
@click.option("--top", type=int, default=15, show_default=True, help="Rows of the printed table and bars of the plot.")
@click.option("--force", is_flag=True, help="Replace a non-empty --out folder.")
@click.option("-v", "--verbose", is_flag=True, help="Verbose: also log debug messages to stderr.")
def sensitivity_cmd(model_arg, model_opt, weights, calib, eval_data, eval_images, out_dir, num_images, recipe_path,
                    overrides, max_drop, sqnr_floor, top, force, verbose):
    """Rank MODEL's layers by INT8 damage and recovery; estimate T4 latency; optionally choose FP16 layers."""
    _setup_logging(verbose)
    run_guarded(_sensitivity, locals())


def _sensitivity(a: dict) -> None:
    from pathlib import Path

    from quantkit.errors import UsageError
    from quantkit.export.artifacts import StagedOutput, check_output_dir
    from quantkit.pipeline import quantize_recipe
    from quantkit.recipe import load_recipe, parse_batch
    from quantkit.report.plots import sensitivity_bar_chart_bytes
    from quantkit.sensitivity.analysis import Metric, analyze, make_measure
    from quantkit.sensitivity.cost_model import ESTIMATE_LABEL, layer_costs
    from quantkit.sensitivity.plan import analysis_dataset
    from quantkit.sensitivity.select import choose_fp16_layers
    from quantkit.utils.optional_deps import check_optional_deps

    if a["model_arg"] and a["model_opt"] and a["model_arg"] != a["model_opt"]:
        raise UsageError("give the model either as MODEL or as --model, not both")
    for opt in ("num_images", "eval_images", "top"):
        if a[opt] is not None and a[opt] < (0 if opt == "eval_images" else 1):
            raise UsageError(f"--{opt.replace('_', '-')} must be >= {0 if opt == 'eval_images' else 1}")
    sets = []
    for key, value in (("model.name", a["model_arg"] or a["model_opt"]), ("model.weights", a["weights"]),
                       ("calibration.data", a["calib"]), ("evaluation.data", a["eval_data"]),
                       ("sensitivity.num_images", a["num_images"]), ("sensitivity.eval_images", a["eval_images"]),
                       ("gates.max_drop", a["max_drop"]),
                       ("sensitivity.sqnr_floor", a["sqnr_floor"])):
        if value is not None:
            sets.append(f"{key}={_yaml_str(value) if isinstance(value, str) else value}")
    recipe = load_recipe(a["recipe_path"], [*a["overrides"], *sets])
    out = Path(a["out_dir"])
    check_output_dir(out, a["force"])
    check_optional_deps(recipe, evaluation=False, plot=True)  # issue 15: sensitivity.png needs matplotlib
    state = quantize_recipe(recipe, progress=True)
    dataset = analysis_dataset(state.eval_path, recipe.sensitivity.eval_images)  # issue 15: shared default
    result = analyze(state, num_images=recipe.sensitivity.num_images, dataset=dataset, progress=True)
    example = next(state.data.batches(limit=1))[:1]
    batch = parse_batch(recipe.input.batch)[1]
    costs = layer_costs(state.model.fp32, example.expand(batch, *example.shape[1:]).contiguous(),
                        state.model.layout.layers)
    selection = None
    drop, floor = recipe.gates.max_drop, recipe.sensitivity.sqnr_floor
    if drop is not None and (dataset is not None or floor is None):
        measure = make_measure(state, Metric.MAP_DROP_POINTS, dataset=dataset) if dataset is not None else None
        selection = choose_fp16_layers(result, costs, max_drop_points=drop, measure=measure)
    elif floor is not None:
        measure = make_measure(state, Metric.SQNR_DB, num_images=recipe.sensitivity.num_images)
        selection = choose_fp16_layers(result, costs, sqnr_floor_db=floor, measure=measure)
    doc = {"model": state.model_info, "sensitivity": result.as_dict(), "cost_model": costs.as_dict(),
           "selection": selection.as_dict() if selection else None}
    png = sensitivity_bar_chart_bytes(result, top=a["top"])
    with StagedOutput(out, a["force"]) as stage:
        stage.write_json("sensitivity.json", doc)
        stage.write_bytes("sensitivity.png", png)
    click.echo(format_table(result, costs, a["top"]))
    click.echo(f"{ESTIMATE_LABEL}, batch {costs.batch}: FP16 {doc['cost_model']['estimated_ms']['fp16']:.3f} ms, "
               f"all INT8 {doc['cost_model']['estimated_ms']['int8']:.3f} ms")
    if selection is not None:
        s = selection.as_dict()
        verdict = {True: "meets", False: "MISSES", None: "not measured against"}[selection.met]
        click.echo(f"FP16 layers ({len(selection.fp16)}): {', '.join(selection.fp16) or 'none'}")
        click.echo(f"measured {s['measured']} {s['unit']}: {verdict} the budget {s['budget']}; "
                   f"hybrid {s['estimated_ms']['hybrid']:.3f} ms ({ESTIMATE_LABEL})")
    click.echo(f"written: {out}/sensitivity.json, {out}/sensitivity.png")
    if selection is not None and selection.met is False:
        from quantkit.errors import GateFailure

        raise GateFailure(f"no FP16 set found within {len(selection.measurements)} measurements meets the budget "
                          f"(last: {selection.as_dict()['measured']}); results written to {out}")


def _fmt(v, nd=2) -> str:
    if v is None:
        return "-"
    return ("inf" if v > 0 else "-inf") if math.isinf(v) else f"{round(v, nd) + 0.0:.{nd}f}"  # no "-0.00"


def format_table(result, costs, top: int) -> str:
    """The ``top`` most damaging layers as a fixed-width text table (dB, mAP points, estimated ms)."""
    head = f"{'#':>3}  {'layer':<48} {'type':<16} {'dmg dB':>8} {'rec dB':>7}"
    if result.has_map:
        head += f" {'dmg mAP':>8} {'rec mAP':>8}"
    head += f" {'+ms fp16*':>9}"
    lines = [head]
    for i, n in enumerate(result.ranking()[:top], 1):
        s = result.layers[n]
        label = n if len(n) <= 48 else "…" + n[-47:]
        row = f"{i:>3}  {label:<48} {s.type:<16} {_fmt(s.damage_sqnr_db):>8} {_fmt(s.recovery_sqnr_db):>7}"
        if result.has_map:
            row += f" {_fmt(s.damage_map_points, 3):>8} {_fmt(s.recovery_map_points, 3):>8}"
        extra = costs.layers[n].fp16_extra_ms(costs.spec) if n in costs.layers else None
        row += f" {_fmt(extra, 4):>9}"
        lines.append(row)
    base = f"all-INT8 output SQNR {_fmt(result.int8_sqnr_db)} dB on {result.num_images} calibration images"
    if result.has_map:
        base += (f"; mAP50:95 FP32 {result.fp32_map50_95:.4f} -> INT8 {result.int8_map50_95:.4f} "
                 f"(drop {result.int8_drop_points:.3f} points, {result.num_eval_images} images)")
    lines += [base, "dmg: only this layer INT8; rec: gained by keeping only this layer in float; "
              "* estimated T4 ms (roofline model, not measured)"]
    return "\n".join(lines)
