"""The one error handler of every ``prunequant`` command, and the exit codes.

Every error a user can cause is a :class:`~graph_passes.errors.PrunequantError`: the command
prints its one-line message and exits with the error's ``exit_code`` (1-14). A malformed
command line (unknown option, missing argument, bad option type) is a click usage error:
:data:`EXIT_USAGE`. Ctrl-C (SIGINT), SIGTERM and SIGHUP: :data:`EXIT_INTERRUPTED`, after every
cleanup has run (staged outputs removed; see :func:`install_signal_handlers`). Anything else is a bug: one line asking for
a report (``--debug`` shows the traceback), :data:`EXIT_INTERNAL`.
"""

from __future__ import annotations

import functools
import logging
import signal
import threading
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

#: SIGTERM (CI timeouts, Kubernetes) and SIGHUP (a closed terminal) end a command like Ctrl-C
TERMINATING_SIGNALS: tuple[signal.Signals, ...] = tuple(
    getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised in the main thread so that every ``finally`` (staged outputs,
    torch's thread count) runs; the command exits with :data:`EXIT_INTERRUPTED`."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum

    @property
    def signal_name(self) -> str:
        try:
            return signal.Signals(self.signum).name
        except ValueError:
            return f"signal {self.signum}"


def _raise_interrupted(signum: int, frame: object) -> None:
    raise Interrupted(signum)


def install_signal_handlers() -> Callable[[], None]:
    """SIGTERM/SIGHUP raise :class:`Interrupted` (main thread only; ignored signals stay ignored);
    returns the function that puts the previous handlers back."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous: dict[int, Any] = {}
    for sig in TERMINATING_SIGNALS:
        old = signal.getsignal(sig)
        if old is signal.SIG_IGN:
            continue
        previous[sig] = old
        signal.signal(sig, _raise_interrupted)

    def restore() -> None:
        for sig, old in previous.items():
            signal.signal(sig, old if old is not None else signal.SIG_DFL)

    return restore


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
        except KeyboardInterrupt as exc:
            # a second signal while the message is printed or handlers restored must not turn
            # into a traceback: ignore them from here on
            _ignore_interrupts()
            what = exc.signal_name if isinstance(exc, Interrupted) else "Ctrl-C"
            click.echo(f"interrupted ({what}): no partial output was left behind (the model, plan and report "
                       "are written all together or not at all)", err=True)
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


def _ignore_interrupts() -> None:
    if threading.current_thread() is not threading.main_thread():
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, *TERMINATING_SIGNALS)}
    for sig in previous:
        signal.signal(sig, signal.SIG_IGN)

    def restore() -> None:  # the caller (CliRunner in tests, an embedding program) gets them back
        for sig, old in previous.items():
            signal.signal(sig, old if old is not None else signal.SIG_DFL)

    ctx = click.get_current_context(silent=True)
    if ctx is not None:
        ctx.find_root().call_on_close(restore)
    else:  # pragma: no cover - handle_errors always runs inside a click context
        restore()


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


__all__ = ["EXIT_INTERNAL", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_USAGE", "Interrupted", "UsageCodeGroup",
           "error_classes", "handle_errors", "install_signal_handlers"]
