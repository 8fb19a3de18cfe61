"""The budget-settle screen's table (README "The gradient strategy's budget recipe"): test accuracy
mean +- sd over seeds 0-2 and size x W8A8, per task and budget, for discretisation=expected alone
("expected") and the budget recipe ("budget": expected + settle + start=4 + Adam logit steps),
with the uniform baselines; read from the pareto.json files run.sh and more.sh wrote.

    python benchmarks/results/budget-settle-cpu/summary.py > benchmarks/results/budget-settle-cpu/summary.md
"""

from __future__ import annotations

import json
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
TASKS = ("digits", "mnist1d", "shapes32")


def configs(folder: Path) -> dict[str, dict]:
    data = json.loads((folder / "pareto.json").read_text())
    return {c["config"]: {**c, "commit": data["meta"].get("commit"), "command": data["meta"].get("command")}
            for e in data["experiments"] for c in e["seed_summary"]["configs"]}


def main() -> None:
    lines = ["| task | budget | expected: acc (sd), x W8 | budget recipe: acc (sd), x W8 | difference |",
             "|---|---|---|---|---|"]
    base_lines = ["| task | FP32 | W8A8 QAT | ORT int8 | W2A8 QAT |", "|---|---|---|---|---|"]
    sources = []
    for task in TASKS:
        got: dict[str, dict[str, dict]] = {"expected": {}, "settle": {}}
        for folder in sorted(HERE.glob(f"{task}-*")):
            if not (folder / "pareto.json").is_file():
                continue
            kind = "settle" if "-settle" in folder.name else "expected"
            found = configs(folder)
            got[kind].update(found)
            sources.append(f"- `{folder.name}`: commit {next(iter(found.values()))['commit']}, "
                           f"`{next(iter(found.values()))['command']}`")
        b = got["expected"]
        fmt = lambda c: f"{c['test_acc_mean']:.2f} +- {c['test_acc_sd'] or 0:.2f}" if c else "-"  # noqa: E731
        base_lines.append(f"| {task} | {fmt(b.get('FP32 original'))} | {fmt(b.get('W8A8 QAT'))} | "
                          f"{fmt(b.get('ORT quantize_static int8'))} | {fmt(b.get('W2A8 QAT'))} |")
        budgets = sorted({k for k in got["settle"] if k.startswith("gradient size=")},
                         key=lambda k: -float(re.search(r"=([\d.]+)%", k).group(1)))
        for key in budgets:
            e, s = got["expected"].get(key), got["settle"].get(key)
            diff = f"{s['test_acc_mean'] - e['test_acc_mean']:+.2f}" if e and s else "-"
            cell = lambda c: f"{fmt(c)}, {c['size_vs_w8_mean']:.3f}" if c else "-"  # noqa: E731
            lines.append(f"| {task} | {key.split('=')[1]} | {cell(e)} | {cell(s)} | {diff} |")
    print("Baselines (test accuracy %, mean +- sd over seeds 0-2):\n")
    print("\n".join(base_lines))
    print("\nThe gradient strategy at each budget (12 search + 6 QAT epochs, seeds 0-2):\n")
    print("\n".join(lines))
    print("\nSources:\n")
    print("\n".join(sources))


if __name__ == "__main__":
    main()
