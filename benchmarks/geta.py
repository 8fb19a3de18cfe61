"""Benchmark: ``--strategy geta`` (explicit sparsity + bit range) against the gradient search at
the same size and uniform QAT at the same bit-width, on the bundled samples.

    .ci/env python benchmarks/geta.py                                  # digits + mnist1d, sparsity 0.3
    .ci/env python benchmarks/geta.py --tasks digits --sparsities 0.3,0.5 --out benchmarks/results/geta-cpu
    .ci/env python benchmarks/geta.py --quick                          # smoke run (2 + 1 epochs, 4 steps)

Per task: the FP32 original; for each sparsity one ``geta`` row (``--bits``, default 2-8), one
``gradient`` row with ``--target size=X%`` where X is that geta plan's size relative to the 8-bit
model, and one ``uniform`` row at the width most of the geta plan's weights use (activations 8 bit
everywhere). Same budget for all: ``--epochs`` search/QASSO + ``--finetune-epochs`` QAT, labels
(cross-entropy) from ``train.npz``. Accuracy: onnxruntime on the exported model over ``test.npz``
(never trained on). size: the size cost model (weight bytes); BOPs: the bops cost model
(MACs x b_w x b_a) relative to FP32 (32 x 32 bit-ops per MAC, 16 x the 8-bit figure); time:
wall seconds of the whole compress call. Prints a table and writes ``geta.json`` (the command,
the commit, library versions, every row) into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from provenance import commit, versions  # noqa: E402

from graph_passes.prepare import prepare_model  # noqa: E402
from plugin.api import CompressConfig, compress  # noqa: E402
from plugin.data import input_specs, load_dataset  # noqa: E402
from plugin.evaluate import evaluate  # noqa: E402


def _dominant_width(plan: Any) -> int:
    counts: Counter[int] = Counter()
    for layer in plan.layers.values():
        counts.update(b for b in layer.bits if b)
    return counts.most_common(1)[0][0]


def _row(label: str, task: str, result: Any, test: Any, wall: float) -> dict[str, Any]:
    rep = result.report
    after, before = rep["cost_after"], rep["cost_before_8bit"]
    plan = result.plan
    groups = [g for g in plan.groups.values()]
    return {
        "task": task, "name": label, "test_acc": evaluate(result.model, test, batch_size=512, progress=False).accuracy,
        "size_bytes": after["size"] / 8, "size_vs_w8": after["size"] / before["size"],
        "bops": after["bops"], "bops_vs_fp32": after["bops"] / (16 * before["bops"]),
        "file_bytes": rep["file"]["bytes"], "seconds": wall,
        "channels_removed": sum(len(g.pruned) for g in groups), "channels": sum(g.size for g in groups),
        "weight_bits": dict(sorted(Counter(b for layer in plan.layers.values() for b in layer.bits if b).items())),
        "geta": plan.metadata.get("geta"),
    }


def run_task(task: str, sparsities: list[float], bits: str, epochs: int, finetune: int, max_steps: int | None,
             seed: int, work: Path) -> list[dict[str, Any]]:
    folder = ROOT / "samples" / task
    model, train = str(folder / "model.onnx"), str(folder / "train.npz")
    prepared = prepare_model(model)
    test = load_dataset(str(folder / "test.npz"), input_specs(prepared.model))
    rows: list[dict[str, Any]] = [{"task": task, "name": "FP32 original", "bops_vs_fp32": 1.0,
                                   "test_acc": evaluate(model, test, batch_size=512, progress=False).accuracy}]
    common = dict(epochs=epochs, finetune_epochs=finetune, max_steps_per_epoch=max_steps, seed=seed, progress=False)
    done_uniform: set[int] = set()

    def run(label: str, config: CompressConfig) -> Any:
        out = work / f"{task}-{len(rows)}.onnx"
        start = time.perf_counter()
        result = compress(model, train, output=str(out), config=config)
        rows.append(_row(label, task, result, test, time.perf_counter() - start))
        r = rows[-1]
        print(f"  [{task}] {label}: {100 * r['test_acc']:.2f}%, {r['size_bytes']:,.0f} B, "
              f"BOPs {100 * r['bops_vs_fp32']:.2f}% of FP32, {r['seconds']:.0f} s", flush=True)
        return result

    for sparsity in sparsities:
        geta = run(f"geta sparsity={sparsity:g} bits={bits}",
                   CompressConfig(strategy="geta", strategy_options={"sparsity": sparsity, "bits": bits}, **common))
        ratio = rows[-1]["size_vs_w8"]
        run(f"gradient --target size={100 * ratio:.2f}%",
            CompressConfig(strategy="gradient", target=f"size={100 * ratio:.2f}%", act_bits=(8,), **common))
        width = _dominant_width(geta.plan)
        if width not in done_uniform:
            done_uniform.add(width)
            run(f"uniform W{width}A8", CompressConfig(strategy="uniform", weight_precisions=(width,), act_bits=(8,),
                                                      **common))
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| task | method | test acc | size | vs W8 | BOPs vs FP32 | removed | weight bits | time |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "size_bytes" not in r:
            lines.append(f"| {r['task']} | {r['name']} | {100 * r['test_acc']:.2f}% | - | - | 100% | - | 32 | - |")
            continue
        bits = " ".join(f"{b}b:{n}" for b, n in r["weight_bits"].items())
        lines.append(f"| {r['task']} | {r['name']} | {100 * r['test_acc']:.2f}% | {r['size_bytes']:,.0f} B | "
                     f"{r['size_vs_w8']:.3f} | {100 * r['bops_vs_fp32']:.2f}% | {r['channels_removed']}/{r['channels']} | "
                     f"{bits} | {r['seconds']:.0f} s |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default="digits,mnist1d")
    parser.add_argument("--sparsities", default="0.3")
    parser.add_argument("--bits", default="2-8")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--finetune-epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="2 + 1 epochs of 4 steps: a smoke run")
    parser.add_argument("--out", default=None, help="folder for geta.json and geta.md [default: print only]")
    args = parser.parse_args()
    epochs, finetune, max_steps = (2, 1, 4) if args.quick else (args.epochs, args.finetune_epochs, None)
    sparsities = [float(s) for s in args.sparsities.split(",")]
    rows: list[dict[str, Any]] = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as work:
        for task in args.tasks.split(","):
            rows += run_task(task.strip(), sparsities, args.bits, epochs, finetune, max_steps, args.seed, Path(work))
    text = table(rows)
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        record = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "commit": commit(),
                  "versions": versions(), "seconds": time.perf_counter() - start,
                  "settings": {"epochs": epochs, "finetune_epochs": finetune, "max_steps_per_epoch": max_steps,
                               "seed": args.seed, "bits": args.bits, "sparsities": sparsities},
                  "rows": rows}
        (out / "geta.json").write_text(json.dumps(record, indent=2, default=str))
        (out / "geta.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
