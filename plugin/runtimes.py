"""The runtimes an exported model runs in: onnxruntime (the gate's) and OpenVINO on CPU, a second
runtime (the optional extra ``prunequant[openvino]``).

onnxruntime stays the one runtime of the gate; OpenVINO is a second opinion:

* ``prunequant evaluate MODEL --data D --runtime openvino`` measures a model with it
  (:class:`OpenVinoSession` stands in for an onnxruntime session in :mod:`plugin.evaluate`);
* ``compress`` and ``export --plan`` add ``report["runtimes"]["openvino"]``
  (:func:`compare_with_onnxruntime`): top-1 agreement and the largest output difference between
  the two runtimes on the held-out inputs, or why OpenVINO cannot run the model. It never makes
  a run fail.

What OpenVINO 2026.4 runs of our exports (measured on the digits sample, ``README.md``): 8-bit
and 4-bit (INT4, opset 21) weight Q/DQ, 8-bit and 4-bit activation Q/DQ, layers that mix 8 and 4
bits per channel. Its ONNX frontend cannot read INT2/UINT2 tensors (2-bit weights or activations,
opset 25): it fails with "Unsupported type" (from a file) or "Unsupported data type INT2" (from
bytes), naming neither tensor nor node, so :func:`unsupported_reason` finds such tensors first and
names them.

``openvino`` is imported only when a function here needs it.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any, Collection, Iterator, Mapping

import numpy as np
import onnx
from onnx import TensorProto

from graph_passes.errors import ConfigError, UnsupportedModelError

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'prunequant[openvino]'"
#: element types OpenVINO's ONNX frontend (2026.4) cannot read (measured: "Unsupported type")
UNREADABLE_TYPES = {TensorProto.INT2: "int2", TensorProto.UINT2: "uint2"}
#: inputs the runtime comparison of a compress report runs at most (like the gate)
COMPARE_SAMPLES = 512
#: samples per OpenVINO run when the model's batch axis is free
RUN_BATCH = 64
#: serialised models larger than this go through a temporary file (protobuf's 2 GB limit)
_IN_MEMORY_LIMIT = 1_800_000_000


def openvino_available() -> bool:
    """Whether ``openvino`` can be imported (checked without importing it)."""
    return importlib.util.find_spec("openvino") is not None


def import_openvino() -> Any:
    """The ``openvino`` module, or ConfigError naming the extra to install."""
    try:
        import openvino
    except ImportError as exc:
        raise ConfigError(f"--runtime openvino needs OpenVINO, which is not installed ({exc}); install "
                          f"it with {INSTALL_HINT}, or use --runtime onnxruntime") from exc
    return openvino


def openvino_version() -> str | None:
    if not openvino_available():
        return None
    try:
        from importlib.metadata import version

        return version("openvino")
    except Exception:  # noqa: BLE001 - a version is informative only
        return None


# ----------------------------------------------------------------------------- what it cannot read


def _graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from _graphs(sub)


def _elem_type(value: onnx.ValueInfoProto) -> int:
    return value.type.tensor_type.elem_type if value.type.HasField("tensor_type") else 0


def unsupported_reason(model: onnx.ModelProto) -> str | None:
    """Why OpenVINO cannot read ``model`` (naming the first tensor of a type it has no support
    for, and the node that uses it), or None when nothing known stands in the way."""
    for graph in _graphs(model.graph):
        users: dict[str, onnx.NodeProto] = {}
        for node in graph.node:
            for name in node.input:
                users.setdefault(name, node)
        for tensor in graph.initializer:
            if tensor.data_type in UNREADABLE_TYPES:
                return _reason(UNREADABLE_TYPES[tensor.data_type], f"initializer {tensor.name!r}",
                               users.get(tensor.name))
        for value in [*graph.input, *graph.value_info, *graph.output]:
            if _elem_type(value) in UNREADABLE_TYPES:
                return _reason(UNREADABLE_TYPES[_elem_type(value)], f"tensor {value.name!r}", users.get(value.name))
        for node in graph.node:
            for attr in node.attribute:
                if attr.name in ("output_dtype", "to") and attr.type == onnx.AttributeProto.INT \
                        and attr.i in UNREADABLE_TYPES:
                    return _reason(UNREADABLE_TYPES[attr.i], f"the output of {node.op_type} node {node.name!r}", None)
                if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type in UNREADABLE_TYPES:
                    return _reason(UNREADABLE_TYPES[attr.t.data_type], f"the {attr.name} of {node.op_type} node "
                                   f"{node.name!r}", None)
    return None


def _reason(type_name: str, where: str, user: onnx.NodeProto | None) -> str:
    used = f" ({user.op_type} node {user.name!r})" if user is not None else ""
    return (f"OpenVINO's ONNX frontend cannot read tensor({type_name}): {where}{used} is {type_name} "
            f"(2-bit weights or activations); compress without 2 in --weight-bits/--act-bits to run it in "
            "OpenVINO")


def _openvino_message(exc: BaseException) -> str:
    """The informative lines of an OpenVINO exception (it prefixes source locations)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    kept = [line for line in lines if not line.startswith(("Exception from", "Check '"))
            and not line.startswith("[ ")]
    text = "; ".join(kept or lines) or type(exc).__name__
    return text[:300]


# ----------------------------------------------------------------------------- a session


class OpenVinoSession:
    """A compiled OpenVINO model (CPU) with onnxruntime's ``run(None, feeds)`` signature, so
    :mod:`plugin.evaluate` runs it like an ``InferenceSession``.

    UnsupportedModelError (one line naming the op or type) when OpenVINO cannot read or compile
    the model; ConfigError when OpenVINO is not installed.
    """

    def __init__(self, model: onnx.ModelProto, label: str = "the model", device: str = "CPU") -> None:
        reason = unsupported_reason(model)
        if reason is not None:
            raise UnsupportedModelError(f"{label} cannot run in OpenVINO: {reason}")
        ov = import_openvino()
        core = ov.Core()
        try:
            compiled = self._compile(core, model, device)
        except Exception as exc:  # noqa: BLE001 - OpenVINO raises plain RuntimeErrors
            raise UnsupportedModelError(f"{label} cannot run in OpenVINO {openvino_version() or ''}: "
                                        f"{_openvino_message(exc)}; evaluate it with --runtime onnxruntime") from exc
        self.label = label
        self.compiled = compiled
        self.request = compiled.create_infer_request()
        self.output_names = [out.name for out in model.graph.output]
        self.input_names = [v.name for v in model.graph.input
                            if v.name not in {t.name for t in model.graph.initializer}]

    @staticmethod
    def _compile(core: Any, model: onnx.ModelProto, device: str) -> Any:
        if model.ByteSize() < _IN_MEMORY_LIMIT:
            return core.compile_model(core.read_model(model.SerializeToString()), device)
        with tempfile.TemporaryDirectory(prefix="prunequant-ov-") as tmp:
            path = os.path.join(tmp, "model.onnx")
            onnx.save_model(model, path, save_as_external_data=True, location="model.onnx.data")
            return core.compile_model(core.read_model(path), device)

    def run(self, output_names: list[str] | None, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Outputs in the graph's order (or of ``output_names``), as numpy arrays."""
        try:
            result = self.request.infer(dict(feeds))
        except Exception as exc:  # noqa: BLE001
            raise UnsupportedModelError(f"OpenVINO failed to run {self.label}: {_openvino_message(exc)}") from exc
        wanted = list(output_names) if output_names else self.output_names
        return [np.array(result[self.compiled.output(name)]) for name in wanted]


# ----------------------------------------------------------------------------- the report's comparison


@dataclass
class RuntimeComparison:
    """OpenVINO vs onnxruntime on the same inputs (``report["runtimes"]["openvino"]``)."""

    status: str  # "ok", "unsupported", "not installed", "failed"
    version: str | None = None
    reason: str | None = None
    samples: int | None = None
    top1_agreement_with_onnxruntime: float | None = None
    max_abs_diff: float | None = None
    outputs: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        from dataclasses import asdict

        return {k: v for k, v in asdict(self).items() if v is not None and v != []}


def compare_with_onnxruntime(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray], *,
                             batch: int | None = None, samples: int = COMPARE_SAMPLES,
                             whole: Collection[str] = ()) -> RuntimeComparison:
    """Run ``model`` in onnxruntime (no graph optimisations, as the gate's first run) and in
    OpenVINO on the first ``samples`` inputs of ``feeds``; per output the largest absolute and
    relative (to the output's largest |value| under onnxruntime) difference, and top-1 agreement
    where output 0 is a classifier's. ``batch``: the model's fixed batch size (None: free).
    ``whole``: inputs whose dim 0 is not a batch (``feeds`` stacks N whole inputs): both runtimes
    then run one sample at a time (:func:`graph_passes.batch.run_samples`).

    Never raises for what OpenVINO cannot do: the status says it (``"unsupported"`` with the
    reason, ``"not installed"``, ``"failed"``)."""
    if not openvino_available():
        return RuntimeComparison("not installed", reason=f"openvino is not installed ({INSTALL_HINT})")
    version = openvino_version()
    first = next(iter(feeds.values()), None)
    n = min(samples, len(first)) if first is not None and np.ndim(first) else 0
    part = {k: np.asarray(v[:n]) for k, v in feeds.items()}
    try:
        session = OpenVinoSession(model, "the exported model")
    except UnsupportedModelError as exc:
        return RuntimeComparison("unsupported", version, reason=str(exc))
    except Exception as exc:  # noqa: BLE001 - the report only says it, the run goes on
        return RuntimeComparison("failed", version, reason=f"{type(exc).__name__}: {_openvino_message(exc)}")
    try:
        from graph_passes.ort_utils import make_session, run_batched

        if whole:
            from graph_passes.batch import run_samples

            ort_out = run_samples(make_session(model, optimize=False), part, whole)
            ov_out = run_samples(session, part, whole)
        else:
            step = batch if batch is not None else RUN_BATCH
            ort_out = run_batched(make_session(model, optimize=False), part, step)
            ov_out = _run_chunks(session, part, step, n)
    except Exception as exc:  # noqa: BLE001
        return RuntimeComparison("failed", version, reason=f"{type(exc).__name__}: {_openvino_message(exc)}")
    outputs = []
    for name, got, ref in zip(session.output_names, ov_out, ort_out):
        got64, ref64 = got.astype(np.float64), ref.astype(np.float64)
        if got64.shape != ref64.shape:
            return RuntimeComparison("failed", version, reason=f"output {name!r} has shape {list(got.shape)} "
                                     f"in OpenVINO but {list(ref.shape)} in onnxruntime", samples=n)
        diff = np.abs(got64 - ref64)
        scale = float(np.abs(ref64).max()) if ref64.size else 0.0
        max_abs = float(diff.max()) if diff.size else 0.0
        outputs.append({"name": name, "max_abs_diff": max_abs,
                        "max_rel_diff": max_abs / scale if scale > 0 else max_abs})
    agreement = None
    if ort_out and ort_out[0].ndim == 2 and ort_out[0].shape[1] > 1 and ov_out[0].shape == ort_out[0].shape:
        agreement = float((ov_out[0].argmax(1) == ort_out[0].argmax(1)).mean())
    result = RuntimeComparison("ok", version, samples=n, top1_agreement_with_onnxruntime=agreement,
                               max_abs_diff=max((o["max_abs_diff"] for o in outputs), default=0.0),
                               outputs=outputs)
    logger.info("openvino vs onnxruntime on %d samples: top-1 agreement %s, max abs diff %.3g", n,
                "n/a" if agreement is None else f"{agreement:.4f}", result.max_abs_diff)
    return result


def _run_chunks(session: OpenVinoSession, feeds: Mapping[str, np.ndarray], step: int, n: int) -> list[np.ndarray]:
    chunks = [session.run(None, {k: v[i:i + step] for k, v in feeds.items()}) for i in range(0, n, step)]
    return [np.concatenate([c[j] for c in chunks]) for j in range(len(chunks[0]))] if chunks else []


def runtimes_report(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray], *,
                    batch: int | None = None, whole: Collection[str] = ()) -> dict[str, Any]:
    """``report["runtimes"]``: onnxruntime (the gate's runtime) and OpenVINO's comparison with it
    (``whole``: see :func:`compare_with_onnxruntime`)."""
    import onnxruntime as ort

    return {"onnxruntime": {"version": ort.__version__, "role": "the gate"},
            "openvino": compare_with_onnxruntime(model, feeds, batch=batch, whole=whole).to_json()}


__all__ = ["COMPARE_SAMPLES", "INSTALL_HINT", "OpenVinoSession", "RuntimeComparison", "compare_with_onnxruntime",
           "import_openvino", "openvino_available", "openvino_version", "runtimes_report", "unsupported_reason"]
