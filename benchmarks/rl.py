"""Benchmark: ``--strategy rl`` on the bundled samples (digits, MNIST-1D).

    .ci/env python benchmarks/rl.py --out benchmarks/results/rl-cpu-granularity
    .ci/env python benchmarks/rl.py --tasks digits --episodes 40        # a shorter run
    .ci/env python benchmarks/rl.py --granularity coarse --energy mpic_energy   # the first slice's setting

Per task: ``prunequant compress --strategy rl`` (the Python API, the same code path) with the
search on the held-out split of ``train.npz`` (selection) and the shared QAT after it
(``--epochs`` + ``--finetune-epochs`` epochs; the search trains nothing). Reported:

* the energy of the chosen plan relative to the all-8-bit model (the baseline "before" of every
  cost, as in the first, coarse-only slice; the FP32 original has no cost on these integer models),
  under both energy models: ``horowitz_energy`` (zero-skipping accelerator, the agent's default
  objective ``--energy``) and ``mpic_energy`` (MPIC, skips no zero weight),
* per ``--granularity`` (comma-separated: ``both``, ``coarse``, ``fine``) one run, so what
  fine-grained pruning adds shows against coarse-only at the same seed and episodes,
* the size model's bits (sparse encoding) apart from the exported file's bytes (which store the
  zeros densely) and the exact zero integers in the file,
* the accuracy loss before QAT, on ``test.npz``: the chosen plan applied without training by the
  shared evaluator (clips recalibrated, biases corrected), against the FP32 original on the same
  test samples; and the loss the search itself saw on its held-out split,
* the accuracy loss after QAT: onnxruntime on the exported model over ``test.npz``,
* whether the issue's target (>= 39% less energy at <= 1.7 points loss, without retraining) is met.

Writes ``rl.json`` (command, commit, versions, every row) into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
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


def _test_loss_without_training(task: str, decision: dict[str, Any], options: dict[str, Any]) -> dict[str, float]:
    """The chosen decision applied by the shared evaluator (no training), scored on test.npz."""
    from plugin.evaluator import CandidateEvaluator, EvaluatorConfig, channel_scores
    from plugin.strategies.rl import Decision, Walk

    sample = ROOT / "samples" / task
    prepared = prepare_model(str(sample / "model.onnx"))
    precisions = Precisions()
    space = SearchSpace(prepared.analysis, precisions, model_sha256=model_digest(prepared.original))
    train_all = load_dataset(str(sample / "train.npz"), input_specs(prepared.model))
    train, _held = train_all.split(0.2, seed=0)  # the same split as compress: the same calibration samples
    test = load_dataset(str(sample / "test.npz"), input_specs(prepared.model))
    problem = Problem(prepared, space, train, test, RunSettings(precisions, progress=False,
                                                                task_loss="cross_entropy"))
    evaluator = CandidateEvaluator(problem, EvaluatorConfig(calib_samples=int(options.get("calib_samples", 256))))
    walk = Walk(space, channel_scores(space, "ql1", max(precisions.weight_widths)), float(options.get("min_keep", 0.2)),
                options.get("granularity", "both"), float(options.get("max_sparsity", 0.9)))
    plan = walk.plan(Decision({g: int(n) for g, n in decision["kept"].items()},
                              {k: int(v) for k, v in decision["layer_bits"].items()},
                              {k: int(v) for k, v in decision["site_bits"].items()},
                              {k: float(v) for k, v in decision.get("sparsity", {}).items()}))
    result = evaluator.evaluate(plan)
    fp32 = evaluate(str(sample / "model.onnx"), test, progress=False).accuracy
    return {"test_accuracy_fp32": fp32, "test_accuracy_before_qat": result.accuracy,
            "test_loss_points_before_qat": 100 * (fp32 - result.accuracy),
            "energy_ratio": {k: plan.cost_after[k] / plan.cost_before[k]
                             for k in ("horowitz_energy", "mpic_energy", "size")}}


def run_task(task: str, episodes: int, epochs: int, finetune_epochs: int, agent: str, seed: int,
             granularity: str = "both", energy: str = "horowitz_energy") -> dict[str, Any]:
    sample = ROOT / "samples" / task
    options = {"episodes": episodes, "agent": agent, "granularity": granularity, "energy": energy}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / f"{task}.onnx"
        start = time.perf_counter()
        result = compress(str(sample / "model.onnx"), str(sample / "train.npz"), output=str(out),
                          config=CompressConfig(strategy="rl", strategy_options=options, epochs=epochs,
                                                finetune_epochs=finetune_epochs, seed=seed, progress=False))
        seconds = time.perf_counter() - start
        test = load_dataset(str(sample / "test.npz"), input_specs(prepare_model(str(out)).model))
        after = evaluate(str(out), test, progress=False).accuracy
    history = result.report["history"]
    summary = next(h for h in history if h.get("kind") == "rl")
    best = next(h for h in history if h.get("kind") == "episode" and h["episode"] == summary["best_episode"])
    before = _test_loss_without_training(task, best, options)
    report = result.report
    exported = {k: report["cost_after"][k] / report["cost_before_8bit"][k] for k in ("horowitz_energy", "mpic_energy")}
    plan = result.plan
    row = {
        "task": task, "episodes": episodes, "agent": agent, "seed": seed, "granularity": granularity,
        "energy_objective": energy, "baseline": "the all-8-bit model, nothing pruned (cost_before_8bit)",
        "energy_reduction": {k: 1 - v for k, v in before["energy_ratio"].items() if k != "size"},
        "size_ratio_cost_model": before["energy_ratio"]["size"],
        "energy_ratio_exported": exported,
        "size_cost_model_bytes_after": report["cost_after"]["size"] / 8,
        "size_cost_model_bytes_before_8bit": report["cost_before_8bit"]["size"] / 8,
        "file_bytes": report["file"]["bytes"], "file_packed_weight_bytes": report["file"]["packed_weight_bytes"],
        "file_weight_integers": report["file"].get("weight_integers"),
        "file_zero_weight_integers": report["file"].get("zero_weight_integers"),
        "layers_fine": sum(1 for lp in plan.layers.values() if lp.sparsity),
        "groups_cut": sum(1 for g in plan.groups.values() if g.pruned),
        "search_loss_points_held_out_split": summary["accuracy_loss_points_before_qat"],
        "constraint_met_in_search": summary["constraint_met"], "feasible_episodes": summary["feasible_episodes"],
        "best_episode": summary["best_episode"],
        **before,
        "test_accuracy_after_qat": after,
        "test_loss_points_after_qat": 100 * (before["test_accuracy_fp32"] - after),
        "search_seconds": summary["search_seconds"], "total_seconds": round(seconds, 1),
        "layer_bits": best["layer_bits"], "site_bits": best["site_bits"], "kept": best["kept"],
        "sparsity": best.get("sparsity", {}),
    }
    row["target_met_before_qat"] = {k: bool(v >= 0.39 and row["test_loss_points_before_qat"] <= 1.7)
                                    for k, v in row["energy_reduction"].items()}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="digits,mnist1d")
    parser.add_argument("--episodes", type=int, default=300)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--finetune-epochs", type=int, default=4)
    parser.add_argument("--agent", default="ddpg")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--granularity", default="both,coarse", help="comma-separated: both, coarse, fine")
    parser.add_argument("--energy", default="horowitz_energy", help="the agent's objective (-S energy)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    rows = []
    for task in args.tasks.split(","):
        for granularity in args.granularity.split(","):
            row = run_task(task, args.episodes, args.epochs, args.finetune_epochs, args.agent, args.seed,
                           granularity, args.energy)
            rows.append(row)
            saved = row["energy_reduction"]
            print(f"{task} [{granularity}, objective {args.energy}]: energy vs 8-bit -{100 * saved['horowitz_energy']:.1f}%"
                  f" horowitz_energy, -{100 * saved['mpic_energy']:.1f}% mpic_energy; test loss before QAT "
                  f"{row['test_loss_points_before_qat']:.2f} pt (search split "
                  f"{row['search_loss_points_held_out_split']:.2f} pt), after QAT {row['test_loss_points_after_qat']:.2f}"
                  f" pt; FP32 {100 * row['test_accuracy_fp32']:.2f}%; {row['layers_fine']} layers fine, "
                  f"{row['groups_cut']} groups cut; size model {row['size_cost_model_bytes_after']:.0f} B vs file "
                  f"{row['file_bytes']} B ({row['file_zero_weight_integers']} zero integers); search "
                  f"{row['search_seconds']:.0f} s; target met before QAT: {row['target_met_before_qat']}", flush=True)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        payload = {"command": " ".join([".ci/env", "python", *sys.argv]), "commit": commit(),
                   "versions": versions('stable_baselines3', 'gymnasium'), "rows": rows}
        (out / "rl.json").write_text(json.dumps(payload, indent=2, default=str))
        print(f"wrote {out / 'rl.json'}")


if __name__ == "__main__":
    main()
