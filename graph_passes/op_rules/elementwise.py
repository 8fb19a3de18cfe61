"""Element-wise ops: unary activations, broadcasting n-ary arithmetic, per-channel normalisation.

Unary ops act on every value alone, so channels pass straight through. Broadcasting ops tie the
channels of every operand that spans the channel axis and slice every per-channel constant; an
operand that is broadcast *into* all channels (size 1 on that axis, but computed from channels)
blocks its own channel, because removing it would change every output channel.
"""

from __future__ import annotations

import numpy as np

from ..layouts import Layout
from .context import PropagationContext, PruneContext
from .registry import OpRule, register

UNARY_OPS = (
    "Relu", "LeakyRelu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Gelu", "Erf",
    "Softplus", "Softsign", "Mish", "Elu", "Selu", "Celu", "ThresholdedRelu", "Swish", "Exp", "Log",
    "Abs", "Neg", "Sqrt", "Reciprocal", "Floor", "Ceil", "Round", "Sign", "Sin", "Cos", "Tan",
    "Asin", "Acos", "Atan", "Sinh", "Cosh", "Asinh", "Acosh", "Atanh", "Not", "IsNaN", "IsInf",
    "Identity", "Cast", "CastLike", "Dropout",
)


@register(*UNARY_OPS)
class UnaryRule(OpRule):
    """Per-value ops. Extra inputs (Clip min/max, Dropout ratio, CastLike target) must be constant."""

    def propagate(self, name, node, ctx: PropagationContext) -> None:
        for extra in node.input[1:]:
            if extra and ctx.const(extra) is None and node.op_type != "CastLike":
                ctx.opaque(name, node, f"non-constant parameter input '{extra}'")
                return
        for out in node.output:  # Dropout's mask has the data's shape: same layout
            ctx.passthrough(node.input[0], out)


def _aligned_dims(shape: list[int], rank: int) -> list[int]:
    return [1] * (rank - len(shape)) + list(shape)


@register("Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "Where", "PRelu",
          "Mod", "Equal", "Greater", "GreaterOrEqual", "Less", "LessOrEqual", "And", "Or", "Xor",
          "BitShift")
class BroadcastRule(OpRule):
    """Numpy-style broadcasting over any number of operands."""

    def propagate(self, name, node, ctx: PropagationContext) -> None:
        out_shape = ctx.shape(node.output[0])
        if out_shape is None:
            ctx.opaque(name, node, "output shape unknown")
            return
        rank = len(out_shape)
        laid = []  # (aligned axis, layout) of every operand that carries channels
        for t in node.input:
            if not t or ctx.const(t) is not None:
                continue
            layout, shape = ctx.layout(t), ctx.shape(t)
            if shape is None:
                ctx.opaque(name, node, f"shape of '{t}' unknown")
                return
            if layout is not None:
                laid.append((layout.axis + rank - len(shape), layout))
        full = [(a, lay) for a, lay in laid if lay.size == out_shape[a]]
        axes = {a for a, _ in full}
        if len(axes) > 1:
            ctx.opaque(name, node, f"operands carry channels on different axes {sorted(axes)}")
            return
        if not axes:
            return  # nothing channel-like flows through (e.g. shape arithmetic)
        axis = axes.pop()
        for a, lay in laid:
            if lay.size != out_shape[a] or (a != axis and lay.size > 1):
                ctx.atoms.block(lay.atoms, f"{node.op_type} '{name}' broadcasts it into all channels")
        for t in node.input:  # operands without a layout that span the channel axis: unknown
            if t and ctx.const(t) is None and ctx.layout(t) is None:
                dims = _aligned_dims(ctx.shape(t), rank)
                if dims[axis] > 1:
                    ctx.opaque(name, node, f"operand '{t}' spans the channels with no known layout")
                    return
        first = full[0][1]
        for _, lay in full[1:]:
            ctx.atoms.tie(first.atoms, lay.atoms)
        ctx.set_layout(node.output[0], Layout(axis, first.atoms))
        for t in node.input:
            value = ctx.const(t) if t else None
            if value is not None and _aligned_dims(list(value.shape), rank)[axis] == first.size > 1:
                ctx.note_constant(name, t, node.output[0])

    def prune(self, name, node, ctx: PruneContext) -> None:
        keep = ctx.keep_mask(node.output[0])
        if keep is None:
            return
        layout = ctx.layout(node.output[0])
        rank = len(ctx.graph.shape(node.output[0]))
        for i, t in enumerate(node.input):
            value = ctx.const(t) if t else None
            if value is None:
                continue
            local_axis = layout.axis - (rank - value.ndim)
            if local_axis >= 0 and value.shape[local_axis] == keep.shape[0] and keep.shape[0] > 1:
                ctx.set_const_input(name, node, i, np.compress(keep, value, axis=local_axis))


@register("BatchNormalization", "InstanceNormalization")
class PerChannelNormRule(OpRule):
    """Normalisations whose parameters are per channel on axis 1 and that never mix channels."""

    def propagate(self, name, node, ctx: PropagationContext) -> None:
        layout = ctx.layout(node.input[0])
        params = [t for t in node.input[1:] if t]
        if any(ctx.const(t) is None for t in params):
            ctx.opaque(name, node, "non-constant normalisation parameters")
            return
        if node.op_type == "BatchNormalization" and len([o for o in node.output if o]) > 1:
            ctx.opaque(name, node, "training-mode BatchNormalization")
            return
        if layout is None:
            return
        if layout.axis != 1:
            ctx.opaque(name, node, f"channels on axis {layout.axis}, the op normalises axis 1")
            return
        ctx.passthrough(node.input[0], node.output[0])
        for t in params:
            ctx.note_constant(name, t, node.input[0])

    def prune(self, name, node, ctx: PruneContext) -> None:
        keep = ctx.keep_mask(node.input[0])
        if keep is None:
            return
        for i in range(1, len(node.input)):
            if node.input[i]:
                ctx.set_const_input(name, node, i, ctx.const(node.input[i])[keep])
