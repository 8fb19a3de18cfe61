"""What a benchmark result records about how it was made: the commit and the library versions.

The library's own helpers (``plugin/provenance.py``, also used by ``prunequant sweep``), so a
benchmark's results and a sweep's carry the same provenance."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from plugin.provenance import command_line, commit, file_sha256, prunequant_version, versions  # noqa: E402

__all__ = ["command_line", "commit", "file_sha256", "prunequant_version", "versions", "write_results"]


def write_results(out: Path, label: str, record: dict, text: str) -> None:
    """``out/results[-label].json`` (the record) and ``.md`` (the printed table and the commit)."""
    out.mkdir(parents=True, exist_ok=True)
    suffix = f"-{label}" if label else ""
    (out / f"results{suffix}.json").write_text(json.dumps(record, indent=2, default=str))
    (out / f"results{suffix}.md").write_text(text + f"\n\ncommit {record['commit']}\n")
