"""Benchmark: ``--strategy bayesian`` on the bundled samples.

    .ci/env python benchmarks/bayesian.py --out benchmarks/results/bayesian-cpu            # all three parts
    .ci/env python benchmarks/bayesian.py --parts criterion --tasks digits                  # one part
    .ci/env python benchmarks/bayesian.py --quick                                           # smoke run

Parts:

* ``criterion``: the channel criterion and the evaluator's bias correction, without training. For
  weight widths 8/4/2 and the same keep ratios (uniform 0.9, 0.75, 0.6 and 5 random per-group
  vectors, seeded), the accuracy on ``test.npz`` of the uniformly quantized, pruned model after the
  evaluator's recalibration, with channels kept by ``ql1`` (integer-domain L1 x scale) or ``l1``
  (float L1), each with and without bias correction.
* ``samplers``: best feasible held-out score of the study after N trials for tpe / gp / random at one
  budget (no QAT; the strategy's search alone).
* ``iso``: does BO prune >= 25% of a uniformly quantized model's size at iso-accuracy? Uniform
  W{b}A8 QAT (``--strategy uniform``) against ``--strategy bayesian -S bits=b`` at budgets of 75%
  and 60% of the W{b} size; same training budget (``--epochs`` + ``--finetune-epochs``: the bayesian
  search trains nothing, so its QAT gets both); accuracy: onnxruntime on the exported model over
  ``test.npz``. Iso-accuracy: within 0.5 points of the uniform model.

Prints tables and writes ``bayesian.json`` (command, commit, versions, every row) into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from provenance import commit, versions  # noqa: E402

from graph_passes.digest import model_digest  # noqa: E402
from graph_passes.prepare import prepare_model  # noqa: E402
from plugin.api import CompressConfig, compress  # noqa: E402
from plugin.data import input_specs, load_dataset  # noqa: E402
from plugin.evaluate import evaluate  # noqa: E402
from plugin.space import Precisions, SearchSpace  # noqa: E402
from plugin.strategies.problem import Problem, RunSettings  # noqa: E402


def _problem(task: str, held_out: str = "test", target: str | None = "size=50%", weight_bits: str = "0,2,4,8") -> Problem:
    sample = ROOT / "samples" / task
    prepared = prepare_model(str(sample / "model.onnx"))
    precisions = Precisions.parse(weight_bits, "8")
    space = SearchSpace(prepared.analysis, precisions, model_sha256=model_digest(prepared.original))
    train_all = load_dataset(str(sample / "train.npz"), input_specs(prepared.model))
    train, held = train_all.split(0.2, seed=0)
    if held_out == "test":
        held = load_dataset(str(sample / "test.npz"), input_specs(prepared.model))
    settings = RunSettings(precisions, target=target, progress=False, task_loss="cross_entropy")
    return Problem(prepared, space, train, held, settings)


def part_criterion(task: str, quick: bool) -> list[dict[str, Any]]:
    import torch

    from plugin.evaluator import CandidateEvaluator, EvaluatorConfig, channel_scores
    from plugin.importance import keep_indices

    torch.set_num_threads(1)
    problem = _problem(task)
    space = problem.space
    engine = problem.fake_quant()
    rng = np.random.default_rng(0)
    vectors = [("uniform", {g: r for g in space.prunable_groups}) for r in (0.9, 0.75, 0.6)]
    vectors += [(f"random {i}", {g: float(rng.choice(np.arange(0.4, 1.0001, 0.05))) for g in space.prunable_groups})
                for i in range(2 if quick else 5)]
    evaluators = {bc: CandidateEvaluator(problem, EvaluatorConfig(bias_correction=bc), engine=engine)
                  for bc in (True, False)}
    rows = []
    for bits in (8, 4, 2):
        scores = {c: channel_scores(space, c, bits) for c in ("ql1", "l1")}
        for label, ratios in vectors:
            row: dict[str, Any] = {"task": task, "bits": bits, "ratios": label,
                                   "keep": {g: round(r, 2) for g, r in ratios.items()}}
            for criterion in ("ql1", "l1"):
                kept = {g: keep_indices(scores[criterion][g], r) for g, r in ratios.items()}
                plan = space.plan(kept=kept, layer_bits={n: bits for n in space.layers}, site_bits=8)
                for bc, ev in evaluators.items():
                    row[f"{criterion}{'' if bc else '_nobc'}"] = ev.evaluate(plan).score
                row["size"] = plan.cost_after["size"] / plan.cost_before["size"]
            rows.append(row)
            print(f"{task} W{bits} {label:9s} size {row['size']:.3f}: ql1 {row['ql1']:.4f} l1 {row['l1']:.4f} | "
                  f"no bias correction: ql1 {row['ql1_nobc']:.4f} l1 {row['l1_nobc']:.4f}", flush=True)
    return rows


def part_samplers(task: str, trials: int, quick: bool) -> list[dict[str, Any]]:
    from plugin.strategies.bayesian import BayesianStrategy
    from plugin.strategies.base import resolve_options

    rows = []
    for sampler in ("tpe", "gp", "random"):
        problem = _problem(task, held_out="split", target="size=10%")
        options = resolve_options(BayesianStrategy, {"trials": trials, "sampler": sampler, "bits": 4})
        start = time.perf_counter()
        result = BayesianStrategy().search(problem, options)
        wall = time.perf_counter() - start
        scored = [h for h in result.history if h.get("kind") == "trial"]
        feasible = [h for h in scored if h["feasible"] and h["score"] is not None]
        best = max(feasible, key=lambda h: h["score"])
        row = {"task": task, "sampler": sampler, "trials": trials, "budget": "size=10% (0.2 of the W4 size)",
               "best_score": best["score"], "best_trial": best["trial"], "feasible_trials": len(feasible),
               "seconds": round(wall, 1)}
        rows.append(row)
        print(f"{task} {sampler:6s}: best held-out {row['best_score']:.4f} at trial {row['best_trial']}, "
              f"{row['feasible_trials']}/{trials} feasible, {wall:.1f} s", flush=True)
    return rows


def part_iso(task: str, bits: int, epochs: int, finetune: int, trials: int, fractions: list[float],
             out: Path) -> list[dict[str, Any]]:
    sample = ROOT / "samples" / task
    model, train = str(sample / "model.onnx"), str(sample / "train.npz")
    test = load_dataset(str(sample / "test.npz"), input_specs(prepare_model(model).model))
    rows = []

    def run(label: str, config: CompressConfig, name: str) -> dict[str, Any]:
        start = time.perf_counter()
        result = compress(model, train, output=str(out / f"{task}_{name}.onnx"), config=config)
        wall = time.perf_counter() - start
        acc = evaluate(result.model, test, batch_size=512, progress=False).accuracy
        size = result.report["cost_after"]["size"] / result.report["cost_before_8bit"]["size"]
        row = {"task": task, "name": label, "test_acc": acc, "size_vs_w8": size, "size_bytes": result.report[
            "cost_after"]["size"] / 8, "seconds": round(wall, 1), "pruned_channels": sum(
            result.report["groups_pruned"].values())}
        rows.append(row)
        print(f"{task} {label:34s} test {acc:.4f}  size {size:.3f} of W8  {wall:.0f} s", flush=True)
        return row

    base = dict(epochs=epochs, finetune_epochs=finetune, progress=False)
    uniform = run(f"uniform W{bits}A8 QAT", CompressConfig(strategy="uniform", weight_precisions=(bits,),
                                                           act_bits=(8,), **base), f"uniform{bits}")
    for fraction in fractions:
        target = f"size={100 * fraction * bits / 8:g}%"
        row = run(f"bayesian W{bits}, {target} ({fraction:.0%} of W{bits})",
                  CompressConfig(strategy="bayesian", target=target, weight_precisions=(0, bits), act_bits=(8,),
                                 strategy_options={"trials": trials}, **base), f"bayes{bits}_{int(fraction * 100)}")
        row["pruned_vs_uniform"] = 1 - row["size_vs_w8"] / uniform["size_vs_w8"]
        row["iso_accuracy"] = row["test_acc"] >= uniform["test_acc"] - 0.005
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", default="digits,mnist1d")
    parser.add_argument("--parts", default="criterion,samplers,iso")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--finetune-epochs", type=int, default=10)
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--fractions", default="0.75,0.6")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.quick:
        args.epochs, args.finetune_epochs, args.trials = 1, 1, 6
    out = Path(args.out) if args.out else Path(tempfile_dir())
    out.mkdir(parents=True, exist_ok=True)
    parts = args.parts.split(",")
    results: dict[str, Any] = {"command": " ".join(sys.argv), "commit": commit(), "versions": versions('optuna')}
    for task in args.tasks.split(","):
        if "criterion" in parts:
            results.setdefault("criterion", []).extend(part_criterion(task, args.quick))
        if "samplers" in parts:
            results.setdefault("samplers", []).extend(part_samplers(task, args.trials, args.quick))
        if "iso" in parts:
            results.setdefault("iso", []).extend(part_iso(task, args.bits, args.epochs, args.finetune_epochs,
                                                          args.trials, [float(f) for f in args.fractions.split(",")],
                                                          out))
    path = out / "bayesian.json"
    if path.exists():  # parts run separately accumulate in one file
        previous = json.loads(path.read_text())
        for key in ("criterion", "samplers", "iso"):
            if key in results:
                previous.setdefault("runs", {})[key] = {"command": results["command"], "commit": results["commit"]}
                previous[key] = [r for r in previous.get(key, []) if r.get("task") not in args.tasks.split(",")] \
                    + results[key]
        previous["versions"] = results["versions"]
        results = previous
    path.write_text(json.dumps(results, indent=2, default=str))
    print(f"wrote {path}")


def tempfile_dir() -> str:
    import tempfile

    return tempfile.mkdtemp(prefix="bayesian-bench-")


if __name__ == "__main__":
    main()
