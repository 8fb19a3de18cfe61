"""Converters for layers with weights: trainable Gemm/MatMul, bound Conv/LayerNorm, BatchNorm.

BatchNormalization is the densenet121 fix: onnx2torch builds ``nn.BatchNorm*d``, whose output
depends on ``module.training``. The converted GraphModule starts in training mode, so BN used
batch statistics (and overwrote its running stats on every call) while ONNX BatchNormalization
(training_mode=0) always uses the stored statistics. Our module always normalises with the
stored statistics and never updates them; scale and bias stay trainable parameters.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F
from onnx2torch.onnx_graph import OnnxGraph
from onnx2torch.onnx_node import OnnxNode
from onnx2torch.utils.common import OperationConverterResult
from torch import nn
from torch.nn.utils import skip_init

from plugin.bridge import registry
from plugin.bridge.ops_pool import with_explicit_pads
from plugin.bridge._common import (
    ParamBinding,
    attach_bindings,
    const_input,
    dynamic_mapping,
    full_mapping,
    input_name,
    is_initializer,
    result,
    unsupported,
)

logger = logging.getLogger(__name__)


def _binding(module: nn.Module, attr: str, graph: OnnxGraph, name: str, transpose: bool = False):
    onnx_shape = tuple(int(d) for d in graph.initializers[name].proto.dims)  # no data copy
    try:
        tensor = module.get_parameter(attr)
    except AttributeError:
        tensor = module.get_buffer(attr)
    if tensor.numel() != int(np.prod(onnx_shape)):
        raise ValueError(f"{attr} has {tensor.numel()} values, initializer {name!r} {onnx_shape}")
    return ParamBinding(attr=attr, initializer=name, transpose=transpose, onnx_shape=onnx_shape)


# ---------------------------------------------------------------------------- Gemm / MatMul


class ScaledLinear(nn.Linear):
    """Gemm with constant B: ``alpha * op(A) @ W.T + beta * C``; W in nn.Linear layout [N, K]."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, alpha: float,
                 beta: float, trans_a: bool) -> None:
        super().__init__(weight.shape[1], weight.shape[0], bias=False, device="meta")
        self.weight = nn.Parameter(weight.contiguous())
        self.gemm_bias = None if bias is None else nn.Parameter(bias.contiguous())
        self.alpha, self.beta, self.trans_a = alpha, beta, trans_a

    def forward(self, a: torch.Tensor) -> torch.Tensor:  # noqa: D102
        out = F.linear(a.T if self.trans_a else a, self.weight) * self.alpha
        if self.gemm_bias is not None:
            out = out + self.gemm_bias * self.beta
        return out


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """nn.Linear holding ``weight``/``bias`` (no random init first: VGG's fc6 has 100M values)."""
    module = skip_init(nn.Linear, weight.shape[1], weight.shape[0], bias=bias is not None)
    module.weight = nn.Parameter(weight.contiguous())
    if bias is not None:
        module.bias = nn.Parameter(bias.contiguous())
    return module


@registry.register("Gemm", 9, 11, 13)
def convert_gemm(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    b_name, c_name = node.input_values[1], input_name(node, 2)
    if not is_initializer(graph, b_name) or (c_name and not is_initializer(graph, c_name)):
        return registry.lookup_original("Gemm", 13)(node, graph)
    attrs = node.attributes
    alpha, beta = float(attrs.get("alpha", 1.0)), float(attrs.get("beta", 1.0))
    trans_a, trans_b = bool(attrs.get("transA", 0)), bool(attrs.get("transB", 0))
    b = graph.initializers[b_name].to_torch()
    weight = b if trans_b else b.T  # nn.Linear layout [N, K]
    c = None if c_name is None else graph.initializers[c_name].to_torch()
    vector_bias = c is None or (c.numel() == weight.shape[0] and c.dim() <= 2
                                and c.shape[-1:] == weight.shape[:1])
    if alpha == 1.0 and beta == 1.0 and not trans_a and vector_bias:
        module = _linear(weight, None if c is None else c.reshape(-1))
        bias_attr = "bias"
    else:
        module = ScaledLinear(weight, c, alpha, beta, trans_a)
        bias_attr = "gemm_bias"
    bindings = [_binding(module, "weight", graph, b_name, transpose=not trans_b)]
    if c_name is not None:
        bindings.append(_binding(module, bias_attr, graph, c_name))
    return result(attach_bindings(module, bindings), dynamic_mapping(node, 1))


@registry.register("MatMul", 1, 9, 13)
def convert_matmul(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    b_name = node.input_values[1]
    a_const = is_initializer(graph, node.input_values[0])
    if a_const or not is_initializer(graph, b_name) or graph.initializers[b_name].to_numpy().ndim != 2:
        return registry.lookup_original("MatMul", 13)(node, graph)
    module = _linear(graph.initializers[b_name].to_torch().T, None)
    bindings = [_binding(module, "weight", graph, b_name, transpose=True)]
    return result(attach_bindings(module, bindings), dynamic_mapping(node, 1))


# ---------------------------------------------------------------------------- Conv, LayerNorm


def _bound_original(op_type: str, version: int, attrs: dict[int, str]):
    """onnx2torch's converter, plus bindings for the parameters it built from initializers."""

    def convert(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
        if op_type == "Conv":  # auto_pad SAME_* / VALID: explicit pads (onnx2torch has only those)
            node = with_explicit_pads(node, graph)
        converted = registry.lookup_original(op_type, version)(node, graph)
        module = converted.torch_module
        prefix = f"{len(module) - 1}." if isinstance(module, nn.Sequential) else ""
        bindings = []
        for index, attr in attrs.items():
            name = input_name(node, index)
            if is_initializer(graph, name) and hasattr(module, "get_parameter"):
                try:
                    bindings.append(_binding(module, prefix + attr, graph, name))
                except AttributeError:
                    continue
        attach_bindings(module, bindings)
        return converted

    return convert


for _op, _versions in (("Conv", (1, 11)), ("ConvTranspose", (1, 11))):
    for _v in _versions:
        registry.register(_op, _v)(_bound_original(_op, _v, {1: "weight", 2: "bias"}))
registry.register("LayerNormalization", 17)(
    _bound_original("LayerNormalization", 17, {1: "weight", 2: "bias"})
)


# ---------------------------------------------------------------------------- BatchNorm, Dropout


class InferenceBatchNorm(nn.Module):
    """ONNX BatchNormalization (training_mode=0): stored statistics, whatever ``self.training``."""

    def __init__(self, scale: torch.Tensor, bias: torch.Tensor, mean: torch.Tensor,
                 var: torch.Tensor, epsilon: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(scale.clone())
        self.bias = nn.Parameter(bias.clone())
        self.register_buffer("running_mean", mean.clone())
        self.register_buffer("running_var", var.clone())
        self.epsilon = epsilon

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                            training=False, eps=self.epsilon)


class DynamicInferenceBatchNorm(nn.Module):
    """BatchNormalization whose scale/bias/mean/var arrive as tensors (not initializers)."""

    def __init__(self, epsilon: float) -> None:
        super().__init__()
        self.epsilon = epsilon

    def forward(self, x, scale, bias, mean, var):  # noqa: D102
        if mean.requires_grad or var.requires_grad:
            # statistics computed by the graph (tf2onnx writes a LayerNorm as a BatchNormalization
            # fed its own mean/var, magika-v1): F.batch_norm refuses gradients into running stats
            shape = (1, -1) + (1,) * (x.dim() - 2)
            inv = torch.rsqrt(var.reshape(shape) + self.epsilon) * scale.reshape(shape)
            return (x - mean.reshape(shape)) * inv + bias.reshape(shape)
        return F.batch_norm(x, mean, var, scale, bias, training=False, eps=self.epsilon)


_BN_ATTRS = ("weight", "bias", "running_mean", "running_var")


@registry.register("BatchNormalization", 9, 14, 15)
def convert_batch_norm(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    if node.attributes.get("training_mode", 0) != 0 or len(node.output_values) > 1:
        raise unsupported(node, "BatchNormalization in training mode (running-stat outputs)")
    epsilon = float(node.attributes.get("epsilon", 1e-5))
    names = node.input_values[1:5]
    if not all(is_initializer(graph, n) for n in names):
        return result(DynamicInferenceBatchNorm(epsilon), full_mapping(node))
    tensors = [graph.initializers[n].to_torch() for n in names]
    module = InferenceBatchNorm(*tensors, epsilon=epsilon)
    bindings = [
        ParamBinding(attr, name, False, tuple(t.shape)) for attr, name, t in zip(_BN_ATTRS, names, tensors)
    ]
    return result(attach_bindings(module, bindings), dynamic_mapping(node, 1))


class InferenceDropout(nn.Module):
    """ONNX Dropout in inference: identity (and an all-true mask when the mask is used)."""

    def __init__(self, with_mask: bool) -> None:
        super().__init__()
        self.with_mask = with_mask

    def forward(self, x: torch.Tensor):  # noqa: D102
        if self.with_mask:
            return x, torch.ones_like(x, dtype=torch.bool)
        return x


@registry.register("Dropout", 10, 12, 13)
def convert_dropout(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    mode = const_input(node, graph, 2)
    if input_name(node, 2) is not None and (mode is None or bool(mode)):
        raise unsupported(node, "Dropout with training_mode not constant false")
    with_mask = len(node.output_values) > 1 and bool(node.output_values[1])
    return result(InferenceDropout(with_mask), dynamic_mapping(node, 1))


# ---------------------------------------------------------------------------- Gelu


@registry.register("Gelu", 20)
def convert_gelu(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    approximate = node.attributes.get("approximate", "none")
    if approximate not in ("none", "tanh"):
        raise unsupported(node, f"approximate={approximate!r}")
    return result(nn.GELU(approximate=approximate), dynamic_mapping(node, 1))
