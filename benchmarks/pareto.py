"""Where prunequant stands on the paper's claims: Pareto fronts of joint pruning + channel-wise
mixed precision against uniform QAT, onnxruntime's quantize_static and sequential
pruning-then-mixed-precision, on the same third-party ONNX model.

    /root/.cache/pq/venv-dev/bin/python benchmarks/pareto.py --quick     # digits + MNIST-1D, < 8 min
    /root/.cache/pq/venv-dev/bin/python benchmarks/pareto.py             # full: 3 tasks, size + mpic
    /root/.cache/pq/venv-dev/bin/python benchmarks/pareto.py --tasks digits:dscnn --lambdas 10,40

Per (task, network): the network is trained here (cached under ~/.cache/prunequant/bench),
exported with torch's legacy exporter (opset 17, BatchNorm kept) and from then on treated as a
third-party ONNX file. Methods (``bench_baselines.py``): FP32 original; uniform QAT W8A8 / W4A8
/ W2A8 (same training budget as the searches: ``epochs`` + ``finetune_epochs``); onnxruntime
``quantize_static`` (QDQ, per-channel int8); sequential pruning ({0, 8}) then mixed precision
({2, 4, 8}) on the pruned model (two rows: ``prune-only`` and ``sequential``); the joint search
swept over lambda with the ``size`` cost (and ``mpic`` in full mode). All wXa8.

Recorded per row: test accuracy (onnxruntime on the exported model, the task's held-out test
split), size-model bytes (weights at their bit-widths, what the search optimises) and file
bytes, BOPs, MPIC cycles, onnxruntime CPU latency (1 thread, batch 1 and 32, median), and the
training wall time (search + fine-tuning; sequential: both stages). Outputs in ``--out``
(default ``benchmarks/out/``): ``pareto.json``, ``pareto.csv``, ``pareto_<task>_<net>.png``.

Every compress run (uniform, prune-only, sequential, joint, and the ``--strategies`` runs) is a job of
``plugin.sweep`` on Ray (a local Ray with ``--jobs`` CPUs, or ``--address`` of a cluster), so each
row carries the same provenance as a ``prunequant sweep`` result (prunequant version, commit,
command line, model hash); the jobs' folders are kept in ``OUT/sweeps/<task>_<network>/`` and
``--resume`` continues a stopped run there. ``--strategies gradient,bayesian,rl --targets
size=50%,35%,25% --seeds 0,1,2`` adds every strategy at every budget and seed (accuracy vs size and
vs mpic energy, search wall time per method); ``--methods`` picks the baselines (``none``: only
the strategies and the FP32 row).

    .ci/env python benchmarks/pareto.py --tasks digits:dscnn --methods uniform,fp32,ort \
        --strategies gradient,bayesian,rl --targets size=50%,35%,25% --seeds 0,1 -S bayesian.bits=4

Headline (per experiment): the smallest joint plan whose accuracy is within ``--tolerance``
points of a baseline, and how much smaller it is than that baseline (the paper: 47.50 % below
all-8-bit and 69.54 % below all-2-bit at iso-accuracy); and joint vs sequential at the same
accuracy, with training time.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# the repository root first: benchmarks/graph_passes.py must not shadow the graph_passes package
if str(ROOT) in sys.path:
    sys.path.remove(str(ROOT))
sys.path.insert(0, str(ROOT))
if str(HERE) not in sys.path:
    sys.path.append(str(HERE))

import bench_baselines as bb  # noqa: E402
import bench_networks as bn  # noqa: E402
from bench_tasks import load_task  # noqa: E402
from provenance import command_line, commit, versions  # noqa: E402

from plugin import sweep  # noqa: E402
from plugin.engine.config import DEFAULT_QAT_SCHEDULE, QAT_SCHEDULES  # noqa: E402

# shapes32's cross-entropy stays near 1 (FP32: 74% accuracy), so the trade starts at smaller
# lambdas than on digits / MNIST-1D (measured: lambda 20 pruned it to 37% accuracy with {0, 8},
# MNIST-1D to 94.6%; with the size cost it stays all-8-bit up to lambda 5).
SHAPES32_GRID = {"lambdas": {"size": [5.0, 7.0, 10.0, 20.0, 35.0, 50.0], "mpic": [5.0, 7.0, 10.0, 20.0, 35.0, 50.0]},
                 "sequential": [(3.5, 5.0), (7.0, 7.0), (20.0, 35.0)]}

# finer size grids where the first full run jumped (digits: 99.4% at lambda 100, 91.7% at 150;
# MNIST-1D: 8 bits at 10, 96.0% at 20)
DIGITS_GRID = {"lambdas": {"size": [10.0, 20.0, 35.0, 50.0, 70.0, 85.0, 100.0, 115.0, 130.0, 150.0],
                           "mpic": [10.0, 20.0, 35.0, 50.0, 70.0, 100.0]}}
MNIST1D_GRID = {"lambdas": {"size": [10.0, 14.0, 20.0, 27.0, 35.0, 42.0, 50.0, 70.0, 100.0, 150.0],
                            "mpic": [10.0, 20.0, 35.0, 50.0, 70.0, 100.0]}}

# per mode: experiments (task, network, width, fp32 epochs, compress-training subset[, per-task
# lambdas / sequential]), budget, sweeps
MODES = {
    "quick": {
        "experiments": [("digits", "resnet8", 0.5, 30, None), ("mnist1d", "dscnn", 0.5, 15, 3000)],
        "epochs": 8, "finetune_epochs": 4, "latency_runs": 30,
        "lambdas": {"size": [15.0, 40.0]}, "sequential": [(15.0, 40.0)], "uniform_bits": (8, 4, 2),
    },
    # full: sized for one 2-core machine with --jobs 2 (about an hour; see benchmarks/README.md)
    "full": {
        "experiments": [("digits", "resnet8", 1.0, 40, None, DIGITS_GRID),
                        ("mnist1d", "dscnn", 1.0, 20, 4000, MNIST1D_GRID),
                        ("shapes32", "mobilenet", 0.5, 10, 2000, SHAPES32_GRID)],
        "epochs": 12, "finetune_epochs": 6, "latency_runs": 100,
        "lambdas": {"size": [10.0, 20.0, 35.0, 50.0, 70.0, 100.0, 150.0],
                    "mpic": [10.0, 20.0, 35.0, 50.0, 70.0, 100.0]},
        "sequential": [(20.0, 35.0), (50.0, 50.0)], "uniform_bits": (8, 4, 2),
    },
    # the smoke test: one task, one tiny network, 1-2 epochs, 2 lambdas
    "smoke": {
        "experiments": [("digits", "dscnn", 0.25, 3, 600)],
        "epochs": 2, "finetune_epochs": 1, "latency_runs": 5,
        "lambdas": {"size": [10.0, 100.0]}, "sequential": [(10.0, 100.0)], "uniform_bits": (8, 4, 2),
        "onnxsim": ("int8", "int4"),  # the unpruned pipelines (pruning a 3-epoch network is noise)
    },
}

# the seed paper's headline figures (size reduction at iso-accuracy)
PAPER = {"W8A8 QAT": "-47.50%", "W2A8 QAT": "-69.54%"}

ROW_FIELDS = ["task", "network", "method", "label", "seed", "target", "lam", "lam_prune", "cost_model", "test_acc",
              "size_model_bytes", "size_vs_w8", "file_bytes", "bops", "mpic_cycles", "energy_uj", "energy_vs_w8",
              "latency_b1_ms", "latency_b32_ms", "search_s", "finetune_s", "train_s", "wall_s",
              "weight_channels_kept", "weight_channels_total", "weight_bits", "job_id", "error"]

STYLE = {  # method -> (marker, colour, label)
    "fp32": ("*", "black", "FP32 original"),
    "uniform": ("s", "tab:blue", "uniform QAT wXa8"),
    "ort_static": ("D", "tab:gray", "ORT quantize_static int8"),
    "onnxsim": ("d", "tab:brown", "onnxsim 0.8.1 post-training"),
    "prune-only": ("v", "tab:olive", "pruning only {0,8}"),
    "sequential": ("^", "tab:orange", "sequential prune -> MP"),
    "joint-size": ("o", "tab:red", "joint (size cost)"),
    "joint-mpic": ("P", "tab:purple", "joint (mpic cost)"),
    "gradient-target": ("h", "tab:pink", "gradient search (--target)"),
    "bayesian": ("X", "tab:green", "bayesian (optuna, --target)"),
    "rl": ("p", "tab:cyan", "rl (DDPG, --target wall)"),
}
#: the row method of a ``--strategies`` run
STRATEGY_METHOD = {"gradient": "gradient-target"}
#: row methods of the --strategies runs (all kept by merges; compared at the same budgets)
STRATEGY_METHODS = ("gradient-target", "bayesian", "rl")


def log(msg: str) -> None:
    print(msg, flush=True)


METHODS = ("uniform", "fp32", "ort", "onnxsim", "sequential", "joint")


@dataclass
class RunOptions:
    """How the compress jobs run (``plugin.sweep``) and what ``--strategies`` adds."""

    strategies: tuple[str, ...] = ()
    targets: tuple[str, ...] = ()
    seeds: tuple[int, ...] = (0,)
    strategy_options: dict = field(default_factory=dict)  # {strategy: {option: value}}
    act_bits: tuple[int, ...] = (8,)
    address: str | None = None
    num_cpus: int | None = None  # local Ray CPUs (--jobs)
    cpus_per_job: float = 1.0  # --threads
    resume: bool = False
    progress: bool = True
    labels: bool = True  # False (--no-labels): compress sees no labels (distillation from the FP32 model)
    uniform_bits: tuple[int, ...] | None = None  # --uniform-bits: the uniform baselines' widths (default the mode's)
    sequential_configs: int | None = None  # --sequential-configs N: only the first N sequential pairs of each task
    qat_schedule: str = DEFAULT_QAT_SCHEDULE  # --qat-schedule: every compress job's QAT learning-rate schedule
    keep_best_qat: bool = False  # --keep-best-qat: every compress job's QAT ends on its best held-out epoch
    weight_bits: tuple[int, ...] = (0, 2, 4, 8)  # --weight-bits: the widths the --strategies jobs search


def _method_of(strategy: str) -> str:
    return STRATEGY_METHOD.get(strategy, strategy)


def compress_jobs(settings: dict, costs: list[str], methods: tuple[str, ...], run: RunOptions
                  ) -> list[tuple[sweep.Job, dict]]:
    """(sweep job, row template) for every compress run of one experiment, in table order."""
    multi = len(run.seeds) > 1
    out: list[tuple[sweep.Job, dict]] = []

    def add(job_id: str, strategy: str, seed: int, config: dict, row: dict, target: str | None = None) -> None:
        label = row["label"] + (f" s{seed}" if multi else "")
        out.append((sweep.Job(f"{job_id}_s{seed}", strategy, target, seed, config, label),
                    {**row, "label": label, "seed": seed, "target": target}))

    for seed in run.seeds:
        if "uniform" in methods:
            for bits in run.uniform_bits or settings["uniform_bits"]:
                add(f"uniform_w{bits}", "uniform", seed, {"weight_precisions": (bits,)},
                    {"method": "uniform", "label": f"W{bits}A8 QAT", "weight_bits": bits})
        pairs = settings["sequential"][:run.sequential_configs] if run.sequential_configs else settings["sequential"]
        if "sequential" in methods:
            for p in dict.fromkeys(p for p, _m in pairs):
                add(f"pruneonly_lam{p:g}", "gradient", seed, {"lam": p, "weight_precisions": (0, 8)},
                    {"method": "prune-only", "label": f"prune-only lam={p:g}", "lam": p, "cost_model": "size"})
            for p, m in pairs:
                add(f"sequential_lam{p:g}-{m:g}", "sequential", seed,
                    {"lam": m, "weight_precisions": (0, 2, 4, 8), "strategy_options": {"prune_lambda": p}},
                    {"method": "sequential", "label": f"sequential lam={p:g}/{m:g}", "lam": m, "lam_prune": p,
                     "cost_model": "size"})
        if "joint" in methods:
            for cost in costs:
                for lam in settings["lambdas"].get(cost, []):
                    add(f"gradient_lam{lam:g}-{cost}", "gradient", seed,
                        {"lam": lam, "cost": cost, "weight_precisions": (0, 2, 4, 8)},
                        {"method": f"joint-{cost}", "label": f"joint {cost} lam={lam:g}", "lam": lam,
                         "cost_model": cost})
        for strategy in run.strategies:
            for target in run.targets:
                add(sweep.job_id(strategy, target, seed)[:-len(f"_s{seed}")], strategy, seed,
                    {"weight_precisions": tuple(run.weight_bits),
                     "strategy_options": dict(run.strategy_options.get(strategy, {}))},
                    {"method": _method_of(strategy), "label": f"{strategy} {target}",
                     "cost_model": target.partition("=")[0]}, target=target)
    return out


def _write_npz(path: Path, x: np.ndarray, y: np.ndarray) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, input=x, labels=y)
    os.replace(tmp, path)
    return str(path)


def _write_npz_unlabelled(path: Path, x: np.ndarray) -> str:
    """The training inputs alone: compress then distils from the FP32 model (no labels)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, input=x)
    os.replace(tmp, path)
    return str(path)


def run_compress_jobs(ctx: bb.Context, task, jobs: list[tuple[sweep.Job, dict]], cfg: bb.BenchConfig,
                      run: RunOptions, folder: Path, data_dir: Path) -> list[dict]:
    """The experiment's compress runs as one ``plugin.sweep`` (on Ray); one row per job."""
    if not jobs:
        return []
    key = f"{ctx.task_name}_{ctx.network}"
    train = (_write_npz(data_dir / f"{key}_train.npz", ctx.x_train, ctx.y_train) if run.labels
             else _write_npz_unlabelled(data_dir / f"{key}_train_nolabels.npz", ctx.x_train))
    test = _write_npz(data_dir / f"{key}_test.npz", task.x_test, task.y_test)
    if folder.exists() and not run.resume:
        import shutil

        shutil.rmtree(folder)  # a fresh run; --resume keeps the finished jobs
    folder.parent.mkdir(parents=True, exist_ok=True)
    spec = sweep.SweepSpec(model=str(ctx.model_path), data=train, eval_data=test, output=str(folder),
                           base={"epochs": cfg.epochs, "finetune_epochs": cfg.finetune_epochs,
                                 "batch_size": cfg.batch_size, "max_steps_per_epoch": cfg.max_steps_per_epoch,
                                 "act_bits": tuple(run.act_bits), "device": cfg.device,
                                 "qat_schedule": run.qat_schedule, "keep_best_qat": run.keep_best_qat})
    result = sweep.run_sweep(spec, [j for j, _ in jobs], address=run.address, num_cpus=run.num_cpus,
                             cpus_per_job=run.cpus_per_job, resume=True, progress=run.progress,
                             command=command_line())
    records = {r["job_id"]: r for r in result.records}
    rows = []
    for job, template in jobs:
        rows.append(_row_from_record(ctx, template, records[job.id], folder / job.id))
    return rows


def _row_from_record(ctx: bb.Context, template: dict, rec: dict, folder: Path) -> dict:
    row = {"task": ctx.task_name, "network": ctx.network, **template, "job_id": rec["job_id"],
           "provenance": rec.get("provenance"), "wall_s": rec.get("wall_s")}
    if rec.get("status") != "ok":
        row["error"] = rec.get("error") or "failed"
        log(f"    {row['label']:<30} FAILED: {row['error'][:200]}")
        return row
    from plugin.plan import CompressionPlan

    before = rec["cost_before_8bit"]
    if ctx.ref8 is None and "size" in before:
        ctx.ref8 = dict(before)
    bb._costs_row(row, rec["cost_after"])
    row["energy_uj"] = rec.get("energy_uJ")
    row["search_s"], row["finetune_s"] = rec.get("search_s") or 0.0, rec.get("finetune_s") or 0.0
    row["train_s"] = row["search_s"] + row["finetune_s"]
    row["heldout_acc_compress"] = rec.get("heldout_accuracy")
    row["plan"] = bb.plan_summary(CompressionPlan.load(str(folder / "model.plan.json")))
    if row["method"] == "sequential":
        report = json.loads((folder / "model.report.json").read_text())
        stage1 = next((h for h in report.get("history") or [] if isinstance(h, dict) and h.get("stage") == "prune"),
                      None)
        row["stage1_epochs"] = stage1.get("epochs") if stage1 else None
    bb._measure(ctx, folder / "model.onnx", row)  # test accuracy (onnxruntime), file bytes, latency
    if rec.get("eval_accuracy") is not None:
        row["test_acc_job"] = rec["eval_accuracy"]  # the job's own onnxruntime score: the same test split
    log(f"    {row['label']:<30} acc {100 * row['test_acc']:6.2f}%  size {row.get('size_model_bytes') or 0:9,.0f} B  "
        f"file {row['file_bytes']:8,} B  search {row['search_s']:6.1f}s  train {row['train_s']:6.1f}s")
    return row


def _safe(fn, ctx, label: str, *args):
    """Run one method in this process (FP32, onnxruntime int8); a failure is a result too."""
    start = time.perf_counter()
    try:
        out = fn(ctx, *args)
    except Exception as exc:  # noqa: BLE001 - recorded, the sweep goes on
        wall = time.perf_counter() - start
        log(f"    {label}: FAILED after {wall:.0f}s: {type(exc).__name__}: {str(exc)[:200]}")
        method = {"run_ort_static": "ort_static", "run_fp32": "fp32"}.get(fn.__name__, fn.__name__)
        return [{"task": ctx.task_name, "network": ctx.network, "method": method, "label": label,
                 "error": f"{type(exc).__name__}: {exc}", "wall_s": wall}]
    rows = out if isinstance(out, list) else [out]
    for r in rows:
        log(f"    {r['label']:<30} acc {100 * r['test_acc']:6.2f}%  file {r['file_bytes']:8,} B")
    return rows


def run_onnxsim_rows(ctx: bb.Context, seeds: tuple[int, ...], configs: tuple[str, ...] | None = None) -> list[dict]:
    """Every ``bb.ONNXSIM_CONFIGS`` pipeline (or ``configs``) at every seed (the calibration's
    seed); a failure is a row with ``error`` (``bb.run_onnxsim`` catches onnxsim's exceptions,
    this anything else)."""
    rows = []
    for seed in seeds:
        for key in configs or tuple(bb.ONNXSIM_CONFIGS):
            suffix = f" s{seed}" if len(seeds) > 1 else ""
            try:
                row = bb.run_onnxsim(ctx, key, seed, suffix)
            except Exception as exc:  # noqa: BLE001 - recorded, the benchmark goes on
                row = {"task": ctx.task_name, "network": ctx.network, "method": "onnxsim", "seed": seed,
                       "label": bb.onnxsim_label(key) + suffix, "onnxsim_config": key,
                       "error": f"{type(exc).__name__}: {exc}"}
            if "error" in row:
                log(f"    {row['label']:<30} FAILED: {row['error'][:200]}")
            else:
                log(f"    {row['label']:<30} acc {100 * row['test_acc']:6.2f}%  size {row['size_model_bytes']:9,.0f} B  "
                    f"file {row['file_bytes']:8,} B  {row['wall_s']:.1f}s")
            rows.append(row)
    return rows


def run_experiment(task_name: str, network: str, width: float, fp32_epochs: int, n_compress: int | None,
                   mode: dict, cfg: bb.BenchConfig, costs: list[str], partial: Path | None = None,
                   overrides: dict | None = None, methods: tuple[str, ...] = METHODS,
                   run: RunOptions | None = None, out: Path | None = None) -> dict:
    """All methods on one (task, network); ``overrides`` replaces the mode's ``lambdas`` /
    ``sequential`` for this experiment. The compress runs go through ``plugin.sweep`` (their
    folders in ``out/sweeps/``); with ``partial``, the result is also written there."""
    start = time.perf_counter()
    run = run or RunOptions(seeds=(cfg.seed,))
    out = out or (partial.parent.parent if partial is not None else HERE / "out")
    settings = {**{k: mode[k] for k in ("lambdas", "sequential", "uniform_bits")}, **(overrides or {})}
    task = load_task(task_name, bn.CACHE)
    path, meta = bn.get_model(task, network, width, fp32_epochs, cfg.seed, log=log)
    x, y = task.compress_subset(n_compress, cfg.seed)
    ctx = bb.make_context(task, network, path, x, y, cfg)
    log(f"[{task_name} / {network}] {task.description}; compress sees {len(x)} "
        f"{'labelled' if run.labels else 'unlabelled (distillation)'} training samples "
        f"(80% train / 20% its own validation); test {len(task.x_test)}")
    jobs = compress_jobs(settings, costs, methods, run)
    log(f"    {len(jobs)} compress jobs on Ray ({'cluster ' + run.address if run.address else 'local'})")
    key = f"{task_name}_{network}"
    rows = run_compress_jobs(ctx, task, jobs, cfg, run, out / "sweeps" / key, out / "data")
    if "fp32" in methods:
        rows += _safe(bb.run_fp32, ctx, "FP32 original")
    multi = len(run.seeds) > 1
    if "ort" in methods:  # one calibration draw per seed (the same seed as the compress jobs')
        for seed in run.seeds:
            rows += _safe(bb.run_ort_static, ctx, "ORT quantize_static", 256, seed, f" s{seed}" if multi else "")
    if "onnxsim" in methods:
        rows += run_onnxsim_rows(ctx, run.seeds, mode.get("onnxsim"))
    info = {"task": task_name, "network": network, "width": width, "fp32_train": meta,
            "task_description": task.description, "n_compress": len(x), "n_test": len(task.x_test),
            "settings": settings, "epochs": cfg.epochs, "finetune_epochs": cfg.finetune_epochs,
            "seeds": list(run.seeds), "strategies": list(run.strategies), "targets": list(run.targets),
            "strategy_options": run.strategy_options, "sweep_folder": str(out / "sweeps" / key),
            "labels": run.labels}
    result = finish_experiment(info, sorted(rows, key=_row_order), ctx.ref8, time.perf_counter() - start, True)
    if partial is not None:
        partial.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text(json.dumps(result, default=str))
    return result


def finish_experiment(info: dict, rows: list[dict], ref8: dict | None, seconds: float, complete: bool) -> dict:
    """Fill in the rows measured before the 8-bit reference was known; add the headline."""
    ref8 = ref8 or {}
    for r in rows:
        if r.get("method") in ("fp32", "ort_static") and ref8 and r.get("size_model_bytes") is None:
            if r["method"] == "fp32":
                r["size_model_bytes"], r["bops"] = 4 * ref8["size"] / 8, 16 * ref8["bops"]
            else:
                bb._costs_row(r, ref8)
        if ref8 and r.get("size_model_bytes") is not None:
            r["size_vs_w8"] = r["size_model_bytes"] / (ref8["size"] / 8)
        if ref8 and ref8.get("mpic_energy") and "error" not in r:
            if r.get("method") == "ort_static" and r.get("energy_uj") is None:
                r["energy_uj"] = ref8["mpic_energy"]  # int8 weights and activations: the 8-bit model's
            if r.get("energy_uj") is not None:
                r["energy_vs_w8"] = r["energy_uj"] / ref8["mpic_energy"]
    result = {**info, "ref_8bit": {k: ref8.get(k) for k in ("size", "bops", "mpic", "mpic_energy")}, "rows": rows,
              "headline": headline(rows, 0.5), "seconds": seconds, "complete": complete}
    if any(r.get("method") in STRATEGY_METHODS for r in rows):
        result["strategies_summary"] = strategy_summary(rows, 0.5)
    if len({r.get("seed") for r in rows if r.get("seed") is not None}) > 1:
        result["seed_summary"] = seed_summary(rows)
    return result


def _config_label(row: dict) -> str:
    """A row's label without its ``" s<seed>"`` suffix: the configuration its seeds share."""
    label, seed = row["label"], row.get("seed")
    return label[:-len(f" s{seed}")] if seed is not None and label.endswith(f" s{seed}") else label


def seed_summary(rows: list[dict]) -> dict:
    """Every configuration (label without the seed) over its seeds: mean and sd of test accuracy
    (points), mean size (cost model, x W8), file bytes, training and CPU seconds; failed seeds
    counted; and the issue's target, uniform W8A8 QAT at least as accurate as onnxruntime's
    post-training int8 (means, and seed by seed where both ran)."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(_config_label(r), []).append(r)
    configs = []
    for label, group in groups.items():
        ok = [r for r in group if "error" not in r and r.get("test_acc") is not None]
        acc, sd = _mean_sd([100 * r["test_acc"] for r in ok])
        configs.append({"config": label, "method": group[0].get("method"),
                        "seeds": sorted(r.get("seed") for r in ok if r.get("seed") is not None),
                        "failed": [f"s{r.get('seed')}: {r['error'][:160]}" for r in group if "error" in r],
                        "test_acc_mean": acc, "test_acc_sd": sd,
                        "size_bytes_mean": _mean_sd([r["size_model_bytes"] for r in ok
                                                     if r.get("size_model_bytes") is not None])[0],
                        "size_vs_w8_mean": _mean_sd([r["size_vs_w8"] for r in ok if r.get("size_vs_w8") is not None])[0],
                        "file_bytes_mean": _mean_sd([r["file_bytes"] for r in ok if r.get("file_bytes")])[0],
                        "train_s_mean": _mean_sd([r["train_s"] for r in ok if r.get("train_s") is not None])[0],
                        "cpu_s_mean": _mean_sd([r["cpu_s"] for r in ok if r.get("cpu_s") is not None])[0]})
    by = {c["config"]: c for c in configs}
    target: dict = {}
    w8, ort_ = by.get("W8A8 QAT"), by.get("ORT quantize_static int8")
    if w8 and ort_ and w8["test_acc_mean"] is not None and ort_["test_acc_mean"] is not None:
        acc_of = {(r["method"], r.get("seed")): r["test_acc"] for r in rows if "error" not in r
                  and r.get("test_acc") is not None and (r["method"] == "ort_static"
                                                        or (r["method"] == "uniform" and r.get("weight_bits") == 8))}
        per_seed = {s: 100 * (acc_of[("uniform", s)] - acc_of[("ort_static", s)])
                    for s in sorted({k[1] for k in acc_of}) if ("uniform", s) in acc_of and ("ort_static", s) in acc_of}
        target = {"w8a8_qat_mean": w8["test_acc_mean"], "ort_int8_mean": ort_["test_acc_mean"],
                  "holds_on_mean": w8["test_acc_mean"] >= ort_["test_acc_mean"],
                  "margin_points_by_seed": per_seed, "holds_every_seed": all(v >= 0 for v in per_seed.values())}
    return {"configs": configs, "w8a8_qat_vs_ort": target}


def seed_markdown(summary: dict) -> list[str]:
    """The mean +- sd table of ``seed_summary`` and the W8A8-QAT-vs-ORT target line."""
    lines = ["Over seeds (mean +- sd of test accuracy; means of the rest; train s: search + QAT, or the "
             "post-training pipeline's wall time; CPU s: its process CPU time):", "",
             "| configuration | seeds | test acc | size (cost model) | x W8 | file | train s | CPU s |",
             "|---|---|---|---|---|---|---|---|"]
    for c in summary["configs"]:
        failed = f" ({len(c['failed'])} failed: {c['failed'][0]})" if c["failed"] else ""
        if c["test_acc_mean"] is None:
            lines.append(f"| {c['config']} | - | failed{failed} ||||||")
            continue
        lines.append(f"| {c['config']} | {','.join(map(str, c['seeds']))}{failed} "
                     f"| {c['test_acc_mean']:.2f} +- {c['test_acc_sd']:.2f}% | {_fmt(c['size_bytes_mean'], ',.0f')} B "
                     f"| {_fmt(c['size_vs_w8_mean'], '.3f')} | {_fmt(c['file_bytes_mean'], ',.0f')} B "
                     f"| {_fmt(c['train_s_mean'], '.1f')} | {_fmt(c['cpu_s_mean'], '.1f')} |")
    t = summary.get("w8a8_qat_vs_ort")
    if t:
        seeds = ", ".join(f"s{s} {v:+.2f}" for s, v in t["margin_points_by_seed"].items())
        lines += ["", f"Target W8A8 QAT >= ORT int8: {t['w8a8_qat_mean']:.2f}% vs {t['ort_int8_mean']:.2f}% "
                      f"({'holds' if t['holds_on_mean'] else 'fails'} on the mean; per seed, points: {seeds}; "
                      + ("holds on every seed)" if t["holds_every_seed"] else
                         f"holds on {sum(v >= 0 for v in t['margin_points_by_seed'].values())} of "
                         f"{len(t['margin_points_by_seed'])} seeds)")]
    return lines


def sweep_labels(settings: dict) -> set[str]:
    """The labels of the sweep rows (joint, prune-only, sequential) that ``settings`` produce."""
    labels = {f"joint {cost} lam={lam:g}" for cost, lams in settings.get("lambdas", {}).items() for lam in lams}
    for p, m in settings.get("sequential", []):
        labels |= {f"prune-only lam={p:g}", f"sequential lam={p:g}/{m:g}"}
    return labels


def merge_results(results: list[dict], settings: dict | None = None) -> dict:
    """One experiment from several runs of it (e.g. baselines from one, a lambda sweep from
    another): rows by label, the later run winning; with ``settings`` (a mode's grids for this
    experiment), sweep rows those grids do not produce (an earlier grid) are dropped; the
    headline is recomputed."""
    rows: dict[str, dict] = {}
    for res in results:
        rows.update({r["label"]: r for r in res["rows"]})
    if settings:
        keep = sweep_labels(settings)
        rows = {k: r for k, r in rows.items()
                if r.get("method") in ("uniform", "fp32", "ort_static", "onnxsim", *STRATEGY_METHODS)
                or k in keep}
    base = dict(results[-1])
    ref8 = next((r["ref_8bit"] for r in results if (r.get("ref_8bit") or {}).get("size")), None)
    info = {k: v for k, v in base.items() if k not in ("rows", "headline", "seconds", "complete", "ref_8bit")}
    info["merged_from"] = len(results)
    return finish_experiment(info, sorted(rows.values(), key=_row_order), ref8,
                             sum(r.get("seconds", 0.0) for r in results), all(r.get("complete", True) for r in results))


_METHOD_ORDER = ("uniform", "fp32", "ort_static", "onnxsim", "prune-only", "sequential", "joint-size", "joint-mpic",
                 *STRATEGY_METHODS)


def _target_percent(target: str | None) -> float:
    try:
        return -float(str(target).partition("=")[2].rstrip("%"))
    except ValueError:
        return 0.0


def _row_order(row: dict) -> tuple:
    """Baselines first (W8, W4, W2), then sequential pairs, then each sweep by lambda, then the
    strategies grouped by budget (largest first); seeds in order."""
    method = row.get("method", "")
    rank = _METHOD_ORDER.index(method) if method in _METHOD_ORDER else len(_METHOD_ORDER)
    seed = row.get("seed") or 0
    if method in STRATEGY_METHODS:
        return (_METHOD_ORDER.index(STRATEGY_METHODS[0]), _target_percent(row.get("target")), rank, seed)
    if method in ("prune-only", "sequential"):
        return (_METHOD_ORDER.index("prune-only"), row.get("lam_prune") or row.get("lam") or 0.0, rank, seed)
    if method == "onnxsim":
        keys = list(bb.ONNXSIM_CONFIGS)
        cfg = row.get("onnxsim_config")
        return (rank, keys.index(cfg) if cfg in keys else len(keys), 0.0, seed)
    return (rank, -(row.get("weight_bits") or 0), row.get("lam") or 0.0, seed)


def _ok(rows: list[dict]) -> list[dict]:
    return [r for r in rows if "error" not in r and r.get("size_model_bytes") is not None]


def headline(rows: list[dict], tolerance_pt: float) -> dict:
    """Smallest joint plan at iso-accuracy (within ``tolerance_pt`` points) with each baseline."""
    ok = _ok(rows)
    joint = [r for r in ok if r["method"].startswith("joint")]
    out: dict = {"tolerance_points": tolerance_pt}
    for r in ok:
        if r["method"] in ("uniform", "ort_static", "onnxsim", "sequential", "fp32"):
            iso = [j for j in joint if 100 * j["test_acc"] >= 100 * r["test_acc"] - tolerance_pt]
            entry: dict = {"baseline_acc": r["test_acc"], "baseline_size_bytes": r["size_model_bytes"]}
            if iso:
                best = min(iso, key=lambda j: j["size_model_bytes"])
                entry.update({"joint": best["label"], "joint_acc": best["test_acc"],
                              "joint_size_bytes": best["size_model_bytes"],
                              "size_reduction_pct": 100 * (1 - best["size_model_bytes"] / r["size_model_bytes"]),
                              "file_reduction_pct": 100 * (1 - best["file_bytes"] / r["file_bytes"]),
                              "joint_train_s": best.get("train_s"), "baseline_train_s": r.get("train_s")})
                if r.get("mpic_cycles") and best.get("mpic_cycles"):
                    entry["mpic_reduction_pct"] = 100 * (1 - best["mpic_cycles"] / r["mpic_cycles"])
            else:
                entry["joint"] = None
            out[r["label"]] = entry
    out["joint_vs_sequential"] = [joint_vs_sequential(s, joint, tolerance_pt)
                                  for s in ok if s["method"] == "sequential"]
    return out


def joint_vs_sequential(seq: dict, joint: list[dict], tolerance_pt: float) -> dict:
    """The issue's time claim: a joint plan at equal or better accuracy (within ``tolerance_pt``)
    *and* equal or smaller size than the sequential result, and its training time against the
    sequential pipeline's (both stages)."""
    entry: dict = {"sequential": seq["label"], "sequential_acc": seq["test_acc"],
                   "sequential_size_bytes": seq["size_model_bytes"], "sequential_train_s": seq.get("train_s")}
    match = [j for j in joint if 100 * j["test_acc"] >= 100 * seq["test_acc"] - tolerance_pt
             and j["size_model_bytes"] <= seq["size_model_bytes"] * 1.0001]
    if not match:
        entry["joint"] = None
        return entry
    best = min(match, key=lambda j: j.get("train_s") or 0.0)
    entry.update({"joint": best["label"], "joint_acc": best["test_acc"], "joint_size_bytes": best["size_model_bytes"],
                  "joint_train_s": best.get("train_s")})
    if best.get("train_s") and seq.get("train_s"):
        entry["time_ratio"] = best["train_s"] / seq["train_s"]
    return entry


def _mean_sd(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    mean = sum(values) / len(values)
    sd = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else 0.0
    return mean, sd


def _group(rows: list[dict]) -> dict[tuple[str, str | None], list[dict]]:
    """Rows by (method, target or weight bits), the seeds of one configuration together."""
    groups: dict[tuple[str, str | None], list[dict]] = {}
    for r in rows:
        key = r.get("target") if r["method"] in STRATEGY_METHODS else (
            f"W{r['weight_bits']}" if r["method"] == "uniform" else r["label"].rsplit(" s", 1)[0])
        groups.setdefault((r["method"], key), []).append(r)
    return groups


def strategy_summary(rows: list[dict], tolerance_pt: float) -> dict:
    """The ``--strategies`` runs over seeds: per (method, budget) the mean and standard deviation
    of test accuracy, size and energy (x the all-8-bit model) and search seconds; per method its
    mean search time; and, per method and uniform baseline, the smallest (and the lowest-energy)
    budget whose mean accuracy is within ``tolerance_pt`` points of the baseline's mean."""
    ok = _ok(rows)
    configs = []
    for (method, key), group in _group(ok).items():
        acc, acc_sd = _mean_sd([100 * r["test_acc"] for r in group])
        size, _ = _mean_sd([r["size_vs_w8"] for r in group if r.get("size_vs_w8") is not None])
        energy, _ = _mean_sd([r["energy_vs_w8"] for r in group if r.get("energy_vs_w8") is not None])
        search, _ = _mean_sd([r.get("search_s") or 0.0 for r in group])
        wall, _ = _mean_sd([r.get("wall_s") or 0.0 for r in group])
        configs.append({"method": method, "config": key, "seeds": sorted(r.get("seed") or 0 for r in group),
                        "test_acc_mean": acc, "test_acc_sd": acc_sd, "size_vs_w8_mean": size,
                        "energy_vs_w8_mean": energy, "search_s_mean": search, "wall_s_mean": wall})
    failed = {}
    for r in rows:
        if "error" in r and r.get("method") in STRATEGY_METHODS:
            failed.setdefault(r["method"], []).append(f"{r['label']}: {r['error'][:160]}")
    search_time = {m: _mean_sd([r.get("search_s") or 0.0 for r in ok if r["method"] == m])[0]
                   for m in dict.fromkeys(r["method"] for r in ok)}
    iso: dict[str, dict] = {}
    for base in [c for c in configs if c["method"] == "uniform"]:
        entry = {"baseline_acc_mean": base["test_acc_mean"], "baseline_size_vs_w8": base["size_vs_w8_mean"],
                 "baseline_energy_vs_w8": base["energy_vs_w8_mean"]}
        for method in STRATEGY_METHODS:
            cands = [c for c in configs if c["method"] == method
                     and c["test_acc_mean"] >= base["test_acc_mean"] - tolerance_pt]
            if not any(c["method"] == method for c in configs):
                continue
            if not cands:
                entry[method] = None
                continue
            small = min(cands, key=lambda c: c["size_vs_w8_mean"])
            low = min(cands, key=lambda c: c["energy_vs_w8_mean"] if c["energy_vs_w8_mean"] is not None else 9e9)
            entry[method] = {"smallest": small["config"], "acc": small["test_acc_mean"],
                             "size_vs_w8": small["size_vs_w8_mean"],
                             "size_reduction_pct": 100 * (1 - small["size_vs_w8_mean"] / base["size_vs_w8_mean"]),
                             "lowest_energy": low["config"], "energy_vs_w8": low["energy_vs_w8_mean"],
                             "energy_reduction_pct": (100 * (1 - low["energy_vs_w8_mean"] / base["energy_vs_w8_mean"])
                                                      if low["energy_vs_w8_mean"] and base["energy_vs_w8_mean"]
                                                      else None)}
        iso[f"{base['config']}A8 QAT"] = entry
    return {"tolerance_points": tolerance_pt, "configs": configs, "search_s_mean": search_time,
            "iso_accuracy": iso, "failed": failed}


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """(cost, accuracy) points not dominated (lower cost, higher accuracy), by cost."""
    front, best = [], -1.0
    for c, a in sorted(points, key=lambda p: (p[0], -p[1])):
        if a > best:
            front.append((c, a))
            best = a
    return front


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401

    rows = _ok(result["rows"])
    accs = [100 * r["test_acc"] for r in rows]
    top = max(accs) if accs else 100.0
    # the y range covers the useful region; collapsed runs are drawn hollow on the bottom edge
    ylo = max(0.0, min([a for a in accs if a >= top - 30] + [top - 5]) - 3)
    panels = [("size_model_bytes", "weight size (cost model, bytes, log)"), ("mpic_cycles", "MPIC latency (cycles, log)")]
    if any(r.get("energy_uj") for r in rows):
        panels.append(("energy_uj", "MPIC energy (uJ, log)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 5))
    for ax, (key, xlabel) in zip(axes, panels):
        for method, (marker, colour, label) in STYLE.items():
            pts = [(r[key], 100 * r["test_acc"], r["label"]) for r in rows
                   if r["method"] == method and r.get(key)]
            if not pts:
                continue
            shown = [p for p in pts if p[1] >= ylo]
            hidden = [p for p in pts if p[1] < ylo]
            if shown:
                ax.scatter([p[0] for p in shown], [p[1] for p in shown], marker=marker, color=colour, s=60,
                           label=label, zorder=3, edgecolors="white" if marker != "*" else None)
            if hidden:
                ax.scatter([p[0] for p in hidden], [ylo + 0.4] * len(hidden), marker=marker, s=60, zorder=3,
                           facecolors="none", edgecolors=colour, label=None if shown else label)
                for x, y, _lab in hidden:
                    ax.annotate(f"{y:.0f}%", (x, ylo + 0.4), textcoords="offset points", xytext=(4, 4),
                                fontsize=7, color=colour)
            if method == "uniform":
                for x, y, lab in shown:
                    ax.annotate(lab.split()[0], (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7)
            if method.startswith("joint") or method in STRATEGY_METHODS:
                front = pareto_front([(p[0], p[1]) for p in pts])
                ax.plot([p[0] for p in front], [max(p[1], ylo + 0.4) for p in front], color=colour, lw=1, zorder=2)
        ax.set_xscale("log")
        lo, hi = ax.get_xlim()
        if hi / lo > 10:  # minor labels only where no decade label is shown
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test accuracy (%, onnxruntime)")
        ax.grid(True, which="both", alpha=0.3)
        ax.set_ylim(ylo, top + 1.5)
    axes[0].legend(fontsize=8, loc="lower right")
    fig.suptitle(f"{result['task']} / {result['network']}: accuracy vs size, MPIC cycles and energy "
                 "(hollow markers on the bottom edge: runs below the y range, accuracy annotated)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt(value, spec: str) -> str:
    return format(value, spec) if value is not None else "-"


def _bits_text(plan: dict) -> str:
    """``"2b:174 4b:80 8b:10"``: weight channels per bit-width of a plan summary."""
    return " ".join(f"{b}b:{n}" for b, n in (plan.get("weight_bits") or {}).items())


def markdown(results: list[dict], meta: dict) -> str:
    """The README's tables: every row per task, then the headline against the paper's claims."""
    lines = [f"Mode `{meta['mode']}`: {meta['epochs']} search + {meta['finetune_epochs']} QAT epochs, "
             f"8-bit activations, {meta.get('jobs') or meta['cpu_count']} job(s) at once x {meta['torch_threads']} torch thread(s) "
             f"on {meta['cpu_count']} CPUs ({meta.get('device', 'cpu')}), {meta['seconds'] / 60:.0f} min of "
             "experiment time in all"
             + (f", merged from {len(meta['merged_from'])} runs (`--report-only`)."
                if meta.get("merged_from") else ".")]
    if (meta.get("jobs") or meta["cpu_count"]) > 1 or meta.get("merged_from"):
        lines += ["", "Training times (train s) were measured with other jobs running: compare them only "
                      "as rough figures; a timing comparison needs a run alone on the machine."]
    for res in results:
        seen = "labelled" if res.get("labels", True) else "unlabelled (distillation from the FP32 model)"
        lines += ["", f"**{res['task']} / {res['network']}** ({res['task_description']}; compress sees "
                      f"{res['n_compress']} {seen} samples, accuracy on {res['n_test']} test samples)", "",
                  "| method | test acc | size (cost model) | x W8 | file | MPIC cycles | ORT b1 / b32 ms "
                  "| train s | kept / total | weight bits |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in res["rows"]:
            if "error" in r:
                lines.append(f"| {r['label']} | failed: {r['error'][:80]} |||||||||")
                continue
            plan = r.get("plan") or {}
            bits = _bits_text(plan)
            kept = f"{plan['weight_channels_kept']} / {plan['weight_channels_total']}" if plan else ""
            lines.append(f"| {r['label']} | {100 * r['test_acc']:.2f}% | {_fmt(r.get('size_model_bytes'), ',.0f')} B "
                         f"| {_fmt(r.get('size_vs_w8'), '.3f')} | {r['file_bytes']:,} B "
                         f"| {_fmt(r.get('mpic_cycles'), '.3g')} "
                         f"| {_fmt(r.get('latency_b1_ms'), '.3f')} / {_fmt(r.get('latency_b32_ms'), '.2f')} "
                         f"| {_fmt(r.get('train_s'), '.0f')} | {kept} | {bits} |")
        h = res["headline"]
        lines += ["", f"Smallest joint plan within {h['tolerance_points']} pt of the baseline's accuracy:", ""]
        for name in ("W8A8 QAT", "W2A8 QAT", "ORT quantize_static int8"):
            e = h.get(name)
            if not isinstance(e, dict):
                continue
            if e.get("joint") is None:
                lines.append(f"- vs {name} ({100 * e['baseline_acc']:.2f}%): no joint plan that accurate")
            else:
                lines.append(f"- vs {name} ({100 * e['baseline_acc']:.2f}%): {e['joint']} "
                             f"({100 * e['joint_acc']:.2f}%), size {-e['size_reduction_pct']:+.1f}% "
                             f"(paper: {PAPER.get(name, 'n/a')}), file {-e['file_reduction_pct']:+.1f}%")
        for e in h.get("joint_vs_sequential", []):
            if e.get("joint") is None:
                lines.append(f"- vs {e['sequential']} ({100 * e['sequential_acc']:.2f}%, "
                             f"{e['sequential_size_bytes']:,.0f} B): no joint plan as accurate and as small")
            else:
                lines.append(f"- vs {e['sequential']} ({100 * e['sequential_acc']:.2f}%, "
                             f"{e['sequential_size_bytes']:,.0f} B, {e['sequential_train_s'] or 0:.0f} s): "
                             f"{e['joint']} ({100 * e['joint_acc']:.2f}%, {e['joint_size_bytes']:,.0f} B, "
                             f"{e['joint_train_s'] or 0:.0f} s): training time x{e.get('time_ratio', 0):.2f} "
                             "(target <= 0.5)")
        onnxsim_rows = [k for k, e in h.items() if k.startswith("onnxsim") and isinstance(e, dict)]
        for name in onnxsim_rows:
            e = h[name]
            if e.get("joint") is None:
                lines.append(f"- vs {name} ({100 * e['baseline_acc']:.2f}%): no joint plan that accurate")
            else:
                lines.append(f"- vs {name} ({100 * e['baseline_acc']:.2f}%, {e['baseline_size_bytes']:,.0f} B): "
                             f"{e['joint']} ({100 * e['joint_acc']:.2f}%), size {-e['size_reduction_pct']:+.1f}%, "
                             f"file {-e['file_reduction_pct']:+.1f}%")
        if res.get("seed_summary"):
            lines += ["", *seed_markdown(res["seed_summary"])]
        if res.get("strategies_summary"):
            lines += ["", *strategy_markdown(res["strategies_summary"])]
    return "\n".join(lines) + "\n"


def strategy_markdown(summary: dict) -> list[str]:
    """The --strategies table (mean over seeds) and the iso-accuracy lines."""
    lines = ["Strategies and uniform baselines, mean over seeds (sd of test accuracy); size and energy "
             "(mpic_energy) relative to the all-8-bit model; search = wall seconds of the search phase:", "",
             "| method | budget | seeds | test acc (sd) | size x W8 | energy x W8 | search s | job wall s |",
             "|---|---|---|---|---|---|---|---|"]
    for c in summary["configs"]:
        if c["method"] not in ("uniform", *STRATEGY_METHODS):
            continue
        lines.append(f"| {c['method']} | {c['config']} | {','.join(map(str, c['seeds']))} "
                     f"| {c['test_acc_mean']:.2f}% ({c['test_acc_sd']:.2f}) | {_fmt(c['size_vs_w8_mean'], '.3f')} "
                     f"| {_fmt(c['energy_vs_w8_mean'], '.3f')} | {_fmt(c['search_s_mean'], '.1f')} "
                     f"| {_fmt(c['wall_s_mean'], '.1f')} |")
    lines += ["", f"At iso-accuracy (mean within {summary['tolerance_points']} pt of a uniform baseline's mean):", ""]
    for base, entry in summary["iso_accuracy"].items():
        for method in STRATEGY_METHODS:
            if method not in entry:
                continue
            e = entry[method]
            if e is None:
                lines.append(f"- {method} vs {base} ({entry['baseline_acc_mean']:.2f}%): no budget that accurate")
                continue
            energy = (f"; lowest energy {e['lowest_energy']} at {e['energy_vs_w8']:.3f} "
                      f"({-e['energy_reduction_pct']:+.1f}% vs the baseline's)" if e.get("energy_reduction_pct") is not None
                      else "")
            lines.append(f"- {method} vs {base} ({entry['baseline_acc_mean']:.2f}%, size {entry['baseline_size_vs_w8']:.3f}):"
                         f" {e['smallest']} {e['acc']:.2f}% at {e['size_vs_w8']:.3f} "
                         f"({-e['size_reduction_pct']:+.1f}%){energy}")
    for method, errors in summary.get("failed", {}).items():
        lines.append(f"- {method}: {len(errors)} job(s) failed, e.g. {errors[0]}")
    return lines


def write_outputs(results: list[dict], meta: dict, out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "pareto.json", "csv": out / "pareto.csv", "md": out / "pareto.md"}
    paths["md"].write_text(markdown(results, meta))
    paths["json"].write_text(json.dumps({"meta": meta, "experiments": results}, indent=2, default=str))
    with open(paths["csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=ROW_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for res in results:
            for r in res["rows"]:
                flat = dict(r)
                plan = r.get("plan") or {}
                flat["weight_channels_kept"] = plan.get("weight_channels_kept")
                flat["weight_channels_total"] = plan.get("weight_channels_total")
                flat["weight_bits"] = _bits_text(plan)
                writer.writerow(flat)
    for res in results:
        p = out / f"pareto_{res['task']}_{res['network']}.png"
        plot(res, p)
        paths[f"png_{res['task']}_{res['network']}"] = p
    return paths


def print_table(res: dict) -> None:
    log(f"\n== {res['task']} / {res['network']}: test accuracy (onnxruntime), {res['n_test']} test samples ==")
    head = (f"{'method':<28} {'acc %':>6} {'size B':>8} {'xW8':>5} {'file B':>8} {'BOPs':>9} {'MPIC cyc':>9} "
            f"{'lat1 ms':>7} {'lat32 ms':>8} {'train s':>7}  kept/total  weight bits")
    log(head)
    log("-" * len(head))
    for r in res["rows"]:
        if "error" in r:
            log(f"{r['label']:<28} FAILED: {r['error'][:100]}")
            continue
        plan = r.get("plan") or {}
        bits = _bits_text(plan)
        kept = f"{plan['weight_channels_kept']}/{plan['weight_channels_total']}" if plan else ""
        log(f"{r['label']:<28} {100 * r['test_acc']:6.2f} {_fmt(r.get('size_model_bytes'), '8,.0f')} "
            f"{_fmt(r.get('size_vs_w8'), '5.3f')} {r['file_bytes']:8,} {_fmt(r.get('bops'), '9.3g')} "
            f"{_fmt(r.get('mpic_cycles'), '9.3g')} {_fmt(r.get('latency_b1_ms'), '7.3f')} "
            f"{_fmt(r.get('latency_b32_ms'), '8.3f')} {_fmt(r.get('train_s'), '7.1f')}  {kept:>10}  {bits}")
    h = res["headline"]
    log(f"headline (smallest joint plan within {h['tolerance_points']} pt of each baseline's accuracy):")
    for e in h.get("joint_vs_sequential", []):
        if e.get("joint") is None:
            log(f"  joint vs {e['sequential']}: no joint plan at least as accurate and as small")
        else:
            log(f"  joint vs {e['sequential']} ({100 * e['sequential_acc']:.2f}%, {e['sequential_size_bytes']:,.0f} B, "
                f"{e['sequential_train_s'] or 0:.0f}s): {e['joint']} ({100 * e['joint_acc']:.2f}%, "
                f"{e['joint_size_bytes']:,.0f} B, {e['joint_train_s'] or 0:.0f}s), time x{e.get('time_ratio', 0):.2f}")
    for name, e in h.items():
        if not isinstance(e, dict):
            continue
        if e.get("joint") is None:
            log(f"  vs {name:<26} ({100 * e['baseline_acc']:.2f}%): no joint plan that accurate")
        else:
            extra = f", MPIC {-e['mpic_reduction_pct']:+.1f}%" if "mpic_reduction_pct" in e else ""
            log(f"  vs {name:<26} ({100 * e['baseline_acc']:.2f}%): {e['joint']} ({100 * e['joint_acc']:.2f}%) "
                f"size {-e['size_reduction_pct']:+.1f}%, file {-e['file_reduction_pct']:+.1f}%{extra}; "
                f"train {e['joint_train_s'] or 0:.0f}s vs {e['baseline_train_s'] or 0:.0f}s")


def print_strategies(res: dict) -> None:
    if res.get("strategies_summary"):
        log("")
        for line in strategy_markdown(res["strategies_summary"]):
            log(line)


def _experiments(name: str, mode: dict, args: argparse.Namespace) -> list[tuple]:
    """(task, network, width, fp32 epochs, compress samples, overrides) per experiment."""
    experiments = [(*e, {}) if len(e) == 5 else e for e in mode["experiments"]]
    if args.tasks:
        defaults = {e[0]: e for e in MODES["full"]["experiments"]} | {e[0]: e for e in mode["experiments"]}
        chosen = []
        for spec in args.tasks.split(","):
            parts = spec.split(":")
            base = defaults.get(parts[0], (parts[0], "resnet8", 0.5, 20, None))
            net = parts[1] if len(parts) > 1 else base[1]
            width = float(parts[2]) if len(parts) > 2 else base[2]
            chosen.append((parts[0], net, width, base[3], base[4], base[5] if len(base) > 5 else {}))
        experiments = chosen
    if args.lambdas:  # the command line wins over the mode's per-task grids
        size = [float(x) for x in args.lambdas.split(",")]
        experiments = [(*e[:5], {**e[5], "lambdas": {**e[5].get("lambdas", mode["lambdas"]), "size": size}})
                       for e in experiments]
    return experiments


def mode_settings(mode: dict, task: str, network: str) -> dict | None:
    """The grids ``mode`` runs for (task, network), None if it has no such experiment."""
    for e in mode["experiments"]:
        if e[0] == task and e[1] == network:
            return {**{k: mode[k] for k in ("lambdas", "sequential", "uniform_bits")}, **(e[5] if len(e) > 5 else {})}
    return None


def report_only(folders: list[Path], out: Path) -> int:
    """Rebuild the outputs from earlier runs: each folder's ``pareto.json`` if the run finished,
    else its ``partial/`` results; one experiment found in several runs is merged (in order),
    keeping the sweep rows the first run's mode (as the code defines it now) produces."""
    by_key: dict[tuple[str, str], list[dict]] = {}
    metas = []
    for folder in folders:
        if (folder / "pareto.json").exists():
            data = json.loads((folder / "pareto.json").read_text())
            found, metas = data["experiments"], [*metas, data["meta"]]
        else:
            found = [json.loads(f.read_text()) for f in sorted((folder / "partial").glob("*.json"))]
        if not found:
            log(f"{folder}: no pareto.json and no partial/*.json results")
            return 2
        for res in found:
            by_key.setdefault((res["task"], res["network"]), []).append(res)
    mode = MODES.get(metas[0]["mode"]) if metas else None
    results = [merge_results(v, mode_settings(mode, *key) if mode else None)  # also recomputes each headline
               for key, v in by_key.items()]
    for res in results:
        print_table(res)
    meta = dict(metas[0]) if metas else {"mode": "merged", "epochs": results[0].get("epochs"),
                                         "finetune_epochs": results[0].get("finetune_epochs"),
                                         "torch_threads": 1, "cpu_count": os.cpu_count()}
    meta["seconds"] = sum(r.get("seconds", 0.0) for r in results)
    meta["merged_from"] = [str(f) for f in folders]
    paths = write_outputs(results, meta, out)
    log("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="digits + MNIST-1D, small budget (about 6 min, 2 cores)")
    parser.add_argument("--smoke", action="store_true", help="the smallest configuration (the smoke test)")
    parser.add_argument("--tasks", help="comma-separated task:network[:width] (e.g. digits:dscnn,mnist1d:resnet8)")
    parser.add_argument("--lambdas", help="comma-separated lambdas for the size cost (overrides the mode's)")
    parser.add_argument("--costs", help="comma-separated cost models to sweep (default: size; full: size,mpic)")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"comma-separated subset of {','.join(METHODS)} (default: all)")
    parser.add_argument("--epochs", type=int, help="search epochs")
    parser.add_argument("--finetune-epochs", type=int, help="fine-tuning epochs")
    parser.add_argument("--out", type=Path, default=HERE / "out", help="output folder (default benchmarks/out)")
    parser.add_argument("--report-only", type=Path, nargs="+", metavar="RUN_DIR",
                        help="no training: rebuild the outputs in --out from these runs' partial/ results")
    parser.add_argument("--seed", type=int, default=0, help="the seed of the FP32 training and data subset, and "
                        "of the compress jobs unless --seeds is given")
    parser.add_argument("--seeds", help="comma-separated seeds of every compress job (e.g. 0,1,2; default: --seed)")
    parser.add_argument("--strategies", default="",
                        help="strategies run at every --targets budget beside the baselines, e.g. gradient,bayesian,rl")
    parser.add_argument("--targets", default="size=50%,35%,25%",
                        help="budgets of the --strategies runs (default size=50%%,35%%,25%%)")
    parser.add_argument("-S", "--strategy-option", dest="strategy_options", action="append", default=[],
                        metavar="STRATEGY.NAME=VALUE", help="an option of one strategy, e.g. -S rl.episodes=60")
    parser.add_argument("--no-labels", action="store_true",
                        help="compress jobs see the training inputs without labels (distillation from the FP32 model)")
    parser.add_argument("--uniform-bits", help="comma-separated widths of the uniform baselines (default 8,4,2)")
    parser.add_argument("--sequential-configs", type=int, help="run only the first N sequential pairs of each task")
    parser.add_argument("--qat-schedule", default=DEFAULT_QAT_SCHEDULE, choices=QAT_SCHEDULES,
                        help="QAT learning-rate schedule of every compress job (compress --qat-schedule; "
                             f"default {DEFAULT_QAT_SCHEDULE}, compress's default)")
    parser.add_argument("--keep-best-qat", action="store_true",
                        help="every compress job's QAT ends on its best held-out epoch (CompressConfig.keep_best_qat)")
    parser.add_argument("--act-bits", default="8", help="activation widths of every compress job (default 8: wXa8)")
    parser.add_argument("--weight-bits", default="0,2,4,8",
                        help="weight widths the --strategies jobs search, 0 = pruned (compress --weight-bits; "
                             "default 0,2,4,8)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (Ray CPUs) per job (default 1)")
    parser.add_argument("--jobs", type=int, default=None,
                        help="CPUs of the local Ray: compress jobs at once (default: the machine's CPUs)")
    parser.add_argument("--address", help="run the compress jobs on this Ray cluster instead of a local Ray")
    parser.add_argument("--resume", action="store_true",
                        help="keep the finished jobs of an earlier run in OUT/sweeps/ (same settings) and run the rest")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                        help="device of the searches and fine-tuning (FP32 training stays on the CPU)")
    args = parser.parse_args(argv)
    if args.report_only:
        return report_only(args.report_only, args.out)
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip() and m.strip() != "none")
    if set(methods) - set(METHODS):
        parser.error(f"--methods: unknown {sorted(set(methods) - set(METHODS))}; choose from {', '.join(METHODS)}")
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.ERROR)
    logging.getLogger().setLevel(logging.ERROR)  # onnxruntime.quantization logs through the root logger
    name = "smoke" if args.smoke else ("quick" if args.quick else "full")
    mode = {k: (dict(v) if isinstance(v, dict) else v) for k, v in MODES[name].items()}
    costs = args.costs.split(",") if args.costs else (["size", "mpic"] if name == "full" else ["size"])
    experiments = _experiments(name, mode, args)
    cfg = bb.BenchConfig(epochs=args.epochs or mode["epochs"],
                         finetune_epochs=args.finetune_epochs if args.finetune_epochs is not None
                         else mode["finetune_epochs"], latency_runs=mode["latency_runs"], seed=args.seed,
                         device=args.device)
    strategies = tuple(sweep.parse_strategies(args.strategies)) if args.strategies else ()
    from plugin.space import Precisions

    run = RunOptions(strategies=strategies, targets=tuple(sweep.parse_targets(args.targets)) if strategies else (),
                     seeds=tuple(sweep.parse_seeds(args.seeds)) if args.seeds else (args.seed,),
                     strategy_options=sweep.parse_job_options(args.strategy_options, strategies),
                     act_bits=Precisions.parse(None, args.act_bits).activations,
                     weight_bits=Precisions.parse(args.weight_bits, None).weights,
                     address=args.address, num_cpus=None if args.address else args.jobs,
                     cpus_per_job=float(args.threads), resume=args.resume, progress=not args.no_progress,
                     labels=not args.no_labels, sequential_configs=args.sequential_configs,
                     qat_schedule=args.qat_schedule, keep_best_qat=args.keep_best_qat,
                     uniform_bits=tuple(int(b) for b in args.uniform_bits.split(",")) if args.uniform_bits else None)
    start = time.perf_counter()
    made_at = commit()  # the jobs record it too; taken before the run (others may commit meanwhile)
    results = [run_experiment(task_name, network, width, fp32_epochs, n, mode, cfg, costs,
                              args.out / "partial" / f"{task_name}_{network}.json", overrides, methods, run, args.out)
               for task_name, network, width, fp32_epochs, n, overrides in experiments]
    for res in results:
        print_table(res)
        print_strategies(res)
    meta = {"mode": name, "epochs": cfg.epochs, "finetune_epochs": cfg.finetune_epochs, "costs": costs,
            "methods": methods, "lambdas": mode["lambdas"], "sequential": mode["sequential"], "seed": args.seed,
            "seeds": list(run.seeds), "strategies": list(strategies), "targets": list(run.targets),
            "strategy_options": run.strategy_options, "torch_threads": args.threads, "jobs": args.jobs,
            "device": args.device, "ray_address": args.address, "seconds": time.perf_counter() - start,
            "command": command_line(), "commit": made_at, "versions": versions("ray"),
            "cpu_count": os.cpu_count(), "labels": run.labels, "qat_schedule": run.qat_schedule,
            "keep_best_qat": run.keep_best_qat, "strategy_weight_bits": list(run.weight_bits),
            "activations": f"act_bits={tuple(run.act_bits)} for every compress job"}
    paths = write_outputs(results, meta, args.out)
    log(f"\ntotal {meta['seconds']:.0f}s; wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
