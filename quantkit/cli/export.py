"""``quantkit export``: options -> Recipe -> ``pipeline.run_export``; prints where the artifacts are."""

from __future__ import annotations

import sys

import click

from quantkit.cli.common import (EXIT_CODES_HELP, as_user_error, names_model, one_model, overrides, run_guarded,
                                 setup_logging, yaml_str)
from quantkit.errors import UsageError
from quantkit.recipe import CalibMethod, check_option_conflicts

EXPORT_EPILOG = """\b
Examples:
  quantkit export                                   # bundled tree detector + bundled calibration tiles
  quantkit export yolo_nas_s --weights ckpt.pth --calib images/ --out out/
  quantkit export --model net.py:build --weights net.pt --calib data.npy --out out/
  quantkit export --recipe yolo_nas_s --calib images/ --set calibration.method=mse --out out/   # a shipped recipe
  quantkit export --eval evaldata/trees_holdout --max-drop 0.3 --out out/   # auto FP16 selection + CI gate
  quantkit export yolo_nas_s --data data.yaml --out out/   # dataset YAML: calibrate on train, score on val
  quantkit export model.onnx --calib images/ --eval coco/ --out out/         # FP32 ONNX in, scored in onnxruntime
  quantkit export --full-int8 --set ptq.bias_correction=false --set calibration.method=entropy   # plain PTQ

\b
Data flags (the same on export, sensitivity and eval): --calib DATA calibrates; --eval DATA is held-out
evaluation data (COCO folder, images + --eval-annotations, or a dataset YAML's val split); --data data.yaml is
a dataset YAML feeding both (train split -> calibration, val split -> evaluation) unless --calib / --eval say
otherwise.

\b
Default accuracy methods (each can be turned off; each kept only when it raises the output SQNR on held-out
calibration images): calibration method chosen per network, empirical bias correction
(ptq.bias_correction), and automatic FP16 for the layers with the most measured output-SQNR gain per MAC while
>= 95 % of the conv/linear MACs stay INT8 (sensitivity.min_int8_share; --full-int8 turns it off). The report
lists the INT8 share, every FP16 layer and why.

\b
Security: --model FILE.py:FACTORY imports and runs FILE.py (your code, with your permissions); so does a
--recipe naming one. A recipe from an output folder (recipe.resolved.yaml) runs its model code only when you
name that model again with --model, or pass --trust-recipe.
Weights are loaded with torch.load(weights_only=True): files that need pickle code execution are refused.

""" + EXIT_CODES_HELP

METHODS = " | ".join(m.value for m in CalibMethod)


@click.command("export", epilog=EXPORT_EPILOG)
@click.argument("model_arg", metavar="[MODEL]", required=False)
@click.option("--model", "model_opt", help="Registered model name (see `quantkit models`) or path/to/file.py:factory.")
@click.option("--weights", type=click.Path(dir_okay=False), help="State dict or super-gradients checkpoint (.pt/.pth).")
@click.option("--num-classes", type=int, help="Number of classes of the detection head.")
@click.option("--calib", type=click.Path(), help="Folder of .jpg/.png images, a float32 .npy (N, ...) such as NCHW "
              "images or (N, L) audio frames (integer arrays: token ids, uint8 pixels, fed as integers), or a .npz "
              "of such arrays named after the model's forward arguments (several inputs; MODEL.onnx: keyed by the "
              "ONNX input name). Fewer than 32 images "
              "(calibration.max_images included) calibrate with a warning: ranges from so few vary.")
@click.option("--out", "out_dir", default="out", show_default=True, type=click.Path(file_okay=False),
              help="Output folder (must be empty unless --force).")
@click.option("--recipe", "recipe_path", type=click.Path(dir_okay=False),
              help="YAML recipe file, or a shipped recipe's name (trees, yolo_nas_s, ...: `quantkit recipes`).")
@click.option("--set", "sets", multiple=True, metavar="SECTION.KEY=VALUE", help="Override a recipe field; repeatable.")
@click.option("--method", help=f"Calibration method: {METHODS}. [default: the recipe's, auto: max unless a "
              "clipping rule is >= calibration.clip_margin_db better by held-out output SQNR]")
@click.option("--input-size", help="Model input HxW in pixels, e.g. 640x640. [default: the model's; the bundled "
              "detector: 320x320]")
@click.option("--batch", help="Batch size N, or dynamic min:opt:max such as 1:8:32 (images). [default: 1]")
@click.option("--eval", "eval_data", type=click.Path(), help="Held-out evaluation data for mAP: COCO folder "
              "(annotations.json + images/), images folder with --eval-annotations, or a dataset YAML (val split). "
              "[default: the bundled held-out set for the bundled model, else none]")
@click.option("--eval-annotations", type=click.Path(dir_okay=False),
              help="COCO annotations JSON for --eval IMAGES_DIR (when it is not IMAGES_DIR/annotations.json).")
@click.option("--data", "data_yaml", type=click.Path(dir_okay=False),
              help="Ultralytics dataset YAML (YOLO txt labels): calibrate on its train split, evaluate on val "
              "(--calib / --eval override either).")
@click.option("--device", help="Where calibration, sensitivity and torch evaluation run: cpu or cuda[:N]. "
              "[default: cpu]")
@click.option("--skip", multiple=True, help="Glob of layer names (or type:Name) kept out of INT8; repeatable.")
@click.option("--max-drop", type=float, help="Budget in mAP50:95 points (0.3 = 0.3 points of mAP, not 30%): with "
              "--eval, layers are kept FP16 automatically to stay within it (sensitivity.auto); exit 3 if the "
              "exported model still exceeds it.")
@click.option("--sensitivity", "sensitivity_flag", is_flag=True, help="Add the per-layer sensitivity analysis and "
              "plot (mAP on sensitivity.eval_images = 8 held-out images; needs matplotlib).")
@click.option("--min-int8-share", type=float, help="Keep at least this share (0..1) of the conv/linear MACs in "
              "INT8 and spend the rest on the FP16 layers with the most measured gain per MAC. [default: 0.95; an "
              "accuracy budget (--max-drop with --eval, sensitivity.sqnr_floor) replaces it]")
@click.option("--full-int8", is_flag=True, help="No automatic FP16 layers under the INT8-share budget: every "
              "quantizable layer INT8 unless --skip or an accuracy budget keeps it float.")
@click.option("--min-sqnr", type=float, help="Gate: fail (exit 3) if INT8-vs-FP32 output SQNR is below this (dB).")
@click.option("--fp16-overflow", type=click.Choice(["keep_fp32", "clamp", "error"]), help="Strong (FP16) graph: "
              "float constants beyond FP16's 65504 (a BatchNorm's running_var) keep their ops FP32, are clipped, or "
              "drop the strong graph (reported; the weak graph is written either way). [default: keep_fp32]")
@click.option("--require-strong", is_flag=True, help="Gate: fail (exit 3, artifacts written) if the strongly typed "
              "graph fails its check or cannot be converted.")
@click.option("--calib-cache", type=click.Path(dir_okay=False), help="Calibration cache file to reuse between jobs. "
              "[default: $QUANTKIT_CACHE_DIR or ~/.cache/quantkit/calibration/<key>.json]")
@click.option("--no-cache", is_flag=True, help="Always recalibrate.")
@click.option("--trt-calib-cache", type=click.Path(dir_okay=False),
              help="TensorRT calibration cache (TRT-<ver>-EntropyCalibration2 text): use its scales instead of "
              "calibrating (both routes; a torch model still needs --calib for the parity checks). Layers whose input "
              "has no scale (a hybrid export's FP16 layers) stay FP16; --set calibration.trt_cache_missing=calibrate "
              "calibrates them from --calib instead.")
@click.option("--engine", is_flag=True, help="Also build the TensorRT engine (needs TensorRT and a GPU).")
@click.option("--target", help="Engine target GPU: t4 (compute capability 7.5) or any. [default: t4]")
@click.option("--nms", is_flag=True, help="Also write *.nms.onnx with NMS appended (built by build_engine.sh).")
@click.option("--force", is_flag=True, help="Replace a non-empty --out folder.")
@click.option("--trust-recipe", is_flag=True, help="Run the model code (file.py:factory) named by a --recipe from an "
              "output folder (recipe.resolved.yaml) without naming it again with --model.")
@click.option("-q", "--quiet", is_flag=True, help="No progress and no info logs on stderr (warnings and errors only).")
@click.option("--json", "json_out", is_flag=True, help="Print one JSON summary line on stdout instead of the human "
              "summary (also on failure: ok=false, exit_code, error).")
@click.option("-v", "--verbose", is_flag=True, help="Verbose: also log debug messages (e.g. how many blocks were "
              "fused) to stderr.")
def export_cmd(**a):
    """Quantize MODEL to INT8 and write FP32 / INT8 Q/DQ ONNX, report and manifest into --out."""
    from quantkit.cli.summary import configure_output

    setup_logging(a["verbose"])
    configure_output(quiet=a["quiet"], json_summary=a["json_out"], verbose=a["verbose"])
    run_guarded(_export, a)


# recipe key -> the export option(s) that set it (for the message when a --set disagrees with one)
OPTION_KEYS = {
    "model.name": "MODEL / --model", "model.weights": "--weights", "model.num_classes": "--num-classes",
    "calibration.data": "--calib / --data", "calibration.method": "--method", "input.batch": "--batch",
    "evaluation.data": "--eval / --data", "gates.max_drop": "--max-drop", "gates.min_sqnr": "--min-sqnr",
    "calibration.cache": "--calib-cache", "calibration.trt_cache": "--trt-calib-cache", "export.target": "--target",
    "sensitivity.min_int8_share": "--min-int8-share / --full-int8", "evaluation.annotations": "--eval-annotations",
    "runtime.device": "--device", "input.size": "--input-size", "quantization.skip": "--skip",
    "calibration.use_cache": "--no-cache", "export.engine": "--engine", "export.nms": "--nms",
    "sensitivity.enabled": "--sensitivity",
}


def recipe_overrides(a: dict) -> list[str]:
    """The ``--set`` strings equivalent to the export options that were given."""
    sets = overrides((
        ("model.name", one_model(a["model_arg"], a["model_opt"])), ("model.weights", a["weights"]),
        ("model.num_classes", a["num_classes"]), ("calibration.data", a["calib"]),
        ("calibration.method", a["method"]), ("input.batch", a["batch"]), ("evaluation.data", a["eval_data"]),
        ("gates.max_drop", a["max_drop"]), ("gates.min_sqnr", a["min_sqnr"]), ("calibration.cache", a["calib_cache"]),
        ("calibration.trt_cache", a["trt_calib_cache"]),
        ("export.target", a["target"]), ("sensitivity.min_int8_share", a["min_int8_share"]),
        ("export.fp16_overflow", a["fp16_overflow"]),
    ))
    if a["full_int8"] and a["min_int8_share"] is not None:
        raise UsageError("--full-int8 and --min-int8-share contradict each other: give one")
    if a["data_yaml"]:  # --data sets calibration and evaluation data unless --calib / --eval say otherwise
        sets += overrides((("calibration.data", a["data_yaml"] if a["calib"] is None else None),
                           ("evaluation.data", a["data_yaml"] if a["eval_data"] is None else None)))
    sets += overrides((("evaluation.annotations", a["eval_annotations"]), ("runtime.device", a["device"])))
    if a["input_size"]:
        try:
            h, w = (int(v) for v in a["input_size"].lower().split("x"))
        except ValueError:
            raise UsageError(f"--input-size {a['input_size']!r} must look like 640x640") from None
        sets.append(f"input.size=[{h}, {w}]")
    if a["skip"]:
        sets.append("quantization.skip=[" + ", ".join(yaml_str(s) for s in a["skip"]) + "]")
    for flag, setting in (("no_cache", "calibration.use_cache=false"), ("engine", "export.engine=true"),
                          ("nms", "export.nms=true"), ("sensitivity_flag", "sensitivity.enabled=true"),
                          ("require_strong", "gates.require_strong=true"),
                          ("full_int8", "sensitivity.min_int8_share=null")):
        if a[flag]:
            sets.append(setting)
    return sets


def _export(a: dict) -> None:
    """With --json, one summary line on stdout, also for a failed run (then the error propagates)."""
    from quantkit.cli.summary import error_summary, export_summary, summary_line
    from quantkit.errors import QuantkitError
    from quantkit.utils.progress import heartbeat

    with heartbeat("loading torch"):  # 5-30 s on a busy machine, before any stage can say anything
        from quantkit.pipeline import run_export
    from quantkit.recipe import load_recipe

    try:
        options = recipe_overrides(a)
        check_option_conflicts(a["sets"], options, OPTION_KEYS)
        recipe = load_recipe(a["recipe_path"], [*a["sets"], *options])
        result = run_export(recipe, a["out_dir"], force=a["force"], progress=True, command_line=list(sys.argv),
                            recipe_path=a["recipe_path"], trust_recipe=a["trust_recipe"],
                            model_named=names_model(one_model(a["model_arg"], a["model_opt"]), a["sets"]))
    except Exception as exc:  # noqa: BLE001 - re-raised; a full disk outside --out is a user error too
        err = as_user_error(exc)
        written = getattr(err, "result", None)  # a failed gate: the artifacts and report were written
        if a["json_out"] and isinstance(err, QuantkitError):
            click.echo(summary_line(export_summary(written, str(err)) if written is not None
                                    else error_summary("export", err.exit_code, str(err))))
        elif written is not None:
            _print_summary(written)
        raise
    if a["json_out"]:
        click.echo(summary_line(export_summary(result)))
    else:
        _print_summary(result)


def _print_summary(result) -> None:
    from quantkit.cli.summary import gate_verdict

    r = result.report
    acc = r["accuracy"]["int8_vs_fp32_sqnr_db"]["worst_db"]
    par = r["parity"]["int8_onnx_vs_torch_fakequant"]["worst_db"]
    click.echo(f"artifacts: {result.out_dir}/ ({', '.join(result.files)})")
    ref = "float Q/DQ reference" if r.get("route") == "onnx" else "torch fake-quant"
    click.echo(f"INT8 vs FP32 output SQNR: {acc} dB (calibration inputs); onnxruntime vs {ref}: {par} dB")
    share = (r.get("int8_mac_share") or {}).get("share")
    if share is not None:
        click.echo(f"INT8 share of conv/linear MACs (counted in model.int8.onnx): {100 * share:.2f} %")
    click.echo(f"sizes: model.onnx {r['onnx']['sizes_bytes']['model.onnx']:,} B, model.int8.onnx "
               f"{r['onnx']['sizes_bytes']['model.int8.onnx']:,} B (ratio {r['onnx']['int8_size_ratio']})")
    ev = r.get("evaluation")
    if ev:
        click.echo(f"held-out mAP50:95 / mAP50: FP32 {ev['fp32_onnx']['map50_95']:.4f} / {ev['fp32_onnx']['map50']:.4f}"
                   f"  INT8 {ev['int8_onnx']['map50_95']:.4f} / {ev['int8_onnx']['map50']:.4f}"
                   f"  (drop {ev['drop_map50_95_points']:.2f} mAP50:95 points)")
    fp16 = [row["name"] for row in r.get("layers", []) if row.get("precision") != "int8"]
    share = (r.get("int8_mac_share") or {}).get("share")
    click.echo(f"FP16 layers: {len(fp16)}" + (f" (INT8 share of conv/linear MACs {100 * share:.2f} %)"
                                               if share is not None else "") + "; report.md lists them and why")
    click.echo(gate_verdict(r)[1])  # always the last line: CI logs end with the verdict
