"""Reshape (allowzero), Flatten (any axis), Split (num_outputs, opset 18), Pad (axes input,
wrap mode), DepthToSpace (both modes; onnx2torch has only CRD) and SpaceToDepth."""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F
from onnx2torch.onnx_graph import OnnxGraph
from onnx2torch.onnx_node import OnnxNode
from onnx2torch.utils.common import OperationConverterResult
from torch import nn

from plugin.bridge import registry
from plugin.bridge._common import (
    const_input,
    dynamic_mapping,
    full_mapping,
    input_name,
    result,
    unsupported,
)

logger = logging.getLogger(__name__)


def _ints(value: torch.Tensor | np.ndarray | list[int] | None) -> list[int] | None:
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return [int(v) for v in value.reshape(-1).tolist()]
    return [int(v) for v in np.asarray(value).reshape(-1)]


# ---------------------------------------------------------------------------- Reshape


class OnnxReshape(nn.Module):
    """Reshape; a 0 copies the input dim unless ``allowzero`` (then 0 is a real zero size)."""

    def __init__(self, allowzero: bool, shape: list[int] | None) -> None:
        super().__init__()
        self.allowzero, self.shape = allowzero, shape

    def forward(self, x: torch.Tensor, shape: torch.Tensor | None = None) -> torch.Tensor:  # noqa: D102
        target = self.shape if shape is None else _ints(shape)
        if not self.allowzero:
            target = [x.shape[i] if d == 0 else d for i, d in enumerate(target)]
        return torch.reshape(x, target)


@registry.register("Reshape", 5, 13, 14, 19, 21, 23, 24, 25)
def convert_reshape(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    allowzero = bool(node.attributes.get("allowzero", 0))
    shape = _ints(const_input(node, graph, 1))
    if allowzero and shape is not None and 0 in shape and -1 in shape:
        raise unsupported(node, "allowzero=1 with both 0 and -1 in the shape")
    count = 1 if shape is not None else 2
    return result(OnnxReshape(allowzero, shape), dynamic_mapping(node, count))


# ---------------------------------------------------------------------------- Flatten


class OnnxFlattenAnyAxis(nn.Module):
    """Flatten to [prod(shape[:axis]), prod(shape[axis:])]. onnx2torch's flattens a rank-r tensor
    at axis r to rank 1 and then fails (a BERT export flattens its [1, S] mask at axis 2)."""

    def __init__(self, axis: int) -> None:
        super().__init__()
        self.axis = axis

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        axis = self.axis + x.dim() if self.axis < 0 else self.axis
        return torch.reshape(x, (int(np.prod(x.shape[:axis])), int(np.prod(x.shape[axis:]))))


@registry.register("Flatten", 9, 11, 13)
def convert_flatten(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    return result(OnnxFlattenAnyAxis(int(node.attributes.get("axis", 1))), full_mapping(node))


# ---------------------------------------------------------------------------- Split


class OnnxSplit(nn.Module):
    """Split by explicit sizes, or into ``parts`` chunks of ceil(dim / parts) (last smaller)."""

    def __init__(self, axis: int, parts: int, sizes: list[int] | None) -> None:
        super().__init__()
        self.axis, self.parts, self.sizes = axis, parts, sizes

    def forward(self, x: torch.Tensor, split: torch.Tensor | None = None):  # noqa: D102
        sizes = self.sizes if split is None else _ints(split)
        if sizes is None:
            length = x.shape[self.axis]
            chunk = -(-length // self.parts)
            sizes = [chunk] * (self.parts - 1) + [length - chunk * (self.parts - 1)]
            if sizes[-1] < 0:
                raise ValueError(f"cannot split {length} into {self.parts} ceil-sized chunks")
        return tuple(torch.split(x, sizes, dim=self.axis))


@registry.register("Split", 18)
def convert_split(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    attrs = node.attributes
    axis = int(attrs.get("axis", 0))
    outputs = len(node.output_values)
    num_outputs = attrs.get("num_outputs")
    has_split = input_name(node, 1) is not None
    if num_outputs is not None and (has_split or int(num_outputs) != outputs):
        raise unsupported(node, "num_outputs together with a split input or another output count")
    sizes = _ints(const_input(node, graph, 1))
    module = OnnxSplit(axis, outputs, sizes)
    return result(module, dynamic_mapping(node, 2 if has_split and sizes is None else 1))


# ---------------------------------------------------------------------------- Pad


def _pad_index(size: int, before: int, after: int, mode: str, device) -> torch.Tensor:
    """Source index of every output position along one axis for reflect/edge/wrap padding."""
    pos = torch.arange(-before, size + after, device=device)
    if mode == "edge":
        return pos.clamp(0, size - 1)
    if mode == "wrap":
        return torch.remainder(pos, size)
    if size == 1:  # reflect of a single element repeats it
        return torch.zeros_like(pos)
    period = 2 * (size - 1)
    pos = torch.remainder(pos, period)
    return torch.where(pos >= size, period - pos, pos)


class OnnxPad(nn.Module):
    """ONNX Pad (opset 11-25): pads [x1_begin, x2_begin, ..., x1_end, ...] on ``axes``."""

    def __init__(self, mode: str, pads: list[int] | None, axes: list[int] | None,
                 value: float | None) -> None:
        super().__init__()
        self.mode, self.pads, self.axes, self.value = mode, pads, axes, value

    def forward(self, x: torch.Tensor, pads: torch.Tensor | None = None,  # noqa: D102
                constant_value: torch.Tensor | None = None, axes: torch.Tensor | None = None):
        pad_list = self.pads if pads is None else _ints(pads)
        axis_list = self.axes if axes is None else _ints(axes)
        axis_list = list(range(x.dim())) if axis_list is None else [
            a + x.dim() if a < 0 else a for a in axis_list]
        half = len(pad_list) // 2
        begins, ends = dict(zip(axis_list, pad_list[:half])), dict(zip(axis_list, pad_list[half:]))
        # negative pads crop first
        for axis in axis_list:
            lo, hi = max(-begins[axis], 0), max(-ends[axis], 0)
            if lo or hi:
                x = x.narrow(axis, lo, x.shape[axis] - lo - hi)
        if self.mode == "constant":
            torch_pads: list[int] = []
            for axis in reversed(range(x.dim())):
                torch_pads += [max(begins.get(axis, 0), 0), max(ends.get(axis, 0), 0)]
            value = self.value if constant_value is None else float(constant_value.reshape(-1)[0])
            return F.pad(x, torch_pads, mode="constant", value=0.0 if value is None else value)
        for axis in axis_list:
            lo, hi = max(begins[axis], 0), max(ends[axis], 0)
            if lo or hi:
                index = _pad_index(x.shape[axis], lo, hi, self.mode, x.device)
                x = torch.index_select(x, axis, index)
        return x


def _pad_converter(with_axes: bool):
    def convert(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
        mode = node.attributes.get("mode", "constant")
        allowed = ("constant", "reflect", "edge", "wrap") if with_axes else ("constant", "reflect", "edge")
        if mode not in allowed:
            raise unsupported(node, f"Pad mode={mode!r}")
        pads = _ints(const_input(node, graph, 1))
        value = const_input(node, graph, 2)
        axes = _ints(const_input(node, graph, 3)) if with_axes else None
        dynamic = [pads is None and input_name(node, 1) is not None,
                   value is None and input_name(node, 2) is not None,
                   axes is None and input_name(node, 3) is not None]
        scalar = None if value is None else float(np.asarray(value).reshape(-1)[0])
        module = OnnxPad(mode, pads, axes, scalar)
        if not any(dynamic):
            return result(module, dynamic_mapping(node, 1))
        return result(OnnxPad(mode, None, None, None), full_mapping(node))

    return convert


registry.register("Pad", 11, 13)(_pad_converter(with_axes=False))
# 18 adds the axes input; 19 adds mode="wrap"; 21/23/24/25 only add types.
registry.register("Pad", 18, 19, 21, 23, 24, 25)(_pad_converter(with_axes=True))


# ---------------------------------------------------------------------------- DepthToSpace, SpaceToDepth


class SpaceDepth(nn.Module):
    """DepthToSpace (mode DCR or CRD) or SpaceToDepth on an NCHW tensor, as in the ONNX spec:
    a reshape to 6-D, a transpose, a reshape back."""

    def __init__(self, to_space: bool, blocksize: int, mode: str) -> None:
        super().__init__()
        self.to_space, self.bs, self.mode = to_space, blocksize, mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        n, c, h, w = x.shape
        bs = self.bs
        if not self.to_space:
            y = x.reshape(n, c, h // bs, bs, w // bs, bs).permute(0, 3, 5, 1, 2, 4)
            return y.reshape(n, c * bs * bs, h // bs, w // bs)
        if self.mode == "DCR":
            y = x.reshape(n, bs, bs, c // (bs * bs), h, w).permute(0, 3, 4, 1, 5, 2)
        else:
            y = x.reshape(n, c // (bs * bs), bs, bs, h, w).permute(0, 1, 4, 2, 5, 3)
        return y.reshape(n, c // (bs * bs), h * bs, w * bs)


def _space_depth(to_space: bool):
    def convert(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
        mode = node.attributes.get("mode", "DCR") if to_space else "DCR"
        if mode not in ("DCR", "CRD"):
            raise unsupported(node, f"mode {mode!r}")
        return result(SpaceDepth(to_space, int(node.attributes["blocksize"]), mode), dynamic_mapping(node, 1))

    return convert


registry.register("DepthToSpace", 1, 11, 13)(_space_depth(True))
registry.register("SpaceToDepth", 1, 13)(_space_depth(False))
