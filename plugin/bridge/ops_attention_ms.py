"""onnxruntime's ``com.microsoft::MultiHeadAttention`` in torch.

Per head, plain scaled dot-product attention: ``softmax(Q K^T * scale + bias_terms) V`` over the
keys, with Q, K, V the [B, S, D] / [B, L, D] / [B, L, Dv] inputs plus the op's projection bias
``[Q | K | V]``, split into ``num_heads`` heads of consecutive channels; the output [B, S, Dv].
``scale`` 0 or absent means ``1 / sqrt(D / num_heads)``. The key padding mask (int, 0 = padded,
[B, L] or [B, S, L]) adds ``mask_filter_value`` (default -10000) where it is 0, as onnxruntime
does; ``attention_bias`` [B or 1, N or 1, S, L] is added to the scores.

Refused in one line: packed QKV / KV or 4-D (BNSH) key/value, a 1-D (sequence lengths) mask,
past/present or the qk output, ``unidirectional`` unless query and key have one known length
(causal self attention: query i sees keys 0..i).
"""

from __future__ import annotations

import math

import torch
from onnx2torch.node_converters.registry import add_converter
from onnx2torch.onnx_graph import OnnxGraph
from onnx2torch.onnx_node import OnnxNode
from onnx2torch.utils.common import OnnxMapping, OperationConverterResult
from torch import nn

from plugin.bridge._common import input_name, result, unsupported

MS = "com.microsoft"


def _dotless_node_names() -> None:
    """onnx2torch names a module ``domain/name`` and replaces dots in the name only, so every
    ``com.microsoft`` node failed ("module name can't contain '.'"): dots in the domain become
    slashes too (ONNX-domain names are unchanged)."""
    original = OnnxGraph.generate_node_name
    if getattr(original, "pq_dotless", False):
        return

    def generate_node_name(node):
        return original(node).replace(".", "/")

    generate_node_name.pq_dotless = True  # type: ignore[attr-defined]
    OnnxGraph.generate_node_name = staticmethod(generate_node_name)


_dotless_node_names()


class MsMultiHeadAttention(nn.Module):
    """``com.microsoft::MultiHeadAttention`` of 3-D query/key/value."""

    def __init__(self, num_heads: int, scale: float, mask_filter_value: float, causal: bool = False) -> None:
        super().__init__()
        self.num_heads, self.scale, self.mask_filter_value = num_heads, scale, mask_filter_value
        self.causal = causal

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        b, s, d = t.shape
        return t.reshape(b, s, self.num_heads, d // self.num_heads).transpose(1, 2)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,  # noqa: D102
                bias: torch.Tensor | None = None, key_padding_mask: torch.Tensor | None = None,
                attention_bias: torch.Tensor | None = None) -> torch.Tensor:
        d, dv = query.shape[-1], value.shape[-1]
        if bias is not None:
            query = query + bias[:d]
            key = key + bias[d:2 * d]
            value = value + bias[2 * d:2 * d + dv]
        q, k, v = self._heads(query), self._heads(key), self._heads(value)
        scale = self.scale if self.scale else 1.0 / math.sqrt(d // self.num_heads)
        scores = torch.matmul(q, k.transpose(-1, -2)) * scale
        if key_padding_mask is not None:
            padded = key_padding_mask == 0
            padded = padded[:, None, None, :] if padded.dim() == 2 else padded[:, None, :, :]
            scores = scores.masked_fill(padded, self.mask_filter_value)
        if attention_bias is not None:
            scores = scores + attention_bias
        if self.causal:  # query i sees keys 0..i (self attention: S == L)
            s, length = scores.shape[-2:]
            future = torch.ones(s, length, dtype=torch.bool, device=scores.device).triu(1)
            scores = scores.masked_fill(future, self.mask_filter_value)
        y = torch.matmul(torch.softmax(scores, dim=-1), v)
        b, _, s, _ = y.shape
        return y.transpose(1, 2).reshape(b, s, dv)


def _rank(graph: OnnxGraph, name: str | None) -> int | None:
    info = graph.value_info.get(name) if name is not None else None
    if info is None or not info.type.tensor_type.HasField("shape"):
        return None
    return len(info.type.tensor_type.shape.dim)


@add_converter(operation_type="MultiHeadAttention", version=1, domain=MS)
def convert_multi_head_attention(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    attrs = node.attributes
    names = [input_name(node, i) for i in range(10)]
    if names[1] is None or names[2] is None:
        raise unsupported(node, "MultiHeadAttention with packed QKV or KV (key/value absent)")
    if any(names[6:]) or any(node.output_values[1:]):
        raise unsupported(node, "MultiHeadAttention with past/present (KV cache) or the qk output")
    causal = bool(int(attrs.get("unidirectional", 0)))
    if causal:
        q_info, k_info = (graph.value_info.get(n) for n in names[:2])
        lengths = [None if i is None or not i.type.tensor_type.HasField("shape") or len(i.type.tensor_type.shape.dim) < 2
                   else i.type.tensor_type.shape.dim[1].dim_value for i in (q_info, k_info)]
        if not lengths[0] or lengths[0] != lengths[1]:
            raise unsupported(node, f"MultiHeadAttention unidirectional=1 with query/key lengths {lengths} "
                                    "(only self attention of known, equal lengths)")
    for index, what in ((0, "query"), (1, "key"), (2, "value")):
        rank = _rank(graph, names[index])
        if rank is not None and rank != 3:
            raise unsupported(node, f"MultiHeadAttention with a {rank}-D {what} (only [B, S, D] is converted)")
    mask_rank = _rank(graph, names[4])
    if names[4] is not None and mask_rank not in (2, 3):
        raise unsupported(node, f"MultiHeadAttention key_padding_mask of rank {mask_rank} (only [B, L] or [B, S, L])")
    module = MsMultiHeadAttention(int(attrs["num_heads"]), float(attrs.get("scale", 0.0)),
                                  float(attrs.get("mask_filter_value", -10000.0)), causal)
    mapping = OnnxMapping(inputs=tuple(n or "" for n in names[:6]), outputs=node.output_values[:1])
    return result(module, mapping)
