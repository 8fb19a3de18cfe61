"""The library API: :func:`compress`, :func:`apply_plan` and :func:`evaluate`.

    from plugin import api
    result = api.compress("model.onnx", "calib.npz", output="small.onnx",
                          config=api.CompressConfig(target="size=25%", strategy="gradient"))
    result.plan, result.report, result.model
    again = api.apply_plan("model.onnx", "small.plan.json", output="again.onnx", data="calib.npz")

``compress``: load -> normalise -> analyse (``graph_passes.prepare``) -> dry run of the export
path (fails in seconds) -> a strategy (``plugin.strategies``) finds a plan -> QAT with the plan
frozen -> export (channels removed, QDQ) -> the one gate (``graph_passes.gate``) -> the model,
its plan and its report written together, atomically. Nothing is written when any step fails.

No process-wide side effects: torch's thread count is restored on return, and the caller's
config is never mutated.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import onnx

from graph_passes.errors import ConfigError, DataError, OutputError
from graph_passes.writing import check_output_path, write_outputs

from .data import Dataset, input_specs, load_dataset
from .engine.config import DEFAULT_QAT_SCHEDULE, QAT_SCHEDULES
from .evaluate import evaluate
from .plan import CompressionPlan, LayerPlan
from .space import DEFAULT_ACTIVATION_PRECISIONS, DEFAULT_WEIGHT_PRECISIONS, Precisions

logger = logging.getLogger(__name__)

#: the cost weight when neither a lambda nor a target is given and the strategy cannot follow a target
DEFAULT_LAMBDA = 1.0
SMALL_MODEL_MACS = 50_000_000
#: held-out samples the gate checks (all of them are used for the report's accuracy and fidelity)
GATE_SAMPLES = 512


@dataclass
class CompressConfig:
    """Settings of one compress run (the CLI flags map one to one).

    ``target``: a budget such as ``size=35%`` or ``size=40KB`` (``plugin.targets``); with neither
    ``lam`` nor ``target`` a steerable strategy gets ``<cost>=35%`` (measured on both samples:
    0.29-0.33 of W8 within 0.5 points of FP32, where no single lambda worked on both).
    ``strategy`` names a registered strategy (``prunequant strategies``); ``strategy_options`` its
    options (texts or values). ``act_bits`` (when set) replaces ``activation_precisions``.
    ``keep_best_qat``: QAT is scored on the held-out split before its first step and after every
    epoch, and ends on the best state, so it never ends below the calibrated, searched start (the
    held-out figures of the report are then those of the selected epoch). Off by default: on the
    samples' 20 benchmark rows it moved test accuracy by -2.0 to +1.9 points, +0.1 on average
    (benchmarks/results/compress-samples-keepbest-cpu/), i.e. within single-seed noise.
    ``qat_schedule``: the QAT learning rate over its steps, ``cosine`` (the default: from the
    width's rate down to 0 at the last step; 7 of 9 configurations better over 3 seeds, up to
    +2.8 points, benchmarks/results/qat-schedule-cpu/) or ``constant`` (earlier releases).
    """

    cost: str = "size"
    lam: float | None = None
    target: str | None = None
    strategy: str = "gradient"
    strategy_options: dict[str, Any] = field(default_factory=dict)
    epochs: int = 20
    finetune_epochs: int = 10
    #: QAT's learning rate over its epochs: "constant" or "cosine" (down to 0 at the last step)
    qat_schedule: str = DEFAULT_QAT_SCHEDULE
    batch_size: int = 64
    max_steps_per_epoch: int | None = None
    weight_precisions: tuple[int, ...] = DEFAULT_WEIGHT_PRECISIONS
    activation_precisions: tuple[int, ...] = DEFAULT_ACTIVATION_PRECISIONS
    act_bits: tuple[int, ...] | None = None
    held_out: float = 0.2
    device: str = "cpu"
    seed: int = 0
    progress: bool = True
    input_shapes: dict[str, list[int]] = field(default_factory=dict)
    min_top1_agreement: float = 99.0
    threads: int | None = None  # torch intra-op threads; None: 1 for small models, else torch's default
    keep_best_qat: bool = False  # QAT ends on its best held-out epoch (the start counts); off: measured neutral
    #: report["runtimes"]: OpenVINO vs onnxruntime on the held-out inputs, when openvino is importable
    compare_runtimes: bool = True
    #: inexact groups (a transformer's residual hidden width through LayerNorm / RMSNorm) are
    #: prunable: not exact, recovered by QAT; the engine computes the norms over the kept channels
    inexact_hidden_width: bool = False
    #: lower the batch size to what the memory available can hold (plugin.memory); off: keep it
    memory_guard: bool = True

    def precisions(self) -> Precisions:
        """The validated precisions (ConfigError naming the flag)."""
        return Precisions(tuple(self.weight_precisions),
                          tuple(self.act_bits if self.act_bits is not None else self.activation_precisions))


@dataclass
class CompressResult:
    model: onnx.ModelProto
    plan: CompressionPlan
    report: dict
    output: str | None = None


@dataclass
class ApplyResult:
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


@contextmanager
def torch_threads(threads: int | None, macs: int) -> Iterator[None]:
    """Small models train faster on one thread (measured: several times, more when the cores
    are shared); large ones use torch's default. The caller's thread count and random generator
    state are restored."""
    import torch

    previous = torch.get_num_threads()
    if threads is None and macs < SMALL_MODEL_MACS:
        threads = 1
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    # the search and QAT seed torch's global generator: the caller's generator state comes back too
    with torch.random.fork_rng(devices=devices):
        try:
            if threads:
                torch.set_num_threads(int(threads))
                logger.info("torch uses %d thread(s)", threads)
            yield
        finally:
            torch.set_num_threads(previous)


# ----------------------------------------------------------------------------- inputs and outputs


def _check_config(config: CompressConfig) -> None:
    """ConfigError naming the option, before any work (the CLI checks the same through click)."""
    def integer(name: str, value: Any, low: int, allow_none: bool = False) -> None:
        if value is None and allow_none:
            return
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            flag = name.replace("_", "-")
            raise ConfigError(f"{name} (--{flag}) must be an integer >= {low}"
                              f"{' or None' if allow_none else ''}, got {value!r}")

    integer("threads", config.threads, 1, allow_none=True)
    integer("epochs", config.epochs, 0)
    integer("finetune_epochs", config.finetune_epochs, 0)
    integer("batch_size", config.batch_size, 1)
    integer("max_steps_per_epoch", config.max_steps_per_epoch, 1, allow_none=True)
    integer("seed", config.seed, 0)
    if config.qat_schedule not in QAT_SCHEDULES:
        raise ConfigError(f"qat_schedule (--qat-schedule) must be one of {', '.join(QAT_SCHEDULES)}, "
                          f"got {config.qat_schedule!r}")
    held = config.held_out
    if isinstance(held, bool) or not isinstance(held, (int, float)) or not 0 < held < 1:
        raise ConfigError(f"held_out must be a fraction between 0 and 1 (exclusive), got {held!r}")
    top1 = config.min_top1_agreement
    if isinstance(top1, bool) or not isinstance(top1, (int, float)) or not 0 <= top1 <= 100:
        raise ConfigError(f"min_top1_agreement must be a percentage in [0, 100], got {top1!r}")
    if config.lam is not None and (isinstance(config.lam, bool) or not isinstance(config.lam, (int, float))
                                   or not np.isfinite(config.lam) or config.lam < 0):
        raise ConfigError(f"--lambda must be a finite number >= 0, got {config.lam!r}")


def _check_finite_weights(prepared: Any) -> None:
    """UnsupportedModelError naming the first weight or bias holding NaN or Inf: a quantization
    scale cannot be computed from it (checked before any training)."""
    from onnx import numpy_helper

    from graph_passes.errors import UnsupportedModelError

    wanted: dict[str, str] = {}
    for layer in prepared.analysis.layers:
        wanted[layer.weight] = f"weight of layer {layer.name!r}"
        if layer.bias:
            wanted[layer.bias] = f"bias of layer {layer.name!r}"
    for tensor in prepared.model.graph.initializer:
        if tensor.name not in wanted:
            continue
        values = numpy_helper.to_array(tensor)
        if np.issubdtype(values.dtype, np.floating) and not np.isfinite(values).all():
            bad = int(np.size(values) - np.isfinite(values).sum())
            raise UnsupportedModelError(
                f"the {wanted[tensor.name]} ({tensor.name!r}) holds {bad} NaN/Inf value(s); it cannot be "
                "quantized - fix the model (the training diverged or the export broke)")


def _check_label_classes(dataset: Dataset, model: onnx.ModelProto) -> None:
    """DataError up front when a label is not a class of the model's first output ([N, C])."""
    if dataset.labels is None or not model.graph.output:
        return
    shape = model.graph.output[0].type.tensor_type.shape
    dims = [d.dim_value if d.HasField("dim_value") else None for d in shape.dim]
    if len(dims) == 2 and dims[1] is not None and dims[1] > 1:
        dataset.require_num_classes(dims[1], f"the model's output {model.graph.output[0].name!r}")


def _prepare_with_data(model: Any, data: Any, explicit: dict[str, list[int]] | None,
                       inexact_hidden_width: bool = False) -> Any:
    """``prepare_model`` with symbolic input dims pinned from the data's sample shapes.

    An input that ``explicit`` (``--input-shape``) names is pinned as given; every other input with
    a symbolic dim past dim 0 takes those dims from the data (read from the file headers, nothing
    is loaded twice). A symbolic leading dim stays the batch axis: analysed at 1 and given back
    to the exported model as before. A data shape that contradicts a static dim is a DataError.
    The model is first loaded as it is (the safe loader vets the file before it is parsed here)."""
    from graph_passes.errors import InputShapeError
    from graph_passes.prepare import prepare_model

    explicit = dict(explicit or {})
    try:
        return prepare_model(model, explicit, inexact_hidden_width=inexact_hidden_width)
    except InputShapeError:
        pins, batch = _data_input_shapes(model, data, explicit) if data is not None else ({}, {})
        if not pins:
            raise
    logger.info("input shapes from the data: %s",
                ", ".join(f"{k}={'x'.join(map(str, v))}" for k, v in pins.items()))
    prepared = prepare_model(model, {**pins, **explicit}, inexact_hidden_width=inexact_hidden_width)
    if batch:
        _record_batch_dims(prepared, batch)
    return prepared


def _declared_input_dims(model: Any) -> dict[str, tuple[list[Any], str]]:
    """{input: (dims, batch dim name)} of a model's graph inputs, unknown dims as str; {} when the
    model cannot be parsed here (loading it reports why)."""
    from graph_passes.shapes import graph_inputs, value_dims

    try:
        if isinstance(model, onnx.ModelProto):
            proto = model
        elif isinstance(model, (bytes, bytearray)):
            proto = onnx.load_from_string(bytes(model))
        elif isinstance(model, (str, os.PathLike)):
            proto = onnx.load(os.fspath(model), load_external_data=False)
        else:
            return {}
    except Exception:  # noqa: BLE001 - any parse failure is reported by the safe loader
        return {}
    out: dict[str, tuple[list[Any], str]] = {}
    for value in graph_inputs(proto):
        dims = value_dims(value) if value.type.HasField("tensor_type") else None
        if dims:
            first = value.type.tensor_type.shape.dim[0]
            out[value.name] = (dims, first.dim_param if first.HasField("dim_param") and first.dim_param
                               else "batch")
    return out


def _data_input_shapes(model: Any, data: Any, explicit: dict[str, list[int]]
                       ) -> tuple[dict[str, list[int]], dict[str, str]]:
    """(pins, batch dims): the shapes to pin for inputs with symbolic dims past dim 0 that
    ``explicit`` does not name, and {input: dim name} of those whose symbolic dim 0 is the batch."""
    from .data import LABELS_KEY, dims_text

    declared = _declared_input_dims(model)
    wanted = {name: spec for name, spec in declared.items()
              if name not in explicit and any(isinstance(d, str) for d in spec[0][1:])}
    if not wanted:
        return {}, {}
    found = _data_sample_shapes(data, [n for n in declared if n != LABELS_KEY], LABELS_KEY in declared)
    if found is None:
        return {}, {}
    where, named = found
    names = list(declared)
    keys = [k for k, _ in named]
    if keys and all(k in names for k in keys):
        shapes = dict(named)  # type: ignore[arg-type]
    elif len(named) == len(names):
        shapes = {n: shape for n, (_, shape) in zip(names, named)}
    else:
        return {}, {}  # loading the data names the mismatch
    pins: dict[str, list[int]] = {}
    batch: dict[str, str] = {}
    for name, (dims, batch_name) in wanted.items():
        shape = shapes.get(name)
        if shape is None:
            continue
        declared_text = f"[{dims_text(dims)}]"
        if (len(shape) == len(dims) + 1 and len(shape) > 1 and shape[1] != 1 and all(
                not isinstance(d, int) or d == s for d, s in zip(dims, shape[1:]))):
            pins[name] = [int(s) for s in shape[1:]]  # N whole inputs: dim 0 is no batch (graph_passes.batch)
            continue
        if len(shape) != len(dims):
            raise DataError(f"{where}: the array for input {name!r} has shape [{dims_text(shape)}] (rank "
                            f"{len(shape)}) but the model declares {declared_text} (rank {len(dims)}); "
                            "give arrays of shape [N, ...] with one axis per input dim")
        for axis in range(1, len(dims)):
            if isinstance(dims[axis], int) and dims[axis] != shape[axis]:
                raise DataError(f"{where}: the array for input {name!r} has shape [{dims_text(shape)}] but "
                                f"the model fixes dim {axis} to {dims[axis]} (declared {declared_text}); "
                                "reshape the data (or is it data for another model?)")
            if shape[axis] < 1:
                raise DataError(f"{where}: the array for input {name!r} has shape [{dims_text(shape)}], "
                                f"dim {axis} is empty; give data with every dim >= 1")
        symbolic_batch = isinstance(dims[0], str)
        pins[name] = [1 if symbolic_batch else int(dims[0]), *(int(s) for s in shape[1:])]
        if symbolic_batch:
            batch[name] = batch_name
    return pins, batch


def _data_sample_shapes(data: Any, names: list[str], labels_is_input: bool
                        ) -> tuple[str, list[tuple[str | None, tuple[int, ...]]]] | None:
    """(where, [(key or None, array shape)]) of the data's input arrays, from .npy/.npz headers
    (a folder: its first file) or in-memory arrays; None when they cannot be read here."""
    from .data import LABELS_KEY, Dataset

    def keep(key: Any) -> bool:
        return key != LABELS_KEY or labels_is_input

    if isinstance(data, Dataset):
        return "data", [(k, tuple(a.shape)) for k, a in data.arrays.items()]
    if isinstance(data, Mapping):
        return "data", [(str(k), _shape_of(v)) for k, v in data.items() if keep(k)]
    if isinstance(data, (list, tuple)):
        return "data", [(None, _shape_of(v)) for v in data]
    if hasattr(data, "shape") and not isinstance(data, (str, os.PathLike)):
        return "data", [(None, tuple(data.shape))]
    if not isinstance(data, (str, os.PathLike)):
        return None
    path = Path(os.fspath(data))
    try:
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix.lower() in (".npy", ".npz") and p.is_file())
            if not files:
                return None
            path = files[0]
        where = f"data file {str(path)!r}"
        if path.suffix.lower() == ".npy":
            with open(path, "rb") as handle:
                return where, [(None, _npy_header_shape(handle))]
        if path.suffix.lower() == ".npz":
            import zipfile

            with zipfile.ZipFile(path) as archive:
                named = []
                for info in archive.infolist():
                    key = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
                    if keep(key):
                        with archive.open(info) as handle:
                            named.append((key, _npy_header_shape(handle)))
                return where, named
    except Exception:  # noqa: BLE001 - unreadable data is reported by load_dataset, naming the file
        return None
    return None


def _shape_of(value: Any) -> tuple[int, ...]:
    shape = getattr(value, "shape", None)
    return tuple(int(d) for d in (shape if shape is not None else np.shape(value)))


def _npy_header_shape(handle: Any) -> tuple[int, ...]:
    fmt = np.lib.format
    version = fmt.read_magic(handle)
    reader = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
    return tuple(int(d) for d in reader(handle)[0])


def _record_batch_dims(prepared: Any, dims: dict[str, str]) -> None:
    """Record the dynamic batch dims of inputs pinned from the data (as loading does for a
    dynamic batch alone), so the exported model gets them back."""
    from graph_passes.shapes import BATCH_DIMS_KEY, batch_dims

    for proto in {id(p): p for p in (prepared.original, prepared.model)}.values():
        merged = {**batch_dims(proto), **dims}
        kept = [p for p in proto.metadata_props if p.key != BATCH_DIMS_KEY]
        del proto.metadata_props[:]
        proto.metadata_props.extend(kept)
        proto.metadata_props.add(key=BATCH_DIMS_KEY, value=json.dumps(merged, sort_keys=True))


def _same_file(a: str | os.PathLike, b: Any) -> bool:
    if not isinstance(b, (str, os.PathLike)):
        return False
    try:
        return Path(a).resolve() == Path(b).resolve() or (
            Path(b).exists() and Path(a).exists() and os.path.samefile(a, b))
    except OSError:
        return False


def check_output_not_input(output: str | os.PathLike, **inputs: Any) -> None:
    """An output (the model, its ``.data``, NAME.plan.json, NAME.report.json) must never replace an
    input (the model and its external data files, data, labels, plan...), by name, symlink or hard
    link; and no output may land on a directory or a special file (checked before any work)."""
    from graph_passes.writing import check_target

    targets = [Path(output), Path(f"{output}.data")] + [Path(p) for p in sidecar_paths(output)]
    for target in targets[1:]:
        check_target(target, "sidecar file" if target.suffix == ".json" else "external data file")
    sources = dict(inputs)
    model = inputs.get("model")
    if isinstance(model, (str, os.PathLike)):
        for i, path in enumerate(_external_data_files(model)):
            sources[f"external data file #{i + 1} of the model"] = path
    for what, source in sources.items():
        for target in targets:
            if _same_file(target, source):
                raise OutputError(f"the output {str(target)!r} is the {what} given as input; choose another "
                                  "-o so that nothing you gave is overwritten")


def _external_data_files(model: str | os.PathLike) -> list[str]:
    """The external data files a model file names (the file is parsed; its external data is not read)."""
    from graph_passes.errors import PrunequantError
    from graph_passes.loading import external_data_paths

    try:
        return external_data_paths(model)
    except (PrunequantError, OSError):
        return []  # loading the model reports what is wrong with it


def sidecar_paths(output: str | os.PathLike) -> list[str]:
    """NAME.plan.json and NAME.report.json next to NAME.onnx."""
    out = Path(output)
    stem = out.with_suffix("") if out.suffix else out
    return [f"{stem}.plan.json", f"{stem}.report.json"]


def _write(output: str, model: onnx.ModelProto, plan: CompressionPlan, report: dict, timer: _Timer) -> None:
    """The model, NAME.plan.json and NAME.report.json, all or nothing (the report's timings
    include the write afterwards)."""
    plan_path, report_path = sidecar_paths(output)
    with timer.phase("write"):
        files = {Path(plan_path).name: plan.to_json(),
                 Path(report_path).name: json.dumps(report, indent=2, default=str)}
        write_outputs(output, model, files)
    report["seconds"] = timer.seconds


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"onnx": onnx.__version__}
    try:
        out["prunequant"] = version("prunequant")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        out["prunequant"] = "unknown"
    return out


def _with_metadata(plan: CompressionPlan, **extra: Any) -> CompressionPlan:
    metadata = {**plan.metadata, **extra}
    return CompressionPlan(plan.model_sha256, plan.groups, plan.layers, plan.activations, plan.cost_before,
                           plan.cost_after, metadata)


# ----------------------------------------------------------------------------- compress


def compress(model: str | onnx.ModelProto, data: Any, *, labels: Any = None, output: str | None = None,
             config: CompressConfig | None = None) -> CompressResult:
    """Compress ``model`` with ``config.strategy``; see the module docstring."""
    from graph_passes.digest import model_digest
    from graph_passes.dry_run import dry_run_export

    from .strategies import get_strategy, resolve_options
    from .strategies.problem import Problem, RunSettings
    from .targets import default_target, parse_target

    config = copy.deepcopy(config or CompressConfig())
    _check_config(config)
    precisions = config.precisions()
    if config.lam is not None and config.target is not None:
        raise ConfigError("give either a lambda or a target budget, not both")
    strategy_cls = get_strategy(config.strategy)
    options = resolve_options(strategy_cls, config.strategy_options)
    steerable = bool(getattr(strategy_cls, "steerable", False))
    if config.target is not None and not steerable:
        raise ConfigError(f"--strategy {config.strategy} cannot follow a --target budget (it does not search); "
                          "drop --target, or use a strategy that can (`prunequant strategies`)")
    # a steerable strategy without its own notion of "no budget" gets <cost>=35% by default
    wants_default = bool(getattr(strategy_cls, "default_target", steerable))
    target = config.target or (default_target(config.cost) if config.lam is None and wants_default else None)
    if target is not None:
        parse_target(target)
    if output is not None:
        check_output_path(output)
        check_output_not_input(output, model=model, data=data, labels=labels)
    timer = _Timer()
    with timer.phase("prepare"):
        prepared = _prepare_with_data(model, data, config.input_shapes, config.inexact_hidden_width)
        _check_finite_weights(prepared)
    with timer.phase("dry_run"):
        dry = dry_run_export(prepared.model, prepared.analysis, precisions.weight_widths, precisions.activations,
                             prunes=precisions.prunes)
    with timer.phase("data"):
        dataset = _layout_dataset(prepared.model, data, labels)
        _check_label_classes(dataset, prepared.model)
        if len(dataset) < 2:
            raise DataError(f"{dataset.source}: need at least 2 samples (some are held out for validation)")
        train, held = dataset.split(config.held_out, seed=config.seed)
    device = resolve_device(config.device)
    from .memory import fit_batch_size

    memory = fit_batch_size(prepared.model, 1 if dataset.per_sample else config.batch_size, device=device,
                            enabled=config.memory_guard)
    if memory.lowered:  # search, QAT and calibration all run at the batch that fits
        config.batch_size = memory.batch_size
    from .space import SearchSpace

    space = SearchSpace(prepared.analysis, precisions, model_sha256=model_digest(prepared.original))
    settings = RunSettings(precisions, cost=config.cost, lam=config.lam if config.lam is not None else (
        None if target else DEFAULT_LAMBDA), target=target, epochs=config.epochs,
        finetune_epochs=config.finetune_epochs, qat_schedule=config.qat_schedule,
        batch_size=1 if dataset.per_sample else config.batch_size,
        max_steps_per_epoch=config.max_steps_per_epoch,
        task_loss="cross_entropy" if train.labels is not None else "distill_kl", device=device,
        seed=config.seed, progress=config.progress)
    problem = Problem(prepared, space, train, held, settings, output=output)
    with torch_threads(config.threads, sum(layer.macs for layer in prepared.analysis.layers)):
        from .engine.training import FinetuneConfig, finetune

        with timer.phase("search"):
            found = strategy_cls().search(problem, options)
        engine = found.engine if found.engine is not None else problem.fake_quant()
        if not engine.calibrated:
            engine.calibrate(train, config.batch_size)
        if config.inexact_hidden_width:  # norms over the kept hidden channels, as the pruned model computes them
            from .engine.inexact import install_inexact_masks

            install_inexact_masks(engine, found.plan)
        finetune_epochs = config.finetune_epochs
        if found.epochs_used is not None:  # a budget met early: the unused search epochs go to QAT
            finetune_epochs += max(0, config.epochs - found.epochs_used)
        with timer.phase("finetune"):
            ft = finetune(engine, found.plan, train, FinetuneConfig(
                epochs=finetune_epochs, batch_size=engine.config.batch_size, task_loss=settings.task_loss,
                max_steps_per_epoch=config.max_steps_per_epoch, device=device, seed=config.seed,
                progress=config.progress, schedule=config.qat_schedule),
                validation=held if config.keep_best_qat else None)
        plan = _with_metadata(ft.plan, strategy=config.strategy, strategy_options=found.options or options,
                              target=target,
                              versions=_versions(),
                              **({"inexact_hidden_width": True} if config.inexact_hidden_width else {}))
        with timer.phase("export"):
            exported, gate_report, quality = _export_and_gate(prepared, engine, plan, held,
                                                              config.min_top1_agreement)
    report = _report(prepared, space, plan, exported, gate_report, quality, timer, config, found.history,
                     asdict(dry))
    report["memory"] = memory.to_json()
    if config.compare_runtimes:
        report["runtimes"] = _runtimes(exported.model, held, quality, timer)
    if output is not None:
        _write(output, exported.model, plan, report, timer)
    return CompressResult(exported.model, plan, report, output)


def _runtimes(model: onnx.ModelProto, held: Dataset, quality: dict, timer: _Timer) -> dict:
    """report["runtimes"]: OpenVINO's agreement with onnxruntime (the gate's runtime), or why it
    cannot run the model; never fails the run."""
    from .runtimes import runtimes_report

    with timer.phase("runtimes"):
        if held.whole:  # both runtimes run one sample at a time
            return runtimes_report(model, held.arrays, batch=1, whole=held.whole)
        return runtimes_report(model, held.arrays, batch=None if quality["dynamic_batch_restored"] else 1)


def _layout_dataset(model: onnx.ModelProto, data: Any, labels: Any) -> Dataset:
    """The data loaded under the model's batch layout (graph_passes.batch: inputs whose dim 0 is
    not a batch hold whole inputs; such a model, or one whose dim 0 is no batch, runs one sample
    at a time), and checked by running the model on it (a failure or NaN outputs: DataError)."""
    from graph_passes.batch import batch_layout, check_model_on_data, whole_inputs

    from .data import with_whole

    whole = whole_inputs(model)
    if isinstance(data, Dataset) and not whole and not data.whole:
        dataset = data
    else:
        dataset = load_dataset(data, with_whole(input_specs(model), whole), labels)
    layout = batch_layout(model, dataset.arrays, whole=list(whole))
    dataset.per_sample = layout.per_sample
    if layout.per_sample:
        logger.warning("the model runs one sample at a time, batch 1 throughout (%s)", layout.reason)
    check_model_on_data(model, dataset.arrays, dataset.source, layout)
    return dataset


def _torch_outputs(engine: Any, feeds: dict[str, np.ndarray], batch_size: int = 256,
                   held: Dataset | None = None) -> list[np.ndarray]:
    import torch

    from graph_passes.batch import join_outputs, sample_feed

    names = engine.input_names
    n = len(next(iter(feeds.values())))
    per_sample = held is not None and held.per_sample
    step = batch_size if engine.config.batch_size > 1 and not per_sample else 1
    chunks: list[list[np.ndarray]] = []
    engine.eval()
    device = next((p.device for p in engine.parameters()), torch.device("cpu"))
    with torch.no_grad():
        for start in range(0, n, step):
            part = (sample_feed(feeds, start, held.whole) if per_sample
                    else {k: feeds[k][start:start + step] for k in names})
            out = engine(*[torch.as_tensor(part[k]).to(device) for k in names])
            outs = out if isinstance(out, (tuple, list)) else (out,)
            chunks.append([o.detach().cpu().numpy() for o in outs])
    if per_sample:
        return join_outputs(chunks)
    return [np.concatenate([c[i] for c in chunks]) for i in range(len(chunks[0]))]


def _top1(outputs: list[np.ndarray], labels: np.ndarray | None) -> float | None:
    if labels is None or outputs[0].ndim != 2:
        return None
    return float((outputs[0].argmax(axis=1) == labels).mean())


def _ort_outputs(model: onnx.ModelProto, feeds: dict[str, np.ndarray], batch: int | None,
                 optimize: bool = False, held: Dataset | None = None) -> list[np.ndarray]:
    from graph_passes.batch import run_samples
    from graph_passes.ort_utils import make_session, run_batched

    if held is not None and held.per_sample:
        return run_samples(make_session(model, optimize=optimize), feeds, held.whole)
    return run_batched(make_session(model, optimize=optimize), feeds, batch)


def _random_inputs(model: onnx.ModelProto, samples: int, seed: int) -> Dataset:
    """``samples`` random inputs (the gate's held-out set when no data is given)."""
    from graph_passes.ort_utils import make_session, random_feeds

    from graph_passes.batch import whole_inputs

    from .data import with_whole

    session = make_session(model)
    parts = [random_feeds(session, seed=seed + i) for i in range(samples)]
    whole = whole_inputs(model)
    arrays = {k: np.stack([p[k] for p in parts]) if k in whole else np.concatenate([p[k] for p in parts])
              for k in parts[0]}
    return _layout_dataset(model, Dataset(arrays, None, f"{samples} random inputs (give --data for a held-out "
                                          "check on real inputs)", with_whole(input_specs(model), whole)), None)


def _export_and_gate(prepared: Any, engine: Any, plan: CompressionPlan, held: Dataset, min_top1: float):
    """Write the engine's weights into the ONNX graph, export the plan, pass the gate, and
    measure every output's fidelity to the original model."""
    from graph_passes.batch import restore_dynamic_batch
    from graph_passes.gate import fidelity, gate
    from .bridge import write_back
    from .export import export_plan

    weighted = write_back(prepared.model, engine.materialised_bridge())
    exported = export_plan(weighted, prepared.analysis, plan)
    exported.model, restored = restore_dynamic_batch(exported.model, per_sample=held.per_sample)
    feeds = dict(held.arrays)
    fake_quant = _torch_outputs(engine, feeds, held=held)
    names = [o.name for o in exported.model.graph.output]
    # the gate on at most GATE_SAMPLES held-out samples (a big model fixed to batch 1 runs them one
    # by one, twice); accuracy and fidelity below use every held-out sample
    n_gate = min(len(held), GATE_SAMPLES)
    gate_report = gate(exported.model, {k: v[:n_gate] for k, v in feeds.items()}, [o[:n_gate] for o in fake_quant],
                       min_top1=min_top1, batch=None if restored else 1,
                       per_sample=held.per_sample, whole=held.whole)
    if n_gate == len(held):  # the gate ran the exported model on every held-out sample already
        compressed, optimized = gate_report.outputs["plain"], gate_report.outputs["optimized"]
    else:
        compressed = _ort_outputs(exported.model, feeds, None if restored else 1, held=held)
        optimized = _ort_outputs(exported.model, feeds, None if restored else 1, optimize=True, held=held)
    original = _ort_outputs(prepared.original, feeds, 1, held=held)
    outputs = fidelity(compressed, original, names)
    classifier = fake_quant[0].ndim == 2 and fake_quant[0].shape[1] > 1
    quality = {
        "held_out_samples": len(held),
        "dynamic_batch_restored": restored,
        "per_sample": held.per_sample,
        "whole_inputs": sorted(held.whole),
        "fake_quant_top1_agreement": (float((compressed[0].argmax(1) == fake_quant[0].argmax(1)).mean())
                                      if classifier else None),
        "accuracy_before": _top1(original, held.labels),
        "accuracy_after": _top1(compressed, held.labels),
        "accuracy_after_ort_optimized": _top1(optimized, held.labels),
        "top1_agreement_with_original": (float((compressed[0].argmax(1) == original[0].argmax(1)).mean())
                                         if classifier else None),
        "outputs_vs_original": [asdict(f) for f in outputs],
    }
    return exported, gate_report, quality


def _report(prepared, space, plan, exported, gate_report, quality, timer, config, history, dry) -> dict:
    from cost_models import available_cost_models

    names = available_cost_models()
    before = space.costs(space.baseline_plan(), names)
    after = space.costs(plan, list(before))
    fp32_weight_bytes = sum(4 * layer.params for layer in prepared.analysis.layers)
    return {
        "model": prepared.source,
        "plan_model_sha256": plan.model_sha256,
        "versions": _versions(),
        "strategy": config.strategy,
        "config": {k: v for k, v in asdict(config).items()},
        "layers": {
            name: {"channels_before": b, "channels_after": a, "bits": exported.layer_bits.get(name, {})}
            for name, (b, a) in exported.layer_channels.items()
        },
        "groups_pruned": {g: len(ch) for g, ch in exported.removal.items()},
        "cost_before_8bit": before,
        "cost_after": after,
        "budget": _budget_report(plan, after),
        "file": _file_accounting(exported, fp32_weight_bytes),
        "quality": quality,
        "gate": gate_report.to_json(),
        "dry_run": dry,
        "dequantized": prepared.dequantized.summary() if prepared.dequantized is not None else None,
        "history": history,
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
        **_weight_zeros(exported.model),
    }


def _budget_report(plan: CompressionPlan, after: dict[str, float]) -> dict | None:
    """The budget the search was steered to (``plugin.budget``: the plan's metadata), its absolute
    value in the cost model's unit and the share of it the plan uses; None without one."""
    from .targets import parse_target

    text, absolute = plan.metadata.get("budget"), plan.metadata.get("budget_absolute")
    if not text or not absolute:
        return None
    name = parse_target(str(text)).cost_model
    if name not in after:
        return None
    return {"target": str(text), "cost_model": name, "absolute": float(absolute),
            "used": float(after[name]) / float(absolute)}


def _weight_zeros(model: onnx.ModelProto) -> dict:
    """Exact zeros among the quantized weight integers of the file (a DequantizeLinear's integer
    initializer): fine-grained sparsity's zeros plus those quantization rounds to. The file
    stores them densely; the ``size`` cost model's sparse encoding is a prediction for a sparse
    store, not these bytes."""
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    total = zeros = 0
    for node in model.graph.node:
        tensor = inits.get(node.input[0]) if node.op_type == "DequantizeLinear" and node.input else None
        if tensor is None or tensor.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16,
                                                  onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16):
            continue
        values = np.asarray(numpy_helper.to_array(tensor)).astype(np.int32)
        zp = inits.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if zp is not None:  # an all-8-bit model's weights: uint8 with zero point 128 (graph_passes.qdq)
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1) % max(values.ndim, 1)
            z = np.asarray(numpy_helper.to_array(zp)).astype(np.int32)
            values = values - (z.reshape([-1 if d == axis else 1 for d in range(values.ndim)]) if z.ndim else z)
        total += int(values.size)
        zeros += int(values.size - np.count_nonzero(values))
    return {"weight_integers": total, "zero_weight_integers": zeros}


def summary_table(report: dict) -> str:
    """Before/after table for the CLI."""
    b, a, q = report["cost_before_8bit"], report["cost_after"], report["quality"]
    rows = []
    if "size" in b and "size" in a:
        rows.append(("size (weights, 8-bit = before)", f"{b['size'] / 8:,.0f} B", f"{a['size'] / 8:,.0f} B"))
    if "bops" in b and "bops" in a:
        rows.append(("BOPs", f"{b['bops']:.3g}", f"{a['bops']:.3g}"))
    if "mpic" in b and "mpic" in a:
        rows.append(("mpic latency (cycles)", f"{b['mpic']:.3g}", f"{a['mpic']:.3g}"))
    if "mpic_energy" in b and "mpic_energy" in a:
        rows.append(("mpic energy (uJ)", f"{b['mpic_energy']:.3g}", f"{a['mpic_energy']:.3g}"))
    budget = report.get("budget") or {}
    if budget.get("absolute"):
        from cost_models import get_cost_model

        from .targets import format_cost

        shown = (f"{budget['absolute'] / 8:,.0f} B" if get_cost_model(budget["cost_model"]).unit == "bit"
                 else format_cost(budget["cost_model"], budget["absolute"]))
        rows.append((f"budget ({budget['target']})", shown, f"{100 * budget['used']:.0f}% of it used"))
    if q.get("accuracy_before") is not None:
        rows.append(("accuracy (held out)", f"{100 * q['accuracy_before']:.2f}%", f"{100 * q['accuracy_after']:.2f}%"))
    if q.get("top1_agreement_with_original") is not None:
        rows.append(("top-1 agreement with original", "100%", f"{100 * q['top1_agreement_with_original']:.2f}%"))
    for out in q.get("outputs_vs_original", []):
        sqnr = out.get("sqnr_db")
        if sqnr is not None:  # scale-sensitive: fine-tuning on labels rescales logits at equal top-1
            rows.append((f"{out['name'][:20]}: SQNR vs original", "-", f"{sqnr:.1f} dB"))
    if "file" in report:
        rows.append(("file", f"{report['file']['fp32_weight_bytes']:,} B fp32 weights",
                     f"{report['file']['bytes']:,} B"))
    openvino = (report.get("runtimes") or {}).get("openvino") or {}
    if openvino.get("status") == "ok" and openvino.get("top1_agreement_with_onnxruntime") is not None:
        rows.append(("OpenVINO: top-1 agreement w/ onnxruntime", "-",
                     f"{100 * openvino['top1_agreement_with_onnxruntime']:.2f}%"))
    elif openvino.get("status") == "unsupported":
        rows.append(("OpenVINO", "-", "cannot run it (report: runtimes)"))
    width = max(len(r[0]) for r in rows)
    lines = [f"{'':<{width}}  {'before':>22}  {'after':>22}"]
    lines += [f"{name:<{width}}  {x:>22}  {y:>22}" for name, x, y in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- apply a plan


def apply_plan(model: str | onnx.ModelProto, plan: CompressionPlan | str | os.PathLike, *,
               output: str | None = None, input_shapes: dict[str, list[int]] | None = None,
               data: Any = None, labels: Any = None, progress: bool = True,
               min_top1_agreement: float = 99.0, seed: int = 0) -> ApplyResult:
    """Apply a saved plan to ``model`` without searching or training: remove its pruned channels
    and quantize with its bit-widths and clips. Weight scales are recomputed from the weights
    being exported (a plan's scales belong to the weights it was fine-tuned with). The model
    passes the gate (against the fake-quantized torch model of the same plan, on ``data`` or on
    random inputs) and is written with NAME.plan.json and NAME.report.json, atomically."""
    from graph_passes.digest import model_digest

    from .space import SearchSpace

    source_plan = plan if isinstance(plan, (str, os.PathLike)) else None
    plan = CompressionPlan.load(plan) if not isinstance(plan, CompressionPlan) else plan
    if output is not None:
        check_output_path(output)
        check_output_not_input(output, model=model, plan=source_plan, data=data, labels=labels)
    timer = _Timer()
    with timer.phase("prepare"):
        inexact = bool(plan.metadata.get("inexact_hidden_width", False))  # made by compress --inexact-hidden-width
        prepared = _prepare_with_data(model, data, input_shapes, inexact)
        plan.check_model_hash(model_digest(prepared.original))
        _check_finite_weights(prepared)
    space = SearchSpace(prepared.analysis, _plan_precisions(plan), model_sha256=plan.model_sha256)
    layer_bits = {name: lp.bits for name, lp in plan.layers.items()}
    missing = sorted(set(space.layers) - set(layer_bits))
    if missing:
        from graph_passes.errors import PlanError

        raise PlanError(f"the plan has no entry for layer {missing[0]!r}; it was made for another model")
    scales = space.scales(layer_bits)
    layers = {name: LayerPlan(lp.bits, scales.get(name), lp.sparsity) for name, lp in plan.layers.items()}
    plan = space.with_costs(CompressionPlan(plan.model_sha256, plan.groups, layers, plan.activations,
                                            metadata={**plan.metadata, "applied_by": "export --plan",
                                                      "versions": _versions()}))
    if data is not None:
        dataset = _layout_dataset(prepared.model, data, labels)
        _check_label_classes(dataset, prepared.model)
        held = dataset
    else:
        held = _random_inputs(prepared.model, 16, seed)
    with torch_threads(None, sum(layer.macs for layer in prepared.analysis.layers)):
        from .engine.config import SearchConfig
        from .strategies.problem import _check_batching

        config = SearchConfig(weight_precisions=space.precisions.weights,
                              activation_precisions=space.precisions.activations, progress=progress)
        from .engine.fakequant import FakeQuantModel

        with timer.phase("bridge"):
            engine = FakeQuantModel.build(prepared.model, config, space=space)
            if held.per_sample:
                config.batch_size = 1
            else:
                _check_batching(engine, held, config)
            if data is not None:
                _check_clips(plan, engine.calibrate(held, config.batch_size))
            engine.freeze(plan)
            if inexact:
                from .engine.inexact import install_inexact_masks

                install_inexact_masks(engine, plan)
        with timer.phase("export"):
            exported, gate_report, quality = _export_and_gate(prepared, engine, plan, held, min_top1_agreement)
    report = _report(prepared, space, plan, exported, gate_report, quality, timer,
                     CompressConfig(strategy="plan", progress=progress), [], None)
    report["plan_source"] = str(source_plan) if source_plan is not None else None
    report["held_out_source"] = held.source
    report["runtimes"] = _runtimes(exported.model, held, quality, timer)
    if output is not None:
        _write(output, exported.model, plan, report, timer)
    return ApplyResult(exported.model, plan, report, output)


#: a plan's activation clip may be this many times above or below the range the data shows
CLIP_RANGE_FACTOR = 1000.0


def _check_clips(plan: CompressionPlan, observed: dict[str, float]) -> None:
    """PlanError for a clip wildly off the activations the data produces (99.9th percentile of
    |x| under the original model): finite and inside the plan format's bounds, but such a clip
    quantizes every value to 0 or to one level, which the gate (comparing against a fake-quantized
    model with the same clip) cannot see."""
    for tensor, ap in plan.activations.items():
        seen = observed.get(tensor)
        if not seen or seen <= 0:
            continue
        if ap.clip > CLIP_RANGE_FACTOR * seen or ap.clip * CLIP_RANGE_FACTOR < seen:
            from graph_passes.errors import PlanError

            raise PlanError(f"the plan's activation clip {ap.clip:g} for {tensor!r} is more than "
                            f"{CLIP_RANGE_FACTOR:g}x off the range the data shows there ({seen:.4g}); the plan "
                            "is corrupt or for other data: compress again, or fix activations.*.clip")


def _plan_precisions(plan: CompressionPlan) -> Precisions:
    weights = sorted({b for lp in plan.layers.values() for b in lp.bits} | {0})
    acts = sorted({ap.bits for ap in plan.activations.values()}) or [8]
    if weights == [0]:
        weights = [0, 8]
    return Precisions(tuple(weights), tuple(acts))


__all__ = ["ApplyResult", "CompressConfig", "CompressResult", "apply_plan", "compress", "evaluate",
           "summary_table"]
