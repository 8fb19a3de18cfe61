"""The `prunequant` command line: the click group :func:`main` (the console script
``plugin.cli:main``) and one module per command. Errors and exit codes: :mod:`plugin.cli.errors`.
"""

from __future__ import annotations

import logging
import sys

import click

from .errors import UsageCodeGroup, install_signal_handlers


def _configure_logging(verbose: int) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


@click.group(cls=UsageCodeGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("-v", "--verbose", count=True, help="More log output (-v: info, -vv: debug).")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors (for bug reports).")
@click.version_option(package_name="prunequant")
def main(verbose: int, debug: bool) -> None:
    """prunequant: compress a trained ONNX model by removing whole channels and giving every
    remaining weight channel its own bit-width (8/4/2), chosen by a hardware-aware search
    (`prunequant strategies` lists the search methods). The result is a standard QDQ ONNX model.

    \b
    Start with `prunequant inspect MODEL` to see what can be pruned:
      prunequant inspect model.onnx
      prunequant inspect model.onnx --input-shape input=1x3x224x224 --json

    \b
    Exit codes: 0 ok; 1-15 a mistake in the input (the one-line message says which, the README
    lists them); 64 a malformed command line; 70 a prunequant bug; 130 interrupted (Ctrl-C,
    SIGTERM or SIGHUP; nothing is left behind).
    """
    _configure_logging(2 if debug else verbose)
    # SIGTERM/SIGHUP end a command like Ctrl-C (cleanup, exit 130); the previous handlers come
    # back when the command ends (the process is the caller's when run in-process)
    click.get_current_context().call_on_close(install_signal_handlers())


def _register_commands() -> None:
    from .compress import compress_command
    from .evaluate import evaluate_command
    from .export import export_command
    from .inspect import inspect_command
    from .report import report_command
    from .strategies import strategies_command
    from .sweep import sweep_command

    for command in (inspect_command, compress_command, export_command, evaluate_command, strategies_command,
                    report_command, sweep_command):
        main.add_command(command)


_register_commands()

__all__ = ["main"]

if __name__ == "__main__":  # pragma: no cover
    main()
