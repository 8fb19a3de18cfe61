"""A canonical digest of what defines an ONNX model's function.

:func:`model_digest` is what a :class:`CompressionPlan` records as the hash of its input model, so
that a plan can be checked against the model it is applied to whatever happened to the file in
between: re-saving with another producer, shape inference, external data inlined or split out,
tensors stored as ``raw_data`` or as typed fields.
"""

from __future__ import annotations

import hashlib
import logging
import struct
from typing import Iterable

import numpy as np
import onnx
from onnx import numpy_helper

logger = logging.getLogger(__name__)

_DIGEST_VERSION = b"prunequant-model-digest-v1"
_A = onnx.AttributeProto


class _Writer:
    """Length-prefixed, typed records into a sha256: no two different sequences collide."""

    def __init__(self) -> None:
        self.h = hashlib.sha256(_DIGEST_VERSION)

    def raw(self, tag: bytes, data: bytes | memoryview) -> None:
        self.h.update(tag + struct.pack("<Q", len(data)))
        self.h.update(data)

    def text(self, tag: bytes, value: str | bytes) -> None:
        self.raw(tag, value.encode("utf-8") if isinstance(value, str) else value)

    def num(self, tag: bytes, value: int) -> None:
        self.raw(tag, struct.pack("<q", int(value)))

    def texts(self, tag: bytes, values: Iterable[str | bytes]) -> None:
        values = list(values)
        self.num(tag, len(values))
        for v in values:
            self.text(b"s", v)


def _domain(domain: str) -> str:
    return "" if domain == "ai.onnx" else domain


def _tensor(w: _Writer, t: onnx.TensorProto, with_name: bool) -> None:
    """dtype, dims and the values in little-endian form, whatever field stores them."""
    if t.data_location == onnx.TensorProto.EXTERNAL:
        raise ValueError(f"tensor {t.name!r} has external data: load it before computing the digest "
                         "(onnx.load(..., load_external_data=True))")
    w.text(b"T", t.name if with_name else "")
    w.num(b"dt", t.data_type)
    w.texts(b"dm", [str(int(d)) for d in t.dims])
    array = numpy_helper.to_array(t)
    if array.dtype == object:  # strings
        w.texts(b"str", [v if isinstance(v, bytes) else str(v) for v in array.reshape(-1).tolist()])
        return
    if array.dtype.byteorder == ">" or (array.dtype.byteorder == "=" and not np.little_endian):
        array = array.astype(array.dtype.newbyteorder("<"))
    w.raw(b"v", memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8)))



def _sparse(w: _Writer, s: onnx.SparseTensorProto) -> None:
    w.texts(b"sd", [str(int(d)) for d in s.dims])
    _tensor(w, s.values, with_name=True)
    _tensor(w, s.indices, with_name=False)


def _type(w: _Writer, tp: onnx.TypeProto) -> None:
    """The element type of a type (the kind for sequences/maps/optionals), never a shape."""
    kind = tp.WhichOneof("value") or ""
    w.text(b"ty", kind)
    if kind == "tensor_type":
        w.num(b"et", tp.tensor_type.elem_type)
    elif kind == "sparse_tensor_type":
        w.num(b"et", tp.sparse_tensor_type.elem_type)
    elif kind == "sequence_type":
        _type(w, tp.sequence_type.elem_type)
    elif kind == "optional_type":
        _type(w, tp.optional_type.elem_type)
    elif kind == "map_type":
        w.num(b"kt", tp.map_type.key_type)
        _type(w, tp.map_type.value_type)


def _attribute(w: _Writer, a: onnx.AttributeProto) -> None:
    w.text(b"an", a.name)
    w.num(b"at", a.type)
    if a.ref_attr_name:
        w.text(b"ref", a.ref_attr_name)
        return
    if a.type == _A.FLOAT:
        w.raw(b"f", struct.pack("<f", a.f))
    elif a.type == _A.INT:
        w.num(b"i", a.i)
    elif a.type == _A.STRING:
        w.text(b"s", a.s)
    elif a.type == _A.TENSOR:
        _tensor(w, a.t, with_name=False)
    elif a.type == _A.GRAPH:
        _graph(w, a.g, main=False)
    elif a.type == _A.SPARSE_TENSOR:
        _sparse(w, a.sparse_tensor)
    elif a.type == _A.TYPE_PROTO:
        _type(w, a.tp)
    elif a.type == _A.FLOATS:
        w.raw(b"fs", np.asarray(a.floats, dtype="<f4").tobytes())
    elif a.type == _A.INTS:
        w.raw(b"is", np.asarray(a.ints, dtype="<i8").tobytes())
    elif a.type == _A.STRINGS:
        w.texts(b"ss", a.strings)
    elif a.type == _A.TENSORS:
        w.num(b"nt", len(a.tensors))
        for t in a.tensors:
            _tensor(w, t, with_name=False)
    elif a.type == _A.GRAPHS:
        w.num(b"ng", len(a.graphs))
        for g in a.graphs:
            _graph(w, g, main=False)
    elif a.type == _A.SPARSE_TENSORS:
        w.num(b"nst", len(a.sparse_tensors))
        for s in a.sparse_tensors:
            _sparse(w, s)
    elif a.type == _A.TYPE_PROTOS:
        w.num(b"ntp", len(a.type_protos))
        for tp in a.type_protos:
            _type(w, tp)
    else:  # UNDEFINED or a newer kind: hash its serialisation rather than silently nothing
        w.raw(b"?", a.SerializeToString(deterministic=True))


def _node(w: _Writer, n: onnx.NodeProto) -> None:
    w.text(b"op", n.op_type)
    w.text(b"do", _domain(n.domain))
    w.text(b"ov", n.overload)
    w.text(b"nn", n.name)
    w.texts(b"in", n.input)
    w.texts(b"out", n.output)
    attrs = sorted(n.attribute, key=lambda a: a.name)
    w.num(b"na", len(attrs))
    for a in attrs:
        _attribute(w, a)


def _graph(w: _Writer, g: onnx.GraphProto, main: bool) -> None:
    w.text(b"G", "main" if main else "sub")
    w.num(b"nin", len(g.input))
    for vi in g.input:
        w.text(b"gi", vi.name)
        if main:  # a subgraph's input types may be filled in by shape inference
            _type(w, vi.type)
    w.texts(b"go", [vi.name for vi in g.output])
    inits = sorted(g.initializer, key=lambda t: t.name)
    w.num(b"ni", len(inits))
    for t in inits:
        _tensor(w, t, with_name=True)
    sparse = sorted(g.sparse_initializer, key=lambda s: s.values.name)
    w.num(b"nsi", len(sparse))
    for s in sparse:
        _sparse(w, s)
    w.num(b"nn", len(g.node))
    for n in g.node:
        _node(w, n)


def _opsets(w: _Writer, opsets: Iterable[onnx.OperatorSetIdProto]) -> None:
    pairs = sorted((_domain(o.domain), int(o.version)) for o in opsets)
    w.num(b"no", len(pairs))
    for domain, version in pairs:
        w.text(b"od", domain)
        w.num(b"ov", version)


def model_digest(model: onnx.ModelProto) -> str:
    """sha256 (64 hex chars) of what defines the model's function.

    Hashed: the opset imports (as a set); the main graph's input names and element types and its
    output names; its initializers and sparse initializers (name, data type, dims and values in
    a canonical little-endian form, whichever field stores them: ``raw_data`` and ``float_data``
    of the same tensor hash alike); its nodes *in order*: op type, domain, overload, **node
    name**, inputs, outputs and attributes (sorted by name; tensors and subgraphs canonically,
    recursively); and the model's local functions.

    Node names are part of the digest on purpose: a plan keys its layers by node name, so a
    model whose nodes were renamed is not the model a plan was made for.

    Not hashed: value_info and every shape (so shape inference, or pinning a symbolic input dim,
    leaves the digest alone), the element types of graph outputs and of subgraph inputs (which
    inference may fill in; they follow from the rest), doc strings, graph and producer names
    and versions, model_version, metadata_props, the IR version, and the order of initializers.

    External data must have been loaded (``ValueError`` otherwise). Tensors are hashed from
    their bytes, with no per-element Python work: a 100 MB model takes well under a second.
    """
    w = _Writer()
    _opsets(w, model.opset_import)
    _graph(w, model.graph, main=True)
    functions = sorted(model.functions, key=lambda f: (_domain(f.domain), f.name, f.overload))
    w.num(b"nf", len(functions))
    for f in functions:
        w.text(b"fn", f.name)
        w.text(b"fd", _domain(f.domain))
        w.text(b"fo", f.overload)
        w.texts(b"fi", f.input)
        w.texts(b"fout", f.output)
        w.texts(b"fa", f.attribute)
        defaults = sorted(f.attribute_proto, key=lambda a: a.name)
        w.num(b"fap", len(defaults))
        for a in defaults:
            _attribute(w, a)
        _opsets(w, f.opset_import)
        w.num(b"fnn", len(f.node))
        for n in f.node:
            _node(w, n)
    digest = w.h.hexdigest()
    logger.debug("model digest %s", digest)
    return digest


__all__ = ["model_digest"]
