"""Ops that work within each channel (pooling, padding, resizing, reductions over other axes),
ops that move pixels between space and channels (DepthToSpace / SpaceToDepth), ops that mix
channels without weights (walls, each with its reason), and control flow.

Axes (Pad's pads and axes, a Reduce's axes) are read against the tracked channel axis, wherever a
Transpose put it (a tf2onnx graph keeps NHWC between its convs)."""

from __future__ import annotations

import numpy as np

from ..layouts import Layout
from .context import PropagationContext, PruneContext
from .registry import OpRule, register
from .shape_ops import _axes_of, _norm_axis


@register("MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool",
          "GlobalLpPool", "MaxRoiPool")
class PoolRule(OpRule):
    """NC... pooling: channels on axis 1 pass through. MaxPool's index output encodes the
    channel offset, so using it is a wall. ``auto_pad`` (SAME_UPPER / SAME_LOWER) needs no edit
    when channels go: its pads depend on the spatial sizes alone (so do a Conv's)."""

    def propagate(self, name, node, ctx: PropagationContext) -> None:
        layout = ctx.layout(node.input[0])
        if layout is None:
            return
        if layout.axis != 1 or node.op_type == "MaxRoiPool":
            ctx.opaque(name, node, "pools a tensor whose channels are not on axis 1")
            return
        if len(node.output) > 1 and node.output[1]:
            ctx.opaque(name, node, "MaxPool indices depend on the channel count")
            return
        ctx.passthrough(node.input[0], node.output[0])


@register("Pad")
class PadRule(OpRule):
    def propagate(self, name, node, ctx: PropagationContext) -> None:
        layout, shape = ctx.layout(node.input[0]), ctx.shape(node.input[0])
        if layout is None:
            return
        pads = ctx.attr(node, "pads") if ctx.opset < 11 else (
            ctx.const(node.input[1]) if len(node.input) > 1 and node.input[1] else None
        )
        axes = _axes_of(node, ctx, 3) if ctx.opset >= 18 else []
        if pads is None or axes is None or shape is None:
            ctx.opaque(name, node, "pads computed at run time")
            return
        pads = [int(p) for p in np.asarray(pads).ravel()]
        axes = [_norm_axis(a, len(shape)) for a in axes] or list(range(len(shape)))
        n = len(axes)
        if layout.axis in axes:
            k = axes.index(layout.axis)
            if pads[k] != 0 or pads[k + n] != 0:
                ctx.opaque(name, node, "pads the channel axis")
                return
        ctx.passthrough(node.input[0], node.output[0])


@register("Resize", "Upsample")
class ResizeRule(OpRule):
    def propagate(self, name, node, ctx: PropagationContext) -> None:
        layout = ctx.layout(node.input[0])
        shape, out_shape = ctx.shape(node.input[0]), ctx.shape(node.output[0])
        if layout is None:
            return
        if shape is None or out_shape is None or out_shape[layout.axis] != layout.size:
            ctx.opaque(name, node, "resizes the channel axis (or shapes unknown)")
            return
        if ctx.attr(node, "axes") is not None:
            ctx.opaque(name, node, "Resize with explicit axes")
            return
        ctx.passthrough(node.input[0], node.output[0])

    def prune(self, name, node, ctx: PruneContext) -> None:
        keep = ctx.keep_mask(node.input[0])
        if keep is None or node.op_type != "Resize" or len(node.input) < 4 or not node.input[3]:
            return
        sizes = ctx.const(node.input[3]).astype(np.int64).copy()
        sizes[ctx.layout(node.input[0]).axis] = int(keep.sum())
        ctx.set_const_input(name, node, 3, sizes)


_REDUCE_OPS = ("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1",
               "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare")


@register(*_REDUCE_OPS)
class ReduceRule(OpRule):
    """Reductions over axes other than the channel axis keep channels apart."""

    def propagate(self, name, node, ctx: PropagationContext) -> None:
        layout, shape = ctx.layout(node.input[0]), ctx.shape(node.input[0])
        if layout is None:
            return
        axes_from_input = ctx.opset >= 18 or (node.op_type == "ReduceSum" and ctx.opset >= 13)
        axes = _axes_of(node, ctx, 1) if axes_from_input else (ctx.attr(node, "axes") or [])
        if axes is None or shape is None:
            ctx.opaque(name, node, "reduction axes computed at run time")
            return
        axes = [_norm_axis(int(a), len(shape)) for a in axes]
        if not axes and int(ctx.attr(node, "noop_with_empty_axes", 0)):
            ctx.passthrough(node.input[0], node.output[0])
            return
        if not axes or layout.axis in axes:
            ctx.opaque(name, node, "reduces over the channel axis")
            return
        keepdims = int(ctx.attr(node, "keepdims", 1))
        new_axis = layout.axis if keepdims else layout.axis - sum(a < layout.axis for a in axes)
        ctx.passthrough(node.input[0], node.output[0], axis=new_axis)


@register("Softmax", "LogSoftmax", "Hardmax", "LayerNormalization")
class AxisNormRule(OpRule):
    """Normalise along (or from) one axis: fine as long as the channel axis is not involved."""

    def propagate(self, name, node, ctx: PropagationContext) -> None:
        layout, shape = ctx.layout(node.input[0]), ctx.shape(node.input[0])
        if layout is None:
            return
        if shape is None:
            ctx.opaque(name, node, "shape unknown")
            return
        default = -1 if (ctx.opset >= 13 or node.op_type == "LayerNormalization") else 1
        axis = _norm_axis(int(ctx.attr(node, "axis", default)), len(shape))
        mixes = layout.axis >= axis if (node.op_type == "LayerNormalization" or ctx.opset < 13) else layout.axis == axis
        if mixes:
            ctx.opaque(name, node, "normalises across the channel axis")
            return
        ctx.passthrough(node.input[0], node.output[0])
        for out in node.output[1:]:
            if out:
                ctx.opaque(name, node, "mean/inv-std-dev outputs are used")
                return


@register("DepthToSpace", "SpaceToDepth")
class SpaceDepthRule(OpRule):
    """Blocks of ``bs x bs`` pixels move between space and channels (NCHW, channels on axis 1).

    DepthToSpace builds output channel ``c`` from ``bs * bs`` input channels: ``b * C' + c``
    (mode DCR, the default and TensorFlow's) or ``c * bs * bs + b`` (CRD), ``b`` the position in
    the block. Those input channels are tied into one unit, carried on by one representative
    atom: a unit goes as a whole, so every block keeps the same channels in the same order and
    the op needs no edit. SpaceToDepth puts input channel ``c`` at ``b * C + c`` for every ``b``:
    its atoms repeat once per block position.
    """

    def propagate(self, name, node, ctx: PropagationContext) -> None:
        layout, shape = ctx.layout(node.input[0]), ctx.shape(node.input[0])
        if layout is None:
            return
        moves = "moves channels into space" if node.op_type == "DepthToSpace" else "moves space into channels"
        if shape is None or len(shape) != 4 or layout.axis != 1:
            ctx.opaque(name, node, f"{moves}, and its input's channels are not on axis 1 of a 4-D tensor")
            return
        bs = int(ctx.attr(node, "blocksize"))
        block = bs * bs
        if node.op_type == "SpaceToDepth":
            ctx.set_layout(node.output[0], Layout(1, np.tile(layout.atoms, block)))
            return
        mode = ctx.attr(node, "mode", b"DCR")
        mode = mode.decode() if isinstance(mode, bytes) else str(mode)
        if layout.size % block or mode not in ("DCR", "CRD"):
            ctx.opaque(name, node, f"{moves}: {layout.size} channels, blocksize {bs}, mode {mode}")
            return
        # units[c] = the input atoms that make output channel c
        units = (layout.atoms.reshape(block, -1).T if mode == "DCR" else layout.atoms.reshape(-1, block))
        for unit in units:
            ctx.atoms.tie_all(unit)
        ctx.set_layout(node.output[0], Layout(1, units[:, 0].copy()))


_WALLS = {
    "LRN": "local response normalisation mixes neighbouring channels",
    "GroupNormalization": "group normalisation mixes the channels of a group",
    "MeanVarianceNormalization": "normalises across axes that may include the channels",
    "Shape": "reads the channel count at run time",
    "Size": "reads the element count at run time",
    "If": "control flow: channels are not followed into subgraphs",
    "Loop": "control flow: channels are not followed into subgraphs",
    "Scan": "control flow: channels are not followed into subgraphs",
    "Einsum": "general tensor contraction",
    "ArgMax": "index output depends on channel positions",
    "ArgMin": "index output depends on channel positions",
    "TopK": "selection across positions",
    "NonZero": "data-dependent output",
    "Tile": "repeats tensors",
    "ScatterND": "scatters by index",
    "ScatterElements": "scatters by index",
    "GatherND": "gathers by index",
    "GatherElements": "gathers by index",
    "CumSum": "running sum along an axis",
    "Compress": "data-dependent selection",
}


@register(*_WALLS)
class WallRule(OpRule):
    def propagate(self, name, node, ctx: PropagationContext) -> None:
        ctx.opaque(name, node, _WALLS[node.op_type])
