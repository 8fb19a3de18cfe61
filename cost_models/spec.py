"""What a cost model sees of one layer: a static :class:`LayerSpec` and the searchable
:class:`CostInputs` (precision probabilities and effective input channels).

Neither imports torch. ``CostInputs`` holds numpy arrays (a final plan, a report) or torch
tensors (the differentiable search); the cost formulas treat both alike.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from graph_passes.errors import CostModelError

from ._math import Scalar, channel_mass, is_tensor, probabilities, weighted_sum


LAYER_KINDS = ("conv", "depthwise", "linear", "recurrent", "act_matmul", "embedding")


def _pair(value: Any, what: str, layer: str) -> tuple[int, int]:
    """Two positive ints; a 1-d size ``(k,)`` becomes ``(1, k)``."""
    try:
        pair = tuple(int(v) for v in value)
    except TypeError:
        pair = ()
    pair = (1, *pair) if len(pair) == 1 else pair
    if len(pair) != 2 or min(pair) < 1:
        raise CostModelError(
            f"layer {layer!r}: {what} must be one or two positive integers (2-d layers at most), "
            f"got {value!r}"
        )
    return pair  # type: ignore[return-value]


@dataclass(frozen=True)
class LayerSpec:
    """The static shape of one weight layer, with full (unpruned) channel counts.

    Attributes:
        name: the layer's name (the ONNX node name), used in messages and reports.
        kind: ``"conv"`` (any Conv, grouped included), ``"depthwise"`` (each output channel
            reads one input channel; ``groups == c_in``), ``"linear"`` (Gemm/MatMul) or
            ``"recurrent"`` (LSTM/GRU/RNN: an output channel is a hidden unit, which reads the
            ``c_in`` inputs and the ``c_out`` hidden units of the previous step through each of
            its ``kh*kw`` = directions x gates rows, at ``h_o*w_o`` = sequence-length steps;
            the recurrent fan-in counts all ``c_out`` units, pruned ones included),
            ``"act_matmul"`` (an activation x activation MatMul, Q K^T or attention x V: no stored
            weights; operand B plays the weight, its bit-width in ``w_theta`` and operand A's in
            ``a_theta``; ``groups`` = H heads, ``c_in = H * k``, ``c_out = H * n`` (head-major
            columns: a pruned head's columns are 0-bit), ``h_o*w_o`` = m times the other batched
            dims, so ``macs = H * m * k * n`` = B*H*S*S*Dh per sample for attention) or
            ``"embedding"`` (a table of ``c_out`` rows of ``c_in`` values read by a Gather: stored
            weights, one bit-width per row, no MACs).
        c_in, c_out: input and output channel counts.
        kernel: ``(kh, kw)``; ``(1, 1)`` for linear layers; a 1-d conv's ``(k,)`` is stored as
            ``(1, k)``.
        out_hw: output spatial size ``(h_o, w_o)`` (1-d: ``(l_o,)`` is stored as ``(1, l_o)``).
            For a linear layer applied at several positions (a sequence), ``h_o * w_o`` is the
            number of positions; plain Gemm ``(1, 1)``.
        groups: the conv ``group`` attribute (1 for linear).
        macs: multiply-accumulates per sample with all channels kept. Derived when left out;
            when given it must agree with the shape (``c_out * c_in/groups * kh*kw * h_o*w_o``).
        weights_of: the name of the layer whose weight tensor this one reads (a reused kernel,
            tied weights: ``graph_passes.untie``), else None. Such a layer costs its MACs in
            every model (bops, energy, latency: it still computes), but stores no weights: the
            ``size`` model counts it 0 bits, the owner's spec counts the tensor once.
    """

    name: str
    kind: str
    c_in: int
    c_out: int
    kernel: tuple[int, int] = (1, 1)
    out_hw: tuple[int, int] = (1, 1)
    groups: int = 1
    macs: int | None = None
    weights_of: str | None = None

    @property
    def stores_weights(self) -> bool:
        """False for a layer reading another layer's weights (``weights_of``)."""
        return self.weights_of is None

    def __post_init__(self) -> None:
        if self.kind not in LAYER_KINDS:
            raise CostModelError(
                f"layer {self.name!r}: unknown kind {self.kind!r}; "
                f"use one of {', '.join(LAYER_KINDS)}"
            )
        if int(self.c_in) < 1 or int(self.c_out) < 1 or int(self.groups) < 1:
            raise CostModelError(
                f"layer {self.name!r}: c_in, c_out and groups must be positive, "
                f"got c_in={self.c_in}, c_out={self.c_out}, groups={self.groups}"
            )
        object.__setattr__(self, "kernel", _pair(self.kernel, "kernel", self.name))
        object.__setattr__(self, "out_hw", _pair(self.out_hw, "out_hw", self.name))
        self._check_grouping()
        derived = 0 if self.kind == "embedding" else self.c_out * self.fan_in * self.kernel_area * self.positions
        if self.macs is None:
            object.__setattr__(self, "macs", derived)
        elif int(self.macs) != derived:
            raise CostModelError(
                f"layer {self.name!r}: macs={self.macs} disagrees with its shape "
                f"(c_out * c_in/groups * kh*kw * h_o*w_o = {derived}); give MACs per sample "
                f"(divide by the batch size) or leave macs out to derive it"
            )

    def _check_grouping(self) -> None:
        if self.c_in % self.groups or self.c_out % self.groups:
            raise CostModelError(
                f"layer {self.name!r}: groups={self.groups} must divide c_in={self.c_in} "
                f"and c_out={self.c_out}"
            )
        if self.kind == "depthwise" and self.groups != self.c_in:
            raise CostModelError(
                f"layer {self.name!r}: a depthwise layer needs groups == c_in "
                f"(got groups={self.groups}, c_in={self.c_in}); pass groups={self.c_in}"
            )
        if self.kind == "recurrent" and self.groups != 1:
            raise CostModelError(f"layer {self.name!r}: a recurrent layer has groups 1, got {self.groups}")
        if self.kind in ("act_matmul", "embedding") and self.kernel != (1, 1):
            raise CostModelError(f"layer {self.name!r}: an {self.kind} layer has kernel (1, 1), got {self.kernel}")
        if self.kind == "embedding" and (self.groups != 1 or self.out_hw != (1, 1)):
            raise CostModelError(f"layer {self.name!r}: an embedding has groups 1 and out_hw (1, 1)")
        if self.kind == "linear" and (self.kernel != (1, 1) or self.groups != 1):
            raise CostModelError(
                f"layer {self.name!r}: a linear layer has kernel (1, 1) and groups 1, "
                f"got kernel={self.kernel}, groups={self.groups}"
            )

    @property
    def computes(self) -> bool:
        """False for an embedding look-up (no MACs)."""
        return self.kind != "embedding"

    @property
    def kernel_area(self) -> int:
        """``kh * kw``."""
        return self.kernel[0] * self.kernel[1]

    @property
    def positions(self) -> int:
        """``h_o * w_o``: output positions per sample."""
        return self.out_hw[0] * self.out_hw[1]

    @property
    def fan_in(self) -> int:
        """Input channels read by one output channel (full counts; recurrent: inputs plus
        hidden units)."""
        if self.kind == "recurrent":
            return self.c_in + self.c_out
        return 1 if self.kind == "depthwise" else self.c_in // self.groups

    def fan_in_eff(self, c_in_eff: Scalar) -> Scalar:
        """Expected input channels read by one output channel.

        ``c_in_eff / groups`` for conv and linear; 1 for depthwise, whose cost is per channel
        (its input channels are tied to its output channels, so ``c_in_eff`` does not enter).
        """
        if self.kind == "recurrent":
            return c_in_eff + self.c_out
        return 1.0 if self.kind == "depthwise" else c_in_eff / self.groups

    def macs_per_out_channel(self, c_in_eff: Scalar) -> Scalar:
        """Expected MACs of one kept output channel: ``fan_in_eff * kh*kw * h_o*w_o`` (0 for an
        embedding)."""
        if not self.computes:
            return 0.0
        return self.fan_in_eff(c_in_eff) * (self.kernel_area * self.positions)


def _as_array(value: Any, ndim: int, what: str) -> Any:
    array = value if is_tensor(value) else np.asarray(value, dtype=np.float64)
    if array.ndim != ndim:
        raise CostModelError(
            f"{what} must have {ndim} dimension(s), got shape {tuple(array.shape)}"
        )
    return array


def _precisions(values: Sequence[int], what: str) -> tuple[int, ...]:
    precisions = tuple(int(v) for v in values)
    if not precisions or min(precisions) < 0 or len(set(precisions)) != len(precisions):
        raise CostModelError(f"{what} must be distinct non-negative bit-widths, got {values!r}")
    return precisions


@dataclass(frozen=True, eq=False)
class CostInputs:
    """The searchable quantities of one layer.

    Attributes:
        w_precisions: weight bit-widths, e.g. ``(0, 2, 4, 8)``; 0 means "pruned channel".
        w_theta: probabilities, shape ``[len(w_precisions), c_out]`` (numpy array or torch
            tensor; one-hot columns for a final plan). Column c sums to 1.
        a_precisions: activation bit-widths of the layer's input, e.g. ``(2, 4, 8)``.
        a_theta: probabilities, shape ``[len(a_precisions)]``.
        c_in_eff: effective input channels: the producer's ``C_out_eff``, detached by the
            caller (or ``c_in`` for a network input). A float or a 0-d tensor.

        sparsity: fine-grained (unstructured) sparsity of the layer's kept weights, a float in
            ``[0, 1)``: in each kept output channel ``floor(sparsity * n)`` of its ``n`` weights
            at kept input positions are zero (:func:`zeroed_per_channel`, the plan's rule).
            Which cost models count those zeros, and how, each model's docstring states.

    Compared by identity (``eq=False``): it holds arrays.
    """

    w_precisions: tuple[int, ...]
    w_theta: Any
    a_precisions: tuple[int, ...]
    a_theta: Any
    c_in_eff: Scalar
    sparsity: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "w_precisions", _precisions(self.w_precisions, "w_precisions"))
        object.__setattr__(self, "a_precisions", _precisions(self.a_precisions, "a_precisions"))
        object.__setattr__(self, "w_theta", _as_array(self.w_theta, 2, "w_theta"))
        object.__setattr__(self, "a_theta", _as_array(self.a_theta, 1, "a_theta"))
        if not is_tensor(self.c_in_eff):
            object.__setattr__(self, "c_in_eff", float(self.c_in_eff))
        sparsity = float(self.sparsity)
        if not 0.0 <= sparsity < 1.0:
            raise CostModelError(f"sparsity must be in [0, 1), got {self.sparsity!r}")
        object.__setattr__(self, "sparsity", sparsity)
        if self.w_theta.shape[0] != len(self.w_precisions):
            raise CostModelError(
                f"w_theta has {self.w_theta.shape[0]} rows but there are "
                f"{len(self.w_precisions)} weight precisions {self.w_precisions}"
            )
        if self.a_theta.shape[0] != len(self.a_precisions):
            raise CostModelError(
                f"a_theta has {self.a_theta.shape[0]} entries but there are "
                f"{len(self.a_precisions)} activation precisions {self.a_precisions}"
            )

    @classmethod
    def from_bits(
        cls,
        w_bits: Sequence[int],
        a_bits: int,
        c_in_eff: float,
        w_precisions: Sequence[int] = (0, 2, 4, 8),
        a_precisions: Sequence[int] = (2, 4, 8),
        sparsity: float = 0.0,
    ) -> CostInputs:
        """One-hot inputs for a final plan: ``w_bits[c]`` per output channel (0 = pruned), with
        the layer's fine-grained ``sparsity``."""
        w_precisions, a_precisions = tuple(w_precisions), tuple(a_precisions)
        unknown = sorted({int(b) for b in w_bits} - set(w_precisions)) + (
            [] if a_bits in a_precisions else [a_bits]
        )
        if unknown:
            raise CostModelError(
                f"bit-widths {unknown} are not among w_precisions {w_precisions} / "
                f"a_precisions {a_precisions}; add them to the precision sets"
            )
        w_theta = np.zeros((len(w_precisions), len(w_bits)))
        w_theta[[w_precisions.index(int(b)) for b in w_bits], np.arange(len(w_bits))] = 1.0
        a_theta = np.zeros(len(a_precisions))
        a_theta[a_precisions.index(a_bits)] = 1.0
        return cls(w_precisions, w_theta, a_precisions, a_theta, c_in_eff, sparsity)

    def c_out_eff(self) -> Scalar:
        """``C_out_eff = C_out - sum_c theta[0, c]``: the expected number of kept channels.

        Pass it, detached, as the next layer's ``c_in_eff``.
        """
        c_out = float(self.w_theta.shape[1])
        if 0 not in self.w_precisions:
            return c_out
        pruned = self.w_theta[self.w_precisions.index(0)].sum()
        return c_out - (pruned if is_tensor(pruned) else float(pruned))


def check_inputs(spec: LayerSpec, inputs: CostInputs, model: str) -> None:
    """Fail with a one-line message if ``inputs`` do not belong to ``spec``."""
    if inputs.w_theta.shape[1] != spec.c_out:
        raise CostModelError(
            f"cost model {model!r}, layer {spec.name!r}: w_theta has {inputs.w_theta.shape[1]} "
            f"columns but the layer has c_out={spec.c_out}"
        )
    c_in_eff = inputs.c_in_eff
    if not is_tensor(c_in_eff) and not -1e-6 <= c_in_eff <= spec.c_in + 1e-6:
        raise CostModelError(
            f"cost model {model!r}, layer {spec.name!r}: c_in_eff={c_in_eff} is outside "
            f"[0, c_in={spec.c_in}]"
        )


def expected_bits(precisions: Sequence[int], theta: Any) -> Scalar:
    """``sum_i theta[i] * precisions[i]`` for a 1-d probability vector."""
    return weighted_sum(precisions, probabilities(theta))


def channel_bits(inputs: CostInputs) -> Scalar:
    """``sum_c sum_j theta[j, c] * b_j``: expected bits of one weight position over all
    output channels (0-bit, i.e. pruned, channels add nothing)."""
    return weighted_sum(inputs.w_precisions, channel_mass(inputs.w_theta))


def zeroed_per_channel(sparsity: float, n: int) -> int:
    """How many of the ``n`` weights of one kept output channel a layer of fine-grained
    ``sparsity`` zeroes: ``floor(sparsity * n)``. The one rule the plan, the fake-quant engine,
    the export and the cost models share."""
    return int(math.floor(float(sparsity) * int(n) + 1e-9)) if sparsity > 0 and n > 0 else 0


def weights_per_channel(spec: LayerSpec, inputs: CostInputs) -> Scalar:
    """``n``: weights of one kept output channel at kept input positions, ``fan_in_eff * kh*kw``."""
    return spec.fan_in_eff(inputs.c_in_eff) * spec.kernel_area


def nonzero_per_channel(spec: LayerSpec, inputs: CostInputs) -> Scalar:
    """Nonzero weights of one kept output channel: ``n - floor(sparsity * n)`` on numbers (exact
    for a plan: ``c_in_eff`` is then a whole number), ``n * (1 - sparsity)`` on tensors."""
    n = weights_per_channel(spec, inputs)
    if not inputs.sparsity:
        return n
    if is_tensor(n):
        return n * (1.0 - inputs.sparsity)
    whole = int(round(float(n)))
    if abs(float(n) - whole) > 1e-6:  # an expectation: no whole channel to floor over
        return float(n) * (1.0 - inputs.sparsity)
    return float(whole - zeroed_per_channel(inputs.sparsity, whole))


def density(spec: LayerSpec, inputs: CostInputs) -> Scalar:
    """Fraction of a kept channel's weights that are nonzero (1.0 when dense)."""
    if not inputs.sparsity:
        return 1.0
    n = weights_per_channel(spec, inputs)
    if not is_tensor(n) and float(n) <= 0:
        return 1.0
    return nonzero_per_channel(spec, inputs) / n
