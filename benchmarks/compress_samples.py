"""Benchmark: prunequant compress on the bundled samples vs uniform W8A8 / W2A8 QAT.

    /root/.cache/pq/venv-dev/bin/python benchmarks/compress_samples.py            # both samples
    /root/.cache/pq/venv-dev/bin/python benchmarks/compress_samples.py --quick    # smoke run, ~1 min
    /root/.cache/pq/venv-dev/bin/python benchmarks/compress_samples.py --only digits --json out.json
    /root/.cache/pq/venv-dev/bin/python benchmarks/compress_samples.py --only transformer --seed 1

``transformer`` (issue 12) runs its own rows (``TRANSFORMER_NAMES``: W8A8, W4A8 and two budgets)
with activations searched over 4 and 8 bits, and counts the heads left in every export.

Every row goes through ``plugin.compress`` on ``train.npz`` (its own 20 % held-out
split is used by compress for validation only) and the exported QDQ ONNX model is then scored
with onnxruntime on ``test.npz`` (never seen in training). Uniform baselines use the same call
with a single weight / activation precision, so they get the *same* training budget as the
joint search (``epochs`` of search-phase training, where only the weights move, plus
``finetune_epochs`` of QAT). Budget rows (``size=X``): the controller stops searching as soon as
the discretised plan meets the target (after a few epochs), and ``compress`` gives the unused
search epochs to fine-tuning (same total epochs as the baselines). Every row is one
``plugin.api.compress`` call: baselines with ``strategy="uniform"``, the others with the default
``gradient`` strategy.
"KD" rows drop the labels, so the task loss is distillation from the FP32 model (the default
for unlabelled data); the others use cross-entropy on the labels.

Columns: ``acc`` test top-1 (onnxruntime); ``size`` the size cost model (weight bytes, bias
excluded, as the search sees it); ``file`` the exported ONNX file in bytes; ``BOPs`` the bops cost
model (MACs x b_w x b_a; FP32 row: 32 x 32 bit-ops = 16 x the 8-bit figure); ``time`` wall
seconds of the whole compress call (prepare + bridge + search + fine-tune + export/validate)
and, in brackets, search + fine-tune only. Plan: weight channels kept / total (over all weight
layers) and the histogram of weight bits over kept channels; activation bits histogram.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from plugin.api import CompressConfig, compress  # noqa: E402
from plugin.data import input_specs, load_dataset  # noqa: E402
from plugin.evaluate import evaluate  # noqa: E402
from plugin.inspect_cmd import prepare_model  # noqa: E402

SAMPLES = ("digits", "mnist1d", "transformer")
# Per-sample CompressConfig overrides of the searched (non-uniform) rows. transformer: 2-bit
# activations fail the dry run (onnxruntime has no kernel for the Reshape its optimiser puts
# before a Gemm on a 2-bit tensor), so its search picks activations from 4 and 8 bits.
SEARCH_OVERRIDES: dict[str, dict] = {"transformer": dict(act_bits=(4, 8))}

# (name, CompressConfig overrides, distillation instead of cross-entropy)
ALL_VARIANTS = [
    ("W8A8 QAT", dict(strategy="uniform", weight_precisions=(8,), activation_precisions=(8,)), False),
    ("W2A8 QAT", dict(strategy="uniform", weight_precisions=(2,), activation_precisions=(8,)), False),
    ("W4A8 QAT", dict(strategy="uniform", weight_precisions=(4,), activation_precisions=(8,)), False),
    *[(f"joint size={x}", dict(target=f"size={float(x) * 100:g}%"), False) for x in ("0.5", "0.35", "0.25", "0.15", "0.10")],
    *[(f"joint lam={x:g}", dict(lam=float(x)), False) for x in (1, 3, 10, 30, 100, 300)],
    *[(f"joint size={x} KD", dict(target=f"size={float(x) * 100:g}%"), True) for x in ("0.5", "0.35", "0.25", "0.15")],
    *[(f"joint lam={x:g} KD", dict(lam=float(x)), True) for x in (3, 10, 30)],
    ("joint size=0.4", dict(target="size=40%"), False),
    *[(f"joint size={x} W0-4-8", dict(target=f"size={float(x) * 100:g}%", weight_precisions=(0, 4, 8)), False)
      for x in ("0.45", "0.4")],
    ("joint size=0.45 W0-4-8 KD", dict(target="size=45%", weight_precisions=(0, 4, 8)), True),
]
FULL_NAMES = ["W8A8 QAT", "W4A8 QAT", "W2A8 QAT", "joint size=0.5", "joint size=0.35", "joint size=0.25",
              "joint lam=3", "joint lam=10", "joint size=0.35 KD", "joint size=0.25 KD"]
QUICK_NAMES = ["W8A8 QAT", "W2A8 QAT", "joint size=0.35"]
# transformer (issue 12's sample): the rows of the README's table, heads counted in each export
TRANSFORMER_NAMES = ["W8A8 QAT", "W4A8 QAT", "joint size=0.4", "joint size=0.45 W0-4-8", "joint size=0.45 W0-4-8 KD"]
FULL_VARIANTS = [v for v in ALL_VARIANTS if v[0] in FULL_NAMES]
QUICK_VARIANTS = [v for v in ALL_VARIANTS if v[0] in QUICK_NAMES]


def transformer_heads(model) -> list[dict]:
    """``samples/transformer/heads.py``'s head count of an exported transformer sample."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("transformer_heads", ROOT / "samples" / "transformer" / "heads.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.head_counts(model)


def sample_paths(name: str) -> dict[str, Path]:
    folder = ROOT / "samples" / name
    return {k: folder / f"{k}.npz" for k in ("train", "test")} | {"model": folder / "model.onnx"}


def plan_summary(plan) -> dict:
    weight_bits = Counter(b for lp in plan.layers.values() for b in lp.bits)
    total = sum(weight_bits.values())
    kept = total - weight_bits.get(0, 0)
    act_bits = Counter(ap.bits for ap in plan.activations.values())
    group_total = sum(g.size for g in plan.groups.values())
    group_kept = sum(len(g.kept) for g in plan.groups.values())
    return {
        "weight_channels_kept": kept, "weight_channels_total": total,
        "group_channels_kept": group_kept, "group_channels_total": group_total,
        "weight_bits": {int(b): n for b, n in sorted(weight_bits.items()) if b},
        "act_bits": {int(b): n for b, n in sorted(act_bits.items())},
    }


def fmt_hist(hist: dict) -> str:
    return " ".join(f"{b}b:{n}" for b, n in sorted(hist.items()))


def run_sample(name: str, variants, epochs: int, finetune_epochs: int, max_steps: int | None,
               seed: int) -> dict:
    paths = sample_paths(name)
    prepared = prepare_model(str(paths["model"]))
    specs = input_specs(prepared.model)
    test = load_dataset(str(paths["test"]), specs)
    fp32_acc = evaluate(str(paths["model"]), test, batch_size=512, progress=False).accuracy
    fp32_weight_bytes = sum(4 * layer.params for layer in prepared.analysis.layers)
    fp32_macs = sum(getattr(layer, "macs", 0) for layer in prepared.analysis.layers)
    rows = []
    fp32 = {"name": "FP32 original", "test_acc": fp32_acc, "size_bytes": fp32_weight_bytes,
            "file_bytes": os.path.getsize(paths["model"]), "bops": None, "seconds": None}
    rows.append(fp32)
    train_npz = np.load(paths["train"])
    for label, overrides, distill in variants:
        torch.manual_seed(seed)
        data = {"input": train_npz["input"]} if distill else str(paths["train"])
        if overrides.get("strategy") != "uniform":
            overrides = SEARCH_OVERRIDES.get(name, {}) | overrides
        config = CompressConfig(epochs=epochs, finetune_epochs=finetune_epochs, max_steps_per_epoch=max_steps,
                                seed=seed, progress=False, **overrides)
        start = time.perf_counter()
        try:
            result = compress(str(paths["model"]), data, config=config)
        except Exception as exc:  # a failed variant is a result too (e.g. a budget not met)
            wall = time.perf_counter() - start
            print(f"  [{name}] {label}: FAILED after {wall:.0f}s: {type(exc).__name__}: {exc}", flush=True)
            rows.append({"name": label, "error": f"{type(exc).__name__}: {exc}", "seconds": wall})
            continue
        wall = time.perf_counter() - start
        rep = result.report
        acc = evaluate(result.model, test, batch_size=512, progress=False).accuracy
        sec = rep["seconds"]
        row = {
            "name": label, "test_acc": acc, "size_bytes": rep["cost_after"]["size"] / 8,
            "size_8bit_bytes": rep["cost_before_8bit"]["size"] / 8,
            "file_bytes": rep["file"]["bytes"], "file_detail": rep["file"],
            "bops": rep["cost_after"]["bops"], "bops_8bit": rep["cost_before_8bit"]["bops"],
            "mpic": rep["cost_after"].get("mpic"), "mpic_8bit": rep["cost_before_8bit"].get("mpic"),
            "heldout_acc": rep["quality"].get("accuracy_after"),
            "seconds": wall, "search_finetune_seconds": sec.get("search", 0) + sec.get("finetune", 0),
            "phase_seconds": sec, "task_loss": "distill_kl" if distill else "cross_entropy",
            "lambda_final": result.plan.metadata.get("lambda"),
            "search_epochs_run": result.plan.metadata.get("epochs"),
            "finetune_epochs_run": result.plan.metadata.get("finetune", {}).get("epochs"),
            "plan": plan_summary(result.plan),
        }
        if name == "transformer":  # heads left per block in the exported model
            row["heads"] = [block["heads"] for block in transformer_heads(result.model)]
        rows.append(row)
        heads = f"  heads {row['heads']}" if "heads" in row else ""
        print(f"  [{name}] {label}: acc {100 * acc:.2f}%  size {row['size_bytes']:,.0f} B  "
              f"({row['size_bytes'] / row['size_8bit_bytes']:.3f} of W8){heads}  {wall:.0f}s", flush=True)
    for row in rows:
        if row.get("bops_8bit"):
            fp32["bops"] = 16 * row["bops_8bit"]  # 32x32 bit-ops
            fp32["macs"] = row["bops_8bit"] / 64
            break
    return {"sample": name, "fp32_test_acc": fp32_acc, "epochs": epochs, "finetune_epochs": finetune_epochs,
            "max_steps_per_epoch": max_steps, "fp32_macs_analysis": fp32_macs, "rows": rows,
            "headline": headline(rows, fp32_acc)}


def headline(rows: list[dict], fp32_acc: float, tolerance: float = 0.005) -> dict:
    """Smallest iso-accuracy (within ``tolerance`` of FP32) joint row vs the uniform baselines."""
    ok = [r for r in rows if "error" not in r and r.get("bops") is not None and r["test_acc"] >= fp32_acc - tolerance]
    by = {r["name"]: r for r in rows}
    joint = [r for r in ok if r["name"].startswith("joint")]
    out: dict = {"tolerance_points": 100 * tolerance}
    if not joint:
        return out | {"best_joint": None}
    best = min(joint, key=lambda r: r["size_bytes"])
    out["best_joint"] = best["name"]
    out["best_joint_size_bytes"] = best["size_bytes"]
    for base in ("W8A8 QAT", "W2A8 QAT"):
        ref = by.get(base)
        if ref is None or "error" in ref:
            continue
        out[f"vs {base}"] = {
            "baseline_iso_accuracy": ref["test_acc"] >= fp32_acc - tolerance,
            "size_reduction_pct": 100 * (1 - best["size_bytes"] / ref["size_bytes"]),
            "file_reduction_pct": 100 * (1 - best["file_bytes"] / ref["file_bytes"]),
            "bops_reduction_pct": 100 * (1 - best["bops"] / ref["bops"]),
        }
    return out


def print_table(result: dict) -> None:
    name = result["sample"]
    cap = result["max_steps_per_epoch"]
    capped = "" if cap is None else f" (max {cap} steps/epoch)"
    print(f"\n== {name}: search {result['epochs']} epochs + fine-tune {result['finetune_epochs']} epochs{capped}"
          "; accuracy on test.npz (onnxruntime) ==")
    head = (f"{'variant':<20} {'test acc':>8} {'dAcc':>6} {'size B':>8} {'xW8':>6} {'file B':>8} "
            f"{'BOPs':>9} {'time s':>13}  plan (search+ft epochs; kept/total ch; weight bits; act bits)")
    print(head)
    print("-" * len(head))
    fp = result["fp32_test_acc"]
    w8 = next((r for r in result["rows"] if r["name"] == "W8A8 QAT" and "error" not in r), None)
    for r in result["rows"]:
        if "error" in r:
            print(f"{r['name']:<20} FAILED ({r['seconds']:.0f}s): {r['error'][:120]}")
            continue
        ratio = f"{r['size_bytes'] / w8['size_bytes']:.3f}" if w8 and r["name"] != "FP32 original" else (
            f"{r['size_bytes'] / (w8['size_bytes'] if w8 else 1):.2f}" if w8 else "")
        bops = f"{r['bops']:.3g}" if r.get("bops") else "-"
        t = f"{r['seconds']:.0f} ({r['search_finetune_seconds']:.0f})" if r.get("seconds") else "-"
        plan = f"heads {r['heads']}; " if "heads" in r else ""
        if "plan" in r:
            p = r["plan"]
            plan += (f"{r.get('search_epochs_run')}+{r.get('finetune_epochs_run')} ep; "
                    f"{p['weight_channels_kept']}/{p['weight_channels_total']}; {fmt_hist(p['weight_bits'])}; "
                    f"{fmt_hist(p['act_bits'])}")
        print(f"{r['name']:<20} {100 * r['test_acc']:7.2f}% {100 * (r['test_acc'] - fp):+6.2f} "
              f"{r['size_bytes']:8,.0f} {ratio:>6} {r['file_bytes']:8,} {bops:>9} {t:>13}  {plan}")
    h = result["headline"]
    if h.get("best_joint"):
        print(f"headline: smallest joint plan within {h['tolerance_points']:.1f} pt of FP32: {h['best_joint']} "
              f"({h['best_joint_size_bytes']:,.0f} B)")
        for base in ("W8A8 QAT", "W2A8 QAT"):
            if f"vs {base}" in h:
                v = h[f"vs {base}"]
                print(f"  vs {base}: size {-v['size_reduction_pct']:+.1f}%, file {-v['file_reduction_pct']:+.1f}%, "
                      f"BOPs {-v['bops_reduction_pct']:+.1f}% (baseline itself iso-accurate: "
                      f"{v['baseline_iso_accuracy']})")
    else:
        print(f"headline: no joint plan within {h['tolerance_points']:.1f} pt of FP32")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: digits, 3 variants, 10+5 epochs (~1 min)")
    parser.add_argument("--only", choices=SAMPLES, help="one sample only")
    parser.add_argument("--json", help="write all results to this JSON file")
    parser.add_argument("--epochs", type=int, help="search epochs (default 20; quick 4)")
    parser.add_argument("--finetune-epochs", type=int, help="fine-tune epochs (default 10; quick 2)")
    parser.add_argument("--variants", help="comma-separated subset of variant names (see ALL_VARIANTS)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy 2-core box)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    epochs = args.epochs or (10 if args.quick else 20)
    finetune_epochs = args.finetune_epochs if args.finetune_epochs is not None else (5 if args.quick else 10)
    variants = QUICK_VARIANTS if args.quick else FULL_VARIANTS
    per_sample = {"transformer": [v for v in ALL_VARIANTS if v[0] in TRANSFORMER_NAMES]}
    if args.variants:
        wanted = [v.strip() for v in args.variants.split(",")]
        variants = [v for v in ALL_VARIANTS if v[0] in wanted]
        if not variants:
            parser.error(f"no variant among {wanted}; known: {[v[0] for v in ALL_VARIANTS]}")
    samples = [args.only] if args.only else list(SAMPLES)
    if args.quick and not args.only:
        samples = ["digits"]
    max_steps = None
    results, start = [], time.perf_counter()
    for name in samples:
        print(f"[{name}] ...", flush=True)
        chosen = variants if args.variants or args.quick else per_sample.get(name, variants)
        results.append(run_sample(name, chosen, epochs, finetune_epochs, max_steps, args.seed))
    for result in results:
        print_table(result)
    print(f"\ntotal wall time {time.perf_counter() - start:.0f}s (torch threads {args.threads})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2, default=str)


if __name__ == "__main__":
    main()
