"""All-or-nothing writing of the exported model and its sidecar files (plan.json, report.json).

Everything is first staged in a hidden temporary directory *inside* the output directory (so
the final moves are same-filesystem ``os.replace`` renames), then moved into place. Files that
already exist at a target are moved aside first and put back if anything fails; on any
failure, KeyboardInterrupt included, the staging directory is removed, so nothing new is left
behind. A model too large for one protobuf message (> 2 GiB) is written with its tensors in
``<name>.data`` next to it.

Every target (the model, its ``.data`` and each sidecar) must be absent or a regular file: a
directory, FIFO, device node or socket there is refused before anything is staged, so nothing
the user has is moved or deleted. SIGINT, SIGTERM and SIGHUP while writing (main thread) abort
the staging and remove it, and are deferred during the commit (a few renames) so the commit and
its undo always run to the end; the signal is then re-delivered with the caller's own handling
(the default action of SIGTERM still ends the process, after the cleanup). A backup that cannot
be put back is never deleted: its path is logged.

Call :func:`check_output_path` up front (the CLI does, before any search or fine-tuning), so a
bad output location fails in a second, not after an hour of work.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import stat
import tempfile
import threading
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

import onnx

from .errors import OutputError
from .ort_utils import fits_in_protobuf

logger = logging.getLogger(__name__)

_NO_FILES: Mapping[str, str | bytes] = MappingProxyType({})


@dataclass
class WriteResult:
    """What was written: final path -> size in bytes."""

    files: dict[Path, int] = field(default_factory=dict)

    @property
    def model_bytes(self) -> int:
        return sum(n for p, n in self.files.items() if p.suffix in (".onnx", ".data"))


#: the signals that abort a write cleanly (SIGHUP does not exist on Windows)
INTERRUPT_SIGNALS: tuple[signal.Signals, ...] = tuple(
    getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


def _kind(mode: int) -> str | None:
    """What a non-regular file is, in words (None for a regular file)."""
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device node"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def check_target(path: str | os.PathLike, what: str = "output path") -> None:
    """OutputError unless ``path`` is absent or a regular file (a symlink is judged by its target;
    a dangling one is refused too: writing would replace the link, not what it names)."""
    path = Path(path)
    try:
        info = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            raise OutputError(f"{what} {str(path)!r} is a dangling symbolic link; remove it or choose "
                              "another -o") from None
        return
    except OSError as exc:
        raise OutputError(f"cannot check {what} {str(path)!r}: {exc.strerror or exc}; choose another -o") from exc
    kind = _kind(info.st_mode)
    if kind == "a directory" and what == "output path":
        raise OutputError(f"output path {str(path)!r} is a directory; give a file name such as "
                          f"{str(path / 'model.pq.onnx')!r}")
    if kind is not None:
        raise OutputError(f"{what} {str(path)!r} exists and is {kind}, not a regular file; it would be "
                          "replaced: move it away or choose another -o")


def check_output_path(path: str | os.PathLike, extra_names: Iterable[str] = ()) -> Path:
    """The output path, resolved; OutputError (one line) when it cannot be written. ``extra_names``
    (sidecar file names beside it) must not be directories or special files either."""
    out = Path(path).expanduser()
    if not out.name or out.name in (".", ".."):
        raise OutputError(f"output path {str(path)!r} names no file; give a file name such as model.pq.onnx")
    check_target(out)
    parent = out.parent.resolve() if str(out.parent) else Path.cwd()
    if not parent.exists():
        raise OutputError(f"output directory {str(parent)!r} does not exist; create it first")
    if not parent.is_dir():
        raise OutputError(f"{str(parent)!r} is not a directory; cannot write {out.name!r} there")
    try:  # os.access lies for root and for read-only mounts: try for real
        fd, probe = tempfile.mkstemp(prefix=f".{out.name}.probe-", dir=parent)
        try:
            os.close(fd)
        finally:  # even when interrupted right here
            os.unlink(probe)
    except OSError as exc:
        raise OutputError(f"cannot write to output directory {str(parent)!r}: "
                          f"{exc.strerror or exc}; choose a writable location") from exc
    for name in extra_names:
        check_target(parent / name, "sidecar file")
    return parent / out.name


def write_outputs(
    path: str | os.PathLike,
    model: onnx.ModelProto,
    extra_files: Mapping[str, str | bytes] = _NO_FILES,
) -> WriteResult:
    """Write ``model`` to ``path`` and each ``extra_files`` entry (file name -> content) next to
    it, all or nothing. Raises OutputError for a bad location or a failed write."""
    target = check_output_path(path)
    _check_names(target, extra_files)
    for name in [*extra_files, target.name + ".data"]:
        check_target(target.parent / name, "sidecar file" if name in extra_files else "external data file")
    with _signals_as_exceptions() as guard:
        with guard.deferred():
            stage = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        keep_stage = False
        try:
            staged = _stage(stage, target.name, model, extra_files)
            _hook("staged", stage)
            with guard.deferred():
                result = _commit(stage, staged, target.parent)
        except _RestoreFailed as exc:
            keep_stage = True
            raise OutputError(f"writing {str(target)!r} failed and {exc}; move it back by hand") from exc
        except OSError as exc:
            raise OutputError(f"writing {str(target)!r} failed, nothing was written: "
                              f"{exc.strerror or exc}") from exc
        finally:
            with guard.deferred():
                if not keep_stage:
                    shutil.rmtree(stage, ignore_errors=True)
    logger.info("wrote %s", ", ".join(f"{p.name} ({n} bytes)" for p, n in result.files.items()))
    return result


#: test hook: PRUNEQUANT_TEST_PAUSE_WHEN_STAGED=SECONDS sleeps once the files are staged, after
#: writing the staging directory's path to PRUNEQUANT_TEST_STAGED_FILE (tests kill the process then)
_PAUSE_ENV = "PRUNEQUANT_TEST_PAUSE_WHEN_STAGED"


def _hook(moment: str, stage: Path) -> None:
    pause = os.environ.get(_PAUSE_ENV)
    if not pause:
        return
    import time

    marker = os.environ.get("PRUNEQUANT_TEST_STAGED_FILE")
    if marker:
        Path(marker).write_text(f"{moment} {stage}\n", encoding="utf-8")
    time.sleep(float(pause))


class _Signalled(BaseException):
    """A signal arrived while the outputs were being staged (re-delivered after the cleanup)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class _RestoreFailed(OSError):
    """A backup could not be put back: the staging directory (holding it) is kept."""


class _SignalGuard:
    def __init__(self) -> None:
        self.depth = 0
        self.pending: int | None = None

    @contextmanager
    def deferred(self) -> Iterator[None]:
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
        if self.depth == 0 and self.pending is not None:
            signum, self.pending = self.pending, None
            raise _Signalled(signum)

    def handler(self, signum: int, frame: object) -> None:
        if self.depth or self.pending is not None:
            self.pending = self.pending or signum
            return
        raise _Signalled(signum)


@contextmanager
def _signals_as_exceptions() -> Iterator[_SignalGuard]:
    """In the main thread: SIGINT/SIGTERM/SIGHUP become an exception (so every ``finally`` runs)
    or wait while ``guard.deferred()`` holds; on the way out the caller's handlers come back and a
    signal that arrived is re-delivered to them. Ignored signals stay ignored."""
    guard = _SignalGuard()
    if threading.current_thread() is not threading.main_thread():
        yield guard
        return
    previous: dict[int, object] = {}
    for sig in INTERRUPT_SIGNALS:
        old = signal.getsignal(sig)
        if old in (signal.SIG_IGN, None):
            continue
        previous[sig] = old
        signal.signal(sig, guard.handler)
    caught: int | None = None
    try:
        yield guard
    except _Signalled as exc:
        caught = exc.signum
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)  # type: ignore[arg-type]
    if caught is not None:
        logger.info("signal %d while writing: the staged outputs were removed", caught)
        signal.raise_signal(caught)  # the caller's handling (the default action ends the process)
        raise KeyboardInterrupt  # a handler that returned: the write was still abandoned


def _check_names(target: Path, extra_files: Mapping[str, str | bytes]) -> None:
    taken = {target.name, target.name + ".data"}
    for name in extra_files:
        if not name or name in (".", "..") or Path(name).name != name or "\\" in name:
            raise OutputError(f"sidecar file name {name!r} must be a plain file name")
        if name in taken:
            raise OutputError(f"sidecar file name {name!r} collides with the model's files")


def _stage(stage: Path, name: str, model: onnx.ModelProto,
           extra_files: Mapping[str, str | bytes]) -> list[str]:
    """Write every file into ``stage``; returns the staged file names in commit order."""
    names = list(extra_files)
    for sidecar, content in extra_files.items():
        data = content.encode("utf-8") if isinstance(content, str) else bytes(content)
        _write_bytes(stage / sidecar, data)
    if fits_in_protobuf(model):
        _write_bytes(stage / name, model.SerializeToString())
    else:
        work = onnx.ModelProto()  # save_model moves tensor data out: never do that to the caller's
        work.CopyFrom(model)
        onnx.save_model(work, str(stage / name), save_as_external_data=True,
                        location=name + ".data", size_threshold=1024)
        names.append(name + ".data")
    return names + [name]  # the model last: a model file means the sidecars are there


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _commit(stage: Path, names: list[str], directory: Path) -> WriteResult:
    """Move staged files into ``directory``; on failure undo every move, restore backups."""
    placed: list[Path] = []
    backups: dict[Path, Path] = {}
    try:
        for name in names:
            final = directory / name
            if final.is_dir() or (final.exists() and not final.is_file()):
                raise IsADirectoryError(f"{final} appeared as a directory or special file while writing")
            if final.exists():
                backups[final] = stage / f"{name}.previous"
                os.replace(final, backups[final])
            os.replace(stage / name, final)
            placed.append(final)
    except BaseException:
        _undo(placed, backups)
        raise
    for backup in backups.values():
        backup.unlink(missing_ok=True)
    return WriteResult({p: p.stat().st_size for p in placed})


def _undo(placed: list[Path], backups: dict[Path, Path]) -> None:
    failed: list[str] = []
    for final in placed:
        try:
            final.unlink(missing_ok=True)
        except OSError:
            logger.error("could not remove the new %s", final)
    for final, backup in backups.items():
        try:
            os.replace(backup, final)
        except OSError:
            logger.error("could not restore %s: the previous file is kept at %s", final, backup)
            failed.append(f"{final} (previous version kept at {backup})")
    if failed:
        raise _RestoreFailed(f"could not restore {', '.join(failed)}")
