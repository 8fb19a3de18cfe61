"""Normalisations over the channel axis: the residual hidden width of a transformer.

A transformer's residual stream carries one hidden width D through every block: the embedding
(a patch conv, a token table), every residual Add, and every LayerNorm / RMSNorm that reads it.
Removing a hidden channel is *not* exact: the norm's mean and variance (or mean square) are
taken over the channels that remain, so every other channel's output changes a little. The
rules here follow the channels through such norms anyway and mark the atoms *inexact*, with the
reason; :mod:`graph_passes.channel_groups` turns a group with an inexact mark into an inexact
group, prunable only when the analysis runs with ``inexact_hidden_width=True`` (recovered by
fine-tuning; the exact-equivalence oracle does not hold for it). Without the option the mark
blocks the group, as a wall did before, with a reason that names the option.

* ``LayerNormalization`` (opset 17), ``SimplifiedLayerNormalization`` (onnxruntime, the ONNX
  domain) and ``RMSNormalization`` (opset 23) normalising the last axis only, with the channels
  on it: the layout passes through, the scale / bias constants are sliced with the channels.
  Normalising several axes, run-time parameters, or a used mean / inv-std-dev output stay walls.
* ``ReduceMean`` over exactly the channel axis (the decomposed ReduceMean / Sub / Pow / Sqrt /
  Div form, and a decomposed RMSNorm): its size-1 result broadcasts back like any statistic.
* ``Gather`` of rows of a constant table by run-time indices (a token embedding): its columns
  are channels of the output; pruning slices the table's columns. Removing a column changes the
  table's per-row INT8 scales, so these atoms are inexact too.
"""

from __future__ import annotations

import numpy as np

from .context import PropagationContext, PruneContext
from .registry import OpRule, register
from .shape_ops import GatherRule, _axes_of, _norm_axis
from .spatial import AxisNormRule, ReduceRule

INEXACT_OPTION = "--inexact-hidden-width"


def mark_inexact(ctx: PropagationContext, atoms: np.ndarray, why: str, node: str, tensor: str) -> None:
    """Mark atoms inexact (``ctx.inexact_marks``, set by ``channel_groups._propagate``): ``node``
    computes a statistic over (or stores per row) the channels of ``tensor``'s layout, which a
    fake-quantized engine must restrict to the kept channels. A context without that list (a
    rule used on its own) blocks the atoms instead: conservative."""
    marks = getattr(ctx, "inexact_marks", None)
    if marks is None:
        ctx.atoms.block(atoms, why)
        return
    if atoms.size:
        marks.append((np.unique(atoms), why, node, tensor))


def _last_axis_norm(name, node, ctx: PropagationContext, axis_default: int, params: list[str],
                    opname: str) -> bool:
    """Shared propagation of a norm over the last axis; True when it handled the node."""
    layout, shape = ctx.layout(node.input[0]), ctx.shape(node.input[0])
    if layout is None:
        return False
    if shape is None:
        ctx.opaque(name, node, "shape unknown")
        return True
    rank = len(shape)
    axis = _norm_axis(int(ctx.attr(node, "axis", axis_default)), rank)
    if layout.axis < axis:
        return False  # channels before the normalised axes: the base rule passes them through
    if axis != rank - 1 or layout.axis != rank - 1:
        ctx.opaque(name, node, "normalises across the channel axis and other axes")
        return True
    if any(t and ctx.const(t) is None for t in params):
        ctx.opaque(name, node, "non-constant normalisation parameters")
        return True
    if any(out for out in node.output[1:]):
        ctx.opaque(name, node, "mean/inv-std-dev outputs are used")
        return True
    ctx.passthrough(node.input[0], node.output[0])
    for t in params:
        value = ctx.const(t) if t else None
        if value is not None and value.ndim >= 1 and value.shape[-1] == layout.size > 1:
            ctx.note_constant(name, t, node.input[0])
    mark_inexact(ctx, layout.atoms, f"{opname} '{name}' normalises across the channel axis: removing a "
                                    "channel changes its statistics (inexact)", name, node.input[0])
    return True


def _slice_last_axis(name, node, ctx: PruneContext, first_param: int) -> None:
    keep = ctx.keep_mask(node.input[0])
    layout = ctx.layout(node.input[0])
    if keep is None or layout is None or layout.axis != len(ctx.graph.shape(node.input[0])) - 1:
        return
    for i in range(first_param, len(node.input)):
        value = ctx.const(node.input[i]) if node.input[i] else None
        if value is not None and value.ndim >= 1 and value.shape[-1] == keep.shape[0]:
            ctx.set_const_input(name, node, i, np.compress(keep, value, axis=value.ndim - 1))


@register("LayerNormalization", extends=True)
class LayerNormRule(AxisNormRule):
    """LayerNormalization over the last axis with the channels on it: an inexact passthrough."""

    def propagate(self, name, node, ctx: PropagationContext) -> None:
        if not _last_axis_norm(name, node, ctx, -1, list(node.input[1:3]), "LayerNormalization"):
            super().propagate(name, node, ctx)

    def prune(self, name, node, ctx: PruneContext) -> None:
        _slice_last_axis(name, node, ctx, 1)


@register("SimplifiedLayerNormalization", "RMSNormalization")
class RMSNormRule(OpRule):
    """RMS norms (onnxruntime's SimplifiedLayerNormalization, ONNX RMSNormalization): y = x /
    sqrt(mean(x^2) + eps) * scale, over the last axis with the channels on it: inexact."""

    def propagate(self, name, node, ctx: PropagationContext) -> None:
        if _last_axis_norm(name, node, ctx, -1, list(node.input[1:]), node.op_type):
            return
        layout = ctx.layout(node.input[0])
        if layout is not None:  # channels before the normalised axes
            ctx.passthrough(node.input[0], node.output[0])

    def prune(self, name, node, ctx: PruneContext) -> None:
        _slice_last_axis(name, node, ctx, 1)


@register("ReduceMean", extends=True)
class MeanOverChannelsRule(ReduceRule):
    """ReduceMean over exactly the channel axis: a statistic of the hidden width (the decomposed
    LayerNorm / RMSNorm). Its result has no channels; the input's channels are inexact."""

    def propagate(self, name, node, ctx: PropagationContext) -> None:
        layout, shape = ctx.layout(node.input[0]), ctx.shape(node.input[0])
        if layout is None or shape is None:
            super().propagate(name, node, ctx)
            return
        axes = _axes_of(node, ctx, 1) if ctx.opset >= 18 else (ctx.attr(node, "axes") or [])
        if axes is None or [_norm_axis(int(a), len(shape)) for a in axes] != [layout.axis] or layout.size < 2:
            super().propagate(name, node, ctx)
            return
        mark_inexact(ctx, layout.atoms, f"ReduceMean '{name}' reduces over the channel axis: removing a "
                                        "channel changes the mean (inexact)", name, node.input[0])


@register("Gather", extends=True)
class EmbeddingGatherRule(GatherRule):
    """A look-up of rows of a constant 2-D float table by run-time indices: the table's columns
    are new channels of the output (last axis); pruning slices the columns. Inexact: the
    table is stored with one INT8 scale per row, which a removed column changes."""

    def propagate(self, name, node, ctx: PropagationContext) -> None:
        facts = self.embedding_table(node, ctx.graph)
        out_shape = ctx.shape(node.output[0])
        if facts is None or ctx.layout(node.input[0]) is not None or not out_shape or facts.dim < 2:
            super().propagate(name, node, ctx)
            return
        if ctx.graph.consumers.get(facts.table, []) != [name]:
            super().propagate(name, node, ctx)  # a shared table (a tied output projection): not followed
            return
        layout = ctx.fresh(name, node.output[0], len(out_shape) - 1, weight_layer=False)
        if layout is not None:
            ctx.note_constant(name, node.input[0], node.output[0])
            mark_inexact(ctx, layout.atoms, f"embedding table '{facts.table}' is quantized per row: "
                                            "removing a column changes the row scales (inexact)",
                         name, node.output[0])

    def prune(self, name, node, ctx: PruneContext) -> None:
        keep = ctx.keep_mask(node.output[0])
        table = ctx.const(node.input[0])
        layout = ctx.layout(node.output[0])
        if keep is None or table is None or layout is None or table.ndim != 2 or ctx.layout(node.input[0]) is not None:
            return
        if layout.axis == len(ctx.graph.shape(node.output[0])) - 1 and table.shape[1] == keep.shape[0]:
            ctx.set_const_input(name, node, 0, table[:, keep])


__all__ = ["INEXACT_OPTION", "EmbeddingGatherRule", "LayerNormRule", "MeanOverChannelsRule", "RMSNormRule",
           "mark_inexact"]
