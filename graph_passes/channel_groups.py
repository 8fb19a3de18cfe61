"""Channel-group analysis: which channels of a model must be removed together.

Propagation walks the graph in topological order and asks each op's rule how channels flow
(:mod:`graph_passes.op_rules`). Afterwards:

* a *group channel* is a set of tied atoms (removed as one unit);
* a *channel group* joins the group channels that share a producer (all output channels of one
  conv, plus whatever they were tied to), so one search variable per group channel can be shared
  by every layer of the group;
* a group is prunable when none of its atoms is blocked. Graph inputs and outputs, ops without a
  rule and ops that mix channels without weights block, and the reason is kept; so does a
  weight, bias or per-channel constant read inside an If/Loop/Scan body (pruning would shrink it
  under that reader);
* a group is *inexact* when a rule marked one of its atoms so (:mod:`graph_passes.op_rules.norms`:
  a LayerNorm / RMSNorm / mean over the channels, an embedding table's columns): removing a
  channel changes the other channels' values a little, so the exact-equivalence oracle does not
  hold. Such a group (the transformer's residual hidden width) is prunable only when the
  analysis runs with ``inexact_hidden_width=True``; without it the mark blocks, with a reason
  naming the option. ``ChannelGroup.inexact`` keeps the marks either way.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import onnx
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from .graph import ModelGraph, subgraph_references
from .layers import ActivationSite, WeightLayer, activation_sites, describe_weight_layer
from .layouts import AtomTable, Layout
from .op_rules import PropagationContext, find_rule
from .op_rules.norms import INEXACT_OPTION
from .untie import mark_owners, weight_users

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
    #: why removing a channel is not exact (LayerNorm statistics, ...); empty: an exact group
    inexact: list[str] = field(default_factory=list)
    #: prunable when the analysis allows inexact groups (``inexact_hidden_width=True``)
    inexact_prunable: bool = False

    @property
    def exact(self) -> bool:
        return not self.inexact

    @property
    def kind(self) -> str:
        """``exact`` (removing channels = zeroing them, the oracle holds) or ``inexact``."""
        return "exact" if self.exact else "inexact"

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
    inexact_hidden_width: bool = False  # inexact groups are prunable
    #: (node, tensor): nodes whose statistic over (or per-row storage of) tensor's channels makes
    #: a group inexact (op_rules.norms); a fake-quantized engine restricts them to kept channels
    inexact_nodes: list[tuple[str, str]] = field(default_factory=list)


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

    def coverage(self, inexact: bool | None = None) -> float:
        """Share of weight-layer output channels in prunable groups: exact groups only
        (``inexact=False``), or with the inexact groups too (``True``); None: as analysed."""
        if inexact is None:
            inexact = self.inexact_hidden_width
        ok = np.array([g.prunable if g.exact else (inexact and g.inexact_prunable) for g in self.groups]
                      + [False], dtype=bool)  # index -1: atoms of no group
        total = prunable = 0
        for layer in self.layers:
            total += layer.out_channels
            layout = self.layouts.get(layer.output)
            if layout is not None:
                prunable += int(ok[self.atom_group[layout.atoms]].sum())
        return prunable / total if total else 0.0

    def conv_prunable_share(self) -> float:
        convs = [layer for layer in self.layers if layer.is_conv]
        total = sum(layer.out_channels for layer in convs)
        return sum(layer.prunable_out_channels for layer in convs) / total if total else 0.0


def _carries_features(graph: ModelGraph, name: str) -> bool:
    """False for integer and boolean graph inputs (token ids, attention masks, positions): their
    axes are not feature channels, and a blocked layout on them (a mask's key axis) would only
    collide with the heads it is broadcast onto. Without a layout, every rule still refuses to
    mix them into channels it cannot see."""
    value = next((v for v in graph.model.graph.input if v.name == name), None)
    elem = value.type.tensor_type.elem_type if value is not None and value.type.HasField("tensor_type") else 0
    return elem not in _NON_FEATURE_TYPES


_NON_FEATURE_TYPES = {
    onnx.TensorProto.INT8, onnx.TensorProto.INT16, onnx.TensorProto.INT32, onnx.TensorProto.INT64,
    onnx.TensorProto.UINT8, onnx.TensorProto.UINT16, onnx.TensorProto.UINT32,
    onnx.TensorProto.UINT64, onnx.TensorProto.BOOL,
}


def _propagate(graph: ModelGraph) -> PropagationContext:
    ctx = PropagationContext(graph)
    ctx.inexact_marks = []  # (atoms, why) of op_rules.norms.mark_inexact
    for name in graph.graph_inputs:
        shape = graph.shape(name)
        if shape is not None and len(shape) >= 2 and _carries_features(graph, name):
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


def _components(n: int, edges: list[np.ndarray]) -> np.ndarray:
    """Connected-component label of each of n atoms under the given edges (scipy, in C)."""
    if not edges:
        return np.arange(n, dtype=np.int64)
    pairs = np.concatenate(edges)
    graph = coo_matrix((np.ones(len(pairs), dtype=np.int8), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    return connected_components(graph, directed=False)[1].astype(np.int64)


def _same_source_edges(atoms: AtomTable) -> list[np.ndarray]:
    """Edges joining consecutive atoms of one producer: its channels form one group."""
    batch = atoms.batch_of()
    same = np.flatnonzero(batch[1:] == batch[:-1])
    return [np.stack([same, same + 1], axis=1)] if same.size else []


def _form_groups(ctx: PropagationContext, inexact_hidden_width: bool = False
                 ) -> tuple[list[ChannelGroup], np.ndarray, np.ndarray]:
    """Group channels (tied sets) joined by shared producers into groups.

    Returns the groups, and per atom its group index and its group-channel index."""
    atoms = ctx.atoms
    n = atoms.count
    tied = _components(n, atoms.tie_edges)
    grouped = _components(n, atoms.tie_edges + _same_source_edges(atoms))
    # deterministic order: groups, and channels within a group, by the smallest atom they hold
    first_atom_of_tied = np.full(n, n, dtype=np.int64)
    np.minimum.at(first_atom_of_tied, tied, np.arange(n))
    first_atom_of_group = np.full(n, n, dtype=np.int64)
    np.minimum.at(first_atom_of_group, grouped, np.arange(n))
    group_rank = np.unique(first_atom_of_group[grouped], return_inverse=True)[1].ravel()
    channel_key = first_atom_of_tied[tied]
    order = np.lexsort((channel_key, group_rank))  # atoms sorted by (group, channel)
    new_channel = np.ones(n, dtype=bool)
    new_channel[1:] = (group_rank[order][1:] != group_rank[order][:-1]) | (
        channel_key[order][1:] != channel_key[order][:-1])
    new_group = np.ones(n, dtype=bool)
    new_group[1:] = group_rank[order][1:] != group_rank[order][:-1]
    channel_global = np.cumsum(new_channel) - 1  # running channel number over all groups
    group_first_channel = channel_global[new_group]
    atom_channel = np.empty(n, dtype=np.int64)
    atom_channel[order] = channel_global - np.repeat(group_first_channel, np.diff(
        np.append(np.flatnonzero(new_group), n)))
    atom_group = group_rank.astype(np.int64)
    n_groups = int(group_rank.max()) + 1 if n else 0
    reasons: list[list[str]] = [[] for _ in range(n_groups)]
    for blocked_atoms, why in atoms.blocks:
        for g in np.unique(atom_group[blocked_atoms]).tolist():
            if why not in reasons[g]:
                reasons[g].append(why)
    inexact: list[list[str]] = [[] for _ in range(n_groups)]
    for marked_atoms, why, *_ in getattr(ctx, "inexact_marks", []):
        for g in np.unique(atom_group[marked_atoms]).tolist():
            if why not in inexact[g]:
                inexact[g].append(why)
    has_weight = np.bincount(atom_group, weights=atoms.is_weight(), minlength=n_groups) > 0
    chunks = np.split(order, np.flatnonzero(new_channel)[1:])
    groups, start = [], 0
    sizes = np.bincount(atom_group[order][new_channel], minlength=n_groups)
    for g in range(n_groups):
        why = reasons[g] or ([] if has_weight[g] else ["no weight layer produces these channels"])
        channel_atoms = chunks[start : start + int(sizes[g])]
        start += int(sizes[g])
        hard = list(why)
        if inexact[g] and not inexact_hidden_width:
            why = why + [f"{w}; {INEXACT_OPTION} prunes it" for w in inexact[g]]
        groups.append(ChannelGroup(f"g{g}", int(sizes[g]), not why, why, [], channel_atoms,
                                   inexact=list(inexact[g]), inexact_prunable=not hard))
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


def _block_foreign_readers(ctx: PropagationContext, layers: list[WeightLayer]) -> None:
    """Pruning slices a layer's weight and bias and every per-channel constant. Another
    main-graph reader keeps the original (pruning gives the sliced one a name of its own), but a
    node of an If/Loop/Scan body, which the rules never see, would compute with the shrunk
    tensor: block the channels indexing it, with the reason."""
    graph = ctx.graph
    sliced: list[tuple[str, str, list[str]]] = []  # (initializer, owner node, tensors indexing it)
    for layer in layers:
        for const in (layer.weight, layer.bias):
            if const:
                sliced.append((const, layer.name, [layer.output, layer.input]))
    for node, const, tensor in ctx.constants:
        sliced.append((const, node, [tensor]))
    readers_inside = {}
    for name, node in graph.nodes.items():
        for ref in subgraph_references(node):
            readers_inside.setdefault(ref, name)
    for const, owner, tensors in sliced:
        if const not in graph.initializers or const not in readers_inside:
            continue
        reader = readers_inside[const]
        why = (f"initializer '{const}' (of '{owner}') is read inside a subgraph of "
               f"{graph.nodes[reader].op_type} node '{reader}'")
        for tensor in tensors:
            ctx.block(tensor, why)


def _couple_shared_weights(ctx: PropagationContext, layers: list[WeightLayer]) -> None:
    """Layers reading one weight tensor (``graph_passes.untie``) get one plan: their output
    channels are tied position by position (one group channel per row of the shared weight),
    and so are their input channels (a column is removed for all users or none). Where that
    cannot be exact (the weight is read by another node too, users read it along different
    axes, or an input layout is unknown), their channels are blocked with the reason; the
    weight is still quantized once."""
    graph = ctx.graph
    for weight, users in weight_users(layers).items():
        names = {u.name for u in users}
        listed = ", ".join(f"'{u.name}'" for u in users[:3]) + (", ..." if len(users) > 3 else "")
        others = [n for n, node in graph.nodes.items() if n not in names and weight in node.input]
        outs = [ctx.layouts.get(u.output) for u in users]
        ins = [ctx.layouts.get(u.input) for u in users]
        shapes = {(u.weight_out_axis, u.weight_in_axis, u.out_channels, u.in_channels, u.groups) for u in users}
        why = None
        if others:
            why = (f"weight '{weight}' is shared by layers {listed} and also read by "
                   f"{graph.nodes[others[0]].op_type} node '{others[0]}', whose channels cannot be tied to theirs")
        elif len(shapes) > 1:
            why = f"weight '{weight}' is shared by layers {listed}, which read it along different axes"
        elif any(o is None or o.size != users[0].out_channels for o in outs):
            why = f"weight '{weight}' is shared by layers {listed}, and an output channel layout is unknown"
        if why is not None:
            for u in users:
                ctx.block(u.output, why)
                ctx.block(u.input, why)
            continue
        for out in outs[1:]:
            ctx.atoms.tie(outs[0].atoms, out.atoms)
        if all(i is not None for i in ins) and len({i.size for i in ins}) == 1:
            for layout in ins[1:]:
                ctx.atoms.tie(ins[0].atoms, layout.atoms)
        elif any(i is not None for i in ins):
            why = (f"weight '{weight}' is shared by layers {listed}, whose input channels cannot be "
                   "tied (an input layout is unknown or of another size)")
            for u in users:
                ctx.block(u.input, why)


def analyse(model: onnx.ModelProto, inexact_hidden_width: bool = False) -> ChannelAnalysis:
    """Analyse a normalised model with static shapes: layers, sites and channel groups.

    ``inexact_hidden_width``: inexact groups (the residual hidden width through LayerNorm /
    RMSNorm, :mod:`graph_passes.op_rules.norms`) are prunable; off, they are blocked. The groups
    themselves (ids, members) are the same either way."""
    graph = ModelGraph.build(model)
    ctx = _propagate(graph)
    layers = []
    for name, node in graph.nodes.items():
        layer = describe_weight_layer(name, node, graph)
        if layer is not None:
            layers.append(layer)
    _block_foreign_readers(ctx, layers)
    _couple_shared_weights(ctx, layers)
    mark_owners(layers, {w: int(np.size(graph.constant(w))) for w in weight_users(layers)})
    groups, atom_group, atom_channel = _form_groups(ctx, inexact_hidden_width)
    _attach_members(ctx, groups, atom_group, atom_channel, layers)
    for layer in layers:
        out_layout = ctx.layouts.get(layer.output)
        out_groups = atom_group[out_layout.atoms] if out_layout is not None else np.zeros(0, np.int64)
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
        "analysis: %d weight layers, %d groups (%d prunable, %d of them inexact), %d unknown op types",
        len(layers), len(keep), sum(g.prunable for g in keep), sum(g.prunable and not g.exact for g in keep),
        len(ctx.unknown_ops),
    )
    return ChannelAnalysis(
        model=model, graph=graph, layouts=ctx.layouts, atoms=ctx.atoms, groups=keep,
        layers=layers, sites=sites, unknown_ops=dict(Counter(ctx.unknown_ops)),
        atom_group=remap[atom_group], inexact_hidden_width=inexact_hidden_width,
        inexact_nodes=list(dict.fromkeys((node, tensor) for _, _, node, tensor in ctx.inexact_marks)),
    )
