"""Input shapes: the ``--input-shape`` flag, pinning symbolic input dims, shape lookups.

Syntax of the flag: ``NAME=D1xD2x...xDn`` (``input=1x3x224x224``). The name is everything before
the *last* ``=``, so names such as ``input_1:0`` (TensorFlow exports) work unchanged. Every dim is
a positive integer; a rank-0 input never needs pinning.

A dim counts as static when it has a ``dim_value`` > 0. ``dim_param``, an unset dim and a
``dim_value`` <= 0 (some exporters write -1 or 0 for "dynamic") all count as unknown: a zero-size
input would make every later parity check vacuous.
"""

from __future__ import annotations

import json

import logging
import re
from typing import Iterable, Mapping, Sequence

import onnx

from .errors import InputShapeError, UnsupportedModelError

logger = logging.getLogger(__name__)

SYNTAX = "NAME=D1xD2x...xDn, e.g. --input-shape input=1x3x224x224"

Dim = int | str  # an int is a static size; a str names an unknown dim ("batch", or "?")


def parse_input_shape(text: str) -> tuple[str, list[int]]:
    """Parse one ``--input-shape`` value, ``name=1x3x224x224``, into ``(name, dims)``."""
    name, sep, dims_text = str(text).strip().rpartition("=")
    name = name.strip()
    if not sep:
        raise InputShapeError(f"--input-shape {text!r} has no '='; write {SYNTAX}")
    if not name:
        raise InputShapeError(f"--input-shape {text!r} has no input name; write {SYNTAX}")
    fields = dims_text.strip().lower().split("x")
    if fields == [""]:
        raise InputShapeError(f"--input-shape {text!r} has no dims after '='; write {SYNTAX}")
    return name, [_parse_dim(field.strip(), text) for field in fields]


def _parse_dim(field: str, text: str) -> int:
    if not re.fullmatch(r"[+-]?\d+", field):
        raise InputShapeError(
            f"--input-shape {text!r}: dim {field!r} is not an integer; write {SYNTAX}"
        )
    value = int(field)
    if value <= 0:
        raise InputShapeError(
            f"--input-shape {text!r}: dim {value} must be a positive integer; write {SYNTAX}"
        )
    return value


def parse_input_shapes(texts: Iterable[str]) -> dict[str, list[int]]:
    """Parse repeated ``--input-shape`` values; naming one input twice is an error."""
    shapes: dict[str, list[int]] = {}
    for text in texts:
        name, dims = parse_input_shape(text)
        if name in shapes:
            raise InputShapeError(
                f"--input-shape gives input {name!r} twice ({format_dims(shapes[name])} and "
                f"{format_dims(dims)}); give it once"
            )
        shapes[name] = dims
    return shapes


def format_dims(dims: Sequence[Dim]) -> str:
    """``[1, 'h', 3]`` -> ``'1xhx3'`` (the flag's syntax)."""
    return "x".join(str(d) for d in dims)


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """The real inputs of the main graph (old IR versions also list initializers as inputs)."""
    initializers = {init.name for init in model.graph.initializer}
    return [inp for inp in model.graph.input if inp.name not in initializers]


def value_dims(value: onnx.ValueInfoProto) -> list[Dim] | None:
    """Dims of a tensor value; unknown dims as their name (or '?'); None if rank is unknown."""
    tensor_type = value.type.tensor_type
    if not tensor_type.HasField("shape"):
        return None
    return [_dim(d) for d in tensor_type.shape.dim]


def _dim(dim: onnx.TensorShapeProto.Dimension) -> Dim:
    if dim.HasField("dim_value") and dim.dim_value > 0:
        return dim.dim_value
    if dim.HasField("dim_param") and dim.dim_param:
        return dim.dim_param
    return "?" if not dim.HasField("dim_value") else str(dim.dim_value)


def _is_static(dims: Sequence[Dim] | None) -> bool:
    return dims is not None and all(isinstance(d, int) for d in dims)


def tensor_shape(model: onnx.ModelProto, name: str) -> list[int] | None:
    """Static shape of a main-graph tensor from inputs, value_info, outputs or initializers.

    None when the tensor is unknown or its shape is not fully static.
    """
    graph = model.graph
    for value in (*graph.input, *graph.value_info, *graph.output):
        if value.name == name and value.type.HasField("tensor_type"):
            dims = value_dims(value)
            if _is_static(dims):
                return [int(d) for d in dims]  # type: ignore[union-attr]
    for init in graph.initializer:
        if init.name == name:
            return list(init.dims)
    return None


def static_input_shapes(model: onnx.ModelProto) -> dict[str, list[int]]:
    """Shape of every real graph input; raises InputShapeError if one is not fully static."""
    require_static_inputs(model)
    return {inp.name: [int(d) for d in value_dims(inp) or []] for inp in graph_inputs(model)}


def pin_input_shapes(
    model: onnx.ModelProto,
    input_shapes: Mapping[str, Sequence[int]] | None,
    model_name: str = "the model",
    batch: int | None = None,
) -> None:
    """Write the pinned dims into the model's inputs (in place), then require static inputs.

    With ``batch``, an input the user did not pin whose *only* unknown dim is the leading one
    (the usual dynamic batch axis) gets that dim set to ``batch``; any other unknown dim must be
    pinned explicitly."""
    inputs = {inp.name: inp for inp in graph_inputs(model)}
    if batch is not None:
        for name, value in inputs.items():
            dims = value_dims(value)
            if name in (input_shapes or {}) or not dims or not isinstance(dims[0], str):
                continue
            if all(isinstance(d, int) and d > 0 for d in dims[1:]):
                value.type.tensor_type.shape.dim[0].Clear()
                value.type.tensor_type.shape.dim[0].dim_value = batch
                _record_batch_dim(model, name, dims[0])
                logger.info("input %r: leading dim %r taken as batch = %d", name, dims[0], batch)
    for name, dims in (input_shapes or {}).items():
        if name not in inputs:
            raise InputShapeError(
                f"--input-shape names {name!r}, which is not an input of {model_name}; "
                f"its inputs are {sorted(inputs)}"
            )
        _pin_one(inputs[name], [_checked_pin(name, d) for d in dims])
        logger.debug("pinned input %r to %s", name, format_dims(dims))
    require_static_inputs(model, model_name)


def _checked_pin(name: str, dim: object) -> int:
    if isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0:
        raise InputShapeError(
            f"input shape for {name!r} has dim {dim!r}; every dim must be a positive integer"
        )
    return dim


def _pin_one(value: onnx.ValueInfoProto, dims: list[int]) -> None:
    _require_tensor(value)
    current = value_dims(value)
    pinned = f"--input-shape {value.name}={format_dims(dims)}"
    if current is not None and len(current) != len(dims):
        raise InputShapeError(
            f"{pinned} has rank {len(dims)} but input {value.name!r} has rank {len(current)} "
            f"(shape [{_shape_text(current)}]); give {len(current)} dims"
        )
    for axis, (have, want) in enumerate(zip(current or [], dims)):
        if isinstance(have, int) and have != want:
            raise InputShapeError(
                f"{pinned} sets dim {axis} to {want} but the model fixes it to {have} "
                f"(shape [{_shape_text(current or [])}]); use {have} there"
            )
    shape = value.type.tensor_type.shape
    shape.ClearField("dim")
    for size in dims:
        shape.dim.add().dim_value = size


def _require_tensor(value: onnx.ValueInfoProto) -> None:
    kind = value.type.WhichOneof("value")
    if kind != "tensor_type":
        raise UnsupportedModelError(
            f"input {value.name!r} is a {kind or 'value of unknown type'}, not a tensor; "
            "prunequant supports models whose inputs are tensors"
        )


def require_static_inputs(model: onnx.ModelProto, model_name: str = "the model") -> None:
    """Raise InputShapeError naming every input with unknown dims, and how to pin them."""
    problems, examples = [], []
    for value in graph_inputs(model):
        _require_tensor(value)
        dims = value_dims(value)
        if _is_static(dims):
            continue
        if dims is None:
            problems.append(f"input {value.name!r} of {model_name} has unknown rank")
            examples.append(f"--input-shape {value.name}=D1x...xDn")
            continue
        unknown = [d for d in dims if isinstance(d, str)]
        problems.append(
            f"input {value.name!r} has symbolic dims {unknown} (shape [{_shape_text(dims)}])"
        )
        examples.append(f"--input-shape {value.name}={_example(dims)}")
    if problems:
        raise InputShapeError(
            "; ".join(problems) + "; pin them with " + " ".join(examples)
            + " (use the sizes you deploy with)"
        )


def _shape_text(dims: Sequence[Dim]) -> str:
    return ",".join(str(d) for d in dims)


def _example(dims: Sequence[Dim]) -> str:
    """A flag value for the message: batch-like axis 0 -> 1, other unknown dims upper-cased."""
    parts = []
    for axis, dim in enumerate(dims):
        if isinstance(dim, int):
            parts.append(str(dim))
        elif axis == 0:
            parts.append("1")
        elif re.fullmatch(r"[A-Za-z_]\w{0,11}", dim):
            parts.append(dim.upper())
        else:
            parts.append(f"D{axis}")
    return "x".join(parts)


BATCH_DIMS_KEY = "prunequant.batch_dims"


def _record_batch_dim(model: onnx.ModelProto, name: str, dim_param: str) -> None:
    """Remember a dynamic batch dim pinned for analysis, so export can give it back."""
    dims = batch_dims(model)
    dims[name] = dim_param or "batch"
    for prop in model.metadata_props:
        if prop.key == BATCH_DIMS_KEY:
            prop.value = json.dumps(dims, sort_keys=True)
            return
    model.metadata_props.add(key=BATCH_DIMS_KEY, value=json.dumps(dims, sort_keys=True))


def batch_dims(model: onnx.ModelProto) -> dict[str, str]:
    """{input name: original dim_param} of the batch dims pinned at load time."""
    for prop in model.metadata_props:
        if prop.key == BATCH_DIMS_KEY:
            return dict(json.loads(prop.value))
    return {}


def undeclared_outputs(outputs: Iterable[onnx.ValueInfoProto]) -> list[onnx.ValueInfoProto]:
    """Copies of graph outputs that keep only their element type, for shape inference: an
    exporter's output declaration can be wrong (torch's legacy exporter names the output dims
    of ``dynamic_axes`` as given, ``[1, seqlen]`` for a tensor of rank 3), and inference merges
    into a declaration instead of replacing it, so it could not say what the graph computes."""
    copies = []
    for value in outputs:
        copy = onnx.ValueInfoProto()
        copy.CopyFrom(value)
        if copy.type.WhichOneof("value") == "tensor_type":
            copy.type.tensor_type.ClearField("shape")
        copies.append(copy)
    return copies


def reconcile_output_shapes(graph: onnx.GraphProto, inferred: Iterable[onnx.ValueInfoProto]) -> list[str]:
    """Replace, in place, every graph output declaration that contradicts what shape inference
    finds the graph computes (another rank, or another static size of a dim); returns their names.

    Such a declaration is harmless while an input dim is symbolic (inference cannot reach the
    output) and onnxruntime ignores it, but once the inputs are pinned the full onnx checker
    refuses the model ("Inferred shape and existing shape differ in rank: (3) vs (2)"), so
    every later export would fail. A declaration that only says less than inference (unknown
    or named dims) is kept as it is: its dim names are the user's."""
    found = {v.name: v for v in inferred}
    replaced = []
    for value in graph.output:
        fresh = found.get(value.name)
        if fresh is None or value.type.WhichOneof("value") != "tensor_type" \
                or fresh.type.WhichOneof("value") != "tensor_type":
            continue
        have, got = value.type.tensor_type, fresh.type.tensor_type
        if not got.HasField("shape"):
            continue
        stale = not have.HasField("shape") or len(have.shape.dim) != len(got.shape.dim) or any(
            a.HasField("dim_value") and b.HasField("dim_value") and a.dim_value > 0 and b.dim_value > 0
            and a.dim_value != b.dim_value for a, b in zip(have.shape.dim, got.shape.dim))
        if got.elem_type and have.elem_type != got.elem_type:
            stale = True
        if not stale:
            continue
        before = value_dims(value)
        value.type.CopyFrom(fresh.type)
        replaced.append(value.name)
        logger.info("graph output %r: declared shape %s contradicts the graph, which computes %s; "
                    "the declaration is replaced", value.name, before, value_dims(value))
    return replaced


# ---------------------------------------------------------------- onnxruntime contrib op shapes
#
# onnx's shape inference knows no ``com.microsoft`` op, so the output of onnxruntime's fused
# MultiHeadAttention had no shape and everything after it was opaque. Its schema is mirrored
# from onnxruntime's own registry (inputs, attributes and type constraints exactly as the
# installed onnxruntime declares them, so the onnx checker accepts what onnxruntime accepts)
# with an inference function for the outputs' shapes from the op documentation:
#   MultiHeadAttention: query [B, S, D] with key [B, L, D] / value [B, L, Dv] (or value
#     [B, N, L, Hv], or packed KV key [B, L, N, 2, H]), or packed QKV query [B, S, N, 3, H];
#     output [B, S, Dv].
# Only ``output`` gets a shape; present / qk outputs stay unknown (the op rules block them).
# A name that another domain already has is skipped: onnx.reference (imported by onnxscript and
# the dynamo exporter) refuses a registry with one op name in two domains, and the ONNX
# ``Attention`` (opset 23) has com.microsoft Attention's name: that op stays unshaped.


def _input_dims(ctx, index: int) -> list[int | str | None] | None:
    if index >= ctx.get_num_inputs() or not ctx.has_input(index):
        return None
    tp = ctx.get_input_type(index)
    if tp is None or not tp.HasField("tensor_type") or not tp.tensor_type.HasField("shape"):
        return None
    dims: list[int | str | None] = []
    for d in tp.tensor_type.shape.dim:
        dims.append(d.dim_value if d.HasField("dim_value") and d.dim_value > 0
                    else (d.dim_param or None))
    return dims


def _product(*dims) -> int | None:
    return int(dims[0]) * int(dims[1]) if all(isinstance(d, int) for d in dims) else None


def _set_output(ctx, dims: list) -> None:
    elem = ctx.get_input_type(0).tensor_type.elem_type
    ctx.set_output_type(0, onnx.helper.make_tensor_type_proto(elem, dims))


def _infer_multi_head_attention(ctx) -> None:
    q, k, v = (_input_dims(ctx, i) for i in range(3))
    if q is None:
        return
    if len(q) == 5:  # packed QKV [B, S, N, 3, H]
        _set_output(ctx, [q[0], q[1], _product(q[2], q[4])])
        return
    if len(q) != 3:
        return
    if v is not None and len(v) == 3:
        dv = v[2]
    elif v is not None and len(v) == 4:  # [B, N, L, Hv]
        dv = _product(v[1], v[3])
    elif v is None and k is not None and len(k) == 5:  # packed KV [B, L, N, 2, H]
        dv = _product(k[2], k[4])
    else:
        return
    _set_output(ctx, [q[0], q[1], dv])


_CONTRIB_SHAPES = {("com.microsoft", "MultiHeadAttention"): _infer_multi_head_attention}


def register_contrib_shapes() -> list[str]:
    """Register the ``com.microsoft`` MultiHeadAttention schema with onnx (once per process, at import of
    this module); returns the ops registered now. Without onnxruntime: nothing."""
    try:
        from onnxruntime.capi import onnxruntime_pybind11_state as ort_c
    except ImportError:  # pragma: no cover - onnxruntime is a dependency
        return []
    taken = {schema.name for schema in onnx.defs.get_all_schemas_with_history()}
    wanted = {key: fn for key, fn in _CONTRIB_SHAPES.items() if key[1] not in taken}
    if not wanted:
        return []
    schema_cls = onnx.defs.OpSchema
    options = {str(o).rsplit(".", 1)[-1]: o for o in (schema_cls.FormalParameterOption.Single,
               schema_cls.FormalParameterOption.Optional, schema_cls.FormalParameterOption.Variadic)}
    attr_types = {str(t).rsplit(".", 1)[-1]: t for t in schema_cls.AttrType.__members__.values()}
    registered = []
    for ort in ort_c.get_all_operator_schema():
        fn = wanted.get((ort.domain, ort.name))
        if fn is None or ort.deprecated:
            continue
        def param(p):
            return schema_cls.FormalParameter(
                p.name, p.typeStr, param_option=options[str(p.option).rsplit(".", 1)[-1]],
                is_homogeneous=p.isHomogeneous, min_arity=1)
        try:
            schema = schema_cls(
                ort.name, ort.domain, ort.since_version, "",
                inputs=[param(p) for p in ort.inputs], outputs=[param(p) for p in ort.outputs],
                type_constraints=[(t.type_param_str, list(t.allowed_type_strs), "")
                                  for t in ort.type_constraints],
                attributes=[schema_cls.Attribute(a.name, attr_types[str(a.type).rsplit(".", 1)[-1]], "",
                                                 required=a.required)
                            for a in ort.attributes.values()])
            schema.set_type_and_shape_inference_function(fn)
            onnx.defs.register_schema(schema)
        except Exception as exc:  # noqa: BLE001 - an onnx/onnxruntime API drift: shapes stay unknown
            logger.warning("no shape inference for %s::%s: %s", ort.domain, ort.name, exc)
            continue
        registered.append(f"{ort.domain}::{ort.name}")
    return registered


register_contrib_shapes()
