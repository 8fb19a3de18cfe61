"""Models prunequant cannot find weights in: already-quantized models, and weights that sit
inside control flow. Both used to analyse to "0 weight layers" and exit 0.

* :func:`refuse_quantized`: a model quantized by onnxruntime (dynamic: ``DynamicQuantizeLinear``
  + ``ConvInteger`` / ``MatMulInteger``; QOperator: ``QLinearConv``...; contrib ops such as
  ``DynamicQuantizeLSTM``) keeps its weights as integers behind integer ops, which no rule and
  no bridge converter reads. Normalising back to float is not implemented yet: such a model is
  refused in one line naming the ops, and the user is asked for the float model. (A static QDQ
  model whose weights are ``DequantizeLinear`` of constants is not refused: constant folding
  turns those weights back into float initializers.)
* :func:`require_weight_layers`: when the analysis finds no weight layer but the model holds
  float weights, say where they are (inside ``If`` / ``Loop`` / ``Scan`` bodies, or read by ops
  without a rule) in one line, instead of reporting an empty analysis.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from typing import Iterator

import onnx

from .errors import UnsupportedModelError
from .fold_utils import subgraphs

logger = logging.getLogger(__name__)

#: ops that compute on quantized integers (onnxruntime's quantizer writes them)
QUANTIZED_OPS = frozenset({
    "DynamicQuantizeLinear", "ConvInteger", "MatMulInteger", "QLinearConv", "QLinearMatMul",
    "QLinearAdd", "QLinearMul", "QLinearAveragePool", "QLinearGlobalAveragePool", "QLinearConcat",
    "QLinearLeakyRelu", "QLinearSigmoid", "QLinearSoftmax", "QGemm", "QAttention", "QEmbedLayerNormalization",
    "DynamicQuantizeLSTM", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QOrderedMatMul",
})
#: a float initializer at least this large (and at least 2-D) counts as a weight
MIN_WEIGHT_ELEMENTS = 64
_FLOATS = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}
_CONTROL_FLOW = {"If", "Loop", "Scan"}


def _nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    for node in graph.node:
        yield node
        for sub in subgraphs(node):
            yield from _nodes(sub)


def quantized_ops(model: onnx.ModelProto) -> Counter[str]:
    return Counter(n.op_type for n in _nodes(model.graph) if n.op_type in QUANTIZED_OPS)


def refuse_quantized(model: onnx.ModelProto) -> None:
    """Raise UnsupportedModelError naming the quantized ops when the model has any."""
    ops = quantized_ops(model)
    if not ops:
        return
    listed = ", ".join(f"{n} {op}" for op, n in ops.most_common())
    raise UnsupportedModelError(
        f"the model is already quantized ({listed}): its weights are integers behind integer ops, which "
        "prunequant cannot prune or re-quantize yet; give it the float model this one was quantized from")


def _is_weight(tensor: onnx.TensorProto) -> bool:
    return tensor.data_type in _FLOATS and len(tensor.dims) >= 2 and math.prod(tensor.dims) >= MIN_WEIGHT_ELEMENTS


def _subgraph_weights(graph: onnx.GraphProto) -> tuple[int, int]:
    count = params = 0
    for sub_node in _nodes(graph):
        for attr_graph in subgraphs(sub_node):
            for tensor in attr_graph.initializer:
                if _is_weight(tensor):
                    count += 1
                    params += math.prod(tensor.dims)
            for node in attr_graph.node:
                if node.op_type == "Constant":
                    for attr in node.attribute:
                        if attr.name == "value" and _is_weight(attr.t):
                            count += 1
                            params += math.prod(attr.t.dims)
    return count, params


def require_weight_layers(model: onnx.ModelProto, n_layers: int) -> None:
    """One line when the analysis found no weight layer in a model that has weights."""
    if n_layers:
        count, params = _subgraph_weights(model.graph)
        if count:
            logger.warning("%d weight tensors (%d parameters) sit inside control flow and are not compressed",
                           count, params)
        return
    count, params = _subgraph_weights(model.graph)
    if count:
        flow = Counter(n.op_type for n in model.graph.node if n.op_type in _CONTROL_FLOW)
        where = ", ".join(f"{k} {op}" for op, k in flow.items()) or "control flow"
        raise UnsupportedModelError(
            f"no weight layer outside control flow: {count} weight tensors ({params:,} parameters) sit inside "
            f"{where} bodies, which prunequant does not analyse; pin the inputs the condition depends on with "
            "--input-value NAME=V (a constant condition is folded), or export the model without control flow")
    weights = {t.name: math.prod(t.dims) for t in model.graph.initializer if _is_weight(t)}
    if not weights:
        return  # a model without weights (a feature extractor of fixed ops): nothing to compress, said by inspect
    readers: Counter[str] = Counter()
    for node in model.graph.node:
        if any(name in weights for name in node.input):
            readers[node.op_type] += 1
    listed = ", ".join(f"{op} ({n} node{'s' if n > 1 else ''})" for op, n in readers.most_common(4))
    raise UnsupportedModelError(
        f"no weight layer found: the model's {len(weights)} weight tensors ({sum(weights.values()):,} parameters) "
        f"are read by {listed or 'no node'}, which prunequant has no layer rule for; it cannot compress this model")


__all__ = ["QUANTIZED_OPS", "quantized_ops", "refuse_quantized", "require_weight_layers"]
