"""What a benchmark result records about how it was made: the commit and the library versions.

The library's own helpers (``plugin/provenance.py``, also used by ``prunequant sweep``), so a
benchmark's results and a sweep's carry the same provenance."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from plugin.provenance import command_line, commit, file_sha256, prunequant_version, versions  # noqa: E402

__all__ = ["command_line", "commit", "file_sha256", "prunequant_version", "versions"]
