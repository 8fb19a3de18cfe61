"""What a rule sees: the graph, the layouts so far, the atom table; and the pruning edits."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from ..graph import ModelGraph, subgraph_references
from ..layouts import AtomTable, Layout

logger = logging.getLogger(__name__)


@dataclass
class PropagationContext:
    """Mutable state of the layout propagation over one model."""

    graph: ModelGraph
    atoms: AtomTable = field(default_factory=AtomTable)
    layouts: dict[str, Layout] = field(default_factory=dict)
    unknown_ops: Counter = field(default_factory=Counter)
    # (node, constant initializer, tensor whose layout indexes the constant's channel axis)
    constants: list[tuple[str, str, str]] = field(default_factory=list)

    # --- reading ------------------------------------------------------------------------
    def layout(self, tensor: str) -> Layout | None:
        return self.layouts.get(tensor) if tensor else None

    def shape(self, tensor: str) -> list[int] | None:
        return self.graph.shape(tensor)

    def const(self, tensor: str) -> np.ndarray | None:
        return self.graph.constant(tensor) if tensor else None

    def attr(self, node: onnx.NodeProto, name: str, default=None):
        return self.graph.attr(node, name, default)

    @property
    def opset(self) -> int:
        return self.graph.opset

    # --- writing ------------------------------------------------------------------------
    def set_layout(self, tensor: str, layout: Layout) -> None:
        shape = self.shape(tensor)
        if shape is not None and (
            layout.axis >= len(shape) or shape[layout.axis] != layout.size
        ):
            raise ValueError(
                f"layout of {tensor!r} (axis {layout.axis}, {layout.size} channels) "
                f"does not match its shape {shape}"
            )
        self.layouts[tensor] = layout

    def fresh(
        self,
        node_name: str,
        tensor: str,
        axis: int,
        weight_layer: bool,
        blocked: str | None = None,
    ) -> Layout | None:
        """New atoms for a tensor produced by ``node_name`` (channel axis ``axis``)."""
        shape = self.shape(tensor)
        if shape is None or axis >= len(shape):
            return None
        layout = Layout(axis, self.atoms.new(node_name, shape[axis], weight_layer))
        if blocked:
            self.atoms.block(layout.atoms, blocked)
        self.layouts[tensor] = layout
        return layout

    def note_constant(self, node_name: str, const: str, layout_tensor: str) -> None:
        """Record a per-channel constant (bias, BN parameter, per-channel scale) for reports."""
        self.constants.append((node_name, const, layout_tensor))

    def block(self, tensor: str, reason: str) -> None:
        layout = self.layout(tensor)
        if layout is not None:
            self.atoms.block(layout.atoms, reason)

    def opaque(self, name: str, node: onnx.NodeProto, reason: str) -> None:
        """The op is a wall: block every channel it reads, its outputs are new blocked atoms."""
        why = f"{node.op_type} node '{name}': {reason}"
        for inp in list(node.input) + sorted(subgraph_references(node)):
            self.block(inp, why)
        for out in node.output:
            shape = self.shape(out) if out else None
            if shape is not None and len(shape) >= 2:
                self.fresh(name, out, 1, weight_layer=False, blocked=why)

    def passthrough(self, src: str, dst: str, axis: int | None = None) -> None:
        layout = self.layout(src)
        if layout is not None and dst:
            self.set_layout(dst, layout if axis is None else layout.with_axis(axis))


@dataclass
class PruneContext:
    """Edits collected while removing channels: new constants and attribute values."""

    graph: ModelGraph
    layouts: dict[str, Layout]
    removed: np.ndarray  # bool per atom id
    new_initializers: dict[str, np.ndarray] = field(default_factory=dict)
    _users: Counter = field(default_factory=Counter)

    def __post_init__(self) -> None:
        for node in self.graph.nodes.values():
            for inp in node.input:
                if inp in self.graph.initializers:
                    self._users[inp] += 1

    def layout(self, tensor: str) -> Layout | None:
        return self.layouts.get(tensor) if tensor else None

    @property
    def opset(self) -> int:
        return self.graph.opset

    def keep_mask(self, tensor: str) -> np.ndarray | None:
        """Bool mask over the tensor's channel positions, or None if it loses nothing."""
        layout = self.layout(tensor)
        if layout is None:
            return None
        keep = ~self.removed[layout.atoms]
        return None if keep.all() else keep

    def const(self, tensor: str) -> np.ndarray | None:
        if tensor in self.new_initializers:
            return self.new_initializers[tensor]
        return self.graph.constant(tensor)

    def attr(self, node: onnx.NodeProto, name: str, default=None):
        return self.graph.attr(node, name, default)

    def set_const_input(
        self, node_name: str, node: onnx.NodeProto, index: int, value: np.ndarray
    ) -> None:
        """Replace a constant input of one node (copy-on-write when others share it)."""
        old = node.input[index]
        new = old if self._users[old] <= 1 else f"{old}__{node_name}"
        dtype = self.graph.constant(old).dtype if old in self.graph.initializers else value.dtype
        self.new_initializers[new] = np.ascontiguousarray(value.astype(dtype, copy=False))
        node.input[index] = new

    def add_const_input(self, node: onnx.NodeProto, index: int, name: str, value: np.ndarray) -> None:
        """Give the node a (new) constant input at ``index`` (padding with empty names)."""
        while len(node.input) <= index:
            node.input.append("")
        self.new_initializers[name] = value
        node.input[index] = name

    def set_attr(self, node: onnx.NodeProto, name: str, value) -> None:
        for i, a in enumerate(node.attribute):
            if a.name == name:
                del node.attribute[i]
                break
        node.attribute.append(onnx.helper.make_attribute(name, value))

    def drop_attr(self, node: onnx.NodeProto, name: str) -> None:
        for i, a in enumerate(node.attribute):
            if a.name == name:
                del node.attribute[i]
                return

    def initializer_protos(self) -> dict[str, onnx.TensorProto]:
        return {n: numpy_helper.from_array(v, n) for n, v in self.new_initializers.items()}
