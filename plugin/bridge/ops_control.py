"""Control flow: If and Loop, run eagerly (torch evaluates the condition, then runs one branch).

Each subgraph (an If branch, a Loop body) becomes a model of its own and goes through the
bridge's :func:`~plugin.bridge.convert.convert` (so its ops get our converters and the same
coverage check). Names the subgraph reads from the enclosing scope become inputs of that model
and of the If/Loop module, except initializers that no node of the enclosing graph reads
itself: those are copied into the subgraph's model as its constants.

Weights inside control flow are *frozen*: every parameter of a subgraph's module becomes a
buffer, so training never moves a value that the export (which rewrites only the main graph's
initializers) would not carry. The analysis (``graph_passes``) sees only the main graph; a
layer inside a branch is neither pruned nor quantized, and the exported branch keeps its float
weights. Values the enclosing graph passes in (its activations, its shared initializers) are
live tensors, so a trained main-graph parameter read by a branch is read as trained.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import onnx
import torch
from onnx import helper
from onnx2torch.onnx_graph import OnnxGraph
from onnx2torch.onnx_node import OnnxNode
from onnx2torch.utils.common import OnnxMapping, OperationConverterResult
from torch import fx, nn

from graph_passes.errors import ConversionError, DataError
from graph_passes.graph import subgraph_references
from plugin.bridge import registry
from plugin.bridge._common import input_name, node_label, result

logger = logging.getLogger(__name__)

_OUT = "pq_subgraph_out_"


# ---------------------------------------------------------------------------- subgraphs


def _outer_references(graph: onnx.GraphProto) -> set[str]:
    """Names ``graph`` (and its nested subgraphs) reads from the enclosing scope."""
    holder = onnx.NodeProto()
    holder.attribute.add().CopyFrom(helper.make_attribute("g", graph))
    return subgraph_references(holder)


def _typed(graph: OnnxGraph) -> dict[str, onnx.ValueInfoProto]:
    """Every value of the enclosing graph whose type is known (inputs, value_info, outputs)."""
    proto = graph.proto
    known = {v.name: v for v in list(proto.input) + list(proto.value_info) + list(proto.output)}
    for init in proto.initializer:
        known.setdefault(init.name, helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    return known


def _main_reads(graph: OnnxGraph) -> set[str]:
    return {i for n in graph.proto.node for i in n.input if i}


class Subgraph:
    """One subgraph converted to torch, with the enclosing-scope names it takes as inputs."""

    def __init__(self, node: OnnxNode, graph: OnnxGraph, attr: str, formal: Sequence[str] = ()) -> None:
        from plugin.bridge import catalog
        from plugin.bridge.convert import convert

        body = node.attributes.get(attr)
        if not isinstance(body, onnx.AttributeProto) or not body.HasField("g"):
            raise ConversionError(f"node {node_label(node)}: attribute {attr!r} is not a graph")
        sub = body.g
        typed, reads = _typed(graph), _main_reads(graph)
        inits = {init.name: init for init in graph.proto.initializer}
        outer = sorted(_outer_references(sub) - set(formal))
        copied = [name for name in outer if name in inits and name not in reads]
        self.outer = [name for name in outer if name not in copied]
        inputs: list[onnx.ValueInfoProto] = []
        formal_info = {v.name: v for v in sub.input}
        for name in list(formal) + self.outer:
            info = formal_info.get(name) or typed.get(name)
            inputs.append(info if info is not None else onnx.ValueInfoProto(name=name))
        # A returned name the subgraph only passes through (a Loop's carried weights, an If
        # branch returning an enclosing value) is handed back by SubgraphModule as it came in:
        # no node, no copy per step. Only names the subgraph computes are the model's outputs.
        produced = {o for n in sub.node for o in n.output if o}
        arg_names = list(formal) + self.outer
        nodes, outputs = list(sub.node), []
        spec: list[tuple[bool, int]] = []
        position: dict[str, int] = {}
        for index, out in enumerate(sub.output):
            name = out.name
            if name not in produced and name in arg_names:
                spec.append((True, arg_names.index(name)))
                continue
            if name not in produced:  # one of its constants: an Identity makes it a node output
                nodes.append(helper.make_node("Identity", [name], [f"{_OUT}{index}"], name=f"{_OUT}{index}"))
                name = f"{_OUT}{index}"
            if name not in position:
                position[name] = len(outputs)
                value = onnx.ValueInfoProto()
                value.CopyFrom(out)
                value.name = name
                outputs.append(value)
            spec.append((False, position[name]))
        self.outputs = len(sub.output)
        graph_module = None
        if outputs:
            model_graph = helper.make_graph(
                nodes, f"{node.name or node.unique_name}.{attr}", inputs, outputs,
                initializer=list(sub.initializer) + [inits[name] for name in copied],
                value_info=list(sub.value_info))
            opsets = [helper.make_opsetid(domain, version) for domain, version in catalog.current_opsets().items()]
            model = helper.make_model(model_graph, opset_imports=opsets, ir_version=8)
            graph_module = convert(model).module
            _freeze(graph_module)
        self.module = SubgraphModule(graph_module, spec)
        logger.debug("%s.%s: %d nodes, %d enclosing-scope inputs, %d constants copied, %d outputs passed through",
                     node.name, attr, len(sub.node), len(self.outer), len(copied), sum(a for a, _ in spec))


class SubgraphModule(nn.Module):
    """A converted subgraph: its computed outputs and the inputs it returns unchanged, in order."""

    def __init__(self, graph: fx.GraphModule | None, spec: list[tuple[bool, int]]) -> None:
        super().__init__()
        self.graph, self.spec = graph, spec

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:  # noqa: D102
        computed = _as_tuple(self.graph(*args)) if self.graph is not None else ()
        return tuple(args[i] if passed else computed[i] for passed, i in self.spec)


def _freeze(module: nn.Module) -> None:
    """Every parameter of ``module`` becomes a buffer holding the same values (not trained)."""
    for sub in module.modules():
        for name, param in list(sub._parameters.items()):  # pylint: disable=protected-access
            if param is None:
                continue
            del sub._parameters[name]  # pylint: disable=protected-access
            sub.register_buffer(name, param.detach())


def _as_tuple(value) -> tuple[torch.Tensor, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def _single_bool(node_name: str, cond: torch.Tensor, what: str) -> bool:
    if cond.numel() != 1:
        raise DataError(
            f"{what} of node {node_name!r} holds {cond.numel()} values ({list(cond.shape)}); ONNX takes one "
            "(the data's batch reached a branch that needs a batch of 1): run this model with batch 1")
    return bool(cond.reshape(-1)[0].item())


# ---------------------------------------------------------------------------- If


class OnnxIf(nn.Module):
    """Evaluates the condition and runs that branch's converted subgraph."""

    def __init__(self, name: str, then_branch: SubgraphModule, else_branch: SubgraphModule,
                 then_index: list[int], else_index: list[int], outputs: int) -> None:
        super().__init__()
        self.name, self.outputs = name, outputs
        self.then_branch, self.else_branch = then_branch, else_branch
        self.then_index, self.else_index = then_index, else_index

    def forward(self, cond: torch.Tensor, *outer: torch.Tensor):  # noqa: D102
        if _single_bool(self.name, cond, "the condition"):
            out = self.then_branch(*[outer[i] for i in self.then_index])
        else:
            out = self.else_branch(*[outer[i] for i in self.else_index])
        return out[0] if self.outputs == 1 else out


def convert_if(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    then_sub = Subgraph(node, graph, "then_branch")
    else_sub = Subgraph(node, graph, "else_branch")
    if then_sub.outputs != len(node.output_values) or else_sub.outputs != len(node.output_values):
        raise ConversionError(f"node {node_label(node)}: branch outputs ({then_sub.outputs}, {else_sub.outputs}) "
                              f"do not match the node's {len(node.output_values)} outputs")
    outer = list(dict.fromkeys(then_sub.outer + else_sub.outer))
    module = OnnxIf(node.name or node.unique_name, then_sub.module, else_sub.module,
                    [outer.index(n) for n in then_sub.outer], [outer.index(n) for n in else_sub.outer],
                    len(node.output_values))
    mapping = OnnxMapping(inputs=(node.input_values[0], *outer), outputs=node.output_values)
    return result(module, mapping)


registry.register("If", 1, 11, 13, 16, 19, 21, 23, 24, 25)(convert_if)


# ---------------------------------------------------------------------------- Loop


class OnnxLoop(nn.Module):
    """ONNX Loop: ``for i in range(M) while cond``; carried values, scan outputs stacked on axis 0.

    The body takes (iteration, condition, carried...) and the enclosing-scope values, and returns
    (condition, carried..., scan outputs...).
    """

    def __init__(self, name: str, body: SubgraphModule, carried: int, outputs: int,
                 has_trip: bool, has_cond: bool) -> None:
        super().__init__()
        self.name, self.body = name, body
        self.carried, self.outputs, self.has_trip, self.has_cond = carried, outputs, has_trip, has_cond

    def forward(self, *args: torch.Tensor):  # noqa: D102
        args = list(args)
        trip = args.pop(0) if self.has_trip else None
        cond = args.pop(0) if self.has_cond else None
        state, outer = args[:self.carried], args[self.carried:]
        limit = None if trip is None else int(trip.reshape(-1)[0].item())
        go = True if cond is None else _single_bool(self.name, cond, "the loop condition")
        scans: list[list[torch.Tensor]] = [[] for _ in range(self.outputs - 1 - self.carried)]
        step = 0
        while go and (limit is None or step < limit):
            iteration = torch.tensor(step, dtype=torch.int64, device=state[0].device if state else None)
            keep = torch.tensor(go)
            out = self.body(iteration, keep, *state, *outer)
            # onnxruntime reads the body's condition even where the node has no condition input
            # (the ONNX text says it is ignored there); onnxruntime is what the bridge must match
            go = _single_bool(self.name, out[0], "the loop condition")
            state = list(out[1:1 + self.carried])
            for values, value in zip(scans, out[1 + self.carried:]):
                values.append(value)
            step += 1
        if any(not values for values in scans):
            raise ConversionError(f"Loop node {self.name!r} ran no iteration, so its scan outputs have no shape "
                                  "torch can infer; feed inputs for which the loop runs at least once")
        finals = state + [torch.stack(values) for values in scans]
        return finals[0] if len(finals) == 1 else tuple(finals)


def convert_loop(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    body_attr = node.attributes.get("body")
    formal = [v.name for v in body_attr.g.input] if isinstance(body_attr, onnx.AttributeProto) else []
    body = Subgraph(node, graph, "body", formal=formal)
    carried = len(node.input_values) - 2
    if len(formal) != 2 + carried or body.outputs < 1 + carried:
        raise ConversionError(f"node {node_label(node)}: its body takes {len(formal)} inputs and returns "
                              f"{body.outputs}, not the 2 + {carried} and 1 + {carried} (+ scans) ONNX requires")
    trip, cond = input_name(node, 0), input_name(node, 1)
    module = OnnxLoop(node.name or node.unique_name, body.module, carried, body.outputs,
                      has_trip=trip is not None, has_cond=cond is not None)
    given = tuple(name for name in (trip, cond) if name is not None)
    mapping = OnnxMapping(inputs=(*given, *node.input_values[2:], *body.outer), outputs=node.output_values)
    return result(module, mapping)


registry.register("Loop", 1, 11, 13, 16, 19, 21, 23, 24, 25)(convert_loop)
