"""onnxruntime's fused ``com.microsoft`` attention ops as head groups.

``MultiHeadAttention(query, key, value, bias?, key_padding_mask?, attention_bias?)`` with Q, K
and V as [B, S, D] / [B, L, D] / [B, L, Dv]: a head is Dh = D / num_heads consecutive channels
of Q and of K and Dv / num_heads of V; query head h reads key and value head h, so the three are
tied, and the output [B, S, Dv] carries V's heads. Pruning rewrites ``num_heads`` and slices the
projection bias (layout [Q | K | V]). The key padding mask (per key position) and an attention
bias broadcast over heads leave the heads alone. Blocked with their reason: packed QKV / KV,
4-D (BNSH) key or value, past / present (a KV cache), the qk output, a per-head attention bias.

``Attention`` (the fused-projection op: weights [Din, D + D + Dv]) is not followed: it blocks.

MultiHeadAttention's output shape comes from :func:`graph_passes.shapes.register_contrib_shapes`.
"""

from __future__ import annotations

import numpy as np

from ..layouts import Layout
from .context import PropagationContext, PruneContext
from .registry import OpRule, register

MS = "com.microsoft"


@register("MultiHeadAttention", domain=MS)
class MultiHeadAttentionRule(OpRule):
    """``com.microsoft::MultiHeadAttention``, the unpacked 3-input form without a KV cache."""

    def _check(self, node, ctx: PropagationContext) -> str | None:
        """Why the node cannot be followed, or None."""
        inputs = list(node.input) + [""] * (10 - len(node.input))
        q, k, v, bias, _, attn_bias = inputs[:6]
        if not k or not v:
            return "packed QKV or KV input (key/value absent) is not followed"
        if any(inputs[6:]) or any(t for t in node.output[1:]):
            return "past/present (KV cache), past_sequence_length, cache_indirection or the qk output are not followed"
        shapes = [ctx.shape(t) for t in (q, k, v)]
        if any(s is None for s in shapes) or ctx.shape(node.output[0]) is None:
            return "shapes of query/key/value or of the output unknown"
        if any(len(s) != 3 for s in shapes):
            return "query/key/value must all be 3-D [B, S, D] (packed or BNSH forms are not followed)"
        heads = ctx.attr(node, "num_heads")
        dq, dk, dv = (s[2] for s in shapes)
        if not heads or dq != dk or dq % heads or dv % heads:
            return f"widths {dq}/{dk}/{dv} do not split into num_heads={heads}"
        if bias and ctx.const(bias) is None:
            return "the projection bias is not a constant"
        if bias and ctx.const(bias).shape != (dq + dk + dv,):
            return f"the projection bias has shape {list(ctx.const(bias).shape)}, not [{dq + dk + dv}]"
        if attn_bias:
            shape = ctx.shape(attn_bias)
            if shape is None or len(shape) != 4 or shape[1] != 1:
                return "the attention_bias is per head or of unknown shape"
        return None

    def propagate(self, name, node, ctx: PropagationContext) -> None:
        q, k, v = (node.input[i] if len(node.input) > i else "" for i in range(3))
        layouts = [ctx.layout(t) for t in (q, k, v)]
        if all(lay is None for lay in layouts):
            return
        why = self._check(node, ctx)
        if why is None and any(lay is None or lay.axis != 2 for lay in layouts):
            why = "query, key and value must all carry their channels on axis 2"
        if why is not None:
            ctx.opaque(name, node, why)
            return
        if len(node.input) > 5 and node.input[5]:
            # broadcast over the heads: whatever channels it carries are spread into every head
            ctx.block(node.input[5], f"MultiHeadAttention '{name}': the attention_bias is broadcast over the heads")
        if len(node.input) > 4 and node.input[4]:
            ctx.block(node.input[4], f"MultiHeadAttention '{name}': the key padding mask is per key position")
        heads = int(ctx.attr(node, "num_heads"))
        lq, lk, lv = layouts
        qb, kb, vb = (lay.atoms.reshape(heads, -1) for lay in layouts)
        for blocks in (qb, kb, vb):
            for row in blocks:
                ctx.atoms.tie_all(row)
        ctx.atoms.tie(qb[:, 0], kb[:, 0])
        ctx.atoms.tie(kb[:, 0], vb[:, 0])
        if len(node.input) > 3 and node.input[3]:
            ctx.note_constant(name, node.input[3], q)
        ctx.set_layout(node.output[0], Layout(2, lv.atoms.copy()))

    def prune(self, name, node, ctx: PruneContext) -> None:
        q, k, v = node.input[0], node.input[1], node.input[2]
        keeps = [ctx.keep_mask(t) for t in (q, k, v)]
        if all(keep is None for keep in keeps):
            return
        sizes = [ctx.layout(t).size for t in (q, k, v)]
        keeps = [np.ones(n, bool) if keep is None else keep for keep, n in zip(keeps, sizes)]
        heads = int(ctx.attr(node, "num_heads"))
        ctx.set_attr(node, "num_heads", int(keeps[0].sum()) // (sizes[0] // heads))
        if len(node.input) > 3 and node.input[3]:
            bias = ctx.const(node.input[3])
            ctx.set_const_input(name, node, 3, bias[np.concatenate(keeps)])


@register("Attention", domain=MS)
class ContribAttentionRule(OpRule):
    """``com.microsoft::Attention`` (fused Q/K/V weights [Din, D + D + Dv]): not followed yet.

    Its weights would be a weight layer whose columns are [Q heads | K heads | V heads]; until
    that lands the op is a wall with a reason that says so. (Its output has no shape: onnx
    cannot register a schema for it, see :func:`graph_passes.shapes.register_contrib_shapes`.)"""

    def propagate(self, name, node, ctx: PropagationContext) -> None:
        ctx.opaque(name, node, "the fused-weight com.microsoft Attention is not followed (its heads stay "
                               "blocked); export the model with separate Q/K/V MatMuls and MultiHeadAttention")
