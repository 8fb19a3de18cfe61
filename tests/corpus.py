"""The test corpus: real ONNX models, built once and cached.

Two families:

* ``light``: the nine ``light_*.onnx`` models shipped inside the ``onnx`` package (weights come
  from ConstantOfShape nodes). They are referenced in place, never copied.
* ``torchvision``: torchvision architectures with random weights (``weights=None``, seeded),
  exported with both torch exporters (``legacy`` = TorchScript, opset 17; ``dynamo`` =
  torch.export, that exporter's default opset) at the smallest input resolution (a multiple of
  32) at which the model exports and runs in onnxruntime.

Each torchvision model is written as one self-contained ``<name>.onnx`` in the cache directory,
with ``<name>.ref.npz`` (the input and the torch module's output) and ``<name>.json`` (the
:class:`BuildRecord`; written last, it marks the entry as complete). A model/exporter pair that
cannot be built leaves ``<name>.failed.json`` instead; :func:`get_model` then raises
:class:`CorpusBuildError` with the recorded error (``python -m tests.corpus --retry-failed``
tries again). Cached entries are reused, never rebuilt. Builds are serialised by an ``fcntl``
lock on ``.build.lock`` in the cache directory, so pytest-xdist workers can call this at once.

Cache directory: ``$PRUNEQUANT_CORPUS_DIR`` if set, else
``~/.cache/prunequant/corpus/torch-<torch version>-onnx-<onnx version>/``.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import io
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

log = logging.getLogger(__name__)

EXPORTERS: tuple[str, ...] = ("legacy", "dynamo")
LEGACY_OPSET = 17
RESOLUTIONS: tuple[int, ...] = tuple(range(32, 225, 32))
PARITY_RTOL = 1e-3
MIN_INPUT_SENSITIVITY = 1e-3  # below this the output barely depends on the input
SEED = 0
CALIBRATION_BATCHES = 2
CALIBRATION_BATCH_SIZE = 8
INPUT_NAME = "input"
OUTPUT_NAME = "output"


class CorpusBuildError(RuntimeError):
    """A corpus model could not be exported, checked or run."""


@dataclass(frozen=True)
class TorchvisionSpec:
    """How to instantiate one torchvision architecture."""

    arch: str
    kwargs: tuple[tuple[str, Any], ...] = ()
    is_cnn: bool = True
    pass_image_size: bool = False  # ViT: the positional embedding is sized by image_size


TORCHVISION_SPECS: dict[str, TorchvisionSpec] = {
    spec.arch: spec
    for spec in (
        TorchvisionSpec("resnet18"),
        TorchvisionSpec("resnet50"),
        TorchvisionSpec("mobilenet_v2"),
        TorchvisionSpec("mobilenet_v3_small"),
        TorchvisionSpec("efficientnet_b0"),
        TorchvisionSpec("shufflenet_v2_x1_0"),
        TorchvisionSpec("squeezenet1_1"),
        TorchvisionSpec("densenet121"),
        TorchvisionSpec("regnet_x_400mf"),
        TorchvisionSpec("convnext_tiny"),
        TorchvisionSpec("googlenet", (("aux_logits", False), ("init_weights", True))),
        TorchvisionSpec("mnasnet0_5"),
        TorchvisionSpec("vgg11_bn"),
        TorchvisionSpec("vit_b_16", is_cnn=False, pass_image_size=True),
    )
}


@dataclass
class BuildRecord:
    """What happened when one torchvision model was exported and verified."""

    name: str
    arch: str
    exporter: str
    resolution: int | None = None
    opset: int | None = None
    export_seconds: float | None = None
    build_seconds: float | None = None
    parity_error: float | None = None
    parity_ok: bool | None = None
    input_sensitivity: float | None = None  # relative_error(f(x1), f(x2)): ~0 = degenerate
    output_scale: float | None = None  # max |f(x1)|
    nodes: int | None = None
    params: int | None = None
    file_size: int | None = None
    torch_version: str = ""
    onnx_version: str = onnx.__version__
    attempts: list[str] = field(default_factory=list)  # failures at smaller resolutions
    error: str | None = None


@dataclass(frozen=True)
class CorpusModel:
    """One model of the corpus, ready to load from ``path``."""

    name: str  # "light_resnet50", "resnet18-legacy", "resnet18-dynamo"
    path: Path
    family: str  # "light" or "torchvision"
    exporter: str | None  # "legacy", "dynamo", or None for light models
    is_cnn: bool
    input_shapes: dict[str, list[int]] = field(hash=False)
    record: BuildRecord | None = field(default=None, hash=False, compare=False)

    @property
    def opset(self) -> int:
        return _default_opset(onnx.load(self.path, load_external_data=False))


# --------------------------------------------------------------------------- locations and names


def light_dir() -> Path:
    return Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"


def cache_dir() -> Path:
    """The corpus cache directory (created on first use)."""
    env = os.environ.get("PRUNEQUANT_CORPUS_DIR")
    if env:
        path = Path(env).expanduser()
    else:
        import torch  # the cache key is torch.__version__, which has the local tag (+cu130)

        torch_version = torch.__version__
        path = Path.home() / ".cache" / "prunequant" / "corpus"
        path = path / f"torch-{torch_version}-onnx-{onnx.__version__}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _torchvision_name(arch: str, exporter: str) -> str:
    return f"{arch}-{exporter}"


def _split_name(name: str) -> tuple[str, str]:
    arch, _, exporter = name.rpartition("-")
    if arch not in TORCHVISION_SPECS or exporter not in EXPORTERS:
        raise KeyError(f"unknown corpus model {name!r}; known: {', '.join(CORPUS_NAMES)}")
    return arch, exporter


LIGHT_NAMES: list[str] = sorted(p.stem for p in light_dir().glob("light_*.onnx"))
TORCHVISION_NAMES: list[str] = [
    _torchvision_name(arch, exp) for arch in TORCHVISION_SPECS for exp in EXPORTERS
]
CORPUS_NAMES: list[str] = LIGHT_NAMES + TORCHVISION_NAMES


# --------------------------------------------------------------------------- light models


def _default_opset(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def graph_input_shapes(model: onnx.ModelProto) -> dict[str, list[int]]:
    """Static shapes of the graph inputs that are not initializers."""
    inits = {init.name for init in model.graph.initializer}
    return {
        inp.name: [d.dim_value for d in inp.type.tensor_type.shape.dim]
        for inp in model.graph.input
        if inp.name not in inits
    }


def light_models() -> list[CorpusModel]:
    """The light models shipped with the onnx package, referenced in place."""
    models = []
    for name in LIGHT_NAMES:
        path = light_dir() / f"{name}.onnx"
        shapes = graph_input_shapes(onnx.load(path, load_external_data=False))
        models.append(CorpusModel(name, path, "light", None, True, shapes))
    return models


# --------------------------------------------------------------------------- onnxruntime checks


def run_onnxruntime(path: Path, feeds: dict[str, np.ndarray], optimize: bool = False) -> list:
    """Run a model on CPU; graph optimisations off by default for tight comparisons."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def relative_error(reference: np.ndarray, actual: np.ndarray) -> float:
    """max |actual - reference| / max |reference|."""
    if reference.shape != actual.shape:
        return float("inf")
    scale = float(np.max(np.abs(reference)))
    return float(np.max(np.abs(actual.astype(np.float64) - reference))) / max(scale, 1e-12)


def verify(model: CorpusModel) -> float | None:
    """Check the model with onnx.checker and run it in onnxruntime.

    Returns the parity error against the stored torch output (torchvision models), or None
    for light models, which are only checked to run and give finite outputs.
    """
    onnx.checker.check_model(str(model.path))
    if model.family == "light":
        rng = np.random.default_rng(SEED)
        feeds = {
            k: rng.standard_normal(v).astype(np.float32) for k, v in model.input_shapes.items()
        }
        outputs = run_onnxruntime(model.path, feeds)
        if not all(np.isfinite(out).all() for out in outputs):
            raise CorpusBuildError(f"{model.name}: onnxruntime output is not finite")
        return None
    ref = np.load(_ref_path(model.path.parent, model.name))
    (got,) = run_onnxruntime(model.path, {INPUT_NAME: ref["input"]})
    return relative_error(ref["output"], got)


# --------------------------------------------------------------------------- cache files


def _onnx_path(root: Path, name: str) -> Path:
    return root / f"{name}.onnx"


def _ref_path(root: Path, name: str) -> Path:
    return root / f"{name}.ref.npz"


def _record_path(root: Path, name: str) -> Path:
    return root / f"{name}.json"


def _failed_path(root: Path, name: str) -> Path:
    return root / f"{name}.failed.json"


@contextlib.contextmanager
def _atomic_target(final: Path) -> Iterator[Path]:
    """Yield a temp path in ``final``'s directory; move it onto ``final`` on success."""
    fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=f".tmp-{final.name}-")
    os.close(fd)
    os.chmod(tmp, 0o644)
    try:
        yield Path(tmp)
        os.replace(tmp, final)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _write_json(path: Path, record: BuildRecord) -> None:
    with _atomic_target(path) as tmp:
        tmp.write_text(json.dumps(asdict(record), indent=2))


def _read_record(path: Path) -> BuildRecord:
    return BuildRecord(**json.loads(path.read_text()))


@contextlib.contextmanager
def _build_lock(root: Path) -> Iterator[None]:
    with open(root / ".build.lock", "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# --------------------------------------------------------------------------- torch export


def _make_module(spec: TorchvisionSpec, resolution: int) -> Any:
    import torch
    import torchvision

    kwargs = dict(spec.kwargs)
    if spec.pass_image_size:
        kwargs["image_size"] = resolution
    torch.manual_seed(SEED)
    module = getattr(torchvision.models, spec.arch)(weights=None, **kwargs).eval()
    _condition(module, resolution)
    return module


def _condition(module: Any, resolution: int) -> None:
    """Make the random network numerically useful as a test model.

    torchvision's initialisations leave some untrained networks degenerate: ViT's head is
    zero-initialised (its output is identically 0), GoogLeNet's output does not depend on its
    input (std-0.01 weights, identity BatchNorms), MobileNet/EfficientNet/MNASNet outputs are
    ~1e-10. So: weights that are all zero get their layer's default random init, and the
    BatchNorm running statistics are calibrated on random images (BatchNorm layers alone in
    train mode, cumulative average). Weights stay random; BatchNorms become non-trivial.
    """
    import torch

    for layer in module.modules():
        if isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)) and not layer.weight.any():
            layer.reset_parameters()
    norms = [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [bn.momentum for bn in norms]
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
    generator = torch.Generator().manual_seed(SEED + 2)
    shape = (CALIBRATION_BATCH_SIZE, 3, resolution, resolution)
    with torch.no_grad():
        for _ in range(CALIBRATION_BATCHES) if norms else ():
            module(torch.randn(shape, generator=generator))
    for bn, momentum in zip(norms, momenta):
        bn.momentum = momentum
        bn.eval()


def _reference(module: Any, resolution: int) -> tuple[Any, np.ndarray, float]:
    """The example input, the module's output on it, and the output's input sensitivity."""
    import torch

    generator = torch.Generator().manual_seed(SEED)
    example, other = (torch.randn(1, 3, resolution, resolution, generator=generator) for _ in "ab")
    with torch.no_grad():
        reference, other_output = module(example).numpy(), module(other).numpy()
    return example, reference, relative_error(reference, other_output)


def _export(module: Any, example: Any, exporter: str, target: Path) -> None:
    import torch

    options: dict[str, Any] = {"input_names": [INPUT_NAME], "output_names": [OUTPUT_NAME]}
    if exporter == "legacy":
        options.update(dynamo=False, opset_version=LEGACY_OPSET)
    else:
        options.update(dynamo=True, verbose=False, external_data=False)
    with _quiet_exporter():
        torch.onnx.export(module, (example,), str(target), **options)


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporters' warnings, progress prints and INFO logs during one export."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "onnxscript", "onnx_ir")]
    levels = [lg.level for lg in loggers]
    sink = io.StringIO()
    with (
        warnings.catch_warnings(),
        contextlib.redirect_stdout(sink),
        contextlib.redirect_stderr(sink),
    ):
        warnings.simplefilter("ignore")
        for lg in loggers:
            lg.setLevel(logging.WARNING)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)


def _save_self_contained(exported: Path, target: Path) -> onnx.ModelProto:
    """Load an export (with any external data beside it) and write it as one file."""
    model = onnx.load(str(exported), load_external_data=True)
    onnx.save_model(model, str(target), save_as_external_data=False)
    return model


def _param_count(model: onnx.ModelProto) -> int:
    return sum(int(np.prod(init.dims)) for init in model.graph.initializer)


def _try_resolution(
    spec: TorchvisionSpec, record: BuildRecord, resolution: int, root: Path
) -> None:
    """Export at one resolution, check and run it; leave the files in ``root`` on success."""
    module = _make_module(spec, resolution)
    example, reference, record.input_sensitivity = _reference(module, resolution)
    record.output_scale = float(np.max(np.abs(reference)))
    scratch = Path(tempfile.mkdtemp(dir=root, prefix=f".tmp-{record.name}-"))
    try:
        start = time.perf_counter()
        _export(module, example, record.exporter, scratch / "model.onnx")
        record.export_seconds = round(time.perf_counter() - start, 2)
        model = _save_self_contained(scratch / "model.onnx", scratch / "single.onnx")
        onnx.checker.check_model(str(scratch / "single.onnx"))
        (got,) = run_onnxruntime(scratch / "single.onnx", {INPUT_NAME: example.numpy()})
        record.resolution, record.opset = resolution, _default_opset(model)
        record.nodes, record.params = len(model.graph.node), _param_count(model)
        record.parity_error = relative_error(reference, got)
        record.parity_ok = record.parity_error <= PARITY_RTOL
        np.savez(scratch / "ref.npz", input=example.numpy(), output=reference)
        os.replace(scratch / "ref.npz", _ref_path(root, record.name))
        os.replace(scratch / "single.onnx", _onnx_path(root, record.name))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _build(arch: str, exporter: str, root: Path) -> BuildRecord:
    """Export ``arch`` with ``exporter`` at the smallest resolution that works."""
    import torch

    spec = TORCHVISION_SPECS[arch]
    name = _torchvision_name(arch, exporter)
    record = BuildRecord(name, arch, exporter, torch_version=torch.__version__)
    start = time.perf_counter()
    for resolution in RESOLUTIONS:
        try:
            _try_resolution(spec, record, resolution, root)
        except Exception as exc:  # noqa: BLE001 - any failure means: try the next resolution
            message = f"{resolution}px: {type(exc).__name__}: {str(exc).strip()[:2000]}"
            log.info("corpus %s failed at %s", record.name, message.splitlines()[0])
            record.attempts.append(message)
            continue
        break
    else:
        failure = record.attempts[-1]
        record.error = f"{record.name}: no resolution in {RESOLUTIONS} works; {failure}"
    record.build_seconds = round(time.perf_counter() - start, 2)
    if record.error is None:
        record.file_size = _onnx_path(root, record.name).stat().st_size
    return record


def _model_from_record(record: BuildRecord, root: Path) -> CorpusModel:
    spec = TORCHVISION_SPECS[record.arch]
    shapes = {INPUT_NAME: [1, 3, record.resolution, record.resolution]}
    path = _onnx_path(root, record.name)
    return CorpusModel(
        record.name, path, "torchvision", record.exporter, spec.is_cnn, shapes, record
    )


def _cached(name: str, root: Path) -> CorpusModel | None:
    if _record_path(root, name).exists():
        return _model_from_record(_read_record(_record_path(root, name)), root)
    if _failed_path(root, name).exists():
        raise CorpusBuildError(_read_record(_failed_path(root, name)).error)
    return None


def _get_torchvision(name: str) -> CorpusModel:
    arch, exporter = _split_name(name)
    root = cache_dir()
    model = _cached(name, root)
    if model is not None:
        return model
    with _build_lock(root):
        model = _cached(name, root)  # another worker may have built it meanwhile
        if model is not None:
            return model
        log.info("building corpus model %s in %s", name, root)
        record = _build(arch, exporter, root)
        if record.error is not None:
            _write_json(_failed_path(root, name), record)
            raise CorpusBuildError(record.error)
        _write_json(_record_path(root, name), record)
        log.info("built %s in %.1fs (parity %.2e)", name, record.build_seconds, record.parity_error)
        return _model_from_record(record, root)


# --------------------------------------------------------------------------- public API


def get_model(name: str) -> CorpusModel:
    """One corpus model by name; a torchvision model is built if it is not cached yet."""
    if name in LIGHT_NAMES:
        return next(m for m in light_models() if m.name == name)
    return _get_torchvision(name)


def torchvision_models(
    names: list[str] | None = None,
    exporters: Sequence[str] = EXPORTERS,
    skip_failed: bool = False,
) -> list[CorpusModel]:
    """The torchvision models (all architectures unless ``names``), building missing ones.

    ``names`` are architecture names ("resnet18"); a failed build raises
    :class:`CorpusBuildError` unless ``skip_failed``, where it is logged as an error.
    """
    models = []
    for arch in names if names is not None else list(TORCHVISION_SPECS):
        for exporter in exporters:
            try:
                models.append(_get_torchvision(_torchvision_name(arch, exporter)))
            except CorpusBuildError as exc:
                if not skip_failed:
                    raise
                log.error("corpus model skipped: %s", exc)
    return models


def all_models(skip_failed: bool = False) -> list[CorpusModel]:
    """Light models followed by every torchvision model (built if needed)."""
    return light_models() + torchvision_models(skip_failed=skip_failed)


# --------------------------------------------------------------------------- command line


def _table_row(model: CorpusModel, parity: float | None) -> list[str]:
    rec = model.record
    size = model.path.stat().st_size
    params = rec.params if rec else _param_count(onnx.load(model.path))
    return [
        model.name,
        str(rec.opset if rec else model.opset),
        str(rec.resolution if rec else next(iter(model.input_shapes.values()))[-1]),
        str(rec.nodes if rec else len(onnx.load(model.path, load_external_data=False).graph.node)),
        f"{params / 1e6:.2f}M",
        f"{size / 2**20:.1f}MiB",
        f"{rec.export_seconds:.1f}" if rec else "-",
        f"{rec.output_scale:.1e}" if rec else "-",
        f"{rec.input_sensitivity:.1e}" if rec else "-",
        "-" if parity is None else f"{parity:.1e}" + ("" if parity <= PARITY_RTOL else " FAIL"),
    ]


def _print_table(rows: list[list[str]]) -> None:
    header = ["name", "opset", "res", "nodes", "params", "size", "export_s", "out_scale"]
    header += ["sensitivity", "ort_parity"]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)))


def main(argv: list[str] | None = None) -> int:
    from tqdm import tqdm

    parser = argparse.ArgumentParser(description="Build the prunequant test corpus, summarise it.")
    parser.add_argument("names", nargs="*", help="corpus names (default: all)")
    parser.add_argument("--retry-failed", action="store_true", help="rebuild recorded failures")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    names = args.names or CORPUS_NAMES
    if args.retry_failed:
        for name in names:
            _failed_path(cache_dir(), name).unlink(missing_ok=True)
    start, rows, failures = time.perf_counter(), [], []
    for name in tqdm(names, desc="corpus"):
        try:
            model = get_model(name)
            rows.append(_table_row(model, verify(model)))
        except CorpusBuildError as exc:
            failures.append(str(exc))
    print(f"cache: {cache_dir()}")
    _print_table(rows)
    print(f"total {time.perf_counter() - start:.1f}s, {len(rows)} ok, {len(failures)} failed")
    for failure in failures:
        print("FAILED", failure)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())


# --------------------------------------------------------------------------- test helpers


def randomise_weights(model: onnx.ModelProto, layers, seed: int) -> None:
    """Seeded random values for weight layers and for per-channel affine constants.

    Weights are He-scaled, biases N(0, 0.1); float initializers with more than one value read by
    BatchNormalization, Mul or Add (the light models' unfolded per-channel scales and shifts,
    all 0.02, shrink the signal 50x per layer) become scales U(0.5, 1.5) or shifts N(0, 0.1).
    """
    rng = np.random.default_rng(seed)
    inits = {init.name: init for init in model.graph.initializer}
    values: dict[str, np.ndarray] = {}
    for node in model.graph.node:
        scales = {"BatchNormalization": (1, 4), "Mul": (0, 1)}.get(node.op_type, ())
        shifts = {"BatchNormalization": (2, 3), "Add": (0, 1)}.get(node.op_type, ())
        for index, name in enumerate(node.input):
            init = inits.get(name)
            if init is None or init.data_type != onnx.TensorProto.FLOAT or np.prod(init.dims) < 2:
                continue
            shape = tuple(init.dims)
            if index in scales:
                values[name] = rng.uniform(0.5, 1.5, shape)
            elif index in shifts:
                values[name] = rng.standard_normal(shape) * 0.1
    for layer in layers:
        shape = tuple(inits[layer.weight].dims)
        fan_in = max(int(np.prod(shape)) // max(layer.out_channels, 1), 1)
        values[layer.weight] = rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)
        if layer.bias in inits:
            values[layer.bias] = rng.standard_normal(tuple(inits[layer.bias].dims)) * 0.1
    for name, value in values.items():
        inits[name].CopyFrom(numpy_helper.from_array(value.astype(np.float32), name))


def expose_logits(model: onnx.ModelProto) -> None:
    """Add the input of every Softmax that produces a graph output as another graph output.

    Random deep nets without normalisation (light ResNet-50, ShuffleNet) have logits in the
    thousands: their softmax is one-hot whatever the input, and would hide any error upstream.
    """
    outputs = {o.name for o in model.graph.output}
    for node in model.graph.node:
        if node.op_type == "Softmax" and node.output[0] in outputs and node.input[0] not in outputs:
            typed = [v for v in model.graph.value_info if v.name == node.input[0]]
            model.graph.output.append(typed[0] if typed else onnx.ValueInfoProto(name=node.input[0]))
            outputs.add(node.input[0])
