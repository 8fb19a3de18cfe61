"""Ops that work within each channel (pooling, padding, resizing, reductions over other axes),
ops that mix channels without weights (walls, each with its reason), and control flow."""

from __future__ import annotations

import numpy as np

from .context import PropagationContext, PruneContext
from .registry import OpRule, register
from .shape_ops import _axes_of, _norm_axis


@register("MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool",
          "GlobalLpPool", "MaxRoiPool")
class PoolRule(OpRule):
    """NC... pooling: channels on axis 1 pass through. MaxPool's index output encodes the
    channel offset, so using it is a wall."""

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


_WALLS = {
    "LRN": "local response normalisation mixes neighbouring channels",
    "GroupNormalization": "group normalisation mixes the channels of a group",
    "MeanVarianceNormalization": "normalises across axes that may include the channels",
    "Shape": "reads the channel count at run time",
    "Size": "reads the element count at run time",
    "DepthToSpace": "moves channels into space",
    "SpaceToDepth": "moves space into channels",
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
