"""Sub-commands beyond export: lint, verify, build, eval, layers."""

from __future__ import annotations

import click

from quantkit.cli import EXIT_CHECK, main, run_guarded


@main.command("verify")
@click.argument("out_dir", type=click.Path(file_okay=False))
def verify_cmd(out_dir):
    """Re-check OUT_DIR's files against its manifest.json (exit 4 on any mismatch)."""
    def _run():
        from quantkit.report.manifest import verify

        problems = verify(out_dir)
        for p in problems:
            click.secho(f"MISMATCH {p}", fg="red", err=True)
        if problems:
            raise SystemExit(EXIT_CHECK)
        click.echo(f"{out_dir}: all files match manifest.json")
    run_guarded(_run)


@main.command("lint")
@click.argument("onnx_path", type=click.Path(dir_okay=False))
@click.option("--strong", is_flag=True, help="Also apply the strongly-typed (FP16) rules.")
def lint_cmd(onnx_path, strong):
    """Check a Q/DQ ONNX graph against TensorRT's placement rules (exit 4 on errors)."""
    def _run():
        from quantkit.export.lint import format_findings, lint, load_for_lint

        model = load_for_lint(onnx_path)  # issue 17: an empty or non-ONNX file is exit 2, not "no findings"
        findings = lint(model, strong=strong)
        click.echo(format_findings(findings) if findings else f"{onnx_path}: no findings")
        if any(f.severity == "error" for f in findings):
            raise SystemExit(EXIT_CHECK)
    run_guarded(_run)


@main.command("layers")
@click.argument("model", default="trees")
@click.option("--num-classes", type=int)
def layers_cmd(model, num_classes):
    """List the quantizable layer names of MODEL (for quantization.skip patterns)."""
    def _run():
        from quantkit.models.loading import build_model
        from quantkit.quant.insert import quantizable_layers
        from quantkit.reparam.fuse import reparameterize

        m, _ = build_model(model, num_classes=num_classes)
        for name, t in quantizable_layers(reparameterize(m.eval())).items():
            click.echo(f"{name}\t{t}")
    run_guarded(_run)


@main.command("eval", epilog="""\b
Examples:
  quantkit eval out/                                # bundled model: uses the bundled held-out set
  quantkit eval out/ --data my_coco/ --json out_eval.json""")
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--data", type=click.Path(), help="COCO folder (annotations.json + images/); default: the recipe's.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Also write the metrics as JSON here.")
@click.option("--max-images", type=int, default=0, help="Evaluate only the first N images (0 = all).")
def eval_cmd(out_dir, data, json_path, max_images):
    """mAP of the FP32 torch model, model.onnx and model.int8.onnx of an export folder, with one decode + NMS."""
    def _run():
        from pathlib import Path

        from quantkit.errors import UsageError
        from quantkit.eval.coco import CocoDataset
        from quantkit.eval.detection import evaluate_detection, onnx_predictor, torch_predictor
        from quantkit.pipeline import open_data, resolve_inputs
        from quantkit.recipe import load_recipe
        from quantkit.stages import prepare_model
        from quantkit.utils.atomic import atomic_write_json

        folder = Path(out_dir)
        if not (folder / "recipe.resolved.yaml").is_file():
            raise UsageError(f"{folder} is not a quantkit export folder (no recipe.resolved.yaml): pass --out of an export")
        recipe = load_recipe(folder / "recipe.resolved.yaml")
        calib_path, default_eval = resolve_inputs(recipe)
        data_path = data or default_eval
        if not data_path:
            raise UsageError("no evaluation data: pass --data DIR (COCO: annotations.json + images/)")
        model, _ = prepare_model(recipe)
        _, pp = open_data(recipe, calib_path, getattr(model.fp32, "default_input_size", None))
        ds = CocoDataset(data_path, max_images=max_images or None)
        ev = recipe.evaluation
        results = {"data": str(data_path)}
        for key, predict in (("fp32_torch", torch_predictor(model.fp32)),
                             ("fp32_onnx", onnx_predictor(folder / "model.onnx")),
                             ("int8_onnx", onnx_predictor(folder / "model.int8.onnx"))):
            results[key] = evaluate_detection(predict, ds, pp, conf=ev.conf, iou=ev.iou).as_dict()
            click.echo(f"{key:<11} mAP50:95 {results[key]['map50_95']:.4f}  mAP50 {results[key]['map50']:.4f}")
        drop = 100 * (results["fp32_onnx"]["map50_95"] - results["int8_onnx"]["map50_95"])
        results["drop_map50_95_points"] = round(drop, 4)
        click.echo(f"INT8 drop: {drop:.2f} mAP50:95 points")
        if json_path:
            atomic_write_json(json_path, results)
    run_guarded(_run)


@main.command("build", epilog="""\b
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
        from pathlib import Path

        from quantkit.engine.builder import cuda_device
        from quantkit.engine.local import build_and_inspect, installed_trt_version
        from quantkit.errors import UsageError

        p = Path(onnx_path)
        if not p.is_file():
            raise UsageError(f"{p} does not exist: pass an ONNX written by `quantkit export`")
        installed_trt_version()  # fail with the install hint before anything else
        name, _ = cuda_device()  # the build itself refuses a GPU that does not match --target
        info = build_and_inspect(p, Path(out_dir) if out_dir else p.parent, target=target, batch=batch,
                                 timing_cache=timing_cache)
        click.echo(f"engine: {info['engine']} ({info['typing']} typing, TensorRT {info['tensorrt']}, GPU {name})")
        for pr in info["precision_mismatches"]:
            click.secho(f"precision: {pr}", fg="yellow", err=True)
    run_guarded(_run)
