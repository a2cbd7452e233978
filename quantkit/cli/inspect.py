"""Sub-commands that inspect without quantizing: lint, verify, layers, models."""

from __future__ import annotations

import click

from quantkit.cli.common import EXIT_CHECK, run_guarded


@click.command("verify")
@click.argument("out_dir", type=click.Path(file_okay=False))
def verify_cmd(out_dir):
    """Re-check OUT_DIR's files against its manifest.json (exit 4 on any mismatch)."""
    def _run():
        from quantkit.pipeline import run_verify

        problems = run_verify(out_dir)
        for p in problems:
            click.secho(f"MISMATCH {p}", fg="red", err=True)
        if problems:
            raise SystemExit(EXIT_CHECK)
        click.echo(f"{out_dir}: all files match manifest.json")
    run_guarded(_run)


@click.command("lint")
@click.argument("onnx_path", type=click.Path(dir_okay=False))
@click.option("--strong", is_flag=True, help="Also apply the strongly-typed (FP16) rules.")
def lint_cmd(onnx_path, strong):
    """Check a Q/DQ ONNX graph against TensorRT's placement rules (exit 4 on errors)."""
    def _run():
        from quantkit.pipeline import run_lint

        errors, text = run_lint(onnx_path, strong=strong)
        click.echo(text)
        if errors:
            raise SystemExit(EXIT_CHECK)
    run_guarded(_run)


@click.command("layers")
@click.argument("model", default="trees")
@click.option("--num-classes", type=int, help="Number of classes of the detection head.")
def layers_cmd(model, num_classes):
    """List the quantizable layer names of MODEL (for quantization.skip patterns)."""
    def _run():
        from quantkit.pipeline import list_layers

        for name, t in list_layers(model, num_classes).items():
            click.echo(f"{name}\t{t}")
    run_guarded(_run)


@click.command("recipes")
def recipes_cmd():
    """List the shipped recipes (use one with --recipe NAME)."""
    def _run():
        from quantkit.recipe import recipe_list

        click.echo(recipe_list())
    run_guarded(_run)


@click.command("models")
def models_cmd():
    """List registered models with their parameter counts."""
    def _run():
        from quantkit.pipeline import list_models

        click.echo(f"{'name':<12} {'parameters':>12}  {'input':>9}  description")
        for r in list_models():
            count = f"{r['parameters']:,}" if r["parameters"] is not None else f"n/a ({r['error']})"
            h, w = r["input_size"]
            click.echo(f"{r['name']:<12} {count:>12}  {h}x{w:<5}  {r['description']}")
    run_guarded(_run)
