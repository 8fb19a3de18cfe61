"""Values the graph allows for its integer inputs, and inputs the user pins to one value.

Every check prunequant runs without the user's data (the smoke run at load, the normalisation
and batch parity checks, the bridge parity, the gate on random inputs) draws random feeds. For
an integer input (token ids, byte values, a sample rate) a value out of range makes onnxruntime
fail, which is no fault of the model. Two remedies:

* :func:`integer_input_ranges` reads the bounds the graph itself implies: an input that reaches
  the indices of a ``Gather`` / ``GatherElements`` on a constant table (an embedding) through
  ops that keep values (Cast, Reshape, Unsqueeze...) must lie in ``[0, rows)``. The ranges are
  recorded in the model's metadata (``prunequant.input_range``), where
  :func:`graph_passes.ort_utils.random_feeds` finds them through the session.
* :func:`pin_input_values` (``--input-value sr=16000``) makes an input a constant of the model:
  a graph that branches on it can then be folded, and the compressed model no longer takes it.
"""

from __future__ import annotations

import json
import logging
from typing import Mapping

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .errors import ConfigError, DataError
from .ort_utils import RANGE_KEY, make_session, random_feeds, ranges_from_metadata

logger = logging.getLogger(__name__)

# ops through which an integer keeps its value (possibly reshaped or re-typed)
_VALUE_KEEPING = {"Cast", "Identity", "Unsqueeze", "Squeeze", "Reshape", "Flatten", "Transpose",
                  "Expand", "Slice", "Concat", "Tile"}
_INTEGER_TYPES = {onnx.TensorProto.INT8, onnx.TensorProto.INT16, onnx.TensorProto.INT32,
                  onnx.TensorProto.INT64, onnx.TensorProto.UINT8, onnx.TensorProto.UINT16,
                  onnx.TensorProto.UINT32, onnx.TensorProto.UINT64}


def _constant_shapes(graph: onnx.GraphProto) -> dict[str, list[int]]:
    shapes = {t.name: list(t.dims) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    shapes[node.output[0]] = list(attr.t.dims)
    return shapes


def integer_input_ranges(model: onnx.ModelProto) -> dict[str, tuple[int, int]]:
    """``{input: (low, high)}`` (high exclusive) for integer graph inputs that index a constant
    table; inputs the graph implies no bound for are absent."""
    graph = model.graph
    consts = _constant_shapes(graph)
    inits = {t.name for t in graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    ranges: dict[str, tuple[int, int]] = {}
    for inp in graph.input:
        if inp.name in inits or inp.type.tensor_type.elem_type not in _INTEGER_TYPES:
            continue
        bound = _index_bound(inp.name, consumers, consts)
        if bound is not None and bound > 0:
            ranges[inp.name] = (0, bound)
    return ranges


def _index_bound(name: str, consumers: dict[str, list[onnx.NodeProto]],
                 consts: dict[str, list[int]]) -> int | None:
    best: int | None = None
    frontier, seen = [name], {name}
    while frontier:
        tensor = frontier.pop()
        for node in consumers.get(tensor, []):
            if node.op_type in ("Gather", "GatherElements") and len(node.input) > 1 and node.input[1] == tensor:
                shape = consts.get(node.input[0])
                if shape:
                    axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
                    rows = shape[axis % len(shape)]
                    best = rows if best is None else min(best, rows)
            elif node.op_type in _VALUE_KEEPING and node.input and node.input[0] == tensor:
                for out in node.output:
                    if out and out not in seen:
                        seen.add(out)
                        frontier.append(out)
    return best


def annotate_input_ranges(model: onnx.ModelProto) -> dict[str, tuple[int, int]]:
    """Record :func:`integer_input_ranges` in ``model``'s metadata (in place); returns them."""
    ranges = integer_input_ranges(model)
    kept = [p for p in model.metadata_props if p.key != RANGE_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    if ranges:
        model.metadata_props.add(key=RANGE_KEY, value=json.dumps({k: list(v) for k, v in ranges.items()}))
        logger.info("integer inputs drawn from the ranges the graph allows: %s", ranges)
    return ranges


def parse_input_values(texts: Mapping[str, str] | list[str] | tuple[str, ...]) -> dict[str, str]:
    """``["sr=16000", ...]`` or a mapping -> ``{name: text}``; a malformed text is a ConfigError."""
    if isinstance(texts, Mapping):
        return {str(k): str(v) for k, v in texts.items()}
    out: dict[str, str] = {}
    for text in texts:
        name, sep, value = text.partition("=")
        if not sep or not name.strip() or not value.strip():
            raise ConfigError(f"--input-value {text!r}: expected NAME=VALUE (e.g. sr=16000, or "
                              "mask=1,1,0 for a 1-D input)")
        out[name.strip()] = value.strip()
    return out


def pin_input_values(model: onnx.ModelProto, values: Mapping[str, str] | list[str] | tuple[str, ...]
                     ) -> onnx.ModelProto:
    """A copy of ``model`` in which each named input is a constant of the given value.

    A value is one number (filled into the input's static shape, or a scalar) or a comma list
    (a 1-D input of that length). Unknown names and values the input's type cannot hold are
    refused naming the input."""
    values = parse_input_values(values)
    if not values:
        return model
    work = onnx.ModelProto()
    work.CopyFrom(model)
    inits = {t.name for t in work.graph.initializer}
    inputs = {i.name: i for i in work.graph.input if i.name not in inits}
    for name, text in values.items():
        if name not in inputs:
            raise ConfigError(f"--input-value {name}={text}: the model has no input {name!r} "
                              f"(inputs: {', '.join(inputs) or 'none'})")
        work.graph.initializer.append(_constant_for(inputs[name], text))
    kept = [i for i in work.graph.input if i.name not in values]
    del work.graph.input[:]
    work.graph.input.extend(kept)
    logger.info("inputs pinned to constants: %s", values)
    return work


def _constant_for(inp: onnx.ValueInfoProto, text: str) -> onnx.TensorProto:
    tt = inp.type.tensor_type
    try:
        dtype = helper.tensor_dtype_to_np_dtype(tt.elem_type)
    except (KeyError, ValueError):
        raise ConfigError(f"--input-value {inp.name}: input type {tt.elem_type} cannot be pinned") from None
    try:
        numbers = [float(part) for part in text.split(",")]
    except ValueError:
        raise DataError(f"--input-value {inp.name}={text}: not a number or comma list of numbers") from None
    array = np.asarray(numbers, dtype=np.float64)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        if not np.all(np.equal(np.round(array), array)) or array.min() < info.min or array.max() > info.max:
            raise DataError(f"--input-value {inp.name}={text}: input {inp.name!r} is {np.dtype(dtype).name}, "
                            "which cannot hold that value")
    dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim] if tt.HasField("shape") else []
    if len(numbers) > 1:
        if len(dims) != 1 or (dims[0] is not None and dims[0] != len(numbers)):
            raise DataError(f"--input-value {inp.name}={text}: a list of {len(numbers)} values needs a 1-D input "
                            f"of that length; {inp.name!r} has shape {dims}")
        value = array.astype(dtype)
    elif not dims:
        value = np.asarray(array[0]).astype(dtype)
    elif any(d is None for d in dims):
        raise DataError(f"--input-value {inp.name}={text}: input {inp.name!r} has symbolic dims; pin them with "
                        "--input-shape first")
    else:
        value = np.full(dims, array[0]).astype(dtype)
    return numpy_helper.from_array(value, inp.name)


def feeds_for(model: onnx.ModelProto, seed: int = 0, batch: int | None = None) -> dict[str, np.ndarray]:
    """Random feeds for ``model`` (integer inputs within the graph's ranges)."""

    return random_feeds(make_session(model), seed=seed, batch=batch)


__all__ = ["RANGE_KEY", "annotate_input_ranges", "feeds_for", "integer_input_ranges", "parse_input_values",
           "pin_input_values", "ranges_from_metadata"]
