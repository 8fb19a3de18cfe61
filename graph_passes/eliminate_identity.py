"""EliminateIdentityPass: remove pass-through nodes (Identity, inference-form Dropout).

Consumers of the node's output are rewired to its input, in the main graph and in every
subgraph that reads the output from the outer scope. Graph input and output names never
change: when the output is a graph output, the *producer* of the input is renamed to write
the graph output directly; when the input is a graph input, an initializer or another graph
output, the node stays as an Identity (the only way to give one value two names).
"""

from __future__ import annotations

import logging

import onnx

from .fold_utils import (
    RewriteResult,
    apply_renames,
    constant_initializers,
    drop_value_info,
    is_default_domain,
    keep_only,
    resolve,
    use_counts,
)
from .passes import Pass

logger = logging.getLogger(__name__)


class EliminateIdentityPass(Pass):
    """Remove Identity nodes and Dropout nodes that are identities at inference."""

    def run(self, model: onnx.ModelProto) -> RewriteResult:
        graph = model.graph
        consts = constant_initializers(model)
        uses = use_counts(graph)
        graph_outputs = {o.name for o in graph.output}
        pinned = graph_outputs | {i.name for i in graph.input} | {t.name for t in graph.initializer}
        renames: dict[str, str] = {}
        rewritten = 0
        keep = [True] * len(graph.node)
        for index, node in enumerate(graph.node):
            src = _passthrough_source(node, uses, consts)
            if src is None:
                continue
            src, out = resolve(renames, src), node.output[0]
            if out not in graph_outputs:
                renames[out] = src
            elif src not in pinned:
                renames[src] = out  # the producer now writes the graph output itself
            else:
                rewritten += _make_identity(node, src)
                continue
            keep[index] = False
            logger.debug("removing %s (%s): %s -> %s", node.name, node.op_type, out, src)
        removed = keep_only(graph.node, keep)
        if not removed and not rewritten:
            return RewriteResult(model, False, 0)
        apply_renames(graph, renames)
        drop_value_info(graph, renames)
        logger.info("%s: removed %d pass-through nodes, %d Dropout -> Identity",
                    self.name, removed, rewritten)
        return RewriteResult(model, True, removed + rewritten)


def _make_identity(node: onnx.NodeProto, src: str) -> int:
    """Turn a pass-through node that must stay into ``Identity(src)``; 1 if it changed."""
    if node.op_type == "Identity" and node.input[0] == src:
        return 0
    out = node.output[0]
    del node.input[:], node.output[:], node.attribute[:]
    node.input.append(src)
    node.output.append(out)
    node.op_type = "Identity"
    return 1


def _passthrough_source(
    node: onnx.NodeProto, uses: dict[str, int], consts: dict[str, onnx.TensorProto]
) -> str | None:
    """The input a node merely forwards, or None when it does something."""
    if not is_default_domain(node) or not node.input or not node.input[0]:
        return None
    if not node.output or not node.output[0]:
        return None
    if node.op_type == "Identity":
        return node.input[0]
    if node.op_type == "Dropout" and _is_inference_dropout(node, uses, consts):
        return node.input[0]
    return None


def _is_inference_dropout(
    node: onnx.NodeProto, uses: dict[str, int], consts: dict[str, onnx.TensorProto]
) -> bool:
    """Dropout forwards its input when its mask is unused and training mode is off."""
    if len(node.output) > 1 and node.output[1] and uses.get(node.output[1], 0):
        return False
    if len(node.input) > 2 and node.input[2]:  # training_mode input (opset 12+)
        flag = consts.get(node.input[2])
        if flag is None or bool(onnx.numpy_helper.to_array(flag).any()):
            return False
    return True
