"""LRN with the ONNX window for every size (onnx2torch uses ``nn.LocalResponseNorm``).

``nn.LocalResponseNorm`` sums channels ``[c - size // 2, c + (size - 1) // 2]``; ONNX sums
``[c - floor((size - 1) / 2), c + ceil((size - 1) / 2)]``. The two agree for odd sizes only: for
an even size torch's window sits one channel lower. (onnxruntime refuses even sizes today,
but the ONNX reference implementation and other runtimes accept them.)
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from onnx2torch.onnx_graph import OnnxGraph
from onnx2torch.onnx_node import OnnxNode
from onnx2torch.utils.common import OperationConverterResult
from torch import nn

from plugin.bridge import registry
from plugin.bridge._common import dynamic_mapping, result, unsupported

logger = logging.getLogger(__name__)


class OnnxLRN(nn.Module):
    """``x / (bias + alpha / size * square_sum) ** beta`` over a window of channels (axis 1)."""

    def __init__(self, size: int, alpha: float, beta: float, bias: float) -> None:
        super().__init__()
        self.size, self.alpha, self.beta, self.bias = size, alpha, beta, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        before, after = (self.size - 1) // 2, self.size // 2
        squares = (x * x).reshape(x.shape[0], 1, x.shape[1], -1)
        squares = F.pad(squares, (0, 0, before, after))
        mean = F.avg_pool2d(squares, (self.size, 1), stride=1)  # square_sum / size
        return x / (self.bias + self.alpha * mean).pow(self.beta).reshape(x.shape)


@registry.register("LRN", 1, 13)  # 13 adds bfloat16 only
def convert_lrn(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    attrs = node.attributes
    size = int(attrs["size"])
    if size < 1:
        raise unsupported(node, f"LRN size={size}")
    module = OnnxLRN(size, float(attrs.get("alpha", 1e-4)), float(attrs.get("beta", 0.75)),
                     float(attrs.get("bias", 1.0)))
    return result(module, dynamic_mapping(node, 1))
