"""Shared helpers for the bridge's converters: constant inputs, attribute checks, bindings."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from onnx2torch.onnx_graph import OnnxGraph
from onnx2torch.onnx_node import OnnxNode
from onnx2torch.utils.common import OnnxMapping, OperationConverterResult

from graph_passes.errors import ConversionError


@dataclass(frozen=True)
class ParamBinding:
    """One torch tensor that holds the value of one ONNX initializer.

    ``attr`` is the dotted path of the parameter or buffer inside the converted node's module;
    the ONNX value is ``tensor.T`` when ``transpose`` is set, then reshaped to ``onnx_shape``.
    """

    attr: str
    initializer: str
    transpose: bool
    onnx_shape: tuple[int, ...]

    def to_onnx(self, tensor: torch.Tensor) -> np.ndarray:
        value = tensor.detach().cpu()
        if self.transpose:
            value = value.T
        array = value.numpy()
        if array.size == int(np.prod(self.onnx_shape)):
            array = array.reshape(self.onnx_shape)
        return array


BINDINGS_ATTR = "pq_bindings"


def attach_bindings(module: torch.nn.Module, bindings: list[ParamBinding]) -> torch.nn.Module:
    """Record on ``module`` which of its tensors come from which initializers."""
    setattr(module, BINDINGS_ATTR, tuple(bindings))
    return module


def node_label(node: OnnxNode) -> str:
    return f"{node.name or node.unique_name!r} ({node.operation_type})"


def unsupported(node: OnnxNode, what: str) -> ConversionError:
    """The error for an attribute value or input form we do not reproduce exactly."""
    return ConversionError(
        f"node {node_label(node)}: {what} is not supported by the torch bridge; "
        "rewrite the model without it or add a converter in plugin/bridge"
    )


def input_name(node: OnnxNode, index: int) -> str | None:
    """The name of optional input ``index``, or None where it is absent or empty."""
    if index < len(node.input_values) and node.input_values[index]:
        return node.input_values[index]
    return None


def const_input(node: OnnxNode, graph: OnnxGraph, index: int) -> np.ndarray | None:
    """Value of input ``index`` if it is an initializer or a Constant node's output, else None."""
    name = input_name(node, index)
    if name is None:
        return None
    if name in graph.initializers:
        return graph.initializers[name].to_numpy()
    try:
        producer, _ = graph.value_as_node_output(name)
    except KeyError:
        return None
    if producer.operation_type == "Constant" and "value" in producer.attributes:
        return producer.attributes["value"].to_numpy()
    return None


def is_initializer(graph: OnnxGraph, name: str | None) -> bool:
    return name is not None and name in graph.initializers


def dynamic_mapping(node: OnnxNode, count: int) -> OnnxMapping:
    """Mapping that feeds only the first ``count`` inputs to the module (the rest are baked in)."""
    return OnnxMapping(inputs=tuple(node.input_values[:count]), outputs=node.output_values)


def result(module: torch.nn.Module, mapping: OnnxMapping) -> OperationConverterResult:
    return OperationConverterResult(torch_module=module, onnx_mapping=mapping)


def full_mapping(node: OnnxNode) -> OnnxMapping:
    return OnnxMapping(inputs=node.input_values, outputs=node.output_values)


def normalise_axes(axes: list[int], rank: int) -> list[int]:
    """Non-negative, sorted, unique axes; raises ValueError when an axis is out of range."""
    out = sorted({a + rank if a < 0 else a for a in axes})
    if out and (out[0] < 0 or out[-1] >= rank):
        raise ValueError(f"axes {axes} out of range for rank {rank}")
    return out
