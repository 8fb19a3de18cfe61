"""Per-model report over the test corpus: channel groups, prunable share, blocked reasons,
normalisation parity and (optionally) torch-bridge parity. Prints a markdown table.

    .ci/env python benchmarks/corpus_report.py [--bridge] [--only NAME ...] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from plugin.inspect_cmd import _bridge_summary, prepare_model  # noqa: E402
from tests import corpus  # noqa: E402


def _main_reason(analysis) -> str:
    reasons = Counter()
    for g in analysis.groups:
        if not g.prunable and g.reasons:
            reason = g.reasons[0].split(": ", 1)[-1]
            reasons[reason if "graph output" not in reason else "reaches the graph output"] += 1
    return "; ".join(f"{r} ({n})" for r, n in reasons.most_common(2))


def report(name: str, bridge: bool) -> dict:
    entry = corpus.get_model(name)
    start = time.perf_counter()
    prepared = prepare_model(str(entry.path))
    a = prepared.analysis
    row = {
        "model": name,
        "opset": entry.opset,
        "nodes": len(prepared.model.graph.node),
        "weight_layers": len(a.layers),
        "groups": len(a.groups),
        "prunable_groups": len(a.prunable_groups),
        "prunable_share": a.prunable_share,
        "conv_prunable_share": a.conv_prunable_share(),
        "normalise_rel_error": prepared.normalised.max_rel_error,
        "blocked_by": _main_reason(a),
        "unknown_ops": a.unknown_ops,
        "seconds": time.perf_counter() - start,
    }
    if bridge:
        row["bridge"] = _bridge_summary(prepared.model)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bridge", action="store_true", help="also convert to torch and check parity")
    parser.add_argument("--only", nargs="*", help="corpus model names (default: all)")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args()
    names = args.only or corpus.CORPUS_NAMES
    header = "| model | opset | weight layers | groups (prunable) | prunable share | conv share | norm. error |"
    if args.bridge:
        header += " bridge parity |"
    header += " main blocking reason |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    rows = []
    for name in names:
        row = report(name, args.bridge)
        rows.append(row)
        cells = [row["model"], row["opset"], row["weight_layers"], f"{row['groups']} ({row['prunable_groups']})",
                 f"{100 * row['prunable_share']:.1f}%", f"{100 * row['conv_prunable_share']:.1f}%",
                 f"{row['normalise_rel_error']:.1e}"]
        if args.bridge:
            b = row["bridge"]
            cells.append(f"{b['max_rel_error']:.1e}" if b.get("ok") else "FAIL: " + b["error"][:60])
        cells.append(row["blocked_by"] or "-")
        print("| " + " | ".join(str(c) for c in cells) + " |", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2, default=str))


if __name__ == "__main__":
    main()
