"""All-or-nothing writing of the exported model and its sidecar files (plan.json, report.json).

Everything is first staged in a hidden temporary directory *inside* the output directory (so
the final moves are same-filesystem ``os.replace`` renames), then moved into place. Files that
already exist at a target are moved aside first and put back if anything fails; on any
failure, KeyboardInterrupt included, the staging directory is removed, so nothing new is left
behind. A model too large for one protobuf message (> 2 GiB) is written with its tensors in
``<name>.data`` next to it.

Call :func:`check_output_path` up front (the CLI does, before any search or fine-tuning), so a
bad output location fails in a second, not after an hour of work.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
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


def check_output_path(path: str | os.PathLike) -> Path:
    """The output path, resolved; OutputError (one line) when it cannot be written."""
    out = Path(path).expanduser()
    if out.is_dir():
        raise OutputError(f"output path {str(out)!r} is a directory; give a file name such as "
                          f"{str(out / 'model.pq.onnx')!r}")
    parent = out.parent.resolve() if str(out.parent) else Path.cwd()
    if not parent.exists():
        raise OutputError(f"output directory {str(parent)!r} does not exist; create it first")
    if not parent.is_dir():
        raise OutputError(f"{str(parent)!r} is not a directory; cannot write {out.name!r} there")
    try:  # os.access lies for root and for read-only mounts: try for real
        fd, probe = tempfile.mkstemp(prefix=f".{out.name}.probe-", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputError(f"cannot write to output directory {str(parent)!r}: "
                          f"{exc.strerror or exc}; choose a writable location") from exc
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
    stage = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        staged = _stage(stage, target.name, model, extra_files)
        result = _commit(stage, staged, target.parent)
    except OSError as exc:
        raise OutputError(f"writing {str(target)!r} failed, nothing was written: "
                          f"{exc.strerror or exc}") from exc
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    logger.info("wrote %s", ", ".join(f"{p.name} ({n} bytes)" for p, n in result.files.items()))
    return result


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
    for final in placed:
        final.unlink(missing_ok=True)
    for final, backup in backups.items():
        try:
            os.replace(backup, final)
        except OSError:
            logger.error("could not restore %s from %s", final, backup)
