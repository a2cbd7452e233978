"""Sub-commands beyond export: lint, verify, build, eval, layers."""

from __future__ import annotations

import click

from quantkit.cli import EXIT_CHECK, _setup_logging, main, run_guarded


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
        import onnx

        from quantkit.errors import UsageError
        from quantkit.export.lint import format_findings, lint

        try:
            model = onnx.load(onnx_path)
        except Exception as exc:  # noqa: BLE001 - onnx raises several types for unreadable files
            raise UsageError(f"cannot read {onnx_path} as ONNX: {exc}") from exc
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
