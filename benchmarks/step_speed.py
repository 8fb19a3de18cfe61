"""One search step of the gradient strategy's supernet vs one plain FP32 training step.

Both train the same bridged torch module (``plugin.bridge.convert`` of the normalised model) on
the same batches (batch 64, CPU, torch threads ``--threads``, default 1 as compress uses for
small models): the FP32 step is forward + cross-entropy + backward + Adam; the search step is
``SearchRunner.train_step`` (the body of ``run_epoch``: the supernet's forward with every quantizer
mixing its precisions, the distillation loss against the FP32 teacher (the default
``task_loss``; from the second epoch on its outputs come from the runner's teacher cache, so the
warm-up runs once over every timed batch first), the cost, backward, Adam on the weights and SGD
on the logits; at a commit without ``train_step`` the same body inline); the QAT step is
fine-tuning's step on a ``FakeQuantModel`` with the supernet's initial discretised plan frozen
(teacher forward + distillation + backward + Adam). Each is timed over ``--steps`` steps,
``--repeats`` times (interleaved); the median per-step wall time and process CPU time
(``time.process_time``: less sensitive to other processes on a shared machine, one thread) are
reported. Memory is measured in a separate pass (never in the timed ones, which tracemalloc would
slow): the bytes of the tensors autograd saves for backward in one step, the peak resident set
during one step above the resident set before it (``/proc/self/clear_refs`` resets the
high-water mark, read from ``VmHWM``; the allocator may keep freed memory, so this is a lower
bound on the step's transient memory), the peak Python-heap memory (tracemalloc) and the
process's peak RSS; and the 1-minute load average before and after (the machine is shared).

    python benchmarks/step_speed.py --out benchmarks/results/step-speed-cpu/LABEL

``--ab-frozen-node`` times only the QAT step with the frozen weight quantizers' one-node path off and
on, ``--ab-native`` only the search step with the activation mixture eager or compiled (stop 27). ``--act-bits 8`` searches with fixed 8-bit activations (the pareto benchmark's ``act_bits=(8,)``;
default: the SearchConfig default, searched 2/4/8). ``--ab-speedups`` / ``--ab-cost-acts`` /
``--ab-weight-batch`` / ``--ab-step25`` time only the search step with earlier speed-ups off and
on, interleaved in one process.
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


def _timed(step, batches, warmup: int, steps: int) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) per step."""
    for b in batches[:warmup]:
        step(b)
    start, cpu = time.perf_counter(), time.process_time()
    for b in batches[warmup:warmup + steps]:
        step(b)
    return (time.perf_counter() - start) / steps, (time.process_time() - cpu) / steps


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def memory(step, batches) -> dict:
    """One pass of ``batches`` (not timed): the Python-heap peak (tracemalloc) and, per step, the
    resident-set high-water mark above the resident set before the step (max over the steps)."""
    peak_above = 0
    tracemalloc.start()
    for b in batches:
        before = _status_kib("VmRSS")
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            resettable = True
        except OSError:
            resettable = False
        step(b)
        hwm = _status_kib("VmHWM")
        if resettable and before is not None and hwm is not None:
            peak_above = max(peak_above, hwm - before)
    _, heap = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {"python_heap_peak_kib": heap / 1024, "step_rss_peak_above_kib": peak_above if resettable else None}


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
    from plugin.engine.fakequant import FakeQuantModel
    from plugin.engine.supernet import SearchRunner, Supernet
    from plugin.space import Precisions, SearchSpace

    prepared = prepare_model(str(path))
    data = Dataset({prepared.model.graph.input[0].name: x.astype(np.float32)}, y.astype(np.int64))
    act_bits = None if args.act_bits is None else tuple(int(b) for b in args.act_bits.split(","))
    config = SearchConfig(batch_size=64, progress=False, seed=0, **({} if act_bits is None else {"act_bits": act_bits}))
    sites = config.site_precisions if hasattr(config, "site_precisions") else config.activation_precisions
    space = SearchSpace(prepared.analysis, Precisions(config.weight_precisions, sites))
    n = args.warmup + args.steps
    names = [prepared.model.graph.input[0].name]
    try:
        from plugin.engine.batches import indexed_batches
        batches = list(indexed_batches(data, names, 64, 0, torch.device("cpu"), n))
    except ImportError:  # a commit before indexed_batches
        batches = [(None, b) for b in iterate_batches(data, names, 64, 0, torch.device("cpu"), n)]
    while len(batches) < n:
        batches += batches[: n - len(batches)]

    fp32 = convert(prepared.model).module.train(False)

    def fp32_step_with(opt: torch.optim.Optimizer):
        def fp32_step(batch) -> None:
            _, (inputs, labels) = batch
            loss = task_loss("cross_entropy", fp32(*inputs), None, labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return fp32_step

    fp32_step = fp32_step_with(torch.optim.Adam(fp32.parameters(), lr=1e-3))

    net = Supernet.build(prepared.model, config, space=space)
    runner = SearchRunner(net, data, config)

    def search_step(batch) -> None:
        indices, (inputs, labels) = batch
        if hasattr(runner, "train_step"):
            runner.train_step(inputs, labels, 1.0, indices)
            return
        teacher = net.teacher_outputs(*inputs) if config.task_loss != "cross_entropy" else None  # the old body
        loss = task_loss(config.task_loss, net(*inputs), teacher, labels) + 1.0 * net.cost(config.cost_model) * runner.cost_scale
        runner.weight_opt.zero_grad(set_to_none=True)
        runner.alpha_opt.zero_grad(set_to_none=True)
        loss.backward()
        runner.weight_opt.step()
        runner.alpha_opt.step()

    qat = FakeQuantModel.build(prepared.model, config, space=SearchSpace(
        prepared.analysis, Precisions(config.weight_precisions, sites)))
    qat.freeze(net.discretise())
    qat_opt = torch.optim.Adam(qat.net_parameters(), lr=1e-4)

    def qat_step(batch) -> None:  # plugin.engine.training's fine-tuning step
        _, (inputs, labels) = batch
        loss = task_loss(config.task_loss, qat(*inputs), qat.teacher_outputs(*inputs), labels)
        qat_opt.zero_grad(set_to_none=True)
        loss.backward()
        qat_opt.step()

    for b in batches:  # the teacher cache holds every timed batch: epoch 2 onwards of a search
        search_step(b)
    if args.ab_forward:
        return _ab_forward(name, search_step, batches, args)
    if args.ab_speedups:
        return _ab_speedups(name, runner, search_step, batches, args)
    if args.ab_cost_acts:
        return _ab_cost_acts(name, runner, search_step, batches, args, fp32_step)
    if args.ab_weight_batch:
        return _ab_weight_batch(name, search_step, batches, args, fp32_step)
    if args.ab_native:
        return _ab_native(name, search_step, batches, args, fp32)
    if args.ab_frozen_node:
        return _ab_frozen_node(name, prepared, config, space, net, batches, args, fp32)
    if args.ab_step25:  # beside the FP32 step with torch's fused Adam too
        fp32_fused_step = fp32_step_with(torch.optim.Adam(fp32.parameters(), lr=1e-3, fused=True))
        return _ab_step25(name, runner, search_step, batches, args, fp32_step, fp32_fused_step)
    kinds = {"fp32": fp32_step, "search": search_step, "qat": qat_step}
    rows: dict[str, list] = {k: [] for k in kinds}
    cpu: dict[str, list] = {k: [] for k in kinds}
    for _ in range(args.repeats):  # interleaved, so load changes hit all three
        for kind, step in kinds.items():
            t, c = _timed(step, batches, args.warmup, args.steps)
            rows[kind].append(t)
            cpu[kind].append(c)
    mem = {kind: memory(step, batches[: args.warmup + min(args.steps, 5)]) for kind, step in kinds.items()}
    saved = {kind: saved_bytes(step, batches[0]) for kind, step in kinds.items()}
    wall = {k: statistics.median(v) for k, v in rows.items()}
    cpus = {k: statistics.median(v) for k, v in cpu.items()}
    out = {"model": name, "task_loss": config.task_loss, "maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}
    for kind in kinds:
        out[f"{kind}_step_ms"] = 1000 * wall[kind]
        out[f"{kind}_step_cpu_ms"] = 1000 * cpus[kind]
        out[f"{kind}_runs_ms"] = [1000 * t for t in rows[kind]]
        out[f"{kind}_cpu_runs_ms"] = [1000 * t for t in cpu[kind]]
    out["ratio"], out["cpu_ratio"] = wall["search"] / wall["fp32"], cpus["search"] / cpus["fp32"]
    out["qat_ratio"], out["qat_cpu_ratio"] = wall["qat"] / wall["fp32"], cpus["qat"] / cpus["fp32"]
    out["autograd_saved_kib"] = {k: v / 1024 for k, v in saved.items()}
    out["tracemalloc_peak_kib"] = {k: v["python_heap_peak_kib"] for k, v in mem.items()}
    out["step_rss_peak_above_kib"] = {k: v["step_rss_peak_above_kib"] for k, v in mem.items()}
    return out


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


def _per_width_weight_mixture(w, theta, scale, qmax, clipped=None):
    """The weight mixture's graph before ``_WeightMixtureSTE`` (the same numbers, bit for bit)."""
    from plugin.engine.quantizers import _SymmetricRoundSTE

    weighted = theta * _SymmetricRoundSTE.apply(w.unsqueeze(0), scale, qmax)
    y = weighted[-1]
    for k in range(weighted.shape[0] - 2, -1, -1):
        y = y + weighted[k]
    return y


def _ab_speedups(name: str, runner, search_step, batches, args) -> dict:
    """The search step with issue 15's step speed-ups off (the per-width weight graph, the
    activation mixture's boolean masks, theta per reader, the teacher every step) and on,
    interleaved in one process: CPU ms per step, median of ``--repeats``. Both use the in-place
    forward of the activation mixture and the cached top integers of the weight widths, so "off"
    is a little faster than the code before."""
    import contextlib

    from plugin.engine import quantizers as q
    from plugin.engine import supernet as sn
    from plugin.engine.batches import TeacherCache

    on_cache = runner._teacher_cache
    off_cache = TeacherCache.for_data(runner.searchable.teacher_outputs, runner.data, max_bytes=0)
    saved = (q._FLOAT_MASKS_ON_CPU, sn.theta_cache)

    def restore() -> None:
        q._FLOAT_MASKS_ON_CPU, sn.theta_cache = saved
        if "apply" in q._WeightMixtureSTE.__dict__:
            delattr(q._WeightMixtureSTE, "apply")
        runner._teacher_cache = on_cache

    runs: dict[str, list[float]] = {"off": [], "on": []}
    try:
        for _ in range(args.repeats):
            for kind in runs:
                if kind == "off":
                    q._FLOAT_MASKS_ON_CPU = False
                    q._WeightMixtureSTE.apply = staticmethod(_per_width_weight_mixture)
                    sn.theta_cache = contextlib.nullcontext
                    runner._teacher_cache = off_cache
                else:
                    restore()
                runs[kind].append(1000 * _timed(search_step, batches, args.warmup, args.steps)[1])
    finally:
        restore()
    off, on = statistics.median(runs["off"]), statistics.median(runs["on"])
    return {"model": name, "off_cpu_ms": off, "on_cpu_ms": on, "less": 1 - on / off, "runs_ms": runs}


_AB_VARIANTS = ("off", "acts", "acts+cost", "acts+cost+wclip", "all")


def _ab_cost_acts(name: str, runner, search_step, batches, args, fp32_step) -> dict:
    """The search step with the one-width activation shortcut, the batched size cost, the weight
    node's clip check from the absmax and the denormal probe through Python floats all off
    (``off``), the shortcut only (``acts``), the first two (``acts+cost``), three
    (``acts+cost+wclip``) and all four (``all``), interleaved in one process:
    CPU ms per step (median of ``--repeats`` rounds, and the median over rounds of each variant's
    time over ``off``'s and over the FP32 step's, both timed in the same round), and the CPU ms of the cost's forward + backward alone,
    per-layer vs batched. Many short rounds (``--repeats 30 --steps 5``) pair best on a loaded
    machine."""
    from plugin.engine import quantizers as q
    from plugin.engine import supernet as sn

    saved = (q._SINGLE_WIDTH_SHORTCUT, getattr(sn, "_VECTORISED_SIZE_COST", None))
    net, config = runner.searchable, runner.config
    node = q._WeightMixtureSTE.apply

    def own_clip_check(w, theta, scale, qmax, clipped=None):  # the node's K x |w| check, as before
        return node(w, theta, scale, qmax)

    probe = q._subnormal_bound_holds

    def tensor_probe(lowest: float, dtype: torch.dtype) -> bool:  # the one-element kernel, as before
        out = torch.ops.aten.hardtanh_backward(torch.ones(1, dtype=dtype), torch.zeros(1, dtype=dtype), lowest, 1.0)
        return bool(out[0] == 1)

    def set_variant(kind: str) -> None:
        q._SINGLE_WIDTH_SHORTCUT = kind != "off"
        sn._VECTORISED_SIZE_COST = "cost" in kind or kind == "all"
        q._subnormal_bound_holds = probe if kind == "all" else tensor_probe
        if "wclip" in kind or kind == "all":
            if "apply" in q._WeightMixtureSTE.__dict__ and q._WeightMixtureSTE.__dict__["apply"].__func__ is own_clip_check:
                delattr(q._WeightMixtureSTE, "apply")
        else:
            q._WeightMixtureSTE.apply = staticmethod(own_clip_check)

    def cost_step(batch) -> None:
        with q.theta_cache():
            (net.cost(config.cost_model) * runner.cost_scale).backward()

    runs: dict[str, list[float]] = {k: [] for k in _AB_VARIANTS}
    runs["fp32"] = []
    cost_runs: dict[str, list[float]] = {"per_layer": [], "batched": []}
    try:
        for _ in range(args.repeats):
            runs["fp32"].append(1000 * _timed(fp32_step, batches, args.warmup, args.steps)[1])
            for kind in _AB_VARIANTS:
                set_variant(kind)
                runs[kind].append(1000 * _timed(search_step, batches, args.warmup, args.steps)[1])
            for kind in cost_runs:
                sn._VECTORISED_SIZE_COST = kind == "batched"
                cost_runs[kind].append(1000 * _timed(cost_step, batches, args.warmup, args.steps)[1])
    finally:
        set_variant("all")
        q._SINGLE_WIDTH_SHORTCUT, sn._VECTORISED_SIZE_COST = saved
        net.zero_grad(set_to_none=True)
    med = {k: statistics.median(v) for k, v in runs.items()}
    cost_med = {k: statistics.median(v) for k, v in cost_runs.items()}
    # per round, each variant against "off" timed just before it: less sensitive to load drifting
    paired = {k: statistics.median(a / b for a, b in zip(runs[k], runs["off"])) for k in _AB_VARIANTS}
    to_fp32 = {k: statistics.median(a / b for a, b in zip(runs[k], runs["fp32"])) for k in _AB_VARIANTS}
    return {"model": name, "act_bits": list(config.site_precisions), "cpu_ms": med, "runs_ms": runs,
            "paired_ratio_to_off": paired, "paired_ratio_to_fp32": to_fp32, "cost_cpu_ms": cost_med,
            "cost_runs_ms": cost_runs}


def _old_activation_forward(self, x):
    """The searchable activation quantizer's forward before this stop's change (the clip floored
    outside the autograd function; a frozen site through ``quant(x).y``)."""
    from plugin.engine import quantizers as q

    clip = self.clip + (self.clip.clamp_min(q._MIN_CLIP) - self.clip).detach()

    if self.frozen_bits is not None:
        return self.quant(x).y
    if len(self.precisions) == 1 and q._SINGLE_WIDTH_SHORTCUT and self.alpha.logit_mask is None:
        bits = self.precisions[0]
        n = 2 ** (bits - 1) - 1 if self.signed else 2 ** bits - 1
        return q._OneWidthMixtureSTE.apply(x, clip.to(x.dtype), self.alpha.alpha, n, self.signed)
    theta = self.theta().to(x.dtype)
    levels = tuple(2 ** (b - 1) - 1 if self.signed else 2 ** b - 1 for b in self.precisions)
    return q._ActivationMixtureSTE.apply(x, clip.to(x.dtype), theta, levels, self.signed)


def _ab_weight_batch(name: str, search_step, batches, args, fp32_step) -> dict:
    """The search step as before stop 24 (``off``: every layer's weight mixture and bias gate on
    its own, the activation clip floored outside the quantizer's node), with the small layers'
    weight mixtures and bias-gate factors batched (``weights``, ``plugin.engine.weight_batch``),
    and with the activation forward too (``on``, the code as it is), interleaved with the FP32
    step in one process: CPU ms per step (median of ``--repeats`` rounds) and the per-round
    medians of each over ``off`` and over the FP32 step timed in the same round."""
    from plugin.engine import quantizers as q
    from plugin.engine import weight_batch as wb

    saved = wb.ENABLED
    current = q.SearchableActivationQuantizer.forward
    runs: dict[str, list[float]] = {"fp32": [], "off": [], "weights": [], "on": []}
    try:
        for _ in range(args.repeats):
            for kind in runs:
                wb.ENABLED = kind in ("weights", "on")
                q.SearchableActivationQuantizer.forward = current if kind == "on" else _old_activation_forward
                step = fp32_step if kind == "fp32" else search_step
                runs[kind].append(1000 * _timed(step, batches, args.warmup, args.steps)[1])
    finally:
        wb.ENABLED = saved
        q.SearchableActivationQuantizer.forward = current
    med = {k: statistics.median(v) for k, v in runs.items()}
    paired = {k: statistics.median(a / b for a, b in zip(runs[k], runs["off"])) for k in ("weights", "on")}
    to_fp32 = {k: statistics.median(a / b for a, b in zip(runs[k], runs["fp32"])) for k in ("off", "weights", "on")}
    return {"model": name, "cpu_ms": med, "runs_ms": runs, "paired_over_off": paired, "paired_over_fp32": to_fp32}


_STEP25_KINDS = ("fp32", "fp32_fused", "off", "on")


def _ab_step25(name: str, runner, search_step, batches, args, fp32_step, fp32_fused_step) -> dict:
    """Stop 25's step change, interleaved in one process: the search step with torch's default
    Adam on the weights and clips (``off``, as before) and with fused Adam
    (``on``, :mod:`plugin.engine.optimisers`), beside the FP32 step under torch's default Adam
    (``fp32``, the plain step) and under fused Adam (``fp32_fused``, the same optimiser kernel as
    ``on``): CPU ms per step (median of ``--repeats`` rounds) and per-round ratios."""
    from plugin.engine.optimisers import adam
    from plugin.engine.quantizers import net_param_groups

    groups = lambda: net_param_groups(runner.searchable, runner.config.weight_decay)  # noqa: E731
    loop_opt = torch.optim.Adam(groups(), lr=runner.config.lr)
    fused_opt = adam(groups(), lr=runner.config.lr)
    if not fused_opt.defaults.get("fused"):
        raise SystemExit("fused Adam is not available with this torch on this device")
    saved_opt = runner.weight_opt
    runs: dict[str, list[float]] = {k: [] for k in _STEP25_KINDS}
    try:
        for _ in range(args.repeats):
            for kind in runs:
                runner.weight_opt = fused_opt if kind == "on" else loop_opt
                step = {"fp32": fp32_step, "fp32_fused": fp32_fused_step}.get(kind, search_step)
                runs[kind].append(1000 * _timed(step, batches, args.warmup, args.steps)[1])
    finally:
        runner.weight_opt = saved_opt
    med = {k: statistics.median(v) for k, v in runs.items()}
    paired = statistics.median(a / b for a, b in zip(runs["on"], runs["off"]))
    to_fp32 = {k: statistics.median(a / b for a, b in zip(runs[k], runs["fp32"])) for k in ("off", "on")}
    to_fused = {k: statistics.median(a / b for a, b in zip(runs[k], runs["fp32_fused"])) for k in ("off", "on")}
    fused_fp32 = statistics.median(a / b for a, b in zip(runs["fp32_fused"], runs["fp32"]))
    return {"model": name, "cpu_ms": med, "runs_ms": runs, "on_over_off": paired, "paired_over_fp32": to_fp32,
            "paired_over_fp32_fused": to_fused, "fp32_fused_over_fp32": fused_fp32}


_FLAG_KINDS = ("fp32", "off", "on")


def _fused_fp32_step(fp32):
    """The plain FP32 step (cross-entropy, backward) under fused Adam, the optimiser the search and
    QAT use."""
    from plugin.engine.batches import task_loss
    from plugin.engine.optimisers import adam

    opt = adam(fp32.parameters(), lr=1e-3)

    def fp32_step(batch) -> None:
        _, (inputs, labels) = batch
        loss = task_loss("cross_entropy", fp32(*inputs), None, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return fp32_step


def _ab_flag(name: str, flag: str, step, fp32_step, batches, args) -> dict:
    """``step`` with ``plugin.engine.quantizers.<flag>`` False (``off``) and True (``on``),
    interleaved in one process with ``fp32_step``: CPU ms per step and per-round ratios."""
    from plugin.engine import quantizers as qz

    saved = getattr(qz, flag)
    runs: dict[str, list[float]] = {k: [] for k in _FLAG_KINDS}
    try:
        for _ in range(args.repeats):
            for kind in runs:
                setattr(qz, flag, kind == "on")
                runs[kind].append(1000 * _timed(fp32_step if kind == "fp32" else step, batches, args.warmup,
                                                args.steps)[1])
    finally:
        setattr(qz, flag, saved)
    med = {k: statistics.median(v) for k, v in runs.items()}
    return {"model": name, "cpu_ms": med, "runs_ms": runs,
            "on_over_off": statistics.median(a / b for a, b in zip(runs["on"], runs["off"])),
            "paired_over_fp32": {k: statistics.median(a / b for a, b in zip(runs[k], runs["fp32"]))
                                 for k in ("off", "on")}}


def _ab_native(name: str, search_step, batches, args, fp32) -> dict:
    """Stop 27's search-step change: the searched activation mixture as the eager node (``off``,
    as before) and as the compiled kernel (``on``, ``plugin.engine.native``,
    ``quantizers._NATIVE_MIXTURE``), beside the FP32 step under fused Adam (the search's weight
    optimiser)."""
    from plugin.engine import native

    if native.kernel() is None:
        raise SystemExit("the compiled activation mixture is not available here (no C compiler?)")
    return _ab_flag(name, "_NATIVE_MIXTURE", search_step, _fused_fp32_step(fp32), batches, args)


def _ab_frozen_node(name: str, prepared, config, space, net, batches, args, fp32) -> dict:
    """Stop 27's QAT change: fine-tuning's step (the supernet's first plan frozen, its teacher
    outputs read from a per-batch cache as training.py's TeacherCache serves them, the
    distillation loss, backward, fused Adam as training.py builds it) with the frozen weight
    quantizers' forward through ``quantize_weight_per_channel`` (``off``, as before) and through
    the one-node path (``on``, ``quantizers._FROZEN_WEIGHT_NODE``), beside the FP32 step under the
    same fused Adam."""
    from plugin.engine import quantizers as qz
    from plugin.engine.batches import task_loss
    from plugin.engine.fakequant import FakeQuantModel
    from plugin.engine.optimisers import adam

    qat = FakeQuantModel.build(prepared.model, config, space=space)
    qat.freeze(net.discretise())
    opt = adam(qz.net_param_groups(qat, config.weight_decay), lr=1e-4)
    with torch.no_grad():
        teachers = {id(b): qat.teacher_outputs(*b[1][0]) for b in batches}

    def qat_step(batch) -> None:
        _, (inputs, labels) = batch
        loss = task_loss(config.task_loss, qat(*inputs), teachers[id(batch)], labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return _ab_flag(name, "_FROZEN_WEIGHT_NODE", qat_step, _fused_fp32_step(fp32), batches, args)


def _flag_text(what: str, step: str, args, rows: list, load_before, load_after) -> str:
    """The text of an ``_ab_flag`` mode: ``what`` says what off and on are."""
    return "\n".join([f"{step} step CPU ms {what}, interleaved in one process with the FP32 step (fused Adam), "
                      f"median of {args.repeats} x {args.steps} steps; activations "
                      f"{args.act_bits or 'SearchConfig default'}; load average before "
                      f"{'/'.join(f'{v:.2f}' for v in load_before)}, after "
                      f"{'/'.join(f'{v:.2f}' for v in load_after)}", ""]
                     + [f"- {r['model']}: " + ", ".join(f"{k} {r['cpu_ms'][k]:.2f}" for k in _FLAG_KINDS)
                        + f" ms; per round: on / off {r['on_over_off']:.3f}; {step} / FP32: off "
                        f"{r['paired_over_fp32']['off']:.2f}x, on {r['paired_over_fp32']['on']:.2f}x" for r in rows])


def _print_and_record(args, text: str, rows: list, label: str, load_before, load_after) -> int:
    """Print an A/B mode's text and, with ``--out``, write its record (command, commit, versions,
    load averages, threads, activation bits, rows) beside it."""
    print(text)
    if args.out:
        record = {"label": args.label, "command": provenance.command_line(), "commit": provenance.commit(),
                  "versions": provenance.versions(), "load_average_before": load_before,
                  "load_average_after": load_after, "threads": args.threads, "act_bits": args.act_bits,
                  "rows": rows}
        provenance.write_results(args.out, args.label or label, record, text)
    return 0


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
    ap.add_argument("--ab-speedups", action="store_true",
                    help="only the search step, issue 15's step speed-ups off vs on, interleaved in one process")
    ap.add_argument("--ab-cost-acts", action="store_true",
                    help="only the search step: the one-width activation shortcut, the batched size cost, "
                         "the weight node's clip check from the absmax and the denormal probe, added one by one, "
                         "interleaved in one process with the FP32 step (and the cost alone)")
    ap.add_argument("--ab-weight-batch", action="store_true",
                    help="only the search step: as before stop 24, with the small layers' weight mixtures and bias "
                         "gates batched (plugin.engine.weight_batch), and with the activation forward's clip floor "
                         "inside its node too, interleaved in one process with the FP32 step")
    ap.add_argument("--ab-step25", action="store_true",
                    help="only the search step with torch's default Adam (off, as before stop 25) and with fused "
                         "Adam (on, plugin.engine.optimisers), interleaved in one process with the FP32 step under "
                         "default Adam (fp32) and under fused Adam (fp32_fused)")
    ap.add_argument("--ab-native", action="store_true",
                    help="only the search step with the searched activation mixture as the eager node (off, as "
                         "before stop 27) and as the compiled kernel (on, plugin.engine.native), interleaved in one "
                         "process with the FP32 step (fused Adam)")
    ap.add_argument("--ab-frozen-node", action="store_true",
                    help="only the QAT step (teacher outputs cached, fused Adam, as fine-tuning runs it) with the "
                         "frozen weight quantizers through quantize_weight_per_channel (off, as before stop 27) and "
                         "through their one-node path (on), interleaved in one process with the FP32 step")
    ap.add_argument("--act-bits", default=None,
                    help="activation precisions of the search, e.g. 8 (the pareto benchmark's act_bits=(8,)) "
                         "or 2,4,8; default the SearchConfig default")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    rows = [measure(*m, args) for m in _models()]
    load_after = os.getloadavg()
    if args.ab_speedups:
        text = "\n".join([f"search step CPU ms, issue 15's speed-ups off vs on (one process, interleaved), median of "
                          f"{args.repeats} x {args.steps} steps; load average before "
                          f"{'/'.join(f'{v:.2f}' for v in load_before)}, after "
                          f"{'/'.join(f'{v:.2f}' for v in load_after)}", ""]
                         + [f"- {r['model']}: {r['off_cpu_ms']:.1f} -> {r['on_cpu_ms']:.1f} ms ({100 * r['less']:.1f}% less); "
                            f"runs off {', '.join(f'{t:.1f}' for t in r['runs_ms']['off'])}, on "
                            f"{', '.join(f'{t:.1f}' for t in r['runs_ms']['on'])}" for r in rows])
        print(text)
        if args.out:
            record = {"label": args.label, "command": provenance.command_line(), "commit": provenance.commit(),
                      "versions": provenance.versions(), "load_average_before": load_before,
                      "load_average_after": load_after, "rows": rows}
            provenance.write_results(args.out, args.label or "ab-speedups", record, text)
        return 0
    if args.ab_cost_acts:
        text = "\n".join([f"search step CPU ms: one-width activation shortcut, batched size cost, weight clip check "
                          f"on [K, C], denormal probe in Python floats added one by one (one process, "
                          f"interleaved), median of {args.repeats} x "
                          f"{args.steps} steps; "
                          f"activations {args.act_bits or 'SearchConfig default'}; load average before "
                          f"{'/'.join(f'{v:.2f}' for v in load_before)}, after "
                          f"{'/'.join(f'{v:.2f}' for v in load_after)}", ""]
                         + [f"- {r['model']} (act bits {','.join(map(str, r['act_bits']))}): "
                            + " -> ".join(f"{k} {r['cpu_ms'][k]:.1f}" for k in _AB_VARIANTS)
                            + f" ms (medians); per-round ratio to off (median): "
                            + ", ".join(f"{k} {r['paired_ratio_to_off'][k]:.3f}" for k in _AB_VARIANTS[1:])
                            + "; search / FP32 (per-round median): "
                            + ", ".join(f"{k} {r['paired_ratio_to_fp32'][k]:.2f}x" for k in _AB_VARIANTS)
                            + f" (FP32 {r['cpu_ms']['fp32']:.1f} ms); cost "
                            f"forward+backward alone {r['cost_cpu_ms']['per_layer']:.2f} -> "
                            f"{r['cost_cpu_ms']['batched']:.2f} ms; runs "
                            + "; ".join(f"{k} {', '.join(f'{t:.1f}' for t in v)}" for k, v in r["runs_ms"].items())
                            for r in rows])
        print(text)
        if args.out:
            record = {"label": args.label, "command": provenance.command_line(), "commit": provenance.commit(),
                      "versions": provenance.versions(), "load_average_before": load_before,
                      "load_average_after": load_after, "rows": rows}
            provenance.write_results(args.out, args.label or "ab-cost-acts", record, text)
        return 0
    if args.ab_weight_batch:
        text = "\n".join([f"search step CPU ms: as before stop 24 (off), the small layers' weight mixtures and bias "
                          f"gates batched (weights), and the activation forward too (on), interleaved in one process "
                          f"with the FP32 step, median of {args.repeats} x {args.steps} steps; activations "
                          f"{args.act_bits or 'SearchConfig default'}; load average before "
                          f"{'/'.join(f'{v:.2f}' for v in load_before)}, after "
                          f"{'/'.join(f'{v:.2f}' for v in load_after)}", ""]
                         + [f"- {r['model']}: FP32 {r['cpu_ms']['fp32']:.2f}, off {r['cpu_ms']['off']:.2f}, weights "
                            f"{r['cpu_ms']['weights']:.2f}, on {r['cpu_ms']['on']:.2f} ms; over off per round: weights "
                            f"{r['paired_over_off']['weights']:.3f}, on {r['paired_over_off']['on']:.3f}; search / FP32 "
                            f"per round: off {r['paired_over_fp32']['off']:.2f}x, weights "
                            f"{r['paired_over_fp32']['weights']:.2f}x, on {r['paired_over_fp32']['on']:.2f}x"
                            for r in rows])
        return _print_and_record(args, text, rows, "ab-weight-batch", load_before, load_after)
    if args.ab_step25:
        text = "\n".join([f"search step CPU ms with torch's default Adam (off, as before stop 25) and fused Adam (on), "
                          f"interleaved in one process with the FP32 step under default Adam (fp32) and fused Adam "
                          f"(fp32_fused), median of {args.repeats} x {args.steps} steps; activations "
                          f"{args.act_bits or 'SearchConfig default'}; load average before "
                          f"{'/'.join(f'{v:.2f}' for v in load_before)}, after "
                          f"{'/'.join(f'{v:.2f}' for v in load_after)}", ""]
                         + [f"- {r['model']}: " + ", ".join(f"{k} {r['cpu_ms'][k]:.2f}" for k in _STEP25_KINDS)
                            + f" ms; per round: on / off {r['on_over_off']:.3f}, fp32_fused / fp32 "
                            f"{r['fp32_fused_over_fp32']:.3f}; search / FP32 step (default Adam): off "
                            f"{r['paired_over_fp32']['off']:.2f}x, on {r['paired_over_fp32']['on']:.2f}x; search / "
                            f"FP32 step (fused Adam): off {r['paired_over_fp32_fused']['off']:.2f}x, on "
                            f"{r['paired_over_fp32_fused']['on']:.2f}x" for r in rows])
        return _print_and_record(args, text, rows, "ab-step25", load_before, load_after)
    if args.ab_native:
        text = _flag_text("with the searched activation mixture as the eager node (off, as before stop 27) and as "
                          "the compiled kernel (on)", "search", args, rows, load_before, load_after)
        return _print_and_record(args, text, rows, "ab-native", load_before, load_after)
    if args.ab_frozen_node:
        text = _flag_text("(teacher cached, fused Adam) with the frozen weight quantizers through "
                          "quantize_weight_per_channel (off, as before stop 27) and their one-node path (on)",
                          "QAT", args, rows, load_before, load_after)
        return _print_and_record(args, text, rows, "ab-frozen-node", load_before, load_after)
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
    lines = [f"step speed ({args.label or 'run'}): batch 64, CPU, {args.threads} thread(s), activations "
             f"{args.act_bits or 'SearchConfig default'}, median of "
             f"{args.repeats} x {args.steps} steps; load average (1/5/15 min) before "
             f"{'/'.join(f'{v:.2f}' for v in load_before)}, after {'/'.join(f'{v:.2f}' for v in load_after)}", "",
             "| model | FP32 step ms (CPU ms) | search step ms (CPU ms) | search / FP32 wall (CPU) | "
             "QAT step ms (CPU ms) | QAT / FP32 (CPU) | autograd-saved KiB (fp32 / search / QAT) | "
             "step peak RSS above start KiB (fp32 / search / QAT) | Python-heap peak KiB (fp32 / search / QAT) | "
             "max RSS MiB |",
             "|---|---|---|---|---|---|---|---|---|---|"]

    def three(d: dict) -> str:
        return " / ".join("-" if d.get(k) is None else f"{d[k]:.0f}" for k in ("fp32", "search", "qat"))

    for r in rows:
        lines.append(f"| {r['model']} | {r['fp32_step_ms']:.1f} ({r['fp32_step_cpu_ms']:.1f}) | "
                     f"{r['search_step_ms']:.1f} ({r['search_step_cpu_ms']:.1f}) | {r['ratio']:.2f}x ({r['cpu_ratio']:.2f}x) | "
                     f"{r['qat_step_ms']:.1f} ({r['qat_step_cpu_ms']:.1f}) | {r['qat_ratio']:.2f}x ({r['qat_cpu_ratio']:.2f}x) | "
                     f"{three(r['autograd_saved_kib'])} | {three(r['step_rss_peak_above_kib'])} | "
                     f"{three(r['tracemalloc_peak_kib'])} | {r['maxrss_kib'] / 1024:.0f} |")
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
