"""``quantkit`` command line. Thin: parse options into a Recipe, call the pipeline, map errors to exit codes.

Exit codes: 0 success; 1 internal error (a bug: please report); 2 bad input or environment (the message names
the fix; nothing was written); 3 a gate failed (--max-drop / --min-sqnr; artifacts and report were written);
4 ``quantkit verify`` or ``quantkit lint`` found problems.
"""

from __future__ import annotations

import logging
import sys
import traceback

import click

from quantkit import __version__
from quantkit.errors import QuantkitError
from quantkit.utils import interrupt

EXIT_OK, EXIT_INTERNAL, EXIT_USAGE, EXIT_GATE, EXIT_CHECK = 0, 1, 2, 3, 4

EXIT_CODES_HELP = """\b
Exit codes:
  0  success
  1  internal error (a bug in quantkit: please report it with the command)
  2  bad input or environment: the message names the fix; nothing was written
  3  a gate failed (--max-drop, --min-sqnr): artifacts and report were written
  4  verify/lint found problems"""


def _setup_logging(verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("quantkit: %(message)s"))
    logger = logging.getLogger("quantkit")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    logger.propagate = False


def _fail(exc: BaseException) -> None:
    if isinstance(exc, QuantkitError):
        click.secho(f"error: {exc}", fg="red", err=True)
        sys.exit(exc.exit_code)
    if isinstance(exc, KeyboardInterrupt):
        click.secho("interrupted: no partial output was left behind", fg="red", err=True)
        sys.exit(130)
    traceback.print_exc()
    click.secho(f"internal error: {type(exc).__name__}: {exc} (a bug in quantkit; please report it)", fg="red", err=True)
    sys.exit(EXIT_INTERNAL)


def run_guarded(fn, *args, **kwargs):
    interrupt.install()
    try:
        return fn(*args, **kwargs)
    except SystemExit:
        raise
    except BaseException as exc:  # noqa: BLE001 - the CLI boundary maps every error to an exit code
        _fail(exc)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110},
             epilog=EXIT_CODES_HELP)
@click.version_option(__version__, prog_name="quantkit")
def main() -> None:
    """quantkit: INT8 post-training quantization of QA-RepVGG / YOLO-NAS detectors to TensorRT-ready Q/DQ ONNX."""


EXPORT_EPILOG = """\b
Examples:
  quantkit export                                   # bundled tree detector + bundled calibration tiles
  quantkit export yolo_nas_s --weights ckpt.pth --calib images/ --out out/
  quantkit export --model net.py:build --weights net.pt --calib data.npy --out out/
  quantkit export --recipe recipes/yolo_nas_s.yaml --set calibration.method=mse --out out/
  quantkit export --eval evaldata/trees_holdout --max-drop 0.3 --out out/   # auto FP16 selection + CI gate

\b
Security: --model FILE.py:FACTORY imports and runs FILE.py (your code, with your permissions).
Weights are loaded with torch.load(weights_only=True): files that need pickle code execution are refused.

""" + EXIT_CODES_HELP


@main.command("export", epilog=EXPORT_EPILOG)
@click.argument("model_arg", metavar="[MODEL]", required=False)
@click.option("--model", "model_opt", help="Registered model name (see `quantkit models`) or path/to/file.py:factory.")
@click.option("--weights", type=click.Path(dir_okay=False), help="State dict or super-gradients checkpoint (.pt/.pth).")
@click.option("--num-classes", type=int, help="Number of classes of the detection head.")
@click.option("--calib", type=click.Path(), help="Folder of .jpg/.png images, or a float32 NCHW .npy.")
@click.option("--out", "out_dir", default="out", show_default=True, type=click.Path(file_okay=False),
              help="Output folder (must be empty unless --force).")
@click.option("--recipe", "recipe_path", type=click.Path(dir_okay=False), help="YAML recipe (see recipes/).")
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE", help="Override a recipe field; repeatable.")
@click.option("--method", type=click.Choice(["max", "percentile", "entropy", "mse"]), help="Calibration method.")
@click.option("--input-size", help="Model input HxW in pixels, e.g. 640x640.")
@click.option("--batch", help="Batch size N, or dynamic min:opt:max such as 1:8:32.")
@click.option("--eval", "eval_data", type=click.Path(), help="COCO-format folder (annotations.json + images/) for mAP.")
@click.option("--skip", multiple=True, help="Glob of layer names (or type:Name) kept out of INT8; repeatable.")
@click.option("--max-drop", type=float, help="Budget in mAP50:95 points: with --eval, layers are kept FP16 "
              "automatically to stay within it (sensitivity.auto); exit 3 if the exported model still exceeds it.")
@click.option("--sensitivity", "sensitivity_flag", is_flag=True, help="Add the per-layer sensitivity analysis and plot.")
@click.option("--min-sqnr", type=float, help="Gate: fail (exit 3) if INT8-vs-FP32 output SQNR is below this (dB).")
@click.option("--calib-cache", type=click.Path(dir_okay=False), help="Calibration cache file to reuse between jobs.")
@click.option("--no-cache", is_flag=True, help="Always recalibrate.")
@click.option("--trt-calib-cache", type=click.Path(dir_okay=False),  # issue 16: ONNX route
              help="TensorRT calibration cache (TRT-<ver>-EntropyCalibration2 text): use its scales, do not calibrate.")
@click.option("--engine", is_flag=True, help="Also build the TensorRT engine (needs TensorRT and a GPU).")
@click.option("--target", help="Engine target GPU: t4 (default; compute capability 7.5) or any.")
@click.option("--nms", is_flag=True, help="Also write *.nms.onnx with NMS appended (built by build_engine.sh).")
@click.option("--force", is_flag=True, help="Replace a non-empty --out folder.")
@click.option("-v", "--verbose", is_flag=True)
def export_cmd(model_arg, model_opt, weights, num_classes, calib, out_dir, recipe_path, overrides, method,
               input_size, batch, eval_data, skip, max_drop, min_sqnr, calib_cache, no_cache, trt_calib_cache, engine, target, nms, sensitivity_flag, force, verbose):
    """Quantize MODEL to INT8 and write FP32 / INT8 Q/DQ ONNX, report and manifest into --out."""
    _setup_logging(verbose)
    run_guarded(_export, locals())


def _export(a: dict) -> None:
    from quantkit.errors import UsageError
    from quantkit.pipeline import run_export
    from quantkit.recipe import load_recipe

    if a["model_arg"] and a["model_opt"] and a["model_arg"] != a["model_opt"]:
        raise UsageError("give the model either as MODEL or as --model, not both")
    sets = []
    model = a["model_arg"] or a["model_opt"]
    for key, value in (("model.name", model), ("model.weights", a["weights"]), ("model.num_classes", a["num_classes"]),
                       ("calibration.data", a["calib"]), ("calibration.method", a["method"]),
                       ("input.batch", a["batch"]), ("evaluation.data", a["eval_data"]),
                       ("gates.max_drop", a["max_drop"]), ("gates.min_sqnr", a["min_sqnr"]),
                       ("calibration.cache", a["calib_cache"]), ("calibration.trt_cache", a["trt_calib_cache"])):
        if value is not None:
            sets.append(f"{key}={value}" if not isinstance(value, str) else f"{key}={_yaml_str(value)}")
    if a["input_size"]:
        try:
            h, w = (int(v) for v in a["input_size"].lower().split("x"))
        except ValueError:
            raise UsageError(f"--input-size {a['input_size']!r} must look like 640x640") from None
        sets.append(f"input.size=[{h}, {w}]")
    if a["skip"]:
        sets.append("quantization.skip=[" + ", ".join(_yaml_str(s) for s in a["skip"]) + "]")
    if a["no_cache"]:
        sets.append("calibration.use_cache=false")
    if a["engine"]:
        sets.append("export.engine=true")
    if a["nms"]:
        sets.append("export.nms=true")
    if a["sensitivity_flag"]:
        sets.append("sensitivity.enabled=true")
    if a["target"]:
        sets.append(f"export.target={_yaml_str(a['target'])}")
    recipe = load_recipe(a["recipe_path"], [*a["overrides"], *sets])
    result = run_export(recipe, a["out_dir"], force=a["force"], progress=True, command_line=list(sys.argv))
    _print_summary(result)


def _yaml_str(s: str) -> str:
    return "'" + str(s).replace("'", "''") + "'"


def _print_summary(result) -> None:
    r = result.report
    acc = r["accuracy"]["int8_vs_fp32_sqnr_db"]["worst_db"]
    par = r["parity"]["int8_onnx_vs_torch_fakequant"]["worst_db"]
    click.echo(f"artifacts: {result.out_dir}/ ({', '.join(result.files)})")
    ref = "float Q/DQ reference" if r.get("route") == "onnx" else "torch fake-quant"  # issue 16: ONNX route
    click.echo(f"INT8 vs FP32 output SQNR: {acc} dB (calibration inputs); onnxruntime vs {ref}: {par} dB")
    click.echo(f"sizes: model.onnx {r['onnx']['sizes_bytes']['model.onnx']:,} B, model.int8.onnx "
               f"{r['onnx']['sizes_bytes']['model.int8.onnx']:,} B (ratio {r['onnx']['int8_size_ratio']})")
    ev = r.get("evaluation")
    if ev:
        click.echo(f"held-out mAP50:95 / mAP50: FP32 {ev['fp32_onnx']['map50_95']:.4f} / {ev['fp32_onnx']['map50']:.4f}"
                   f"  INT8 {ev['int8_onnx']['map50_95']:.4f} / {ev['int8_onnx']['map50']:.4f}"
                   f"  (drop {ev['drop_map50_95_points']:.2f} mAP50:95 points)")


@main.command("models")
def models_cmd():
    """List registered models with their parameter counts."""
    run_guarded(_models)


def _models() -> None:
    from quantkit.models.loading import build_model
    from quantkit.models.registry import count_parameters, list_models

    click.echo(f"{'name':<12} {'parameters':>12}  {'input':>9}  description")
    for e in list_models():
        try:  # exact counts, from the built module (raw, as super-gradients counts them)
            count = f"{count_parameters(build_model(e.name)[0]):,}"
        except Exception as exc:  # noqa: BLE001 - a missing asset must not hide the other models
            count = f"n/a ({type(exc).__name__})"
        click.echo(f"{e.name:<12} {count:>12}  {e.input_size[0]}x{e.input_size[1]:<5}  {e.description}")


from quantkit import cli_more, cli_sensitivity  # noqa: E402,F401  (register the remaining sub-commands)
