"""Ops that move, cut, join or reshape tensors: the channel axis is followed through each.

Concat along channels concatenates layouts (each segment keeps its own atoms); Split and Slice
on the channel axis cut them; Flatten and Reshape that merge the channel axis with the axes
after it repeat each atom once per merged position (the H*W rows a Gemm sees per channel).
A Reshape that splits the channel axis into two ([.., D] -> [.., H, Dh], attention heads) ties
each block of Dh channels into one unit and carries one atom per block on the H axis, or, when
the outer axis is later picked apart ([.., 3D] -> [.., 3, D], a fused Q/K/V projection), ties
the segments position by position and carries the D axis. Anything else that reorders the
channel axis (a channel shuffle's merge back) is a wall.
"""

from __future__ import annotations

import numpy as np

from ..layouts import Layout
from .context import PropagationContext, PruneContext
from .registry import EmbeddingFacts, OpRule, register


def _norm_axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def _axes_of(node, ctx, input_index: int, attr: str = "axes") -> list[int] | None:
    """Axes from an attribute (old opsets) or a constant input (new opsets); None if dynamic."""
    if len(node.input) > input_index and node.input[input_index]:
        value = ctx.const(node.input[input_index])
        return None if value is None else [int(a) for a in np.asarray(value).ravel()]
    value = ctx.attr(node, attr)
    return [int(a) for a in value] if value is not None else []


def _merge_layout(layout: Layout, in_shape: list[int], out_shape: list[int]) -> Layout | None:
    """Layout after a row-major reshape that keeps the axes before the channel axis and merges
    the channel axis with zero or more following axes into one output axis; None otherwise."""
    c = layout.axis
    lead = int(np.prod(in_shape[:c]))
    acc, j = 1, 0
    while j < len(out_shape) and acc < lead:
        acc *= out_shape[j]
        j += 1
    while j < len(out_shape) and out_shape[j] == 1 and in_shape[c] != 1 and acc == lead:
        if int(np.prod(out_shape[: j + 1])) != lead:
            break
        j += 1  # size-1 axes inserted before the channel axis
    if acc != lead or j >= len(out_shape):
        return _merge_outer(layout, in_shape, out_shape)
    for m in range(1, len(in_shape) - c + 1):
        merged = int(np.prod(in_shape[c : c + m]))
        if merged == out_shape[j] and int(np.prod(in_shape[c + m :])) == int(np.prod(out_shape[j + 1 :])):
            inner = int(np.prod(in_shape[c + 1 : c + m]))
            return Layout(j, np.repeat(layout.atoms, inner))
        if merged > out_shape[j]:
            break
    return None


def _split_axes(layout: Layout, in_shape: list[int], out_shape: list[int]) -> int | None:
    """Output axis j when a row-major reshape splits the channel axis C into two output axes
    (j, j + 1) of sizes A * B = C, both > 1, keeping the axes before and after; else None."""
    c = layout.axis
    lead, tail = int(np.prod(in_shape[:c])), int(np.prod(in_shape[c + 1 :]))
    for j in range(len(out_shape) - 1):
        if int(np.prod(out_shape[:j])) != lead:
            continue
        a, b = out_shape[j], out_shape[j + 1]
        if a > 1 and b > 1 and a * b == in_shape[c] and int(np.prod(out_shape[j + 2 :])) == tail:
            return j
    return None


def _follow_axis(graph, tensor: str, axis: int, depth: int = 0) -> bool:
    """True when some reader, through Transpose / Squeeze / Unsqueeze / Identity, picks
    entries of ``tensor``'s axis ``axis`` apart (Gather, Split or Slice along it)."""
    if depth > 8:
        return False
    shape = graph.shape(tensor)
    for reader in graph.consumers.get(tensor, []):
        node = graph.nodes[reader]
        if node.op_type in ("Gather", "Split", "Slice") and node.input[0] == tensor:
            if shape is None:
                continue
            if node.op_type == "Slice":
                axes_value = graph.constant(node.input[3]) if len(node.input) > 3 and node.input[3] else None
                starts = graph.constant(node.input[1]) if len(node.input) > 1 else None
                if axes_value is not None:
                    picked_axes = [_norm_axis(int(x), len(shape)) for x in np.asarray(axes_value).ravel()]
                elif starts is not None:
                    picked_axes = list(range(np.asarray(starts).size))
                else:
                    picked_axes = list(range(len(shape)))  # unknown: counts as picking apart
                if axis in picked_axes:
                    return True
                continue
            if _norm_axis(int(graph.attr(node, "axis", 0)), len(shape)) == axis:
                return True
            continue
        out = node.output[0] if node.output else ""
        out_shape = graph.shape(out) if out else None
        if shape is None or out_shape is None:
            continue
        if node.op_type == "Transpose":
            perm = graph.attr(node, "perm") or list(reversed(range(len(shape))))
            if _follow_axis(graph, out, list(perm).index(axis), depth + 1):
                return True
        elif node.op_type in ("Squeeze", "Unsqueeze", "Identity"):
            moved = _merge_layout(Layout(axis, np.arange(shape[axis])), shape, out_shape)
            if moved is not None and _follow_axis(graph, out, moved.axis, depth + 1):
                return True
    return False


def _split_layout(name, node, layout: Layout, in_shape, out_shape, ctx: PropagationContext) -> Layout | None:
    """Layout after a reshape that splits the channel axis C into (A, B), A * B = C.

    Two sound readings, chosen by what reads the result:

    * *blocks* (attention heads, [.., D] -> [.., H, Dh]): the B channels of each block are tied
      into one unit and the layout sits on the A axis, one representative atom per block; the
      reshape's A entry shrinks to the blocks kept;
    * *segments* (a fused projection, [.., 3D] -> [.., 3, D], whose A axis is later picked apart
      by Gather / Split / Slice): the A segments are tied position by position and the layout
      sits on the B axis; the reshape's B entry shrinks.
    """
    j = _split_axes(layout, in_shape, out_shape)
    if j is None:
        return None
    target = np.asarray(ctx.const(node.input[1])).astype(np.int64).ravel()
    if target.shape[0] != len(out_shape) or (target[j : j + 2] == 0).any():
        return None  # a 0 (copy an input dim) at the split axes: not followed
    a, b = out_shape[j], out_shape[j + 1]
    blocks = layout.atoms.reshape(a, b)
    if _follow_axis(ctx.graph, node.output[0], j):
        for k in range(1, a):
            ctx.atoms.tie(blocks[0], blocks[k])
        return Layout(j + 1, blocks[0].copy())
    for k in range(a):
        ctx.atoms.tie_all(blocks[k])
    return Layout(j, blocks[:, 0].copy())


def _merge_outer(layout: Layout, in_shape: list[int], out_shape: list[int]) -> Layout | None:
    """Layout after a reshape that merges the *last* (channel) axis with axes before it, e.g. a
    bidirectional recurrent output ``[seq, batch, D, H] -> [seq, batch, D*H]``: the channel
    atoms repeat once per merged outer position. None for any other reshape."""
    c = layout.axis
    if c != len(in_shape) - 1 or not out_shape:
        return None
    for k in range(c - 1, -1, -1):
        if (list(in_shape[:k]) == list(out_shape[:-1])
                and int(np.prod(in_shape[k:])) == out_shape[-1]):
            return Layout(len(out_shape) - 1, np.tile(layout.atoms, int(np.prod(in_shape[k:c]))))
    return None


@register("Flatten", "Reshape", "Squeeze", "Unsqueeze")
class ReshapeRule(OpRule):
    def propagate(self, name, node, ctx: PropagationContext) -> None:
        layout = ctx.layout(node.input[0])
        in_shape, out_shape = ctx.shape(node.input[0]), ctx.shape(node.output[0])
        if layout is None:
            return
        if in_shape is None or out_shape is None:
            ctx.opaque(name, node, "shapes unknown")
            return
        if node.op_type == "Reshape" and ctx.const(node.input[1]) is None:
            ctx.opaque(name, node, "target shape is computed at run time")
            return
        merged = _merge_layout(layout, in_shape, out_shape)
        if merged is None and node.op_type == "Reshape":
            merged = _split_layout(name, node, layout, in_shape, out_shape, ctx)
        if merged is None:
            ctx.opaque(name, node, f"reshape {in_shape} -> {out_shape} splits or reorders the channel axis")
            return
        ctx.set_layout(node.output[0], merged)

    def prune(self, name, node, ctx: PruneContext) -> None:
        keep = ctx.keep_mask(node.output[0])
        if keep is None or node.op_type != "Reshape":
            return
        layout = ctx.layout(node.output[0])
        target = ctx.const(node.input[1]).astype(np.int64).copy()
        if target[layout.axis] > 0:
            target[layout.axis] = int(keep.sum())
            ctx.set_const_input(name, node, 1, target)


@register("Transpose")
class TransposeRule(OpRule):
    def propagate(self, name, node, ctx: PropagationContext) -> None:
        layout = ctx.layout(node.input[0])
        shape = ctx.shape(node.input[0])
        if layout is None:
            return
        perm = ctx.attr(node, "perm")
        if perm is None and shape is None:
            ctx.opaque(name, node, "no perm and the input's rank is unknown")
            return
        perm = list(perm) if perm is not None else list(reversed(range(len(shape))))
        ctx.passthrough(node.input[0], node.output[0], axis=perm.index(layout.axis))


@register("Concat")
class ConcatRule(OpRule):
    def propagate(self, name, node, ctx: PropagationContext) -> None:
        out_shape = ctx.shape(node.output[0])
        if out_shape is None:
            ctx.opaque(name, node, "output shape unknown")
            return
        axis = _norm_axis(int(ctx.attr(node, "axis")), len(out_shape))
        inputs = [t for t in node.input if t]
        layouts = [ctx.layout(t) for t in inputs]
        laid_axes = {lay.axis for lay in layouts if lay is not None}
        if not laid_axes:
            return
        if len(laid_axes) > 1:
            ctx.opaque(name, node, f"inputs carry channels on different axes {sorted(laid_axes)}")
            return
        ch_axis = laid_axes.pop()
        if ch_axis == axis:
            segments = []
            for t, lay in zip(inputs, layouts):
                if lay is None:  # a constant or opaque segment: its channels are new, blocked atoms
                    if ctx.shape(t) is None:
                        ctx.opaque(name, node, f"shape of segment '{t}' unknown")
                        return
                    lay = Layout(axis, ctx.atoms.new(name, ctx.shape(t)[axis], False))
                    ctx.atoms.block(lay.atoms, f"Concat '{name}': segment '{t}' is not prunable")
                segments.append(lay.atoms)
            ctx.set_layout(node.output[0], Layout(axis, np.concatenate(segments)))
            return
        present = [lay for lay in layouts if lay is not None]
        for t, lay in zip(inputs, layouts):
            if lay is None and ctx.const(t) is None:
                ctx.opaque(name, node, f"input '{t}' has no channel layout")
                return
        for lay in present[1:]:
            ctx.atoms.tie(present[0].atoms, lay.atoms)
        ctx.set_layout(node.output[0], present[0])

    def prune(self, name, node, ctx: PruneContext) -> None:
        keep = ctx.keep_mask(node.output[0])
        layout = ctx.layout(node.output[0])
        if keep is None:
            return
        axis = _norm_axis(int(ctx.attr(node, "axis")), len(ctx.graph.shape(node.output[0])))
        if axis == layout.axis:
            return
        for i, t in enumerate(node.input):
            value = ctx.const(t) if t else None
            if value is not None:
                ctx.set_const_input(name, node, i, np.compress(keep, value, axis=layout.axis))


@register("Split")
class SplitRule(OpRule):
    def propagate(self, name, node, ctx: PropagationContext) -> None:
        layout, shape = ctx.layout(node.input[0]), ctx.shape(node.input[0])
        if layout is None:
            return
        axis = _norm_axis(int(ctx.attr(node, "axis", 0)), len(shape))
        if axis != layout.axis:
            for out in node.output:
                ctx.passthrough(node.input[0], out)
            return
        start = 0
        for out in node.output:
            size = ctx.shape(out)[axis] if ctx.shape(out) else None
            if size is None:
                ctx.opaque(name, node, "output shapes unknown")
                return
            ctx.set_layout(out, Layout(axis, layout.atoms[start : start + size]))
            start += size

    def prune(self, name, node, ctx: PruneContext) -> None:
        layout = ctx.layout(node.input[0])
        if layout is None or ctx.keep_mask(node.input[0]) is None:
            return
        if layout.axis != _norm_axis(int(ctx.attr(node, "axis", 0)), len(ctx.graph.shape(node.input[0]))):
            return
        sizes = []
        for out in node.output:
            keep = ctx.keep_mask(out)
            sizes.append(int(keep.sum()) if keep is not None else ctx.layout(out).size)
        if ctx.graph.opset >= 13:
            ctx.drop_attr(node, "num_outputs")
            ctx.add_const_input(node, 1, f"{name}__split", np.asarray(sizes, dtype=np.int64))
        else:
            ctx.set_attr(node, "split", sizes)


def _slice_params(node, ctx) -> tuple[list[int], list[int], list[int], list[int]] | None:
    if ctx.opset < 10:
        starts, ends = ctx.attr(node, "starts"), ctx.attr(node, "ends")
        axes = ctx.attr(node, "axes") or list(range(len(starts)))
        return list(starts), list(ends), list(axes), [1] * len(starts)
    values = []
    for i in range(1, 5):
        if len(node.input) > i and node.input[i]:
            v = ctx.const(node.input[i])
            if v is None:
                return None
            values.append([int(x) for x in np.asarray(v).ravel()])
        else:
            values.append(None)
    starts, ends, axes, steps = values
    axes = axes if axes is not None else list(range(len(starts)))
    return starts, ends, axes, steps if steps is not None else [1] * len(starts)


@register("Slice")
class SliceRule(OpRule):
    def propagate(self, name, node, ctx: PropagationContext) -> None:
        layout, shape = ctx.layout(node.input[0]), ctx.shape(node.input[0])
        if layout is None:
            return
        params = _slice_params(node, ctx)
        if params is None or shape is None:
            ctx.opaque(name, node, "slice parameters computed at run time")
            return
        starts, ends, axes, steps = params
        axes = [_norm_axis(a, len(shape)) for a in axes]
        if layout.axis not in axes:
            ctx.passthrough(node.input[0], node.output[0])
            return
        k = axes.index(layout.axis)
        if steps[k] != 1:
            ctx.opaque(name, node, "strided slice over the channel axis")
            return
        lo, hi, _ = slice(starts[k], ends[k], 1).indices(layout.size)
        ctx.set_layout(node.output[0], Layout(layout.axis, layout.atoms[lo:hi]))

    def prune(self, name, node, ctx: PruneContext) -> None:
        layout = ctx.layout(node.input[0])
        keep = ctx.keep_mask(node.input[0])
        if layout is None or keep is None:
            return
        starts, ends, axes, _ = _slice_params(node, ctx)
        axes = [_norm_axis(a, len(ctx.graph.shape(node.input[0]))) for a in axes]
        if layout.axis not in axes:
            return
        if ctx.graph.opset < 10:
            raise ValueError(f"Slice '{name}': channel slicing needs opset >= 10")
        k = axes.index(layout.axis)
        lo, hi, _ = slice(starts[k], ends[k], 1).indices(layout.size)
        starts[k], ends[k] = int(keep[:lo].sum()), int(keep[:hi].sum())
        ctx.set_const_input(name, node, 1, np.asarray(starts, dtype=np.int64))
        ctx.set_const_input(name, node, 2, np.asarray(ends, dtype=np.int64))


@register("Gather")
class GatherRule(OpRule):
    def embedding_table(self, node, graph) -> EmbeddingFacts | None:
        """Gather along axis 0 of a constant 2-D float32 table by run-time indices: an embedding."""
        table = graph.constant(node.input[0])
        if table is None or table.ndim != 2 or table.dtype != np.float32 or table.size == 0:
            return None
        if len(node.input) < 2 or graph.constant(node.input[1]) is not None:
            return None
        if _norm_axis(int(graph.attr(node, "axis", 0)), 2) != 0:
            return None
        return EmbeddingFacts(node.input[0], int(table.shape[0]), int(table.shape[1]))

    def propagate(self, name, node, ctx: PropagationContext) -> None:
        layout, shape = ctx.layout(node.input[0]), ctx.shape(node.input[0])
        idx_shape = ctx.shape(node.input[1])
        if layout is None:
            return
        if shape is None or idx_shape is None:
            ctx.opaque(name, node, "shapes unknown")
            return
        axis = _norm_axis(int(ctx.attr(node, "axis", 0)), len(shape))
        if axis == layout.axis:
            ctx.opaque(name, node, "gathers along the channel axis")
            return
        new_axis = layout.axis if layout.axis < axis else layout.axis + len(idx_shape) - 1
        ctx.passthrough(node.input[0], node.output[0], axis=new_axis)


@register("Expand")
class ExpandRule(OpRule):
    def propagate(self, name, node, ctx: PropagationContext) -> None:
        layout, shape = ctx.layout(node.input[0]), ctx.shape(node.input[0])
        out_shape = ctx.shape(node.output[0])
        if layout is None:
            return
        if shape is None or out_shape is None or ctx.const(node.input[1]) is None:
            ctx.opaque(name, node, "target shape unknown")
            return
        axis = layout.axis + len(out_shape) - len(shape)
        if out_shape[axis] != layout.size:
            ctx.opaque(name, node, "expands the channel axis")
            return
        ctx.passthrough(node.input[0], node.output[0], axis=axis)

    def prune(self, name, node, ctx: PruneContext) -> None:
        keep = ctx.keep_mask(node.output[0])
        if keep is None:
            return
        layout = ctx.layout(node.output[0])
        target = ctx.const(node.input[1]).astype(np.int64).copy()
        pos = layout.axis - (len(ctx.graph.shape(node.output[0])) - target.shape[0])
        if pos >= 0 and target[pos] == keep.shape[0]:
            target[pos] = int(keep.sum())
            ctx.set_const_input(name, node, 1, target)
