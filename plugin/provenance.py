"""How a result was made: the prunequant version, the source commit when known, the library
versions, the command line and the input model's hash (used by :mod:`plugin.sweep` and the
benchmarks, so both record the same)."""

from __future__ import annotations

import hashlib
import importlib
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

#: the source tree holding ``plugin/`` (a git checkout when prunequant runs from source)
ROOT = Path(__file__).resolve().parents[1]
#: the library's source folders: uncommitted changes there mark the commit
LIBRARY_DIRS = ("plugin", "graph_passes", "cost_models")


def commit() -> str:
    """HEAD of the source checkout, marked when the library's sources have uncommitted changes;
    "unknown" for an installed package or without git."""
    if not (ROOT / ".git").exists():
        return "unknown"
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True, timeout=30)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", *LIBRARY_DIRS], cwd=ROOT,
                               capture_output=True, text=True, timeout=30).stdout.strip()
        return head.stdout.strip() + (" (+ uncommitted changes in the library)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def prunequant_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("prunequant")
    except PackageNotFoundError:  # pragma: no cover - a source tree that is not installed
        return "unknown"


def versions(*extra: str) -> dict[str, str]:
    """Python, torch, onnx, onnxruntime and numpy versions, plus those of the ``extra`` modules."""
    out = {"python": platform.python_version()}
    for name in ("torch", "onnx", "onnxruntime", "numpy", *extra):
        out[name] = str(getattr(importlib.import_module(name), "__version__", "unknown"))
    return out


def command_line(argv: list[str] | None = None) -> str:
    """The command line as a shell would take it (``sys.argv`` by default)."""
    args = list(sys.argv if argv is None else argv)
    if args:
        args[0] = os.path.basename(args[0])
    return " ".join(shlex.quote(a) for a in args)


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes (the input model's hash)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


__all__ = ["command_line", "commit", "file_sha256", "prunequant_version", "versions"]
