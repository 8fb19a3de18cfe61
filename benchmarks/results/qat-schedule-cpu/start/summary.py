"""The start-width screen's table (README "The QAT learning-rate schedule"): per task and budget,
test accuracy mean +- sd over seeds 0-2 for the budget recipe (start=4), start=default and
start=budget, all with cosine QAT; read from the pareto.json files of this folder's run.sh and of
qat-schedule-cpu's cosine runs (run.sh, more.sh, digits12/run.sh).

    python benchmarks/results/qat-schedule-cpu/start/summary.py > benchmarks/results/qat-schedule-cpu/start/summary.md
"""

from __future__ import annotations

import json
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
TOP = HERE.parent
TASKS = ("digits", "mnist1d", "shapes32")
VARIANTS = ("recipe", "start-default", "start-budget")


def sources() -> dict[tuple[str, str], list[Path]]:
    """(task, variant) -> the folders holding its runs."""
    out: dict[tuple[str, str], list[Path]] = {}
    for task in TASKS:
        out[(task, "recipe")] = [TOP / f"{task}-cosine", TOP / f"more-{task}-cosine", HERE / f"{task}-recipe"]
        for v in VARIANTS[1:]:
            out[(task, v)] = [HERE / f"{task}-{v}"]
    out[("digits", "recipe")].append(TOP / "digits12" / "recipe")
    for v in VARIANTS[1:]:
        out[("digits", v)].append(TOP / "digits12" / v)
    return out


def main() -> None:
    table: dict[tuple[str, str, float], dict] = {}
    used = []
    for (task, variant), folders in sources().items():
        for folder in folders:
            if not (folder / "pareto.json").is_file():
                continue
            data = json.loads((folder / "pareto.json").read_text())
            used.append(f"- `{folder.relative_to(TOP)}`: commit {data['meta'].get('commit')}, `{data['meta'].get('command')}`")
            for e in data["experiments"]:
                for c in e["seed_summary"]["configs"]:
                    m = re.match(r"gradient size=([\d.]+)%", c["config"])
                    if m:
                        table[(task, variant, float(m.group(1)))] = c
    fmt = lambda c: f"{c['test_acc_mean']:.2f} +- {c['test_acc_sd'] or 0:.2f} ({c['size_vs_w8_mean']:.3f})" if c else "-"  # noqa: E731
    print("Cosine QAT, 12 search + 6 QAT epochs, seeds 0-2: test accuracy mean +- sd (size x W8A8)\n")
    print("| task | budget | recipe (start=4) | start=default | start=budget | default - recipe |")
    print("|---|---|---|---|---|---|")
    for task in TASKS:
        for budget in sorted({b for (t, _, b) in table if t == task}, reverse=True):
            cells = [table.get((task, v, budget)) for v in VARIANTS]
            diff = f"{cells[1]['test_acc_mean'] - cells[0]['test_acc_mean']:+.2f}" if cells[0] and cells[1] else "-"
            print(f"| {task} | {budget:g}% | " + " | ".join(fmt(c) for c in cells) + f" | {diff} |")
    print("\nSources:\n")
    print("\n".join(sorted(used)))


if __name__ == "__main__":
    main()
