"""Weight layers: Conv, ConvTranspose, Gemm, MatMul with a constant weight.

A weight layer *consumes* the channels of its data input (an input slice of its weight per
channel) and *produces* fresh atoms, one per output channel. A grouped convolution can only lose
whole groups, so each group's input and output channels are tied into one unit; a depthwise
convolution is the case of one input channel per group, which ties input channel i to output i.

Besides channel propagation and pruning, each weight op's rule is the one place that knows its
weight-layer facts (:class:`WeightOpRule`): which weight axis holds output / input channels,
C_in / C_out, MACs, and the per-sample layer shape cost models see (:class:`WeightFacts`).
Nothing outside ``op_rules`` switches on a weight op's ``op_type``: ask :func:`weight_rule`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np
import onnx

from .context import PropagationContext, PruneContext
from .registry import OpRule, find_rule, register

if TYPE_CHECKING:  # pragma: no cover
    from ..graph import ModelGraph

#: The layer kinds cost models know (``cost_models.spec.LAYER_KINDS``).
COST_KINDS = ("conv", "depthwise", "linear", "recurrent")


@dataclass(frozen=True)
class WeightFacts:
    """What a weight op's rule knows of one node with a constant weight.

    ``macs`` counts one forward pass at the model's static shapes (the batch included);
    ``cost_kernel`` and ``cost_spatial`` are per sample: a 1-d size ``k`` is ``(1, k)``, more
    than two dims are flattened to ``(1, prod)``, none is ``(1, 1)``.
    """

    in_channels: int
    out_channels: int
    kernel: list[int]
    groups: int
    macs: int
    weight_out_axis: int
    weight_in_axis: int
    cost_kind: str
    cost_kernel: tuple[int, int]
    cost_spatial: tuple[int, int]
    #: the input holding a bias the engine gates per output channel (None: none; LSTM/GRU/RNN
    #: gate B themselves), the output that carries the layer's channels (None: output 0) and
    #: the values of the constant inputs besides input 1 and the bias (R, B, P)
    bias_input: int | None = 2
    output: str | None = None
    extra_params: int = 0


@dataclass(frozen=True)
class AffineFold:
    """A per-output-channel affine ``y * scale + shift`` folded into a weight op: its new weight,
    its new bias (input 2) and attributes to set."""

    weight: np.ndarray
    bias: np.ndarray
    attributes: dict[str, float]


def _folded_bias(bias: np.ndarray | None, scale: np.ndarray, shift: np.ndarray, dtype: np.dtype) -> np.ndarray:
    b = bias.astype(np.float64) if bias is not None else 0.0
    return (b * scale + shift).astype(dtype)


def _numel(shape: Sequence[int] | None) -> int:
    return int(np.prod(shape)) if shape else 0


def flat_pair(dims: Sequence[int]) -> tuple[int, int]:
    """Two dims for a cost model: ``()`` -> (1, 1), ``(k,)`` -> (1, k), ``(h, w)`` as is,
    more -> (1, prod)."""
    dims = [int(d) for d in dims]
    if not dims:
        return (1, 1)
    if len(dims) == 1:
        return (1, dims[0])
    if len(dims) == 2:
        return (dims[0], dims[1])
    return (1, int(np.prod(dims)))


class WeightOpRule(OpRule):
    """A rule for an op whose input 1 is a weight: the weight-layer facet.

    Subclasses define :meth:`weight_axes` (from the node's attributes alone) and
    :meth:`describe`; :meth:`zero_input_channels` zeroes input slices (the pruning oracle).
    """

    def weight_axes(self, node: onnx.NodeProto) -> tuple[int, int]:
        """(output-channel axis, input-channel axis) of the weight initializer."""
        raise NotImplementedError

    def weight_out_axis(self, node: onnx.NodeProto) -> int:
        return self.weight_axes(node)[0]

    def weight_in_axis(self, node: onnx.NodeProto) -> int:
        return self.weight_axes(node)[1]

    def describe(self, node: onnx.NodeProto, graph: "ModelGraph") -> WeightFacts | None:
        """The node's facts, or None when its weight is not a constant of a shape we handle."""
        raise NotImplementedError

    def zero_input_channels(self, w: np.ndarray, node: onnx.NodeProto, groups: int,
                            positions: np.ndarray) -> np.ndarray:
        """A copy of ``w`` with the input channels at ``positions`` zeroed."""
        w = w.copy()
        index: list[slice | np.ndarray] = [slice(None)] * w.ndim
        index[self.weight_in_axis(node)] = np.asarray(positions, dtype=np.int64)
        w[tuple(index)] = 0
        return w

    # --- weights besides input 1 (recurrent layers: W and R share one scale per unit) -----
    def quantized_inputs(self, node: onnx.NodeProto) -> tuple[int, ...]:
        """Inputs holding weights that are quantized per output channel (default: W only)."""
        return (1,)

    def channel_rows(self, node: onnx.NodeProto, values: Sequence) -> list:
        """Per-output-channel values (bit-widths, scales) -> one per slice of the weights'
        output-channel axis (default: the same; a recurrent layer repeats them per gate)."""
        return list(values)

    def channel_absmax(self, node: onnx.NodeProto, weights: Sequence[np.ndarray]) -> np.ndarray:
        """max|w| per output channel over the :meth:`quantized_inputs` values ``weights``."""
        axis = self.weight_out_axis(node)
        w = np.asarray(weights[0], dtype=np.float32)
        return np.abs(np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)).max(axis=1)

    def zero_feedback(self, node: onnx.NodeProto, const, positions: np.ndarray) -> dict[int, np.ndarray]:
        """The pruning oracle's extra edits for output channels at ``positions`` that the op
        reads back itself (a recurrent layer's R columns): {input index: new value}."""
        return {}

    def default_inputs(self, node: onnx.NodeProto, values: dict[int, np.ndarray]) -> tuple[int, ...]:
        """Optional inputs whose constant value (``values``: input index -> value) equals what
        the op assumes when they are absent, so they can be dropped (default: none)."""
        return ()

    #: whether a BatchNormalization after the op can be folded into its weight and bias
    folds_batchnorm: bool = False

    def fold_affine(self, node: onnx.NodeProto, weight: np.ndarray, bias: np.ndarray | None,
                    scale: np.ndarray, shift: np.ndarray) -> AffineFold | str:
        """Fold ``y * scale + shift`` (float64, per output channel) into the float ``weight`` and
        ``bias`` (input 2, None when absent); the reason it cannot be done otherwise."""
        return f"{node.op_type} {node.name} has no bias input to fold into"

    @staticmethod
    def _weight(node: onnx.NodeProto, graph: "ModelGraph") -> np.ndarray | None:
        return graph.constant(node.input[1]) if len(node.input) > 1 else None


def weight_rule(node: onnx.NodeProto, opset: int | None = None) -> WeightOpRule | None:
    """The weight-op rule of ``node`` (None: not a weight op). ``opset`` None: the newest rule."""
    rule = find_rule(node.domain, node.op_type, opset)
    return rule if isinstance(rule, WeightOpRule) else None


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
class ConvRule(WeightOpRule):
    """Conv: W is [C_out, C_in / group, k...]."""

    def weight_axes(self, node: onnx.NodeProto) -> tuple[int, int]:
        return 0, 1

    def describe(self, node: onnx.NodeProto, graph: "ModelGraph") -> WeightFacts | None:
        w = self._weight(node, graph)
        if w is None or w.ndim < 2:
            return None
        groups, kernel = int(graph.attr(node, "group", 1)), [int(k) for k in w.shape[2:]]
        cin, cout = int(w.shape[1]) * groups, int(w.shape[0])
        out_shape = graph.shape(node.output[0]) or []
        depthwise = groups > 1 and groups == cin
        return WeightFacts(
            in_channels=cin, out_channels=cout, kernel=kernel, groups=groups,
            macs=_numel(out_shape) * int(w.shape[1]) * int(np.prod(kernel)),
            weight_out_axis=0, weight_in_axis=1, cost_kind="depthwise" if depthwise else "conv",
            cost_kernel=flat_pair(kernel), cost_spatial=flat_pair(out_shape[2:]),
        )

    folds_batchnorm = True

    def fold_affine(self, node, weight, bias, scale, shift) -> AffineFold | str:
        if not np.issubdtype(weight.dtype, np.floating) or weight.ndim < 2 or weight.shape[0] != scale.size:
            return f"weight of {node.name} is not a float tensor with {scale.size} outputs"
        new_weight = weight.astype(np.float64) * scale.reshape((-1,) + (1,) * (weight.ndim - 1))
        return AffineFold(new_weight.astype(weight.dtype), _folded_bias(bias, scale, shift, weight.dtype), {})

    def zero_input_channels(self, w: np.ndarray, node: onnx.NodeProto, groups: int,
                            positions: np.ndarray) -> np.ndarray:
        """Input channel p of a grouped conv is slice p % (C_in/group) of group p // (C_in/group)."""
        w = w.copy()
        cin_g, cout_g = w.shape[1], w.shape[0] // groups
        for p in np.asarray(positions).tolist():
            g = p // cin_g
            w[g * cout_g : (g + 1) * cout_g, p % cin_g] = 0
        return w

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
class ConvTransposeRule(WeightOpRule):
    """ConvTranspose: W is [C_in, C_out / group, k...]; cost models see the input's spatial size."""

    def weight_axes(self, node: onnx.NodeProto) -> tuple[int, int]:
        return 1, 0

    def describe(self, node: onnx.NodeProto, graph: "ModelGraph") -> WeightFacts | None:
        w = self._weight(node, graph)
        if w is None or w.ndim < 2:
            return None
        groups, kernel = int(graph.attr(node, "group", 1)), [int(k) for k in w.shape[2:]]
        in_shape = graph.shape(node.input[0]) or []
        return WeightFacts(
            in_channels=int(w.shape[0]), out_channels=int(w.shape[1]) * groups, kernel=kernel,
            groups=groups, macs=_numel(in_shape) * int(w.shape[1]) * int(np.prod(kernel)),
            weight_out_axis=1, weight_in_axis=0, cost_kind="conv",
            cost_kernel=flat_pair(kernel), cost_spatial=flat_pair(in_shape[2:]),
        )

    folds_batchnorm = True

    def fold_affine(self, node, weight, bias, scale, shift) -> AffineFold | str:
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        if not np.issubdtype(weight.dtype, np.floating) or weight.ndim < 2 or weight.shape[1] * group != scale.size:
            return f"weight of {node.name} does not match {scale.size} output channels"
        per_group = weight.reshape((group, -1) + weight.shape[1:]).astype(np.float64)
        new_weight = (per_group * scale.reshape((group, 1, -1) + (1,) * (weight.ndim - 2))).reshape(weight.shape)
        return AffineFold(new_weight.astype(weight.dtype), _folded_bias(bias, scale, shift, weight.dtype), {})

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
        out_axis, in_axis = self.weight_axes(node)  # W: [Cin, Cout, k...]
        _prune_matrix(name, node, ctx, in_axis=in_axis, out_axis=out_axis)


class _LinearRule(WeightOpRule):
    """Gemm / MatMul: a 2-D weight; cost models see the positions it is applied at."""

    def describe(self, node: onnx.NodeProto, graph: "ModelGraph") -> WeightFacts | None:
        w = self._weight(node, graph)
        if w is None or w.ndim != 2:
            return None
        out_axis, in_axis = self.weight_axes(node)
        cin, cout = int(w.shape[in_axis]), int(w.shape[out_axis])
        out_shape = graph.shape(node.output[0]) or []
        positions = int(np.prod(out_shape[1:-1])) if len(out_shape) > 2 else 1
        return WeightFacts(
            in_channels=cin, out_channels=cout, kernel=[], groups=int(graph.attr(node, "group", 1)),
            macs=_numel(out_shape) * cin, weight_out_axis=out_axis, weight_in_axis=in_axis,
            cost_kind="linear", cost_kernel=(1, 1), cost_spatial=(1, positions),
        )


@register("Gemm")
class GemmRule(_LinearRule):
    """Gemm: B is [C_out, C_in] with transB, [C_in, C_out] without."""

    def weight_axes(self, node: onnx.NodeProto) -> tuple[int, int]:
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return (0, 1) if trans_b else (1, 0)

    folds_batchnorm = True

    def fold_affine(self, node, weight, bias, scale, shift) -> AffineFold | str:
        """C (input 2) is scaled by beta and broadcast to the outputs; beta becomes 1."""
        axis = self.weight_out_axis(node)
        if not np.issubdtype(weight.dtype, np.floating) or weight.ndim != 2 or weight.shape[axis] != scale.size:
            return f"weight of {node.name} does not have {scale.size} output columns"
        new_weight = weight.astype(np.float64) * scale.reshape((-1, 1) if axis == 0 else (1, -1))
        beta = float(next((a.f for a in node.attribute if a.name == "beta"), 1.0))
        c = beta * bias.astype(np.float64) if bias is not None else np.zeros(1)
        c = np.broadcast_to(c, np.broadcast_shapes(c.shape, (scale.size,)))
        return AffineFold(new_weight.astype(weight.dtype), (c * scale + shift).astype(weight.dtype), {"beta": 1.0})

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
        out_axis, in_axis = self.weight_axes(node)
        _prune_matrix(name, node, ctx, in_axis=in_axis, out_axis=out_axis)


@register("MatMul")
class MatMulRule(_LinearRule):
    """MatMul by a constant 2-D weight W [K, N]: K input, N output channels."""

    def weight_axes(self, node: onnx.NodeProto) -> tuple[int, int]:
        return 1, 0

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
        out_axis, in_axis = self.weight_axes(node)  # W: [K, N]
        _prune_matrix(name, node, ctx, in_axis=in_axis, out_axis=out_axis)
