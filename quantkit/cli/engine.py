"""Sub-commands on an export folder's graphs: eval (held-out mAP) and build (TensorRT engine)."""

from __future__ import annotations

import click

from quantkit.cli.common import run_guarded


@click.command("eval", epilog="""\b
Examples:
  quantkit eval out/                                # the data the export was scored on (bundled: held-out set)
  quantkit eval out/ --eval my_coco/ --json out_eval.json
  quantkit eval out/ --eval images/ --eval-annotations labels.json
  quantkit eval out/ --data data.yaml               # a dataset YAML: its val split (evaluation.split)
  quantkit eval out/ --model net.py:build           # a user model: name its file again to run it

\b
Evaluation data flags mean the same on export, sensitivity and eval: --eval DATA is held-out evaluation data
(COCO folder, images + --eval-annotations, or a dataset YAML); --data data.yaml is a dataset YAML feeding
calibration and evaluation (eval only scores, so only its val split is read). `eval --data DIR` with a folder
still works but is deprecated: use --eval DIR.

\b
An export from an FP32 ONNX file (quantkit export model.onnx) has no torch model: eval scores model.onnx and
model.int8.onnx in onnxruntime and prints the FP32 torch row as n/a.

\b
Security: loading a model given as module.py:factory (or package.module:function) imports and runs that
code with your permissions. eval never runs code named in OUT_DIR/recipe.resolved.yaml on its own: name the
same model with --model (you vouch for the file you name), or pass --trust-recipe to run the recorded one.""")
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--eval", "eval_data", type=click.Path(), help="Held-out evaluation data: COCO folder "
              "(annotations.json + images/), images folder with --eval-annotations, or a dataset YAML. "
              "[default: the data the export was scored on; the bundled held-out set for the bundled model]")
@click.option("--eval-annotations", type=click.Path(dir_okay=False),
              help="COCO annotations JSON for --eval IMAGES_DIR (when it is not IMAGES_DIR/annotations.json).")
@click.option("--data", "data", type=click.Path(), help="Dataset YAML (its val split). A folder here is the "
              "deprecated spelling of --eval DIR.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Also write the metrics as JSON here.")
@click.option("--max-images", type=int, default=0, show_default=True, help="Evaluate only the first N images (0 = all).")
@click.option("--model", "model", help="The recorded user model (path/to/file.py:factory) named again: needed to "
              "rebuild a user model, since loading it executes that file's code.")
@click.option("--trust-recipe", is_flag=True, help="Import and run the model code named in OUT_DIR's recipe without "
              "naming it (only for folders you made or trust).")
def eval_cmd(out_dir, eval_data, eval_annotations, data, json_path, max_images, model, trust_recipe):
    """mAP of the FP32 torch model, model.onnx and model.int8.onnx of an export folder, with one decode + NMS."""
    def _run():
        from quantkit.pipeline import run_eval
        from quantkit.utils.atomic import atomic_write_json

        results = run_eval(out_dir, eval_data_choice(eval_data, data), max_images, model=model,
                           trust_recipe=trust_recipe, annotations=eval_annotations)
        for key in ("fp32_torch", "fp32_onnx", "int8_onnx"):
            row = results[key]
            if row["map50_95"] is None:  # the ONNX route has no torch model: said, not faked
                click.echo(f"{key:<11} n/a ({row.get('note', 'not measured')})")
                continue
            click.echo(f"{key:<11} mAP50:95 {row['map50_95']:.4f}  mAP50 {row['map50']:.4f}")
        click.echo(f"INT8 drop: {results['drop_map50_95_points']:.2f} mAP50:95 points")
        if json_path:
            atomic_write_json(json_path, results)
    run_guarded(_run)


def eval_data_choice(eval_data: str | None, data: str | None) -> str | None:
    """The evaluation data of ``quantkit eval``: ``--eval``, or ``--data`` (a dataset YAML; a folder there is the
    old spelling of ``--eval``, accepted with a deprecation warning). Both: UsageError (exit 2)."""
    from quantkit.errors import UsageError

    if eval_data and data:
        raise UsageError("--eval and --data both name evaluation data: give one (--eval DATA for held-out data, "
                         "--data data.yaml for a dataset YAML)")
    if data and not str(data).lower().endswith((".yaml", ".yml")):
        click.secho(f"warning: `quantkit eval --data {data}` is deprecated: use --eval {data} (on every command "
                    "--eval is held-out evaluation data and --data a dataset YAML)", fg="yellow", err=True)
    return eval_data or data


@click.command("build", epilog="""\b
Needs TensorRT (pip install 'quantkit[trt]') and an NVIDIA GPU. Without them it exits 2 and says so;
every export folder also holds build_engine.sh, the equivalent trtexec command for the target GPU.""")
@click.argument("onnx_path", type=click.Path(dir_okay=False))
@click.option("--target", default="t4", show_default=True, help="GPU target: t4 (compute capability 7.5) or any.")
@click.option("--batch", help="Dynamic batch min:opt:max, e.g. 1:8:32 (the ONNX must have a dynamic batch axis).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), help="Folder for the engine (default: beside the ONNX).")
@click.option("--timing-cache", type=click.Path(dir_okay=False), help="TensorRT timing cache file, reused and updated.")
def build_cmd(onnx_path, target, batch, out_dir, timing_cache):
    """Build a TensorRT engine from a Q/DQ ONNX (strongly typed for an FP16 graph on TensorRT >= 10.12)."""
    def _run():
        from quantkit.pipeline import run_build

        info = run_build(onnx_path, target=target, batch=batch, out_dir=out_dir, timing_cache=timing_cache)
        click.echo(f"engine: {info['engine']} ({info['typing']} typing, TensorRT {info['tensorrt']}, GPU {info['gpu']})")
        for pr in info["precision_mismatches"]:
            click.secho(f"precision: {pr}", fg="yellow", err=True)
    run_guarded(_run)
