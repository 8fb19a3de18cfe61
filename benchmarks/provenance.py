"""What a benchmark result records about how it was made: the commit and the library versions."""

from __future__ import annotations

import importlib
import platform
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def commit() -> str:
    """HEAD, marked when the library's sources have uncommitted changes; "unknown" outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "plugin", "graph_passes", "cost_models"],
                               cwd=ROOT, capture_output=True, text=True).stdout.strip()
        return head.stdout.strip() + (" (+ uncommitted changes in the library)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def versions(*extra: str) -> dict[str, str]:
    """Python, torch, onnx, onnxruntime and numpy versions, plus those of the ``extra`` modules."""
    out = {"python": platform.python_version()}
    for name in ("torch", "onnx", "onnxruntime", "numpy", *extra):
        out[name] = importlib.import_module(name).__version__
    return out
