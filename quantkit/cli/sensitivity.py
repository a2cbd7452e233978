"""``quantkit sensitivity``: options -> Recipe -> ``pipeline.run_sensitivity``; prints the ranked table."""

from __future__ import annotations

import click

from quantkit.cli.common import names_model, one_model, overrides, run_guarded, setup_logging
from quantkit.errors import GateFailure, UsageError

SENSITIVITY_EPILOG = """\b
Examples:
  quantkit sensitivity --out sens/                                # bundled detector, SQNR + held-out mAP
  quantkit sensitivity yolo_nas_s --weights ckpt.pth --calib images/ --out sens/ --num-images 8
  quantkit sensitivity --eval evaldata/trees_holdout --max-drop 0.5 --out sens/   # also pick FP16 layers
  quantkit sensitivity --model net.py:build --calib data.npy --sqnr-floor 30 --out sens/
  quantkit sensitivity yolo_nas_s --data data.yaml --out sens/    # dataset YAML: train -> calib, val -> mAP

\b
Data flags mean the same as on export and eval: --calib DATA calibrates, --eval DATA is held-out evaluation
data, --data data.yaml feeds both (--calib / --eval override either).

\b
Writes sensitivity.json (analysis, cost estimate, selection) and sensitivity.png into --out.
Latencies are ESTIMATES from a T4 roofline model, not measurements.

\b
Security: a model given as module.py:factory (on the command line or in a --recipe) imports and runs that
file's code with your permissions. A recipe from an output folder (recipe.resolved.yaml) runs its model code
only when you name that model again with --model, or pass --trust-recipe."""


@click.command("sensitivity", epilog=SENSITIVITY_EPILOG)
@click.argument("model_arg", metavar="[MODEL]", required=False)
@click.option("--model", "model_opt", help="Registered model name or path/to/file.py:factory.")
@click.option("--weights", type=click.Path(dir_okay=False), help="State dict or checkpoint (.pt/.pth).")
@click.option("--calib", type=click.Path(), help="Folder of images, a float32 .npy (N, ...), or a .npz of named inputs.")
@click.option("--eval", "eval_data", type=click.Path(), help="Held-out evaluation data for mAP sensitivities: COCO "
              "folder, images folder with --eval-annotations, or a dataset YAML (val split).")
@click.option("--eval-annotations", type=click.Path(dir_okay=False),
              help="COCO annotations JSON for --eval IMAGES_DIR (when it is not IMAGES_DIR/annotations.json).")
@click.option("--data", "data_yaml", type=click.Path(dir_okay=False),
              help="Ultralytics dataset YAML: calibrate on its train split, score mAP on val.")
@click.option("--eval-images", type=int, help="Images of --eval scored per layer (0: all). [default: recipe's "
              "sensitivity.eval_images, 8]")
@click.option("--out", "out_dir", default="sensitivity", show_default=True, type=click.Path(file_okay=False),
              help="Output folder (must be empty unless --force).")
@click.option("--num-images", type=int, help="Calibration images for the SQNR sensitivities [recipe: 8].")
@click.option("--recipe", "recipe_path", type=click.Path(dir_okay=False),
              help="YAML recipe file, or a shipped recipe's name (`quantkit recipes`).")
@click.option("--set", "sets", multiple=True, metavar="SECTION.KEY=VALUE", help="Override a recipe field.")
@click.option("--max-drop", type=float, help="Choose FP16 layers so the measured mAP50:95 drop stays <= this (points).")
@click.option("--sqnr-floor", type=float, help="Choose FP16 layers so the measured output SQNR stays >= this (dB).")
@click.option("--device", help="Where calibration and the per-layer measurements run: cpu or cuda[:N]. [default: cpu]")
@click.option("--top", type=int, default=15, show_default=True, help="Rows of the printed table and bars of the plot.")
@click.option("--force", is_flag=True, help="Replace a non-empty --out folder.")
@click.option("--trust-recipe", is_flag=True, help="Run the model code (file.py:factory) named by a --recipe from an "
              "output folder (recipe.resolved.yaml) without naming it again with --model.")
@click.option("-v", "--verbose", is_flag=True, help="Verbose: also log debug messages to stderr.")
def sensitivity_cmd(**a):
    """Rank MODEL's layers by INT8 damage and recovery; estimate T4 latency; optionally choose FP16 layers."""
    setup_logging(a["verbose"])
    run_guarded(_sensitivity, a)


def _sensitivity(a: dict) -> None:
    from quantkit.utils.progress import heartbeat

    with heartbeat("loading torch"):  # 5-30 s on a busy machine, before any stage can say anything
        from quantkit.pipeline import run_sensitivity
    from quantkit.recipe import check_option_conflicts, load_recipe

    for opt, low in (("num_images", 1), ("eval_images", 0), ("top", 1)):
        if a[opt] is not None and a[opt] < low:
            raise UsageError(f"--{opt.replace('_', '-')} must be >= {low}")
    sets = overrides((
        ("model.name", one_model(a["model_arg"], a["model_opt"])), ("model.weights", a["weights"]),
        ("calibration.data", a["calib"]), ("evaluation.data", a["eval_data"]),
        ("sensitivity.num_images", a["num_images"]), ("sensitivity.eval_images", a["eval_images"]),
        ("gates.max_drop", a["max_drop"]),
        ("sensitivity.sqnr_floor", a["sqnr_floor"]), ("runtime.device", a["device"]),
    ))
    if a["data_yaml"]:  # as on export: --data feeds calibration and evaluation unless --calib / --eval say otherwise
        sets += overrides((("calibration.data", a["data_yaml"] if a["calib"] is None else None),
                           ("evaluation.data", a["data_yaml"] if a["eval_data"] is None else None)))
    sets += overrides((("evaluation.annotations", a["eval_annotations"]),))
    check_option_conflicts(a["sets"], sets, {
        "model.name": "MODEL / --model", "model.weights": "--weights", "calibration.data": "--calib / --data",
        "evaluation.data": "--eval / --data", "sensitivity.num_images": "--num-images",
        "sensitivity.eval_images": "--eval-images", "gates.max_drop": "--max-drop",
        "sensitivity.sqnr_floor": "--sqnr-floor", "runtime.device": "--device",
        "evaluation.annotations": "--eval-annotations"})
    recipe = load_recipe(a["recipe_path"], [*a["sets"], *sets])
    run = run_sensitivity(recipe, a["out_dir"], force=a["force"], top=a["top"], recipe_path=a["recipe_path"],
                          trust_recipe=a["trust_recipe"],
                          model_named=names_model(one_model(a["model_arg"], a["model_opt"]), a["sets"]))
    click.echo(run.table)
    for line in run.summary:
        click.echo(line)
    click.echo(f"written: {run.out_dir}/sensitivity.json, {run.out_dir}/sensitivity.png")
    if run.met is False:
        sel = run.doc["selection"]
        raise GateFailure(f"no FP16 set found within {len(sel['measurements'])} measurements meets the budget "
                          f"(last: {sel['measured']}); results written to {run.out_dir}")
