"""Measure a model on data with onnxruntime (CPU): accuracy, and agreement with a reference.

``runtime="openvino"`` runs the model in OpenVINO on CPU instead
(:mod:`plugin.runtimes`, the optional extra ``prunequant[openvino]``); a
reference always runs in onnxruntime, so ``--reference`` the same file compares the two runtimes.

* With labels: top-1 accuracy. The model must be a classifier: output 0 has shape ``[N, C]``.
* With a reference model (usually the original the model was compressed from): top-1 agreement
  (classifiers only) and the relative error of every output against the reference's. An
  output's error is ``|y - y_ref|`` divided by the largest ``|y_ref|`` of that output over the
  whole dataset (so values near zero do not blow it up): ``max_rel_error`` is the largest such
  element, ``mean_rel_error`` the mean over all elements. The headline numbers are the worst
  over the outputs; per-output numbers are in ``outputs``.
* Both when both are given. Neither is an error.

The batch axis: a model that declares dim 0 symbolic runs on batches of ``batch_size``; a
model that fixes its batch size B runs on batches of exactly B (the last one padded with
copies of its last sample, whose outputs are dropped).

Batch layouts (as ``compress`` finds them, :mod:`graph_passes.batch`): an input whose dim 0 is
not a batch (a recurrent state ``[layers, 1, hidden]``) is a *whole* input
(``InputSpec.whole``, in :attr:`RunnableModel.specs`): its data holds N whole inputs
``[N, *input_shape]``. Such a model, and one with a free dim 0 on which two samples do not give
the two single results (dim 0 is time, or the graph bakes in a batch of 1), runs one sample at a
time; its outputs are joined per output (a batch of 1 concatenated, anything else stacked).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import onnx
import onnxruntime as ort
from tqdm import tqdm

from graph_passes.batch import batch_layout, run_samples, whole_inputs
from graph_passes.errors import DataError, InputFileError, PrunequantError, UnsupportedModelError
from graph_passes.loading import check_runnable, load_model
from graph_passes.ort_utils import make_session
from graph_passes.shapes import graph_inputs, tensor_shape, value_dims

from .data import Dataset, InputSpec, dims_text, input_specs, with_whole

logger = logging.getLogger(__name__)

#: the runtimes :func:`evaluate` can run a model in
RUNTIMES = ("onnxruntime", "openvino")
_TINY = 1e-12
_IN_MEMORY = "<in-memory model>"


# ----------------------------------------------------------------------------- the model


@dataclass
class RunnableModel:
    """A safely loaded model, ready for onnxruntime, with its input specs.

    ``session_model`` keeps the batch axis symbolic where the model declared it so;
    ``output_shapes`` are the inferred output shapes with the batch pinned to 1 (None: unknown).
    Specs marked ``whole`` are inputs whose dim 0 is not a batch (see the module docs).
    """

    name: str
    session_model: onnx.ModelProto = field(repr=False)
    specs: list[InputSpec]
    output_names: list[str]
    output_shapes: list[list[int] | None]

    @property
    def label(self) -> str:
        """How messages name the model."""
        return "the in-memory model" if self.name == _IN_MEMORY else f"model {self.name!r}"

    @property
    def whole(self) -> frozenset[str]:
        """The inputs whose dim 0 is not a batch (a sample is the whole input)."""
        return frozenset(s.name for s in self.specs if s.whole)

    @property
    def fixed_batch(self) -> int | None:
        """The batch size the model fixes (whole inputs aside), or None when its batch axis is free."""
        fixed = {s.shape[0] for s in self.specs if not s.batch_dynamic and not s.whole}
        if len(fixed) > 1:
            raise UnsupportedModelError(
                f"{self.label} fixes different batch sizes on its inputs ({sorted(fixed)}); "
                "prunequant needs one batch axis - re-export with a dynamic batch"
            )
        return fixed.pop() if fixed else None


def load_runnable(
    source: str | os.PathLike | onnx.ModelProto,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
) -> RunnableModel:
    """Load ``source`` safely; a symbolic batch axis is pinned to 1 to load, kept free to run.

    ``input_shapes`` pins other symbolic dims (as ``--input-shape`` does). Inputs whose static
    dim 0 is not a batch (:func:`graph_passes.batch.whole_inputs`, as ``compress`` finds them)
    come back as whole inputs.
    """
    name = os.fspath(source) if isinstance(source, (str, os.PathLike)) else _IN_MEMORY
    declared = _declared_inputs(source)
    dynamic = {v.name for v in declared if _batch_is_symbolic(v)}
    pins = {v.name: _batch_pin(v) for v in declared if v.name in dynamic and _rest_static(v)}
    pins.update({key: list(dims) for key, dims in (input_shapes or {}).items()})
    model = load_model(source, pins or None)
    check_runnable(model)
    specs = [dataclasses.replace(s, batch_dynamic=s.name in dynamic) for s in input_specs(model)]
    whole = [name for name in whole_inputs(model) if name not in dynamic]
    if whole:
        specs = with_whole(specs, whole)
        logger.info("%s: input(s) %s hold no batch in dim 0; it runs one sample at a time",
                    name if name != _IN_MEMORY else "the in-memory model", ", ".join(whole))
    outputs = [out.name for out in model.graph.output]
    shapes = [tensor_shape(model, name) for name in outputs]
    _free_batch_axis(model, dynamic)
    return RunnableModel(name, model, specs, outputs, shapes)


def _declared_inputs(source: object) -> list[onnx.ValueInfoProto]:
    """The inputs as the model declares them, before pinning; [] when the file cannot be read
    (load_model then reports the problem with a proper message)."""
    if isinstance(source, onnx.ModelProto):
        return graph_inputs(source)
    if not isinstance(source, (str, os.PathLike)) or not os.path.isfile(source):
        return []
    try:
        return graph_inputs(onnx.load(os.fspath(source), load_external_data=False))
    except Exception:  # noqa: BLE001 - any failure is diagnosed by load_model right after
        return []


def _batch_is_symbolic(value: onnx.ValueInfoProto) -> bool:
    dims = value_dims(value) if value.type.HasField("tensor_type") else None
    return bool(dims) and not isinstance(dims[0], int)  # type: ignore[index]


def _rest_static(value: onnx.ValueInfoProto) -> bool:
    return all(isinstance(d, int) for d in (value_dims(value) or [])[1:])


def _batch_pin(value: onnx.ValueInfoProto) -> list[int]:
    return [1, *(int(d) for d in (value_dims(value) or [])[1:])]


def _free_batch_axis(model: onnx.ModelProto, dynamic: set[str]) -> None:
    """Undo the batch pin (in place): symbolic dim 0 on those inputs, inferred shapes dropped."""
    if not dynamic:
        return
    for value in model.graph.input:
        if value.name in dynamic:
            dim = value.type.tensor_type.shape.dim[0]
            dim.Clear()
            dim.dim_param = "batch"
    del model.graph.value_info[:]
    for out in model.graph.output:
        if out.type.HasField("tensor_type"):
            out.type.tensor_type.ClearField("shape")


# ------------------------------------------------------------------------------ results


@dataclass
class OutputDifference:
    """Relative error of one output against the reference's (see the module docs)."""

    name: str
    max_rel_error: float
    mean_rel_error: float


@dataclass
class EvaluationResult:
    """What :func:`evaluate` measured; ``accuracy`` and ``agreement`` are fractions in [0, 1]."""

    model: str
    samples: int
    runtime: str = "onnxruntime"
    accuracy: float | None = None
    correct: int | None = None
    reference: str | None = None
    agreement: float | None = None
    max_rel_error: float | None = None
    mean_rel_error: float | None = None
    outputs: list[OutputDifference] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready; a non-finite error (NaN/Inf in an output) becomes null."""
        return _json_safe(dataclasses.asdict(self))

    def to_text(self) -> str:
        rows = [("model", self.model), ("runtime", self.runtime), ("samples", str(self.samples))]
        if self.accuracy is not None:
            rows.append(("accuracy", f"{self.accuracy:.2%} ({self.correct}/{self.samples})"))
        if self.reference is not None:
            rows.append(("reference", self.reference))
            if self.agreement is not None:
                rows.append(("top-1 agreement", f"{self.agreement:.2%}"))
            rows.append(("max rel error", _fmt_error(self.max_rel_error)))
            rows.append(("mean rel error", _fmt_error(self.mean_rel_error)))
            if len(self.outputs) > 1:
                rows.extend((f"  output {o.name}", f"max {_fmt_error(o.max_rel_error)}, mean "
                             f"{_fmt_error(o.mean_rel_error)}") for o in self.outputs)
        rows.append(("time", f"{self.seconds:.2f} s"))
        width = max(len(key) for key, _ in rows)
        return "\n".join(f"{key:<{width}}  {value}" for key, value in rows)


def _fmt_error(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3g}"


def _json_safe(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


# ---------------------------------------------------------------------------- counters


@dataclass
class _Top1:
    """Counts samples whose argmax over output 0 equals a target (labels or the reference's)."""

    matched: int = 0
    total: int = 0

    def update(self, logits: np.ndarray, targets: np.ndarray) -> None:
        self.matched += int(np.count_nonzero(np.argmax(logits, axis=1) == targets))
        self.total += len(targets)

    @property
    def fraction(self) -> float:
        return self.matched / self.total if self.total else 0.0


@dataclass
class _Difference:
    """Running |y - y_ref| statistics of one output."""

    name: str
    max_abs: float = 0.0
    sum_abs: float = 0.0
    count: int = 0
    scale: float = 0.0
    finite: bool = True

    def update(self, got: np.ndarray, ref: np.ndarray, labels: tuple[str, str]) -> None:
        if got.shape != ref.shape:
            raise InputFileError(
                f"output {self.name!r} has shape [{dims_text(got.shape)}] in {labels[0]} but "
                f"[{dims_text(ref.shape)}] in the reference {labels[1]}; pass the model this one "
                "was made from as --reference"
            )
        got64, ref64 = got.astype(np.float64), ref.astype(np.float64)
        diff = np.abs(got64 - ref64)
        if not (np.isfinite(diff).all() and np.isfinite(ref64).all()):
            self.finite = False
            return
        if diff.size:
            self.max_abs = max(self.max_abs, float(diff.max()))
            self.scale = max(self.scale, float(np.abs(ref64).max()))
        self.sum_abs += float(diff.sum())
        self.count += diff.size

    def result(self) -> OutputDifference:
        if not self.finite:
            return OutputDifference(self.name, math.inf, math.inf)
        scale = max(self.scale, _TINY)
        mean = self.sum_abs / self.count if self.count else 0.0
        return OutputDifference(self.name, self.max_abs / scale, mean / scale)


# ----------------------------------------------------------------------------- evaluate


def evaluate(
    model: str | os.PathLike | onnx.ModelProto | RunnableModel,
    dataset: Dataset,
    *,
    reference: str | os.PathLike | onnx.ModelProto | RunnableModel | None = None,
    batch_size: int = 64,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    optimize: bool = True,
    progress: bool | None = None,
    runtime: str = "onnxruntime",
) -> EvaluationResult:
    """Run ``model`` (and ``reference``) over ``dataset``; see the module docs for the metrics.

    ``optimize`` runs onnxruntime with all graph optimisations (as deployed); ``progress``
    shows a tqdm bar (None: only when stderr is a terminal). ``runtime``: ``"onnxruntime"`` or
    ``"openvino"`` (CPU) for ``model``; the reference always runs in onnxruntime.
    """
    if runtime not in RUNTIMES:
        from graph_passes.errors import ConfigError

        raise ConfigError(f"--runtime {runtime!r} is not one of {', '.join(RUNTIMES)}")
    if dataset.labels is None and reference is None:
        raise DataError(
            f"nothing to evaluate: {dataset.source} has no labels and no reference model was "
            "given; pass --labels (or a 'labels' key in the data .npz) for accuracy, or "
            "--reference ORIGINAL.onnx for agreement"
        )
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise DataError(f"batch size must be a positive integer, got {batch_size!r}")
    start = time.perf_counter()
    main = _as_runnable(model, input_shapes)
    _require_fits(dataset, main)
    ref = None
    if reference is not None:
        ref = _as_runnable(reference, _known_pins(reference, input_shapes))
        _require_same_inputs(main, ref)
    if dataset.labels is not None:
        _require_classifier_shape(main)
    layouts = (_per_sample(main, dataset), _per_sample(ref, dataset) if ref is not None else False)
    result = _Run(main, ref, dataset, optimize, runtime, layouts).execute(batch_size, _show_progress(progress))
    result.seconds = time.perf_counter() - start
    logger.info("evaluated %s on %d samples in %.2f s", main.label, len(dataset), result.seconds)
    return result


def _per_sample(model: RunnableModel, dataset: Dataset) -> bool:
    """Whether ``model`` runs one sample at a time on ``dataset``: it has whole inputs, or its
    batch axis is free but two of the data's samples along dim 0 do not give the two single
    results (:func:`graph_passes.batch.batch_layout`, the check ``compress`` makes). A model that
    fixes its batch size runs batches of that size (1: one sample per run already)."""
    if model.whole:
        return True
    if model.fixed_batch is not None:
        return False
    layout = batch_layout(model.session_model, dataset.arrays, whole=())
    if layout.per_sample:
        logger.info("%s runs one sample at a time (%s)", model.label, layout.reason)
    return layout.per_sample


def _as_runnable(source: Any, input_shapes: Mapping[str, Sequence[int]] | None) -> RunnableModel:
    return source if isinstance(source, RunnableModel) else load_runnable(source, input_shapes)


def _known_pins(
    source: Any, input_shapes: Mapping[str, Sequence[int]] | None
) -> Mapping[str, Sequence[int]] | None:
    """The user's pins restricted to the reference's inputs (they usually share them)."""
    if not input_shapes or isinstance(source, RunnableModel):
        return input_shapes
    names = {v.name for v in _declared_inputs(source)}
    return {k: v for k, v in input_shapes.items() if k in names} or None


def _show_progress(progress: bool | None) -> bool:
    if progress is not None:
        return progress
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


def _require_fits(dataset: Dataset, model: RunnableModel) -> None:
    """The dataset's arrays must be the model's inputs (it may have been built for another)."""
    names = [s.name for s in model.specs]
    if sorted(dataset.arrays) != sorted(names):
        raise DataError(
            f"{dataset.source} has arrays for {sorted(dataset.arrays)} but {model.label} has "
            f"inputs {names}; load the data with this model's input specs"
        )
    for spec in model.specs:
        array = dataset.arrays[spec.name]
        if array.shape[1:] != spec.sample_shape or array.dtype != spec.dtype:
            raise DataError(
                f"{dataset.source}: input {spec.name!r} is [{dims_text(['N', *array.shape[1:]])}] "
                f"{array.dtype} but {model.label} expects {spec.describe()}; load the data with "
                "this model's input specs"
            )


def _require_same_inputs(model: RunnableModel, ref: RunnableModel) -> None:
    mine = [(s.name, s.sample_shape, s.dtype) for s in model.specs]
    theirs = [(s.name, s.sample_shape, s.dtype) for s in ref.specs]
    same_outputs = len(model.output_names) == len(ref.output_names)
    if sorted(mine, key=str) != sorted(theirs, key=str) or not same_outputs:
        raise InputFileError(
            f"reference {ref.label} does not match {model.label}: inputs "
            f"{[s.describe() for s in ref.specs]} vs {[s.describe() for s in model.specs]}, "
            f"{len(ref.output_names)} vs {len(model.output_names)} outputs; pass the model this "
            "one was made from as --reference"
        )


def _require_classifier_shape(model: RunnableModel, shape: Sequence[int] | None = None) -> None:
    shape = shape if shape is not None else model.output_shapes[0]
    if shape is None or (len(shape) == 2 and shape[1] >= 2):
        return
    raise UnsupportedModelError(
        f"accuracy needs a classifier whose output 0 has shape [N, C] with C >= 2, but output "
        f"{model.output_names[0]!r} of {model.label} has shape [{dims_text(shape)}]; drop "
        "--labels and compare against --reference instead"
    )


# --------------------------------------------------------------------------- the run loop


class _Run:
    """One pass over the dataset with the model and, optionally, the reference."""

    def __init__(self, main: RunnableModel, ref: RunnableModel | None, dataset: Dataset,
                 optimize: bool, runtime: str = "onnxruntime",
                 per_sample: tuple[bool, bool] = (False, False)) -> None:
        self.main, self.ref, self.dataset, self.runtime = main, ref, dataset, runtime
        self.per_sample = per_sample
        self.session = _runtime_session(main, optimize, runtime)
        self.ref_session = make_session(ref.session_model, optimize=optimize) if ref else None
        self.accuracy = _Top1() if dataset.labels is not None else None
        self.agreement: _Top1 | None = _Top1() if ref is not None else None
        self.diffs = [_Difference(name) for name in main.output_names] if ref is not None else []
        shape = main.output_shapes[0]
        if dataset.labels is not None and shape is not None:
            dataset.require_num_classes(shape[1], main.label)

    def execute(self, batch_size: int, show_progress: bool) -> EvaluationResult:
        run_batch = self.main.fixed_batch or batch_size
        if run_batch != batch_size:
            logger.info("%s fixes its batch size to %d; running batches of %d",
                        self.main.label, run_batch, run_batch)
        with tqdm(total=len(self.dataset), unit="sample", desc="evaluate", leave=False,
                  disable=not show_progress, file=sys.stderr) as bar:
            for indices in self.dataset.batch_indices(run_batch):
                self._step(indices)
                bar.update(len(indices))
        return self._result()

    def _step(self, indices: np.ndarray) -> None:
        feeds = {name: array[indices] for name, array in self.dataset.arrays.items()}
        outputs = _run(self.session, self.main, feeds, len(indices), self.per_sample[0])
        if self.accuracy is not None:
            self._check_classifier(outputs[0], len(indices))
            self.accuracy.update(outputs[0], self.dataset.labels[indices])  # type: ignore[index]
        if self.ref is None or self.ref_session is None:
            return
        ref_outputs = _run(self.ref_session, self.ref, feeds, len(indices), self.per_sample[1])
        for diff, got, want in zip(self.diffs, outputs, ref_outputs):
            diff.update(got, want, (self.main.label, self.ref.label))
        if self.agreement is not None and _is_classifier(outputs[0], len(indices)):
            self.agreement.update(outputs[0], np.argmax(ref_outputs[0], axis=1))
        elif self.agreement is not None:
            logger.info("output 0 is not [N, C]: no top-1 agreement, only output errors")
            self.agreement = None

    def _check_classifier(self, logits: np.ndarray, n: int) -> None:
        if not _is_classifier(logits, n):
            _require_classifier_shape(self.main, list(logits.shape) if logits.ndim else [0])
            raise UnsupportedModelError(
                f"output 0 of {self.main.label} has {logits.shape[0]} rows for {n} samples; "
                "accuracy needs one row of class scores per sample"
            )
        self.dataset.require_num_classes(logits.shape[1], self.main.label)

    def _result(self) -> EvaluationResult:
        result = EvaluationResult(model=self.main.name, samples=len(self.dataset), runtime=self.runtime)
        if self.accuracy is not None:
            result.accuracy, result.correct = self.accuracy.fraction, self.accuracy.matched
        if self.ref is not None:
            result.reference = self.ref.name
            result.agreement = self.agreement.fraction if self.agreement is not None else None
            result.outputs = [d.result() for d in self.diffs]
            result.max_rel_error = max(o.max_rel_error for o in result.outputs)
            result.mean_rel_error = max(o.mean_rel_error for o in result.outputs)
        return result


def _runtime_session(model: RunnableModel, optimize: bool, runtime: str) -> Any:
    """An onnxruntime session, or an OpenVINO one with the same ``run(None, feeds)``."""
    if runtime == "openvino":
        from .runtimes import OpenVinoSession

        return OpenVinoSession(model.session_model, model.label)
    return make_session(model.session_model, optimize=optimize)


def _is_classifier(logits: np.ndarray, n: int) -> bool:
    return logits.ndim == 2 and logits.shape[0] == n and logits.shape[1] >= 2


def _run(session: ort.InferenceSession, model: RunnableModel, feeds: dict[str, np.ndarray],
         n: int, per_sample: bool = False) -> list[np.ndarray]:
    """Outputs for ``n`` samples; a fixed-batch model runs padded chunks of its batch size, a
    ``per_sample`` one each sample alone (:func:`graph_passes.batch.run_samples`)."""
    if per_sample:
        return _session_run(session, model, feeds, per_sample=True)
    fixed = model.fixed_batch
    if fixed is None or fixed == n:
        return _session_run(session, model, feeds)
    chunks = []
    for start in range(0, n, fixed):
        part = {name: _pad(a[start:start + fixed], fixed) for name, a in feeds.items()}
        rows = min(fixed, n - start)
        outputs = _session_run(session, model, part)
        chunks.append([_trim(out, rows, fixed, model) for out in outputs])
    return [np.concatenate(parts, axis=0) for parts in zip(*chunks)]


def _pad(array: np.ndarray, size: int) -> np.ndarray:
    if len(array) == size:
        return array
    filler = np.repeat(array[-1:], size - len(array), axis=0)
    return np.concatenate([array, filler], axis=0)


def _trim(output: np.ndarray, rows: int, fixed: int, model: RunnableModel) -> np.ndarray:
    if output.ndim == 0 or output.shape[0] != fixed:
        raise UnsupportedModelError(
            f"{model.label} fixes its batch size to {fixed} but an output has shape "
            f"[{dims_text(output.shape)}] without that batch axis; evaluate needs batch-major "
            "outputs - re-export with a dynamic batch axis"
        )
    return output[:rows]


def _session_run(session: ort.InferenceSession, model: RunnableModel,
                 feeds: dict[str, np.ndarray], per_sample: bool = False) -> list[np.ndarray]:
    try:
        if per_sample:
            return run_samples(session, feeds, model.whole)
        return session.run(None, feeds)
    except PrunequantError:
        raise  # OpenVINO's session words its own failures
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own unexported types
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        raise DataError(
            f"onnxruntime failed to run {model.label} on the data ({type(exc).__name__}: "
            f"{first}); check the values fit the model (e.g. ids within the vocabulary)"
        ) from exc
