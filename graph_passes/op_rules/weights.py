"""Weight layers: Conv, ConvTranspose, Gemm, MatMul with a constant weight.

A weight layer *consumes* the channels of its data input (an input slice of its weight per
channel) and *produces* fresh atoms, one per output channel. A grouped convolution can only lose
whole groups, so each group's input and output channels are tied into one unit; a depthwise
convolution is the case of one input channel per group, which ties input channel i to output i.
"""

from __future__ import annotations

import numpy as np
import onnx

from .context import PropagationContext, PruneContext
from .registry import OpRule, register


def _bias_ok(ctx: PropagationContext, node: onnx.NodeProto, index: int) -> bool:
    return len(node.input) <= index or not node.input[index] or ctx.const(node.input[index]) is not None


def _note_bias(ctx: PropagationContext, name: str, node: onnx.NodeProto, out: str) -> None:
    if len(node.input) > 2 and node.input[2]:
        bias = ctx.const(node.input[2])
        if bias is not None and bias.ndim >= 1 and bias.shape[-1] > 1:
            ctx.note_constant(name, node.input[2], out)


def _prune_matrix(name: str, node: onnx.NodeProto, ctx: PruneContext, in_axis: int, out_axis: int) -> None:
    """Slice a weight (input 1) along its input and output channel axes, and a bias (input 2)
    along its last axis when that axis holds the output channels."""
    keep_in, keep_out = ctx.keep_mask(node.input[0]), ctx.keep_mask(node.output[0])
    if keep_in is None and keep_out is None:
        return
    w = ctx.const(node.input[1])
    if keep_in is not None:
        w = np.compress(keep_in, w, axis=in_axis)
    if keep_out is not None:
        w = np.compress(keep_out, w, axis=out_axis)
        if len(node.input) > 2 and node.input[2]:
            bias = ctx.const(node.input[2])
            if bias.ndim >= 1 and bias.shape[-1] == keep_out.shape[0] and bias.shape[-1] > 1:
                ctx.set_const_input(name, node, 2, np.compress(keep_out, bias, axis=bias.ndim - 1))
    ctx.set_const_input(name, node, 1, w)


@register("Conv")
class ConvRule(OpRule):
    def propagate(self, name, node, ctx: PropagationContext) -> None:
        x, w_name, out = node.input[0], node.input[1], node.output[0]
        w = ctx.const(w_name)
        if w is None or not _bias_ok(ctx, node, 2):
            ctx.opaque(name, node, "weight or bias is not a constant")
            return
        out_layout = ctx.fresh(name, out, 1, weight_layer=True)
        _note_bias(ctx, name, node, out)
        layout = ctx.layout(x)
        if layout is None or out_layout is None:
            return
        if layout.axis != 1:
            ctx.atoms.block(layout.atoms, f"Conv '{name}' reads channels on axis {layout.axis}")
            return
        groups = int(ctx.attr(node, "group", 1))
        if groups > 1:
            cin_g, cout_g = w.shape[1], w.shape[0] // groups
            for g in range(groups):
                unit = np.concatenate(
                    [layout.atoms[g * cin_g : (g + 1) * cin_g], out_layout.atoms[g * cout_g : (g + 1) * cout_g]]
                )
                ctx.atoms.tie_all(unit)

    def prune(self, name, node, ctx: PruneContext) -> None:
        keep_in, keep_out = ctx.keep_mask(node.input[0]), ctx.keep_mask(node.output[0])
        if keep_in is None and keep_out is None:
            return
        w = ctx.const(node.input[1])
        groups = int(ctx.attr(node, "group", 1))
        if keep_out is not None:
            w = w[keep_out]
            if len(node.input) > 2 and node.input[2]:
                ctx.set_const_input(name, node, 2, ctx.const(node.input[2])[keep_out])
        if groups == 1 and keep_in is not None:
            w = w[:, keep_in]
        elif groups > 1 and keep_in is not None:
            per_group = keep_in.reshape(groups, -1)
            if not (per_group.all(axis=1) | ~per_group.any(axis=1)).all():
                raise ValueError(f"Conv '{name}': a channel group would lose part of a conv group")
            ctx.set_attr(node, "group", int(per_group.all(axis=1).sum()))
        ctx.set_const_input(name, node, 1, w)


@register("ConvTranspose")
class ConvTransposeRule(OpRule):
    def propagate(self, name, node, ctx: PropagationContext) -> None:
        w = ctx.const(node.input[1])
        if w is None or not _bias_ok(ctx, node, 2) or int(ctx.attr(node, "group", 1)) != 1:
            ctx.opaque(name, node, "grouped, or weight/bias not constant")
            return
        if ctx.attr(node, "output_shape") is not None:
            ctx.opaque(name, node, "explicit output_shape attribute")
            return
        ctx.fresh(name, node.output[0], 1, weight_layer=True)
        _note_bias(ctx, name, node, node.output[0])
        layout = ctx.layout(node.input[0])
        if layout is not None and layout.axis != 1:
            ctx.atoms.block(layout.atoms, f"ConvTranspose '{name}' reads channels on axis {layout.axis}")

    def prune(self, name, node, ctx: PruneContext) -> None:
        _prune_matrix(name, node, ctx, in_axis=0, out_axis=1)  # W: [Cin, Cout, k...]


@register("Gemm")
class GemmRule(OpRule):
    def propagate(self, name, node, ctx: PropagationContext) -> None:
        b = ctx.const(node.input[1])
        if b is None or int(ctx.attr(node, "transA", 0)) or not _bias_ok(ctx, node, 2):
            ctx.opaque(name, node, "transA set, or B/C not constant")
            return
        ctx.fresh(name, node.output[0], 1, weight_layer=True)
        _note_bias(ctx, name, node, node.output[0])
        layout = ctx.layout(node.input[0])
        if layout is not None and layout.axis != 1:
            ctx.atoms.block(layout.atoms, f"Gemm '{name}' reads channels on axis {layout.axis}")

    def prune(self, name, node, ctx: PruneContext) -> None:
        trans_b = int(ctx.attr(node, "transB", 0))
        _prune_matrix(name, node, ctx, in_axis=1 if trans_b else 0, out_axis=0 if trans_b else 1)


@register("MatMul")
class MatMulRule(OpRule):
    def propagate(self, name, node, ctx: PropagationContext) -> None:
        x, w_name, out = node.input[0], node.input[1], node.output[0]
        w = ctx.const(w_name)
        x_shape, out_shape = ctx.shape(x), ctx.shape(out)
        if w is None or w.ndim != 2 or ctx.const(x) is not None or not x_shape or not out_shape:
            ctx.opaque(name, node, "not an activation times a constant 2-D weight")
            return
        ctx.fresh(name, out, len(out_shape) - 1, weight_layer=True)
        layout = ctx.layout(x)
        if layout is not None and layout.axis != len(x_shape) - 1:
            ctx.atoms.block(layout.atoms, f"MatMul '{name}' reads channels on the last axis")

    def prune(self, name, node, ctx: PruneContext) -> None:
        _prune_matrix(name, node, ctx, in_axis=0, out_axis=1)  # W: [K, N]
