"""Recurrent layers: ONNX LSTM, GRU and RNN with constant W, R (and B, P).

Shapes (D directions, G gates: LSTM 4 ``i, o, f, c``, GRU 3 ``z, r, h``, RNN 1; H hidden units):
W ``[D, G*H, I]``, R ``[D, G*H, H]``, B ``[D, 2*G*H]``, P ``[D, 3*H]``; X ``[seq, batch, I]``
(``layout=1``: ``[batch, seq, I]``); Y ``[seq, D, batch, H]`` (``[batch, seq, D, H]``), Y_h / Y_c
``[D, batch, H]`` (``[batch, D, H]``), initial_h / initial_c like Y_h.

Channels: the layer *consumes* the channels of X (W's input columns, axis 2) and *produces* one
atom per hidden unit j, on the last axis of Y, Y_h and Y_c. Unit j of every direction is the
same atom: in a bidirectional layer the forward and the backward unit j are removed together, so
a consumer that concatenates both directions (Concat of Y_h[0] and Y_h[1], or Y reshaped to
``D*H``) sees one layout. Removing unit j removes its G gate rows from W, R and B (per
direction), its column from R, its P entries and its slot in constant initial states, and
lowers ``hidden_size``. Initial states computed at run time cannot be sliced: they block the
units.

Weight-layer facts: W is the layer's weight (output axis 1 holds the G*H gate rows, input
axis 2), R is quantized with it (one scale per unit over its W and R rows, see
:meth:`RecurrentRule.channel_absmax`); B stays float and is not the engine's gated bias (the
bridge's module zeroes a pruned unit's bias itself); parameters count W, R, B and P. MACs per step
``D * G * H * (I + H)``, times the sequence length and the batch; cost models see kind
``"recurrent"`` with ``kernel = (1, D*G)`` and ``out_hw = (1, seq)``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np
import onnx

from ..layouts import Layout
from .context import PropagationContext, PruneContext
from .registry import register
from .weights import WeightFacts, WeightOpRule

if TYPE_CHECKING:  # pragma: no cover
    from ..graph import ModelGraph

_OUT_AXIS = {0: 3, 1: 2, 2: 2}  # output index -> channel axis (both layouts)


def _present(node: onnx.NodeProto, index: int) -> str | None:
    return node.input[index] if len(node.input) > index and node.input[index] else None


class RecurrentRule(WeightOpRule):
    """The common rule; subclasses set :attr:`gates` and the state inputs they have."""

    gates = 1
    state_inputs: tuple[int, ...] = (5,)
    peephole_input: int | None = None

    # --- facts ------------------------------------------------------------------------------
    def weight_axes(self, node: onnx.NodeProto) -> tuple[int, int]:
        return 1, 2

    def quantized_inputs(self, node: onnx.NodeProto) -> tuple[int, ...]:
        return (1, 2)

    @staticmethod
    def _directions(graph_or_ctx, node: onnx.NodeProto) -> int:
        direction = graph_or_ctx.attr(node, "direction", "forward")
        if isinstance(direction, bytes):
            direction = direction.decode()
        return 2 if direction == "bidirectional" else 1

    def _hidden(self, node: onnx.NodeProto, r: np.ndarray) -> int:
        return int(r.shape[-1])

    def channel_rows(self, node: onnx.NodeProto, values: Sequence) -> list:
        """Unit j's value for every gate row ``g*H + j`` of W and R (axis 1)."""
        return list(values) * self.gates

    def channel_absmax(self, node: onnx.NodeProto, weights: Sequence[np.ndarray]) -> np.ndarray:
        """Per unit, max|w| over its rows in W and R (every gate, every direction)."""
        per_unit = []
        for w in weights:
            w = np.asarray(w, dtype=np.float32)
            d, gh, k = w.shape
            per_unit.append(np.abs(w.reshape(d, self.gates, gh // self.gates, k)).max(axis=(0, 1, 3)))
        return np.max(np.stack(per_unit), axis=0)

    def default_inputs(self, node: onnx.NodeProto, values: dict[int, np.ndarray]) -> tuple[int, ...]:
        """All-zero constant initial states: absent states are zero (torch's exported
        ``ConstantOfShape`` zeros, folded at a pinned batch, would otherwise fix the batch)."""
        return tuple(i for i in self.state_inputs
                     if i in values and values[i].size and not np.any(values[i]))

    def zero_input_channels(self, w: np.ndarray, node: onnx.NodeProto, groups: int,
                            positions: np.ndarray) -> np.ndarray:
        w = w.copy()
        w[:, :, np.asarray(positions, dtype=np.int64)] = 0
        return w

    def zero_feedback(self, node: onnx.NodeProto, const, positions: np.ndarray) -> dict[int, np.ndarray]:
        """Zero R's columns of the removed units: no other unit reads them any more."""
        r = np.array(const(node.input[2]), copy=True)
        r[:, :, np.asarray(positions, dtype=np.int64)] = 0
        return {2: r}

    def describe(self, node: onnx.NodeProto, graph: "ModelGraph") -> WeightFacts | None:
        w = self._weight(node, graph)
        r = graph.constant(node.input[2]) if len(node.input) > 2 else None
        x_shape = graph.shape(node.input[0])
        if w is None or r is None or w.ndim != 3 or r.ndim != 3 or not x_shape or len(x_shape) != 3:
            return None
        layout = int(graph.attr(node, "layout", 0))
        seq, batch = (x_shape[0], x_shape[1]) if layout == 0 else (x_shape[1], x_shape[0])
        d, hidden, cin = self._directions(graph, node), self._hidden(node, r), int(w.shape[2])
        g = self.gates
        extra = int(r.size)
        for index in (3, self.peephole_input):
            name = _present(node, index) if index is not None else None
            if name is not None and graph.constant(name) is not None:
                extra += int(graph.constant(name).size)
        output = next((o for o in node.output if o), node.output[0])
        return WeightFacts(
            in_channels=cin, out_channels=hidden, kernel=[], groups=1,
            macs=int(max(batch, 1) * max(seq, 1) * d * g * hidden * (cin + hidden)),
            weight_out_axis=1, weight_in_axis=2, cost_kind="recurrent",
            cost_kernel=(1, d * g), cost_spatial=(1, max(int(seq), 1)),
            bias_input=None, output=output, extra_params=extra,
        )

    # --- channels ----------------------------------------------------------------------------
    def propagate(self, name, node, ctx: PropagationContext) -> None:
        w, r = ctx.const(node.input[1]), (ctx.const(node.input[2]) if len(node.input) > 2 else None)
        consts = [i for i in (3, self.peephole_input) if i is not None and _present(node, i)]
        if w is None or r is None or w.ndim != 3 or r.ndim != 3 or any(ctx.const(node.input[i]) is None for i in consts):
            ctx.opaque(name, node, "W, R, B or P is not a constant")
            return
        hidden = self._hidden(node, r)
        atoms = ctx.atoms.new(name, hidden, True)
        outputs = [(i, o) for i, o in enumerate(node.output) if o]
        for index, out in outputs:
            shape = ctx.shape(out)
            axis = _OUT_AXIS.get(index)
            if axis is None or (shape is not None and (len(shape) <= axis or shape[axis] != hidden)):
                ctx.atoms.block(atoms, f"{node.op_type} '{name}': output {out!r} has an unexpected shape")
                continue
            ctx.layouts[out] = Layout(axis, atoms)
        if outputs:
            first = outputs[0][1]
            for i in consts:
                ctx.note_constant(name, node.input[i], first)
            for i in self.state_inputs:
                state = _present(node, i)
                if state is None:
                    continue
                if ctx.const(state) is None:
                    ctx.atoms.block(atoms, f"{node.op_type} '{name}': initial state {state!r} is computed at "
                                           "run time (its units cannot be sliced)")
                else:
                    ctx.note_constant(name, state, first)
        x_layout = ctx.layout(node.input[0])
        if x_layout is not None and x_layout.axis != 2:
            ctx.atoms.block(x_layout.atoms, f"{node.op_type} '{name}' reads channels on the last axis of X")

    def prune(self, name, node, ctx: PruneContext) -> None:
        keep_in = ctx.keep_mask(node.input[0])
        first = next((o for o in node.output if o), None)
        keep_out = ctx.keep_mask(first) if first else None
        if keep_in is None and keep_out is None:
            return
        g = self.gates
        w = ctx.const(node.input[1])
        r = ctx.const(node.input[2])
        d, gh, cin = w.shape
        hidden = gh // g
        w4, r4 = w.reshape(d, g, hidden, cin), r.reshape(d, g, hidden, hidden)
        if keep_in is not None:
            w4 = np.compress(keep_in, w4, axis=3)
        if keep_out is not None:
            w4 = np.compress(keep_out, w4, axis=2)
            r4 = np.compress(keep_out, np.compress(keep_out, r4, axis=2), axis=3)
            kept = int(keep_out.sum())
            for index, rows in ((3, 2 * g), (self.peephole_input, 3)):
                if index is None or _present(node, index) is None:
                    continue
                value = ctx.const(node.input[index]).reshape(d, rows, hidden)
                ctx.set_const_input(name, node, index, np.compress(keep_out, value, axis=2).reshape(d, rows * kept))
            for index in self.state_inputs:
                if _present(node, index) is not None:
                    state = ctx.const(node.input[index])
                    ctx.set_const_input(name, node, index, np.compress(keep_out, state, axis=state.ndim - 1))
            ctx.set_attr(node, "hidden_size", kept)
            r = r4.reshape(d, g * kept, kept)
            ctx.set_const_input(name, node, 2, r)
        ctx.set_const_input(name, node, 1, w4.reshape(d, g * w4.shape[2], w4.shape[3]))


@register("LSTM")
class LSTMRule(RecurrentRule):
    gates = 4
    state_inputs = (5, 6)
    peephole_input = 7


@register("GRU")
class GRURule(RecurrentRule):
    gates = 3


@register("RNN")
class RNNRule(RecurrentRule):
    gates = 1
