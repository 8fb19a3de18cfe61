"""The QAT-schedule A/B table (README "The QAT learning-rate schedule"): test accuracy mean +- sd
over seeds 0-2 per task and configuration with the constant QAT rate and with the cosine
schedule, the per-seed differences and the baselines; read from the pareto.json files run.sh wrote.

    python benchmarks/results/qat-schedule-cpu/summary.py > benchmarks/results/qat-schedule-cpu/summary.md
"""

from __future__ import annotations

import json
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
TASKS = ("digits", "mnist1d", "shapes32")
KINDS = ("constant", "cosine")


def load(folder: Path) -> tuple[dict[str, dict], dict[str, dict[int, float]], dict]:
    """(config -> seed summary, config -> seed -> test accuracy %, the run's meta)."""
    data = json.loads((folder / "pareto.json").read_text())
    summary = {c["config"]: c for e in data["experiments"] for c in e["seed_summary"]["configs"]}
    per_seed: dict[str, dict[int, float]] = {}
    for e in data["experiments"]:
        for row in e["rows"]:
            label = re.sub(r" s\d+$", "", row["label"])
            if row.get("seed") is not None and row.get("test_acc") is not None:
                per_seed.setdefault(label, {})[int(row["seed"])] = 100 * float(row["test_acc"])
    return summary, per_seed, data["meta"]


def main() -> None:
    fmt = lambda c: f"{c['test_acc_mean']:.2f} +- {c['test_acc_sd'] or 0:.2f}" if c else "-"  # noqa: E731
    lines = ["| task | configuration | constant: acc (sd), x W8 | cosine: acc (sd), x W8 | difference | per seed |",
             "|---|---|---|---|---|---|"]
    base = ["| task | FP32 | ORT int8 |", "|---|---|---|"]
    sources = []
    for task in TASKS:
        got = {}
        for kind in KINDS:
            folder = HERE / f"{task}-{kind}"
            if (folder / "pareto.json").is_file():
                got[kind] = load(folder)
                meta = got[kind][2]
                sources.append(f"- `{folder.name}`: commit {meta.get('commit')}, `{meta.get('command')}`")
        if len(got) < 2:
            continue
        (c_sum, c_seed, _), (k_sum, k_seed, _) = got["constant"], got["cosine"]
        base.append(f"| {task} | {fmt(c_sum.get('FP32 original'))} | {fmt(c_sum.get('ORT quantize_static int8'))} |")
        for key in [k for k in k_sum if k in c_sum]:
            c, k = c_sum[key], k_sum[key]
            seeds = sorted(set(c_seed.get(key, {})) & set(k_seed.get(key, {})))
            per = " ".join(f"{k_seed[key][s] - c_seed[key][s]:+.2f}" for s in seeds)
            cell = lambda x: f"{fmt(x)}, {x['size_vs_w8_mean']:.3f}"  # noqa: E731
            lines.append(f"| {task} | {key} | {cell(c)} | {cell(k)} | "
                         f"{k['test_acc_mean'] - c['test_acc_mean']:+.2f} | {per} |")
    print("Baselines (test accuracy %, mean +- sd over seeds 0-2):\n")
    print("\n".join(base))
    print("\nQAT with the constant rate vs the cosine schedule (12 search + 6 QAT epochs, seeds 0-2; "
          "per seed: cosine minus constant, points):\n")
    print("\n".join(lines))
    print("\nSources:\n")
    print("\n".join(sources))


if __name__ == "__main__":
    main()
