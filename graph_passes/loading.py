"""Safe loading of third-party ONNX models.

:func:`load_model` turns a path, serialised bytes or a ``ModelProto`` into a private, checked
``ModelProto`` with external data loaded, every graph input static and ``value_info`` filled in
by shape inference. Anything wrong with the input raises one of the one-line errors of
:mod:`graph_passes.errors`; nothing is written next to the user's model.

Models over 2 GiB stay in memory as ``ModelProto`` (protobuf holds them but cannot serialise
them): the checker then reads the model file itself, and shape inference runs on a copy of
the graph whose large tensors are temporarily moved out of the proto (see
:func:`_strip_large_tensors`).

:func:`check_runnable` is separate: the CLI calls it before it runs a model in onnxruntime.
"""

from __future__ import annotations

import logging
import os
import re
import stat
import tempfile
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterator, Mapping, Sequence

import onnx
import onnx.defs
import onnx.external_data_helper
import onnx.shape_inference
import onnxruntime as ort
from google.protobuf.message import DecodeError, EncodeError

from .feeds import annotate_input_ranges
from .errors import (
    ExternalDataError,
    InputFileError,
    InputShapeError,
    ModelLoadError,
    UnsupportedModelError,
)
from .ort_utils import make_session
from .shapes import pin_input_shapes

logger = logging.getLogger(__name__)

_PROTO_LIMIT = 2**31 - 2**20  # protobuf cannot serialise or parse a message of 2 GiB
_STRIP_MIN_BYTES = 1024  # shape tensors are far smaller; they stay in the proto for data_prop
_STRIPPED = "prunequant-stripped/"  # external_data location marking a temporarily moved tensor
_ORT_BUILTIN_DOMAINS = ("", "ai.onnx")
_MAGIC = {
    b"\xff\xd8\xff": "a JPEG image",
    b"\x89PNG": "a PNG image",
    b"GIF8": "a GIF image",
    b"%PDF": "a PDF document",
    b"PK\x03\x04": "a zip archive (a PyTorch .pt checkpoint?)",
    b"\x1f\x8b": "a gzip archive",
    b"\x89HDF": "an HDF5 file (a Keras .h5 model?)",
    b"version https://git-lfs": "a Git LFS pointer, not the model itself (run git lfs pull)",
    b"<": "an HTML/XML document (an error page saved instead of the model?)",
    b"ir_version:": "an ONNX text-format file (load it with onnx.load(path, format='textproto'))",
}


@dataclass(frozen=True)
class _Source:
    """A parsed model, how messages name it, where its external data lives."""

    model: onnx.ModelProto
    label: str
    path: str | None
    base_dir: str | None


def load_model(
    source: str | os.PathLike | bytes | onnx.ModelProto,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    *,
    check: bool = True,
    base_dir: str | os.PathLike | None = None,
    batch: int | None = None,
) -> onnx.ModelProto:
    """Load, validate and shape-infer a model; never mutates a ``ModelProto`` passed in.

    ``input_shapes`` pins symbolic input dims; ``check=False`` skips the onnx checker;
    ``base_dir`` is where external data lives when ``source`` is bytes or a ModelProto;
    ``batch`` pins a symbolic *leading* dim of otherwise static inputs (see pin_input_shapes).
    """
    src = _read_source(source, base_dir)
    model = src.model
    check_versions(model, src.label)
    _drop_own_metadata(model, src.label)
    _load_external_data(model, src)
    if check:
        _run_checker(model, src)
    _require_nonempty_weights(model, src.label)
    declared = [_copy(v) for v in model.graph.input] if input_shapes else None
    pin_input_shapes(model, input_shapes, src.label, batch=batch)
    _require_sane_sizes(model.graph.input, src.label, "input")
    inferred = _infer_shapes(model, src.label, declared)
    _require_sane_sizes([*inferred.graph.value_info, *inferred.graph.output], src.label, "tensor")
    _drop_shapeless_value_info(inferred, model)
    annotate_input_ranges(inferred)  # integer inputs: the values random checks may feed
    logger.info("loaded %s: %d nodes, opsets %s", src.label, len(inferred.graph.node),
                _opsets(inferred))
    return inferred


#: the most elements one tensor may declare (4 GiB of float32): onnxruntime and numpy allocate
#: inputs and intermediates of the declared shapes, so a larger one is refused before that
MAX_TENSOR_ELEMENTS = 2**30
#: metadata keys prunequant writes for itself; an input model's are dropped (never trusted)
OWN_METADATA_PREFIX = "prunequant."


def _drop_own_metadata(model: onnx.ModelProto, label: str) -> None:
    own = [p.key for p in model.metadata_props if p.key.startswith(OWN_METADATA_PREFIX)]
    if not own:
        return
    kept = [p for p in model.metadata_props if not p.key.startswith(OWN_METADATA_PREFIX)]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    logger.info("%s: ignoring its metadata %s (prunequant's own keys are recomputed)", label,
                ", ".join(sorted(own)))


def _shapeless(value: onnx.ValueInfoProto) -> bool:
    return value.type.WhichOneof("value") == "tensor_type" and not value.type.tensor_type.HasField("shape")


def _drop_shapeless_value_info(model: onnx.ModelProto, declared: onnx.ModelProto) -> None:
    """Partial inference can type a tensor without a shape (an If whose branches disagree in
    rank); the checker refuses such an entry later ("Field 'shape' of 'type' is required but
    missing") and it carries nothing. Shapeless value_info is dropped (subgraphs too), and a
    graph output left shapeless gets its declaration from the model as it was given back."""
    before = {o.name: o for o in declared.graph.output}
    for i, out in enumerate(model.graph.output):
        if _shapeless(out) and out.name in before and not _shapeless(before[out.name]):
            model.graph.output[i].CopyFrom(before[out.name])

    def clean(graph: onnx.GraphProto) -> None:
        kept = [v for v in graph.value_info if not _shapeless(v)]
        if len(kept) < len(graph.value_info):
            del graph.value_info[:]
            graph.value_info.extend(kept)
        for node in graph.node:
            for attr in node.attribute:
                for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                    clean(sub)

    clean(model.graph)


def _tensor_elements(tensor: onnx.TensorProto) -> int:
    n = 1
    for d in tensor.dims:
        n *= int(d)
    return n


def _require_nonempty_weights(model: onnx.ModelProto, label: str) -> None:
    """A constant of rank >= 2 with no elements (a weight of shape [0, 3, 3, 3]) computes nothing;
    refused here (empty rank-0/1 constants, such as Resize's empty roi, are legitimate)."""
    for tensor, what in iter_tensors(model):
        if len(tensor.dims) >= 2 and _tensor_elements(tensor) == 0:
            dims = "x".join(str(d) for d in tensor.dims)
            raise ModelLoadError(
                f"{label}: {what} has shape {dims}, no elements; an empty weight cannot be pruned or "
                "quantized - fix or re-export the model"
            )


def _require_sane_sizes(values: Sequence[onnx.ValueInfoProto], label: str, kind: str) -> None:
    for value in values:
        if not value.type.HasField("tensor_type") or not value.type.tensor_type.HasField("shape"):
            continue
        n = 1
        for dim in value.type.tensor_type.shape.dim:
            if dim.HasField("dim_value"):
                if dim.dim_value < 0:
                    raise ModelLoadError(f"{label}: {kind} {value.name!r} declares a negative dim "
                                         f"{dim.dim_value}; fix or re-export the model")
                n *= dim.dim_value
        if n > MAX_TENSOR_ELEMENTS:
            dims = "x".join(str(d.dim_value) if d.HasField("dim_value") else (d.dim_param or "?")
                            for d in value.type.tensor_type.shape.dim)
            raise UnsupportedModelError(
                f"{label}: {kind} {value.name!r} has shape {dims}, {n:.3g} elements per run (the limit "
                f"is {MAX_TENSOR_ELEMENTS:.3g}); pin smaller input shapes with --input-shape or "
                "re-export the model with the shapes it is used at"
            )


def _copy(value: onnx.ValueInfoProto) -> onnx.ValueInfoProto:
    copy = onnx.ValueInfoProto()
    copy.CopyFrom(value)
    return copy


# ---------------------------------------------------------------- reading and parsing


def _read_source(source: object, base_dir: str | os.PathLike | None) -> _Source:
    directory = os.fspath(base_dir) if base_dir is not None else None
    if isinstance(source, onnx.ModelProto):
        model = onnx.ModelProto()
        model.CopyFrom(source)
        label = "the in-memory ModelProto"
        _require_model_structure(model, label, b"")
        return _Source(model, label, None, directory)
    if isinstance(source, (bytes, bytearray, memoryview)):
        label = "the model bytes"
        return _Source(_parse(bytes(source), label), label, None, directory)
    if isinstance(source, (str, os.PathLike)):
        path = os.fsdecode(os.fspath(source))
        model = _parse(_read_file(path), f"model file {path!r}")
        folder = directory if directory is not None else os.path.dirname(os.path.abspath(path))
        return _Source(model, f"model file {path!r}", path, folder)
    raise InputFileError(
        f"cannot load a model from a {type(source).__name__}; pass a file path, bytes or an "
        "onnx.ModelProto"
    )


def _read_file(path: str) -> bytes:
    info = _stat(path)
    if stat.S_ISDIR(info.st_mode):
        raise InputFileError(
            f"{path!r} is a directory, not an ONNX file; pass the .onnx file inside it"
            + _onnx_files_hint(path)
        )
    if not stat.S_ISREG(info.st_mode):
        raise InputFileError(f"{path!r} is not a regular file; pass an .onnx model file")
    if info.st_size == 0:
        raise InputFileError(
            f"model file {path!r} is empty (0 bytes); the export or download was probably "
            "interrupted - export or download it again"
        )
    _require_parsable_size(info.st_size, f"model file {path!r}")
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError as exc:
        raise InputFileError(
            f"cannot read model file {path!r}: {exc.strerror or exc}; check its permissions"
        ) from exc


def _require_parsable_size(size: int, label: str) -> None:
    if size >= _PROTO_LIMIT:
        raise ModelLoadError(
            f"{label} is {size / 2**30:.1f} GiB; protobuf cannot parse 2 GiB or more in one "
            "message - save the model with external data "
            "(onnx.save_model(model, path, save_as_external_data=True))"
        )


def _stat(path: str) -> os.stat_result:
    if not path:
        raise InputFileError("the model path is empty; pass the path of an .onnx file")
    try:
        return os.stat(path)
    except FileNotFoundError as exc:
        raise InputFileError(f"model file {path!r} does not exist; check the path") from exc
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise InputFileError(
            f"cannot access model file {path!r}: {reason}; check the path"
        ) from exc


def _onnx_files_hint(directory: str) -> str:
    try:
        names = sorted(n for n in os.listdir(directory) if n.endswith(".onnx"))
    except OSError:
        return ""
    return f" (it holds {', '.join(names[:3])})" if names else ""


def _parse(data: bytes, label: str) -> onnx.ModelProto:
    if not data:
        raise InputFileError(f"{label} are empty (0 bytes); pass a serialised ONNX model")
    _require_parsable_size(len(data), label)
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as exc:
        kind = _sniff(data)
        if kind:
            raise InputFileError(_not_onnx(label, f"it looks like {kind}")) from exc
        raise ModelLoadError(
            f"{label} cannot be parsed as an ONNX model ({_first_line(exc)}); it is truncated "
            "or corrupt - export or download it again"
        ) from exc
    _require_model_structure(model, label, data)
    return model


def _require_model_structure(model: onnx.ModelProto, label: str, data: bytes) -> None:
    """Garbage bytes can parse "successfully": insist on an IR version and a graph with outputs."""
    if model.ir_version > 0 and model.HasField("graph") and len(model.graph.output) > 0:
        return
    kind = _sniff(data)
    what = f"it looks like {kind}" if kind else "it has no IR version or no graph with outputs"
    raise InputFileError(_not_onnx(label, what))


def _not_onnx(label: str, what: str) -> str:
    return f"{label} is not an ONNX model ({what}); pass an .onnx file exported from your framework"


def _sniff(data: bytes) -> str | None:
    """A guess at what non-ONNX bytes are, for the message."""
    head = data[:4096]
    for magic, kind in _MAGIC.items():
        if head.startswith(magic):
            return kind
    if head and not re.search(rb"[\x00-\x08\x0e-\x1f\x7f]", head):
        return "a text file"
    return None


# ---------------------------------------------------------------- versions and checker


def check_versions(model: onnx.ModelProto, label: str = "the model") -> None:
    """Refuse IR versions and opsets newer than the installed onnx knows."""
    if model.ir_version > onnx.IR_VERSION:
        raise ModelLoadError(
            f"{label} has IR version {model.ir_version}, newer than onnx {onnx.__version__} "
            f"supports (IR {onnx.IR_VERSION}); upgrade onnx, or re-export the model with an older "
            "IR version"
        )
    known = onnx.defs.C.schema_version_map()
    for opset in model.opset_import:
        domain = "" if opset.domain == "ai.onnx" else opset.domain
        if domain in known and opset.version > known[domain][1]:
            name = f"domain {opset.domain!r}" if domain else "the default ONNX domain"
            raise ModelLoadError(
                f"{label} imports opset {opset.version} of {name}, newer than onnx "
                f"{onnx.__version__} knows (up to {known[domain][1]}); upgrade onnx, or re-export "
                f"the model with opset {known[domain][1]} or older"
            )


def _run_checker(model: onnx.ModelProto, src: _Source) -> None:
    try:
        if not _is_large(model):
            onnx.checker.check_model(model, full_check=False)
        elif src.path is not None:
            onnx.checker.check_model(src.path, full_check=False)
        else:
            _check_through_file(model)
    except (onnx.checker.ValidationError, ValueError) as exc:
        raise ModelLoadError(
            f"{src.label} fails the onnx checker: {_checker_summary(exc)}; fix or re-export the "
            "model (check=False skips this check at your own risk)"
        ) from exc


def _check_through_file(model: onnx.ModelProto) -> None:
    """Check a > 2 GiB in-memory model: write it with external data to a temp dir, check the
    path, and put the data back into ``model``."""
    stash = _strip_large_tensors(model)
    try:
        with tempfile.TemporaryDirectory(prefix="prunequant-check-") as tmp:
            os.makedirs(os.path.join(tmp, _STRIPPED))
            for index, data in enumerate(stash):
                with open(os.path.join(tmp, f"{_STRIPPED}{index}"), "wb") as handle:
                    handle.write(data)
            path = os.path.join(tmp, "model.onnx")
            onnx.save_model(model, path)  # stripped tensors carry no raw_data: only the proto
            onnx.checker.check_model(path, full_check=False)
    finally:
        _restore_tensors(model, stash)


def _checker_summary(exc: Exception, limit: int = 400) -> str:
    """The checker's message on one line: its lines name the problem and the node."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _ort_reason(exc: Exception) -> str:
    """onnxruntime's message without its error-code prefix and C++ source location."""
    text = _first_line(exc)
    text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", text)
    text = re.sub(r"^\S+\.(?:h|cc|cpp):\d+ .*?\) ", "", text)
    support = re.search(r"Current official support for domain \S+ is till opset \d+", text)
    return support.group(0) if support else _checker_summary(Exception(text), 300)


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def _opsets(model: onnx.ModelProto) -> dict[str, int]:
    return {op.domain or "ai.onnx": op.version for op in model.opset_import}


# ---------------------------------------------------------------- external data


@dataclass(frozen=True)
class _ExternalRef:
    what: str  # "tensor 'w'" or "tensor of attribute 'value' of node 'c' (Constant)"
    location: str
    offset: int
    length: int | None


def iter_tensors(model: onnx.ModelProto) -> Iterator[tuple[onnx.TensorProto, str]]:
    """Every TensorProto of the model (initializers, sparse tensors, attribute tensors in the
    main graph, subgraphs and functions), each with a description for messages."""
    yield from _graph_tensors(model.graph)
    for function in model.functions:
        yield from _nodes_tensors(function.node)


def _graph_tensors(graph: onnx.GraphProto) -> Iterator[tuple[onnx.TensorProto, str]]:
    for tensor in graph.initializer:
        yield tensor, f"tensor {tensor.name!r}"
    for sparse in graph.sparse_initializer:
        yield sparse.values, f"sparse tensor {sparse.values.name!r}"
        yield sparse.indices, f"indices of sparse tensor {sparse.values.name!r}"
    yield from _nodes_tensors(graph.node)


def _nodes_tensors(nodes: Sequence[onnx.NodeProto]) -> Iterator[tuple[onnx.TensorProto, str]]:
    for node in nodes:
        for attr in node.attribute:
            what = f"tensor of attribute {attr.name!r} of {_node_text(node)}"
            tensors = [attr.t] if attr.HasField("t") else []
            tensors += list(attr.tensors)
            for sparse in [*([attr.sparse_tensor] if attr.HasField("sparse_tensor") else []),
                           *attr.sparse_tensors]:
                tensors += [sparse.values, sparse.indices]
            for tensor in tensors:
                yield tensor, what
            for sub in [*([attr.g] if attr.HasField("g") else []), *attr.graphs]:
                yield from _graph_tensors(sub)


def _node_text(node: onnx.NodeProto) -> str:
    if node.name:
        return f"node {node.name!r} ({node.op_type})"
    return f"an unnamed {node.op_type} node"


def _is_external(tensor: onnx.TensorProto) -> bool:
    return tensor.data_location == onnx.TensorProto.EXTERNAL


def _load_external_data(model: onnx.ModelProto, src: _Source) -> None:
    """Validate every external reference, then read the data into the model."""
    external = [(t, what) for t, what in iter_tensors(model) if _is_external(t)]
    if not external:
        return
    if src.base_dir is None:
        _, what = external[0]
        raise ExternalDataError(
            f"{src.label}: {len(external)} tensor(s) live in external files ({what} in "
            f"{_location(external[0][0])!r}) but there is no directory to find them in; load the "
            "model from its file path, or pass base_dir="
        )
    base = os.path.realpath(src.base_dir)
    for tensor, what in external:
        _validate_ref(_external_ref(tensor, what, src.label), base, src.label)
    for tensor, what in external:
        _read_tensor_data(tensor, what, base, src.label)
    logger.info("%s: loaded %d external tensors from %s", src.label, len(external), base)


#: external_data_paths parses model files up to this size (a model with external data is small)
_EXTERNAL_SCAN_LIMIT = 256 * 1024 * 1024


def external_data_paths(path: str | os.PathLike) -> list[str]:
    """The files a model file's external tensors live in (absolute paths; nothing is loaded and
    nothing is validated: :func:`load_model` does that). Empty for a file over 256 MiB, which
    keeps its tensors inside. Used to refuse an output that would overwrite one of them."""
    name = os.fsdecode(os.fspath(path))
    if _stat(name).st_size > _EXTERNAL_SCAN_LIMIT:
        return []
    model = _parse(_read_file(name), f"model file {name!r}")
    base = os.path.dirname(os.path.abspath(name))
    locations = {_location(t) for t, _ in iter_tensors(model) if _is_external(t)}
    return sorted(os.path.join(base, loc) for loc in locations if loc and "\0" not in loc)


def _location(tensor: onnx.TensorProto) -> str:
    return next((e.value for e in tensor.external_data if e.key == "location"), "")


def _external_ref(tensor: onnx.TensorProto, what: str, label: str) -> _ExternalRef:
    info = {entry.key: entry.value for entry in tensor.external_data}
    try:
        offset = int(info.get("offset") or 0)
        length = int(info["length"]) if info.get("length") else None
    except ValueError as exc:
        raise ExternalDataError(
            f"{label}: external data of {what} has a non-integer offset or length "
            f"({info.get('offset')!r}, {info.get('length')!r}); re-export the model"
        ) from exc
    if offset < 0 or (length is not None and length < 0):
        raise ExternalDataError(
            f"{label}: external data of {what} has a negative offset or length; re-export the model"
        )
    return _ExternalRef(what, info.get("location", ""), offset, length)


def _validate_ref(ref: _ExternalRef, base: str, label: str) -> None:
    """The location must be a relative path inside the model's directory, long enough."""
    where = f"{label}: external data of {ref.what} at {ref.location!r}"
    loc = ref.location
    if not loc or "\0" in loc:
        raise ExternalDataError(f"{where} has no valid location; re-export the model")
    if os.path.isabs(loc) or loc.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", loc):
        raise ExternalDataError(
            f"{where} is an absolute path; external data must be a relative path inside the "
            "model's directory - re-save the model with relative locations"
        )
    if ".." in re.split(r"[\\/]", loc):
        raise ExternalDataError(
            f"{where} uses '..' to leave the model's directory; refusing to read it - keep the "
            "data file next to the model"
        )
    target = os.path.realpath(os.path.join(base, loc))
    if os.path.commonpath([base, target]) != base:
        raise ExternalDataError(
            f"{where} resolves (through a symlink) to {target!r}, outside the model's directory "
            f"{base!r}; refusing to read it - copy the data file next to the model"
        )
    _validate_size(ref, target, where)


def _validate_size(ref: _ExternalRef, target: str, where: str) -> None:
    if not os.path.isfile(target):
        raise ExternalDataError(
            f"{where} does not exist; copy the data file next to the model (same relative path)"
        )
    size = os.path.getsize(target)
    end = ref.offset + (ref.length or 0)
    if ref.offset > size or end > size:
        raise ExternalDataError(
            f"{where} needs bytes {ref.offset}..{end} but the file has {size} bytes; the data "
            "file is truncated or from another export - copy it again"
        )


def _read_tensor_data(tensor: onnx.TensorProto, what: str, base: str, label: str) -> None:
    try:
        onnx.external_data_helper.load_external_data_for_tensor(tensor, base)
    except (OSError, ValueError, onnx.checker.ValidationError) as exc:
        raise ExternalDataError(
            f"{label}: cannot read external data of {what} at {_location(tensor)!r}: "
            f"{_first_line(exc)}; check the data file"
        ) from exc


# ---------------------------------------------------------------- shape inference


def _infer_shapes(
    model: onnx.ModelProto, label: str, unpinned_inputs: list[onnx.ValueInfoProto] | None
) -> onnx.ModelProto:
    """Strict shape inference with the pinned inputs, so value_info is filled in.

    If strict inference fails but succeeds with the inputs as the model declared them, the
    pinned shapes are at fault: InputShapeError. If it fails either way, onnx's inference is
    the limit, not the model: warn and keep what non-strict inference finds.
    """
    _drop_symbolic_shapes(model)
    stash = _strip_large_tensors(model, label)
    try:
        inferred = _infer(model, strict=True)
    except _INFERENCE_ERRORS as exc:
        if unpinned_inputs is not None and _infers_with_inputs(model, unpinned_inputs):
            raise InputShapeError(
                f"the pinned input shapes do not fit {label}: shape inference fails with "
                f"{_first_line(exc)}; check the --input-shape values against what the model expects"
            ) from exc
        logger.warning("%s: strict shape inference failed (%s); using partial shapes", label,
                       _first_line(exc))
        inferred = _infer(model, strict=False)
    _restore_tensors(inferred, stash)
    return inferred


_INFERENCE_ERRORS = (onnx.shape_inference.InferenceError, RuntimeError, ValueError)


def _infer(model: onnx.ModelProto, strict: bool) -> onnx.ModelProto:
    return onnx.shape_inference.infer_shapes(model, strict_mode=strict, data_prop=True)


def _infers_with_inputs(model: onnx.ModelProto, inputs: list[onnx.ValueInfoProto]) -> bool:
    """Does strict inference succeed with ``inputs`` in place of the model's graph inputs?"""
    trial = onnx.ModelProto()
    trial.CopyFrom(model)  # large tensors are stripped here, so this copy is small
    del trial.graph.input[:]
    trial.graph.input.extend(inputs)
    try:
        _infer(trial, strict=True)
    except _INFERENCE_ERRORS:
        return False
    return True


def _drop_symbolic_shapes(model: onnx.ModelProto) -> None:
    """Symbolic dims left in value_info and outputs would survive inference as stale names."""
    graph = model.graph
    kept = [v for v in graph.value_info if _has_static_shape(v)]
    del graph.value_info[:]
    graph.value_info.extend(kept)
    for out in graph.output:
        if out.type.HasField("tensor_type") and not _has_static_shape(out):
            # unknown dims, rank kept: a cleared shape that inference cannot fill back (an If
            # whose branches disagree) fails the checker ("Field 'shape' ... is required")
            for dim in out.type.tensor_type.shape.dim:
                if not dim.HasField("dim_value") or dim.dim_value < 0:  # paddle2onnx writes -1
                    dim.Clear()


def _has_static_shape(value: onnx.ValueInfoProto) -> bool:
    tensor_type = value.type.tensor_type
    return value.type.HasField("tensor_type") and tensor_type.HasField("shape") and all(
        d.HasField("dim_value") and d.dim_value > 0 for d in tensor_type.shape.dim
    )


def _strip_large_tensors(model: onnx.ModelProto, label: str = "the model") -> list[bytes]:
    """Below 2 GiB: nothing. Above: move large raw_data out of the proto (marked as external
    data at ``prunequant-stripped/<i>``) so the proto can be serialised; returns the data."""
    stash: list[bytes] = []
    if not _is_large(model):
        return stash
    for tensor, _ in iter_tensors(model):
        data = b"" if _is_external(tensor) else tensor.raw_data  # one copy, kept in the stash
        if len(data) >= _STRIP_MIN_BYTES:
            _mark_stripped(tensor, len(stash))
            stash.append(data)
            tensor.ClearField("raw_data")
        del data
    if _is_large(model):
        raise ModelLoadError(
            f"{label} keeps over 2 GiB in tensors that are not raw_data (float_data, "
            "int64_data, ...); re-save it with onnx.save_model(..., save_as_external_data=True)"
        )
    logger.debug("moved %d large tensors out of the proto for serialisation", len(stash))
    return stash


def _is_large(model: onnx.ModelProto) -> bool:
    """Too large to serialise? (protobuf's ByteSize itself fails beyond 2 GiB.)"""
    try:
        return model.ByteSize() >= _PROTO_LIMIT
    except EncodeError:
        return True


def _mark_stripped(tensor: onnx.TensorProto, index: int) -> None:
    tensor.data_location = onnx.TensorProto.EXTERNAL
    del tensor.external_data[:]
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", f"{_STRIPPED}{index}"


def _restore_tensors(model: onnx.ModelProto, stash: list[bytes]) -> None:
    """Put stripped data back into ``model`` (or a copy of it), emptying ``stash`` on the way."""
    if not stash:
        return
    for tensor, _ in iter_tensors(model):
        location = _location(tensor) if _is_external(tensor) else ""
        if location.startswith(_STRIPPED):
            index = int(location[len(_STRIPPED):])
            tensor.raw_data = stash[index]
            stash[index] = b""  # free as we go: peak memory stays near one copy
            tensor.data_location = onnx.TensorProto.DEFAULT
            del tensor.external_data[:]


# ---------------------------------------------------------------- can onnxruntime run it?


def check_runnable(model: onnx.ModelProto, smoke: bool = True) -> None:
    """Raise UnsupportedModelError if onnxruntime (CPU) cannot run the model's opsets or ops,
    and (``smoke``) ModelLoadError if it refuses to run the model once on random inputs (an
    invalid model the checker passes: a Conv whose ``group`` does not divide its channels, a
    ``kernel_shape`` that contradicts the weight...)."""
    _check_ort_opsets(model)
    missing = _ops_without_kernel(model)
    if missing:
        listed = ", ".join(
            f"{op!r} (domain {domain!r}, {n} node{'s' if n > 1 else ''})"
            for (domain, op), n in sorted(missing.items())
        )
        raise UnsupportedModelError(
            f"onnxruntime {ort.__version__} cannot run these ops on CPU: {listed}; prunequant "
            "must run the model to verify it - replace them with standard ONNX ops or re-export "
            "without custom ops"
        )
    if smoke:
        _smoke_run(model)


def _smoke_run(model: onnx.ModelProto) -> None:
    from .normalise import AssignNodeNamesPass
    from .ort_utils import random_feeds

    # onnxruntime refuses duplicate or missing-looking node names, which normalisation fixes
    # (AssignNodeNamesPass): they do not make the model invalid, so run a renamed copy
    named = onnx.ModelProto()
    named.CopyFrom(model)
    named = AssignNodeNamesPass().run(named).model
    try:
        session = make_session(named)
        feeds = random_feeds(session, seed=0)
    except ValueError:
        return  # an input type random inputs cannot be made for: the callers report it
    except Exception as exc:  # onnxruntime's own exception classes
        if not type(exc).__module__.startswith("onnxruntime"):
            raise
        raise ModelLoadError(f"onnxruntime cannot load the model with inputs {_input_shapes_text(named)}: "
                             f"{_ort_reason(exc)}; {_invalid_hint(named)}") from None
    try:
        session.run(None, feeds)
    except MemoryError:
        raise UnsupportedModelError("onnxruntime runs out of memory running the model once; pin smaller "
                                    "input shapes with --input-shape") from None
    except Exception as exc:
        if not type(exc).__module__.startswith("onnxruntime"):
            raise
        raise ModelLoadError(f"onnxruntime cannot run the model on random inputs {_input_shapes_text(named)}: "
                             f"{_ort_reason(exc)}; {_invalid_hint(named)}") from None


def _input_shapes_text(model: onnx.ModelProto) -> str:
    inits = {t.name for t in model.graph.initializer}
    parts = []
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        dims = [str(d.dim_value) if d.HasField("dim_value") else (d.dim_param or "?")
                for d in inp.type.tensor_type.shape.dim]
        parts.append(f"{inp.name}={'x'.join(dims) or 'scalar'}")
    return ", ".join(parts) or "(none)"


def _invalid_hint(model: onnx.ModelProto) -> str:
    # a dim pinned to 1 (the default batch) or by --input-shape may be one the model cannot take
    # (a Reshape needing a multiple of 4 samples): that is the inputs' problem, not the model's
    return ("if the model needs other input sizes or values, pin them with --input-shape / --input-value; "
            "otherwise the model is invalid (the checker does not catch this) - fix or re-export it")


def _ops_without_kernel(model: onnx.ModelProto) -> Counter[tuple[str, str]]:
    local_functions = {(f.domain, f.name) for f in model.functions}
    kernels = _ort_cpu_kernels()
    missing: Counter[tuple[str, str]] = Counter()
    for node in _all_nodes(model):
        key = (node.domain, node.op_type)
        if node.domain in _ORT_BUILTIN_DOMAINS or key in local_functions:
            continue  # default-domain ops are the checker's and the opset probe's business
        if key not in kernels:
            missing[key] += 1
    return missing


@lru_cache(maxsize=1)
def _ort_cpu_kernels() -> frozenset[tuple[str, str]]:
    """(domain, op) pairs onnxruntime has CPU kernels for (ai.onnx.ml and com.microsoft
    included). Falls back to those two domains as a whole if the listing is unavailable."""
    try:
        from onnxruntime.capi.onnxruntime_pybind11_state import get_all_opkernel_def

        return frozenset(
            (k.domain, k.op_name) for k in get_all_opkernel_def()
            if k.provider == "CPUExecutionProvider"
        )
    except (ImportError, AttributeError, RuntimeError):  # pragma: no cover - older builds
        logger.debug("onnxruntime kernel listing unavailable", exc_info=True)
        return frozenset()


def _all_nodes(model: onnx.ModelProto) -> Iterator[onnx.NodeProto]:
    def walk(nodes: Sequence[onnx.NodeProto]) -> Iterator[onnx.NodeProto]:
        for node in nodes:
            yield node
            for attr in node.attribute:
                for sub in [*([attr.g] if attr.HasField("g") else []), *attr.graphs]:
                    yield from walk(sub.node)

    yield from walk(model.graph.node)
    for function in model.functions:
        yield from walk(function.node)


def _check_ort_opsets(model: onnx.ModelProto) -> None:
    """Load a one-node model with the same IR version and opsets into onnxruntime."""
    probe = _opset_probe(model)
    try:
        make_session(probe)
    except Exception as exc:  # onnxruntime raises its own pybind exception types
        raise UnsupportedModelError(
            f"onnxruntime {ort.__version__} cannot load a model with IR version "
            f"{model.ir_version} and opsets {_opsets(model)} ({_ort_reason(exc)}); upgrade "
            "onnxruntime or re-export the model with an older opset"
        ) from exc


def _opset_probe(model: onnx.ModelProto) -> onnx.ModelProto:
    opsets = {
        ("" if op.domain == "ai.onnx" else op.domain): op.version
        for op in model.opset_import
        if op.domain in ("", "ai.onnx", "ai.onnx.ml")
    }
    opsets.setdefault("", 13)
    node = onnx.helper.make_node("Identity", ["x"], ["y"])
    value = onnx.helper.make_tensor_value_info
    graph = onnx.helper.make_graph(
        [node], "opset_probe",
        [value("x", onnx.TensorProto.FLOAT, [1])], [value("y", onnx.TensorProto.FLOAT, [1])],
    )
    return onnx.helper.make_model(
        graph,
        opset_imports=[onnx.helper.make_opsetid(d, v) for d, v in opsets.items()],
        ir_version=model.ir_version,
    )
