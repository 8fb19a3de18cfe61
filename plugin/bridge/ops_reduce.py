"""Reduce* converters: axes as attribute (<= 13) or as input (ReduceSum 13, all others 18+).

Overrides onnx2torch for every version: its reductions over several negative axes with
keepdims=0 (ReduceMax/Min/Prod) index the wrong axis, and its static ReduceSum path with
empty axes and keepdims=0 fails. Here axes are normalised before reducing.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch
from onnx2torch.onnx_graph import OnnxGraph
from onnx2torch.onnx_node import OnnxNode
from onnx2torch.utils.common import OperationConverterResult
from torch import nn

from plugin.bridge import registry
from plugin.bridge._common import const_input, dynamic_mapping, input_name, normalise_axes, result

logger = logging.getLogger(__name__)

Reducer = Callable[[torch.Tensor, list[int], bool], torch.Tensor]


def _prod(x: torch.Tensor, dims: list[int], keep: bool) -> torch.Tensor:
    for dim in sorted(dims, reverse=True):
        x = torch.prod(x, dim=dim, keepdim=keep)
    return x


_REDUCERS: dict[str, Reducer] = {
    "ReduceSum": lambda x, d, k: torch.sum(x, dim=d, keepdim=k),
    "ReduceMean": lambda x, d, k: torch.mean(x, dim=d, keepdim=k),
    "ReduceMax": lambda x, d, k: torch.amax(x, dim=d, keepdim=k),
    "ReduceMin": lambda x, d, k: torch.amin(x, dim=d, keepdim=k),
    "ReduceProd": _prod,
    "ReduceL1": lambda x, d, k: torch.sum(torch.abs(x), dim=d, keepdim=k),
    "ReduceL2": lambda x, d, k: torch.sqrt(torch.sum(x * x, dim=d, keepdim=k)),
    "ReduceSumSquare": lambda x, d, k: torch.sum(x * x, dim=d, keepdim=k),
    "ReduceLogSum": lambda x, d, k: torch.log(torch.sum(x, dim=d, keepdim=k)),
    "ReduceLogSumExp": lambda x, d, k: torch.logsumexp(x, dim=d, keepdim=k),
}


# noop_with_empty_axes reduces over no axis: the element-wise parts still apply
_NO_AXES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "ReduceL1": torch.abs,
    "ReduceL2": torch.abs,
    "ReduceSumSquare": lambda x: x * x,
    "ReduceLogSum": torch.log,
}


class OnnxReduce(nn.Module):
    """One ONNX Reduce* op; ``axes`` fixed at conversion or given as the second input."""

    def __init__(self, op_type: str, axes: list[int] | None, keepdims: bool, noop: bool) -> None:
        super().__init__()
        self.op_type, self.axes, self.keepdims, self.noop = op_type, axes, keepdims, noop

    def forward(self, x: torch.Tensor, axes: torch.Tensor | None = None) -> torch.Tensor:  # noqa: D102
        wanted = self.axes if axes is None else [int(a) for a in axes.reshape(-1).tolist()]
        if not wanted:
            if self.noop:
                return _NO_AXES.get(self.op_type, lambda t: t)(x)
            wanted = list(range(x.dim()))
        dims = normalise_axes(wanted, x.dim())
        if not dims:  # rank-0 input
            return x
        return _REDUCERS[self.op_type](x, dims, self.keepdims)


def _reduce_converter(op_type: str, axes_as_input: bool):
    def convert(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
        attrs = node.attributes
        keepdims = bool(attrs.get("keepdims", 1))
        noop = bool(attrs.get("noop_with_empty_axes", 0))
        if not axes_as_input:
            module = OnnxReduce(op_type, list(attrs.get("axes", [])), keepdims, noop=False)
            return result(module, dynamic_mapping(node, 1))
        if input_name(node, 1) is None:
            return result(OnnxReduce(op_type, [], keepdims, noop), dynamic_mapping(node, 1))
        axes = const_input(node, graph, 1)
        if axes is not None:
            module = OnnxReduce(op_type, [int(a) for a in axes.reshape(-1)], keepdims, noop)
            return result(module, dynamic_mapping(node, 1))
        return result(OnnxReduce(op_type, None, keepdims, noop), dynamic_mapping(node, 2))

    return convert


_ATTR_VERSIONS = {
    "ReduceSum": (1, 11),
    "ReduceMax": (1, 11, 12, 13),
    "ReduceMin": (1, 11, 12, 13),
}
_INPUT_VERSIONS = {"ReduceSum": (13,)}

for _op in _REDUCERS:
    for _v in _ATTR_VERSIONS.get(_op, (1, 11, 13)):
        registry.register(_op, _v)(_reduce_converter(_op, axes_as_input=False))
    for _v in _INPUT_VERSIONS.get(_op, (18,)):
        registry.register(_op, _v)(_reduce_converter(_op, axes_as_input=True))
