"""The methods compared by ``benchmarks/pareto.py``; each returns one result row (a dict).

Every method starts from the same FP32 ONNX file (a "third-party" model) and the same labelled
training subset; accuracy is always onnxruntime on the exported model over the task's held-out
test split (never seen in training or search).

* ``fp32``        - the original model.
* ``uniform``     - uniform QAT wXa8 (w in 8, 4, 2): prunequant's ``uniform`` strategy, whose search
  phase only trains weights, so the training budget is the same as the joint search's
  (``epochs`` + ``finetune_epochs``).
* ``ort_static``  - onnxruntime ``quantize_static`` (QDQ, per-channel int8 weights, int8
  activations, MinMax calibration on 256 training samples): what most users try first.
* ``onnxsim``     - onnxsim 0.8.1's post-training pipeline (``run_onnxsim``, one row per entry of
  ``ONNXSIM_CONFIGS``): ``simplify`` (BatchNorm folded, opset 21), optionally structured pruning
  (``apply_structured_wanda_pruning``, global ranking, calibrated, then ``apply_pruning_finetune``),
  then either ``quantize_static`` (W8A8: per-channel int8 weights, uint8 MinMax activations) or
  block-wise int4 weights (``quantize_weight_only_int4``, where the reduction size divides by 32)
  with AdaRound (``apply_adaround``) and per-channel int8 weights elsewhere
  (``quantize_weight_only``), float activations. Calibration: the compress training samples.
* ``sequential``  - prunequant's ``sequential`` strategy: structured pruning alone (the gradient
  search with weight precisions {0, 8}) and QAT, then channel-wise mixed precision {2, 4, 8} with
  the pruned channels fixed, starting from the stage-1 weights (search + QAT). Two rows:
  ``prune-only`` (stage 1 on its own, exported at 8 bits) and ``sequential`` (both stages).
* ``joint``       - prunequant's joint search ({0, 2, 4, 8} per channel) at one lambda.

All searches use 8-bit activations (``act_bits=(8,)``) so every row is a wXa8 model and the
weight-size comparison is the paper's. Row fields: see ``ROW_FIELDS`` in ``pareto.py``.
"""

from __future__ import annotations

import logging
import os
import statistics
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from plugin.api import CompressConfig, compress
from plugin.data import Dataset, input_specs, load_dataset
from plugin.evaluate import evaluate

logger = logging.getLogger(__name__)


@dataclass
class BenchConfig:
    epochs: int = 20  # search epochs (uniform baselines: weight-only training epochs)
    finetune_epochs: int = 10
    batch_size: int = 64
    max_steps_per_epoch: int | None = None
    latency_runs: int = 50
    seed: int = 0
    device: str = "cpu"  # search and fine-tuning (the FP32 networks are always trained on the CPU)


@dataclass
class Context:
    """One (task, network) experiment: the FP32 file and the data every method sees."""

    task_name: str
    network: str
    model_path: Path
    x_train: np.ndarray
    y_train: np.ndarray
    test: Dataset
    sample_shape: tuple[int, ...]
    cfg: BenchConfig
    ref8: dict | None = None  # 8-bit cost figures of the original model (size bits, bops, mpic)


def make_context(task, network: str, model_path: Path, x_train, y_train, cfg: BenchConfig) -> Context:
    specs = input_specs(onnx.load(str(model_path)))
    test = load_dataset({"input": task.x_test}, specs, task.y_test)
    return Context(task.name, network, Path(model_path), x_train, y_train, test, task.sample_shape, cfg)


# ----------------------------------------------------------------------------- measuring


def ort_latency_ms(model: onnx.ModelProto | str | Path, sample_shape: tuple[int, ...], batch: int,
                   runs: int) -> float | None:
    """Median wall time of one onnxruntime CPU run (1 thread, all graph optimisations) in ms."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    source = str(model) if isinstance(model, (str, Path)) else model.SerializeToString()
    try:
        session = ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        x = np.random.default_rng(0).standard_normal((batch, *sample_shape)).astype(np.float32)
        for _ in range(3):
            session.run(None, {name: x})
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            session.run(None, {name: x})
            times.append(time.perf_counter() - t0)
    except Exception as exc:  # e.g. a model whose batch is fixed to 1
        logger.warning("latency at batch %d failed: %s", batch, str(exc).splitlines()[0][:160])
        return None
    return 1000 * statistics.median(times)


def _measure(ctx: Context, model: onnx.ModelProto | Path, row: dict) -> dict:
    row["test_acc"] = evaluate(model if isinstance(model, onnx.ModelProto) else str(model), ctx.test,
                               batch_size=256, progress=False).accuracy
    row["file_bytes"] = (model.ByteSize() if isinstance(model, onnx.ModelProto) else os.path.getsize(model))
    row["latency_b1_ms"] = ort_latency_ms(model, ctx.sample_shape, 1, ctx.cfg.latency_runs)
    row["latency_b32_ms"] = ort_latency_ms(model, ctx.sample_shape, 32, max(5, ctx.cfg.latency_runs // 5))
    return row


def _base_row(ctx: Context, method: str, label: str, **extra: Any) -> dict:
    return {"task": ctx.task_name, "network": ctx.network, "method": method, "label": label, **extra}


def plan_summary(plan) -> dict:
    weight_bits = Counter(b for lp in plan.layers.values() for b in lp.bits)
    total = sum(weight_bits.values())
    return {"weight_channels_kept": total - weight_bits.get(0, 0), "weight_channels_total": total,
            "weight_bits": {int(b): n for b, n in sorted(weight_bits.items()) if b}}


def _costs_row(row: dict, cost_after: dict) -> dict:
    row["size_model_bytes"] = cost_after["size"] / 8
    row["bops"] = cost_after.get("bops")
    row["mpic_cycles"] = cost_after.get("mpic")
    return row


def _config(ctx: Context, **overrides: Any) -> CompressConfig:
    c = ctx.cfg
    base = dict(epochs=c.epochs, finetune_epochs=c.finetune_epochs, batch_size=c.batch_size,
                max_steps_per_epoch=c.max_steps_per_epoch, seed=c.seed, progress=False, act_bits=(8,),
                device=c.device)
    base.update(overrides)
    return CompressConfig(**base)


def _from_compress(ctx: Context, row: dict, result, wall: float) -> dict:
    rep = result.report
    sec = rep["seconds"]
    if ctx.ref8 is None and "size" in rep["cost_before_8bit"]:
        ctx.ref8 = dict(rep["cost_before_8bit"])
    _costs_row(row, rep["cost_after"])
    row["search_s"] = sec.get("search", 0.0)
    row["finetune_s"] = sec.get("finetune", 0.0)
    row["train_s"] = row["search_s"] + row["finetune_s"]
    row["wall_s"] = wall
    row["plan"] = plan_summary(result.plan)
    row["heldout_acc_compress"] = rep["quality"].get("accuracy_after")
    _measure(ctx, result.model, row)
    return row


def _compress(ctx: Context, model, config: CompressConfig):
    return compress(model if isinstance(model, onnx.ModelProto) else str(model), {"input": ctx.x_train},
                    labels=ctx.y_train, config=config)


# ----------------------------------------------------------------------------- methods


def run_fp32(ctx: Context) -> dict:
    row = _base_row(ctx, "fp32", "FP32 original")
    _measure(ctx, ctx.model_path, row)
    if ctx.ref8:
        row["size_model_bytes"] = 4 * ctx.ref8["size"] / 8  # 32-bit weights
        row["bops"] = 16 * ctx.ref8["bops"]  # 32 x 32 bit-ops per MAC
    row["mpic_cycles"] = None  # the MPIC table has no float entry
    row["train_s"] = 0.0
    return row


def run_uniform(ctx: Context, bits: int) -> dict:
    row = _base_row(ctx, "uniform", f"W{bits}A8 QAT", weight_bits=bits)
    start = time.perf_counter()
    result = _compress(ctx, ctx.model_path, _config(ctx, weight_precisions=(bits,), strategy="uniform"))
    return _from_compress(ctx, row, result, time.perf_counter() - start)


def run_joint(ctx: Context, lam: float, cost: str = "size") -> dict:
    row = _base_row(ctx, f"joint-{cost}", f"joint {cost} lam={lam:g}", lam=lam, cost_model=cost)
    start = time.perf_counter()
    result = _compress(ctx, ctx.model_path, _config(ctx, cost=cost, lam=lam, weight_precisions=(0, 2, 4, 8)))
    return _from_compress(ctx, row, result, time.perf_counter() - start)


class _Calibration:
    def __init__(self, x: np.ndarray, batch: int = 32) -> None:
        self.batches = iter([{"input": x[i:i + batch]} for i in range(0, len(x), batch)])

    def get_next(self):
        return next(self.batches, None)


def run_ort_static(ctx: Context, n_calib: int = 256, seed: int | None = None, suffix: str = "") -> dict:
    """onnxruntime's quantize_static, calibrated on ``n_calib`` training samples drawn with
    ``seed`` (default: the benchmark's seed)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(_Calibration, CalibrationDataReader):
        pass

    seed = ctx.cfg.seed if seed is None else seed
    row = _base_row(ctx, "ort_static", "ORT quantize_static int8" + suffix, seed=seed)
    rng = np.random.default_rng(seed)
    x = ctx.x_train[np.sort(rng.choice(len(ctx.x_train), min(n_calib, len(ctx.x_train)), replace=False))]
    with tempfile.TemporaryDirectory(prefix="pq-bench-") as tmp:
        out = Path(tmp) / "ort_static.onnx"
        start = time.perf_counter()
        quantize_static(str(ctx.model_path), str(out), Reader(x), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
        row["train_s"] = row["search_s"] = time.perf_counter() - start  # calibration only
        row["finetune_s"] = 0.0
        row["wall_s"] = row["train_s"]
        _measure(ctx, out, row)
        row["file_bytes"] = os.path.getsize(out)
    if ctx.ref8:  # int8 weights and activations: the 8-bit figures of every cost model
        _costs_row(row, ctx.ref8)
    return row


#: onnxsim pipelines: key -> (structured sparsity or None, "int8" static W8A8 or "int4" weight-only)
ONNXSIM_CONFIGS: dict[str, tuple[float | None, str]] = {
    "int8": (None, "int8"),
    "int4": (None, "int4"),
    "prune25-int4": (0.25, "int4"),
    "prune50-int4": (0.50, "int4"),
    "prune75-int4": (0.75, "int4"),
}

#: ONNX tensor element types -> bits per stored weight (the size model of an onnxsim file)
_ELEM_BITS = {onnx.TensorProto.FLOAT: 32, onnx.TensorProto.FLOAT16: 16, onnx.TensorProto.INT8: 8,
              onnx.TensorProto.UINT8: 8, onnx.TensorProto.INT4: 4, onnx.TensorProto.UINT4: 4}


def onnxsim_label(key: str) -> str:
    sparsity, scheme = ONNXSIM_CONFIGS[key]
    quant = "W8A8 PTQ" if scheme == "int8" else "W4 AdaRound (A fp32)"
    return f"onnxsim {quant}" if sparsity is None else f"onnxsim prune {100 * sparsity:.0f}% {quant}"


def drop_unused_initializers(model: onnx.ModelProto) -> int:
    """Remove initializers no node reads (onnxsim's quantizers leave the float weights behind);
    returns how many were removed."""
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    keep = [t for t in model.graph.initializer if t.name in used]
    removed = len(model.graph.initializer) - len(keep)
    if removed:
        del model.graph.initializer[:]
        model.graph.initializer.extend(keep)
    return removed


def weight_size_bytes(model: onnx.ModelProto) -> tuple[float, dict[int, int]]:
    """The cost model's ``size`` of an exported file: every Conv / Gemm / MatMul weight at the
    width it is stored with (traced back through DequantizeLinear / Reshape to its initializer),
    biases excluded; and the weight element count per width."""
    inits = {t.name: t for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    bits = 0
    per_width: Counter = Counter()
    for node in model.graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul", "ConvTranspose") or len(node.input) < 2:
            continue
        name, hops = node.input[1], 0
        while name not in inits and name in producer and hops < 8:
            name, hops = producer[name].input[0], hops + 1
        if name not in inits:
            continue
        t = inits[name]
        n = int(np.prod(t.dims)) if t.dims else 1
        width = _ELEM_BITS.get(t.data_type, 32)
        bits += n * width
        per_width[width] += n
    return bits / 8, dict(sorted(per_width.items()))


def _onnxsim_calibration(ctx: Context, seed: int, n_calib: int | None, batch: int = 64) -> list[dict]:
    x = ctx.x_train
    if n_calib is not None and n_calib < len(x):
        rng = np.random.default_rng(seed)
        x = x[np.sort(rng.choice(len(x), n_calib, replace=False))]
    x = np.ascontiguousarray(x, dtype=np.float32)
    return [{"input": x[i:i + batch]} for i in range(0, len(x), batch)]


def run_onnxsim(ctx: Context, key: str, seed: int | None = None, suffix: str = "",
                n_calib: int | None = None) -> dict:
    """One onnxsim 0.8.1 post-training pipeline (``ONNXSIM_CONFIGS[key]``) on the FP32 file,
    calibrated on the compress training samples (all of them, or ``n_calib`` drawn with
    ``seed``). A failure of onnxsim is a row with ``error``, never an exception."""
    seed = ctx.cfg.seed if seed is None else seed
    sparsity, scheme = ONNXSIM_CONFIGS[key]
    row = _base_row(ctx, "onnxsim", onnxsim_label(key) + suffix, onnxsim_config=key, seed=seed,
                    sparsity=sparsity, scheme=scheme)
    start, cpu0 = time.perf_counter(), time.process_time()
    step = "import"
    try:
        import onnxsim

        row["onnxsim_version"] = getattr(onnxsim, "__version__", None)
        calib = _onnxsim_calibration(ctx, seed, n_calib)
        step = "simplify"
        model, ok = onnxsim.simplify(onnx.load(str(ctx.model_path)), target_opset_version=21)
        if not ok:
            raise RuntimeError("onnxsim.simplify could not validate the simplified model")
        base = model
        if sparsity:
            step = "apply_structured_wanda_pruning"
            model = onnxsim.apply_structured_wanda_pruning(base, calibration_data=calib, sparsity=sparsity,
                                                           global_sparsity=True, seed=seed)
            step = "apply_pruning_finetune"
            model = onnxsim.apply_pruning_finetune(base, model, calibration_data=calib, seed=seed)
        if scheme == "int8":
            step = "quantize_static"
            model = onnxsim.quantize_static(model, calibration_data=calib, method="minmax", seed=seed)
        else:
            step = "quantize_weight_only_int4"
            pruned = model
            model = onnxsim.quantize_weight_only_int4(pruned)
            step = "apply_adaround"
            model = onnxsim.apply_adaround(pruned, model, calibration_data=calib, seed=seed)
            step = "quantize_weight_only"
            model = onnxsim.quantize_weight_only(model)  # int8 per channel where int4 blocks do not fit
        row["unused_initializers_dropped"] = drop_unused_initializers(model)
        onnx.checker.check_model(model)
    except Exception as exc:  # noqa: BLE001 - an onnxsim failure is a result row, the benchmark goes on
        row["error"] = f"onnxsim {step}: {type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
        row["wall_s"] = time.perf_counter() - start
        logger.warning("%s failed: %s", row["label"], row["error"])
        return row
    row["train_s"] = row["search_s"] = row["wall_s"] = time.perf_counter() - start  # post-training: no QAT
    row["cpu_s"] = time.process_time() - cpu0
    row["finetune_s"] = 0.0
    row["size_model_bytes"], widths = weight_size_bytes(model)
    row["weight_elements_by_bits"] = widths
    try:
        with tempfile.TemporaryDirectory(prefix="pq-bench-") as tmp:
            out = Path(tmp) / f"onnxsim_{key}.onnx"
            onnx.save(model, str(out))
            _measure(ctx, out, row)
    except Exception as exc:  # noqa: BLE001 - e.g. onnxruntime refusing the file
        row["error"] = f"onnxruntime on the onnxsim file: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
    return row


def run_sequential(ctx: Context, lam_prune: float, lam_mp: float, cost: str = "size") -> list[dict]:
    """Pruning alone ({0, 8}), then mixed precision ({2, 4, 8}) on the pruned model: the library's
    ``sequential`` strategy. The ``prune-only`` row is its first stage on its own (the gradient
    strategy with weight precisions {0, 8}, QAT, exported at 8 bits)."""
    row1 = _base_row(ctx, "prune-only", f"prune-only lam={lam_prune:g}", lam=lam_prune, cost_model=cost)
    start = time.perf_counter()
    result = _compress(ctx, ctx.model_path, _config(ctx, cost=cost, lam=lam_prune, weight_precisions=(0, 8)))
    _from_compress(ctx, row1, result, time.perf_counter() - start)
    row2 = _base_row(ctx, "sequential", f"sequential lam={lam_prune:g}/{lam_mp:g}", lam=lam_mp,
                     lam_prune=lam_prune, cost_model=cost)
    start = time.perf_counter()
    result = _compress(ctx, ctx.model_path, _config(ctx, cost=cost, lam=lam_mp, weight_precisions=(0, 2, 4, 8),
                                                   strategy="sequential",
                                                   strategy_options={"prune_lambda": lam_prune}))
    _from_compress(ctx, row2, result, time.perf_counter() - start)
    stage1 = next(s for s in result.report["history"] if s["stage"] == "prune")
    row2["stage1_epochs"] = stage1["epochs"]
    return [row1, row2]
