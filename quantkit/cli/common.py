"""What every sub-command shares: exit codes, logging, the error boundary, recipe overrides from options."""

from __future__ import annotations

import io
import logging
import sys
import traceback

import click

from quantkit.errors import QuantkitError, StorageError, UsageError, is_disk_full
from quantkit.utils import interrupt

EXIT_OK, EXIT_INTERNAL, EXIT_USAGE, EXIT_GATE, EXIT_CHECK = 0, 1, 2, 3, 4

EXIT_CODES_HELP = """\b
Exit codes:
  0  success
  1  internal error (a bug in quantkit: please report it with the command)
  2  bad input or environment: the message names the fix; nothing was written
  3  a gate failed (--max-drop, --min-sqnr): artifacts and report were written
  4  verify/lint found problems"""

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 110}


def _lowercase_show(exc: click.ClickException):
    """``exc.show`` writing click's ``Error: ...`` line as ``error: ...``, the form of every quantkit error."""
    original = exc.show

    def show(file=None) -> None:
        buf = io.StringIO()
        original(file=buf)
        lines = buf.getvalue().split("\n")
        for i, line in enumerate(lines):  # click's line follows its usage lines; the message itself is kept
            if line.startswith("Error: "):
                lines[i] = "error: " + line[len("Error: "):]
                break
        click.echo("\n".join(lines), file=file or sys.stderr, nl=False)

    return show


class QuantkitGroup(click.Group):
    """click's own usage errors (unknown option, bad value) print ``Error: ...``; quantkit's print ``error: ...``.
    This group gives click's the same lowercase prefix, so every error starts the same way."""

    def make_context(self, *args, **kwargs):
        try:
            return super().make_context(*args, **kwargs)
        except click.ClickException as exc:
            exc.show = _lowercase_show(exc)
            raise

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except click.ClickException as exc:
            exc.show = _lowercase_show(exc)
            raise


def setup_logging(verbose: bool) -> None:
    """Log lines ``quantkit: ...`` to stderr; DEBUG with ``-v``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("quantkit: %(message)s"))
    logger = logging.getLogger("quantkit")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    logger.propagate = False


def as_user_error(exc: BaseException) -> BaseException:
    """A full disk or quota met outside the output folder (the calibration cache, TMPDIR, a library's scratch
    file) is the environment, not a bug: a StorageError naming the file and the fix. Other errors unchanged."""
    from quantkit.quote import cap

    if is_disk_full(exc):
        where = f" writing {cap(exc.filename)}" if exc.filename else ""
        return StorageError(f"no space left on device{where} ({exc.strerror}): free disk space there (the "
                            "temporary folder counts too: set TMPDIR to a disk with room) and rerun")
    return exc


def _fail(exc: BaseException) -> None:
    from quantkit.quote import printable

    exc = as_user_error(exc)
    if isinstance(exc, QuantkitError):  # a non-UTF-8 file name in the message shows its bytes as \xNN
        click.secho(f"error: {printable(exc)}", fg="red", err=True)
        sys.exit(exc.exit_code)
    if isinstance(exc, KeyboardInterrupt):  # SIGINT or SIGTERM (utils.interrupt): 130 or 143
        click.secho(f"interrupted ({interrupt.signal_name()}): no partial output was left behind", fg="red", err=True)
        sys.exit(interrupt.exit_code())
    traceback.print_exc()
    click.secho(f"internal error: {type(exc).__name__}: {exc} (a bug in quantkit; please report it)", fg="red", err=True)
    sys.exit(EXIT_INTERNAL)


def run_guarded(fn, *args, **kwargs):
    """Run a command's body, mapping every error to its exit code and one red line."""
    interrupt.install()
    try:
        return fn(*args, **kwargs)
    except SystemExit:
        raise
    except BaseException as exc:  # noqa: BLE001 - the CLI boundary maps every error to an exit code
        _fail(exc)


def yaml_str(s: str) -> str:
    """``s`` as a single-quoted YAML scalar (so ``--set key=VALUE`` keeps it a string)."""
    return "'" + str(s).replace("'", "''") + "'"


def overrides(pairs) -> list[str]:
    """``section.key=value`` strings for the options that were given (None = not given)."""
    from quantkit.quote import cap, printable

    out = []
    for key, value in pairs:
        if isinstance(value, str) and printable(value) != value:
            raise UsageError(f"{key} '{cap(printable(value))}' is not valid UTF-8 (a name in another encoding): quantkit "
                             "keeps paths in its recipe and reports as UTF-8 text; rename it, or link it under a "
                             "UTF-8 name (ln -s)")
        if value is not None:
            out.append(f"{key}={yaml_str(value) if isinstance(value, str) else value}")
    return out


def one_model(model_arg: str | None, model_opt: str | None) -> str | None:
    """The model given as MODEL or as --model (not two different ones)."""
    if model_arg and model_opt and model_arg != model_opt:
        raise UsageError("give the model either as MODEL or as --model, not both")
    return model_arg or model_opt


def names_model(model_arg: str | None, sets) -> bool:
    """True when the command line names the model: MODEL / ``--model``, or ``--set model.name=...`` (consent to
    run a ``file.py:factory`` that a recipe from an output folder names; see ``quantkit.models.consent``)."""
    return bool(model_arg) or any(str(s).split("=", 1)[0].strip() == "model.name" for s in sets)
