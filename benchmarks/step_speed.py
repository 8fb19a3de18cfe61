"""One search step of the gradient strategy's supernet vs one plain FP32 training step.

Both train the same bridged torch module (``plugin.bridge.convert`` of the normalised model) on
the same batches (batch 64, CPU, torch threads ``--threads``, default 1 as compress uses for
small models): the FP32 step is forward + cross-entropy + backward + Adam; the search step is
``SearchRunner.run_epoch``'s step (the supernet's forward with every quantizer mixing its
precisions, the distillation loss against the FP32 teacher (the default ``task_loss``), the cost,
backward, Adam on the weights and SGD on the logits). Each is timed over ``--steps`` steps
after ``--warmup`` steps, ``--repeats`` times (interleaved); the median per-step wall time and
process CPU time (``time.process_time``: less sensitive to other processes on a shared machine,
one thread) are reported, with the
bytes of the tensors autograd saves for backward in one step (the training memory proper), the
peak Python-heap memory (tracemalloc, over one timed pass) and the process's peak RSS
(``resource.getrusage``, which only grows: the FP32 run comes first), and the 1-minute load
average before and after (the machine is shared).

    python benchmarks/step_speed.py --out benchmarks/results/step-speed-cpu
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "benchmarks"] + [str(ROOT / "benchmarks")]

import provenance  # noqa: E402


def _models() -> list[tuple[str, Path, np.ndarray, np.ndarray]]:
    import bench_networks as bn
    from bench_tasks import load_task

    z = np.load(ROOT / "samples/digits/train.npz")
    out = [("digits-sample", ROOT / "samples/digits/model.onnx", z["input"], z["labels"])]
    task = load_task("digits", bn.CACHE)
    path, _ = bn.get_model(task, "resnet8", 1.0, 40, 0)
    out.append(("digits-resnet8", path, task.x_train, task.y_train))
    return out


def _timed(step, batches, warmup: int, steps: int) -> tuple[float, float, int]:
    """(wall seconds, process CPU seconds) per step, and the tracemalloc peak (Python heap)."""
    for b in batches[:warmup]:
        step(b)
    tracemalloc.start()
    start, cpu = time.perf_counter(), time.process_time()
    for b in batches[warmup:warmup + steps]:
        step(b)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return seconds / steps, cpu_seconds / steps, peak


def saved_bytes(step, batch) -> int:
    """Bytes of the distinct tensors autograd saves for backward in one step (the activation
    memory of training, which tracemalloc and RSS do not show)."""
    seen: dict[tuple, int] = {}

    def pack(t):
        key = (t.untyped_storage().data_ptr(), t.device.type)
        seen[key] = max(seen.get(key, 0), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step(batch)
    return sum(seen.values())


def measure(name: str, path: Path, x: np.ndarray, y: np.ndarray, args) -> dict:
    from graph_passes.prepare import prepare_model
    from plugin.bridge import convert
    from plugin.data import Dataset
    from plugin.engine.batches import iterate_batches, task_loss
    from plugin.engine.config import SearchConfig
    from plugin.engine.supernet import SearchRunner, Supernet
    from plugin.space import Precisions, SearchSpace

    prepared = prepare_model(str(path))
    data = Dataset({prepared.model.graph.input[0].name: x.astype(np.float32)}, y.astype(np.int64))
    config = SearchConfig(batch_size=64, progress=False, seed=0)
    space = SearchSpace(prepared.analysis, Precisions(config.weight_precisions, config.activation_precisions))
    n = args.warmup + args.steps
    batches = list(iterate_batches(data, [prepared.model.graph.input[0].name], 64, 0, torch.device("cpu"), n))
    while len(batches) < n:
        batches += batches[: n - len(batches)]

    fp32 = convert(prepared.model).module.train(False)
    opt = torch.optim.Adam(fp32.parameters(), lr=1e-3)

    def fp32_step(batch) -> None:
        inputs, labels = batch
        loss = task_loss("cross_entropy", fp32(*inputs), None, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    net = Supernet.build(prepared.model, config, space=space)
    runner = SearchRunner(net, data, config)

    def search_step(batch) -> None:  # the body of SearchRunner.run_epoch
        inputs, labels = batch
        teacher = net.teacher_outputs(*inputs) if config.task_loss != "cross_entropy" else None
        loss = task_loss(config.task_loss, net(*inputs), teacher, labels) + 1.0 * net.cost(config.cost_model) * runner.cost_scale
        runner.weight_opt.zero_grad(set_to_none=True)
        runner.alpha_opt.zero_grad(set_to_none=True)
        loss.backward()
        runner.weight_opt.step()
        runner.alpha_opt.step()

    if args.ab_forward:
        return _ab_forward(name, search_step, batches, args)
    rows: dict[str, list] = {"fp32": [], "search": []}
    cpu: dict[str, list] = {"fp32": [], "search": []}
    peaks: dict[str, int] = {}
    rss: dict[str, int] = {}
    for _ in range(args.repeats):  # interleaved, so load changes hit both
        for kind, step in (("fp32", fp32_step), ("search", search_step)):
            t, c, peak = _timed(step, batches, args.warmup, args.steps)
            rows[kind].append(t)
            cpu[kind].append(c)
            peaks[kind] = max(peaks.get(kind, 0), peak)
            rss[kind] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    saved = {"fp32": saved_bytes(fp32_step, batches[0]), "search": saved_bytes(search_step, batches[0])}
    fp32_s, search_s = statistics.median(rows["fp32"]), statistics.median(rows["search"])
    fp32_c, search_c = statistics.median(cpu["fp32"]), statistics.median(cpu["search"])
    return {"model": name, "fp32_step_ms": 1000 * fp32_s, "search_step_ms": 1000 * search_s,
            "ratio": search_s / fp32_s, "fp32_step_cpu_ms": 1000 * fp32_c, "search_step_cpu_ms": 1000 * search_c,
            "cpu_ratio": search_c / fp32_c, "fp32_cpu_runs_ms": [1000 * t for t in cpu["fp32"]],
            "search_cpu_runs_ms": [1000 * t for t in cpu["search"]], "fp32_runs_ms": [1000 * t for t in rows["fp32"]],
            "search_runs_ms": [1000 * t for t in rows["search"]],
            "tracemalloc_peak_kib": {k: v / 1024 for k, v in peaks.items()},
            "maxrss_kib_after": rss, "autograd_saved_kib": {k: v / 1024 for k, v in saved.items()}, "task_loss": config.task_loss}


def _ab_forward(name: str, search_step, batches, args) -> dict:
    """The search step with the quantizers' forward as ``quant(x).y`` (before commit a6da0b2) and
    as it is now, interleaved in one process: CPU ms per step, median of ``--repeats``."""
    from plugin.engine import quantizers as q

    new = {cls: cls.forward for cls in (q.SearchableWeightQuantizer, q.SearchableActivationQuantizer)}
    runs: dict[str, list[float]] = {"quant_y": [], "forward": []}
    try:
        for _ in range(args.repeats):
            for kind in runs:
                for cls, fwd in new.items():
                    cls.forward = (lambda self, t: self.quant(t).y) if kind == "quant_y" else fwd
                runs[kind].append(1000 * _timed(search_step, batches, args.warmup, args.steps)[1])
    finally:
        for cls, fwd in new.items():
            cls.forward = fwd
    old, now = statistics.median(runs["quant_y"]), statistics.median(runs["forward"])
    return {"model": name, "quant_y_cpu_ms": old, "forward_cpu_ms": now, "less": 1 - now / old, "runs_ms": runs}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path)
    ap.add_argument("--label", default="")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ab-forward", action="store_true",
                    help="only the search step, old quantizer forward (quant(x).y) vs the current one, interleaved")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    rows = [measure(*m, args) for m in _models()]
    load_after = os.getloadavg()
    if args.ab_forward:
        text = "\n".join([f"search step CPU ms, quantizer forward as quant(x).y vs now, median of {args.repeats} x "
                          f"{args.steps} steps; load average before {'/'.join(f'{v:.2f}' for v in load_before)}, "
                          f"after {'/'.join(f'{v:.2f}' for v in load_after)}", ""]
                         + [f"- {r['model']}: {r['quant_y_cpu_ms']:.1f} -> {r['forward_cpu_ms']:.1f} ms "
                            f"({100 * r['less']:.1f}% less)" for r in rows])
        print(text)
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            record = {"command": provenance.command_line(), "commit": provenance.commit(),
                      "versions": provenance.versions(), "load_average_before": load_before,
                      "load_average_after": load_after, "rows": rows}
            (args.out / "ab-forward.json").write_text(json.dumps(record, indent=2))
            (args.out / "ab-forward.md").write_text(text + f"\n\ncommit {record['commit']}\n")
        return 0
    lines = [f"step speed ({args.label or 'run'}): batch 64, CPU, {args.threads} thread(s), median of "
             f"{args.repeats} x {args.steps} steps; load average (1/5/15 min) before "
             f"{'/'.join(f'{v:.2f}' for v in load_before)}, after {'/'.join(f'{v:.2f}' for v in load_after)}", "",
             "| model | FP32 step ms (CPU ms) | search step ms (CPU ms) | ratio wall (CPU) | "
             "autograd-saved KiB (fp32 / search) | Python-heap peak KiB (fp32 / search) | max RSS MiB |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['fp32_step_ms']:.1f} ({r['fp32_step_cpu_ms']:.1f}) | "
                     f"{r['search_step_ms']:.1f} ({r['search_step_cpu_ms']:.1f}) | {r['ratio']:.2f}x ({r['cpu_ratio']:.2f}x) | "
                     f"{r['autograd_saved_kib']['fp32']:.0f} / {r['autograd_saved_kib']['search']:.0f} | "
                     f"{r['tracemalloc_peak_kib']['fp32']:.0f} / {r['tracemalloc_peak_kib']['search']:.0f} | "
                     f"{r['maxrss_kib_after']['search'] / 1024:.0f} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        record = {"label": args.label, "command": provenance.command_line(), "commit": provenance.commit(),
                  "versions": provenance.versions(), "load_average_before": load_before,
                  "load_average_after": load_after, "threads": args.threads, "rows": rows}
        provenance.write_results(args.out, args.label, record, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
