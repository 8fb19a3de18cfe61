"""Table of the run.py JSON files in a folder: sample, row, seed, logit_steps -> test acc, size
ratio to W8, heads (transformer), kept group channels, weight bits.

    python benchmarks/results/logit-steps-cpu/summarise.py FOLDER
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

folder = Path(sys.argv[1])
rows = []
for path in sorted(folder.glob("*.json")):
    match = re.match(r"(\w+?)_(sgd_per_cost|sgd|adam)_s(\d+)\.json", path.name)
    if not match:
        continue
    sample, steps, seed = match.groups()
    for result in json.loads(path.read_text()):
        for row in result["rows"]:
            if row["name"] == "FP32 original":
                continue
            if "error" in row:
                rows.append((sample, row["name"], steps, seed, "FAILED " + row["error"][:60]))
                continue
            plan = row["plan"]
            heads = "+".join(str(h) for h in row["heads"]) if "heads" in row else ""
            rows.append((sample, row["name"], steps, seed,
                         f"{100 * row['test_acc']:.2f}% | {row['size_bytes']:,.0f} B | "
                         f"{row['size_bytes'] / row['size_8bit_bytes']:.3f} | {heads} | "
                         f"{plan['group_channels_kept']}/{plan['group_channels_total']} | "
                         + " ".join(f"{b}b:{n}" for b, n in plan["weight_bits"].items())
                         + f" | {row.get('search_epochs_run')}+{row.get('finetune_epochs_run')}"))
print("| sample | row | logit_steps | seed | test acc | size | vs W8 | heads | group ch kept | weight bits | epochs |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
for r in sorted(rows):
    print("| " + " | ".join(r) + " |")
