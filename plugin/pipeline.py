"""`compress`: load -> bridge -> joint search -> QAT -> export -> validate -> atomic write.

    import plugin
    result = plugin.compress("model.onnx", "calib.npz", output="small.onnx",
                             config=plugin.CompressConfig(target="size=0.25"))
    result.plan, result.report, result.model
"""

from __future__ import annotations

import json
import logging
import os
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

import numpy as np
import onnx

from graph_passes.errors import ConfigError, DataError, VerificationError
from graph_passes.validate import validate_model
from graph_passes.writing import check_output_path, write_outputs

from .data import Dataset, input_specs, load_dataset
from .inspect_cmd import PreparedModel, prepare_model
from .plan import CompressionPlan

logger = logging.getLogger(__name__)

DEFAULT_LAMBDA = 1.0
# With neither a lambda nor a target: a budget of 35% of the all-8-bit model's size. Measured
# (benchmarks/compress_samples.py): 0.29-0.33 of W8 within 0.5 points of FP32 on both samples,
# where no single lambda worked on both (its effect grows with the number of steps).
DEFAULT_TARGET = "size=0.35"


@dataclass
class CompressConfig:
    """Settings of one compress run (the CLI flags map one to one)."""

    cost: str = "size"
    lam: float | None = None  # None and no target: DEFAULT_LAMBDA
    target: str | None = None  # e.g. "size=0.25", "size=40KB", "mpic=1.2e6"
    epochs: int = 20
    finetune_epochs: int = 10
    batch_size: int = 64
    max_steps_per_epoch: int | None = None
    weight_precisions: tuple[int, ...] = (0, 2, 4, 8)
    activation_precisions: tuple[int, ...] = (2, 4, 8)
    act_bits: tuple[int, ...] | None = None
    held_out: float = 0.2
    device: str = "cpu"
    seed: int = 0
    progress: bool = True
    input_shapes: dict[str, list[int]] = field(default_factory=dict)
    min_top1_agreement: float = 99.5
    threads: int | None = None  # torch intra-op threads; None: 1 for small models, else torch's default


@dataclass
class CompressResult:
    model: onnx.ModelProto
    plan: CompressionPlan
    report: dict
    output: str | None = None


class _Timer:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        logger.info("phase %s ...", name)
        try:
            yield
        finally:
            self.seconds[name] = round(time.perf_counter() - start, 3)


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but torch sees no CUDA GPU; use --device cpu or auto")
    if device not in ("cpu", "cuda"):
        raise ConfigError(f"--device {device!r} is not one of cpu, cuda, auto")
    return device


def _search_config(config: CompressConfig, labels: bool):
    from .search import SearchConfig

    return SearchConfig(
        weight_precisions=config.weight_precisions, activation_precisions=config.activation_precisions,
        act_bits=config.act_bits, cost_model=config.cost,
        lam=DEFAULT_LAMBDA if config.lam is None else config.lam, epochs=config.epochs,
        batch_size=config.batch_size, max_steps_per_epoch=config.max_steps_per_epoch,
        task_loss="cross_entropy" if labels else "distill_kl", device=config.device,
        seed=config.seed, progress=config.progress,
    )


def _torch_outputs(searchable, feeds: dict[str, np.ndarray], batch_size: int = 256) -> list[np.ndarray]:
    import torch

    names = searchable.input_names
    n = len(next(iter(feeds.values())))
    chunks: list[list[np.ndarray]] = []
    searchable.eval()
    with torch.no_grad():
        for start in range(0, n, batch_size):
            inputs = [torch.as_tensor(feeds[k][start : start + batch_size]).to(searchable.config.device) for k in names]
            out = searchable(*inputs)
            outs = out if isinstance(out, (tuple, list)) else (out,)
            chunks.append([o.detach().cpu().numpy() for o in outs])
    return [np.concatenate([c[i] for c in chunks]) for i in range(len(chunks[0]))]


def _top1(outputs: list[np.ndarray], labels: np.ndarray | None) -> float | None:
    if labels is None or outputs[0].ndim != 2:
        return None
    return float((outputs[0].argmax(axis=1) == labels).mean())


def _ort_outputs(model: onnx.ModelProto, feeds: dict[str, np.ndarray], batch: int | None = None,
                 optimize: bool = False) -> list[np.ndarray]:
    """onnxruntime over the feeds, in chunks of ``batch`` (None: at once). Without graph
    optimisations by default: the exact semantics of the QDQ graph."""
    from graph_passes.ort_utils import make_session

    session = make_session(model, optimize=optimize)
    n = len(next(iter(feeds.values())))
    step = batch or n
    chunks = [session.run(None, {k: v[i : i + step] for k, v in feeds.items()}) for i in range(0, n, step)]
    return [np.concatenate([c[j] for c in chunks]) for j in range(len(chunks[0]))]


def compress(model: str | onnx.ModelProto, data: Any, *, labels: Any = None, output: str | None = None,
             config: CompressConfig | None = None) -> CompressResult:
    """Compress ``model`` with the joint search; see the module docstring."""
    config = config or CompressConfig()
    if config.lam is not None and config.target is not None:
        raise ConfigError("give either a lambda or a target budget, not both")
    if output is not None:
        check_output_path(output)
    timer = _Timer()
    with timer.phase("prepare"):
        prepared = prepare_model(model, config.input_shapes)
        dataset = data if isinstance(data, Dataset) else load_dataset(data, input_specs(prepared.model), labels)
        if len(dataset) < 2:
            raise DataError(f"{dataset.source}: need at least 2 samples (some are held out for validation)")
        train, held = dataset.split(config.held_out, seed=config.seed)
    config.device = resolve_device(config.device)
    _set_threads(config.threads, sum(layer.macs for layer in prepared.analysis.layers))
    from .budget import search_to_budget
    from .finetune import FinetuneConfig, finetune
    from .search import run_search
    from .searchable import SearchableModel

    search_config = _search_config(config, train.labels is not None)
    with timer.phase("bridge"):
        searchable = SearchableModel.build(prepared.model, search_config, analysis=prepared.analysis)
    _check_batching(searchable, train, search_config)
    target = config.target or (None if config.lam is not None else DEFAULT_TARGET)
    finetune_epochs = config.finetune_epochs
    with timer.phase("search"):
        if target:
            budget = search_to_budget(searchable, train, target, search_config)
            plan = budget.plan
            # the controller stops once the budget is met: the epochs it did not use go to QAT
            finetune_epochs += max(0, config.epochs - budget.epochs)
        else:
            plan = run_search(searchable, train, search_config)
    with timer.phase("finetune"):
        ft = finetune(searchable, plan, train, FinetuneConfig(
            epochs=finetune_epochs, batch_size=search_config.batch_size,
            task_loss=search_config.task_loss, max_steps_per_epoch=config.max_steps_per_epoch,
            device=config.device, seed=config.seed, progress=config.progress))
        plan = ft.plan
    with timer.phase("export"):
        exported, validation, quality = _export_and_validate(prepared, searchable, plan, held, config)
    report = _report(prepared, searchable, plan, exported, validation, quality, timer, config)
    if output is not None:
        with timer.phase("write"):
            files = {"plan.json": plan.to_json(), "report.json": json.dumps(report, indent=2, default=str)}
            write_outputs(output, exported.model, _sidecars(output, files))
        report["seconds"] = timer.seconds
    return CompressResult(exported.model, plan, report, output)


SMALL_MODEL_MACS = 50_000_000


def _set_threads(threads: int | None, macs: int) -> None:
    """Small models train faster on one thread (measured: several times, more when the cores
    are shared); large ones use torch's default."""
    import torch

    if threads is None and macs < SMALL_MODEL_MACS:
        threads = 1
    if threads:
        torch.set_num_threads(int(threads))
        logger.info("torch uses %d thread(s)", threads)


def _check_batching(searchable, train: Dataset, search_config) -> None:
    """Some graphs fix the batch size in a constant; then train one sample at a time."""
    import torch

    inputs = [torch.as_tensor(train.arrays[n][:2]) for n in searchable.input_names]
    try:
        with torch.no_grad():
            searchable.teacher_outputs(*inputs)
    except RuntimeError as exc:
        logger.warning("the model only runs one sample at a time (%s); training with batch size 1",
                       str(exc).splitlines()[0][:120])
        search_config.batch_size = 1


def _sidecars(output: str, files: dict[str, str]) -> dict[str, str]:
    """plan.json / report.json next to the model, named after it (model.plan.json, ...)."""
    stem = os.path.splitext(os.path.basename(output))[0]
    return {f"{stem}.{name}": content for name, content in files.items()}


def _export_and_validate(prepared: PreparedModel, searchable, plan: CompressionPlan, held: Dataset,
                         config: CompressConfig):
    from graph_passes.batch import restore_dynamic_batch
    from graph_passes.ort_utils import compare_outputs

    from .bridge import write_back
    from .export import export_plan

    weighted = write_back(prepared.model, searchable.materialised_bridge())
    exported = export_plan(weighted, prepared.analysis, plan)
    exported.model, restored = restore_dynamic_batch(exported.model)
    feeds = {k: v for k, v in held.arrays.items()}
    fake_quant = _torch_outputs(searchable, feeds)
    classifier = fake_quant[0].ndim == 2 and fake_quant[0].shape[1] > 1
    # the full check (checker, ORT off vs all) on as many samples as the model's batch allows
    n_check = len(held) if restored else 1
    validation = validate_model(exported.model, reference_outputs=[o[:n_check] for o in fake_quant],
                                feeds={k: v[:n_check] for k, v in feeds.items()}, rtol=float("inf"),
                                rtol_optimized=float("inf"))
    compressed = _ort_outputs(exported.model, feeds, None if restored else 1)
    optimized = _ort_outputs(exported.model, feeds, None if restored else 1, optimize=True)
    original = _ort_outputs(prepared.original, feeds, 1)
    err = compare_outputs(compressed, fake_quant)
    agreement = float((compressed[0].argmax(1) == fake_quant[0].argmax(1)).mean()) if classifier else None
    if agreement is not None and 100 * agreement < config.min_top1_agreement:
        raise VerificationError(
            f"the exported model agrees with the fake-quantized torch model on only {100 * agreement:.2f}% "
            f"of {len(held)} held-out samples (< {config.min_top1_agreement}%); nothing was written")
    optimized_err = compare_outputs(optimized, compressed).max_rel_error
    if optimized_err > 0.05:
        logger.warning("onnxruntime's fully optimised graph (integer kernels) differs from the exact "
                       "QDQ semantics by %.1f%% on held-out data (reported in report.json)", 100 * optimized_err)
    quality = {
        "held_out_samples": len(held),
        "dynamic_batch_restored": restored,
        "fake_quant_max_rel_error": err.max_rel_error,
        "fake_quant_top1_agreement": agreement,
        "accuracy_before": _top1(original, held.labels),
        "accuracy_after": _top1(compressed, held.labels),
        "accuracy_after_ort_optimized": _top1(optimized, held.labels),
        "ort_optimized_vs_plain_max_rel_error": optimized_err,
        "top1_agreement_with_original": (float((compressed[0].argmax(1) == original[0].argmax(1)).mean())
                                         if classifier else None),
    }
    return exported, validation, quality


def _report(prepared, searchable, plan, exported, validation, quality, timer, config) -> dict:
    from cost_models import available_cost_models

    names = available_cost_models()
    before = searchable.cost_before_all(names) if hasattr(searchable, "cost_before_all") else {
        n: searchable.cost_before(n) for n in names}
    after = {n: searchable.cost_of_plan(plan, n) for n in names}
    fp32_weight_bytes = sum(4 * layer.params for layer in prepared.analysis.layers)
    return {
        "model": prepared.source,
        "plan_model_sha256": plan.model_sha256,
        "config": {k: v for k, v in asdict(config).items()},
        "layers": {
            name: {"channels_before": b, "channels_after": a, "bits": exported.layer_bits.get(name, {})}
            for name, (b, a) in exported.layer_channels.items()
        },
        "groups_pruned": {g: len(ch) for g, ch in exported.removal.items()},
        "cost_before_8bit": before,
        "cost_after": after,
        "file": _file_accounting(exported, fp32_weight_bytes),
        "quality": quality,
        "validation": asdict(validation),
        "seconds": timer.seconds,
    }


def _file_accounting(exported, fp32_weight_bytes: int) -> dict:
    """File size vs the `size` cost model: the packed integer weights must match the model's
    prediction within 5%; the rest is a fixed overhead (per-channel scales and zero points,
    Gather indices of mixed-width layers, FP32 biases, graph structure and names)."""
    layers = exported.qdq.layers.values()
    packed = sum(layer.weight_bytes for layer in layers)
    predicted = exported.qdq.predicted_bytes
    total = exported.model.ByteSize()
    return {
        "bytes": total,
        "packed_weight_bytes": packed,
        "size_model_bytes": predicted,
        "prediction_error": (packed - predicted) / predicted if predicted else 0.0,
        "overhead_bytes": total - packed,
        "scale_zero_point_index_bytes": sum(l.scale_bytes + l.zero_point_bytes + l.index_bytes for l in layers),
        "graph_bytes": exported.qdq.other_bytes,
        "fp32_weight_bytes": fp32_weight_bytes,
    }


def summary_table(report: dict) -> str:
    """Before/after table for the CLI."""
    b, a, q = report["cost_before_8bit"], report["cost_after"], report["quality"]
    rows = [("size (weights, 8-bit = before)", f"{b['size'] / 8:,.0f} B", f"{a['size'] / 8:,.0f} B"),
            ("BOPs", f"{b['bops']:.3g}", f"{a['bops']:.3g}"),
            ("mpic latency (cycles)", f"{b['mpic']:.3g}", f"{a['mpic']:.3g}")]
    if q.get("accuracy_before") is not None:
        rows.append(("accuracy (held out)", f"{100 * q['accuracy_before']:.2f}%", f"{100 * q['accuracy_after']:.2f}%"))
    if q.get("top1_agreement_with_original") is not None:
        rows.append(("top-1 agreement with original", "100%", f"{100 * q['top1_agreement_with_original']:.2f}%"))
    rows.append(("file", f"{report['file']['fp32_weight_bytes']:,} B fp32 weights",
                 f"{report['file']['bytes']:,} B"))
    width = max(len(r[0]) for r in rows)
    lines = [f"{'':<{width}}  {'before':>22}  {'after':>22}"]
    lines += [f"{name:<{width}}  {x:>22}  {y:>22}" for name, x, y in rows]
    return "\n".join(lines)
