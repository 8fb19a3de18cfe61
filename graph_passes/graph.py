"""A read-only view of an ONNX graph: producers, consumers, shapes, constants, and a networkx graph.

The view is built once per analysis. Tensors and ops both become networkx nodes (``("t", name)``
and ``("op", node_name)``), so graph algorithms (topological order, reachability) come from
networkx instead of hand-written traversals.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import cached_property

import networkx as nx
import numpy as np
import onnx
from onnx import numpy_helper

logger = logging.getLogger(__name__)

DEFAULT_DOMAINS = ("", "ai.onnx")


def _dims(type_proto: onnx.TypeProto) -> list[int] | None:
    if not type_proto.HasField("tensor_type") or not type_proto.tensor_type.HasField("shape"):
        return None
    dims = []
    for d in type_proto.tensor_type.shape.dim:
        if not d.HasField("dim_value"):
            return None
        dims.append(int(d.dim_value))
    return dims


def subgraph_references(node: onnx.NodeProto) -> set[str]:
    """Names a node's subgraphs (If/Loop/Scan bodies) read from the enclosing scope."""
    refs: set[str] = set()
    for attr in node.attribute:
        graphs = list(attr.graphs) + ([attr.g] if attr.HasField("g") else [])
        for g in graphs:
            local = {i.name for i in g.input} | {t.name for t in g.initializer}
            for n in g.node:
                local.update(o for o in n.output if o)
            for n in g.node:
                refs.update(i for i in n.input if i and i not in local)
                refs.update(r for r in subgraph_references(n) if r not in local)
            refs.update(o.name for o in g.output if o.name not in local)
    return refs


@dataclass
class ModelGraph:
    """Producers, consumers, static shapes and constant values of a model's main graph."""

    model: onnx.ModelProto
    nodes: dict[str, onnx.NodeProto] = field(default_factory=dict)
    producer: dict[str, str] = field(default_factory=dict)
    consumers: dict[str, list[str]] = field(default_factory=dict)
    shapes: dict[str, list[int] | None] = field(default_factory=dict)
    initializers: dict[str, onnx.TensorProto] = field(default_factory=dict)
    graph_inputs: list[str] = field(default_factory=list)
    graph_outputs: list[str] = field(default_factory=list)
    opset: int = 0

    @classmethod
    def build(cls, model: onnx.ModelProto) -> "ModelGraph":
        g = model.graph
        view = cls(model=model)
        view.opset = next(
            (o.version for o in model.opset_import if o.domain in DEFAULT_DOMAINS), 0
        )
        view.initializers = {t.name: t for t in g.initializer}
        view.graph_inputs = [i.name for i in g.input if i.name not in view.initializers]
        view.graph_outputs = [o.name for o in g.output]
        for vi in list(g.input) + list(g.value_info) + list(g.output):
            dims = _dims(vi.type)
            if dims is not None or vi.name not in view.shapes:  # never forget a known shape
                view.shapes[vi.name] = dims
        for t in g.initializer:
            view.shapes[t.name] = list(t.dims)
        for i, node in enumerate(g.node):
            name = node.name or f"{node.op_type}_{i}"
            if name in view.nodes:
                name = f"{name}__{i}"
            view.nodes[name] = node
            for out in node.output:
                if out:
                    view.producer[out] = name
            for inp in list(node.input) + sorted(subgraph_references(node)):
                if inp:
                    view.consumers.setdefault(inp, []).append(name)
        return view

    # --- queries ------------------------------------------------------------------------
    def shape(self, tensor: str) -> list[int] | None:
        return self.shapes.get(tensor)

    def is_constant(self, tensor: str) -> bool:
        return tensor in self.initializers

    @cached_property
    def _const_cache(self) -> dict[str, np.ndarray]:
        return {}

    def constant(self, tensor: str) -> np.ndarray | None:
        """The value of an initializer, or None if the tensor is not constant."""
        if tensor not in self.initializers:
            return None
        cache = self._const_cache
        if tensor not in cache:
            cache[tensor] = numpy_helper.to_array(self.initializers[tensor])
        return cache[tensor]

    def node_name(self, node: onnx.NodeProto) -> str:
        for name, n in self.nodes.items():
            if n is node:
                return name
        raise KeyError(node.op_type)

    @cached_property
    def nx_graph(self) -> nx.DiGraph:
        """Bipartite DiGraph: ("t", tensor) -> ("op", node) -> ("t", tensor), with shapes."""
        dg = nx.DiGraph()
        for name, node in self.nodes.items():
            dg.add_node(("op", name), op_type=node.op_type, domain=node.domain)
            for inp in node.input:
                if inp:
                    dg.add_node(("t", inp), shape=self.shapes.get(inp))
                    dg.add_edge(("t", inp), ("op", name))
            for ref in subgraph_references(node):
                dg.add_node(("t", ref), shape=self.shapes.get(ref))
                dg.add_edge(("t", ref), ("op", name))
            for out in node.output:
                if out:
                    dg.add_node(("t", out), shape=self.shapes.get(out))
                    dg.add_edge(("op", name), ("t", out))
        return dg

    def topological_nodes(self) -> list[str]:
        """Node names in a topological order: the file's order when it is one (the ONNX spec
        requires it; checked in linear time), else networkx's topological sort."""
        seen = set(self.graph_inputs) | set(self.initializers)
        for name, node in self.nodes.items():
            needed = [i for i in node.input if i] + sorted(subgraph_references(node))
            if any(i not in seen for i in needed):
                break
            seen.update(o for o in node.output if o)
        else:
            return list(self.nodes)
        logger.info("nodes are not in topological order; sorting with networkx")
        return [n[1] for n in nx.topological_sort(self.nx_graph) if n[0] == "op"]

    def attr(self, node: onnx.NodeProto, name: str, default=None):
        for a in node.attribute:
            if a.name == name:
                return onnx.helper.get_attribute_value(a)
        return default
