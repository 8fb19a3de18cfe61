"""FoldConstantsPass: every tensor computable without the model's inputs becomes an initializer.

A node is constant when it is a deterministic default-domain op without subgraphs and all its
inputs are constant: initializers that no feed can override, outputs of other constant nodes,
or, for ``Shape``/``Size``, a tensor whose shape is fully static (from shape inference). The
constant values that the rest of the model reads are computed by onnxruntime from one small
model holding the constant subgraph, run once; ``Constant`` nodes, static shapes and
``Identity`` copies are read directly. ``Identity`` of a constant is an alias, not a copy:
its consumers are rewired to its input, so a weight shared through Identity stays one
initializer. All constant nodes are then removed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from .fold_utils import (
    RewriteResult,
    apply_renames,
    constant_initializers,
    drop_value_info,
    has_subgraph,
    is_default_domain,
    keep_only,
    node_outer_refs,
    resolve,
    static_shapes,
)
from .ort_utils import make_session
from .passes import Pass

logger = logging.getLogger(__name__)

NONDETERMINISTIC_OPS = frozenset(
    {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike",
     "Multinomial", "Bernoulli"}
)
# Ops whose results are sequences or optionals: they cannot become initializers.
NON_TENSOR_OPS = frozenset(
    {"SequenceConstruct", "SequenceEmpty", "SequenceInsert", "SequenceErase", "SequenceAt",
     "SequenceLength", "SplitToSequence", "ConcatFromSequence", "SequenceMap", "Optional",
     "OptionalGetElement", "OptionalHasElement"}
)
_SHAPE_OPS = frozenset({"Shape", "Size"})


@dataclass
class _ConstantPlan:
    """The constant nodes of the main graph, in graph order, and the Identity aliases."""

    nodes: list[onnx.NodeProto] = field(default_factory=list)
    indices: set[int] = field(default_factory=set)
    produced: set[str] = field(default_factory=set)
    aliases: dict[str, str] = field(default_factory=dict)


class FoldConstantsPass(Pass):
    """Turn Constant nodes and constant subgraphs of the main graph into initializers."""

    def run(self, model: onnx.ModelProto) -> RewriteResult:
        graph = model.graph
        inits = constant_initializers(model)
        plan = _find_constant_nodes(graph, set(inits), static_shapes(graph))
        if not plan.nodes:
            return RewriteResult(model, False, 0)
        targets = _needed_values(graph, plan) - set(inits)
        values = _evaluate(model, plan, targets, inits, static_shapes(graph))
        _rewrite(graph, plan, values)
        logger.info(
            "%s: folded %d constant nodes into %d initializers (%d Identity aliases)",
            self.name, len(plan.nodes), len(values), len(plan.aliases),
        )
        return RewriteResult(model, True, len(plan.nodes))


def has_foldable_constants(model: onnx.ModelProto) -> bool:
    """Whether :class:`FoldConstantsPass` would fold anything (cheap: no copy, no run)."""
    graph = model.graph
    return bool(
        _find_constant_nodes(graph, set(constant_initializers(model)), static_shapes(graph)).nodes
    )


def _is_foldable(node: onnx.NodeProto, known: set[str], shapes: dict[str, tuple[int, ...]]) -> bool:
    if not is_default_domain(node) or has_subgraph(node):
        return False
    if node.op_type in NONDETERMINISTIC_OPS or node.op_type in NON_TENSOR_OPS:
        return False
    if node.op_type in _SHAPE_OPS and node.input[0] not in known:
        return node.input[0] in shapes
    return all(i in known for i in node.input if i)


def _find_constant_nodes(
    graph: onnx.GraphProto, known: set[str], shapes: dict[str, tuple[int, ...]]
) -> _ConstantPlan:
    plan = _ConstantPlan()
    graph_outputs = {o.name for o in graph.output}
    for index, node in enumerate(graph.node):
        if not _is_foldable(node, known, shapes):
            continue
        outputs = [o for o in node.output if o]
        plan.nodes.append(node)
        plan.indices.add(index)
        plan.produced.update(outputs)
        known.update(outputs)
        if node.op_type == "Identity" and node.output[0] not in graph_outputs:
            plan.aliases[node.output[0]] = node.input[0]
        logger.debug("constant node %s (%s)", node.name, node.op_type)
    return plan


def _needed_values(graph: onnx.GraphProto, plan: _ConstantPlan) -> set[str]:
    """Constant names read by the rest of the model, after following Identity aliases."""
    used: set[str] = {o.name for o in graph.output}
    for index, node in enumerate(graph.node):
        if index in plan.indices:
            continue
        used.update(i for i in node.input if i)
        used |= node_outer_refs(node)
    return {resolve(plan.aliases, n) for n in used if n in plan.produced}


def _direct_value(
    node: onnx.NodeProto,
    inits: dict[str, onnx.TensorProto],
    shapes: dict[str, tuple[int, ...]],
) -> onnx.TensorProto | None:
    """The single output's value when it can be read without running anything."""
    if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
        tensor = onnx.TensorProto()
        tensor.CopyFrom(node.attribute[0].t)
        return tensor
    if node.op_type == "Identity" and node.input[0] in inits:
        tensor = onnx.TensorProto()
        tensor.CopyFrom(inits[node.input[0]])
        return tensor
    if node.op_type in _SHAPE_OPS and node.input[0] in shapes and node.input[0] not in inits:
        shape = shapes[node.input[0]]
        if node.op_type == "Size":
            return numpy_helper.from_array(np.array(int(np.prod(shape)), dtype=np.int64))
        attrs = {a.name: a.i for a in node.attribute}
        start, end = attrs.get("start", 0), attrs.get("end", len(shape))
        return numpy_helper.from_array(np.array(shape[start:end], dtype=np.int64))
    return None


def _evaluate(
    model: onnx.ModelProto,
    plan: _ConstantPlan,
    targets: set[str],
    inits: dict[str, onnx.TensorProto],
    shapes: dict[str, tuple[int, ...]],
) -> dict[str, onnx.TensorProto]:
    """Values of ``targets``: read directly where possible, the rest from one ORT run."""
    values: dict[str, onnx.TensorProto] = {}
    required = set(targets)
    ort_nodes: list[onnx.NodeProto] = []
    for node in reversed(plan.nodes):
        if not any(o in required for o in node.output):
            continue
        direct = _direct_value(node, inits, shapes)
        if direct is not None:
            values[node.output[0]] = direct
        else:
            ort_nodes.append(node)
            required.update(i for i in node.input if i)
    ort_nodes.reverse()
    values.update(_run_ort(model, ort_nodes, targets, inits, values))
    result = {}
    for name in targets:
        tensor = values[name]
        tensor.name = name
        result[name] = tensor
    return result


def _run_ort(
    model: onnx.ModelProto,
    nodes: list[onnx.NodeProto],
    targets: set[str],
    inits: dict[str, onnx.TensorProto],
    known: dict[str, onnx.TensorProto],
) -> dict[str, onnx.TensorProto]:
    if not nodes:
        return {}
    produced = {o for n in nodes for o in n.output if o}
    outputs = sorted(t for t in targets if t in produced)
    inputs = {i for n in nodes for i in n.input if i} - produced
    feeds_as_inits = []
    for name in sorted(inputs):
        tensor = onnx.TensorProto()
        tensor.CopyFrom(inits[name] if name in inits else known[name])
        tensor.name = name
        feeds_as_inits.append(tensor)
    graph = onnx.helper.make_graph(
        nodes, "constant_subgraph", [],
        [onnx.helper.make_value_info(o, onnx.TypeProto()) for o in outputs],
        initializer=feeds_as_inits,
    )
    sub = onnx.helper.make_model(
        graph, opset_imports=list(model.opset_import), ir_version=max(model.ir_version, 4)
    )
    logger.debug("onnxruntime evaluates %d constant nodes for %d values", len(nodes), len(outputs))
    arrays = make_session(sub).run(outputs, {})
    return {
        name: numpy_helper.from_array(np.asarray(arr), name) for name, arr in zip(outputs, arrays)
    }


def _rewrite(
    graph: onnx.GraphProto, plan: _ConstantPlan, values: dict[str, onnx.TensorProto]
) -> None:
    keep_only(graph.node, [i not in plan.indices for i in range(len(graph.node))])
    apply_renames(graph, plan.aliases)
    graph.initializer.extend(values[name] for name in sorted(values))
    drop_value_info(graph, plan.produced)


class FoldIfPass(Pass):
    """Inline every main-graph ``If`` whose condition is a constant (a folded comparison, or an
    input the user pinned with ``--input-value``): the taken branch's nodes and initializers
    replace the ``If`` (its local names made unique), so the weights inside become ordinary
    weight layers. An ``If`` on a run-time condition is left alone."""

    def run(self, model: onnx.ModelProto) -> RewriteResult:
        graph = model.graph
        inits = constant_initializers(model)
        folded = 0
        while True:
            index = next((i for i, n in enumerate(graph.node) if _constant_condition(n, inits) is not None), None)
            if index is None:
                break
            node = graph.node[index]
            branch_name = "then_branch" if _constant_condition(node, inits) else "else_branch"
            branch = next(a.g for a in node.attribute if a.name == branch_name)
            replacement, new_inits = _inline(graph, node, branch)
            nodes = list(graph.node)
            del graph.node[:]
            graph.node.extend(nodes[:index] + replacement + nodes[index + 1:])
            graph.initializer.extend(new_inits)
            inits.update({t.name: t for t in new_inits})
            logger.info("%s: If %r has a constant condition: inlined its %s (%d nodes)", self.name, node.name,
                        branch_name, len(replacement))
            folded += 1
        return RewriteResult(model, bool(folded), folded)


def _constant_condition(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> bool | None:
    if node.op_type != "If" or not is_default_domain(node) or not node.input or node.input[0] not in inits:
        return None
    value = numpy_helper.to_array(inits[node.input[0]])
    if value.size != 1:
        return None
    return bool(value.reshape(-1)[0])


def _graph_names(graph: onnx.GraphProto) -> set[str]:
    names = {i.name for i in graph.input} | {o.name for o in graph.output} | {t.name for t in graph.initializer}
    for node in graph.node:
        names.update(node.input)
        names.update(node.output)
        names.add(node.name)
        for sub in (a.g for a in node.attribute if a.type == onnx.AttributeProto.GRAPH):
            names |= _graph_names(sub)
        for subs in (a.graphs for a in node.attribute if a.type == onnx.AttributeProto.GRAPHS):
            for sub in subs:
                names |= _graph_names(sub)
    return names


def _inline(graph: onnx.GraphProto, node: onnx.NodeProto, branch: onnx.GraphProto
            ) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    from .fold_utils import unique_name

    work = onnx.GraphProto()
    work.CopyFrom(branch)
    taken = _graph_names(graph) | _graph_names(work)
    produced = {o for n in work.node for o in n.output if o}
    local = produced | {t.name for t in work.initializer}
    mapping: dict[str, str] = {}
    outputs_done: set[str] = set()
    extra: list[onnx.NodeProto] = []
    for bo, io in zip(work.output, node.output):
        if bo.name in produced and bo.name not in mapping and io:
            mapping[bo.name] = io
            outputs_done.add(io)
    for name in sorted(local):
        if name not in mapping:
            mapping[name] = unique_name(f"{node.name}/{name}", taken)
            taken.add(mapping[name])
    apply_renames(work, mapping, top=True)
    for bo, io in zip(work.output, node.output):
        if io and io not in outputs_done:
            extra.append(onnx.helper.make_node("Identity", [mapping.get(bo.name, bo.name)], [io],
                                               name=unique_name(f"{node.name}/out", taken)))
            taken.add(extra[-1].name)
    for inner in work.node:
        inner.name = unique_name(f"{node.name}/{inner.name or inner.op_type}", taken)
        taken.add(inner.name)
    new_inits = []
    for tensor in work.initializer:
        tensor.name = mapping[tensor.name]
        new_inits.append(tensor)
    return list(work.node) + extra, new_inits
