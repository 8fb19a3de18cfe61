"""GlobalMaxPool, OneHot, ScatterElements, and Clip whose bounds are computed at run time or left out.

* GlobalMaxPool (1, 22): tf2onnx writes it for Keras' ``GlobalMaxPooling`` (magika).
* OneHot (9, 11): indices of any numeric type (cast to int64, truncating), negative indices
  counted from ``depth``, out-of-range indices all ``off``; ``depth`` and ``values`` as
  constants or run-time tensors; any ``axis``.
* ScatterElements (11, 13, 16, 18; every reduction): in SLANet's decoder Loop.
* Clip (11, 12, 13): onnx2torch converts only constant bounds and mistakes an empty optional
  input (``Clip(x, min, "")``, the torch exporter's ``clamp(min=...)``) for a run-time one. Ours
  clamps with the bound tensors themselves; constant, fully given bounds still go to onnx2torch's
  converter (its ReLU / ReLU6 modules), unchanged.
"""

from __future__ import annotations

import logging

import torch
from onnx2torch.onnx_graph import OnnxGraph
from onnx2torch.onnx_node import OnnxNode
from onnx2torch.utils.common import OnnxMapping, OperationConverterResult
from torch import nn

from plugin.bridge import registry
from plugin.bridge._common import const_input, dynamic_mapping, input_name, result, unsupported

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- GlobalMaxPool


class GlobalMaxPool(nn.Module):
    """Max over every axis after N and C, kept as size-1 axes."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        dims = tuple(range(2, x.dim()))
        if not dims:  # torch.amax over no dims would reduce them all
            return x
        return torch.amax(x, dim=dims, keepdim=True)


@registry.register("GlobalMaxPool", 1, 22)
def convert_global_max_pool(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    return result(GlobalMaxPool(), dynamic_mapping(node, 1))


# ---------------------------------------------------------------------------- OneHot


class OneHot(nn.Module):
    """ONNX OneHot: ``values[1]`` where an index hits a class, ``values[0]`` elsewhere."""

    def __init__(self, axis: int) -> None:
        super().__init__()
        self.axis = axis

    def forward(self, indices: torch.Tensor, depth: torch.Tensor,  # noqa: D102
                values: torch.Tensor) -> torch.Tensor:
        size = int(depth.reshape(-1)[0].to(torch.float64).item())
        index = indices.to(torch.int64)
        index = torch.where(index < 0, index + size, index)
        classes = torch.arange(size, device=index.device, dtype=torch.int64)
        hot = index.unsqueeze(-1) == classes  # out-of-range indices match no class
        flat = values.reshape(-1)
        out = torch.where(hot, flat[1], flat[0])
        rank = out.dim()
        axis = self.axis + rank if self.axis < 0 else self.axis
        return out if axis == rank - 1 else out.movedim(-1, axis)


@registry.register("OneHot", 9, 11)
def convert_one_hot(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    axis = int(node.attributes.get("axis", -1))
    return result(OneHot(axis), dynamic_mapping(node, 3))


# ---------------------------------------------------------------------------- Clip


class TensorClip(nn.Module):
    """``torch.clamp`` with tensor bounds; an absent bound (None) does not clamp."""

    def forward(self, x: torch.Tensor, min_value: torch.Tensor | None = None,  # noqa: D102
                max_value: torch.Tensor | None = None) -> torch.Tensor:
        if min_value is None and max_value is None:
            return x
        # ONNX: min > max sets every value to max, as torch.clamp does
        low = None if min_value is None else min_value.to(x.dtype)
        high = None if max_value is None else max_value.to(x.dtype)
        return torch.clamp(x, low, high)


def convert_clip(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    names = [input_name(node, 1), input_name(node, 2)]
    given = [name for name in names if name is not None]
    empty_slot = any(name is None for name in names[:len(node.input_values) - 1])
    if not empty_slot and all(const_input(node, graph, i) is not None for i in (1, 2) if names[i - 1]):
        return registry.lookup_original("Clip", 13)(node, graph)
    logger.debug("Clip %s: bounds %s at run time", node.name, given)
    mapping = OnnxMapping(inputs=(node.input_values[0], names[0] or "", names[1] or ""),
                          outputs=node.output_values)
    return result(TensorClip(), mapping)


registry.register("Clip", 11, 12, 13)(convert_clip)


# ---------------------------------------------------------------------------- ScatterElements

_REDUCE = {"add": "sum", "mul": "prod", "max": "amax", "min": "amin"}


class ScatterElements(nn.Module):
    """ONNX ScatterElements: ``updates`` written (or reduced) into a copy of ``data`` at
    ``indices`` along ``axis``; negative indices count from the end of that axis."""

    def __init__(self, axis: int, reduction: str) -> None:
        super().__init__()
        self.axis, self.reduction = axis, reduction

    def forward(self, data: torch.Tensor, indices: torch.Tensor,  # noqa: D102
                updates: torch.Tensor) -> torch.Tensor:
        axis = self.axis + data.dim() if self.axis < 0 else self.axis
        index = indices.to(torch.int64)
        index = torch.where(index < 0, index + data.shape[axis], index)
        if self.reduction == "none":
            return data.scatter(axis, index, updates)
        return data.scatter_reduce(axis, index, updates, reduce=_REDUCE[self.reduction], include_self=True)


@registry.register("ScatterElements", 11, 13, 16, 18)
def convert_scatter_elements(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    reduction = node.attributes.get("reduction", "none")
    if reduction not in ("none", *_REDUCE):
        raise unsupported(node, f"reduction={reduction!r}")
    return result(ScatterElements(int(node.attributes.get("axis", 0)), reduction), dynamic_mapping(node, 3))
