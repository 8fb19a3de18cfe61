"""Graph helpers shared by the normalisation passes (fold_* / eliminate_* modules).

Scopes: a node with a graph attribute (If/Loop/Scan) owns subgraphs that may read names of
the enclosing graphs ("outer-scope references"), from node inputs *and* from the subgraph's
output list. Every helper here accounts for them, so a rewrite of the main graph never
breaks a subgraph. Only the main graph is rewritten; subgraphs are read, and their outer
references renamed, never folded.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Iterator, Mapping, MutableSequence, Sequence

import onnx

from .passes import PassResult

DEFAULT_DOMAINS = frozenset({"", "ai.onnx"})


@dataclass
class RewriteResult(PassResult):
    """A pass result that also says how many rewrites the pass made."""

    rewrites: int = 0


def is_default_domain(node: onnx.NodeProto) -> bool:
    return node.domain in DEFAULT_DOMAINS


def subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    """The graphs held in a node's attributes (If branches, Loop/Scan bodies)."""
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from attr.graphs


def has_subgraph(node: onnx.NodeProto) -> bool:
    return any(True for _ in subgraphs(node))


def defined_names(graph: onnx.GraphProto) -> set[str]:
    """Names a graph defines itself: inputs, initializers, node outputs."""
    names = {i.name for i in graph.input}
    names.update(t.name for t in graph.initializer)
    names.update(t.values.name for t in graph.sparse_initializer)
    for node in graph.node:
        names.update(o for o in node.output if o)
    return names


def free_names(graph: onnx.GraphProto) -> set[str]:
    """Names a (sub)graph reads from enclosing scopes, nested subgraphs included."""
    used: set[str] = {o.name for o in graph.output}
    for node in graph.node:
        used.update(i for i in node.input if i)
        for sub in subgraphs(node):
            used |= free_names(sub)
    return used - defined_names(graph)


def node_outer_refs(node: onnx.NodeProto) -> set[str]:
    """Names of the enclosing scope that the node's subgraphs read."""
    refs: set[str] = set()
    for sub in subgraphs(node):
        refs |= free_names(sub)
    return refs


def use_counts(graph: onnx.GraphProto) -> Counter[str]:
    """Uses per name: node inputs, one per subgraph-holding node that reads it, graph outputs."""
    counts: Counter[str] = Counter()
    for node in graph.node:
        counts.update(i for i in node.input if i)
        counts.update(node_outer_refs(node))
    counts.update(o.name for o in graph.output)
    return counts


def constant_initializers(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    """Initializers of the main graph whose value cannot be overridden by a feed.

    From IR version 4 on, an initializer that is also a graph input is only a default value;
    before it, every initializer had to be listed as an input and is a constant (this is
    also how onnxruntime treats them).
    """
    graph = model.graph
    inputs = {i.name for i in graph.input} if model.ir_version >= 4 else set()
    return {t.name: t for t in graph.initializer if t.name not in inputs}


def static_shapes(graph: onnx.GraphProto) -> dict[str, tuple[int, ...]]:
    """Fully known tensor shapes from graph inputs, outputs and value_info."""
    shapes: dict[str, tuple[int, ...]] = {}
    for info in [*graph.input, *graph.value_info, *graph.output]:
        ttype = info.type.tensor_type if info.type.HasField("tensor_type") else None
        if ttype is None or not ttype.HasField("shape"):
            continue
        dims = ttype.shape.dim
        if all(d.HasField("dim_value") for d in dims):
            shapes[info.name] = tuple(int(d.dim_value) for d in dims)
    return shapes


def unique_name(base: str, taken: set[str]) -> str:
    """``base`` or ``base_<k>``, whichever is free first; the result is added to ``taken``."""
    name, k = base, 0
    while name in taken:
        k += 1
        name = f"{base}_{k}"
    taken.add(name)
    return name


def resolve(mapping: Mapping[str, str], name: str) -> str:
    """Follow a rename chain to its end (mappings are acyclic by construction)."""
    seen = 0
    while name in mapping:
        name = mapping[name]
        seen += 1
        if seen > len(mapping):
            raise ValueError(f"rename cycle through {name!r}")
    return name


def apply_renames(graph: onnx.GraphProto, mapping: Mapping[str, str], top: bool = True) -> None:
    """Rename tensor references in place.

    In the main graph (``top``) node inputs and node outputs are renamed (graph inputs and
    outputs never are: callers must not map them). In subgraphs only references to the outer
    scope are renamed: node inputs and subgraph outputs that the subgraph does not define.
    """
    if not mapping:
        return
    if not top:
        local = defined_names(graph)
        mapping = {k: v for k, v in mapping.items() if k not in local}
        if not mapping:
            return
        for out in graph.output:
            out.name = resolve(mapping, out.name)
    for node in graph.node:
        _rename_fields(node.input, mapping)
        if top:
            _rename_fields(node.output, mapping)
        for sub in subgraphs(node):
            apply_renames(sub, mapping, top=False)


def _rename_fields(fields: MutableSequence[str], mapping: Mapping[str, str]) -> None:
    for i, name in enumerate(list(fields)):
        if name and name in mapping:
            fields[i] = resolve(mapping, name)


def drop_value_info(graph: onnx.GraphProto, names: Iterable[str]) -> None:
    """Remove value_info entries for the given names (they went stale)."""
    stale = set(names)
    if stale:
        keep_only(graph.value_info, [v.name not in stale for v in graph.value_info])


def keep_only(items: MutableSequence, keep: Sequence[bool]) -> int:
    """Delete, in place, the items of a repeated protobuf field whose flag is False.

    Deleting by index (from the end) avoids copying the kept messages, which matters when
    they are large initializers. Returns how many were deleted.
    """
    dropped = 0
    for index in range(len(keep) - 1, -1, -1):
        if not keep[index]:
            del items[index]
            dropped += 1
    return dropped
