"""The `prunequant` command line.

Every error a user can cause is a :class:`~graph_passes.errors.PrunequantError`: the CLI prints
its one-line message and exits with the error's code. Anything else is a bug: one line asking
for a report (``--debug`` shows the traceback), exit code 70.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
from typing import Callable

import click

from graph_passes.errors import PrunequantError

logger = logging.getLogger(__name__)

EXIT_INTERNAL = 70
EXIT_INTERRUPTED = 130


def _configure_logging(verbose: int) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def handle_errors(fn: Callable) -> Callable:
    """Map exceptions to one line on stderr and an exit code."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        ctx = click.get_current_context()
        debug = bool(ctx.find_root().params.get("debug"))
        try:
            return fn(*args, **kwargs)
        except PrunequantError as exc:
            if debug:
                logger.exception("error")
            click.echo(f"error: {exc}", err=True)
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted: nothing was written", err=True)
            ctx.exit(EXIT_INTERRUPTED)
        except click.exceptions.Exit:
            raise
        except Exception as exc:  # a bug: keep the user's screen clean, but say how to report
            if debug:
                logger.exception("internal error")
            first = str(exc).splitlines()[0] if str(exc) else ""
            click.echo(
                f"internal error: {type(exc).__name__}: {first} "
                "(this is a prunequant bug; rerun with --debug and report the traceback)",
                err=True,
            )
            ctx.exit(EXIT_INTERNAL)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("-v", "--verbose", count=True, help="More log output (-v: info, -vv: debug).")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors (for bug reports).")
@click.version_option(package_name="prunequant")
def main(verbose: int, debug: bool) -> None:
    """prunequant: compress a trained ONNX model by removing whole channels and giving every
    remaining weight channel its own bit-width (8/4/2), chosen by one hardware-aware,
    gradient-based search. The result is a standard QDQ ONNX model.

    \b
    Start with `prunequant inspect MODEL` to see what can be pruned:
      prunequant inspect model.onnx
      prunequant inspect model.onnx --input-shape input=1x3x224x224 --json
    """
    _configure_logging(2 if debug else verbose)


_INPUT_SHAPE_HELP = (
    "Pin a model input's shape, e.g. --input-shape input=1x3x224x224. Needed when the model has "
    "symbolic dims (such as a dynamic batch); repeat for several inputs."
)


@main.command()
@click.argument("model", type=click.Path(dir_okay=True, path_type=str))
@click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME=DxDxD", help=_INPUT_SHAPE_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print the full report as JSON (for pipelines).")
@click.option("--no-verify", is_flag=True, help="Skip the onnxruntime check of the normalised model.")
@click.option("--bridge/--no-bridge", default=True, show_default=True,
              help="Also convert to torch and measure parity (what `compress` trains on).")
@click.option("--max-rows", default=60, show_default=True, help="Rows per table in the text report.")
@handle_errors
def inspect(model: str, input_shapes: tuple[str, ...], as_json: bool, no_verify: bool, bridge: bool,
            max_rows: int) -> None:
    """Analyse MODEL: weight layers, parameters, MACs, channel groups (which channels must be
    removed together, and which cannot be removed and why), ops without a rule, and whether the
    model can be trained through the torch bridge.

    Nothing is written. The model is loaded safely (external data only from its own
    directory), normalised (constants folded, BatchNorm folded into convs) and the normalised
    model is checked against the original with onnxruntime.
    """
    from .inspect_cmd import build_inspect_report

    report = build_inspect_report(model, input_shapes, verify=not no_verify, bridge=bridge)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        click.echo(report.to_text(max_rows=max_rows))


def _register_commands() -> None:
    from .cmd_compress import compress_command, export_command
    from .cmd_evaluate import evaluate_command

    main.add_command(compress_command)
    main.add_command(export_command)
    main.add_command(evaluate_command)


_register_commands()


if __name__ == "__main__":  # pragma: no cover
    main()
