"""EliminateDeadNodesPass: drop main-graph nodes and initializers no graph output depends on.

Liveness flows backwards from the graph outputs through node inputs and through the outer-scope
names that a node's subgraphs read. Unused initializers go too, except those that are also graph
inputs (graph inputs never change). value_info entries for names no node produces any more are
stale and removed. Subgraph bodies are left as they are.
"""

from __future__ import annotations

import logging

import onnx

from .fold_utils import RewriteResult, keep_only, node_outer_refs
from .passes import Pass

logger = logging.getLogger(__name__)


class EliminateDeadNodesPass(Pass):
    """Remove dead nodes, unused initializers and stale value_info of the main graph."""

    def run(self, model: onnx.ModelProto) -> RewriteResult:
        graph = model.graph
        live, live_names = _liveness(graph)
        dead_nodes = keep_only(graph.node, live)
        dead_inits = _drop_unused_initializers(graph, live_names)
        stale_infos = _drop_stale_value_info(graph)
        changed = bool(dead_nodes or dead_inits or stale_infos)
        if changed:
            logger.info(
                "%s: removed %d nodes, %d initializers, %d value_info entries",
                self.name, dead_nodes, dead_inits, stale_infos,
            )
        return RewriteResult(model, changed, dead_nodes + dead_inits)


def _liveness(graph: onnx.GraphProto) -> tuple[list[bool], set[str]]:
    """A liveness flag per node and every name the live nodes or the graph outputs read."""
    live_names = {o.name for o in graph.output}
    live = [False] * len(graph.node)
    for index in range(len(graph.node) - 1, -1, -1):
        node = graph.node[index]
        if not any(o in live_names for o in node.output if o):
            logger.debug("dead node %s (%s)", node.name, node.op_type)
            continue
        live[index] = True
        live_names.update(i for i in node.input if i)
        live_names |= node_outer_refs(node)
    return live, live_names


def _drop_unused_initializers(graph: onnx.GraphProto, live_names: set[str]) -> int:
    inputs = {i.name for i in graph.input}
    keep = [t.name in live_names or t.name in inputs for t in graph.initializer]
    return keep_only(graph.initializer, keep)


def _drop_stale_value_info(graph: onnx.GraphProto) -> int:
    produced = {o for n in graph.node for o in n.output if o}
    return keep_only(graph.value_info, [v.name in produced for v in graph.value_info])
