"""Channel-group analysis: which channels of a model must be removed together.

Propagation walks the graph in topological order and asks each op's rule how channels flow
(:mod:`graph_passes.op_rules`). Afterwards:

* a *group channel* is a set of tied atoms (removed as one unit);
* a *channel group* joins the group channels that share a producer (all output channels of one
  conv, plus whatever they were tied to), so one search variable per group channel can be shared
  by every layer of the group;
* a group is prunable when none of its atoms is blocked. Graph inputs and outputs, ops without a
  rule and ops that mix channels without weights block, and the reason is kept.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import onnx
from networkx.utils import UnionFind

from .graph import ModelGraph
from .layers import ActivationSite, WeightLayer, activation_sites, describe_weight_layer
from .layouts import AtomTable, Layout
from .op_rules import PropagationContext, find_rule

logger = logging.getLogger(__name__)


@dataclass
class GroupMember:
    """Positions of one tensor's channel axis that belong to a group.

    ``kind`` is ``producer`` (a weight layer's output), ``consumer`` (a weight layer's data
    input), ``constant`` (a per-channel initializer: bias, BN parameter, scale) or
    ``passthrough`` (any other tensor). ``channels[i]`` is the group channel at ``positions[i]``.
    """

    kind: str
    tensor: str
    node: str | None
    axis: int
    positions: np.ndarray
    channels: np.ndarray

    def summary(self) -> dict:
        return {
            "kind": self.kind, "tensor": self.tensor, "node": self.node, "axis": self.axis,
            "positions": int(self.positions.size), "first_position": int(self.positions.min()),
        }


@dataclass
class ChannelGroup:
    id: str
    size: int
    prunable: bool
    reasons: list[str]
    members: list[GroupMember] = field(default_factory=list)
    channel_atoms: list[np.ndarray] = field(default_factory=list, repr=False)

    def members_of(self, kind: str) -> list[GroupMember]:
        return [m for m in self.members if m.kind == kind]

    @property
    def producers(self) -> list[str]:
        return [m.node for m in self.members_of("producer")]

    @property
    def consumers(self) -> list[str]:
        return [m.node for m in self.members_of("consumer")]


@dataclass
class ChannelAnalysis:
    """The result of :func:`analyse` on a normalised model."""

    model: onnx.ModelProto
    graph: ModelGraph
    layouts: dict[str, Layout]
    atoms: AtomTable
    groups: list[ChannelGroup]
    layers: list[WeightLayer]
    sites: list[ActivationSite]
    unknown_ops: dict[str, int]
    atom_group: np.ndarray  # atom id -> index into groups (-1 for atoms of no group)

    def group(self, group_id: str) -> ChannelGroup:
        for g in self.groups:
            if g.id == group_id:
                return g
        raise KeyError(group_id)

    @property
    def prunable_groups(self) -> list[ChannelGroup]:
        return [g for g in self.groups if g.prunable]

    @property
    def prunable_share(self) -> float:
        """Share of weight-layer output channels that sit in prunable groups."""
        total = sum(layer.out_channels for layer in self.layers)
        return sum(layer.prunable_out_channels for layer in self.layers) / total if total else 0.0

    def conv_prunable_share(self) -> float:
        convs = [layer for layer in self.layers if layer.op_type in ("Conv", "ConvTranspose")]
        total = sum(layer.out_channels for layer in convs)
        return sum(layer.prunable_out_channels for layer in convs) / total if total else 0.0


def _propagate(graph: ModelGraph) -> PropagationContext:
    ctx = PropagationContext(graph)
    for name in graph.graph_inputs:
        shape = graph.shape(name)
        if shape is not None and len(shape) >= 2:
            ctx.fresh(f"input:{name}", name, 1, weight_layer=False, blocked=f"graph input '{name}'")
    for name in graph.topological_nodes():
        node = graph.nodes[name]
        rule = find_rule(node.domain, node.op_type, graph.opset)
        if rule is None:
            op = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"
            ctx.unknown_ops[op] += 1
            ctx.opaque(name, node, "no channel rule for this op")
            continue
        rule.propagate(name, node, ctx)
        logger.debug("%s (%s): %s", name, node.op_type,
                     [(o, ctx.layouts[o].axis) for o in node.output if o in ctx.layouts])
    for out in graph.graph_outputs:
        ctx.block(out, f"reaches graph output '{out}'")
    return ctx


def _form_groups(ctx: PropagationContext) -> tuple[list[ChannelGroup], np.ndarray, np.ndarray]:
    """Group channels (tied sets) joined by shared producers into groups."""
    atoms = ctx.atoms
    n = len(atoms.sources)
    root = np.array([atoms.ties[a] for a in range(n)], dtype=np.int64)
    by_source = UnionFind()
    first_by_node: dict[str, int] = {}
    for a, src in enumerate(atoms.sources):
        by_source[int(root[a])]
        if src.node in first_by_node:
            by_source.union(int(root[first_by_node[src.node]]), int(root[a]))
        else:
            first_by_node[src.node] = a
    group_root = np.array([by_source[int(r)] for r in root], dtype=np.int64)
    # deterministic order: groups and their channels by the smallest atom they hold
    group_index: dict[int, int] = {}
    channel_index: dict[int, int] = {}
    channel_lists: list[list[int]] = []
    atom_group = np.full(n, -1, dtype=np.int64)
    atom_channel = np.full(n, -1, dtype=np.int64)
    for a in range(n):
        g = group_index.setdefault(int(group_root[a]), len(group_index))
        if g == len(channel_lists):
            channel_lists.append([])
        r = int(root[a])
        if r not in channel_index:
            channel_index[r] = len(channel_lists[g])
            channel_lists[g].append(r)
        atom_group[a], atom_channel[a] = g, channel_index[r]
    order = np.argsort(root, kind="stable")
    cuts = np.flatnonzero(np.diff(root[order])) + 1
    atoms_of_root = {int(root[chunk[0]]): chunk for chunk in np.split(order, cuts) if chunk.size}
    groups = []
    for g, roots in enumerate(channel_lists):
        members_atoms = [atoms_of_root[r] for r in roots]
        reasons: list[str] = []
        weight_producer = False
        for arr in members_atoms:
            for a in arr.tolist():
                weight_producer |= atoms.sources[a].is_weight_layer
                for why in atoms.blocked.get(a, []):
                    if why not in reasons:
                        reasons.append(why)
        if not weight_producer and not reasons:
            reasons.append("no weight layer produces these channels")
        groups.append(ChannelGroup(f"g{g}", len(roots), not reasons, reasons, [], members_atoms))
    return groups, atom_group, atom_channel


def _attach_members(ctx, groups, atom_group, atom_channel, layers) -> None:
    producers = {layer.output: layer.name for layer in layers}
    consumers: dict[str, list[str]] = {}
    for layer in layers:
        consumers.setdefault(layer.input, []).append(layer.name)
    constants: dict[str, list[tuple[str, str]]] = {}
    for node, const, tensor in ctx.constants:
        constants.setdefault(tensor, []).append((node, const))

    def add(kind, tensor, node, layout):
        g_of = atom_group[layout.atoms]
        for g in np.unique(g_of).tolist():
            pos = np.flatnonzero(g_of == g)
            groups[g].members.append(
                GroupMember(kind, tensor, node, layout.axis, pos, atom_channel[layout.atoms[pos]])
            )

    for tensor, layout in ctx.layouts.items():
        if tensor in producers:
            add("producer", tensor, producers[tensor], layout)
        for consumer in consumers.get(tensor, []):
            add("consumer", tensor, consumer, layout)
        for node, const in constants.get(tensor, []):
            add("constant", const, node, layout)
        if tensor not in producers and tensor not in consumers:
            add("passthrough", tensor, ctx.graph.producer.get(tensor), layout)


def analyse(model: onnx.ModelProto) -> ChannelAnalysis:
    """Analyse a normalised model with static shapes: layers, sites and channel groups."""
    graph = ModelGraph.build(model)
    ctx = _propagate(graph)
    groups, atom_group, atom_channel = _form_groups(ctx)
    layers = []
    for name, node in graph.nodes.items():
        layer = describe_weight_layer(name, node, graph)
        if layer is not None and node.output[0] in ctx.layouts:
            layers.append(layer)
    _attach_members(ctx, groups, atom_group, atom_channel, layers)
    for layer in layers:
        out_groups = atom_group[ctx.layouts[layer.output].atoms]
        layer.output_groups = [groups[g].id for g in dict.fromkeys(out_groups.tolist())]
        layer.prunable_out_channels = int(sum(groups[g].prunable for g in out_groups.tolist()))
        in_layout = ctx.layouts.get(layer.input)
        if in_layout is not None:
            in_groups = atom_group[in_layout.atoms]
            layer.input_groups = [groups[g].id for g in dict.fromkeys(in_groups.tolist())]
    # groups without a weight-layer producer are walls/inputs: keep them out of the list
    keep = [g for g in groups if g.members_of("producer")]
    renumber = {g.id: f"g{i}" for i, g in enumerate(keep)}
    for g in keep:
        g.id = renumber[g.id]
    for layer in layers:
        layer.output_groups = [renumber.get(x, "-") for x in layer.output_groups]
        layer.input_groups = [renumber[x] for x in layer.input_groups if x in renumber]
    index_of = {id(g): i for i, g in enumerate(keep)}
    remap = np.array([index_of.get(id(g), -1) for g in groups] + [-1], dtype=np.int64)
    sites = activation_sites(layers, graph)
    logger.info(
        "analysis: %d weight layers, %d groups (%d prunable), %d unknown op types",
        len(layers), len(keep), sum(g.prunable for g in keep), len(ctx.unknown_ops),
    )
    return ChannelAnalysis(
        model=model, graph=graph, layouts=ctx.layouts, atoms=ctx.atoms, groups=keep,
        layers=layers, sites=sites, unknown_ops=dict(Counter(ctx.unknown_ops)),
        atom_group=remap[atom_group],
    )
