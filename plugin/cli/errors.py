"""The one error handler of every ``prunequant`` command, and the exit codes.

Every error a user can cause is a :class:`~graph_passes.errors.PrunequantError`: the command
prints its one-line message and exits with the error's ``exit_code`` (1-14). A malformed
command line (unknown option, missing argument, bad option type) is a click usage error:
:data:`EXIT_USAGE`. Ctrl-C: :data:`EXIT_INTERRUPTED`. Anything else is a bug: one line asking for
a report (``--debug`` shows the traceback), :data:`EXIT_INTERNAL`.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Callable, TypeVar

import click

from graph_passes import errors as _errors
from graph_passes.errors import PrunequantError

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_USAGE = 64  # EX_USAGE (sysexits.h): the command line itself is wrong
EXIT_INTERNAL = 70  # EX_SOFTWARE: a prunequant bug
EXIT_INTERRUPTED = 130  # 128 + SIGINT

F = TypeVar("F", bound=Callable[..., Any])


def error_classes() -> dict[str, type[PrunequantError]]:
    """Every exception class of :mod:`graph_passes.errors`, by name (the README table's source)."""
    return {name: obj for name, obj in vars(_errors).items()
            if isinstance(obj, type) and issubclass(obj, PrunequantError)}


def handle_errors(fn: F) -> F:
    """Map exceptions raised by a command to one line on stderr and an exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
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
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise  # click's own: usage errors get EXIT_USAGE in UsageCodeGroup
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

    return wrapper  # type: ignore[return-value]


class UsageCodeGroup(click.Group):
    """A click group whose usage errors (its own and its commands') exit with
    :data:`EXIT_USAGE` instead of click's 2, which :class:`~graph_passes.errors.InputFileError`
    uses."""

    def make_context(self, *args: Any, **kwargs: Any) -> click.Context:
        try:
            return super().make_context(*args, **kwargs)
        except click.UsageError as exc:
            exc.exit_code = EXIT_USAGE
            raise

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.UsageError as exc:
            exc.exit_code = EXIT_USAGE
            raise


__all__ = ["EXIT_INTERNAL", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_USAGE", "UsageCodeGroup", "error_classes",
           "handle_errors"]
