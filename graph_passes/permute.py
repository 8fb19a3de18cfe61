"""Permute the channels of channel groups in a pruned model: the same function, channels reordered.

Used by the export (``plugin.export``) to make a mixed-width layer's channels of equal bit-width
contiguous, so its weight is ``Concat(DQ_8(w[:k8]), DQ_4(w[k8:k8+k4]), ...)`` with no ``Gather``
restoring the original order (``graph_passes.qdq``).

``permute_groups(pruned, analysis, removal, orders)``: ``orders[group]`` lists the group's *kept*
channels in their new order. Every tensor that carries the group's channels is reordered by
rewriting what computes it, walking the graph in order and carrying one position permutation
per tensor (``sigma[i]``: the old position now at position ``i``):

* a weight layer producing the group: its weight's output-channel axis and its bias; a weight
  layer reading it: its weight's input-channel axis (a depthwise conv: its output follows its
  input). Grouped (non-depthwise) and recurrent layers, and a weight read by several nodes,
  are refused;
* ops that act on each channel alone and keep the channel axis whole (unary activations,
  broadcasting arithmetic, BatchNormalization / InstanceNormalization, pools, Pad, Resize,
  reductions over other axes, Squeeze / Unsqueeze / Transpose / Reshape keeping the channel axis
  as one dimension): the output has the input's permutation, and every per-channel constant
  operand is permuted along its channel axis (broadcast-aligned; axis 0 for the normalisations'
  1-D parameters). Every operand carrying channels must have the same permutation;
* ``Concat`` along the channel axis: the inputs' permutations, offset; ``Flatten`` / a
  channel-major ``Reshape`` (each channel a block of positions): the permutation by blocks.

A group is refused (left in its order, with the reason) when one of its tensors reaches a graph
output or a node of any other kind (``Split``, ``Slice``, ``Gather``, an op without a rule, a
subgraph reader, ...), or when the group is not prunable or not exact in the analysis (every
op on an exact prunable group's path has a rule that slices it channel by channel). Refusals
are found by a dry walk and the walk repeated without the refused groups, so the edits, made
once at the end, are consistent for the groups that remain.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from .channel_groups import ChannelAnalysis
from .errors import PruningError
from .fold_utils import unique_name
from .graph import subgraph_references
from .op_rules.elementwise import UNARY_OPS
from .prune import Removal, removal_mask

logger = logging.getLogger(__name__)

#: ops whose output carries each input channel at the same position, computed from that
#: channel alone (the per-channel constants of the broadcasting ones are permuted too)
_CHANNELWISE = frozenset(UNARY_OPS) | {
    "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "PRelu",
    "BatchNormalization", "InstanceNormalization",
    "MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool",
    "Pad", "Resize", "Upsample",
    "ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
    "ReduceSumSquare", "ReduceLogSum", "ReduceLogSumExp",
    "Squeeze", "Unsqueeze", "Transpose", "Reshape", "Flatten", "Expand", "Tile",
}
_NORMS = frozenset({"BatchNormalization", "InstanceNormalization"})
_BLOCKS = frozenset({"Flatten", "Reshape"})  # may merge each channel with the axes after it


@dataclass
class PermuteResult:
    model: onnx.ModelProto
    #: tensor -> sigma (position i of the new tensor holds old position sigma[i]); non-identity only
    sigmas: dict[str, np.ndarray] = field(default_factory=dict)
    #: group -> its kept channels in their new order (the groups actually permuted)
    permuted: dict[str, list[int]] = field(default_factory=dict)
    #: group -> why it was left in its order
    refused: dict[str, str] = field(default_factory=dict)


class _Refuse(Exception):
    def __init__(self, tensors: Sequence[str], reason: str) -> None:
        super().__init__(reason)
        self.tensors = list(tensors)
        self.reason = reason


def permute_groups(pruned: onnx.ModelProto, analysis: ChannelAnalysis, removal: Removal,
                   orders: Mapping[str, Sequence[int]]) -> PermuteResult:
    """``pruned``: ``prune_channels(model, analysis, removal)`` (or the model itself when nothing
    is removed). Returns a new model (``pruned`` is not modified) and what was permuted."""
    removed = removal_mask(analysis, removal) if removal else np.zeros(analysis.atoms.count, dtype=bool)
    atom_channel = np.full(analysis.atoms.count, -1, dtype=np.int64)
    for group in analysis.groups:
        for c, atoms in enumerate(group.channel_atoms):
            atom_channel[np.asarray(atoms, dtype=np.int64)] = c
    index = {g.id: i for i, g in enumerate(analysis.groups)}
    refused: dict[str, str] = {}
    ranks: dict[int, np.ndarray] = {}
    for gid, order in orders.items():
        if gid not in index:
            raise PruningError(f"unknown channel group '{gid}'; run `prunequant inspect` to list the groups")
        group = analysis.groups[index[gid]]
        kept = [c for c in range(group.size) if not removed[group.channel_atoms[c]].any()]
        order = [int(c) for c in order]
        if sorted(order) != kept:
            raise PruningError(f"the order of group '{gid}' is not a permutation of its {len(kept)} kept channels")
        if order == kept:
            continue
        if not group.prunable or not group.exact:
            refused[gid] = group.reasons[0] if group.reasons else "an inexact group"
            continue
        rank = np.full(group.size, -1, dtype=np.int64)
        rank[order] = np.arange(len(order))
        ranks[index[gid]] = rank
    layouts = {t: lay.atoms[~removed[lay.atoms]] for t, lay in analysis.layouts.items()}
    walk = _Walk(pruned, analysis, layouts, atom_channel)
    while True:
        try:
            sigmas, edits = walk.run(ranks)
            break
        except _Refuse as exc:
            hit = {int(g) for t in exc.tensors if t in layouts for g in np.unique(analysis.atom_group[layouts[t]])}
            hit &= set(ranks)
            if not hit:  # pragma: no cover - a refusal always names a permuted tensor
                raise PruningError(f"channel permutation: {exc.reason}") from None
            for g in sorted(hit):
                refused[analysis.groups[g].id] = exc.reason
                del ranks[g]
    model = onnx.ModelProto()
    model.CopyFrom(pruned)
    _apply(model, edits)
    permuted = {analysis.groups[g].id: _order_of(r).tolist() for g, r in ranks.items()}
    for gid, why in refused.items():
        logger.info("channel order of group %s kept: %s", gid, why)
    logger.info("permuted %d channel groups (%d tensors reordered), %d kept their order",
                len(permuted), len(sigmas), len(refused))
    return PermuteResult(model, sigmas, permuted, refused)


def _order_of(rank: np.ndarray) -> np.ndarray:
    """The channels in rank order (the inverse of ``rank`` over its kept channels)."""
    kept = np.flatnonzero(rank >= 0)
    out = np.empty(kept.size, dtype=np.int64)
    out[rank[kept]] = kept
    return out


class _Walk:
    def __init__(self, model: onnx.ModelProto, analysis: ChannelAnalysis, layouts: dict[str, np.ndarray],
                 atom_channel: np.ndarray) -> None:
        self.model = model
        self.analysis = analysis
        self.layouts = layouts
        self.atom_channel = atom_channel
        self.layers = {layer.name: layer for layer in analysis.layers}
        self.inits = {t.name: t for t in model.graph.initializer}
        self.uses = Counter(i for n in model.graph.node for i in n.input if i)
        self.shapes = _shapes(model)

    # ------------------------------------------------------------------------------------
    def run(self, ranks: dict[int, np.ndarray]):
        self.ranks = ranks
        sigmas: dict[str, np.ndarray] = {}
        edits: list[tuple[str, int, int, np.ndarray]] = []  # (node, input index, axis, sigma)
        for node in self.model.graph.node:
            inner = sorted(r for r in subgraph_references(node) if r in sigmas)
            if inner:
                raise _Refuse(inner, f"{node.op_type} node '{node.name}' reads '{inner[0]}' inside a subgraph")
            if node.name in self.layers:
                self._weight_layer(node, sigmas, edits)
            else:
                self._other(node, sigmas, edits)
        for out in self.model.graph.output:
            if out.name in sigmas:
                raise _Refuse([out.name], f"tensor '{out.name}' is a graph output")
        return sigmas, edits

    def _key(self, tensor: str) -> np.ndarray | None:
        """Per position of a tensor produced by a permuted group's layer: its new rank."""
        atoms = self.layouts.get(tensor)
        if atoms is None or atoms.size == 0:
            return None
        groups = self.analysis.atom_group[atoms]
        g = int(groups[0])
        if g not in self.ranks:
            return None
        if not (groups == g).all():
            raise _Refuse([tensor], f"tensor '{tensor}' carries channels of several groups")
        key = self.ranks[g][self.atom_channel[atoms]]
        if (key < 0).any() or np.unique(key).size != key.size:
            raise _Refuse([tensor], f"tensor '{tensor}' repeats a channel")
        return key

    def _weight_layer(self, node: onnx.NodeProto, sigmas, edits) -> None:
        layer = self.layers[node.name]
        original = self.analysis.graph.nodes[node.name]
        sig_in = sigmas.get(layer.input)
        key = self._key(layer.output)
        sig_out = np.argsort(key, kind="stable") if key is not None else None
        if sig_out is not None and np.array_equal(sig_out, np.arange(sig_out.size)):
            sig_out = None
        if sig_in is None and sig_out is None:
            return
        touched = [t for t in (layer.input, layer.output) if t]
        if layer.cost_kind == "recurrent":
            raise _Refuse(touched, f"layer '{node.name}' is recurrent")
        if layer.weight not in original.input:
            raise _Refuse(touched, f"layer '{node.name}': weight not found")
        w_index = list(original.input).index(layer.weight)
        others = [t for i, t in enumerate(node.input) if t in sigmas and t != layer.input]
        if others or (node.input[0] != layer.input and sig_in is not None):
            raise _Refuse(touched, f"layer '{node.name}' reads permuted channels on another input")
        w_name = node.input[w_index]
        if w_name not in self.inits or self.uses[w_name] > 1:
            raise _Refuse(touched, f"layer '{node.name}': its weight is shared or not an initializer")
        if layer.is_depthwise:
            w_shape = list(self.inits[w_name].dims)
            if w_shape[layer.weight_in_axis] != 1 or layer.in_channels != layer.out_channels:
                raise _Refuse(touched, f"layer '{node.name}': a depthwise conv with a channel multiplier")
            same = (sig_in is None and sig_out is None) or (
                sig_in is not None and sig_out is not None and np.array_equal(sig_in, sig_out))
            if not same:
                raise _Refuse(touched, f"depthwise layer '{node.name}': input and output orders differ")
            sig_in = None  # one input channel per group: the output axis carries the order
        elif layer.groups > 1:
            raise _Refuse(touched, f"layer '{node.name}' is a grouped convolution")
        if sig_in is not None:
            edits.append((node.name, w_index, layer.weight_in_axis, sig_in))
        if sig_out is not None:
            edits.append((node.name, w_index, layer.weight_out_axis, sig_out))
            if layer.bias and layer.bias in original.input:
                b_index = list(original.input).index(layer.bias)
                bias = self._const(node.input[b_index])
                if bias is None:
                    raise _Refuse(touched, f"layer '{node.name}': its bias is not an initializer")
                if bias.ndim >= 1 and bias.shape[-1] == sig_out.size > 1:
                    edits.append((node.name, b_index, bias.ndim - 1, sig_out))
            sigmas[layer.output] = sig_out

    def _other(self, node: onnx.NodeProto, sigmas, edits) -> None:
        moved = [t for t in node.input if t in sigmas]
        if not moved:
            return
        if subgraph_references(node):
            raise _Refuse(moved, f"{node.op_type} node '{node.name}' has subgraphs")
        op = node.op_type
        outs = [o for o in node.output if o]
        if op == "Concat":
            self._concat(node, sigmas, moved)
            return
        if op not in _CHANNELWISE or (op == "MaxPool" and len(outs) > 1):
            raise _Refuse(moved, f"{op} node '{node.name}' cannot reorder channels")
        ref = self.layouts.get(moved[0])
        sig = sigmas[moved[0]]
        for t in node.input:
            if not t:
                continue
            if t in self.layouts and self._const(t) is None:
                if not self._same(self.layouts[t], ref):
                    if self.layouts[t].size == 1:
                        continue
                    raise _Refuse(moved, f"{op} node '{node.name}': operands carry different channels")
                if not np.array_equal(sigmas.get(t, np.arange(sig.size)), sig):
                    raise _Refuse(moved, f"{op} node '{node.name}': operands in different orders")
        for out in outs:
            atoms = self.layouts.get(out)
            if atoms is None:
                raise _Refuse(moved, f"{op} node '{node.name}': output '{out}' has no channel layout")
            if self._same(atoms, ref):
                sigmas[out] = sig
            elif op in _BLOCKS and atoms.size % ref.size == 0 and self._same(atoms, np.repeat(ref, atoms.size // ref.size)):
                k = atoms.size // ref.size
                sigmas[out] = (sig[:, None] * k + np.arange(k)[None, :]).reshape(-1)
            else:
                raise _Refuse(moved, f"{op} node '{node.name}' rearranges the channel axis")
        self._constants(node, sig, moved, edits)

    def _constants(self, node: onnx.NodeProto, sig: np.ndarray, moved: list[str], edits) -> None:
        """Permute the per-channel constant operands of a channel-wise op."""
        out = node.output[0]
        shape, layout_axis = self.shapes.get(out), self._axis(out)
        n = sig.size
        for i, t in enumerate(node.input):
            if not t or t in self.layouts and self._const(t) is None:
                continue
            value = self._const(t)
            if value is None:
                shape_t = self.shapes.get(t)
                if shape_t is not None and n in shape_t and n > 1 and node.op_type not in ("Reshape", "Resize", "Upsample"):
                    raise _Refuse(moved, f"{node.op_type} node '{node.name}': computed operand '{t}'")
                continue
            if node.op_type in _NORMS:
                if i > 0 and value.ndim == 1 and value.shape[0] == n > 1:
                    edits.append((node.name, i, 0, sig))
                continue
            if node.op_type in ("Pad", "Resize", "Upsample", "Reshape", "Squeeze", "Unsqueeze", "Expand", "Tile",
                                "Transpose", "Flatten") or node.op_type.startswith("Reduce") or i > 0 and node.op_type in UNARY_OPS:
                continue  # shapes, pads, axes, scalar parameters: nothing per channel
            if shape is None or layout_axis is None:
                raise _Refuse(moved, f"{node.op_type} node '{node.name}': shape unknown")
            local = layout_axis - (len(shape) - value.ndim)
            if 0 <= local < value.ndim and value.shape[local] == n and n > 1:
                edits.append((node.name, i, local, sig))
            elif value.size > 1 and n in value.shape:
                raise _Refuse(moved, f"{node.op_type} node '{node.name}': constant '{t}' is not broadcast "
                                     "along the channel axis")

    def _concat(self, node: onnx.NodeProto, sigmas, moved: list[str]) -> None:
        out = node.output[0]
        out_atoms = self.layouts.get(out)
        parts = [self.layouts.get(t) for t in node.input]
        if out_atoms is None or any(p is None for p in parts):
            raise _Refuse(moved, f"Concat node '{node.name}': an input without a channel layout")
        if self._same(out_atoms, np.concatenate(parts)) and out_atoms.size != parts[0].size:
            offset, pieces = 0, []
            for t, p in zip(node.input, parts):
                pieces.append(sigmas.get(t, np.arange(p.size)) + offset)
                offset += p.size
            sigmas[out] = np.concatenate(pieces)
            return
        sig = sigmas[moved[0]]
        if all(self._same(p, out_atoms) and np.array_equal(sigmas.get(t, np.arange(p.size)), sig)
               for t, p in zip(node.input, parts)):
            sigmas[out] = sig  # along another axis
            return
        raise _Refuse(moved, f"Concat node '{node.name}' mixes orders")

    # ------------------------------------------------------------------------------------
    def _same(self, a: np.ndarray | None, b: np.ndarray | None) -> bool:
        """The same group channel at every position (tied atoms count as the same)."""
        if a is None or b is None or a.shape != b.shape:
            return False
        g = self.analysis.atom_group
        return bool(np.array_equal(g[a], g[b]) and np.array_equal(self.atom_channel[a], self.atom_channel[b])
                    and (g[a] >= 0).all())

    def _axis(self, tensor: str) -> int | None:
        layout = self.analysis.layouts.get(tensor)
        return None if layout is None else layout.axis

    def _const(self, name: str) -> np.ndarray | None:
        t = self.inits.get(name)
        return None if t is None else numpy_helper.to_array(t)


def _shapes(model: onnx.ModelProto) -> dict[str, list[int]]:
    out = {}
    for v in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        dims = v.type.tensor_type.shape.dim
        if v.type.tensor_type.HasField("shape"):
            out[v.name] = [d.dim_value if d.HasField("dim_value") else -1 for d in dims]
    for t in model.graph.initializer:
        out[t.name] = list(t.dims)
    return out


def _apply(model: onnx.ModelProto, edits: list[tuple[str, int, int, np.ndarray]]) -> None:
    """Permute the named node inputs (initializers), copy-on-write for shared ones."""
    g = model.graph
    nodes = {n.name: n for n in g.node}
    inits = {t.name: t for t in g.initializer}
    uses = Counter(i for n in g.node for i in n.input if i)
    taken = set(inits) | {o for n in g.node for o in n.output} | {n.name for n in g.node}
    pending: dict[tuple[str, int], list[tuple[int, np.ndarray]]] = {}
    for name, i, axis, sig in edits:
        pending.setdefault((name, i), []).append((axis, sig))
    for (name, i), steps in pending.items():
        node = nodes[name]
        old = node.input[i]
        value = numpy_helper.to_array(inits[old])
        for axis, sig in steps:
            value = np.take(value, sig, axis=axis)
        if uses[old] > 1:
            new = unique_name(f"{old}__perm", taken)
            g.initializer.append(numpy_helper.from_array(np.ascontiguousarray(value), new))
            node.input[i] = new
            uses[old] -= 1
        else:
            inits[old].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(value), old))


__all__ = ["PermuteResult", "permute_groups"]
