"""FoldBatchNormPass: fold inference-form BatchNormalization into the Conv/ConvTranspose/Gemm
that produces its input.

With s = gamma / sqrt(var + eps) per output channel: W' = W * s and b' = (b - mean) * s + beta
(b = 0 when the producer has no bias; a bias initializer is then created). The fold needs the
weight, bias and BN parameters to be constant initializers, and the producer's output to feed
only this BN (not a graph output, not read by a subgraph). A weight or bias initializer that
something else also reads is never modified: the producer gets a new initializer. BNs that
cannot be folded stay, and the debug log says why. How a producer folds the affine into its
weight and bias is its op rule's knowledge (``WeightOpRule.fold_affine``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from .fold_utils import (
    RewriteResult,
    constant_initializers,
    defined_names,
    drop_value_info,
    is_default_domain,
    keep_only,
    unique_name,
    use_counts,
)
from .op_rules import weight_rule
from .passes import Pass

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _ChannelAffine:
    """BN at inference as y = x * scale + shift per channel (float64)."""

    scale: np.ndarray
    shift: np.ndarray


@dataclass
class _FoldContext:
    graph: onnx.GraphProto
    consts: dict[str, onnx.TensorProto]
    uses: dict[str, int]
    taken: set[str]

    def array(self, name: str) -> np.ndarray:
        return numpy_helper.to_array(self.consts[name])

    def set_input(self, node: onnx.NodeProto, index: int, value: np.ndarray, base: str) -> None:
        """Write ``value`` to the node's input ``index``: in place if only this node reads it."""
        old = node.input[index] if index < len(node.input) else ""
        if old and self.uses.get(old, 0) == 1:
            name = old
        else:
            name = unique_name(f"{old or base}_bnfold", self.taken)
        tensor = numpy_helper.from_array(value, name)
        if name in self.consts:
            self.consts[name].CopyFrom(tensor)
        else:
            self.graph.initializer.append(tensor)
            self.consts[name] = self.graph.initializer[-1]
        while len(node.input) <= index:
            node.input.append("")
        node.input[index] = name


class FoldBatchNormPass(Pass):
    """Fold BatchNormalization into the producing Conv (any group), ConvTranspose or Gemm."""

    def run(self, model: onnx.ModelProto) -> RewriteResult:
        graph = model.graph
        ctx = _FoldContext(graph, constant_initializers(model), use_counts(graph),
                           defined_names(graph) | {o.name for o in graph.output})
        producers = {o: n for n in graph.node for o in n.output if o}
        folded: set[int] = set()
        stale: list[str] = []
        for index, bn in enumerate(graph.node):
            if bn.op_type != "BatchNormalization" or not is_default_domain(bn):
                continue
            producer = producers.get(bn.input[0])
            reason = _fold(bn, producer, ctx)
            if reason is not None:
                logger.debug("BatchNormalization %s not folded: %s", bn.name, reason)
                continue
            logger.debug("folded BatchNormalization %s into %s", bn.name, producer.name)
            stale.append(producer.output[0])
            producer.output[0] = bn.output[0]
            producers[bn.output[0]] = producer
            folded.add(index)
        if not folded:
            return RewriteResult(model, False, 0)
        keep_only(graph.node, [i not in folded for i in range(len(graph.node))])
        drop_value_info(graph, stale)
        logger.info("%s: folded %d BatchNormalization nodes", self.name, len(folded))
        return RewriteResult(model, True, len(folded))


def _fold(bn: onnx.NodeProto, producer: onnx.NodeProto | None, ctx: _FoldContext) -> str | None:
    """Fold ``bn`` into ``producer``; None when done, otherwise the reason it was not."""
    affine = _bn_affine(bn, ctx)
    if isinstance(affine, str):
        return affine
    if producer is None or not is_default_domain(producer):
        return "its input is not produced by a default-domain node of the main graph"
    rule = weight_rule(producer)
    if rule is None or not rule.folds_batchnorm:
        return f"producer {producer.name} is a {producer.op_type}, not Conv/ConvTranspose/Gemm"
    if ctx.uses.get(producer.output[0], 0) != 1:
        return f"the output of {producer.name} has other uses (or is a graph output)"
    params = [i for i in producer.input[1:3] if i]
    if not all(p in ctx.consts for p in params):
        return f"weight or bias of {producer.name} is not a constant initializer"
    has_bias = len(producer.input) > 2 and producer.input[2]
    fold = rule.fold_affine(producer, ctx.array(producer.input[1]),
                            ctx.array(producer.input[2]) if has_bias else None, affine.scale, affine.shift)
    if isinstance(fold, str):
        return fold
    ctx.set_input(producer, 1, fold.weight, producer.input[1])
    ctx.set_input(producer, 2, fold.bias, f"{producer.name or producer.output[0]}_bias")
    for name, value in fold.attributes.items():
        _set_attribute(producer, name, value)
    return None


def _bn_affine(bn: onnx.NodeProto, ctx: _FoldContext) -> _ChannelAffine | str:
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in bn.attribute}
    if attrs.get("training_mode", 0) or not attrs.get("spatial", 1):
        return "training mode or non-spatial BatchNormalization"
    if any(o and ctx.uses.get(o, 0) for o in bn.output[1:]):
        return "its running statistics outputs are used"
    if len(bn.input) < 5 or not all(i in ctx.consts for i in bn.input[1:5]):
        return "scale, bias, mean or variance is not a constant initializer"
    gamma, beta, mean, var = (ctx.array(i).astype(np.float64) for i in bn.input[1:5])
    scale = gamma / np.sqrt(var + float(attrs.get("epsilon", 1e-5)))
    return _ChannelAffine(scale, beta - mean * scale)


def _set_attribute(node: onnx.NodeProto, name: str, value: float) -> None:
    kept = [a for a in node.attribute if a.name != name]
    del node.attribute[:]
    node.attribute.extend(kept + [onnx.helper.make_attribute(name, value)])
