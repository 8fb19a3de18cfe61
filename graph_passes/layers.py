"""Weight layers and activation sites of a model, with shapes, MACs and parameter counts.

What a weight layer is (channel axes, C_in / C_out, MACs, the kind and shape cost models see)
comes from its op's rule (:class:`graph_passes.op_rules.WeightOpRule`); nothing here switches on
weight op types. So do activation x activation products (Q K^T, attention x V: both operands are
activation sites) and embedding tables (:meth:`OpRule.activation_product`,
:meth:`OpRule.embedding_table`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import onnx

from .graph import DEFAULT_DOMAINS, ModelGraph
from .op_rules import find_rule, weight_rule

logger = logging.getLogger(__name__)

# Producers whose output is never negative: an activation quantizer after them can be unsigned.
_NON_NEGATIVE_OPS = {"Relu", "Sigmoid", "HardSigmoid", "Softmax", "Abs", "Exp", "Softplus"}
_VALUE_PRESERVING_OPS = {
    "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "Flatten", "Reshape",
    "Squeeze", "Unsqueeze", "Transpose", "Identity", "Dropout", "Resize", "Upsample", "Slice",
    "Split", "Gather", "Expand",
}


@dataclass
class WeightLayer:
    """A weight op (Conv/ConvTranspose/Gemm/MatMul) whose weight is a constant initializer.

    Computed by the op's rule, so consumers never look at ``op_type`` (kept for reports):

    * ``weight_out_axis`` / ``weight_in_axis``: the axis of the weight initializer holding the
      output / input channels (Conv 0/1, ConvTranspose 1/0, Gemm transB=1 0/1, Gemm transB=0
      and MatMul 1/0);
    * ``cost_kind``: ``"conv"``, ``"depthwise"`` (a Conv with ``groups > 1`` and
      ``groups == in_channels``), ``"linear"`` (Gemm, MatMul) or ``"recurrent"`` (LSTM, GRU,
      RNN: ``weight`` is W, ``bias`` B, ``params`` counts W, R, B and P), as ``cost_models``
      names them;
    * ``cost_kernel`` / ``cost_spatial``: per sample, two ints each: the kernel, and the output
      spatial size (ConvTranspose: the *input*'s; linear: ``(1, positions)``, the positions
      being the product of the output dims between batch and channels, 1 for rank 2);
    * ``macs`` counts one forward pass at the model's static shapes (the batch included);
    * ``weight_owner``: for a layer reading the same weight initializer as an earlier layer (a
      reused kernel, tied weights; ``graph_passes.untie``), that layer's name, else None. Such a
      *follower* costs MACs but stores no weight: its ``params`` leave the shared weight out.
    """

    name: str
    op_type: str
    input: str
    output: str
    weight: str
    bias: str | None
    weight_shape: list[int]
    in_channels: int
    out_channels: int
    kernel: list[int]
    groups: int
    macs: int
    params: int
    weight_out_axis: int
    weight_in_axis: int
    cost_kind: str
    cost_kernel: tuple[int, int]
    cost_spatial: tuple[int, int]
    output_groups: list[str] = field(default_factory=list)
    input_groups: list[str] = field(default_factory=list)
    prunable_out_channels: int = 0
    weight_owner: str | None = None

    @property
    def is_depthwise(self) -> bool:
        return self.cost_kind == "depthwise"

    @property
    def is_conv(self) -> bool:
        """A convolution (Conv, grouped or depthwise, or ConvTranspose), not a linear or
        recurrent layer."""
        return self.cost_kind in ("conv", "depthwise")


@dataclass
class ActivationProduct:
    """An activation x activation MatMul (Q K^T, attention x V), from its op rule's
    :class:`~graph_passes.op_rules.ProductFacts`: operands ``a`` [.., m, k] and ``b`` [.., k, n],
    ``batch`` the batched dims after the first. Both operands are activation sites."""

    name: str
    a: str
    b: str
    output: str
    batch: tuple[int, ...]
    m: int
    k: int
    n: int
    macs: int  # per sample


@dataclass
class EmbeddingTable:
    """A Gather of rows of a constant float table (an embedding), quantized per row."""

    name: str
    table: str
    rows: int
    dim: int


@dataclass
class ActivationSite:
    """A tensor read by one or more weight layers or activation products: where activation
    quantizers go (``consumers``: their node names)."""

    tensor: str
    consumers: list[str]
    shape: list[int] | None
    non_negative: bool


def describe_weight_layer(name: str, node: onnx.NodeProto, graph: ModelGraph) -> WeightLayer | None:
    """Shapes, MACs (one forward pass at the model's static input shapes) and parameters;
    None when ``node`` is not a weight op of the default domain with a constant weight."""
    rule = weight_rule(node, graph.opset) if node.domain in DEFAULT_DOMAINS else None
    facts = rule.describe(node, graph) if rule is not None else None
    if facts is None:
        return None
    w = graph.constant(node.input[1])
    b = facts.bias_input
    bias = node.input[b] if b is not None and len(node.input) > b and node.input[b] else None
    bias_value = graph.constant(bias) if bias else None
    params = int(w.size) + (int(bias_value.size) if bias_value is not None else 0) + int(facts.extra_params)
    return WeightLayer(
        name=name, op_type=node.op_type, input=node.input[0], output=facts.output or node.output[0],
        weight=node.input[1], bias=bias, weight_shape=list(w.shape), in_channels=facts.in_channels,
        out_channels=facts.out_channels, kernel=list(facts.kernel), groups=facts.groups,
        macs=int(facts.macs), params=params, weight_out_axis=facts.weight_out_axis,
        weight_in_axis=facts.weight_in_axis, cost_kind=facts.cost_kind,
        cost_kernel=facts.cost_kernel, cost_spatial=facts.cost_spatial,
    )


def is_non_negative(tensor: str, graph: ModelGraph, depth: int = 0) -> bool:
    """True when the tensor provably never holds negative values (Relu and friends upstream)."""
    producer = graph.producer.get(tensor)
    if producer is None or depth > 32:
        return False
    node = graph.nodes[producer]
    if node.op_type in _NON_NEGATIVE_OPS:
        return True
    if node.op_type == "Clip":
        lo = graph.attr(node, "min")
        if lo is None and len(node.input) > 1 and node.input[1]:
            lo = graph.constant(node.input[1])
        return lo is not None and float(np.asarray(lo)) >= 0.0
    if node.op_type in _VALUE_PRESERVING_OPS:
        return is_non_negative(node.input[0], graph, depth + 1)
    if node.op_type in ("Concat", "Max"):
        data = [t for t in node.input if t and graph.constant(t) is None]
        return bool(data) and all(is_non_negative(t, graph, depth + 1) for t in data)
    return False


def _rule(node: onnx.NodeProto, graph: ModelGraph):
    return find_rule(node.domain, node.op_type, graph.opset) if node.domain in DEFAULT_DOMAINS else None


def activation_products(graph: ModelGraph) -> list[ActivationProduct]:
    """The activation x activation products of the graph, in node order (asked of the op rules)."""
    out = []
    for name, node in graph.nodes.items():
        rule = _rule(node, graph)
        facts = rule.activation_product(node, graph) if rule is not None else None
        if facts is None:
            continue
        a, b = (node.input[i] for i in facts.operands)
        out.append(ActivationProduct(name, a, b, node.output[0], facts.batch, facts.m, facts.k, facts.n,
                                     facts.macs))
    return out


def embedding_tables(graph: ModelGraph) -> list[EmbeddingTable]:
    """The embedding look-ups of the graph (asked of the op rules). A table read by any other
    node as well (a tied output projection, a second look-up) is left as it is."""
    out = []
    for name, node in graph.nodes.items():
        rule = _rule(node, graph)
        facts = rule.embedding_table(node, graph) if rule is not None else None
        if facts is None:
            continue
        readers = graph.consumers.get(facts.table, [])
        if readers != [name] or facts.table in graph.graph_outputs:
            logger.debug("embedding %s: table %s is shared (%s); not quantized", name, facts.table, readers)
            continue
        out.append(EmbeddingTable(name, facts.table, facts.rows, facts.dim))
    return out


def activation_sites(layers: list[WeightLayer], graph: ModelGraph) -> list[ActivationSite]:
    """The weight layers' inputs, then both operands of every activation product."""
    sites: dict[str, ActivationSite] = {}

    def add(tensor: str, consumer: str) -> None:
        site = sites.get(tensor)
        if site is None:
            site = ActivationSite(tensor=tensor, consumers=[], shape=graph.shape(tensor),
                                  non_negative=is_non_negative(tensor, graph))
            sites[tensor] = site
        if consumer not in site.consumers:
            site.consumers.append(consumer)

    for layer in layers:
        add(layer.input, layer.name)
    for product in activation_products(graph):
        add(product.a, product.name)
        add(product.b, product.name)
    return list(sites.values())
