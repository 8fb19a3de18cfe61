"""Converters for the recurrent layers ONNX LSTM, GRU and RNN (opsets 7, 14, 22).

One module, :class:`RecurrentLayer`, runs the recurrence step by step in ONNX's own gate order
(LSTM ``i, o, f, c``; GRU ``z, r, h``), so no gate reordering into torch's ``i, f, g, o`` /
``r, z, n`` is needed and everything torch's fused kernels cannot express is exact: both
``linear_before_reset`` values, peepholes ``P``, ``clip``, ``sequence_lens``, ``layout`` 0/1,
initial states, reverse and bidirectional directions.

Parameters are stored *unit-major*, so that the search's per-output-channel weight quantizer
(channel axis 0) quantizes one hidden unit per channel, with one scale over all of the unit's
rows in W and R (every gate, every direction):

* ``weight``: ``[H, D, G, I + H]``: W's rows of unit j (``[..., :I]``) next to R's (``[..., I:]``);
* ``bias``: ``[H, D, 2G]`` (W's bias, then R's bias, per gate), ``peephole``: ``[H, D, 3]``.

:class:`RecurrentBinding` maps them back to the ONNX ``[D, G*H, I]`` / ``[D, G*H, H]`` /
``[D, 2G*H]`` / ``[D, 3H]`` layouts for write-back. When the module's weight is parametrized
(the fake-quantized model), a pruned unit (0 bits in the frozen plan) also has its bias and
initial states zeroed, so its output is exactly zero: the same as removing the unit from the
ONNX graph; in a search they are scaled by the unit's kept probability ``1 - theta_0``. The
plain bridge (parity, the teacher) is never gated.

Activations: Sigmoid, Tanh, Relu, Softsign, Softplus (the parameter-free ones); any other,
``activation_alpha`` / ``activation_beta`` and LSTM ``input_forget=1`` are refused in one line
naming the attribute.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from onnx2torch.onnx_graph import OnnxGraph
from onnx2torch.onnx_node import OnnxNode
from onnx2torch.utils.common import OnnxMapping, OperationConverterResult
from torch import Tensor, nn
from torch.nn.utils import parametrize

from plugin.bridge import registry
from plugin.bridge._common import ParamBinding, attach_bindings, const_input, input_name, result, unsupported

logger = logging.getLogger(__name__)

#: gates per op, activations per direction, default activations (ONNX order)
_GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
_DEFAULTS = {"LSTM": ("Sigmoid", "Tanh", "Tanh"), "GRU": ("Sigmoid", "Tanh"), "RNN": ("Tanh",)}
_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "sigmoid": torch.sigmoid, "tanh": torch.tanh, "relu": torch.relu,
    "softsign": F.softsign, "softplus": F.softplus,
}
_DIRECTIONS = {"forward": 1, "reverse": 1, "bidirectional": 2}


@dataclass(frozen=True)
class RecurrentBinding(ParamBinding):
    """One ONNX recurrent initializer held (unit-major) in a :class:`RecurrentLayer` tensor.

    ``part``: ``"W"`` / ``"R"`` (slices of the joint weight), ``"B"`` or ``"P"``."""

    part: str = "W"
    input_size: int = 0

    def to_onnx(self, tensor: torch.Tensor) -> np.ndarray:
        value = tensor.detach().cpu()
        if self.part == "W":
            value = value[..., : self.input_size]
        elif self.part == "R":
            value = value[..., self.input_size :]
        # [H, D, G, K] -> [D, G, H, K] -> [D, G*H, K];  [H, D, n] -> [D, n, H] -> [D, n*H]
        value = value.permute(1, 2, 0, 3) if value.dim() == 4 else value.permute(1, 2, 0)
        return value.contiguous().numpy().reshape(self.onnx_shape)


def _unit_major(w: np.ndarray, gates: int) -> np.ndarray:
    """ONNX ``[D, G*H, K]`` -> ``[H, D, G, K]``; ``[D, n*H]`` -> ``[H, D, n]``."""
    if w.ndim == 3:
        d, gh, k = w.shape
        return np.ascontiguousarray(w.reshape(d, gates, gh // gates, k).transpose(2, 0, 1, 3))
    d, nh = w.shape
    return np.ascontiguousarray(w.reshape(d, gates, nh // gates).transpose(2, 0, 1))


class RecurrentLayer(nn.Module):
    """ONNX LSTM / GRU / RNN (see the module docstring). ``forward(x, *dynamic)`` takes the
    node's non-constant optional inputs in ONNX order (sequence_lens, initial_h, initial_c)."""

    def __init__(self, op: str, weight: np.ndarray, bias: np.ndarray | None, peephole: np.ndarray | None,
                 *, hidden: int, direction: str, layout: int, clip: float | None,
                 activations: list[str], linear_before_reset: bool, dynamic: tuple[str, ...],
                 constants: dict[str, np.ndarray], n_outputs: int) -> None:
        super().__init__()
        self.op, self.hidden, self.direction, self.layout = op, hidden, direction, layout
        self.gates = _GATES[op]
        self.directions = _DIRECTIONS[direction]
        self.input_size = weight.shape[-1] - hidden
        self.clip = clip
        self.activation_names = [a.lower() for a in activations]
        self.linear_before_reset = linear_before_reset
        self.dynamic = dynamic
        self.n_outputs = n_outputs
        self.weight = nn.Parameter(torch.from_numpy(np.ascontiguousarray(weight)))
        self.bias = None if bias is None else nn.Parameter(torch.from_numpy(bias))
        self.peephole = None if peephole is None else nn.Parameter(torch.from_numpy(peephole))
        for key, value in constants.items():
            self.register_buffer(f"const_{key}", torch.from_numpy(np.ascontiguousarray(value)))
        self._constants = tuple(constants)

    # ------------------------------------------------------------------ helpers
    def _act(self, direction: int, index: int, x: Tensor, clip: bool = True) -> Tensor:
        per_dir = len(_DEFAULTS[self.op])
        if clip and self.clip is not None:
            x = x.clamp(-self.clip, self.clip)
        return _ACTIVATIONS[self.activation_names[direction * per_dir + index]](x)

    def _alive(self, weight: Tensor) -> Tensor | None:
        """Per unit, how much of it is kept, in the fake-quantized model (None in the plain
        bridge): 1 / 0 from a frozen plan's bits, ``1 - theta_0`` in a search (the engine's
        bias gate does the same for a Conv's bias); without a quantizer, whether the unit's
        rows are non-zero."""
        if not parametrize.is_parametrized(self, "weight"):
            return None
        quantizer = self.parametrizations["weight"][0]
        frozen = getattr(quantizer, "frozen_bits", None)
        if frozen is not None and frozen.numel() == self.hidden:
            return (frozen != 0).to(weight.dtype)
        precisions = tuple(getattr(quantizer, "precisions", ()))
        if 0 in precisions and hasattr(quantizer, "theta"):
            theta = quantizer.theta()
            if theta.shape[-1] == self.hidden:
                return (1 - theta[precisions.index(0)]).to(weight.dtype)
        return (weight.detach().reshape(self.hidden, -1) != 0).any(dim=1).to(weight.dtype)

    def _input(self, key: str, values: dict[str, Tensor]) -> Tensor | None:
        if key in values:
            return values[key]
        if key in self._constants:
            return getattr(self, f"const_{key}")
        return None

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor, *args: Tensor):  # noqa: D102
        values = dict(zip(self.dynamic, args))
        seq_lens, h0, c0 = (self._input(k, values) for k in ("sequence_lens", "initial_h", "initial_c"))
        if self.layout == 1:  # [batch, seq, I] -> [seq, batch, I]; states [batch, D, H] -> [D, batch, H]
            x = x.transpose(0, 1)
            h0 = None if h0 is None else h0.transpose(0, 1)
            c0 = None if c0 is None else c0.transpose(0, 1)
        seq, batch = x.shape[0], x.shape[1]
        weight = self.weight
        alive = self._alive(weight)
        dtype = x.dtype
        zeros = torch.zeros(self.directions, batch, self.hidden, dtype=dtype, device=x.device)
        h0 = zeros if h0 is None else h0.to(dtype)
        c0 = zeros if c0 is None else c0.to(dtype)
        bias = self.bias
        if alive is not None:
            h0, c0 = h0 * alive, c0 * alive
            bias = None if bias is None else bias * alive.reshape(-1, 1, 1)
        if seq_lens is None:
            lengths = torch.full((batch,), seq, dtype=torch.long, device=x.device)
        else:
            lengths = seq_lens.to(torch.long).reshape(batch)
        steps = torch.arange(seq, device=x.device).reshape(seq, 1)
        valid = (steps < lengths.reshape(1, batch))  # [seq, batch]
        ys, hs, cs = [], [], []
        for d in range(self.directions):
            reverse = self.direction == "reverse" or d == 1
            y, h, c = self._direction(x, d, reverse, weight, bias, h0[d], c0[d], lengths, valid, steps)
            ys.append(y)
            hs.append(h)
            cs.append(c)
        y = torch.stack(ys, dim=1)  # [seq, D, batch, H]
        y_h, y_c = torch.stack(hs, dim=0), torch.stack(cs, dim=0)  # [D, batch, H]
        if self.layout == 1:
            y, y_h, y_c = y.permute(2, 0, 1, 3), y_h.transpose(0, 1), y_c.transpose(0, 1)
        outs = (y, y_h, y_c)[: self.n_outputs]
        return outs if len(outs) > 1 else outs[0]

    def _direction(self, x: Tensor, d: int, reverse: bool, weight: Tensor, bias: Tensor | None,
                   h: Tensor, c: Tensor, lengths: Tensor, valid: Tensor, steps: Tensor):
        g, hidden, k = self.gates, self.hidden, self.input_size
        w = weight[:, d, :, :k].permute(1, 0, 2).reshape(g * hidden, k)  # ONNX rows
        r = weight[:, d, :, k:].permute(1, 0, 2).reshape(g * hidden, hidden)
        if bias is None:
            wb = rb = torch.zeros(g * hidden, dtype=x.dtype, device=x.device)
        else:
            b = bias[:, d, :].T  # [2G, H]
            wb, rb = b[:g].reshape(-1), b[g:].reshape(-1)
        seq, batch = x.shape[0], x.shape[1]
        index = None
        if reverse:  # step t reads position len-1-t inside each sequence (an involution)
            index = torch.where(valid, lengths.reshape(1, batch) - 1 - steps, steps.expand(seq, batch))
            x = torch.gather(x, 0, index.unsqueeze(-1).expand(seq, batch, x.shape[2]))
        xw = torch.matmul(x, w.T) + wb  # [seq, batch, G*H]
        p = None
        if self.peephole is not None:
            p = self.peephole[:, d, :].T  # [3, H]: i, o, f
        out = []
        for t in range(seq):
            h_new, c_new = self._cell(d, xw[t], h, c, r, rb, p)
            m = valid[t].reshape(batch, 1).to(x.dtype)
            h = m * h_new + (1 - m) * h
            c = m * c_new + (1 - m) * c
            out.append(m * h_new)
        y = torch.stack(out, dim=0)
        if index is not None:
            y = torch.gather(y, 0, index.unsqueeze(-1).expand(seq, batch, hidden))
        return y, h, c

    def _cell(self, d: int, xw: Tensor, h: Tensor, c: Tensor, r: Tensor, rb: Tensor, p: Tensor | None):
        hidden = self.hidden
        if self.op == "RNN":
            return self._act(d, 0, xw + h @ r.T + rb), c
        if self.op == "GRU":
            xz, xr, xh = xw.split(hidden, dim=-1)
            rz, rr, rh = r.split(hidden, dim=0)
            bz, br, bh = rb.split(hidden)
            z = self._act(d, 0, xz + h @ rz.T + bz)
            rg = self._act(d, 0, xr + h @ rr.T + br)
            if self.linear_before_reset:
                n = self._act(d, 1, xh + rg * (h @ rh.T + bh))
            else:
                n = self._act(d, 1, xh + (rg * h) @ rh.T + bh)
            return (1 - z) * n + z * h, c
        gates = xw + h @ r.T + rb
        i, o, f, cc = gates.split(hidden, dim=-1)
        if p is not None:
            i = i + p[0] * c
            f = f + p[2] * c
        i, f = self._act(d, 0, i), self._act(d, 0, f)
        c_new = f * c + i * self._act(d, 1, cc)
        if p is not None:
            o = o + p[1] * c_new
        o = self._act(d, 0, o)
        return o * self._act(d, 2, c_new, clip=False), c_new


# ---------------------------------------------------------------------------- the converter


def _initializer(graph: OnnxGraph, node: OnnxNode, index: int, what: str) -> tuple[str | None, np.ndarray | None]:
    name = input_name(node, index)
    if name is None:
        return None, None
    if name not in graph.initializers:
        raise unsupported(node, f"a {what} computed at run time (input {index} {name!r})")
    return name, graph.initializers[name].to_numpy()


def _convert(op: str):
    def convert(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
        attrs = node.attributes
        direction = attrs.get("direction", "forward")
        if isinstance(direction, bytes):
            direction = direction.decode()
        if direction not in _DIRECTIONS:
            raise unsupported(node, f"direction={direction!r}")
        for attr in ("activation_alpha", "activation_beta"):
            if attrs.get(attr):
                raise unsupported(node, f"{attr} (parametrised activations)")
        if op == "LSTM" and int(attrs.get("input_forget", 0)):
            raise unsupported(node, "input_forget=1 (coupled input and forget gates)")
        layout = int(attrs.get("layout", 0))
        clip = attrs.get("clip")
        n_dir = _DIRECTIONS[direction]
        names = attrs.get("activations")
        names = [a.decode() if isinstance(a, bytes) else str(a) for a in names] if names else None
        per_dir = len(_DEFAULTS[op])
        if names is None:
            names = list(_DEFAULTS[op]) * n_dir
        if len(names) == per_dir and n_dir == 2:
            names = names * 2
        if len(names) != per_dir * n_dir:
            raise unsupported(node, f"activations={names} ({per_dir} per direction expected)")
        bad = [a for a in names if a.lower() not in _ACTIVATIONS]
        if bad:
            raise unsupported(node, f"activation {bad[0]!r} in activations")
        gates = _GATES[op]
        w_name, w = _initializer(graph, node, 1, "weight W")
        r_name, r = _initializer(graph, node, 2, "recurrence weight R")
        if w is None or r is None:
            raise unsupported(node, "W or R missing")
        hidden = int(attrs.get("hidden_size", r.shape[-1]))
        if r.shape != (n_dir, gates * hidden, hidden) or w.shape[:2] != (n_dir, gates * hidden):
            raise unsupported(node, f"W {list(w.shape)} / R {list(r.shape)} for hidden_size={hidden}")
        b_name, b = _initializer(graph, node, 3, "bias B")
        p_name, p = (None, None)
        if op == "LSTM":
            p_name, p = _initializer(graph, node, 7, "peephole P")
        joint = np.concatenate([_unit_major(w, gates), _unit_major(r, gates)], axis=-1)
        bias = None if b is None else _unit_major(b, 2 * gates)
        peep = None if p is None else _unit_major(p, 3)
        dynamic: list[str] = []
        constants: dict[str, np.ndarray] = {}
        inputs = [node.input_values[0]]
        roles = {4: "sequence_lens", 5: "initial_h", 6: "initial_c"}
        for index, key in roles.items():
            name = input_name(node, index)
            if name is None or (key == "initial_c" and op != "LSTM"):
                continue
            value = const_input(node, graph, index)
            if value is not None:
                constants[key] = value
            else:
                dynamic.append(key)
                inputs.append(name)
        outputs = list(node.output_values)
        while outputs and not outputs[-1]:
            outputs.pop()
        module = RecurrentLayer(
            op, joint, bias, peep, hidden=hidden, direction=direction, layout=layout,
            clip=None if clip is None else float(clip), activations=names,
            linear_before_reset=bool(int(attrs.get("linear_before_reset", 0))),
            dynamic=tuple(dynamic), constants=constants, n_outputs=max(len(outputs), 1),
        )
        k = w.shape[-1]
        bindings = [RecurrentBinding("weight", w_name, False, tuple(w.shape), "W", k),
                    RecurrentBinding("weight", r_name, False, tuple(r.shape), "R", k)]
        if b_name is not None:
            bindings.append(RecurrentBinding("bias", b_name, False, tuple(b.shape), "B", k))
        if p_name is not None:
            bindings.append(RecurrentBinding("peephole", p_name, False, tuple(p.shape), "P", k))
        mapping = OnnxMapping(inputs=tuple(inputs), outputs=tuple(outputs) or tuple(node.output_values))
        return result(attach_bindings(module, bindings), mapping)

    return convert


registry.register("LSTM", 7, 14, 22)(_convert("LSTM"))
registry.register("GRU", 7, 14, 22)(_convert("GRU"))
registry.register("RNN", 7, 14, 22)(_convert("RNN"))
