"""``quantkit`` command line. Thin: each sub-command parses its options into a Recipe (or plain arguments),
calls one ``quantkit.pipeline`` function and prints its result; errors become exit codes.

Exit codes: 0 success; 1 internal error (a bug: please report); 2 bad input or environment (the message names
the fix; nothing was written); 3 a gate failed (--max-drop / --min-sqnr; artifacts and report were written);
4 ``quantkit verify`` or ``quantkit lint`` found problems.
"""

from __future__ import annotations

import click

from quantkit.version import __version__
from quantkit.cli.common import CONTEXT, EXIT_CODES_HELP, QuantkitGroup
from quantkit.cli.engine import build_cmd, eval_cmd
from quantkit.cli.export import export_cmd
from quantkit.cli.inspect import layers_cmd, lint_cmd, models_cmd, recipes_cmd, verify_cmd
from quantkit.cli.sensitivity import sensitivity_cmd


@click.group(cls=QuantkitGroup, context_settings=CONTEXT, epilog=EXIT_CODES_HELP)
@click.version_option(__version__, prog_name="quantkit")
def main() -> None:
    """quantkit: INT8 post-training quantization of QA-RepVGG / YOLO-NAS detectors to TensorRT-ready Q/DQ ONNX."""


for _command in (export_cmd, sensitivity_cmd, eval_cmd, build_cmd, lint_cmd, verify_cmd, layers_cmd, models_cmd,
                 recipes_cmd):
    main.add_command(_command)

__all__ = ["main"]
