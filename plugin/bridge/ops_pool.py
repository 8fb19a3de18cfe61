"""AveragePool for every version (dilations since 19, asymmetric pads, auto_pad); MaxPool and
Conv with ``auto_pad=SAME_UPPER|SAME_LOWER`` (TensorFlow's "same", tf2onnx keeps it when shapes
are unknown at export): the pads are made explicit from the static input shape, then
onnx2torch's converter runs."""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from onnx2torch.onnx_graph import OnnxGraph
import onnx
from onnx2torch.onnx_node import OnnxNode
from onnx2torch.utils.common import OperationConverterResult, get_shape_from_value_info
from torch import nn

from plugin.bridge import registry
from plugin.bridge._common import dynamic_mapping, result, unsupported

logger = logging.getLogger(__name__)

_AVG_POOL = {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}
_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _torch_pads(pads: list[int]) -> list[int]:
    """ONNX [b1, b2, ..., e1, e2, ...] -> F.pad's [b_last, e_last, ..., b1, e1]."""
    half = len(pads) // 2
    out: list[int] = []
    for axis in reversed(range(half)):
        out += [pads[axis], pads[axis + half]]
    return out


class PaddedAvgPool(nn.Module):
    """Average pooling as a depthwise convolution with a ones kernel (dilations, any pads)."""

    def __init__(self, kernel: list[int], strides: list[int], dilations: list[int],
                 pads: list[int], count_include_pad: bool) -> None:
        super().__init__()
        self.kernel, self.strides, self.dilations = kernel, strides, dilations
        self.pads, self.count_include_pad = _torch_pads(pads), count_include_pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        conv, channels = _CONV[len(self.kernel)], x.shape[1]
        ones = x.new_ones((channels, 1, *self.kernel))
        total = conv(F.pad(x, self.pads), ones, stride=self.strides, dilation=self.dilations,
                     groups=channels)
        if self.count_include_pad:
            return total / math.prod(self.kernel)
        mask = F.pad(x.new_ones((1, 1, *x.shape[2:])), self.pads)
        count = conv(mask, x.new_ones((1, 1, *self.kernel)), stride=self.strides,
                     dilation=self.dilations)
        return total / count


def _same_pads(node: OnnxNode, graph: OnnxGraph, kernel, strides, dilations, mode: str) -> list[int]:
    info = graph.value_info.get(node.input_values[0])
    shape = get_shape_from_value_info(info)[2:] if info is not None else []
    if len(shape) != len(kernel) or not all(shape):
        raise unsupported(node, f"auto_pad={mode} with an unknown input shape")
    begins, ends = [], []
    for size, k, s, d in zip(shape, kernel, strides, dilations):
        total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
        small, large = total // 2, total - total // 2
        begins.append(large if mode == "SAME_LOWER" else small)
        ends.append(small if mode == "SAME_LOWER" else large)
    return begins + ends


def with_explicit_pads(node: OnnxNode, graph: OnnxGraph) -> OnnxNode:
    """``node`` itself, or (auto_pad SAME_UPPER / SAME_LOWER / VALID) a copy whose ``pads`` are
    explicit and whose auto_pad is NOTSET: onnx2torch implements only explicit pads."""
    mode = node.attributes.get("auto_pad", "NOTSET")
    if mode not in ("SAME_UPPER", "SAME_LOWER", "VALID"):
        return node
    kernel = list(node.attributes.get("kernel_shape", []))
    if not kernel and len(node.input_values) > 1 and node.input_values[1] in graph.initializers:
        kernel = list(graph.initializers[node.input_values[1]].to_numpy().shape[2:])
    if not kernel:
        raise unsupported(node, f"auto_pad={mode} without a known kernel shape")
    rank = len(kernel)
    strides = list(node.attributes.get("strides", [1] * rank))
    dilations = list(node.attributes.get("dilations", [1] * rank))
    pads = [0] * 2 * rank if mode == "VALID" else _same_pads(node, graph, kernel, strides, dilations, mode)
    proto = onnx.NodeProto()
    proto.CopyFrom(node.proto)
    kept = [a for a in proto.attribute if a.name not in ("auto_pad", "pads")]
    del proto.attribute[:]
    proto.attribute.extend(kept + [onnx.helper.make_attribute("pads", pads)])
    return OnnxNode(proto, node.unique_name)


def _max_pool(version: int):
    def convert(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
        return registry.lookup_original("MaxPool", version)(with_explicit_pads(node, graph), graph)

    return convert


for _v in (8, 10, 11, 12):
    registry.register("MaxPool", _v)(_max_pool(_v))


def convert_average_pool(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    attrs = node.attributes
    kernel = list(attrs["kernel_shape"])
    rank = len(kernel)
    strides = list(attrs.get("strides", [1] * rank))
    dilations = list(attrs.get("dilations", [1] * rank))
    pads = list(attrs.get("pads", [0] * 2 * rank))
    ceil_mode = bool(attrs.get("ceil_mode", 0))
    include_pad = bool(attrs.get("count_include_pad", 0))
    auto_pad = attrs.get("auto_pad", "NOTSET")
    if rank not in _AVG_POOL:
        raise unsupported(node, f"AveragePool over {rank} spatial dims")
    if auto_pad == "VALID":
        pads = [0] * 2 * rank
    elif auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        pads = _same_pads(node, graph, kernel, strides, dilations, auto_pad)
    symmetric = pads[:rank] == pads[rank:] and all(2 * p <= k for p, k in zip(pads, kernel))
    if all(d == 1 for d in dilations) and symmetric:
        module = _AVG_POOL[rank](kernel, strides, pads[:rank], ceil_mode=ceil_mode,
                                 count_include_pad=include_pad)
    elif not ceil_mode:
        module = PaddedAvgPool(kernel, strides, dilations, pads, include_pad)
    else:
        raise unsupported(node, "AveragePool with ceil_mode=1 and dilations or asymmetric pads")
    return result(module, dynamic_mapping(node, 1))


registry.register("AveragePool", 7, 10, 11, 19)(convert_average_pool)
