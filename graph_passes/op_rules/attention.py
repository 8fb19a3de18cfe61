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

The fused ``Attention`` op (opset 23) gets the same coupling from its head-count attributes.
"""

from __future__ import annotations

import numpy as np

from ..layouts import Layout
from .context import PropagationContext, PruneContext
from .registry import OpRule, ProductFacts, register
from .shape_ops import ReshapeRule, _follow_axis, _merge_layout, _split_axes
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

    def activation_product(self, node, graph) -> ProductFacts | None:
        """Both operands activations, static shapes of one rank >= 3 with the same batch dims (no
        broadcasting): ``[.., m, k] x [.., k, n]``. A weight MatMul is a weight layer instead."""
        a, b = node.input[0], node.input[1]
        if graph.constant(a) is not None or graph.constant(b) is not None:
            return None
        a_shape, b_shape, out_shape = graph.shape(a), graph.shape(b), graph.shape(node.output[0])
        if not a_shape or not b_shape or not out_shape or any(
                d is None or int(d) < 1 for d in (*a_shape, *b_shape, *out_shape)):
            return None
        if not (len(a_shape) == len(b_shape) == len(out_shape) >= 3):
            return None
        if list(a_shape[:-2]) != list(b_shape[:-2]) or a_shape[-1] != b_shape[-2]:
            return None
        return ProductFacts((0, 1), tuple(int(d) for d in a_shape[1:-2]), int(a_shape[-2]),
                            int(a_shape[-1]), int(b_shape[-1]))

    def prune(self, name, node, ctx: PruneContext) -> None:
        if ctx.graph.constant(node.input[1]) is not None or ctx.graph.constant(node.input[0]) is not None:
            super().prune(name, node, ctx)
        # two activations: no constants to edit; the operands' producers shrink the heads


@register("Attention", versions=(23, None))
class AttentionOpRule(OpRule):
    """The fused ONNX ``Attention`` op (opset 23): Q, K, V as [B, S, heads * Dh] (3-D, with
    ``q_num_heads`` / ``kv_num_heads``) or [B, heads, S, Dh] (4-D).

    Each head's Dh positions of Q, K and V are one unit; query head h reads K/V head
    h // (q_num_heads / kv_num_heads), so they are tied; Y carries V's heads in query-head order.
    Pruning rewrites ``q_num_heads`` / ``kv_num_heads``. A KV cache (past/present), the
    qk_matmul output, a per-head mask or a mask with channels block.
    """

    def _heads(self, node, ctx, rank: int, q_shape, k_shape) -> tuple[int, int] | None:
        hq, hkv = ctx.attr(node, "q_num_heads"), ctx.attr(node, "kv_num_heads")
        if rank == 4:
            return int(q_shape[1]), int(k_shape[1])
        if hq is None or hkv is None:
            return None
        return int(hq), int(hkv)

    def propagate(self, name, node, ctx: PropagationContext) -> None:
        q, k, v = (node.input[i] if len(node.input) > i else "" for i in range(3))
        layouts = [ctx.layout(t) for t in (q, k, v)]
        if all(lay is None for lay in layouts):
            return
        if any(t for t in node.input[4:]) or any(t for t in node.output[1:]):
            ctx.opaque(name, node, "KV cache, sequence lengths or the qk_matmul output are not followed")
            return
        shapes = [ctx.shape(t) for t in (q, k, v)]
        out_shape = ctx.shape(node.output[0])
        if any(s is None for s in shapes) or out_shape is None or len({len(s) for s in shapes}) != 1:
            ctx.opaque(name, node, "shapes unknown or of different ranks")
            return
        rank = len(shapes[0])
        heads = self._heads(node, ctx, rank, shapes[0], shapes[1]) if rank in (3, 4) else None
        if heads is None or heads[1] < 1 or heads[0] % heads[1]:
            ctx.opaque(name, node, "head counts unknown or query heads not a multiple of K/V heads")
            return
        hq, hkv = heads
        axis = 2 if rank == 3 else 1
        if any(lay is None or lay.axis != axis for lay in layouts):
            ctx.opaque(name, node, f"Q, K and V must all carry their heads on axis {axis}")
            return
        mask = node.input[3] if len(node.input) > 3 else ""
        if mask:
            m_shape = ctx.shape(mask)
            if m_shape is None or (len(m_shape) >= 3 and m_shape[-3] > 1):
                ctx.opaque(name, node, "the attention mask is per head, or its shape is unknown")
                return
            # broadcast over the heads: whatever channels it carries are spread into every head
            ctx.block(mask, f"Attention '{name}': the mask is broadcast over the heads")
        lq, lk, lv = layouts
        group = hq // hkv
        if rank == 3:
            if lq.size % hq or lk.size % hkv or lv.size % hkv or lq.size // hq != lk.size // hkv:
                ctx.opaque(name, node, "Q/K/V widths do not split into the head counts")
                return
            qb, kb, vb = lq.atoms.reshape(hq, -1), lk.atoms.reshape(hkv, -1), lv.atoms.reshape(hkv, -1)
            for blocks in (qb, kb, vb):
                for row in blocks:
                    ctx.atoms.tie_all(row)
            kv_of = np.arange(hq) // group
            ctx.atoms.tie(qb[:, 0], kb[kv_of, 0])
            ctx.atoms.tie(kb[:, 0], vb[:, 0])
            ctx.set_layout(node.output[0], Layout(2, vb[kv_of].reshape(-1)))
            return
        if lq.size != hq or lk.size != hkv or lv.size != hkv:
            ctx.opaque(name, node, "head axes do not match the head counts")
            return
        ctx.atoms.tie(lq.atoms, lk.atoms[np.arange(hq) // group])
        ctx.atoms.tie(lk.atoms, lv.atoms)
        ctx.set_layout(node.output[0], Layout(1, lq.atoms))

    def prune(self, name, node, ctx: PruneContext) -> None:
        keep_q, keep_k = ctx.keep_mask(node.input[0]), ctx.keep_mask(node.input[1])
        if keep_q is None and keep_k is None:
            return
        rank = len(ctx.graph.shape(node.input[0]))
        hq, hkv = ctx.attr(node, "q_num_heads"), ctx.attr(node, "kv_num_heads")
        for attr, heads, tensor, keep in (("q_num_heads", hq, node.input[0], keep_q),
                                           ("kv_num_heads", hkv, node.input[1], keep_k)):
            if heads is None:
                continue  # 4-D inputs: the head counts come from the shapes
            size = ctx.layout(tensor).size
            kept = size if keep is None else int(keep.sum())
            per_head = 1 if rank == 4 else size // int(heads)
            ctx.set_attr(node, attr, kept // per_head)


def _split3_axes(layout: Layout, in_shape: list[int], out_shape: list[int]) -> int | None:
    """Output axis j when a row-major reshape splits the channel axis C into three output axes
    (j, j + 1, j + 2) of sizes S * H * Dh = C, all > 1, keeping the axes before and after."""
    c = layout.axis
    lead, tail = int(np.prod(in_shape[:c])), int(np.prod(in_shape[c + 1:]))
    for j in range(len(out_shape) - 2):
        dims = out_shape[j:j + 3]
        if (int(np.prod(out_shape[:j])) == lead and all(d > 1 for d in dims)
                and int(np.prod(dims)) == in_shape[c] and int(np.prod(out_shape[j + 3:])) == tail):
            return j
    return None


@register("Reshape", extends=True)
class FusedHeadsReshapeRule(ReshapeRule):
    """Reshape: also a fused Q/K/V projection split in one step into segments and heads,
    ``[.., S * H * Dh] -> [.., S, H, Dh]`` (Swin, timm), when the S axis is later picked apart
    (Gather / Split / Slice, through Transposes): the S segments are tied position by position
    and each head's Dh block is one unit, so the layout sits on the H axis with one atom per
    head; pruning shrinks the target's H entry. Any other reshape: the base rule."""

    def propagate(self, name, node, ctx: PropagationContext) -> None:
        layout = ctx.layout(node.input[0])
        in_shape, out_shape = ctx.shape(node.input[0]), ctx.shape(node.output[0])
        target = ctx.const(node.input[1]) if len(node.input) > 1 else None
        if layout is None or in_shape is None or out_shape is None or target is None:
            super().propagate(name, node, ctx)
            return
        if _merge_layout(layout, in_shape, out_shape) is not None or _split_axes(layout, in_shape, out_shape) is not None:
            super().propagate(name, node, ctx)
            return
        j = _split3_axes(layout, in_shape, out_shape)
        target = np.asarray(target).astype(np.int64).ravel()
        if (j is None or target.shape[0] != len(out_shape) or (target[j:j + 3] <= 0).any()
                or not _follow_axis(ctx.graph, node.output[0], j)):
            super().propagate(name, node, ctx)
            return
        s, h, dh = out_shape[j:j + 3]
        blocks = layout.atoms.reshape(s, h, dh)
        for k in range(1, s):
            ctx.atoms.tie(blocks[0].ravel(), blocks[k].ravel())
        for head in range(h):
            ctx.atoms.tie_all(blocks[0, head])
        ctx.set_layout(node.output[0], Layout(j + 1, blocks[0, :, 0].copy()))


# the hidden-width norms extend spatial's LayerNormalization / ReduceMean and shape_ops' Gather
# rules; imported here, after those modules registered theirs
from . import norms  # noqa: E402,F401
from . import attention_ms  # noqa: E402,F401  (onnxruntime's com.microsoft attention ops)
