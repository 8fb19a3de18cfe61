"""Joint vs sequential at equal budgets (README "Joint vs sequential at equal budgets"): per task,
test accuracy mean +- sd over seeds, size x W8A8, the mean training seconds (search + QAT of every
stage) and job wall seconds, and each joint configuration's time over the sequential pipeline's;
read from the pareto.json files run.sh wrote.

    python benchmarks/results/joint-vs-sequential-cpu/summary.py > benchmarks/results/joint-vs-sequential-cpu/summary.md
    python benchmarks/results/joint-vs-sequential-cpu/summary.py FOLDER > FOLDER/summary.md   (e.g. stop26)

The joint rows may be at another budget than the sequential rows (stop26: at most the size the
sequential pipeline reached); each row names its own budget.
"""

from __future__ import annotations

import json
import re
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
TASKS = ("digits", "mnist1d", "shapes32")


def rows(folder: Path) -> tuple[list[dict], dict]:
    data = json.loads((folder / "pareto.json").read_text())
    return [r for e in data["experiments"] for r in e["rows"]], data["meta"]


def _span(seeds: list[int]) -> str:
    if seeds and seeds == list(range(seeds[0], seeds[-1] + 1)) and len(seeds) > 2:
        return f"{seeds[0]}-{seeds[-1]}"
    return ", ".join(map(str, seeds))


def main(here: Path = HERE) -> None:
    out = ["| task | budget | pipeline (search + QAT epochs) | test acc (sd) | x W8 | train s | job wall s "
           "| train time / sequential's | per seed: acc - sequential's |", "|---|---|---|---|---|---|---|---|---|"]
    sources, seeds = [], set()
    for task in TASKS:
        groups: dict[str, dict[int, dict]] = {}
        for folder in sorted(here.glob(f"{task}-*")):
            if not (folder / "pareto.json").is_file():
                continue
            found, meta = rows(folder)
            sources.append(f"- `{folder.name}`: commit {meta.get('commit')}, `{meta.get('command')}`")
            epochs = folder.name.split("-", 1)[1].replace("-", " + ")
            for r in found:
                label = re.sub(r" s\d+$", "", r["label"])
                budget = label.split("=", 1)[-1]
                name = f"{label.split()[0]} ({'12 + 6 per stage' if label.startswith('sequential') else epochs})"
                groups.setdefault(f"{name} {budget}", {})[int(r["seed"])] = {**r, "budget": budget, "name": name}
        seeds.update(s for g in groups.values() for s in g)
        seq = next((g for k, g in groups.items() if k.startswith("sequential")), None)
        seq_t = statistics.mean(r["train_s"] for r in seq.values()) if seq else None
        for name in sorted(groups, key=lambda k: (not k.startswith("sequential"), k)):
            g = groups[name]
            acc = [100 * r["test_acc"] for r in g.values()]
            train = statistics.mean(r["train_s"] for r in g.values())
            wall = statistics.mean(r["wall_s"] for r in g.values())
            size = statistics.mean(r["size_vs_w8"] for r in g.values())
            ratio = f"{train / seq_t:.2f}" if seq_t and not name.startswith("sequential") else "-"
            per = " ".join(f"{100 * (g[s]['test_acc'] - seq[s]['test_acc']):+.2f}" for s in sorted(g) if s in seq) \
                if seq and not name.startswith("sequential") else "-"
            sd = statistics.stdev(acc) if len(acc) > 1 else 0.0
            first = next(iter(g.values()))
            out.append(f"| {task} | {first['budget']} | {first['name']} | {statistics.mean(acc):.2f} +- {sd:.2f} "
                       f"| {size:.3f} | {train:.1f} | {wall:.1f} | {ratio} | {per} |")
    print("Joint (gradient strategy, budget recipe) vs the sequential pipeline at the budget each row names, one job "
          f"at a time, seeds {_span(sorted(seeds))} (train s: search + QAT of every stage, mean over seeds):\n")
    print("\n".join(out))
    print("\nSources:\n")
    print("\n".join(sources))


if __name__ == "__main__":
    main(Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else HERE)
