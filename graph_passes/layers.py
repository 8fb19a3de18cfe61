"""Weight layers and activation sites of a model, with shapes, MACs and parameter counts."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from .graph import ModelGraph

WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")

# Producers whose output is never negative: an activation quantizer after them can be unsigned.
_NON_NEGATIVE_OPS = {"Relu", "Sigmoid", "HardSigmoid", "Softmax", "Abs", "Exp", "Softplus"}
_VALUE_PRESERVING_OPS = {
    "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "Flatten", "Reshape",
    "Squeeze", "Unsqueeze", "Transpose", "Identity", "Dropout", "Resize", "Upsample", "Slice",
    "Split", "Gather", "Expand",
}


@dataclass
class WeightLayer:
    """A Conv/ConvTranspose/Gemm/MatMul whose weight is a constant initializer."""

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
    output_groups: list[str] = field(default_factory=list)
    input_groups: list[str] = field(default_factory=list)
    prunable_out_channels: int = 0

    @property
    def is_depthwise(self) -> bool:
        return self.op_type == "Conv" and self.groups > 1 and self.groups == self.in_channels


@dataclass
class ActivationSite:
    """A tensor read by one or more weight layers: where activation quantizers go."""

    tensor: str
    consumers: list[str]
    shape: list[int] | None
    non_negative: bool


def _numel(shape: list[int] | None) -> int:
    return int(np.prod(shape)) if shape else 0


def describe_weight_layer(name: str, node: onnx.NodeProto, graph: ModelGraph) -> WeightLayer | None:
    """Shapes, MACs (one forward pass at the model's static input shapes) and parameters."""
    w = graph.constant(node.input[1]) if len(node.input) > 1 else None
    if node.op_type not in WEIGHT_OPS or w is None:
        return None
    if node.op_type == "MatMul" and w.ndim != 2:
        return None
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    out_shape = graph.shape(node.output[0])
    groups, kernel = int(graph.attr(node, "group", 1)), list(w.shape[2:])
    if node.op_type == "Conv":
        cin, cout = w.shape[1] * groups, w.shape[0]
        macs = _numel(out_shape) * w.shape[1] * int(np.prod(kernel))
    elif node.op_type == "ConvTranspose":
        cin, cout = w.shape[0], w.shape[1] * groups
        macs = _numel(graph.shape(node.input[0])) * w.shape[1] * int(np.prod(kernel))
    elif node.op_type == "Gemm" and int(graph.attr(node, "transB", 0)):
        cout, cin = w.shape
        macs = _numel(out_shape) * cin
    else:  # Gemm without transB, MatMul: W is [K, N]
        cin, cout = w.shape
        macs = _numel(out_shape) * cin
    params = int(w.size) + (int(graph.constant(bias).size) if bias and graph.constant(bias) is not None else 0)
    return WeightLayer(
        name=name, op_type=node.op_type, input=node.input[0], output=node.output[0],
        weight=node.input[1], bias=bias, weight_shape=list(w.shape), in_channels=int(cin),
        out_channels=int(cout), kernel=kernel, groups=groups, macs=int(macs), params=params,
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


def activation_sites(layers: list[WeightLayer], graph: ModelGraph) -> list[ActivationSite]:
    sites: dict[str, ActivationSite] = {}
    for layer in layers:
        site = sites.get(layer.input)
        if site is None:
            site = ActivationSite(
                tensor=layer.input, consumers=[], shape=graph.shape(layer.input),
                non_negative=is_non_negative(layer.input, graph),
            )
            sites[layer.input] = site
        site.consumers.append(layer.name)
    return list(sites.values())
