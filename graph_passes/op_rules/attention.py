"""Attention: the activation x activation MatMuls (Q K^T, attention x V).

Heads reach these MatMuls as a channel layout on a *batch* axis ([B, H, S, Dh]: the Reshape
that splits the projection's D rows into H blocks of Dh carries one atom per head, see
:mod:`~graph_passes.op_rules.shape_ops`). A batched MatMul computes every head on its own,
so the heads of both operands are tied position by position and the product keeps them on the
same axis: Q K^T couples a head's Q and K rows, attention x V carries V's heads on to the
output (and, through the Transpose and Reshape back to [B, S, D], to the output projection's
input columns). Grouped-query attention arrives with each K/V head repeated for its query heads
(Expand + Reshape), so the tie joins one K/V head with all the query heads that share it.

Anything else is a wall with its reason: channels on a matrix axis (M, K or N: the head
dimension itself, or a MatMul that mixes heads), one operand with heads and the other without a
known layout, or heads broadcast from size 1.
"""

from __future__ import annotations

from ..layouts import Layout
from .context import PropagationContext, PruneContext
from .registry import register
from .weights import MatMulRule


@register("MatMul", extends=True)
class AttentionMatMulRule(MatMulRule):
    """MatMul: by a constant weight (a weight layer, :class:`MatMulRule`), or of two
    activations with heads on a shared batch axis."""

    def propagate(self, name, node, ctx: PropagationContext) -> None:
        a, b = node.input[0], node.input[1]
        if ctx.const(a) is not None or ctx.const(b) is not None:
            super().propagate(name, node, ctx)
            return
        la, lb = ctx.layout(a), ctx.layout(b)
        if la is None and lb is None:
            return  # nothing channel-like flows through
        a_shape, b_shape, out_shape = ctx.shape(a), ctx.shape(b), ctx.shape(node.output[0])
        if a_shape is None or b_shape is None or out_shape is None:
            ctx.opaque(name, node, "activation MatMul with unknown shapes")
            return
        rank = len(out_shape)
        if not (len(a_shape) == len(b_shape) == rank >= 3):
            ctx.opaque(name, node, f"activation MatMul of ranks {len(a_shape)} and {len(b_shape)}"
                                   " (heads are followed through batched MatMuls of one rank)")
            return
        for lay in (la, lb):
            if lay is not None and lay.axis >= rank - 2:
                ctx.opaque(name, node, f"channels on matrix axis {lay.axis} of an activation MatMul"
                                       " (it mixes them)")
                return
        if la is None or lb is None:
            missing = a if la is None else b
            ctx.opaque(name, node, f"operand '{missing}' has heads with no known layout")
            return
        if la.axis != lb.axis or la.size != lb.size or out_shape[la.axis] != la.size:
            ctx.opaque(name, node, f"operands carry heads on axes {la.axis} ({la.size}) and "
                                   f"{lb.axis} ({lb.size}): broadcast or mismatched")
            return
        ctx.atoms.tie(la.atoms, lb.atoms)
        ctx.set_layout(node.output[0], Layout(la.axis, la.atoms))

    def prune(self, name, node, ctx: PruneContext) -> None:
        if ctx.graph.constant(node.input[1]) is not None or ctx.graph.constant(node.input[0]) is not None:
            super().prune(name, node, ctx)
        # two activations: no constants to edit; the operands' producers shrink the heads
