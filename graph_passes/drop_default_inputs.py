"""DropDefaultInputsPass: drop optional inputs whose constant value is what the op assumes
when the input is absent (asked of the op's rule, :meth:`WeightOpRule.default_inputs`).

The case it exists for: torch exports a recurrent layer's zero initial state as
``ConstantOfShape(Concat(1, Shape(x)[1], H))``; once the batch is pinned for analysis it folds
into a ``[1, 1, H]`` zero initializer, which bakes a batch of 1 into the graph (onnxruntime then
refuses any other batch, and the export keeps a static batch). An absent initial state *is*
zero, so dropping the input changes nothing and keeps the batch dynamic.
"""

from __future__ import annotations

import logging

import onnx
from onnx import numpy_helper

from .fold_utils import RewriteResult, constant_initializers, is_default_domain
from .op_rules import weight_rule
from .passes import Pass

logger = logging.getLogger(__name__)


class DropDefaultInputsPass(Pass):
    """Replace optional inputs equal to their default by empty names (trailing ones removed)."""

    def run(self, model: onnx.ModelProto) -> RewriteResult:
        consts = constant_initializers(model)
        dropped = 0
        for node in model.graph.node:
            rule = weight_rule(node) if is_default_domain(node) else None
            if rule is None:
                continue
            values = {i: numpy_helper.to_array(consts[name]) for i, name in enumerate(node.input)
                      if name in consts}
            for index in rule.default_inputs(node, values):
                logger.debug("%s: input %d (%s) equals its default; dropped", node.name, index, node.input[index])
                node.input[index] = ""
                dropped += 1
            while node.input and not node.input[-1]:
                del node.input[len(node.input) - 1]
        return RewriteResult(model, bool(dropped), dropped)
